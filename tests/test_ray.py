"""RayPool: the same workers as Ray async actors, on a local Ray instance with 2 CPUs.

Skipped as a whole when Ray is not installed (``pip install 'looppool[ray]'``).

Processes: Ray starts daemons (gcs_server, raylet, log monitor, agents) and a
pool of idle worker processes, all children of this process, which come and
go on Ray's own schedule. The module-scoped ``ray_instance`` fixture starts
Ray once and, at the end, checks that ``ray.shutdown()`` left no process
behind. The conftest's ``no_process_left_behind`` is overridden here by a
version that ignores Ray's daemons and idle workers but still fails a test
after which a looppool actor process (titled ``ray::LooppoolActor``) or any
other child process is still alive.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

# Ray decides at import time whether "localhost" means 127.0.0.1 (this
# setting) or the machine's outward address; with it, every Ray server of the
# test instance listens on 127.0.0.1 only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")

import looppool  # noqa: E402
import ray_workers as w  # noqa: E402
from looppool._bench import main as bench_main  # noqa: E402
from looppool.metrics import StatsdClient  # noqa: E402
from looppool.ray import RayPool  # noqa: E402
from statsd_server import StatsdServer  # noqa: E402

TESTS = Path(__file__).parent
OBJECT_STORE_BYTES = 80 * 1024 * 1024  # near Ray's minimum: the tests move small values
ACTOR_TITLE = "ray::LooppoolActor"
EXIT_DEADLINE = 10.0  # seconds a killed actor's process gets to disappear
DEADLINE = 30.0  # seconds a test waits for something the actors send


def _cmdline(proc: psutil.Process) -> str | None:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return None


def _is_ray_own(cmdline: str) -> bool:
    """Ray's daemons and its idle workers: started, reused and reaped by Ray itself."""
    if cmdline.startswith("ray::"):
        return not cmdline.startswith(ACTOR_TITLE)
    return f"{os.sep}site-packages{os.sep}ray{os.sep}" in cmdline


def _children() -> dict[int, tuple[psutil.Process, str]]:
    found = {}
    for proc in psutil.Process().children(recursive=True):
        cmdline = _cmdline(proc)
        if cmdline is not None and not _is_resource_tracker(proc, cmdline):
            found[proc.pid] = (proc, cmdline)
    return found


def _is_resource_tracker(proc: psutil.Process, cmdline: str) -> bool:
    """multiprocessing's resource tracker: it lives as long as this process, by design.

    The benchmark's test starts one (the limit's children are spawned).
    """
    try:
        return "multiprocessing.resource_tracker" in cmdline and proc.ppid() == os.getpid()
    except psutil.Error:
        return False


def _wait_gone(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Wait (blocking on the processes, not polling in the test) for them to end; kill the rest."""
    _, alive = psutil.wait_procs(procs, timeout=EXIT_DEADLINE)
    for proc in alive:
        proc.kill()
    psutil.wait_procs(alive, timeout=EXIT_DEADLINE)
    return alive


@pytest.fixture(scope="module", autouse=True)
def ray_instance() -> Iterator[None]:
    """A local Ray instance for the module: 2 CPUs, a small object store, no dashboard."""
    if ray.is_initialized():  # pragma: no cover - another module left one running
        pytest.fail("Ray is already initialised in this process; test_ray.py starts its own")
    before = set(_children())
    ray.init(
        address="local",  # a new instance, even if someone ran `ray start` on this machine
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=OBJECT_STORE_BYTES,
        _node_ip_address="127.0.0.1",
        namespace="looppool-tests",
        # The actors import ray_workers as a user's actors import the user's
        # module: from their PYTHONPATH.
        runtime_env={"env_vars": {"PYTHONPATH": str(TESTS)}},
    )
    try:
        node = ray.util.get_node_ip_address()
        if node != "127.0.0.1":  # pragma: no cover - ray was imported before the setting
            pytest.fail(f"the test Ray instance listens on {node}, not only on 127.0.0.1")
        yield
    finally:
        ray.shutdown()
        left = [p for pid, (p, _) in _children().items() if pid not in before]
        alive = _wait_gone(left)
        if alive:
            pytest.fail(f"ray.shutdown() left processes behind: {[p.pid for p in alive]}")


@pytest.fixture(autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Fail the test if a looppool actor, or a child that is not Ray's own, outlives it."""
    before = set(_children())
    yield
    left = [
        proc
        for pid, (proc, cmdline) in _children().items()
        if cmdline.startswith(ACTOR_TITLE) or (pid not in before and not _is_ray_own(cmdline))
    ]
    # A killed actor's process ends a few milliseconds after ray.kill returns.
    alive = _wait_gone(left)
    if alive:
        pytest.fail(f"the test left processes behind: {[_cmdline(p) or p.pid for p in alive]}")


@pytest.fixture
async def gate() -> AsyncIterator[w.Gate]:
    """A latch holding ("hold", x) messages until the test opens it."""
    directory = tempfile.mkdtemp(prefix="lp-")  # short: a Unix socket path has a length limit
    gate = w.Gate(os.path.join(directory, "gate"))
    await gate.serve()
    yield gate
    await gate.close()
    shutil.rmtree(directory)


async def collect(pool: RayPool) -> list[Any]:
    return [result async for result in pool.results()]


# -- results, replies, stop ---------------------------------------------------


async def test_results_of_every_message_reach_the_parent() -> None:
    """Every result put by the actors is yielded by results(), which ends after stop."""
    async with RayPool(w.Echo, 2) as pool:
        for i in range(20):
            await pool.put(i)
    assert sorted(m for _, m in await collect(pool)) == list(range(20))


@pytest.mark.parametrize("worker", [w.Echo, w.SyncEcho])
async def test_submit_returns_the_reply(worker: Any) -> None:
    """submit() returns what process_message returned, for async and plain hooks."""
    async with RayPool(worker, 2) as pool:
        reply = await pool.submit("hi")
    assert reply in ("hi", ("sync", "hi"))


async def test_partial_factory_with_arguments() -> None:
    """A functools.partial of a Worker subclass is a valid worker factory."""
    async with RayPool(functools.partial(w.Scaled, 3), 2) as pool:
        assert await asyncio.gather(*(pool.submit(i) for i in range(4))) == [0, 3, 6, 9]


async def test_safe_worker_stop_processes_everything_queued() -> None:
    """A SafeWorker pool's stop runs every message put before it, beyond the window."""
    pool = RayPool(w.Echo, 2, concurrency=2)
    await pool.start()
    for i in range(50):
        pool.put_nowait(i)
    await pool.stop()
    assert sorted(m for _, m in await collect(pool)) == list(range(50))
    assert pool.stats().processed == 50


async def test_worker_stop_cancels_in_flight_and_drops_queued() -> None:
    """A Worker pool's stop cancels in-flight handlers (finally runs) and drops queued ones."""
    pool = RayPool(w.Cancellable, 1, concurrency=1)
    await pool.start()
    started = pool.results()
    hung = asyncio.ensure_future(pool.submit("hang"))
    assert await anext(started) == (0, "started")
    pool.put_nowait("queued")  # beyond the window of one: waits in the parent
    await pool.stop()
    assert [r async for r in started] == [(0, "cancelled")]
    with pytest.raises(looppool.PoolClosed):
        await hung
    assert pool.stats().lost == 2


async def test_finalise_runs_at_stop() -> None:
    """finalise() runs in every actor at stop, and its results still arrive."""
    pool = RayPool(w.Finalising, 2)
    async with pool:
        pass
    assert sorted(await collect(pool)) == [(0, "finalised"), (1, "finalised")]


async def test_body_exception_stops_without_starting_queued(gate: w.Gate) -> None:
    """An exception in the body of async with propagates; queued messages are lost, not run."""
    pool = RayPool(functools.partial(w.Gated, gate), 1, concurrency=1)
    results = pool.results()

    async def body() -> None:
        async with pool:
            await pool.put(("hold", 0))
            assert await anext(results) == (0, "holding", 0)
            for i in range(5):
                await pool.put(i)  # queued in the parent: the window is one
            gate.open()  # the message in flight may finish: SafeWorker lets it
            raise KeyError("the body failed")

    with pytest.raises(KeyError):
        await body()
    assert [r async for r in results] == [(0, "done", ("hold", 0))]
    assert pool.stats().lost == 5


async def test_stop_is_idempotent_and_put_after_stop_raises() -> None:
    """stop() may be called again; put, submit and broadcast then raise PoolClosed."""
    pool = RayPool(w.Echo, 1)
    with pytest.raises(looppool.PoolClosed, match="not started"):
        pool.put_nowait(1)
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
    with pytest.raises(looppool.PoolClosed, match="already started"):
        await pool.start()


# -- distribution ---------------------------------------------------------------


async def test_n_times_k_messages_are_spread_exactly_k_per_actor() -> None:
    """Fair rounds: n*k shared messages give exactly k to each of the n actors."""
    async with RayPool(w.Echo, 2) as pool:
        for i in range(2 * 7):
            await pool.put(i)
    counts = Counter(number for number, _ in await collect(pool))
    assert counts == {0: 7, 1: 7}


async def test_first_n_and_any_2n_minus_1_consecutive_messages_reach_every_actor() -> None:
    """The first n messages reach each actor once; every 2n-1 consecutive ones reach all."""
    size = 2
    async with RayPool(w.Echo, size) as pool:
        for i in range(30):
            await pool.put(i)
    by_message = {m: n for n, m in await collect(pool)}
    assert {by_message[0], by_message[1]} == {0, 1}
    for start in range(30 - (2 * size - 1) + 1):
        window = {by_message[i] for i in range(start, start + 2 * size - 1)}
        assert window == set(range(size)), f"window starting at {start}"


async def test_directed_messages_and_broadcast_reach_their_actors() -> None:
    """put(worker=k) reaches actor k only; broadcast() reaches every actor exactly once."""
    async with RayPool(w.Stateful, 2) as pool:
        for i in range(4):
            await pool.put(("set", i), worker=1)
        await pool.broadcast(("set", "table-v1"))
        await pool.drain()
        tables = [await pool.submit("get", worker=k) for k in range(2)]
    assert tables == [["table-v1"], [0, 1, 2, 3, "table-v1"]]
    assert sorted(await collect(pool), key=repr) == sorted(
        [(1, 0), (1, 1), (1, 2), (1, 3), (0, "table-v1"), (1, "table-v1")], key=repr
    )


async def test_messages_start_in_the_order_they_were_put() -> None:
    """An actor starts its messages in the order they were dealt, across many batches."""
    async with RayPool(w.Ordered, 1) as pool:
        for i in range(200):
            pool.put_nowait(i)
            if i % 10 == 9:
                # Not synchronisation: yield so that the pool sends a batch
                # (one deliver call) every ten messages, several in flight.
                await asyncio.sleep(0)
        assert await pool.submit("seen") == list(range(200))


# -- back-pressure and concurrency ------------------------------------------------


async def test_put_nowait_raises_queue_full_and_put_waits(gate: w.Gate) -> None:
    """Above max_pending put_nowait raises QueueFull and put waits until room is made."""
    pool = RayPool(functools.partial(w.Gated, gate), 1, max_pending=2)
    async with pool:
        results = pool.results()
        pool.put_nowait(("hold", 0))
        pool.put_nowait(("hold", 1))
        with pytest.raises(looppool.QueueFull, match="max_pending=2"):
            pool.put_nowait("more")
        waiting = asyncio.ensure_future(pool.put("later"))
        assert {await anext(results) for _ in range(2)} == {(0, "holding", 0), (0, "holding", 1)}
        assert not waiting.done()
        gate.open()
        await waiting
    done = sorted((r[2] for r in await collect(pool) if r[1] == "done"), key=repr)
    assert done == sorted([("hold", 0), ("hold", 1), "later"], key=repr)


async def test_concurrency_bounds_messages_in_flight_per_actor(gate: w.Gate) -> None:
    """At most `concurrency` messages run at once in one actor, and that many do."""
    async with RayPool(functools.partial(w.Gated, gate), 1, concurrency=3) as pool:
        results = pool.results()
        for i in range(6):
            await pool.put(("hold", i))
        assert {(await anext(results))[2] for _ in range(3)} == {0, 1, 2}
        assert pool.stats().in_flight == (3,)
        gate.open()
        await pool.drain()
        assert await pool.submit("peak") == 3


async def test_drain_waits_for_messages_and_their_results() -> None:
    """drain() returns once every earlier message is done and its results have arrived."""
    async with RayPool(w.Echo, 2) as pool:
        results = pool.results()
        for i in range(40):
            await pool.put(i)
        await pool.drain()
        stats = pool.stats()
        assert stats.processed == 40
        assert stats.pending == 0
        assert stats.results == 40
        assert sorted([(await anext(results))[1] for _ in range(40)]) == list(range(40))


@pytest.mark.parametrize("kind", ["plain", "async"])
async def test_on_result_receives_every_result(kind: str) -> None:
    """on_result (plain or async) gets every result; results() is refused on such a pool."""
    seen: list[Any] = []

    def plain(value: Any) -> None:
        seen.append(value)

    async def awaited(value: Any) -> None:
        seen.append(value)

    pool = RayPool(w.Echo, 2, on_result=plain if kind == "plain" else awaited)
    async with pool:
        for i in range(10):
            await pool.put(i)
        await pool.drain()
        assert sorted(m for _, m in seen) == list(range(10))
        with pytest.raises(looppool.LooppoolError, match="on_result"):
            await anext(pool.results())


# -- errors -------------------------------------------------------------------------


async def test_submit_reraises_the_original_exception_with_remote_traceback() -> None:
    """A raising handler: submit raises the same type, with the actor's traceback as cause."""
    async with RayPool(w.Raising, 2) as pool:
        with pytest.raises(ValueError, match="was told to raise") as info:
            await pool.submit("raise")
        assert isinstance(info.value.__cause__, looppool.RemoteTraceback)
        assert "ray_workers.py" in str(info.value.__cause__)
        with pytest.raises(looppool.RemoteError, match="UnpicklableError"):
            await pool.submit("unpicklable-exception")
        with pytest.raises(TypeError, match="could not be pickled"):
            await pool.submit("unpicklable-reply")
        with pytest.raises(TypeError):
            await pool.submit("unpicklable-result")
        assert await pool.submit("still fine") == "still fine"
        assert pool.stats().failed == 4


async def test_unpicklable_message_raises_in_the_caller_and_nothing_is_lost() -> None:
    """A message that cannot be pickled raises TypeError in put(); the pool is unaffected."""
    async with RayPool(w.Echo, 2) as pool:
        with pytest.raises(TypeError, match="cannot be pickled"):
            await pool.put(lambda: None)
        with pytest.raises(TypeError, match="cannot be pickled"):
            await pool.submit(lambda: None)
        assert await pool.submit("ok") == "ok"
        assert pool.stats().put == 1


async def test_initialise_failure_raises_worker_start_error_and_leaves_no_actor() -> None:
    """initialise() raising in one actor: start() raises WorkerStartError; every actor is gone."""
    pool = RayPool(w.FailingInit, 2)
    with pytest.raises(looppool.WorkerStartError, match="cannot open the database") as info:
        await pool.start()
    assert info.value.number == 1
    assert "RuntimeError" in info.value.remote_traceback
    assert pool.actors == (None, None)
    # no_process_left_behind checks that no LooppoolActor process survives.


async def test_factory_returning_a_non_worker_fails_start() -> None:
    """A factory whose product is not a Worker fails start() with WorkerStartError."""
    with pytest.raises(looppool.WorkerStartError, match=r"not an instance of looppool\.Worker"):
        async with RayPool(w.make_not_a_worker, 1):
            pass


def test_constructor_rejects_bad_arguments() -> None:
    """Bad sizes, factories, callbacks and actor options fail at construction."""
    with pytest.raises(ValueError, match="size"):
        RayPool(w.Echo, 0)
    with pytest.raises(ValueError, match="concurrency"):
        RayPool(w.Echo, 1, concurrency=0)
    with pytest.raises(ValueError, match="max_pending"):
        RayPool(w.Echo, 1, max_pending=-1)
    with pytest.raises(TypeError, match="does not derive"):
        RayPool(w.NotAWorker, 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on_result"):
        RayPool(w.Echo, 1, on_result=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="max_restarts"):
        RayPool(w.Echo, 1, max_restarts=3)
    with pytest.raises(TypeError, match="max_concurrency"):
        RayPool(w.Echo, 1, max_concurrency=3)
    with pytest.raises(ValueError, match="bogus"):
        RayPool(w.Echo, 1, bogus=1)


def test_import_without_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Ray installed, importing looppool.ray says which extra to install."""
    monkeypatch.setitem(sys.modules, "ray", None)  # makes "import ray" fail
    monkeypatch.delitem(sys.modules, "looppool.ray")
    with pytest.raises(ImportError, match=r"looppool\[ray\]"):
        importlib.import_module("looppool.ray")


# -- observability --------------------------------------------------------------------


async def test_worker_logs_reach_the_parent_tagged_with_the_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Log records made in an actor reach the parent's logging, tagged with its number."""
    caplog.set_level(logging.INFO)
    async with RayPool(w.Logging, 2) as pool:
        await pool.submit("log", worker=1)
        await pool.submit("log-error", worker=0)
        await pool.put("raise", worker=0)
        await pool.drain()
    hello = [r for r in caplog.records if "hello from worker 1" in r.getMessage()]
    assert len(hello) == 1
    assert hello[0].name == "tests.ray_worker"
    assert hello[0].worker == 1  # type: ignore[attr-defined]
    assert hello[0].getMessage().startswith("[worker 1]")
    failed = [r for r in caplog.records if "it failed in 0" in r.getMessage()]
    assert len(failed) == 1
    assert failed[0].levelno == logging.ERROR
    assert "KeyError" in (failed[0].exc_text or "")
    raised = [r for r in caplog.records if r.name == "looppool.worker"]
    assert any("ValueError" in r.getMessage() for r in raised)


async def test_stats_and_repr_describe_the_pool() -> None:
    """stats() is a PoolStats snapshot; repr names the pool and its state; pids and nodes."""
    pool = RayPool(w.Echo, 2, name="echoes")
    assert "'echoes' new" in repr(pool)
    async with pool:
        await pool.submit(1)
        stats = pool.stats()
        assert isinstance(stats, looppool.PoolStats)
        assert (stats.put, stats.processed, stats.results, stats.pending) == (1, 1, 1, 0)
        assert stats.in_flight == (0, 0)
        assert "running" in repr(pool)
        assert all(isinstance(pid, int) for pid in pool.pids)
        assert pool.nodes == ("127.0.0.1", "127.0.0.1")
        assert await pool.submit("pid", worker=1) == pool.pids[1]
    assert "stopped" in repr(pool)
    assert pool.pids == (None, None)


# -- dead actors ----------------------------------------------------------------------


async def test_killed_safe_actor_is_replaced_and_its_messages_redelivered(
    gate: w.Gate, caplog: pytest.LogCaptureFixture
) -> None:
    """ray.kill mid-run: the actor is replaced, what it held runs once more there, rounds resume."""
    caplog.set_level(logging.ERROR)
    async with RayPool(functools.partial(w.Gated, gate), 2) as pool:
        results = pool.results()
        for i in range(4):
            await pool.put(("hold", i))
        holding = [await anext(results) for _ in range(4)]
        assert sorted((n, i) for n, _, i in holding) == [(0, 0), (0, 2), (1, 1), (1, 3)]
        old_pid = pool.pids[0]
        ray.kill(pool.actors[0])
        # What actor 0 held are suspects of its death: they run again on its
        # replacement, one group at a time, alone (the poison-message rule).
        first = await anext(results)
        assert first[:2] == (0, "holding")
        assert first[2] in (0, 2)
        gate.open()
        await pool.drain()
        assert await pool.submit("pid", worker=0) != old_pid
        stats = pool.stats()
        assert (stats.respawns, stats.redelivered, stats.lost) == (1, 2, 0)
        for i in range(6):
            await pool.put(("fair", i))
    rest = await collect(pool)
    done = [m for _, what, m in rest if what == "done"]
    assert sorted(m[1] for m in done if m[0] == "hold") == [0, 1, 2, 3]
    assert Counter(n for n, what, m in rest if what == "done" and m[0] == "fair") == {0: 3, 1: 3}
    assert any(
        "worker 0" in r.getMessage() and "ray.kill" in r.getMessage() for r in caplog.records
    )


async def test_killed_plain_worker_fails_its_submit_with_worker_lost(gate: w.Gate) -> None:
    """A plain Worker's actor killed: the submit it held raises WorkerLost; the pool lives on."""
    async with RayPool(functools.partial(w.GatedWorker, gate), 2) as pool:
        results = pool.results()
        held = asyncio.ensure_future(pool.submit("hold", worker=1))
        assert await anext(results) == (1, "holding")
        ray.kill(pool.actors[1])
        with pytest.raises(looppool.WorkerLost) as info:
            await held
        assert info.value.number == 1
        assert isinstance(info.value.__cause__, ray.exceptions.RayActorError)
        assert await pool.submit("after", worker=1) == "after"
        gate.open()
        stats = pool.stats()
        assert (stats.lost, stats.respawns, stats.redelivered) == (1, 1, 0)


async def test_death_while_stopping_does_not_hang_or_lose(gate: w.Gate) -> None:
    """A SafeWorker actor killed while the pool drains for stop: its message still runs."""
    pool = RayPool(functools.partial(w.Gated, gate), 2)
    await pool.start()
    results = pool.results()
    await pool.put(("hold", 0), worker=0)
    assert await anext(results) == (0, "holding", 0)
    stopping = asyncio.ensure_future(pool.stop())
    ray.kill(pool.actors[0])
    # The replacement receives the message again and says so.
    assert await anext(results) == (0, "holding", 0)
    gate.open()
    await stopping
    assert [r async for r in results] == [(0, "done", ("hold", 0))]
    assert pool.stats().respawns == 1


async def test_message_that_kills_its_actor_twice_is_failed() -> None:
    """A poison message is delivered once more, then failed with WorkerLost; the pool lives on."""
    async with RayPool(w.Fragile, 2) as pool:
        with pytest.raises(looppool.WorkerLost):
            await pool.submit("exit")
        assert await pool.submit("still here") == "still here"
        stats = pool.stats()
        assert (stats.respawns, stats.redelivered, stats.lost) == (2, 1, 1)


async def test_poison_message_fails_alone_among_its_neighbours() -> None:
    """Forty submits, one of them poison: only it fails; its neighbours run again and succeed."""
    import poison_workers as pw

    messages: list[Any] = list(range(40))
    messages[17] = pw.POISON
    async with RayPool(pw.AsyncPoisoned, 2, concurrency=8) as pool:
        outcomes = await asyncio.gather(*(pool.submit(m) for m in messages), return_exceptions=True)
    failed = [i for i, o in enumerate(outcomes) if isinstance(o, BaseException)]
    assert failed == [17]
    assert isinstance(outcomes[17], looppool.WorkerLost)
    assert [o for i, o in enumerate(outcomes) if i != 17] == [m for m in messages if m != pw.POISON]
    assert (pool.stats().processed, pool.stats().lost) == (39, 1)


async def test_crash_loop_breaks_the_pool_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Replacements that keep failing are not started for ever: the pool breaks and says why."""
    marker = tmp_path / "refuse"
    async with RayPool(functools.partial(w.Fragile, str(marker)), 2) as pool:
        marker.touch()
        await pool.put("exit", worker=0)
        with pytest.raises(looppool.PoolBroken, match="failed to start 3 times"):
            await pool.drain()
        with pytest.raises(looppool.PoolBroken):
            await pool.put("x")
    assert any(r.levelno == logging.CRITICAL for r in caplog.records)
    assert pool.actors == (None, None)


async def test_actor_that_cannot_be_created_is_a_start_error() -> None:
    """An actor whose worker module cannot be imported fails start() with WorkerStartError."""
    broken_env = {"env_vars": {"PYTHONPATH": "/nonexistent"}}  # ray_workers is not there
    with pytest.raises(looppool.WorkerStartError, match="its actor died") as info:
        async with RayPool(w.Echo, 1, runtime_env=broken_env):
            pass
    assert info.value.number == 0


async def test_stop_timeout_kills_actors_that_do_not_finish(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """stop(timeout=...) kills actors still busy after the timeout, and logs it."""
    caplog.set_level(logging.WARNING)
    pool = RayPool(w.Stuck, 1)
    await pool.start()
    results = pool.results()
    hung = asyncio.ensure_future(pool.submit("hang"))
    assert await anext(results) == (0, "hanging")
    await pool.stop(timeout=0.5)
    with pytest.raises(looppool.PoolClosed):
        await hung
    assert any("killing worker 0" in r.getMessage() for r in caplog.records)
    assert pool.stats().lost == 1


# -- monitoring: statsd and blocked loops -----------------------------------------------


@pytest.fixture
def statsd_server() -> Iterator[StatsdServer]:
    """A statsd server on 127.0.0.1 (never another interface)."""
    server = StatsdServer()
    yield server
    server.close()


class UnpicklableClient:
    """A statsd client that cannot be pickled (it holds a lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def gauge(self, name: str, value: float) -> None:
        """Drop the value."""


@pytest.mark.parametrize("form", ["address", "client", "factory"])
async def test_actors_send_statsd_gauges_named_as_in_pool(
    statsd_server: StatsdServer, form: str
) -> None:
    """statsd= (address, client or factory): every actor's gauges reach 127.0.0.1, prefixed."""
    port = statsd_server.port
    gauges: dict[str, dict[str, float]] = {"0": {}, "1": {}}  # worker number -> its gauges
    with StatsdClient("127.0.0.1", port) as client:  # pickled to the actors
        statsd = {
            "address": statsd_server.address,
            "client": client,
            "factory": functools.partial(StatsdClient, "127.0.0.1", port),
        }[form]
        async with RayPool(
            w.Echo, 2, name="crawl", statsd=statsd, statsd_prefix="lpt.ray", metrics_interval=0.05
        ) as pool:
            for i in range(3):
                await pool.submit(i, worker=1)
            # Waits on the socket, with a deadline: reports come every 50 ms.
            async with asyncio.timeout(DEADLINE):
                while not gauges["0"] or gauges["1"].get("messages.processed") != 3:
                    for name, (value, kind) in (await statsd_server.akinds()).items():
                        match = re.fullmatch(r"lpt\.ray\.crawl\.worker\.([01])\.(.+)", name)
                        assert match is not None, name
                        seen = gauges[match[1]]
                        # Counters (the message counts) carry each report's increase.
                        seen[match[2]] = value + seen.get(match[2], 0) if kind == "c" else value
    for number in ("0", "1"):
        assert {
            "cpu",
            "rss",
            "maxrss",
            "loop.lag",
            "loop.tasks",
            "messages.in_flight",
            "messages.processed",
            "messages.failed",
        } <= set(gauges[number])
        assert gauges[number]["rss"] > 0
        # Ray runs its actors on uvloop when it is installed (as here: a looppool
        # dependency), and uvloop does not expose its ready queue and timers.
        uvloop = importlib.util.find_spec("uvloop") is not None
        assert ("loop.ready" in gauges[number]) is not uvloop
    assert gauges["1"]["messages.failed"] == 0


async def test_blocked_actor_loop_logs_a_warning_in_the_driver(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """blocking_threshold=: a handler blocking an actor's loop is logged in the driver, counted."""
    caplog.set_level(logging.WARNING, logger="looppool.worker")

    def blocked() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "Event loop blocked" in r.getMessage()]

    async with RayPool(w.Blocking, 2, blocking_threshold=0.2) as pool:
        assert await pool.submit(("block", 1.0), worker=1) == ("block", 1.0)
        # No wait needed: the watchdog logs while the handler blocks, and the
        # record joins the actor's event stream before the handler's reply.
        during = blocked()
        assert any(
            r.worker == 1  # type: ignore[attr-defined]
            and r.getMessage().startswith("[worker 1] Event loop blocked for")
            and "time.sleep(message[1])  # blocks the actor's loop" in r.getMessage()
            for r in during
        ), [r.getMessage() for r in during]
    # Each episode is also an event counted by stats().blocked (one per warning).
    assert pool.stats().blocked == len(blocked()) >= 1


def test_monitoring_options_are_checked_as_pool_checks_them() -> None:
    """Bad statsd/blocking options fail in RayPool's constructor with Pool's very error."""
    bad: list[dict[str, Any]] = [
        {"statsd": "no-port"},
        {"statsd": "127.0.0.1:0"},
        {"statsd": "::1:8125"},
        {"statsd": 42},
        {"statsd": object()},  # neither a client nor a factory
        {"blocking_threshold": 0},
        {"blocking_threshold": -1.0},
        {"statsd": "127.0.0.1:8125", "metrics_interval": 0},
        {"blocking_threshold": 1.0, "metrics_interval": -5},
    ]
    for options in bad:
        with pytest.raises((TypeError, ValueError)) as pool_error:
            looppool.Pool(w.Echo, 1, **options)
        with pytest.raises(type(pool_error.value), match=re.escape(str(pool_error.value))):
            RayPool(w.Echo, 1, **options)
    # What Pool accepts without monitoring, RayPool accepts too.
    RayPool(w.Echo, 1, metrics_interval=0, statsd_prefix="unused")
    with pytest.raises(TypeError, match="cannot be pickled, which Ray needs"):
        RayPool(w.Echo, 1, statsd=UnpicklableClient())


# -- the benchmark's Ray rows ---------------------------------------------------------------


def test_bench_ray_rows_run_in_a_tiny_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """looppool bench's looppool-ray and ray-call rows run on this Ray instance and give numbers."""
    out_file = tmp_path / "bench.json"
    status = bench_main(
        [
            "--quick",
            "--repeat",
            "1",
            "--workloads",
            "W1,W4",
            "--systems",
            "limit-asyncio,looppool-ray,ray-call",
            "--json",
            str(out_file),
        ]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    report = json.loads(out_file.read_text())
    assert report["failed"] == []
    assert report["not_run"] == {}
    assert report["leftover_processes"] == []
    rows = {(r["workload"], r["system"]): r for r in report["results"]}
    assert set(rows) == {
        ("W1", "limit-asyncio"),
        ("W1", "looppool-ray"),
        ("W4", "limit-asyncio"),
        ("W4", "looppool-ray"),
        ("W4", "ray-call"),  # round trips only: no W1 row
    }
    w1, w4, floor = rows["W1", "looppool-ray"], rows["W4", "looppool-ray"], rows["W4", "ray-call"]
    assert w1["count"] == 400
    assert [rate > 0 for rate in w1["rate"]] == [True]
    assert [0 < p50 <= p99 for p50, p99 in zip(w4["p50_us"], w4["p99_us"], strict=True)] == [True]
    assert [p50 > 0 for p50 in floor["p50_us"]] == [True]
    # In each table, with ratios to the limit, and a footnote saying where Ray ran.
    rows_shown = [x for x in out.splitlines() if re.match(r"\s+looppool-ray\s+[0-9]", x)]
    assert len(rows_shown) == 2
    assert all(re.search(r"\d\.\d\dx", x) for x in rows_shown), rows_shown
    assert "the Ray instance this process was already connected to" in out
    assert "looppool-ray ÷ ray-call" in out
    assert ray.is_initialized()  # the bench leaves a connection it did not make alone


@pytest.mark.parametrize(("size", "noun"), [(1, "1 actor,"), (2, "2 actors,")])
def test_ray_pool_repr_counts_actors_in_words(size: int, noun: str) -> None:
    """A RayPool's repr says "1 actor", "2 actors" (checked before start: no Ray instance)."""
    pool = RayPool(w.Echo, size, name="echoes")
    assert f"'echoes' new, {noun} 0 in flight" in repr(pool)


# -- plain functions: a FunctionWorker RayPool ------------------------------------------------

import contextlib  # noqa: E402

import function_workers as fw  # noqa: E402


@pytest.fixture
async def turnstile() -> AsyncIterator[fw.Turnstile]:
    """A Turnstile served by the test: calls wait at it until let through."""
    directory = tempfile.mkdtemp(prefix="lp-")  # short: a Unix socket path is limited
    gate = fw.Turnstile(os.path.join(directory, "turnstile"))
    await gate.serve()
    yield gate
    gate.open()
    await gate.close()
    shutil.rmtree(directory)


async def test_run_calls_plain_and_async_functions_in_actors() -> None:
    """run() returns what a function returned, or raises what it raised, from an actor."""
    async with RayPool(looppool.FunctionWorker, 2) as pool:
        assert await pool.run(fw.add, 1, 2, z=3) == 6
        assert await pool.run(fw.async_add, 1, 2, z=3) == 6
        with pytest.raises(ValueError, match="no good") as caught:
            await pool.run(fw.async_fail, "no good")
        assert isinstance(caught.value.__cause__, looppool.RemoteTraceback)
        with pytest.raises(TypeError, match="top level of a module"):
            await pool.run(lambda: 0)


async def test_map_and_starmap_in_actors() -> None:
    """map() and starmap() yield every result from the actors, in order or as completed."""
    async with RayPool(looppool.FunctionWorker, 2) as pool:
        assert [r async for r in pool.map(fw.square, range(20))] == [i * i for i in range(20)]
        got = [r async for r in pool.map(fw.async_square, range(20), ordered=False)]
        assert sorted(got) == [i * i for i in range(20)]
        pairs = [(i, i) for i in range(5)]
        assert [r async for r in pool.starmap(fw.add, pairs)] == [0, 2, 4, 6, 8]


async def test_map_window_and_early_exit_in_actors(turnstile: fw.Turnstile) -> None:
    """map()'s window bounds the calls in the actors; leaving it early cancels the rest."""
    async with RayPool(looppool.FunctionWorker, 2) as pool:
        results = pool.map(functools.partial(fw.hold, turnstile), range(50), window=3)
        async with contextlib.aclosing(results):
            first = asyncio.ensure_future(anext(results))
            await turnstile.arrivals(3)
            assert pool.stats().pending == turnstile.waiting == 3
            turnstile.release(0)
            assert await first == 0
        # Left early: its tasks are cancelled and awaited; nothing more is sent.
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("looppool.")]
        turnstile.open()  # what reached an actor runs there: let it end before the stop
    assert pool.stats().put == 3


# -- OpenTelemetry and Prometheus (issue 14) ----------------------------------------------


async def test_a_span_in_the_driver_is_the_parent_of_the_actors_spans(tmp_path: Path) -> None:
    """The trace context crosses to the actors: their process_message spans are its children."""
    pytest.importorskip("opentelemetry.sdk", reason="the OpenTelemetry SDK is not installed")
    from opentelemetry.sdk.trace import TracerProvider

    import tracing_workers as tw

    # The driver's own tracer, not the global one: only the current span matters here.
    tracer = TracerProvider().get_tracer("tests")
    async with RayPool(functools.partial(tw.Traced, str(tmp_path)), 2, name="traced") as pool:
        with tracer.start_as_current_span("driver") as driver:
            replies = await asyncio.gather(*(pool.submit(i) for i in range(4)))
            await pool.broadcast("b")
            await pool.drain()
    context = driver.get_span_context()
    spans = tw.read_spans(tmp_path)
    consumers = [s for s in spans if s["attributes"].get("messaging.system") == "looppool"]
    assert len(consumers) == 6
    assert {s["pid"] for s in consumers} == set(replies)  # the actors' processes
    for span in consumers:
        assert span["name"] == "Traced process_message"
        assert span["kind"] == "SpanKind.CONSUMER"
        assert span["context"]["trace_id"] == f"0x{context.trace_id:032x}"
        assert span["parent_id"] == f"0x{context.span_id:016x}"
        assert span["attributes"]["messaging.destination.name"] == "traced"
        assert span["attributes"]["looppool.delivery_count"] == 1
    assert sorted(s["attributes"]["looppool.worker"] for s in consumers) == [0, 0, 0, 1, 1, 1]


async def test_actors_forward_their_gauges_to_the_collector() -> None:
    """worker_metrics=True: each actor's gauges reach the driver and its Prometheus scrape."""
    pytest.importorskip("prometheus_client", reason="prometheus_client is not installed")
    from prometheus_client import CollectorRegistry, generate_latest

    from looppool.metrics import PrometheusCollector

    async with RayPool(w.Echo, 2, name="gauged", worker_metrics=True) as pool:
        await pool.submit(1)
        metrics = pool.worker_metrics()
        registry = CollectorRegistry()
        registry.register(PrometheusCollector(pool))
        text = generate_latest(registry).decode()
    assert sorted(metrics) == [0, 1]
    assert all(m["rss"] > 0 for m in metrics.values())
    assert 'looppool_messages_processed_total{pool="gauged"} 1.0' in text
    for number in (0, 1):
        assert f'looppool_worker_rss_bytes{{pool="gauged",worker="{number}"}}' in text


# -- work that does not progress: deadlines, cancellation, hangs, recycling -------------------

import limit_workers as lw  # noqa: E402


async def test_message_timeout_cancels_the_handler_in_the_actor() -> None:
    """Past message_timeout the actor cancels the handler (finally runs); submit: MessageTimeout."""
    async with RayPool(lw.Slow, 2, message_timeout=0.3) as pool:
        results = pool.results()
        with pytest.raises(looppool.MessageTimeout) as info:
            await pool.submit(("sleep", 3600))
        assert info.value.timeout == 0.3
        assert await pool.submit(("sleep", 0), timeout=5) == "slept"
        assert pool.stats().timed_out == 1
        await pool.stop()
    assert Counter(r[0] for r in [r async for r in results]) == {"finally": 2}


async def test_a_cancelled_submit_is_cancelled_in_the_actor() -> None:
    """Cancelling the task awaiting submit() cancels the handler running in the actor."""
    async with RayPool(lw.Slow, 1) as pool:
        results = pool.results()
        running = asyncio.ensure_future(pool.submit(("sleep", 3600)))
        echoed = await pool.submit(("echo", 1))  # the actor runs both at once
        assert echoed == 1
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        await pool.drain()  # does not wait for the cancelled message
        assert (pool.stats().cancelled, pool.stats().pending) == (1, 0)
        await pool.stop()
    assert ("finally", 3600) in [r async for r in results]


async def test_a_blocked_actor_is_killed_and_replaced(caplog: pytest.LogCaptureFixture) -> None:
    """hang_timeout: an actor whose loop is blocked for ever is killed and replaced."""
    caplog.set_level(logging.ERROR)
    async with RayPool(lw.SlowWorker, 2, hang_timeout=1.0) as pool, asyncio.timeout(DEADLINE * 2):
        pids = pool.pids
        with pytest.raises(looppool.WorkerLost):
            await pool.submit(("block", 10**6), worker=0)
        assert await pool.submit(("echo", 3), worker=0) == 3
        assert pool.stats().hung == 1
        assert pool.pids[0] != pids[0]
        assert pool.pids[1] == pids[1]
    assert any("hang_timeout=1" in r.getMessage() for r in caplog.records)


async def test_an_actor_stuck_in_initialise_is_killed_at_start_timeout(tmp_path: Path) -> None:
    """start_timeout: an actor whose initialise() never ends is killed; start() fails, none left."""
    base = str(tmp_path / "hang")
    lw.hang_starts(base, 1)
    pool = RayPool(functools.partial(lw.SlowStart, base), 2, start_timeout=10.0)
    with pytest.raises(looppool.WorkerStartError, match="start_timeout=10 s"):
        async with asyncio.timeout(DEADLINE * 2):
            await pool.start()
    assert pool.actors == (None, None)


async def test_a_replacement_actor_stuck_in_initialise_is_replaced(tmp_path: Path) -> None:
    """start_timeout: a replacement actor hanging in initialise() is killed; the next one serves."""
    base = str(tmp_path / "hang")
    async with (
        RayPool(functools.partial(lw.SlowStart, base), 1, start_timeout=10.0) as pool,
        asyncio.timeout(DEADLINE * 2),
    ):
        pid = await pool.submit(("pid", None))
        lw.hang_starts(base, 1)
        ray.kill(pool.actors[0])
        assert await pool.submit(("pid", None)) != pid  # the second replacement's
        assert not Path(f"{base}.0").exists()  # noqa: ASYNC240 (a replacement claimed the hang)
        assert pool.stats().respawns == 2


async def test_actors_are_recycled_after_n_messages() -> None:
    """max_messages_per_worker: actors are replaced one at a time; every message runs once."""
    count = 400
    async with RayPool(lw.Slow, 2, max_messages_per_worker=100) as pool:
        old = pool.pids
        for i in range(count):
            await pool.put(("echo", i))
        await pool.drain()
        # A message to a retiring actor waits for its replacement: at least
        # one of these is answered by a new actor.
        new = await asyncio.gather(*(pool.submit(("pid", None), worker=n) for n in (0, 1)))
        assert tuple(new) != old
        stats = pool.stats()
        assert (stats.processed, stats.lost, stats.failed, stats.respawns) == (count + 2, 0, 0, 0)
        assert stats.recycled >= 1
        await pool.stop()
    runs = Counter(r[1] for r in [r async for r in pool.results()])
    assert runs == Counter(range(count))
