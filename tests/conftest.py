"""Shared fixtures: the loop matrix, and the check that no test leaves a process behind."""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Callable, Iterator, Mapping

import psutil
import pytest

#: The event loop the parent (and, by default, the workers) run in this test run:
#: ``LOOPPOOL_TEST_LOOP=uvloop`` runs the whole suite on uvloop.
LOOP_KIND = os.environ.get("LOOPPOOL_TEST_LOOP", "asyncio")

# RayPool's tests need the `ray` extra; the nox session `ray` installs it and
# runs them. Elsewhere they are not collected (rather than reported skipped).
collect_ignore = [] if importlib.util.find_spec("ray") else ["test_ray.py", "test_ray_cluster.py"]

_HELPERS = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Run every async test on the loop kind chosen for this run."""
    if LOOP_KIND == "uvloop":
        import uvloop

        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


def _descendants() -> dict[int, psutil.Process]:
    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
            parent = proc.ppid()
        except psutil.Error:
            continue
        # multiprocessing's fork server and resource tracker live for the
        # whole session by design; they are not pool workers. Only our direct
        # children can be those: a worker forked by the fork server shows the
        # server's command line (until setproctitle renames it) yet counts.
        if any(helper in cmdline for helper in _HELPERS) and parent == os.getpid():
            continue
        found[proc.pid] = proc
    return found


@pytest.fixture(autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Fail the test if any child process it started is still alive after it."""
    before = set(_descendants())
    yield
    left = [p for pid, p in _descendants().items() if pid not in before]
    if not left:
        return
    # A worker told to stop may still be between its last write and its
    # exit; give it a deadline rather than failing on a race we caused.
    _, alive = psutil.wait_procs(left, timeout=5)
    if alive:
        for proc in alive:
            proc.kill()
        psutil.wait_procs(alive, timeout=5)
        pytest.fail(f"the test left child processes behind: {[p.pid for p in alive]}")


@pytest.fixture(params=["fork", "spawn"])
def start_method(request: pytest.FixtureRequest) -> str:
    """The multiprocessing start method a pool test runs under."""
    return str(request.param)


@pytest.fixture
def loop_kind() -> str:
    """The event loop the workers run (same as the parent's in this run)."""
    return LOOP_KIND
