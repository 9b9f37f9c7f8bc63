"""Property-based tests: random put / submit / broadcast / drain / SIGKILL / stop sequences.

hypothesis's stateful testing is synchronous, so each example owns an
``asyncio.Runner`` and every rule runs one coroutine on it, under a deadline:
a hang shows as a failure naming the step, never as a stuck test run. Between
rules the parent's loop is paused while the workers keep running, so kills
land while workers hold messages, mid-batch, and mid-restart.

The model tracks every accepted *copy* (a broadcast is one copy per worker)
and the number of kills the pool had noticed when it was accepted. With
``SafeWorker`` a copy is delivered again after its worker dies, and it is
failed only once it was the only message of two workers that died, so it
may be lost only if at least two kills happened that the pool had not
noticed when it was accepted. A *poison* message (``"die"``) ends every
worker it runs in: it alone must be lost, whatever shared its workers.
Everything else must produce its result, at least once, and again only
after a death; ``stats()`` must add up after every step; ``drain()`` and
``stop()`` must return, with every result in; and no process may outlive
its pool.

The default test run hunts briefly (8 forked and 2 spawned examples per
distribution); ``nox -s properties`` hunts for longer, and a much longer hunt
is ``LOOPPOOL_PROPERTIES=1 LOOPPOOL_PROPERTY_SCALE=20 pytest tests/test_properties.py``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import gc
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psutil
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

import looppool
from pool_workers import Fragile, Gate
from processes import LOOP_KIND, descendants, loop_factory
from property_workers import Holder, Recorder

T = TypeVar("T")

SIZE = 2
STEP_DEADLINE = 30.0  # seconds; generous, as the machine is shared: a hang, not noise
MAX_STRIKES = 2  # a SafeWorker copy is failed once it was alone in this many dying workers
LATE, DEADLINE = 3600.0, 0.02  # a "late" message's delay, and the timeout it is sent with

kinds = st.sampled_from(["ok", "ok", "ok", "fail"])
delays = st.sampled_from([0.0, 0.0, 0.001, 0.005, 0.02])
items = st.lists(st.tuples(kinds, delays), min_size=1, max_size=12)
workers = st.none() | st.integers(0, SIZE - 1)


@dataclass
class Copy:
    """What the model knows of one accepted copy of a message."""

    kind: str  # "ok", "fail" or "die" (poison)
    target: int | None  # worker=k, or None for a shared message
    kills_at: int  # kills the pool had noticed when it was accepted
    respawns_at: int  # stats().respawns when it was accepted: each death adds one or more


class PoolMachine(RuleBasedStateMachine):
    """Drives one SafeWorker pool through random operations and checks what comes back."""

    def __init__(self, start_method: str, distribution: str) -> None:
        super().__init__()
        self.start_method = start_method
        self.distribution = distribution
        self.runner = asyncio.Runner(loop_factory=loop_factory())
        self.children_before = set(descendants())
        self.pool: looppool.Pool | None = None
        self.results: Any = None
        self.max_pending = 0
        self.ids = 0
        self.accepted: dict[tuple[int, int | None], Copy] = {}
        self.broadcasts: set[int] = set()
        self.seen: collections.Counter[tuple[int, int | None]] = collections.Counter()
        self.shared_per_worker = [0] * SIZE
        self.background: dict[int, asyncio.Task[Any]] = {}
        self.lost_by_submit: set[int] = set()
        self.cancelled: set[int] = set()
        self.ready_pids: set[int] = set()
        self.killed_pids: set[int] = set()
        self.kills = 0
        self.kill_during_stop = False
        self.stopped = False

    # -- plumbing ------------------------------------------------------------

    def run(self, awaitable: Awaitable[T], what: str) -> T:
        """Run one step on this example's loop; fail clearly if it does not finish in time."""

        async def guarded() -> T:
            task = asyncio.ensure_future(awaitable)
            done, _ = await asyncio.wait({task}, timeout=STEP_DEADLINE)
            if done:
                return task.result()
            # The pool's state as the step hangs (cancelling the step changes it).
            pool = self.pool
            state = f"{pool!r}, {pool.stats()}" if pool is not None else "no pool"
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise AssertionError(
                f"{what} did not finish within {STEP_DEADLINE}s "
                f"({self.kills} kills so far): {state}"
            )

        return self.runner.run(guarded())

    @property
    def live_pool(self) -> looppool.Pool:
        assert self.pool is not None
        return self.pool

    def message(self, kind: str, delay: float, target: int | None) -> Any:
        """A new message, recorded as accepted (call it just before accepting it)."""
        mid = self.ids
        self.ids += 1
        self.accepted[(mid, None)] = self.new_copy(kind, target)
        return (mid, kind, delay)

    def new_copy(self, kind: str, target: int | None) -> Copy:
        """The model's record of a copy accepted now."""
        return Copy(kind, target, self.noticed_kills(), self.live_pool.stats().respawns)

    def forget(self, message: Any) -> None:
        """Undo ``message()`` for a message the pool refused."""
        del self.accepted[(message[0], None)]

    def record(self, result: Any) -> None:
        """Account for one result from ``results()``."""
        mid, number, pid = result
        copy_id = (mid, number) if mid in self.broadcasts else (mid, None)
        copy = self.accepted.get(copy_id)
        assert copy is not None, f"a result for a message never accepted: {result!r}"
        if copy.target is not None:
            assert number == copy.target, f"{result!r} ran on the wrong worker"
        else:
            if not self.seen[copy_id]:
                self.shared_per_worker[number] += 1
        self.seen[copy_id] += 1
        self.ready_pids.add(pid)

    def check_reply(self, mid: int, outcome: Any) -> None:
        """Check what ``submit()`` returned or raised for message ``mid``."""
        copy = self.accepted[(mid, None)]
        if isinstance(outcome, asyncio.CancelledError):
            assert mid in self.cancelled, f"submit of message {mid} was cancelled"
        elif isinstance(outcome, looppool.WorkerLost):
            assert copy.kind == "die" or self.kills - copy.kills_at >= MAX_STRIKES, (
                f"submit of message {mid} raised {outcome!r} although only "
                f"{self.kills - copy.kills_at} kills happened since it was accepted"
            )
            self.lost_by_submit.add(mid)
        elif copy.kind == "fail":
            assert isinstance(outcome, ValueError), f"message {mid}: {outcome!r}"
            assert isinstance(outcome.__cause__, looppool.RemoteTraceback)
        elif copy.kind == "late":
            assert isinstance(outcome, looppool.MessageTimeout), f"message {mid}: {outcome!r}"
        else:
            assert not isinstance(outcome, BaseException), f"message {mid}: {outcome!r}"
            done, key, number, pid = outcome
            assert (done, key) == ("done", mid)
            if copy.target is not None:
                assert number == copy.target
            self.ready_pids.add(pid)

    async def pull_until_seen(self, wanted: set[tuple[int, int | None]]) -> None:
        """Read ``results()`` until every wanted copy was seen (it is in the parent already)."""
        while not all(self.seen[c] for c in wanted):
            try:
                result = await anext(self.results)
            except StopAsyncIteration:
                missing = sorted(c for c in wanted if not self.seen[c])
                raise AssertionError(f"results() ended without {missing}") from None
            self.record(result)

    async def settle_background(self) -> None:
        """Await every background submit (each must be resolved by now) and check it."""
        tasks = self.background
        self.background = {}
        outcomes = await asyncio.gather(*tasks.values(), return_exceptions=True)
        for mid, outcome in zip(tasks, outcomes, strict=True):
            self.check_reply(mid, outcome)

    def may_not_be_lost(self, copy_id: tuple[int, int | None]) -> bool:
        """Whether a copy must produce its result: not poison, not cancelled, < two kills since."""
        copy = self.accepted[copy_id]
        if copy.kind in ("die", "late") or copy_id[0] in self.cancelled:
            return False
        return self.kills - copy.kills_at < MAX_STRIKES

    def killable(self) -> list[int]:
        """Pids of current workers seen working (so ready, not starting) and not yet killed."""
        pids = self.live_pool.pids
        return [p for p in pids if p in self.ready_pids and p not in self.killed_pids]

    def noticed_kills(self) -> int:
        """Kills the pool has noticed: the killed process is no longer a worker.

        A message put right after a kill may be written to the dead worker's
        pipe before the pool learns of the death; the pool counts that as its
        first delivery: it cannot tell such a write from one the worker read.
        So a copy's kills start at those noticed when it was accepted, not at
        all those done.
        """
        pids = self.live_pool.pids
        return sum(pid not in pids for pid in self.killed_pids)

    def kill(self, pid: int) -> None:
        """SIGKILL ``pid`` if it is still our (unreaped) child, so not a recycled pid."""
        try:
            ours = psutil.Process(pid).ppid() == os.getpid()
        except psutil.NoSuchProcess:
            ours = False
        if not ours:
            # A worker that answered and then exited by itself (a barrier-mode
            # generation restart stops the survivors); the pool reaped it.
            return
        # The pool reaps its workers only on its loop, which is paused now:
        # the pid cannot be recycled before this kill.
        os.kill(pid, signal.SIGKILL)
        self.killed_pids.add(pid)
        self.kills += 1

    # -- rules -----------------------------------------------------------------

    @initialize(
        max_pending=st.sampled_from([3, 10_000]),
        concurrency=st.sampled_from([2, 1000]),
        kill_during_stop=st.booleans(),
    )
    def start(self, max_pending: int, concurrency: int, kill_during_stop: bool) -> None:
        """Start a pool of SafeWorkers (the example ends with stop(), in teardown)."""
        self.max_pending = max_pending
        self.kill_during_stop = kill_during_stop
        pool = looppool.Pool(
            Recorder,
            size=SIZE,
            start_method=self.start_method,  # type: ignore[arg-type]
            loop=LOOP_KIND,  # type: ignore[arg-type]
            distribution=self.distribution,  # type: ignore[arg-type]
            max_pending=max_pending,
            concurrency=concurrency,
        )
        self.run(pool.start(), "start()")  # leaves no process behind if it fails
        self.pool = pool
        self.results = pool.results()

    @rule(batch=items, worker=workers)
    def put(self, batch: list[tuple[str, float]], worker: int | None) -> None:
        """put() a batch of messages, shared or to one worker."""
        pool = self.live_pool

        async def put_all() -> None:
            for kind, delay in batch:
                await pool.put(self.message(kind, delay, worker), worker=worker)

        self.run(put_all(), "put()")

    @rule(kind=kinds, worker=workers)
    def put_nowait(self, kind: str, worker: int | None) -> None:
        """put_nowait() raises QueueFull exactly when max_pending messages are pending."""
        pool = self.live_pool
        full = pool.stats().pending >= self.max_pending
        message = self.message(kind, 0.0, worker)
        try:
            pool.put_nowait(message, worker=worker)
        except looppool.QueueFull:
            self.forget(message)
            assert full, f"QueueFull with {pool.stats()}"
        else:
            assert not full, f"put_nowait accepted above max_pending: {pool.stats()}"

    @rule(kind=kinds, delay=delays)
    def broadcast(self, kind: str, delay: float) -> None:
        """broadcast() a message: one copy per worker."""
        mid = self.ids
        self.ids += 1
        self.broadcasts.add(mid)
        for number in range(SIZE):
            self.accepted[(mid, number)] = self.new_copy(kind, number)
        self.run(self.live_pool.broadcast((mid, kind, delay)), "broadcast()")

    @rule(kind=kinds, delay=delays, worker=workers)
    def submit(self, kind: str, delay: float, worker: int | None) -> None:
        """submit() returns the reply (or re-raises the handler's exception)."""
        message = self.message(kind, delay, worker)

        async def outcome() -> Any:
            try:
                return await self.live_pool.submit(message, worker=worker)
            except Exception as exc:
                return exc

        self.check_reply(message[0], self.run(outcome(), "submit()"))

    @rule(worker=workers)
    def submit_past_its_deadline(self, worker: int | None) -> None:
        """A message slower than its timeout= fails with MessageTimeout; the worker serves on."""
        pool = self.live_pool
        message = self.message("late", LATE, worker)

        async def outcome() -> Any:
            try:
                return await pool.submit(message, worker=worker, timeout=DEADLINE)
            except Exception as exc:
                return exc

        self.check_reply(message[0], self.run(outcome(), "submit(timeout=...)"))

    @rule(batch=items, worker=workers)
    def submit_in_background(self, batch: list[tuple[str, float]], worker: int | None) -> None:
        """Start submits that later rules (kills included) overlap; checked at drain or stop."""
        pool = self.live_pool
        put_before = pool.stats().put
        room = self.max_pending - pool.stats().pending
        batch = batch[: max(room, 0)]  # above max_pending a submit would still be waiting

        async def start_all() -> None:
            for kind, delay in batch:
                message = self.message(kind, delay, worker)
                task = asyncio.ensure_future(pool.submit(message, worker=worker))
                self.background[message[0]] = task
            await asyncio.sleep(0)  # let each task run its first step: accepting its message

        self.run(start_all(), "starting background submits")
        assert pool.stats().put == put_before + len(batch), "a background submit was not accepted"

    @rule(kill_during=st.booleans())
    def drain(self, kill_during: bool) -> None:
        """After drain() (with a kill while it waits, or not), all accepted before it is done."""
        pool = self.live_pool
        before = dict(self.accepted)

        async def drain() -> None:
            draining = asyncio.ensure_future(pool.drain())
            await asyncio.sleep(0)  # let drain() begin before the kill (an interleaving choice)
            candidates = self.killable()
            if kill_during and candidates:
                self.kill(candidates[-1])
            await draining

        self.run(drain(), "drain()")
        assert pool.stats().pending == 0, f"drain() returned with {pool.stats()}"
        self.run(self.settle_background(), "background submits after drain()")
        wanted = {c for c in before if self.may_not_be_lost(c)}
        self.run(self.pull_until_seen(wanted), "reading the results drain() waited for")

    @rule(which=st.integers(0, 100))
    def cancel_a_submit(self, which: int) -> None:
        """Cancel a background submit: its message is withdrawn, or cancelled in its worker.

        (Or it had finished already: then its result is there.) Either way
        neither drain() nor stop() waits for it.
        """
        pending = [mid for mid, task in self.background.items() if not task.done()]
        if pending:
            mid = pending[which % len(pending)]
            self.background[mid].cancel()
            self.cancelled.add(mid)

    @rule(delay=delays, worker=workers, background=st.booleans())
    def poison(self, delay: float, worker: int | None, background: bool) -> None:
        """A message that ends every worker it runs in: it alone is failed with WorkerLost."""
        pool = self.live_pool
        if pool.stats().pending >= self.max_pending:
            return  # a put would wait for room that only a later rule can make
        message = self.message("die", delay, worker)
        if not background:
            self.run(pool.put(message, worker=worker), "put() of a poison message")
            return

        async def start() -> None:
            task = asyncio.ensure_future(pool.submit(message, worker=worker))
            self.background[message[0]] = task
            await asyncio.sleep(0)  # let the task run its first step: accepting its message

        self.run(start(), "starting a poison submit")

    @rule(number=st.integers(0, SIZE - 1), confirm=st.booleans())
    def kill_worker(self, number: int, confirm: bool) -> None:
        """SIGKILL a worker that is working (not one still starting)."""
        pool = self.live_pool
        pid = pool.pids[number]
        if confirm or pid not in self.killable():
            # Ask the worker itself: its reply proves it is up and running.
            message = self.message("ok", 0.0, number)
            reply = self.run(pool.submit(message, worker=number), "submit(worker=k) before a kill")
            self.check_reply(message[0], reply)
            pid = reply[3]
        assert pid is not None
        self.kill(pid)

    # -- invariants and the final reckoning --------------------------------------

    @invariant()
    def stats_add_up(self) -> None:
        """Every accepted copy is processed, failed, lost or pending; counts match the model."""
        if self.pool is None:
            return
        s = self.pool.stats()
        assert s.put == s.processed + s.failed + s.lost + s.cancelled + s.pending, s
        assert s.cancelled <= len(self.cancelled), s
        assert s.pending >= 0, s
        assert s.put == len(self.accepted), f"{s} but {len(self.accepted)} copies accepted"
        if self.kills < MAX_STRIKES:
            poison = sum(copy.kind == "die" for copy in self.accepted.values())
            assert s.lost <= poison, s

    def stop(self) -> None:
        """stop() returns, with or without a kill while it drains; then check everything."""
        pool = self.live_pool
        self.stopped = True

        async def stop() -> None:
            stopping = asyncio.ensure_future(pool.stop())
            await asyncio.sleep(0)  # let stop() begin before the kill (an interleaving choice)
            candidates = self.killable()
            if self.kill_during_stop and candidates:
                self.kill(candidates[0])
            await stopping

        self.run(stop(), "stop()")
        self.final_check()
        self.closed_pool_refuses()

    def closed_pool_refuses(self) -> None:
        """After stop(), put, put_nowait, submit and broadcast raise PoolClosed."""
        pool = self.live_pool
        with pytest.raises(looppool.PoolClosed):
            pool.put_nowait("late")
        with pytest.raises(looppool.PoolClosed):
            self.run(pool.put("late", worker=0), "put() after stop()")
        with pytest.raises(looppool.PoolClosed):
            self.run(pool.submit("late"), "submit() after stop()")
        with pytest.raises(looppool.PoolClosed):
            self.run(pool.broadcast("late"), "broadcast() after stop()")
        self.run(pool.drain(), "drain() after stop()")

    def final_check(self) -> None:
        """After stop(): every copy produced its result, or was lost for a reason."""
        pool = self.live_pool
        self.run(self.settle_background(), "background submits after stop()")

        async def read_all() -> None:
            async for result in self.results:
                self.record(result)

        self.run(read_all(), "reading results() after stop()")
        s = pool.stats()
        assert s.pending == 0, s
        assert all(n == 0 for n in s.in_flight), s
        missing = {c for c in self.accepted if not self.seen[c]}
        for copy_id in missing:
            since = self.kills - self.accepted[copy_id].kills_at
            assert not self.may_not_be_lost(copy_id), (
                f"message {copy_id} never ran, with {since} kills after it was accepted; {s}"
            )
        # A cancelled copy may have run all the same (it had finished, or, in
        # barrier mode, a worker took it from the shared queue as it was
        # withdrawn): it then counts as cancelled, or as what it did.
        cancelled = {c for c in self.accepted if c[0] in self.cancelled}
        ran_cancelled = len(cancelled & set(self.seen))
        ended = s.lost + s.timed_out  # copies that end without a result, if not cancelled
        assert len(missing - cancelled) <= ended, f"{len(missing)} without a result, {s}"
        assert len(missing) <= ended + s.cancelled <= len(missing) + ran_cancelled, s
        assert self.lost_by_submit <= {mid for mid, _ in missing}
        for copy_id, count in self.seen.items():
            # A copy runs again only after a worker that held it died, and
            # every death starts at least one replacement.
            deaths = s.respawns - self.accepted[copy_id].respawns_at
            assert count <= 1 + deaths, f"{copy_id} ran {count} times, {deaths} deaths; {s}"
        ran = {c: self.accepted[c].kind for c in self.seen}
        late = sum(copy.kind == "late" for copy in self.accepted.values())
        assert s.timed_out <= late, s
        for kind, count in (("ok", s.processed), ("fail", s.failed - s.timed_out)):
            sure = sum(k == kind for c, k in ran.items() if c not in cancelled)
            assert sure <= count <= sum(k == kind for k in ran.values()), s
        poisoned = any(copy.kind == "die" for copy in self.accepted.values())
        if self.kills == 0 and not poisoned:
            assert s.respawns == 0, s
            assert s.redelivered == 0, s
        if self.kills == 0 and not poisoned and not late and not self.cancelled:
            # (Copies that end without a result would hide whom they were dealt to.)
            assert max(self.shared_per_worker) - min(self.shared_per_worker) <= 1, (
                f"unfair dealing: {self.shared_per_worker}"
            )
        # A kill the pool notices only once stopping needs no replacement.
        assert len(self.ready_pids) <= SIZE + s.respawns, s
        if poisoned:
            pass  # a poison message kills workers too, as often as isolating it takes
        elif self.distribution == "rounds":
            assert s.respawns <= self.kills, s
        else:
            # A death restarts the whole generation.
            assert s.respawns % SIZE == 0, s
            assert s.respawns <= SIZE * self.kills, s
        if self.distribution == "barrier":
            assert s.respawns % SIZE == 0, s
        assert pool.pids == (None,) * SIZE
        left = set(descendants()) - self.children_before
        assert not left, f"stop() returned with child processes alive: {left}"

    def teardown(self) -> None:
        try:
            if self.pool is not None and not self.stopped:
                self.stop()
        finally:
            if self.pool is not None:
                # A failed example must not leave workers behind for the next one.
                self.runner.run(self.pool.stop(timeout=1.0))
            self.runner.close()


#: Every run hunts a little; `nox -s properties` (LOOPPOOL_PROPERTIES=1) hunts for longer.
FULL = bool(os.environ.get("LOOPPOOL_PROPERTIES"))
#: Multiplies the number of examples, for a longer hunt: LOOPPOOL_PROPERTY_SCALE=20 pytest ...
SCALE = int(os.environ.get("LOOPPOOL_PROPERTY_SCALE", "1"))

FORK = settings(
    max_examples=(45 if FULL else 8) * SCALE,
    stateful_step_count=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SPAWN = settings(FORK, max_examples=(6 if FULL else 2) * SCALE, stateful_step_count=15)


@pytest.mark.parametrize("distribution", ["rounds", "barrier"])
def test_random_operations_and_kills_under_fork(distribution: str) -> None:
    """Random put/submit/broadcast/drain/SIGKILL/stop on a forked pool keep every invariant."""
    # hypothesis takes any factory here; its annotation says a class.
    factory = functools.partial(PoolMachine, "fork", distribution)
    run_state_machine_as_test(factory, settings=FORK)  # type: ignore[arg-type]


@pytest.mark.parametrize("distribution", ["rounds", "barrier"])
def test_random_operations_and_kills_under_spawn(distribution: str) -> None:
    """The same machine, fewer and shorter examples, with spawned workers."""
    factory = functools.partial(PoolMachine, "spawn", distribution)
    run_state_machine_as_test(factory, settings=SPAWN)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def _served_gate() -> AsyncIterator[Gate]:
    """A Gate (a Unix-socket latch) served for the block, then closed and removed."""
    directory = tempfile.mkdtemp(prefix="lp-")  # short: a socket path has a length limit
    gate = Gate(os.path.join(directory, "gate"))
    await gate.serve()
    try:
        yield gate
    finally:
        await gate.close()
        shutil.rmtree(directory)


def _barrier_pool(gate: Gate, start_method: str, loop_kind: str, **options: Any) -> looppool.Pool:
    """A 2-worker barrier-mode pool of Holders waiting at ``gate``."""
    return looppool.Pool(
        functools.partial(Holder, gate),
        size=2,
        start_method=start_method,  # type: ignore[arg-type]
        loop=loop_kind,  # type: ignore[arg-type]
        distribution="barrier",
        **options,
    )


# -- a finding of the machine above, reduced to a deterministic test -------------------


def test_message_sent_to_an_already_dead_worker_survives_one_more_death(
    start_method: str, loop_kind: str
) -> None:
    """A SafeWorker message that ran in only one worker, which died, is delivered again."""
    # The parent runs asyncio's own loop whatever the run's loop kind: the
    # reproduction needs its order (callbacks queued before the loop polls
    # run first; uvloop may learn of the death first and dodge the bug).
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        lost = runner.run(_lose_after_one_death(start_method, loop_kind))
    assert lost == 0, "the message was lost after a single death while it ran"


async def _lose_after_one_death(start_method: str, loop_kind: str) -> int:
    """Send a message to a dead worker, kill the replacement running it; return stats().lost."""
    async with _served_gate() as gate:
        pool = looppool.Pool(
            functools.partial(Fragile, gate),
            size=2,
            start_method=start_method,  # type: ignore[arg-type]
            loop=loop_kind,  # type: ignore[arg-type]
        )
        async with pool:
            results = pool.results()
            pid = await pool.submit("pid", worker=1)
            os.kill(pid, signal.SIGKILL)
            # Dead, not reaped: the pool, whose loop does not run meanwhile, cannot know yet.
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # noqa: ASYNC222
            # Accepted at once, so written to the dead worker's pipe before the
            # pool polls and learns of the death (the write fails: EPIPE).
            pool.put_nowait("hold", worker=1)
            number, what, new_pid = await anext(results)
            assert (number, what) == (1, "holding")
            assert new_pid != pid
            os.kill(new_pid, signal.SIGKILL)  # the first death while the message ran
            again = asyncio.ensure_future(anext(results))
            drained = asyncio.ensure_future(pool.drain())
            await asyncio.wait({again, drained}, return_when=asyncio.FIRST_COMPLETED)
            lost = pool.stats().lost
            if again.done():
                assert again.result()[:2] == (1, "holding")  # delivered once more
            else:
                again.cancel()
            gate.open()
            await drained
            return lost


class _OnLog(logging.Handler):
    """Calls ``action`` when a log record's message contains ``text``."""

    def __init__(self, text: str, action: Callable[[], None]) -> None:
        super().__init__()
        self.text = text
        self.action = action

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.action()


async def test_barrier_message_that_died_in_two_workers_is_lost(
    start_method: str, loop_kind: str
) -> None:
    """distribution='barrier': a message running in two workers that both died fails."""
    async with _served_gate() as gate:
        restarting = asyncio.Event()
        handler = _OnLog("restarting every worker", restarting.set)
        logging.getLogger("looppool").addHandler(handler)
        pool = _barrier_pool(gate, start_method, loop_kind)
        try:
            async with pool:
                results = pool.results()
                first = asyncio.ensure_future(pool.submit(("hold", 1)))
                second = asyncio.ensure_future(pool.submit(("hold", 2)))
                holders = {}
                for _ in range(2):
                    _, tag, pid = await anext(results)
                    holders[tag] = pid
                os.kill(holders[1], signal.SIGKILL)  # every worker restarts ...
                await restarting.wait()  # ... the survivor, still running message 2, is stopping
                os.kill(holders[2], signal.SIGKILL)  # message 2 dies with it: once
                again = {}
                for _ in range(2):  # the new generation runs both again
                    _, tag, pid = await anext(results)
                    again[tag] = pid
                restarting.clear()
                os.kill(again[2], signal.SIGKILL)  # message 2 dies with its worker: twice
                await restarting.wait()  # the pool has decided the fate of message 2
                lost = pool.stats().lost
                gate.open()
                assert await first == 1
                await asyncio.gather(second, return_exceptions=True)
            assert lost == 1, "message 2 is sent a third time after dying in two workers"
            with pytest.raises(looppool.WorkerLost):
                second.result()
        finally:
            logging.getLogger("looppool").removeHandler(handler)


def _fd_target(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # listdir's own fd, closed since
        return "gone"


async def _restart_with_a_backlog(start_method: str, loop_kind: str) -> None:
    async with _served_gate() as gate:
        # concurrency=1: a worker holding a message takes no other from the shared queue.
        pool = _barrier_pool(gate, start_method, loop_kind, concurrency=1)
        async with pool:
            results = pool.results()
            await pool.put(("hold", 1))
            await pool.put(("hold", 2))
            holders = [(await anext(results))[2] for _ in range(2)]
            # Nobody reads the shared queue now, and this is more than its
            # pipe holds (1 MiB at most): part of it waits in the parent.
            for i in range(400):
                await pool.put(("fill", i, b"x" * 8192))
            os.kill(holders[0], signal.SIGKILL)  # a generation restart, with that backlog
            gate.open()
            await pool.drain()
            assert pool.stats().processed == 402


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts fds in /proc")
async def test_barrier_restart_with_a_backlog_leaves_nothing_behind(
    start_method: str, loop_kind: str
) -> None:
    """distribution='barrier': a restart with megabytes queued runs them all and leaks nothing."""
    # The first run creates what multiprocessing keeps for the process's
    # life (its shared-memory arena, the resource tracker); the second must
    # add nothing.
    await _restart_with_a_backlog(start_method, loop_kind)
    threads_before = set(threading.enumerate())
    fds_before = set(os.listdir("/proc/self/fd"))
    await _restart_with_a_backlog(start_method, loop_kind)
    left = [t for t in set(threading.enumerate()) - threads_before if t.is_alive()]
    for thread in left:
        thread.join(timeout=2.0)  # a thread that is ending ends at once; a stuck one never
    stuck = [t.name for t in left if t.is_alive()]
    assert not stuck, f"threads left running after stop(): {stuck}"
    new_fds = {fd: _fd_target(fd) for fd in set(os.listdir("/proc/self/fd")) - fds_before}
    leaked = {fd: target for fd, target in new_fds.items() if target != "gone"}
    assert not leaked, f"file descriptors left open after stop(): {leaked}"


def _named_semaphores() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("sem.mp-")}


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="lists named semaphores in /dev/shm")
async def test_stopped_barrier_pool_releases_its_semaphores_even_if_never_collected() -> None:
    """distribution='barrier' (spawn): stop() frees every generation's semaphores, not the GC."""
    # Spawned workers need named semaphores; until something frees the
    # Barrier and Lock holding them, they stay in /dev/shm. A pool caught in
    # a reference cycle is freed only by the cyclic GC, at any moment: on
    # Python 3.13 possibly inside the resource tracker, which then warns that
    # the semaphore "might leak". So stop() must drop them itself.
    before = _named_semaphores()
    gc.disable()
    try:
        pool = looppool.Pool(
            Recorder, size=2, start_method="spawn", loop=LOOP_KIND, distribution="barrier"
        )
        async with pool:
            await pool.submit(("a", "ok", 0))
            os.kill(pool.pids[0], signal.SIGKILL)  # a restart: a second generation
            await pool.submit(("b", "ok", 0))
            assert _named_semaphores() - before, "the test needs a pool that uses named semaphores"
        cycle: list[Any] = [pool]
        cycle.append(cycle)  # the pool stays referenced, as from a cycle nobody collects yet
        left = _named_semaphores() - before
        assert not left, f"a stopped pool still holds {len(left)} named semaphore(s)"
    finally:
        gc.enable()
