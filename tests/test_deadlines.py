"""Faults where a worker lives but makes no progress: deadlines, hung workers, recycling.

Each through the public API, under fork and spawn (and InlinePool where it
means something), for both worker classes and both distributions. Deadlines
here are bounds on a hang, never a measure of speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import limit_workers as lw
import looppool

CLASSES = {"SafeWorker": lw.Slow, "Worker": lw.SlowWorker}


@pytest.fixture
def make_process(start_method: str, loop_kind: str) -> Any:
    """A process pool under this run's start method and loop."""

    def build(worker: Any, size: int = 2, **options: Any) -> looppool.Pool:
        options.setdefault("start_method", start_method)
        options.setdefault("loop", loop_kind)
        return looppool.Pool(worker, size=size, **options)

    return build


@pytest.fixture(params=["rounds", "barrier"])
def distribution(request: pytest.FixtureRequest) -> str:
    """Fair rounds, or the seed's shared queue and Barrier."""
    return str(request.param)


@pytest.fixture(params=list(CLASSES))
def worker_class(request: pytest.FixtureRequest) -> Any:
    """SafeWorker or plain Worker."""
    return CLASSES[request.param]


# -- message deadlines ------------------------------------------------------------


async def test_message_timeout_cancels_the_handler_and_fails_the_message(
    make: Any, worker_class: Any, distribution: str
) -> None:
    """Past message_timeout: the handler is cancelled (finally runs); submit: MessageTimeout."""
    async with make(worker_class, message_timeout=0.2, distribution=distribution) as pool:
        results = pool.results()
        late = asyncio.ensure_future(pool.submit(("sleep", 3600)))
        assert await pool.submit(("echo", 1)) == 1  # the worker serves others meanwhile
        with pytest.raises(looppool.MessageTimeout) as info:
            await late
        assert isinstance(info.value, TimeoutError)
        assert isinstance(info.value, looppool.LooppoolError)
        assert info.value.timeout == 0.2
        assert isinstance(info.value.__cause__, looppool.RemoteTraceback)
        assert await pool.submit(("echo", 2)) == 2
        stats = pool.stats()
        assert (stats.timed_out, stats.failed, stats.processed) == (1, 1, 2)
    seen = [r async for r in results]
    assert ("finally", 3600) in seen


async def test_each_message_times_out_at_its_own_deadline(make: Any) -> None:
    """On one worker: a short deadline is not held behind a long one; each expires on its own."""
    async with make(lw.Slow, size=1) as pool:
        loop = asyncio.get_running_loop()
        long = asyncio.ensure_future(pool.submit(("sleep", 3600), timeout=3600))
        with pytest.raises(looppool.MessageTimeout):
            async with asyncio.timeout(30):  # (a bound on a hang: it would wait behind long)
                await pool.submit(("sleep", 3600), timeout=0.2)
        assert not long.done()
        # Messages that end in time leave the deadlines of those after them alone.
        assert [await pool.submit(("echo", i), timeout=0.5) for i in range(3)] == [0, 1, 2]
        first = asyncio.ensure_future(pool.submit(("sleep", 3600), timeout=0.5))
        assert await pool.submit(("sleep", 0.3)) == "slept"  # the second starts later
        sent = loop.time()
        second = asyncio.ensure_future(pool.submit(("sleep", 3600), timeout=0.5))
        with pytest.raises(looppool.MessageTimeout):
            await first
        assert not second.done()  # its own deadline is later: it did not expire with first's
        with pytest.raises(looppool.MessageTimeout):
            await second
        assert loop.time() - sent >= 0.5 - 0.002  # not before its deadline (less a timer's slack)
        # Nothing runs with 0.5 s now: its group emptied and left. A message
        # given that timeout again makes a new group, with a timer of its own.
        with pytest.raises(looppool.MessageTimeout):
            async with asyncio.timeout(30):
                await pool.submit(("sleep", 3600), timeout=0.5)
        long.cancel()
        with pytest.raises(asyncio.CancelledError):
            await long
        assert pool.stats().timed_out == 4


async def test_a_handler_that_swallows_its_deadline_still_times_out(make: Any) -> None:
    """A handler that catches its deadline's CancelledError and returns: MessageTimeout still."""
    async with make(lw.Slow) as pool:
        with pytest.raises(looppool.MessageTimeout):
            await pool.submit(("stubborn", 3600), timeout=0.1)
        assert await pool.submit(("echo", 2)) == 2
        assert (pool.stats().timed_out, pool.stats().processed) == (1, 1)


async def test_timeout_per_call_overrides_the_pools(
    make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """submit(timeout=) and put(timeout=) set one message's deadline; others have none."""
    caplog.set_level(logging.WARNING)
    async with make(lw.Slow) as pool:
        with pytest.raises(looppool.MessageTimeout):
            await pool.submit(("sleep", 3600), timeout=0.1)
        assert await pool.submit(("sleep", 0.01), timeout=30) == "slept"
        await pool.put(("sleep", 3600), timeout=0.1)
        await pool.drain()
        assert pool.stats().timed_out == 2
    assert any("longer than its timeout of 0.1 s" in r.getMessage() for r in caplog.records)


async def test_bad_timeouts_are_refused_where_they_are_given(make: Any) -> None:
    """A timeout that is not a positive number raises ValueError at the call, nothing sent."""
    with pytest.raises(ValueError, match="message_timeout"):
        make(lw.Slow, message_timeout=0)
    async with make(lw.Slow) as pool:
        for bad in (0, -1, "1", True):
            with pytest.raises(ValueError, match="timeout"):
                await pool.submit(("echo", 1), timeout=bad)
        assert pool.stats().put == 0


# -- hung workers -------------------------------------------------------------------


async def test_a_blocked_loop_is_killed_and_replaced(
    make_process: Any, worker_class: Any, distribution: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler blocking its loop for ever: the worker is killed, its stack logged, replaced."""
    caplog.set_level(logging.ERROR)
    pool = make_process(worker_class, hang_timeout=0.5, distribution=distribution)
    async with pool, asyncio.timeout(60):
        pids = pool.pids
        blocked = asyncio.ensure_future(pool.submit(("block", 10**6)))
        neighbour = asyncio.ensure_future(pool.submit(("sleep", 0.3)))
        with pytest.raises(looppool.WorkerLost):
            await blocked
        assert await neighbour == "slept"  # (a SafeWorker's neighbour runs again if need be)
        assert await pool.submit(("echo", 3)) == 3
        stats = pool.stats()
        # A SafeWorker message that hangs is a poison message: alone in two hung workers.
        assert stats.hung == (2 if worker_class.safe else 1)
        assert pool.pids != pids
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "hang_timeout=0.5" in logged
    assert "time.sleep" in logged  # the stack it was stuck in


async def test_a_stopped_process_is_replaced_and_its_message_sent_again(
    make_process: Any, distribution: str, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGSTOP on a SafeWorker holding a message: replaced; the message runs elsewhere."""
    caplog.set_level(logging.ERROR)
    pool = make_process(lw.Slow, hang_timeout=0.5, distribution=distribution)
    async with pool, asyncio.timeout(60):
        pid = await pool.submit(("pid", None), worker=0)
        held = asyncio.ensure_future(pool.submit(("sleep", 2), worker=0))
        os.kill(pid, signal.SIGSTOP)
        assert await held == "slept"  # sent again to worker 0's replacement
        assert pool.pids[0] != pid
        assert pool.stats().hung == 1
    assert any("sent no stack" in r.getMessage() for r in caplog.records)


async def test_a_slow_finalise_is_not_a_hang(
    make_process: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A finalise() that awaits longer than hang_timeout runs to its end; nothing is killed."""
    caplog.set_level(logging.WARNING)
    async with make_process(lw.SlowFinalise, hang_timeout=0.5) as pool:
        assert await pool.submit(("echo", 1)) == 1
    assert pool.stats().hung == 0
    assert [r.getMessage() for r in caplog.records].count("[worker 0] finalised") == 1
    assert [r.getMessage() for r in caplog.records].count("[worker 1] finalised") == 1


async def test_stop_with_a_timeout_ends_a_stopped_worker(make_process: Any) -> None:
    """stop(timeout=1) returns within a bound although a worker is SIGSTOPped; no process left."""
    pool = make_process(lw.Slow)
    await pool.start()
    pid = await pool.submit(("pid", None), worker=0)
    os.kill(pid, signal.SIGSTOP)
    await pool.put(("sleep", 3600), worker=1)
    async with asyncio.timeout(3):
        await pool.stop(timeout=1)
    assert pool.pids == (None, None)


# -- workers stuck in initialise(): start_timeout -------------------------------------

# Well above a worker's normal start (spawn's imports included) on a busy
# machine: every start in these tests runs under it, not only the stuck ones.
START_TIMEOUT = 2.0


class LogSeen(logging.Handler):
    """Sets ``seen`` (an asyncio.Event) when a log record containing ``text`` is emitted."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():  # the pool logs on its loop's thread
            self.seen.set()


@contextlib.contextmanager
def log_seen(text: str) -> Iterator[asyncio.Event]:
    """An event set once ``text`` is logged: by the pool, or by a worker (forwarded)."""
    handler = LogSeen(text)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler.seen
    finally:
        root.removeHandler(handler)


async def test_a_worker_stuck_in_initialise_fails_start(make: Any, tmp_path: Path) -> None:
    """start(): an initialise() still awaiting at start_timeout is killed; WorkerStartError."""
    base = str(tmp_path / "hang")
    lw.hang_starts(base, 1)
    pool = make(functools.partial(lw.SlowStart, base), start_timeout=START_TIMEOUT)
    with pytest.raises(looppool.WorkerStartError) as info:
        async with asyncio.timeout(60):  # (a bound on a hang)
            await pool.start()
    assert "did not finish within start_timeout=2 s" in str(info.value)
    assert info.value.number in (0, 1)
    with pytest.raises(looppool.PoolClosed):
        await pool.put(("echo", 1))


async def test_an_initialise_that_blocks_its_loop_fails_start(
    make_process: Any, tmp_path: Path
) -> None:
    """start(): an initialise() blocking its loop past start_timeout: killed; WorkerStartError."""
    base = str(tmp_path / "hang")
    lw.hang_starts(base, 1)
    pool = make_process(functools.partial(lw.SlowStart, base, "block"), start_timeout=2.0)
    with pytest.raises(looppool.WorkerStartError, match="start_timeout=2 s") as info:
        async with asyncio.timeout(60):
            await pool.start()
    assert info.value.exitcode == -signal.SIGKILL


@pytest.mark.parametrize("starting", [lw.SlowStart, lw.SlowStartWorker])
async def test_a_replacement_stuck_in_initialise_is_killed_and_replaced(
    make_process: Any, distribution: str, starting: Any, tmp_path: Path
) -> None:
    """A replacement hanging in initialise() is killed at start_timeout; the next one serves."""
    base = str(tmp_path / "hang")
    pool = make_process(
        functools.partial(starting, base),
        start_timeout=START_TIMEOUT,
        distribution=distribution,
    )
    overdue_text = "did not finish initialise() within start_timeout=2 s"
    with log_seen("died") as died, log_seen(overdue_text) as overdue:
        async with pool, asyncio.timeout(60):
            old = await pool.submit(("pid", None), worker=0)
            lw.hang_starts(base, 1)  # the next start hangs (barrier mode: any of them)
            os.kill(old, signal.SIGKILL)
            # Once the death is known, messages wait for the stuck replacement
            # or go to the other worker. (Put before, they could be sent to the
            # dead process: a Worker pool loses those, as after any death.)
            await died.wait()
            for i in range(20):
                await pool.put(("echo", i))
            await overdue.wait()
            # Every worker serves again, a fresh process each.
            pids = [await pool.submit(("pid", None), worker=k) for k in range(2)]
            assert old not in pids
            await pool.drain()  # (a Worker pool's stop would drop what is queued)
            assert (pool.stats().failed, pool.stats().lost) == (0, 0)
    echoed = sorted(r[1] for r in [r async for r in pool.results()] if r[0] == "echo")
    assert echoed == list(range(20))  # nothing lost: a starting worker holds nothing


async def test_stop_ends_a_replacement_stuck_in_initialise_at_start_timeout(
    make_process: Any, tmp_path: Path
) -> None:
    """stop() waits for a starting worker; one stuck in initialise() is killed at start_timeout."""
    base = str(tmp_path / "hang")
    pool = make_process(functools.partial(lw.SlowStart, base), start_timeout=START_TIMEOUT)
    with log_seen("initialise() held") as held:
        async with pool, asyncio.timeout(60):
            old = await pool.submit(("pid", None), worker=0)
            lw.hang_starts(base, 1)
            os.kill(old, signal.SIGKILL)
            await held.wait()  # the replacement is stuck in initialise()
            await pool.stop()  # returns: the stuck replacement is killed, not waited for
    assert all(pid is None for pid in pool.pids)


async def test_replacements_that_never_start_break_the_pool(
    make_process: Any, distribution: str, tmp_path: Path
) -> None:
    """Replacements that keep hanging in initialise(): three in a row break the pool."""
    base = str(tmp_path / "hang")
    pool = make_process(
        functools.partial(lw.SlowStart, base),
        size=1,
        start_timeout=START_TIMEOUT,
        distribution=distribution,
    )
    async with pool, asyncio.timeout(60):
        pid = await pool.submit(("pid", None))
        lw.hang_starts(base, 3)
        os.kill(pid, signal.SIGKILL)
        broken = r"failed to start 3 times.*start_timeout=2 s"
        with pytest.raises(looppool.PoolBroken, match=broken):
            await pool.submit(("echo", 1))  # waits for a worker that never comes
        with pytest.raises(looppool.PoolBroken):
            await pool.put(("echo", 2))
    assert all(pid is None for pid in pool.pids)


async def test_a_ready_read_after_its_deadline_fired_is_ignored(
    make_process: Any, tmp_path: Path
) -> None:
    """White-box: start_timeout fires while the ready is unread; start() fails, never half."""
    base = str(tmp_path / "slow")
    lw.hang_starts(base, 1)
    pool = make_process(functools.partial(lw.SlowStart, base, 2.2), size=1, start_timeout=2.0)
    loop = asyncio.get_running_loop()
    launched = pool._launched

    def busy_across_the_deadline(slot: Any) -> None:
        # No public call orders a timer before a frame that has arrived: keep
        # the parent's loop busy across the deadline until the worker's ready
        # (at ~2.2 s) is in the pipe, then let the timer run first (asyncio).
        launched(slot)
        when = slot.start_timer.when()
        loop.call_at(when - 1.0, time.sleep, 1.05)
        loop.call_at(when - 0.001, time.sleep, 0.5)
        loop.call_at(when + 0.001, time.sleep, 0.2)

    pool._launched = busy_across_the_deadline
    starting = asyncio.ensure_future(pool.start())
    async with asyncio.timeout(60):
        await asyncio.wait([starting])
    if starting.exception() is not None:
        with pytest.raises(looppool.WorkerStartError, match=r"start_timeout=2 s"):
            starting.result()
        assert pool.pids == (None,)
        return
    try:  # the loop read the ready first: then the worker must serve
        async with asyncio.timeout(10):
            assert await pool.submit(("echo", 1)) == 1
    finally:
        await pool.stop(timeout=5)


async def test_a_worker_told_to_stop_while_initialising_is_not_hung(
    make_process: Any, distribution: str, tmp_path: Path
) -> None:
    """hang_timeout leaves alone a replacement still in initialise() when stop() reaches it."""
    base = str(tmp_path / "slow")
    pool = make_process(
        functools.partial(lw.SlowStart, base, 1.5), hang_timeout=0.4, distribution=distribution
    )
    with log_seen("initialise() held") as held:
        async with pool, asyncio.timeout(60):
            old = await pool.submit(("pid", None), worker=0)
            lw.hang_starts(base, 1)  # the next start takes 1.5 s: slow, not hung
            os.kill(old, signal.SIGKILL)
            await held.wait()
            await pool.stop()  # reaches the replacement in initialise()
    assert pool.stats().hung == 0


async def test_recycling_waits_while_a_replacement_is_starting(
    make_process: Any, tmp_path: Path
) -> None:
    """One recycling at a time: none while a retired worker's replacement is still starting."""
    base = str(tmp_path / "hang")
    pool = make_process(
        functools.partial(lw.SlowStart, base),
        max_messages_per_worker=5,
        start_timeout=START_TIMEOUT,
    )
    with log_seen("did not finish initialise()") as overdue, log_seen("held") as held:
        async with pool, asyncio.timeout(60):
            second = await pool.submit(("pid", None), worker=1)
            lw.hang_starts(base, 1)  # worker 0's replacement will be stuck
            for i in range(5):
                await pool.put(("echo", i), worker=0)  # worker 0 retires after these
            await held.wait()  # its replacement is stuck in initialise()
            for i in range(10):
                await pool.put(("echo", i), worker=1)  # past the limit, while 0's is stuck
            await pool.drain()
            assert not overdue.is_set()  # (the replacement is still stuck)
            # Not retired meanwhile (one at a time): a message to worker 1 finds
            # the same process, not a retiring one's replacement.
            assert await pool.submit(("pid", None), worker=1) == second
            await overdue.wait()
            assert await pool.submit(("echo", "after"), worker=0) == "after"
    assert pool.stats().recycled >= 1


async def test_bad_start_timeout_is_refused(make: Any) -> None:
    """start_timeout must be None or a positive number of seconds: ValueError at construction."""
    for bad in (0, -1, "2", True):
        with pytest.raises(ValueError, match="start_timeout must be None or a positive number"):
            make(lw.Slow, start_timeout=bad)


# -- recycling ----------------------------------------------------------------------


async def test_recycling_after_n_messages_loses_nothing(
    make: Any, worker_class: Any, distribution: str
) -> None:
    """max_messages_per_worker: workers are replaced; 10,000 messages, each run exactly once."""
    count = 10_000
    async with make(worker_class, max_messages_per_worker=1000, distribution=distribution) as pool:
        for i in range(count):
            await pool.put(("echo", i))
        await pool.drain()
        stats = pool.stats()
        assert (stats.processed, stats.lost, stats.failed) == (count, 0, 0)
        assert stats.recycled >= 1  # one at a time: how many depends on how fast workers start
        assert stats.respawns == 0  # recycling is not a death
    runs = Counter()
    pids = set()
    async for _, i, pid in pool.results():
        runs[i] += 1
        pids.add(pid)
    assert runs == Counter(range(count))  # every message once, none twice
    if pool.pids != (None, None):  # a process pool: new processes took over
        assert len(pids) > 2


async def test_recycling_below_a_batch_of_slow_messages_makes_progress(
    make_process: Any, worker_class: Any, distribution: str
) -> None:
    """A limit smaller than what a worker holds: each message still runs once (no restart loop)."""
    count = 20
    pool = make_process(worker_class, max_messages_per_worker=5, distribution=distribution)
    async with pool, asyncio.timeout(60):
        replies = await asyncio.gather(*(pool.submit(("sleep", 0.3)) for _ in range(count)))
    stats = pool.stats()  # (a retirement is counted once its worker has left)
    assert replies == ["slept"] * count
    assert (stats.processed, stats.lost, stats.failed) == (count, 0, 0)
    assert stats.recycled >= 1


async def test_recycling_after_rss_limit(make_process: Any, distribution: str) -> None:
    """max_memory_per_worker: a worker whose RSS passes the limit is replaced by a fresh one."""
    async with make_process(lw.Slow, size=1, distribution=distribution) as pool:
        baseline = psutil.Process(await pool.submit(("pid", None))).memory_info().rss
    limit = baseline + (64 << 20)
    async with make_process(
        lw.Slow, size=1, distribution=distribution, max_memory_per_worker=limit
    ) as pool:
        first = await pool.submit(("pid", None))
        most = 0
        for _ in range(60):  # 8 MiB each: well past the limit if nothing recycles the worker
            most = max(most, await pool.submit(("grow", 8 << 20)))
            if pool.stats().recycled:
                break
        assert pool.stats().recycled == 1
        assert most > 8  # it was recycled once past the limit (64 MiB more), not before
        assert await pool.submit(("pid", None)) != first
        assert await pool.submit(("grow", 0)) < most  # a fresh worker: what it kept is gone
