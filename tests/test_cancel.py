"""Cancelling a submit, results back-pressure, and one exception object per failed future."""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import pytest

import limit_workers as lw
import looppool
import pool_workers as w


@pytest.fixture
async def gate() -> AsyncIterator[w.Gate]:
    """A crash-safe latch holding "hold" messages until the test opens it."""
    directory = tempfile.mkdtemp(prefix="lp-")
    latch = w.Gate(os.path.join(directory, "gate"))
    await latch.serve()
    yield latch
    await latch.close()
    shutil.rmtree(directory)


async def test_cancelled_submit_of_a_queued_message_is_withdrawn(make: Any, gate: w.Gate) -> None:
    """A message no worker has started is withdrawn when its submit is cancelled: it never runs."""
    async with make(functools.partial(w.Fragile, gate), size=1, concurrency=1) as pool:
        results = pool.results()
        holding = asyncio.ensure_future(pool.submit("hold"))
        assert (await anext(results))[1] == "holding"  # the one worker is busy
        queued = asyncio.ensure_future(pool.submit("never"))
        await asyncio.sleep(0)  # let it be accepted (and wait in the parent)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert pool.stats().cancelled == 1
        gate.open()
        assert await holding == "hold"
        await pool.drain()
        stats = pool.stats()
        assert (stats.processed, stats.cancelled, stats.pending) == (1, 1, 0)
    assert [r async for r in results] == [(0, "hold")]  # "never" did not run


async def test_stop_does_not_wait_for_a_cancelled_message(make: Any, gate: w.Gate) -> None:
    """A SafeWorker stop after a running submit was cancelled returns; it does not run again."""
    pool = make(functools.partial(w.Fragile, gate), size=1)
    async with asyncio.timeout(30):
        await pool.start()
        results = pool.results()
        task = asyncio.ensure_future(pool.submit("hold"))
        await anext(results)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pool.stop()  # the gate stays closed: it would wait for ever for that message
    assert pool.stats().cancelled == 1


async def test_each_failed_future_gets_its_own_exception(start_method: str, gate: w.Gate) -> None:
    """Three submits lost with one worker raise three WorkerLost objects, each its own traceback."""
    async with looppool.Pool(
        functools.partial(w.FragileWorker, gate), size=1, start_method=start_method
    ) as pool:
        results = pool.results()
        held = [asyncio.ensure_future(pool.submit("hold")) for _ in range(3)]
        for _ in range(3):
            _, _, pid = await anext(results)
        os.kill(pid, signal.SIGKILL)
        errors = await asyncio.gather(*held, return_exceptions=True)
        gate.open()
    assert all(isinstance(e, looppool.WorkerLost) for e in errors)
    assert len({id(e) for e in errors}) == 3
    assert len({id(e.__traceback__) for e in errors}) == 3
    assert all(e.exitcode == -signal.SIGKILL for e in errors)


async def test_a_slow_results_consumer_bounds_what_waits_in_the_parent(
    start_method: str, loop_kind: str
) -> None:
    """max_results: with a consumer slower than the workers, unread results stay bounded."""
    bound = 50
    count = 3000
    pool = looppool.Pool(
        lw.Slow,
        size=2,
        start_method=start_method,
        loop=loop_kind,
        max_results=bound,
        max_pending=100,
    )
    most = 0
    consumed = 0

    async def produce() -> None:
        nonlocal most
        for i in range(count):
            await pool.put(("echo", i))
            most = max(most, pool.stats().results - consumed)
        await pool.stop()

    async with asyncio.timeout(120):
        await pool.start()
        producer = asyncio.ensure_future(produce())
        seen = set()
        async for _, i, _ in pool.results():
            seen.add(i)
            consumed += 1
            most = max(most, pool.stats().results - consumed)
            for _ in range(20):  # a consumer much slower than the producer
                await asyncio.sleep(0)
        await producer
    assert seen == set(range(count))
    # What one read of a result pipe brings in comes on top of the bound.
    assert most <= bound + 2 * 200, f"{most} results waited unread"


async def test_a_consumer_that_drains_before_reading_does_not_deadlock(
    start_method: str, loop_kind: str
) -> None:
    """Results read only after drain() (or stop()) all arrive: back-pressure yields to them."""
    async with looppool.Pool(
        lw.Slow, size=2, start_method=start_method, loop=loop_kind, max_results=10
    ) as pool:
        results = pool.results()
        await pool.put(("echo", -1))
        assert (await anext(results))[1] == -1  # a consumer exists, then pauses
        for i in range(500):
            await pool.put(("echo", i))
        async with asyncio.timeout(60):
            await pool.drain()
            assert await pool.submit(("echo", "late")) == "late"
    assert len([r async for r in results]) == 501


async def test_put_result_wait_delivers_everything_to_a_slow_consumer(
    start_method: str, loop_kind: str
) -> None:
    """A handler putting many large results with put_result_wait: all arrive, in order."""
    count, size = 400, 64 << 10  # 25 MiB in all: more than the worker's outbox holds
    async with looppool.Pool(
        lw.Slow, size=1, start_method=start_method, loop=loop_kind, max_results=8
    ) as pool:
        reply = asyncio.ensure_future(pool.submit(("results", (count, size))))
        got = []
        async with asyncio.timeout(60):
            async for i, data in pool.results():
                got.append(i)
                assert len(data) == size
                if len(got) == count:
                    break
            assert await reply == count
    assert got == list(range(count))


async def test_a_consumer_that_puts_from_its_loop_does_not_deadlock(make: Any) -> None:
    """The crawler pattern: each result read puts new messages; max_results does not stall it."""
    total, per = 300, 5  # messages, and results each one puts
    pool = make(lw.Slow, max_results=10, max_pending=20)
    seen = 0
    stopping: asyncio.Future[None] | None = None
    async with asyncio.timeout(60):
        await pool.start()
        put = 0
        for _ in range(20):
            await pool.put(("results", (per, 10)))
            put += 1
        async for _ in pool.results():
            seen += 1
            if put < total:
                await pool.put(("results", (per, 10)))  # waits for room, in the reading task
                put += 1
            elif stopping is None:
                stopping = asyncio.ensure_future(pool.stop())
        assert stopping is not None
        await stopping
    assert seen == total * per


async def test_an_async_on_result_that_puts_does_not_deadlock(make: Any) -> None:
    """An async on_result that puts new messages (a crawler's) is not stalled by max_results."""
    total, per = 200, 5
    put = 0
    seen = 0
    done = asyncio.Event()

    async def on_result(_: Any) -> None:
        nonlocal put, seen
        seen += 1
        if put < total:
            await pool.put(("results", (per, 10)))  # waits for room, in the callback's task
            put += 1
        if seen == total * per:
            done.set()

    pool = make(lw.Slow, max_results=10, max_pending=20, on_result=on_result)
    async with asyncio.timeout(60):
        await pool.start()
        for _ in range(20):
            await pool.put(("results", (per, 10)))
            put += 1
        await done.wait()
        await pool.stop()
    assert seen == total * per
