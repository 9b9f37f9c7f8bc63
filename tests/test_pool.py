"""The core pool through its public API, under fork and spawn, and on InlinePool."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import multiprocessing
import os
import signal
import sys
import weakref
from collections import Counter
from typing import Any

import psutil
import pytest

import looppool
import pool_workers as w


@pytest.fixture(params=["rounds", "barrier"])
def distribution(request: pytest.FixtureRequest) -> str:
    """How shared messages are dealt: the parent's rounds, or the seed's Barrier."""
    return str(request.param)


@pytest.fixture
def make_process(start_method: str, loop_kind: str) -> Any:
    """Build a process Pool, for behaviour that only processes have."""

    def build(worker: Any, size: int = 2, **options: Any) -> looppool.Pool:
        options.setdefault("start_method", start_method)
        options.setdefault("loop", loop_kind)
        return looppool.Pool(worker, size=size, **options)

    return build


async def collect(pool: looppool.Pool) -> list[Any]:
    return [result async for result in pool.results()]


# -- results, replies, stop ---------------------------------------------------


async def test_results_of_every_message_reach_the_parent(make: Any) -> None:
    """Every result put by workers is yielded by results(), which ends after stop."""
    async with make(w.Echo) as pool:
        for i in range(20):
            await pool.put(i)
    assert sorted(m for _, m in await collect(pool)) == list(range(20))


@pytest.mark.parametrize("worker", [w.Echo, w.SyncEcho])
async def test_submit_returns_the_reply(make: Any, worker: Any) -> None:
    """submit() returns what process_message returned, for async and plain hooks."""
    async with make(worker) as pool:
        reply = await pool.submit("hi")
    assert reply in ("hi", ("sync", "hi"))


#: Plain values of every type that travels inside the frame's own pickle
#: (_protocol._AS_IS), and a few that do not.
PLAIN_VALUES = [0, -7, 2**100, True, False, 1.5, -0.0, 2 + 3j, "", "url", "\ud800 surrogate"]
PLAIN_VALUES += [None, b"bytes", w.Label("a str subclass"), (1, "two")]


async def test_plain_values_arrive_with_their_exact_type(make: Any) -> None:
    """ints, strs, floats, bools, complexes and others come back equal and of the same type."""
    async with make(w.Mirror) as pool:
        replies = [await pool.submit(value) for value in PLAIN_VALUES]
        for value in PLAIN_VALUES:
            await pool.put(value)
    results = await collect(pool)  # (one per submit, then one per put: in any order)

    def typed(values: list[Any]) -> list[tuple[type, Any]]:
        return [(type(v), v) for v in values]

    assert typed(replies) == typed(PLAIN_VALUES)
    assert Counter(map(repr, typed(results))) == Counter(map(repr, typed(PLAIN_VALUES * 2)))


async def test_partial_factory_with_arguments(make: Any) -> None:
    """A functools.partial of a Worker subclass is a valid worker factory."""
    async with make(functools.partial(w.Scaled, 3)) as pool:
        assert await asyncio.gather(*(pool.submit(i) for i in range(4))) == [0, 3, 6, 9]


@pytest.mark.parametrize("count", range(0, 5))
async def test_stop_after_0_to_2n_messages_never_hangs(
    make: Any, distribution: str, count: int
) -> None:
    """A SafeWorker pool stopped after 0..2n messages processes them all and returns."""
    pool = make(w.SafeSlow, distribution=distribution)
    await pool.start()
    for i in range(count):
        pool.put_nowait(i)
    await pool.stop()
    assert sorted(m for _, m in await collect(pool)) == list(range(count))
    assert pool.stats().processed == count


async def test_stop_is_idempotent_and_put_after_stop_raises(make: Any) -> None:
    """stop() may be called again; put, submit and broadcast then raise PoolClosed."""
    pool = make(w.Echo)
    await pool.start()
    await pool.stop()
    await pool.stop()
    with pytest.raises(looppool.PoolClosed):
        await pool.put(1)
    with pytest.raises(looppool.PoolClosed):
        pool.put_nowait(1)
    with pytest.raises(looppool.PoolClosed):
        await pool.submit(1)
    with pytest.raises(looppool.PoolClosed):
        await pool.broadcast(1)


async def test_put_before_start_raises(make: Any) -> None:
    """Putting into a pool that was never started is a clear PoolClosed error."""
    pool = make(w.Echo)
    with pytest.raises(looppool.PoolClosed, match="not started"):
        pool.put_nowait(1)
    await pool.stop()


async def test_worker_stop_cancels_in_flight_and_returns(make: Any) -> None:
    """A Worker pool's stop cancels in-flight handlers (finally runs) and drops queued ones."""
    pool = make(w.Cancellable, size=1, concurrency=1)
    await pool.start()
    started = pool.results()
    hung = asyncio.ensure_future(pool.submit("hang"))
    assert await anext(started) == (0, "started")
    pool.put_nowait("queued")  # beyond the window of one: waits in the parent
    await pool.stop()
    rest = [r async for r in started]
    assert rest == [(0, "cancelled")]
    with pytest.raises(looppool.PoolClosed):
        await hung
    assert pool.stats().lost == 2


async def test_safe_worker_stop_processes_everything_queued(make: Any, distribution: str) -> None:
    """A SafeWorker pool's stop runs every message put before it, beyond the window."""
    pool = make(w.SafeSlow, concurrency=2, distribution=distribution)
    await pool.start()
    for i in range(50):
        pool.put_nowait(i)
    await pool.stop()
    assert sorted(m for _, m in await collect(pool)) == list(range(50))


async def test_finalise_runs_at_stop(make: Any) -> None:
    """finalise() runs in every worker at stop, and its results still arrive."""
    async with make(w.Finalising) as pool:
        pass
    assert sorted(await collect(pool)) == [(0, "finalised"), (1, "finalised")]


async def test_body_exception_stops_without_starting_queued(make: Any) -> None:
    """An exception in the body of async with propagates; queued messages are lost, not run."""
    gate = multiprocessing.get_context("spawn").Event()
    pool = make(functools.partial(w.Gated, gate), size=1, concurrency=1)
    results = pool.results()

    async def body() -> None:
        async with pool:
            await pool.put("hold-report")
            assert await anext(results) == (0, "holding")
            for i in range(5):
                await pool.put(i)  # queued in the parent: the window is one
            gate.set()  # the message in flight may finish: SafeWorker lets it
            raise KeyError("the body failed")

    with pytest.raises(KeyError):
        await body()
    got = [r async for r in results]
    assert got == [(0, "hold-report")]
    assert pool.stats().lost == 5


# -- distribution ---------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3])
async def test_n_times_k_messages_are_spread_exactly_k_per_worker(
    make: Any, distribution: str, size: int
) -> None:
    """Fair rounds: n*k shared messages give exactly k to each of the n workers."""
    async with make(w.Echo, size=size, distribution=distribution) as pool:
        for i in range(size * 7):
            await pool.put(i)
    counts = Counter(number for number, _ in await collect(pool))
    assert counts == dict.fromkeys(range(size), 7)


async def test_first_n_messages_reach_each_worker_once(make: Any, distribution: str) -> None:
    """The first n messages after start reach each of the n workers exactly once."""
    async with make(w.Echo, size=3, distribution=distribution) as pool:
        for i in range(3):
            await pool.put(i)
    assert sorted(number for number, _ in await collect(pool)) == [0, 1, 2]


async def test_any_2n_minus_1_consecutive_messages_reach_every_worker(
    make: Any, distribution: str
) -> None:
    """Every window of 2n-1 consecutive shared messages covers all n workers."""
    size = 3
    async with make(w.Echo, size=size, distribution=distribution) as pool:
        for i in range(30):
            await pool.put(i)
    by_message = {m: n for n, m in await collect(pool)}
    for start in range(30 - (2 * size - 1) + 1):
        window = {by_message[i] for i in range(start, start + 2 * size - 1)}
        assert window == set(range(size)), f"window starting at {start}"


async def test_directed_messages_reach_their_worker(make: Any, distribution: str) -> None:
    """put(worker=k) and submit(worker=k) go to worker k and count in no round."""
    async with make(w.Echo, size=3, distribution=distribution) as pool:
        for i in range(6):
            await pool.put(i, worker=2)
        assert await pool.submit("x", worker=1) == "x"
        for i in range(3):
            await pool.put(("shared", i))
    results = await collect(pool)
    assert {n for n, m in results if isinstance(m, int)} == {2}
    assert sorted(n for n, m in results if isinstance(m, tuple)) == [0, 1, 2]


async def test_broadcast_reaches_every_worker_once(make: Any, distribution: str) -> None:
    """broadcast() delivers the message to each worker exactly once."""
    async with make(w.Stateful, size=3, distribution=distribution) as pool:
        await pool.broadcast(("set", "table-v1"))
        await pool.drain()
        tables = [await pool.submit("get", worker=k) for k in range(3)]
    assert tables == [["table-v1"]] * 3
    assert sorted(await collect(pool)) == [(0, "table-v1"), (1, "table-v1"), (2, "table-v1")]


# -- back-pressure and concurrency --------------------------------------------------


async def test_put_nowait_raises_queue_full_and_put_waits(make: Any) -> None:
    """Above max_pending put_nowait raises QueueFull and put waits until room is made."""
    gate = multiprocessing.get_context("spawn").Event()
    pool = make(functools.partial(w.Gated, gate), size=1, max_pending=2)
    async with pool:
        pool.put_nowait("hold")
        pool.put_nowait("hold")
        with pytest.raises(looppool.QueueFull, match="max_pending=2"):
            pool.put_nowait("more")
        waiting = asyncio.ensure_future(pool.put("later"))
        await asyncio.sleep(0)
        assert not waiting.done()
        gate.set()
        await waiting
    assert sorted(m for _, m in await collect(pool)) == ["hold", "hold", "later"]


async def test_concurrency_bounds_messages_in_flight_per_worker(make: Any) -> None:
    """At most `concurrency` messages run at once in one worker, and that many do."""
    gate = multiprocessing.get_context("spawn").Event()
    async with make(functools.partial(w.Gated, gate), size=1, concurrency=3) as pool:
        results = pool.results()
        for _ in range(6):
            await pool.put("hold")
        await pool.put("tick")
        # "tick" is queued behind the holds; it runs once the window opens.
        gate.set()
        await pool.drain()
        peak = await pool.submit("peak")
        await pool.stop()
        assert len([r async for r in results]) == 7
    assert peak == 3


async def test_drain_waits_for_messages_and_their_results(make: Any) -> None:
    """drain() returns once every message put before it is done and its results are in."""
    received: list[Any] = []
    async with make(w.SafeSlow, on_result=received.append) as pool:
        for i in range(40):
            await pool.put(i)
        await pool.drain()
        assert sorted(m for _, m in received) == list(range(40))
        assert pool.stats().pending == 0


async def test_async_on_result_is_awaited_for_every_result(make: Any) -> None:
    """An async on_result callback runs for every result, in order, before drain returns."""
    received: list[Any] = []

    async def on_result(value: Any) -> None:
        await asyncio.sleep(0)
        received.append(value)

    async with make(w.Echo, size=1, on_result=on_result) as pool:
        for i in range(10):
            await pool.put(i)
        await pool.drain()
        assert [m for _, m in received] == list(range(10))


async def test_results_is_refused_with_on_result(make: Any) -> None:
    """results() is an error when on_result receives the results."""
    async with make(w.Echo, on_result=lambda value: None) as pool:
        with pytest.raises(looppool.LooppoolError, match="on_result"):
            await anext(pool.results())


# -- errors -----------------------------------------------------------------------


async def test_raising_handler_is_logged_and_the_worker_keeps_working(
    make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception in process_message is logged with worker number and traceback."""
    caplog.set_level(logging.ERROR)
    async with make(w.Raising, size=1) as pool:
        await pool.put("raise")
        await pool.put("after")
        await pool.drain()
        assert pool.stats().failed == 1
    assert await collect(pool) == [(0, "after")]
    [record] = [r for r in caplog.records if "process_message raised" in r.getMessage()]
    assert record.worker == 0  # type: ignore[attr-defined]
    assert "[worker 0]" in record.getMessage()
    assert "worker 0 was told to raise" in (record.exc_text or "")


async def test_submit_reraises_the_original_exception_with_remote_traceback(make: Any) -> None:
    """submit() re-raises the handler's exception type with the worker traceback as cause."""
    async with make(w.Raising, size=1) as pool:
        with pytest.raises(ValueError, match="told to raise") as info:
            await pool.submit("raise")
        cause = info.value.__cause__
        assert isinstance(cause, looppool.RemoteTraceback)
        assert "pool_workers.py" in str(cause)
        assert await pool.submit("ok") == "ok"


async def test_unpicklable_exception_becomes_remote_error(make: Any) -> None:
    """An exception that cannot be pickled reaches submit() as RemoteError with its repr."""
    async with make(w.Raising, size=1) as pool:
        with pytest.raises(looppool.RemoteError, match="UnpicklableError") as info:
            await pool.submit("unpicklable-exception")
        assert "UnpicklableError" in info.value.type_name
        assert isinstance(info.value.__cause__, looppool.RemoteTraceback)


async def test_unpicklable_message_raises_in_the_caller_and_nothing_is_lost(make: Any) -> None:
    """put/put_nowait/submit/broadcast raise TypeError at once for an unpicklable message."""
    import threading

    async with make(w.Echo) as pool:
        await pool.put("before")
        with pytest.raises(TypeError, match="cannot be pickled"):
            await pool.put(threading.Lock())
        with pytest.raises(TypeError, match="cannot be pickled"):
            pool.put_nowait(lambda: None)
        with pytest.raises(TypeError, match="cannot be pickled"):
            await pool.submit(threading.Lock())
        with pytest.raises(TypeError, match="cannot be pickled"):
            await pool.broadcast(threading.Lock())
        await pool.put("after")
        assert pool.stats().put == 2
    assert sorted(m for _, m in await collect(pool)) == ["after", "before"]


async def test_unpicklable_result_or_reply_fails_only_that_message(
    make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A result or reply that cannot be pickled fails its message with a clear error."""
    caplog.set_level(logging.ERROR)
    async with make(w.Raising, size=1) as pool:
        await pool.put("unpicklable-result")
        with pytest.raises(TypeError, match="reply of process_message could not be pickled"):
            await pool.submit("unpicklable-reply")
        assert await pool.submit("fine") == "fine"
        await pool.drain()
        assert pool.stats().failed == 2
    assert await collect(pool) == [(0, "fine")]
    assert any("pickle" in (r.exc_text or "") for r in caplog.records)


async def test_bad_target_worker_is_rejected(make: Any) -> None:
    """worker= out of range or not an int raises at the call, and nothing is accepted."""
    async with make(w.Echo) as pool:
        with pytest.raises(ValueError, match="out of range"):
            await pool.put(1, worker=2)
        with pytest.raises(TypeError, match="int or None"):
            pool.put_nowait(1, worker="0")  # type: ignore[arg-type]
        assert pool.stats().put == 0


async def test_initialise_failure_raises_worker_start_error_and_leaves_no_process(
    make: Any,
) -> None:
    """An initialise() that raises makes start() raise WorkerStartError; no process stays."""
    pool = make(w.FailingInit, size=2)
    with pytest.raises(looppool.WorkerStartError, match="cannot open the database") as info:
        await pool.start()
    assert info.value.number == 1
    assert "RuntimeError" in info.value.remote_traceback
    assert all(pid is None for pid in pool.pids)
    with pytest.raises(looppool.PoolClosed):
        pool.put_nowait(1)


async def test_failed_start_leaves_no_unretrieved_worker_error(make: Any) -> None:
    """Every worker failing at start: start() raises one error; none is left unretrieved."""
    unretrieved: list[str] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: unretrieved.append(context["message"]))
    try:
        pool = make(w.FailsEverywhere, size=3)
        with pytest.raises(looppool.WorkerStartError):
            await pool.start()
        del pool
        gc.collect()  # an unretrieved future's exception is reported when it is collected
    finally:
        loop.set_exception_handler(None)
    assert unretrieved == []


async def test_factory_returning_a_non_worker_fails_start(make: Any) -> None:
    """A factory whose product is not a Worker fails start with a clear error."""
    with pytest.raises(looppool.WorkerStartError, match=r"not an instance of looppool\.Worker"):
        async with make(w.make_not_a_worker, size=1):
            pass


def test_constructor_rejects_bad_arguments() -> None:
    """Bad constructor arguments raise at once, naming the argument."""
    with pytest.raises(ValueError, match="size"):
        looppool.Pool(w.Echo, size=0)
    with pytest.raises(ValueError, match="loop"):
        looppool.Pool(w.Echo, loop="trio")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distribution"):
        looppool.Pool(w.Echo, distribution="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="start_method"):
        looppool.Pool(w.Echo, start_method="thread")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="does not derive"):
        looppool.Pool(w.NotAWorker)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cannot be pickled"):
        looppool.Pool(lambda: w.Echo(), start_method="spawn")
    with pytest.raises(ValueError, match="concurrency"):
        looppool.Pool(w.Echo, concurrency=0)


# -- processes ----------------------------------------------------------------------


async def test_workers_ignore_sigint_and_sigterm(make_process: Any) -> None:
    """SIGINT and SIGTERM sent to a worker leave it running: only the parent decides."""
    async with make_process(w.Info, size=1) as pool:
        assert await pool.submit("signals") == (True, True)
        pid = await pool.submit("pid")
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
        assert await pool.submit("pid") == pid
        assert pool.stats().respawns == 0


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
async def test_worker_loop_kind(start_method: str, kind: str) -> None:
    """loop= selects the event loop the workers run."""
    async with looppool.Pool(w.Info, size=1, loop=kind, start_method=start_method) as pool:
        module = await pool.submit("loop")
    assert module.startswith("uvloop" if kind == "uvloop" else "asyncio")


async def test_forkserver_start_method(loop_kind: str) -> None:
    """The forkserver start method works like the others."""
    async with looppool.Pool(w.Echo, size=2, start_method="forkserver", loop=loop_kind) as pool:
        assert await pool.submit(5) == 5
        assert pool.start_method == "forkserver"


async def test_worker_logs_reach_the_parent_tagged_with_the_worker(
    make_process: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Log records of workers, exceptions included, reach the parent's logging."""
    caplog.set_level(logging.INFO)
    async with make_process(w.Info) as pool:
        await pool.submit("log", worker=1)
        await pool.submit("log-error", worker=0)
    [hello] = [r for r in caplog.records if "hello from worker" in r.getMessage()]
    assert hello.name == "tests.worker"
    assert hello.getMessage() == "[worker 1] hello from worker 1"
    assert hello.worker == 1  # type: ignore[attr-defined]
    assert hello.process != os.getpid()
    [failed] = [r for r in caplog.records if "it failed in" in r.getMessage()]
    assert "KeyError: 'missing'" in (failed.exc_text or "")


async def test_stats_and_repr_describe_the_pool(make: Any) -> None:
    """stats() counts traffic; repr() names the state and size."""
    async with make(w.Raising) as pool:
        assert "running, 2 workers" in repr(pool)
        await pool.put(1)
        await pool.put("raise")
        await pool.broadcast(2)
        await pool.drain()
        stats = pool.stats()
    assert (stats.put, stats.processed, stats.failed, stats.results) == (4, 3, 1, 3)
    assert stats.in_flight == (0, 0)
    assert "stopped" in repr(pool)


async def test_pids_are_the_worker_processes(make_process: Any) -> None:
    """pool.pids lists the live worker processes, which are gone after stop."""
    async with make_process(w.Info) as pool:
        pids = pool.pids
        assert sorted(pids) == sorted([await pool.submit("pid", worker=k) for k in range(2)])  # type: ignore[type-var]
    for pid in pids:
        assert pid is not None
        assert not psutil.pid_exists(pid)


async def test_barrier_mode_aligns_stateful_workers(make: Any) -> None:
    """The seed's Barrier: while workers process, each round still gives every worker one."""
    async with make(w.SafeSlow, size=3, distribution="barrier") as pool:
        for i in range(3 * 5):
            await pool.put(i)
    by_message = {m: n for n, m in await collect(pool)}
    for round_start in range(0, 15, 3):
        assert {by_message[i] for i in range(round_start, round_start + 3)} == {0, 1, 2}


@pytest.mark.parametrize("size", [2, 8])
async def test_state_put_to_each_worker_comes_before_later_shared_messages(
    make: Any, distribution: str, size: int
) -> None:
    """The seed's stateful test: a message put to a worker starts there before later ones."""
    async with make(w.StateHolder, size=size, distribution=distribution) as pool:
        for i in range(size):
            pool.put_nowait(("set", i), worker=size - i - 1)
        for _ in range(size):
            pool.put_nowait(("get",))
    answers = await collect(pool)
    # Each worker answered its shared message with the state it was sent first.
    assert all(state + number == size - 1 for number, state in answers), answers
    assert len(answers) == size


async def test_shared_messages_waiting_for_directed_ones_do_not_fill_the_window(
    make: Any,
) -> None:
    """Barrier mode: shared messages a worker took and holds back leave room for those awaited."""
    pool = make(w.SafeSlow, size=1, distribution="barrier", concurrency=2)
    async with pool:
        for i in range(3):  # the third waits in the parent: the window holds two
            pool.put_nowait(("directed", i), worker=0)
        for i in range(2):  # taken at once, then held back until the third has arrived
            pool.put_nowait(("shared", i))
        async with asyncio.timeout(30):
            await pool.drain()
    assert pool.stats().processed == 5


async def test_a_result_is_not_kept_alive_once_the_caller_dropped_it(make: Any) -> None:
    """results(), on_result and submit() hold no reference to a value they handed out."""
    refs: list[weakref.ref[Any]] = []

    def keep_a_weak_ref(value: Any) -> None:
        refs.append(weakref.ref(value))

    async with make(w.Big) as pool:
        results = pool.results()
        await pool.put(1)
        value = await anext(results)
        ref = weakref.ref(value)
        del value
        await asyncio.sleep(0)
        gc.collect()
        assert ref() is None, "results() keeps the last result alive"
        reply = await pool.submit(1)
        ref = weakref.ref(reply)
        del reply
        # (The loop's handle that woke this task holds the future until the task yields.)
        await asyncio.sleep(0)
        gc.collect()
        assert ref() is None, "submit() keeps its reply alive"
        await anext(results)  # that submit's result
    async with make(w.Big, on_result=keep_a_weak_ref) as pool:
        await pool.put(1)
        await pool.drain()
        gc.collect()
        assert len(refs) == 1
        assert refs[0]() is None, "on_result's caller keeps the result alive"


async def test_stop_while_starting_ends_the_start(make: Any) -> None:
    """stop() called while start() runs in another task ends both; no process stays."""
    pool = make(w.Echo)
    starting = asyncio.ensure_future(pool.start())
    await asyncio.sleep(0)  # let start() spawn the processes
    await pool.stop()
    with pytest.raises(looppool.PoolClosed, match="while the pool was starting"):
        await starting
    assert all(pid is None for pid in pool.pids)


async def test_worker_processes_have_readable_titles(make_process: Any) -> None:
    """With setproctitle installed, ps shows 'looppool: NAME worker N' for each worker."""
    async with make_process(w.Echo, name="crawl") as pool:
        titles = [" ".join(psutil.Process(pid).cmdline()).strip() for pid in pool.pids if pid]
    assert titles == ["looppool: crawl worker 0", "looppool: crawl worker 1"]


TITLE_SCRIPT = """
import asyncio, os, sys
import psutil, looppool
from pool_workers import Echo

async def main():
    async with looppool.Pool(Echo, size=1, start_method="fork", name="crawl") as pool:
        print(" ".join(psutil.Process(pool.pids[0]).cmdline()).strip())

if __name__ == "__main__":
    os.environ["LOOPPOOL_TEST_VAR"] = "changed"  # the first variable at start-up
    asyncio.run(main())
"""


async def test_forked_workers_have_titles_after_the_parent_changed_its_environment() -> None:
    """A parent that changed an existing environment variable still gets titled fork workers."""
    pytest.importorskip("setproctitle")
    # First in the environment: setproctitle finds argv by walking back from environ[0].
    env = {"LOOPPOOL_TEST_VAR": "original", **os.environ, "PYTHONPATH": _tests_path()}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", TITLE_SCRIPT, env=env, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    assert out.decode().strip() == "looppool: crawl worker 0"


def _tests_path() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
