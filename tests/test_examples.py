"""The scripts in examples/: each runs to its end, quickly, and says what it showed."""

from __future__ import annotations

import importlib.util
import json
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


@needs("aiohttp")
@needs("prometheus_client")
def test_metrics_app() -> None:
    """/metrics after 8 hashes and a killed worker: exact counts, and both workers' gauges."""
    out = run_example("metrics_app.py", "--smoke").stdout
    assert "killed worker 1 (pid " in out
    for line in (
        'looppool_messages_put_total{pool="hash"} 9.0',  # 8 hashes and 1 "pid"
        'looppool_messages_processed_total{pool="hash"} 9.0',
        'looppool_messages_failed_total{pool="hash"} 0.0',
        'looppool_messages_lost_total{pool="hash"} 0.0',
        'looppool_messages_redelivered_total{pool="hash"} 0.0',
        'looppool_worker_respawns_total{pool="hash"} 1.0',
        'looppool_messages_pending{pool="hash"} 0.0',
        'looppool_workers{pool="hash"} 2.0',
        'looppool_messages_in_flight{pool="hash",worker="1"} 0.0',
    ):
        assert f"  {line}\n" in out
    gauges = {
        line.split()[0]: float(line.split()[1])
        for line in out.splitlines()
        if line.startswith("  looppool_worker_")
    }
    for worker in ("0", "1"):
        assert gauges[f'looppool_worker_rss_bytes{{pool="hash",worker="{worker}"}}'] > 0
    # Worker 1 is the replacement: it started after worker 0.
    started = 'looppool_worker_start_time_seconds{pool="hash",worker="%s"}'
    assert gauges[started % "1"] > gauges[started % "0"]


@needs("aiohttp")
@needs("opentelemetry.sdk")
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_traced_crawler(start_method: str, tmp_path: Path) -> None:
    """Every worker span is a child of the parent's crawl span, from another process."""
    out = run_example(
        "traced_crawler.py", "--start-method", start_method, "--spans", str(tmp_path)
    ).stdout
    assert "crawled 7 pages with 2 worker processes" in out
    spans = [
        json.loads(line)
        for path in tmp_path.glob("spans-*.jsonl")
        for line in path.read_text().splitlines()
    ]
    [crawl] = [s for s in spans if s["name"] == "crawl"]
    workers = [s for s in spans if s["name"] == "Crawler process_message"]
    assert len(workers) == 7
    assert {s["attributes"]["looppool.worker"] for s in workers} == {0, 1}
    assert len({s["pid"] for s in workers}) == 2
    for span in workers:
        assert span["kind"] == "CONSUMER"
        assert span["trace_id"] == crawl["trace_id"]
        assert span["parent_id"] == crawl["span_id"]
        assert span["pid"] != crawl["pid"]
        nested = sorted(s["name"].split()[0] for s in spans if s["parent_id"] == span["span_id"])
        assert nested == ["GET", "parse"]
    assert f"trace {crawl['trace_id']}: 22 spans from 3 processes" in out
