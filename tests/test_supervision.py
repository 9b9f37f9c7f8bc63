"""Supervision: dead workers, crash loops, stop timeouts, cancellation, orphans."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import looppool
import pool_workers as w

TESTS = Path(__file__).parent


@pytest.fixture
async def gate() -> AsyncIterator[w.Gate]:
    """A crash-safe latch holding "hold" messages until the test opens it."""
    directory = tempfile.mkdtemp(prefix="lp-")
    gate = w.Gate(os.path.join(directory, "gate"))
    await gate.serve()
    yield gate
    await gate.close()
    shutil.rmtree(directory)


@pytest.fixture
def make(start_method: str, loop_kind: str) -> Any:
    """Build a Pool with this run's start method and loop kind."""

    def build(worker: Any, size: int = 2, **options: Any) -> looppool.Pool:
        options.setdefault("start_method", start_method)
        options.setdefault("loop", loop_kind)
        return looppool.Pool(worker, size=size, **options)

    return build


async def wait_for_pid_change(pool: looppool.Pool, number: int, old: int) -> int:
    """Wait (by asking the worker, not by sleeping) until worker `number` is a new process."""
    pid = await pool.submit("pid", worker=number)
    assert pid != old
    return int(pid)


async def test_killed_safe_worker_is_replaced_and_its_messages_redelivered(
    make: Any, gate: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGKILL on a SafeWorker: it is replaced, and what it held runs once more there."""
    caplog.set_level(logging.ERROR)
    async with make(functools.partial(w.Fragile, gate), size=2) as pool:
        results = pool.results()
        await pool.put("hold", worker=0)
        number, _, pid = await anext(results)
        assert number == 0
        os.kill(pid, signal.SIGKILL)
        # "hold" was directed to worker 0: it runs again on its replacement.
        assert await anext(results) == (0, "holding", pool.pids[0])
        new_pid = pool.pids[0]
        assert new_pid != pid
        gate.open()
        await pool.drain()
        stats = pool.stats()
        assert stats.respawns == 1
        assert stats.redelivered == 1
        assert stats.lost == 0
        assert await wait_for_pid_change(pool, 0, pid) == new_pid
    rest = [r async for r in results]
    assert rest == [(0, "hold")]
    assert any("worker 0" in r.getMessage() and "SIGKILL" in r.getMessage() for r in caplog.records)


async def test_killed_worker_fails_its_submit_with_worker_lost(make: Any, gate: Any) -> None:
    """A plain Worker's death fails the submit it held with WorkerLost naming it."""
    async with make(functools.partial(w.FragileWorker, gate), size=2) as pool:
        results = pool.results()
        held = asyncio.ensure_future(pool.submit("hold", worker=1))
        _, _, pid = await anext(results)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(looppool.WorkerLost) as info:
            await held
        assert info.value.number == 1
        assert info.value.exitcode == -signal.SIGKILL
        assert "SIGKILL" in str(info.value)
        assert await pool.submit("after", worker=1) == "after"
        gate.open()
        assert pool.stats().lost == 1


@pytest.mark.parametrize("death", ["exit", "segv"])
async def test_message_that_kills_its_worker_twice_is_failed(make: Any, death: str) -> None:
    """A poison message is delivered once more, then failed with WorkerLost; the pool lives on."""
    async with make(w.Fragile, size=2) as pool:
        with pytest.raises(looppool.WorkerLost):
            await pool.submit(death)
        assert await pool.submit("still here") == "still here"
        stats = pool.stats()
        assert stats.respawns == 2
        assert stats.redelivered == 1
        assert stats.lost == 1


async def test_death_during_initialise_is_a_start_error(make: Any) -> None:
    """A worker process that dies inside initialise() makes start() raise WorkerStartError."""
    with pytest.raises(looppool.WorkerStartError, match="exit code 4") as info:
        async with make(w.DiesInInit, size=2):
            pass
    assert info.value.exitcode == 4


async def test_crash_loop_breaks_the_pool_loudly(
    make: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Replacements that keep failing are not respawned for ever: the pool breaks and says why."""
    marker = tmp_path / "refuse"
    pool = make(functools.partial(w.Fragile, None, str(marker)), size=2)
    async with pool:
        marker.touch()
        await pool.put("exit", worker=0)
        with pytest.raises(looppool.PoolBroken, match="failed to start 3 times"):
            await pool.drain()
        with pytest.raises(looppool.PoolBroken):
            await pool.put("x")
    assert any(r.levelno == logging.CRITICAL for r in caplog.records)
    assert all(pid is None for pid in pool.pids)


async def test_stop_timeout_kills_workers_that_do_not_finish(
    make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """stop(timeout=...) kills workers still busy after the timeout, and logs it."""
    caplog.set_level(logging.WARNING)
    pool = make(w.Fragile, size=1)
    await pool.start()
    results = pool.results()
    hung = asyncio.ensure_future(pool.submit("hang"))
    await anext(results)
    await pool.stop(timeout=0.5)
    with pytest.raises(looppool.PoolClosed):
        await hung
    assert any("killing worker 0" in r.getMessage() for r in caplog.records)
    assert pool.stats().lost == 1


async def test_death_while_stopping_does_not_hang_or_lose(make: Any, gate: Any) -> None:
    """A SafeWorker killed while the pool drains for stop: its messages still run."""
    pool = make(functools.partial(w.Fragile, gate), size=2)
    await pool.start()
    results = pool.results()
    await pool.put("hold", worker=0)
    _, _, pid = await anext(results)
    stopping = asyncio.ensure_future(pool.stop())
    await asyncio.sleep(0)  # let stop() begin waiting for the held message
    with pytest.raises(looppool.PoolClosed, match="draining"):
        pool.put_nowait("late")  # it has: the pool drains, so the kill lands in stop()
    os.kill(pid, signal.SIGKILL)
    # The replacement receives the message again: wait for it to hold it.
    number, what, new_pid = await anext(results)
    assert (number, what) == (0, "holding")
    assert new_pid != pid
    gate.open()
    await stopping
    assert [r async for r in results] == [(0, "hold")]


async def test_cancelling_put_submit_and_drain_leaves_the_pool_consistent(
    make: Any, gate: Any
) -> None:
    """Cancelled waiters leak no max_pending room and leave no future unresolved."""
    async with make(functools.partial(w.Fragile, gate), size=1, max_pending=1) as pool:
        pool.put_nowait("hold")
        blocked_put = asyncio.ensure_future(pool.put("never"))
        blocked_submit = asyncio.ensure_future(pool.submit("never either"))
        drain = asyncio.ensure_future(pool.drain())
        await asyncio.sleep(0)
        # Each waits in the pool (for room, or for the held message), so the
        # cancellations below reach waiters, not finished tasks.
        assert not any(t.done() for t in (blocked_put, blocked_submit, drain))
        assert pool.stats().pending == 1
        for task in (blocked_put, blocked_submit, drain):
            task.cancel()
        await asyncio.gather(blocked_put, blocked_submit, drain, return_exceptions=True)
        gate.open()
        await pool.drain()
        assert pool.stats().pending == 0
        pool.put_nowait("room is back")
        assert await pool.submit("works") == "works"
        assert pool.stats().put == 3


async def test_cancelled_submit_cancels_its_message_inside_the_worker(make: Any, gate: Any) -> None:
    """Cancelling the task awaiting submit() cancels the running message; drain() waits not."""
    async with make(functools.partial(w.Fragile, gate), size=1) as pool:
        results = pool.results()
        task = asyncio.ensure_future(pool.submit("hold"))
        await anext(results)  # it runs, held at the gate
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await pool.drain()  # the gate is still closed: the message was cancelled in the worker
        stats = pool.stats()
        assert (stats.cancelled, stats.processed, stats.pending) == (1, 0, 0)
        assert await pool.submit("after") == "after"  # the worker serves on


async def test_barrier_mode_death_restarts_the_generation_without_loss(
    make: Any, gate: Any
) -> None:
    """distribution='barrier': a death restarts every worker; no SafeWorker message is lost."""
    async with make(functools.partial(w.Fragile, gate), size=2, distribution="barrier") as pool:
        results = pool.results()
        await pool.put("hold")
        _, _, pid = await anext(results)
        for i in range(6):
            await pool.put(i)
        os.kill(pid, signal.SIGKILL)
        seen = []
        async for result in results:  # until the new generation holds "hold" again
            seen.append(result)
            if len(result) == 3 and result[2] != pid:
                break
        gate.open()
        await pool.drain()
        assert pool.stats().respawns == 2
    seen += [r async for r in results]
    done = [r[1] for r in seen if len(r) == 2]
    assert sorted(done, key=str) == [0, 1, 2, 3, 4, 5, "hold"]


PARENT_SCRIPT = """
import asyncio, os, signal, sys
sys.path.insert(0, {tests!r})
import looppool, pool_workers

async def main():
    pool = looppool.Pool(pool_workers.Echo, size=2, start_method={method!r})
{ending}

asyncio.run(main())
"""


START = "await pool.start()"
PIDS = "print(' '.join(str(p) for p in pool.pids), flush=True)"


def run_parent(method: str, *ending: str) -> tuple[subprocess.Popen[str], list[int]]:
    """Start a parent process with a pool; return it and its workers' pids."""
    body = "\n".join("    " + line for line in ending)
    proc = subprocess.Popen(
        [sys.executable, "-c", PARENT_SCRIPT.format(tests=str(TESTS), method=method, ending=body)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    return proc, [int(p) for p in line.split()]


def assert_gone(pids: list[int]) -> None:
    """Wait (with a deadline) for the given processes to end; kill and fail if they do not."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=5)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        p.kill()
    assert not alive, f"workers left running: {[p.pid for p in alive]}"


def test_workers_exit_when_the_parent_is_killed(start_method: str) -> None:
    """SIGKILL on the parent: every worker ends itself within about a second."""
    proc, pids = run_parent(start_method, START, PIDS, "os.kill(os.getpid(), signal.SIGKILL)")
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert len(pids) == 2
    assert_gone(pids)


def test_ctrl_c_in_the_parent_exits_cleanly(start_method: str) -> None:
    """SIGINT to a parent in asyncio.run with async with Pool: it exits, no worker left."""
    proc, pids = run_parent(
        start_method,
        "async with pool:",
        "    " + PIDS,
        "    print('ready', flush=True)",
        "    await asyncio.Event().wait()",
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in err
    assert_gone(pids)


def test_unstopped_pool_does_not_hang_interpreter_exit(start_method: str) -> None:
    """A parent that returns without stopping its pool still exits; its workers are killed."""
    proc, pids = run_parent(start_method, START, PIDS, "return")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "was not stopped" in err
    assert_gone(pids)
