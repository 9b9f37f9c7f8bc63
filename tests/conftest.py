"""Shared fixtures: the loop matrix, and the check that no test leaves a process behind."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import psutil
import pytest

import looppool
from looppool.testing import InlinePool
from processes import LOOP_KIND, descendants, loop_factory

# RayPool's tests need the `ray` extra; the nox session `ray` installs it and
# runs them. Elsewhere they are not collected (rather than reported skipped).
collect_ignore = [] if importlib.util.find_spec("ray") else ["test_ray.py", "test_ray_cluster.py"]


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Run every async test on the loop kind chosen for this run."""
    return {LOOP_KIND: loop_factory()}


@pytest.fixture(autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Fail the test if any child process it started is still alive after it."""
    before = set(descendants())
    yield
    left = [p for pid, p in descendants().items() if pid not in before]
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


@pytest.fixture(autouse=True)
def collect_the_tests_cycles() -> Iterator[None]:
    """Collect the test's garbage cycles in its teardown, not during a later test."""
    yield
    # A pool is a reference cycle (its distribution and result stream point
    # back at it), so a test's gate (a multiprocessing Event in a worker's
    # factory) dies only when the cyclic GC runs. Left to chance, that can be
    # inside the next test's Barrier or Lock creation, i.e. inside
    # multiprocessing's resource tracker: the Event's finalizer then calls
    # the tracker again, which Python 3.13.0 refuses ("ResourceTracker
    # called reentrantly ... might leak", CPython gh-109593/gh-131788) and
    # the next, innocent test fails on the unraisable warning. CI hit it.
    gc.collect()


@pytest.fixture(params=["fork", "spawn"])
def start_method(request: pytest.FixtureRequest) -> str:
    """The multiprocessing start method a pool test runs under."""
    return str(request.param)


@pytest.fixture
def loop_kind() -> str:
    """The event loop the workers run (same as the parent's in this run)."""
    return LOOP_KIND


@pytest.fixture(params=["fork", "spawn", "inline"])
def make(request: pytest.FixtureRequest, loop_kind: str) -> Any:
    """Build a pool: processes under fork or spawn, or the in-process InlinePool.

    Behaviour that needs no process runs on both kinds of pool, which keeps
    InlinePool true to Pool.
    """
    backend = request.param

    def build(worker: Any, size: int = 2, **options: Any) -> Any:
        if backend == "inline":
            return InlinePool(worker, size=size, **options)
        options.setdefault("start_method", backend)
        options.setdefault("loop", loop_kind)
        return looppool.Pool(worker, size=size, **options)

    return build
