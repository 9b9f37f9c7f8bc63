"""looppool.testing.InlinePool: the pool API with in-process workers."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import re
import threading
from collections import Counter
from typing import Any

import pytest

import looppool
from looppool.testing import InlinePool

pytestmark = pytest.mark.asyncio


# -- workers ------------------------------------------------------------------------
#
# Defined here, not in an importable module: an InlinePool never pickles its
# worker factory. Tests synchronise with them through asyncio objects passed to
# their constructors (functools.partial).


class Echo(looppool.SafeWorker):
    """Puts (its number, the message) as a result and replies with the message."""

    async def process_message(self, message: Any) -> Any:
        self.put_result((self.number, message))
        return message


class PlainEcho(looppool.Worker):
    """Echo with plain (non-async) hooks, and a plain Worker."""

    def initialise(self) -> None:
        self.prefix = f"w{self.number}"

    def process_message(self, message: Any) -> Any:
        self.put_result((self.number, message))
        return (self.prefix, message)


class Mutating(looppool.SafeWorker):
    """Mutates the dict it gets, and replies with it and with what it was given."""

    def initialise(self) -> None:
        self.seen: list[Any] = []

    def process_message(self, message: Any) -> Any:
        message["touched"] = True
        self.seen.append(message)
        return message


class UnpicklableError(Exception):
    """Carries a lock: it cannot be pickled."""


class NeedsTwoArguments(Exception):
    """Pickles, but cannot be unpickled: its __init__ takes two arguments."""

    def __init__(self, a: Any, b: Any) -> None:
        super().__init__(f"{a} and {b}")


class Raising(looppool.SafeWorker):
    """Raises or returns something unpicklable when told to; echoes the rest."""

    async def process_message(self, message: Any) -> Any:
        if message == "raise":
            raise ValueError(f"worker {self.number} was told to raise")
        if message == "unpicklable-exception":
            raise UnpicklableError(threading.Lock())
        if message == "exception-that-cannot-unpickle":
            raise NeedsTwoArguments(1, 2)
        if message == "unpicklable-result":
            self.put_result(threading.Lock())
        if message == "unpicklable-reply":
            return threading.Lock()
        if message == "cancel-itself":
            raise asyncio.CancelledError
        self.put_result((self.number, message))
        return message


class Gated(looppool.SafeWorker):
    """Holds "hold" messages until `gate` opens; counts what runs at once.

    Every message adds ("start", message) and ("end", message) to `events`;
    `started` is set once `expect` messages are running at the same time.
    """

    def __init__(self, gate: asyncio.Event, events: list[Any], expect: int = 1) -> None:
        self.gate = gate
        self.events = events
        self.expect = expect
        self.started = asyncio.Event()
        self.running = 0
        self.peak = 0

    async def process_message(self, message: Any) -> Any:
        self.running += 1
        self.peak = max(self.peak, self.running)
        if self.running >= self.expect:
            self.started.set()
        self.events.append(("start", message))
        try:
            if message == "hold":
                await self.gate.wait()
            self.put_result((self.number, message))
            return message
        finally:
            self.events.append(("end", message))
            self.running -= 1


class GatedWorker(Gated, looppool.Worker):
    """Gated as a plain Worker (cancelled at stop): reports cancellation as a result."""

    safe = False

    async def process_message(self, message: Any) -> Any:
        try:
            return await super().process_message(message)
        except asyncio.CancelledError:
            self.put_result((self.number, "cancelled", message))
            raise


class Finalising(looppool.SafeWorker):
    """Records its life cycle in a shared list; puts a result from finalise()."""

    def __init__(self, log: list[str], fail_initialise: int | None = None) -> None:
        self.log = log
        self.fail_initialise = fail_initialise

    async def initialise(self) -> None:
        if self.number == self.fail_initialise:
            raise RuntimeError("cannot open the database")
        self.log.append(f"initialise {self.number}")

    def process_message(self, message: Any) -> Any:
        return message

    async def finalise(self) -> None:
        self.log.append(f"finalise {self.number}")
        self.put_result((self.number, "finalised"))


async def collect(pool: InlinePool) -> list[Any]:
    return [result async for result in pool.results()]


def gated(
    gate: asyncio.Event, events: list[Any], expect: int = 1, *, safe: bool = True
) -> tuple[functools.partial[Gated], list[Gated]]:
    """A factory of Gated workers that also keeps the workers it made, for the test."""
    made: list[Gated] = []
    cls = Gated if safe else GatedWorker

    def factory() -> Gated:
        worker = cls(gate, events, expect)
        made.append(worker)
        return worker

    return functools.partial(factory), made


# -- distribution -------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 5])
async def test_message_i_of_each_round_goes_to_worker_i(size: int) -> None:
    """Fair rounds: n·k shared messages reach worker i exactly for i, i+n, i+2n..."""
    async with InlinePool(Echo, size) as pool:
        for i in range(size * 4):
            await pool.put(i)
    results = await collect(pool)
    assert sorted(results) == sorted((i % size, i) for i in range(size * 4))
    assert Counter(number for number, _ in results) == dict.fromkeys(range(size), 4)


async def test_directed_messages_and_broadcasts_do_not_count_in_rounds() -> None:
    """worker=k reaches worker k, broadcast reaches each worker once; rounds go on unshifted."""
    async with InlinePool(Echo, 3) as pool:
        await pool.put("a")  # round position 0
        await pool.put("to-2", worker=2)
        await pool.broadcast("all")
        assert await pool.submit("b") == "b"  # round position 1
        await pool.put("c")  # round position 2
    results = await collect(pool)
    assert sorted(results) == sorted(
        [(0, "a"), (2, "to-2"), (0, "all"), (1, "all"), (2, "all"), (1, "b"), (2, "c")]
    )


async def test_bad_target_worker_is_rejected() -> None:
    """worker= out of range or not an int raises at the call; nothing is accepted."""
    async with InlinePool(Echo, 2) as pool:
        with pytest.raises(ValueError, match="out of range"):
            await pool.put(1, worker=2)
        with pytest.raises(ValueError, match="out of range"):
            await pool.submit(1, worker=-1)
        with pytest.raises(TypeError, match="int or None"):
            pool.put_nowait(1, worker="0")  # type: ignore[arg-type]
        assert pool.stats().put == 0


# -- pickling -------------------------------------------------------------------------


async def test_messages_and_replies_are_copies_by_default() -> None:
    """With pickle=True the worker mutates its own copy, and the reply is another copy."""
    made: list[Mutating] = []

    def factory() -> Mutating:
        made.append(Mutating())
        return made[-1]

    message: dict[str, Any] = {"n": 1}
    async with InlinePool(factory) as pool:
        reply = await pool.submit(message)
    assert message == {"n": 1}
    assert reply == {"n": 1, "touched": True}
    assert reply is not made[0].seen[0]


async def test_pickle_false_hands_objects_over_as_they_are() -> None:
    """With pickle=False the worker gets the caller's object, unpicklable or not."""
    lock = threading.Lock()
    message: dict[str, Any] = {"lock": lock}
    async with InlinePool(Mutating, pickle=False) as pool:
        reply = await pool.submit(message)
    assert reply is message
    assert message["touched"] is True


async def test_unpicklable_message_raises_type_error_in_the_caller() -> None:
    """Every way to send an unpicklable message raises TypeError; nothing is accepted."""
    async with InlinePool(Echo, 2) as pool:
        with pytest.raises(TypeError, match="cannot be pickled"):
            await pool.put(threading.Lock())
        with pytest.raises(TypeError, match="cannot be pickled"):
            pool.put_nowait(lambda: None)
        with pytest.raises(TypeError, match="cannot be pickled"):
            await pool.submit(threading.Lock())
        with pytest.raises(TypeError, match="cannot be pickled"):
            await pool.broadcast(threading.Lock())
        assert pool.stats().put == 0
        assert await pool.submit("still fine") == "still fine"


async def test_unpicklable_result_or_reply_fails_only_that_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A result or reply that cannot be pickled fails its message, as in a process pool."""
    caplog.set_level(logging.ERROR, logger="looppool.worker")
    async with InlinePool(Raising) as pool:
        await pool.put("unpicklable-result")
        with pytest.raises(TypeError, match="reply of process_message could not be pickled"):
            await pool.submit("unpicklable-reply")
        assert await pool.submit("fine") == "fine"
        await pool.drain()
        assert pool.stats().failed == 2
    assert await collect(pool) == [(0, "fine")]
    [record] = [r for r in caplog.records if "process_message raised" in r.getMessage()]
    assert record.exc_info is not None
    assert "pickle" in str(record.exc_info[1])


async def test_exception_that_cannot_make_the_round_trip_becomes_remote_error() -> None:
    """An exception that cannot be pickled, or unpickled, reaches submit() as RemoteError."""
    async with InlinePool(Raising) as pool:
        with pytest.raises(looppool.RemoteError, match="UnpicklableError") as info:
            await pool.submit("unpicklable-exception")
        assert info.value.type_name.endswith("UnpicklableError")
        assert isinstance(info.value.__cause__, looppool.RemoteTraceback)
        with pytest.raises(looppool.RemoteError, match="NeedsTwoArguments"):
            await pool.submit("exception-that-cannot-unpickle")


# -- errors ---------------------------------------------------------------------------


async def test_submit_reraises_a_copy_with_the_worker_traceback_as_cause() -> None:
    """submit() raises the handler's exception type; __cause__ is the RemoteTraceback."""
    async with InlinePool(Raising) as pool:
        with pytest.raises(ValueError, match="worker 0 was told to raise") as info:
            await pool.submit("raise")
        assert await pool.submit("after") == "after"
    cause = info.value.__cause__
    assert isinstance(cause, looppool.RemoteTraceback)
    assert "in process_message" in str(cause)
    assert "ValueError: worker 0 was told to raise" in cause.tb


async def test_failure_of_a_put_message_is_logged_counted_and_the_worker_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An exception in process_message is logged on looppool.worker with the worker number."""
    caplog.set_level(logging.ERROR, logger="looppool.worker")
    async with InlinePool(Raising, 2) as pool:
        await pool.put("raise", worker=1)
        await pool.put("after", worker=1)
        await pool.drain()
        assert pool.stats().failed == 1
    assert await collect(pool) == [(1, "after")]
    [record] = [r for r in caplog.records if "process_message raised" in r.getMessage()]
    assert record.name == "looppool.worker"
    assert record.worker == 1  # type: ignore[attr-defined]
    assert "[worker 1]" in record.getMessage()
    assert record.exc_info is not None
    assert "told to raise" in str(record.exc_info[1])


async def test_a_cancelled_error_of_the_handler_own_is_a_failure() -> None:
    """A CancelledError escaping process_message, unasked for, fails that message only."""
    async with InlinePool(Raising) as pool:
        with pytest.raises(asyncio.CancelledError):
            await pool.submit("cancel-itself")
        assert await pool.submit("after") == "after"
        assert (pool.stats().failed, pool.stats().lost) == (1, 0)


async def test_initialise_failure_raises_worker_start_error_and_finalises_the_others() -> None:
    """start() raises WorkerStartError with the traceback; initialised workers are finalised."""
    log: list[str] = []
    pool = InlinePool(functools.partial(Finalising, log, fail_initialise=1), 3)
    with pytest.raises(looppool.WorkerStartError, match="cannot open the database") as info:
        await pool.start()
    assert info.value.number == 1
    assert "RuntimeError" in info.value.remote_traceback
    assert "RuntimeError: cannot open the database" in info.value.remote_traceback
    assert sorted(log) == ["finalise 0", "finalise 2", "initialise 0", "initialise 2"]
    with pytest.raises(looppool.PoolClosed):
        pool.put_nowait(1)
    await pool.stop()  # stopped already: finalise() does not run twice
    assert len(log) == 4
    assert await collect(pool) == []


async def test_initialise_runs_in_every_worker_at_once() -> None:
    """Workers initialise concurrently: one initialise() may wait for another's."""
    ready = asyncio.Event()

    class Waits(looppool.SafeWorker):
        async def initialise(self) -> None:
            if self.number == 0:
                await ready.wait()
            else:
                ready.set()

        def process_message(self, message: Any) -> Any:
            return self.number

    async with InlinePool(Waits, 2) as pool:
        assert [await pool.submit(None, worker=k) for k in range(2)] == [0, 1]


async def test_stop_while_starting_ends_the_start() -> None:
    """stop() during start() cancels the initialise() calls; start() raises PoolClosed."""
    log: list[str] = []
    waiting = asyncio.Event()

    class SlowStart(looppool.SafeWorker):
        async def initialise(self) -> None:
            if self.number == 0:
                waiting.set()
                await asyncio.Event().wait()
            log.append(f"initialise {self.number}")

        def process_message(self, message: Any) -> Any:
            return message

        def finalise(self) -> None:
            log.append(f"finalise {self.number}")

    pool = InlinePool(SlowStart, 2)
    starting = asyncio.ensure_future(pool.start())
    await waiting.wait()
    await pool.stop()
    with pytest.raises(looppool.PoolClosed, match="while the pool was starting"):
        await starting
    assert log == ["initialise 1", "finalise 1"]
    assert await collect(pool) == []


async def test_bad_worker_factories_are_refused() -> None:
    """A class that is not a Worker fails at once; a factory making one fails start."""

    class NotAWorker:
        pass

    with pytest.raises(TypeError, match="does not derive"):
        InlinePool(NotAWorker)  # type: ignore[arg-type]
    with pytest.raises(looppool.WorkerStartError, match=r"not an instance of looppool\.Worker"):
        async with InlinePool(lambda: NotAWorker()):  # type: ignore[arg-type,return-value]
            pass


async def test_constructor_checks_arguments_and_process_options() -> None:
    """Bad arguments raise at once; process options are accepted but checked."""
    with pytest.raises(ValueError, match="size"):
        InlinePool(Echo, 0)
    with pytest.raises(ValueError, match="concurrency"):
        InlinePool(Echo, concurrency=0)
    with pytest.raises(ValueError, match="max_pending"):
        InlinePool(Echo, max_pending=0)
    with pytest.raises(ValueError, match="loop"):
        InlinePool(Echo, loop="trio")
    with pytest.raises(ValueError, match="start_method"):
        InlinePool(Echo, start_method="thread")
    with pytest.raises(ValueError, match="distribution"):
        InlinePool(Echo, distribution="random")
    with pytest.raises(TypeError, match="on_result"):
        InlinePool(Echo, on_result=42)  # type: ignore[arg-type]
    pool = InlinePool(
        Echo, None, loop="uvloop", start_method="spawn", distribution="barrier", statsd=None
    )
    assert pool.size == (os.cpu_count() or 1)
    assert pool.pids == (None,) * pool.size


@pytest.mark.parametrize(
    "options",
    [
        {"stasd": "127.0.0.1:8125"},  # a misspelt option
        {"statsd": 1},
        {"statsd": "no-port"},
        {"blocking_threshold": -1},
        {"worker_metrics": "yes"},
        {"blocking_threshold": 1.0, "metrics_interval": 0},
        {"hang_timeout": 0},
        {"max_memory_per_worker": 0},
    ],
)
async def test_process_options_fail_as_in_pool(options: dict[str, Any]) -> None:
    """A process option InlinePool ignores fails as in Pool: same error type, same message."""
    with pytest.raises((TypeError, ValueError)) as in_pool:
        looppool.Pool(Echo, 1, **options)
    # (Python 3.13 adds "Did you mean ...?" to a misspelt option; InlinePool
    # suggests on every version, so the first sentence is what must match.)
    expected = str(in_pool.value).replace("Pool.__init__()", "InlinePool()").split(". Did")[0]
    with pytest.raises(type(in_pool.value), match="^" + re.escape(expected)):
        InlinePool(Echo, 1, **options)


async def test_a_misspelt_option_gets_a_suggestion() -> None:
    """InlinePool names the option a misspelt one was probably meant to be."""
    with pytest.raises(TypeError, match=r"'stasd'\. Did you mean 'statsd'\?"):
        InlinePool(Echo, 1, stasd="127.0.0.1:8125")
    with pytest.raises(TypeError, match=r"'concurency'\. Did you mean 'concurrency'\?"):
        InlinePool(Echo, 1, concurency=2)


# -- back-pressure and concurrency ------------------------------------------------------


async def test_put_nowait_raises_queue_full_and_put_waits_for_room() -> None:
    """Above max_pending put_nowait raises QueueFull; put is accepted once a message ends."""
    gate, events = asyncio.Event(), list[Any]()
    factory, made = gated(gate, events)
    async with InlinePool(factory, max_pending=2) as pool:
        pool.put_nowait("hold")
        pool.put_nowait("hold")
        with pytest.raises(looppool.QueueFull, match="max_pending=2"):
            pool.put_nowait("more")
        waiting = asyncio.ensure_future(pool.put("later"))
        await made[0].started.wait()  # by now the put waits for room
        assert not waiting.done()
        gate.set()
        await waiting
    assert await collect(pool) == [(0, "hold"), (0, "hold"), (0, "later")]
    # "later" was accepted only when a "hold" had ended.
    assert events.index(("start", "later")) > events.index(("end", "hold"))


async def test_a_cancelled_put_passes_its_wake_up_on() -> None:
    """A put cancelled after being woken for room leaves the room to the next waiting put."""
    gate = asyncio.Event()
    loop = asyncio.get_running_loop()
    waiting: list[asyncio.Future[None]] = []

    class CancelFirstWhenHoldEnds(list[Any]):
        # The hold's end wakes the first put; the cancel scheduled here runs
        # after that wake-up and before the put resumes: the window to test.
        def append(self, event: Any) -> None:
            super().append(event)
            if event == ("end", "hold"):
                loop.call_soon(waiting[0].cancel)

    factory, made = gated(gate, CancelFirstWhenHoldEnds())
    async with InlinePool(factory, max_pending=1) as pool:
        pool.put_nowait("hold")
        waiting += [asyncio.ensure_future(pool.put(m)) for m in ("first", "second")]
        await made[0].started.wait()  # by now both puts wait for room
        gate.set()
        await waiting[1]
        with pytest.raises(asyncio.CancelledError):
            await waiting[0]
    assert [m for _, m in await collect(pool)] == ["hold", "second"]


async def test_put_waiting_for_room_raises_pool_closed_when_the_pool_stops() -> None:
    """A put still waiting for room when stop() begins raises PoolClosed."""
    gate, events = asyncio.Event(), list[Any]()
    factory, made = gated(gate, events)
    pool = InlinePool(factory, max_pending=1)
    await pool.start()
    pool.put_nowait("hold")
    waiting = asyncio.ensure_future(pool.put("later"))
    await made[0].started.wait()  # by now the put waits for room
    stopping = asyncio.ensure_future(pool.stop())
    gate.set()  # the stop, scheduled first, begins before "hold" can end
    await stopping
    with pytest.raises(looppool.PoolClosed):
        await waiting
    assert [m for _, m in await collect(pool)] == ["hold"]


async def test_concurrency_bounds_messages_in_flight_per_worker() -> None:
    """At most `concurrency` messages run at once in one worker; the rest wait their turn."""
    gate, events = asyncio.Event(), list[Any]()
    factory, made = gated(gate, events, expect=3)
    async with InlinePool(factory, 2, concurrency=3) as pool:
        for _ in range(10):
            await pool.put("hold", worker=0)
        await made[0].started.wait()
        assert pool.stats().in_flight == (3, 0)
        assert pool.stats().pending == 10
        gate.set()
        await pool.drain()
        assert pool.stats().in_flight == (0, 0)
    assert made[0].peak == 3
    assert len(await collect(pool)) == 10


# -- stop --------------------------------------------------------------------------------


@pytest.mark.parametrize("count", range(5))
async def test_safe_worker_stop_processes_everything_put_before_it(count: int) -> None:
    """A SafeWorker pool's stop runs every accepted message, beyond concurrency too."""
    pool = InlinePool(Echo, 2, concurrency=1)
    await pool.start()
    for i in range(count * 10):
        pool.put_nowait(i)
    await pool.stop()
    assert sorted(m for _, m in await collect(pool)) == list(range(count * 10))
    assert pool.stats().processed == count * 10


async def test_worker_stop_cancels_in_flight_and_drops_queued() -> None:
    """A Worker pool's stop cancels running handlers (finally runs) and loses the queued."""
    gate, events = asyncio.Event(), list[Any]()
    factory, made = gated(gate, events, safe=False)
    pool = InlinePool(factory, concurrency=1)
    await pool.start()
    running = asyncio.ensure_future(pool.submit("hold"))
    queued = asyncio.ensure_future(pool.submit("queued"))
    await made[0].started.wait()
    await pool.stop()
    with pytest.raises(looppool.PoolClosed, match="while the message was running"):
        await running
    with pytest.raises(looppool.PoolClosed, match="before the message was sent to a worker"):
        await queued
    assert await collect(pool) == [(0, "cancelled", "hold")]
    assert events == [("start", "hold"), ("end", "hold")]
    stats = pool.stats()
    assert (stats.lost, stats.processed, stats.failed, stats.pending) == (2, 0, 0, 0)


async def test_body_exception_stops_without_starting_queued_messages() -> None:
    """An exception in async with propagates; in-flight SafeWorker messages end, queued are lost."""
    gate, events = asyncio.Event(), list[Any]()
    factory, made = gated(gate, events)
    pool = InlinePool(factory, concurrency=1)

    async def body() -> None:
        async with pool:
            await pool.put("hold")
            await pool.put("queued")
            await made[0].started.wait()
            gate.set()  # "hold" resumes only once the body has raised
            raise KeyError("body failed")

    with pytest.raises(KeyError):
        await body()
    assert await collect(pool) == [(0, "hold")]
    assert (pool.stats().processed, pool.stats().lost) == (1, 1)


async def test_cancelling_the_body_stops_the_pool() -> None:
    """Cancellation of the task running async with (Ctrl-C) stops the pool and propagates."""
    gate, events = asyncio.Event(), list[Any]()
    factory, made = gated(gate, events, safe=False)
    pools: list[InlinePool] = []
    holding = asyncio.Event()

    async def body() -> None:
        async with InlinePool(factory) as pool:
            pools.append(pool)
            await pool.put("hold")
            await made[0].started.wait()
            holding.set()
            await asyncio.Event().wait()

    task = asyncio.ensure_future(body())
    await holding.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await collect(pools[0]) == [(0, "cancelled", "hold")]
    assert pools[0].stats().lost == 1


async def test_stop_is_idempotent_and_closes_the_pool() -> None:
    """stop() may be called twice and concurrently; put, submit, broadcast then raise PoolClosed."""
    pool = InlinePool(Echo, 2)
    await pool.start()
    await asyncio.gather(pool.stop(), pool.stop())
    await pool.stop()
    with pytest.raises(looppool.PoolClosed, match="takes no new messages"):
        await pool.put(1)
    with pytest.raises(looppool.PoolClosed):
        pool.put_nowait(1)
    with pytest.raises(looppool.PoolClosed):
        await pool.submit(1)
    with pytest.raises(looppool.PoolClosed):
        await pool.broadcast(1)
    with pytest.raises(looppool.PoolClosed, match="already started"):
        await pool.start()


async def test_put_before_start_raises_and_stop_before_start_is_allowed() -> None:
    """A pool that was never started refuses messages; stopping it ends results()."""
    pool = InlinePool(Echo)
    with pytest.raises(looppool.PoolClosed, match="not started"):
        pool.put_nowait(1)
    await pool.drain()
    await pool.stop()
    assert await collect(pool) == []


async def test_stop_timeout_cancels_what_outlives_it(caplog: pytest.LogCaptureFixture) -> None:
    """stop(timeout) cancels a SafeWorker handler that never ends; its message is lost."""
    caplog.set_level(logging.WARNING, logger="looppool")
    gate, events = asyncio.Event(), list[Any]()
    factory, made = gated(gate, events)
    pool = InlinePool(factory)
    await pool.start()
    hung = asyncio.ensure_future(pool.submit("hold"))
    await made[0].started.wait()
    await pool.stop(timeout=0.01)  # the gate never opens
    with pytest.raises(looppool.PoolClosed):
        await hung
    assert pool.stats().lost == 1
    assert events == [("start", "hold"), ("end", "hold")]
    assert any("stop(timeout=0.01) expired" in r.getMessage() for r in caplog.records)


async def test_finalise_runs_at_stop_and_its_results_arrive(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """finalise() runs in every worker at stop; its results still reach results()."""
    log: list[str] = []
    async with InlinePool(functools.partial(Finalising, log), 2) as pool:
        assert log == ["initialise 0", "initialise 1"]
    assert sorted(await collect(pool)) == [(0, "finalised"), (1, "finalised")]
    assert sorted(log[2:]) == ["finalise 0", "finalise 1"]


async def test_a_failing_finalise_is_logged_and_the_stop_completes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An exception in finalise() is logged on looppool.worker; stop() still returns."""
    caplog.set_level(logging.ERROR, logger="looppool.worker")

    class BadFinalise(looppool.SafeWorker):
        def process_message(self, message: Any) -> Any:
            return message

        def finalise(self) -> None:
            raise OSError("disk gone")

    async with InlinePool(BadFinalise, 2):
        pass
    messages = sorted(r.getMessage() for r in caplog.records)
    assert messages == ["[worker 0] finalise() raised", "[worker 1] finalise() raised"]


async def test_put_result_after_stop_raises() -> None:
    """A worker detached by the stop cannot send results any more."""
    made: list[Echo] = []

    def factory() -> Echo:
        made.append(Echo())
        return made[-1]

    async with InlinePool(factory):
        pass
    with pytest.raises(RuntimeError, match="no pool is running"):
        made[0].put_result("late")


# -- results, drain, stats -----------------------------------------------------------------


async def test_results_end_once_the_pool_stopped_and_every_result_was_yielded() -> None:
    """results() started before the stop yields everything, then ends."""
    pool = InlinePool(Echo, 2)
    await pool.start()
    reader = asyncio.ensure_future(collect(pool))
    for i in range(6):
        await pool.put(i)
    await pool.stop()
    assert sorted(await reader) == sorted((i % 2, i) for i in range(6))


async def test_drain_waits_for_messages_and_their_results() -> None:
    """drain() returns once every message put before it is done and its results are in."""
    received: list[Any] = []
    async with InlinePool(PlainEcho, 2, on_result=received.append) as pool:
        for i in range(20):
            await pool.put(i)
        await pool.drain()
        assert sorted(m for _, m in received) == list(range(20))
        assert pool.stats().pending == 0


async def test_async_on_result_is_awaited_in_order_before_drain_returns() -> None:
    """An async on_result runs for every result, in order, and drain() waits for it."""
    received: list[Any] = []

    async def on_result(value: Any) -> None:
        await asyncio.sleep(0)  # a callback that really suspends (not synchronisation)
        received.append(value)

    async with InlinePool(Echo, on_result=on_result) as pool:
        for i in range(5):
            await pool.put(i)
        await pool.drain()
        assert [m for _, m in received] == list(range(5))
        with pytest.raises(looppool.LooppoolError, match="on_result"):
            await anext(pool.results())


async def test_failing_on_result_is_logged_and_delivery_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An exception in on_result is logged on looppool; later results are still delivered."""
    caplog.set_level(logging.ERROR, logger="looppool")
    received: list[Any] = []

    def on_result(value: Any) -> None:
        if value[1] == 0:
            raise KeyError("bad result")
        received.append(value)

    async with InlinePool(Echo, on_result=on_result) as pool:
        await pool.put(0)
        await pool.put(1)
    assert received == [(0, 1)]
    assert [r.getMessage() for r in caplog.records] == ["pool Echo: on_result raised"]


async def test_stats_snapshot_and_repr_describe_the_pool() -> None:
    """stats() is a frozen looppool.PoolStats; repr() names the state and counts."""
    async with InlinePool(Raising, 2, name="unit") as pool:
        assert repr(pool).startswith("<looppool.testing.InlinePool 'unit' running, 2 workers")
        await pool.put(1)
        await pool.put("raise")
        await pool.broadcast(2)
        await pool.drain()
        stats = pool.stats()
    assert isinstance(stats, looppool.PoolStats)
    assert (stats.put, stats.processed, stats.failed, stats.results, stats.lost) == (4, 3, 1, 3, 0)
    assert (stats.respawns, stats.blocked, stats.redelivered, stats.pending) == (0, 0, 0, 0)
    assert stats.in_flight == (0, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.put = 0  # type: ignore[misc]
    assert "stopped" in repr(pool)
    assert InlinePool(Echo, 3).stats().in_flight == (0, 0, 0)


async def test_plain_hooks_and_a_plain_worker() -> None:
    """def hooks work like async def ones; a plain Worker replies and puts results."""
    async with InlinePool(PlainEcho, 2) as pool:
        assert await pool.submit("x") == ("w0", "x")
        assert await pool.submit("y") == ("w1", "y")
    assert sorted(await collect(pool)) == [(0, "x"), (1, "y")]
