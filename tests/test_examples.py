"""The scripts in examples/: each runs to its end, quickly, and says what it showed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import looppool
from cli_workers import leftover_processes

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SRC = Path(looppool.__file__).resolve().parent.parent
DEADLINE = 90  # seconds an example may take before the test fails


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``examples/NAME ARGS``; check it left no process behind."""
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SENTRY_DSN")}
    env["PYTHONPATH"] = str(SRC)
    env["LOOPPOOL_TEST_MARK"] = marker
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        cwd=EXAMPLES,
        env=env,
        timeout=DEADLINE,
    )
    assert leftover_processes(marker) == []
    assert proc.returncode == 0, proc.stderr
    return proc


def needs(module: str) -> pytest.MarkDecorator:
    """Skip unless ``module`` is installed."""
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None, reason=f"{module} is not installed"
    )


@needs("aiohttp")
def test_fetch_worker() -> None:
    """The seed's FetchWorker: every URL of the local site is fetched and printed."""
    out = run_example("fetch_worker.py", "--smoke").stdout
    for server in ("nginx", "TornadoServer/6.4", "gws", "cloudflare"):
        assert f"/', '{server}')" in out
    assert "fetched 4 URLs with 2 worker processes" in out


@needs("setproctitle")
def test_instrumented_worker() -> None:
    """Process titles, statsd gauges from every worker, worker logs in the parent."""
    proc = run_example("instrumented_worker.py", "--smoke")
    for number in (0, 1):
        assert f"(python instrumented-example numbers pool worker {number})" in proc.stdout
    assert "processed 19, failed 1 in 2 workers" in proc.stdout
    assert "statsd gauges received from 2 workers" in proc.stdout
    assert "instrumented-example.numbers.worker.0." in proc.stdout
    # Records logged in the workers reach the parent's logging configuration.
    assert "WARNING __main__: [worker " in proc.stderr
    assert "ends in 7" in proc.stderr
    assert "ValueError: 13 is unlucky" in proc.stderr


def test_stateful_worker() -> None:
    """Every worker gets every table version once; each conversion uses the current one."""
    out = run_example("stateful_worker.py", "--smoke").stdout
    assert "worker 0 loaded table versions [1, 2, 3]" in out
    assert "worker 1 loaded table versions [1, 2, 3]" in out
    assert (
        "24 conversions; each used the table current when it was put: True; "
        "every worker loaded every version once: True"
    ) in out


@needs("aiohttp")
def test_web_app() -> None:
    """Requests to the aiohttp app are answered with hashes computed in the pool."""
    out = run_example("web_app.py", "--smoke").stdout
    assert out.count("... by worker ") == 8
    assert "health: {'processed': 8, 'pending': 0}" in out
    assert "served 8 hash requests with 2 worker processes" in out


def test_typed_usage_runs() -> None:
    """The typed example runs: a reply, a remote error with its traceback, results, stats."""
    out = run_example("typed_usage.py").stdout
    assert "greeting: 3 words (a reply from submit)" in out
    assert "worker traceback attached: True" in out
    assert "fox: top words [('the', 3), ('quick', 1)]" in out
    assert "processed 4, failed 1, results 4" in out
    assert "after stop, put raises PoolClosed" in out


# examples/typed_usage.py is checked by `mypy --strict` in the nox session `types`.


def test_typed_usage_runs_plain_functions() -> None:
    """The typed example's FunctionWorker section: run, map and starmap of typed functions."""
    out = run_example("typed_usage.py").stdout
    assert "run: 4 words; 'echo echo'" in out
    assert "map: [4, 4, 1]; starmap: ['hip hip', 'ho']" in out


def test_functions() -> None:
    """Plain functions without a Worker class: run, map (sync and async sources), starmap."""
    out = run_example("functions.py", "--smoke").stdout
    assert "run: digest(b'secret') = " in out
    assert "map: 40 digests in input order, window 8" in out
    assert "map of an async function over an async source: 2 workers served it" in out
    assert "starmap: ['" in out
    assert "run raised ValueError(an empty password); worker traceback attached: True" in out
