"""Plain functions without a Worker class: FunctionWorker, pool.run(), map() and starmap().

Through the public API, under fork and spawn and on InlinePool; the calls that
must be held in flight wait at a Turnstile (function_workers.py) that the test
opens key by key, so nothing here waits on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import importlib
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import function_workers as fw
import looppool
import pool_workers
from looppool.testing import InlinePool


@pytest.fixture(params=["rounds", "barrier"])
def distribution(request: pytest.FixtureRequest) -> str:
    """How shared messages are dealt: the parent's rounds, or the seed's Barrier."""
    return str(request.param)


@pytest.fixture(params=["fork", "spawn", "inline"])
def make(request: pytest.FixtureRequest, loop_kind: str) -> Any:
    """Build a FunctionWorker pool: processes under fork or spawn, or an InlinePool."""
    backend = request.param

    def build(worker: Any = looppool.FunctionWorker, size: int = 2, **options: Any) -> Any:
        if backend == "inline":
            return InlinePool(worker, size=size, **options)
        options.setdefault("start_method", backend)
        options.setdefault("loop", loop_kind)
        return looppool.Pool(worker, size=size, **options)

    return build


@pytest.fixture
async def turnstile() -> AsyncIterator[fw.Turnstile]:
    """A Turnstile served by the test: calls wait at it until let through."""
    directory = tempfile.mkdtemp(prefix="lp-")  # short: a Unix socket path is limited
    gate = fw.Turnstile(os.path.join(directory, "turnstile"))
    await gate.serve()
    try:
        yield gate
    finally:
        await gate.close()
        shutil.rmtree(directory)


def map_tasks() -> set[asyncio.Task[Any]]:
    """The tasks of map() and starmap() still alive (they are named after their call)."""
    return {t for t in asyncio.all_tasks() if t.get_name().startswith("looppool.")}


async def settle() -> None:
    """Wait until no task of map() is left (a deadline makes a leaked task fail, not hang)."""
    async with asyncio.timeout(30):
        while tasks := map_tasks():
            await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def open_at_exit(turnstile: fw.Turnstile) -> AsyncIterator[None]:
    """Open the turnstile on the way out, failing or not: the pool's stop waits for its calls.

    (Calls that reached a worker run there even when the task awaiting them
    is cancelled.)
    """
    try:
        yield
    finally:
        turnstile.open()


async def consume(results: AsyncIterator[Any], into: list[Any]) -> None:
    """Append every result to ``into`` (what was yielded before an exception stays there)."""
    async for result in results:
        into.append(result)


async def release_when_arrived(turnstile: fw.Turnstile, key: int) -> None:
    """Let ``key`` through the turnstile as soon as its call arrives there."""
    while key not in turnstile.arrived:
        await turnstile.arrivals(len(turnstile.arrived) + 1)
    turnstile.release(key)


# -- run ----------------------------------------------------------------------------


async def test_run_returns_what_a_function_returns(make: Any, distribution: str) -> None:
    """run() returns a plain function's value, and an async function's awaited value."""
    async with make(distribution=distribution) as pool:
        assert await pool.run(fw.square, 7) == 49
        assert await pool.run(fw.add, 1, 2, z=3) == 6
        assert await pool.run(fw.async_add, 1, 2, z=3) == 6
        assert await pool.run(fw.returns_awaitable, 5) == 25
        assert await pool.run(functools.partial(fw.add, 10), 1) == 11
        assert await pool.run(divmod, 7, 2) == (3, 1)  # a builtin travels by name too
        many = await asyncio.gather(*(pool.run(fw.async_square, i) for i in range(20)))
        assert many == [i * i for i in range(20)]


@pytest.mark.parametrize("fn", [fw.fail, fw.async_fail])
async def test_run_raises_what_the_function_raised(make: Any, fn: Any) -> None:
    """The function's exception is raised by run(), with the worker's traceback as __cause__."""
    async with make() as pool:
        with pytest.raises(ValueError, match=r"^no good$") as caught:
            await pool.run(fn, "no good")
        cause = caught.value.__cause__
        assert isinstance(cause, looppool.RemoteTraceback)
        assert f"in {fn.__name__}" in str(cause)
        assert await pool.run(fw.square, 3) == 9  # the worker keeps working
    assert pool.stats().failed == 1


async def test_unpicklable_exception_becomes_remote_error(make: Any) -> None:
    """An exception that cannot be pickled reaches the caller as RemoteError, with its text."""
    async with make() as pool:
        with pytest.raises(looppool.RemoteError, match="UnpicklableError"):
            await pool.run(fw.raise_unpicklable)


async def test_unpicklable_result_raises_type_error(make: Any) -> None:
    """A return value that cannot be pickled fails that call with TypeError."""
    async with make() as pool:
        with pytest.raises(TypeError, match="could not be pickled"):
            await pool.run(fw.unpicklable_result)
        assert await pool.run(fw.square, 2) == 4


async def test_unpicklable_function_raises_type_error_in_the_caller(make: Any) -> None:
    """A lambda or a local function raises TypeError at run(), saying what to pass instead."""

    def local(x: int) -> int:
        return x

    async with make() as pool:
        for fn in (lambda x: x, local):
            with pytest.raises(TypeError, match="cannot be pickled") as caught:
                await pool.run(fn, 1)
            text = str(caught.value)
            assert "top level of a module" in text
            assert "functools.partial" in text
        assert pool.stats().put == 0  # nothing was sent


async def test_unpicklable_argument_raises_type_error_in_the_caller(make: Any) -> None:
    """An argument that cannot be pickled raises TypeError at run(), naming the call."""
    async with make() as pool:
        with pytest.raises(TypeError, match=r"call of function_workers\.square"):
            await pool.run(fw.square, threading.Lock())
        assert pool.stats().put == 0


async def test_a_function_the_worker_cannot_import_fails_with_import_error(
    make: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A function whose module the workers cannot import fails that call with ImportError."""
    async with make() as pool:
        # Importable in the parent only: its directory joins sys.path after
        # the workers started (a forked worker copied sys.path at start, a
        # spawned one was given it then).
        (tmp_path / "late_module.py").write_text("def late():\n    return 'late'\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        try:
            late = importlib.import_module("late_module").late
            if isinstance(pool, InlinePool):
                assert await pool.run(late) == "late"  # one process: it is importable
                return
            with pytest.raises(ImportError, match=r"could not load the function late_module\.late"):
                await pool.run(late)
        finally:
            sys.modules.pop("late_module", None)
        assert await pool.run(fw.square, 2) == 4


async def test_run_on_a_pool_of_another_worker_raises_type_error(make: Any) -> None:
    """run(), map() and starmap() on a pool of another worker raise TypeError at the call."""
    async with make(pool_workers.Echo) as pool:
        with pytest.raises(TypeError, match=r"looppool\.Pool\(looppool\.FunctionWorker"):
            await pool.run(fw.square, 1)
        with pytest.raises(TypeError, match=r"needs a pool of looppool\.FunctionWorker"):
            pool.map(fw.square, [1])
        with pytest.raises(TypeError, match=r"pool_workers\.Echo"):
            pool.starmap(fw.add, [(1, 2)])
        assert pool.stats().put == 0


async def test_function_worker_refuses_other_messages(make: Any) -> None:
    """A FunctionWorker pool's submit() of anything but a call fails, pointing to run()."""
    async with make() as pool:
        with pytest.raises(TypeError, match=r"runs the calls of pool\.run\(\)"):
            await pool.submit("not a call")


async def test_a_function_worker_subclass_initialises_its_workers(make: Any) -> None:
    """A FunctionWorker subclass (and a partial of one) runs its initialise() before the calls."""
    async with make(functools.partial(fw.Configured, "tuned"), size=1) as pool:
        assert await pool.run(fw.configured) == "tuned in worker 0"
        assert [r async for r in pool.map(fw.square, [1, 2])] == [1, 4]


async def test_inline_pool_without_pickling_runs_a_lambda() -> None:
    """InlinePool(pickle=False) hands the function over as it is, a lambda included."""
    async with InlinePool(looppool.FunctionWorker, pickle=False) as pool:
        assert await pool.run(lambda x: x + 1, 1) == 2
        assert [r async for r in pool.map(lambda x: -x, [1, 2])] == [-1, -2]


async def test_a_call_that_kills_its_worker_fails_alone(
    start_method: str, loop_kind: str, turnstile: fw.Turnstile
) -> None:
    """A call that kills its process fails with WorkerLost; its neighbour runs again and returns."""
    pool = looppool.Pool(looppool.FunctionWorker, size=1, start_method=start_method, loop=loop_kind)
    async with pool, open_at_exit(turnstile):
        neighbour = asyncio.ensure_future(pool.run(fw.hold, turnstile, 7))
        await turnstile.arrivals(1)
        poison = asyncio.ensure_future(pool.run(fw.die))
        await turnstile.arrivals(2)  # the neighbour runs again, alone, on a replacement
        turnstile.open()
        assert await neighbour == 7
        with pytest.raises(looppool.WorkerLost):
            await poison
    assert pool.stats().respawns >= 2


# -- map and starmap -------------------------------------------------------------------


async def test_map_yields_every_result(make: Any, distribution: str) -> None:
    """map() and starmap() yield one result per item, for plain and async functions."""
    async with make(distribution=distribution) as pool:
        assert [r async for r in pool.map(fw.square, range(30))] == [i * i for i in range(30)]
        got = [r async for r in pool.map(fw.async_square, range(30), ordered=False)]
        assert sorted(got) == [i * i for i in range(30)]
        pairs = [(i, 2 * i) for i in range(10)]
        assert [r async for r in pool.starmap(fw.add, pairs)] == [3 * i for i in range(10)]
        assert [r async for r in pool.starmap(fw.async_add, pairs, window=2)] == [
            3 * i for i in range(10)
        ]


@pytest.mark.parametrize("ordered", [True, False])
async def test_map_orders_results_as_asked(
    make: Any, turnstile: fw.Turnstile, ordered: bool
) -> None:
    """ordered=True yields in input order; ordered=False as the calls finish.

    One worker, so its replies come back in the order its calls finished:
    call 0 is held until the test lets it through, the four after it return
    at once.
    """
    items = [(turnstile, key == 0, key) for key in range(5)]
    async with make(size=1) as pool, open_at_exit(turnstile):
        # Call 0 is let through once it has arrived at the turnstile, which is
        # after the worker started the calls after it, which return at once.
        releaser = asyncio.ensure_future(release_when_arrived(turnstile, 0))
        got = [r async for r in pool.starmap(fw.hold_if, items, ordered=ordered)]
        await releaser
    assert got == ([0, 1, 2, 3, 4] if ordered else [1, 2, 3, 4, 0])


@pytest.mark.parametrize("ordered", [True, False])
async def test_map_bounds_the_calls_in_flight_by_its_window(
    make: Any, turnstile: fw.Turnstile, ordered: bool
) -> None:
    """At most `window` calls are in flight, and the window stays full while items remain."""
    window, count = 3, 8
    async with make() as pool, open_at_exit(turnstile):
        results = pool.map(functools.partial(fw.hold, turnstile), range(count), window=window)
        async with contextlib.aclosing(results):
            for key in range(count):
                step = asyncio.ensure_future(anext(results))
                arrived = await turnstile.arrivals(min(key + window, count))
                # Every call the window allows has arrived, and it allows no more:
                assert pool.stats().pending == turnstile.waiting == min(window, count - key)
                turnstile.release(key)  # the oldest call in flight: next in either order
                assert await step == key
            assert sorted(arrived) == list(range(count))
            with pytest.raises(StopAsyncIteration):
                await anext(results)
    assert turnstile.peak == window


@pytest.mark.parametrize(("concurrency", "max_pending", "expected"), [(3, 100, 6), (3, 4, 4)])
async def test_map_default_window_fills_every_worker(
    make: Any, turnstile: fw.Turnstile, concurrency: int, max_pending: int, expected: int
) -> None:
    """The default window is size x concurrency calls, and never above max_pending."""
    async with (
        make(size=2, concurrency=concurrency, max_pending=max_pending) as pool,
        open_at_exit(turnstile),
    ):
        results = pool.map(functools.partial(fw.hold, turnstile), range(20))
        async with contextlib.aclosing(results):
            first = asyncio.ensure_future(anext(results))
            await turnstile.arrivals(expected)
            assert pool.stats().pending == expected
            turnstile.open()
            assert await first == 0
            assert [r async for r in results] == list(range(1, 20))
    assert turnstile.peak == expected


async def test_map_of_nothing_yields_nothing(make: Any) -> None:
    """An empty iterable, sync or async, ends the iteration at once; nothing is sent."""

    async def empty() -> AsyncIterator[int]:
        return
        yield

    async with make() as pool:
        assert [r async for r in pool.map(fw.square, [])] == []
        assert [r async for r in pool.map(fw.square, empty())] == []
        assert [r async for r in pool.starmap(fw.add, iter([]))] == []
        assert pool.stats().put == 0


@pytest.mark.parametrize("source", ["sync", "async"])
async def test_map_pulls_items_lazily(make: Any, turnstile: fw.Turnstile, source: str) -> None:
    """Items are pulled from the iterable only as the window has room, sync or async."""
    pulled: list[int] = []

    def numbers() -> Iterator[int]:
        for i in range(10):
            pulled.append(i)
            yield i

    async def async_numbers() -> AsyncIterator[int]:
        for i in numbers():
            await asyncio.sleep(0)  # a real suspension between items
            yield i

    items = numbers() if source == "sync" else async_numbers()
    async with make() as pool, open_at_exit(turnstile):
        results = pool.map(functools.partial(fw.hold, turnstile), items, window=2)
        assert pulled == []  # nothing is pulled before the iteration starts
        async with contextlib.aclosing(results):
            first = asyncio.ensure_future(anext(results))
            await turnstile.arrivals(2)
            assert pulled == [0, 1]
            turnstile.open()
            assert await first == 0
            assert [r async for r in results] == list(range(1, 10))


async def test_an_async_iterable_feeds_map_while_results_flow(
    make: Any, turnstile: fw.Turnstile
) -> None:
    """A slow async source does not hold back results of the calls already made."""
    more = asyncio.Event()

    async def source() -> AsyncIterator[int]:
        yield 0
        await more.wait()  # the next item comes only after result 0 was yielded
        yield 1

    async with make() as pool, asyncio.timeout(30):
        results = pool.map(fw.square, source())
        assert await anext(results) == 0
        more.set()
        assert [r async for r in results] == [1]


@pytest.mark.parametrize("ordered", [True, False])
async def test_map_error_ends_the_iteration(make: Any, ordered: bool) -> None:
    """The first call that raises ends map() with its exception; nothing is left running."""
    async with make() as pool:
        got = []
        results = pool.map(functools.partial(fw.fail_on, 3), range(50), ordered=ordered, window=8)
        with pytest.raises(ValueError, match="3 is bad") as caught:
            await consume(results, got)
        assert isinstance(caught.value.__cause__, looppool.RemoteTraceback)
        if ordered:
            assert got == [0, 1, 2]  # raised where its result would have been
        assert 3 not in got
        assert map_tasks() == set()  # cancelled and awaited before the error was raised
        await pool.drain()
    assert pool.stats().failed == 1


@pytest.mark.parametrize("ordered", [True, False])
async def test_map_raises_the_iterables_error(make: Any, ordered: bool) -> None:
    """An exception from the iterable ends map(): in order after the results before it."""

    def items() -> Iterator[int]:
        yield from range(3)
        raise KeyError("the source failed")

    async with make() as pool:
        got = []
        with pytest.raises(KeyError, match="the source failed"):
            await consume(pool.map(fw.square, items(), ordered=ordered), got)
        if ordered:
            assert got == [0, 1, 4]
        assert map_tasks() == set()


async def test_starmap_item_that_is_not_a_tuple_raises_type_error(make: Any) -> None:
    """starmap() needs argument tuples: an item that is not iterable is a TypeError, at its turn."""
    async with make() as pool:
        got = []
        with pytest.raises(TypeError, match="argument tuples, and one item is 5"):
            await consume(pool.starmap(fw.add, [(1, 2), 5, (3, 4)]), got)
        assert got == [3]


@pytest.mark.parametrize("how", ["break", "aclosing"])
async def test_leaving_map_early_leaves_no_task_behind(
    make: Any, distribution: str, turnstile: fw.Turnstile, how: str, caplog: Any
) -> None:
    """break (or aclosing) out of map() cancels the calls in flight; no task or error remains."""
    pool = make(distribution=distribution)
    async with pool, open_at_exit(turnstile):
        results = pool.map(functools.partial(fw.hold, turnstile), range(100), window=4)
        releaser = asyncio.ensure_future(release_when_arrived(turnstile, 0))
        if how == "aclosing":
            async with contextlib.aclosing(results) as iterator:
                async for result in iterator:
                    first = result
                    break
            # aclose() returned: the calls in flight are cancelled and awaited.
            assert map_tasks() == set()
        else:
            async for result in results:
                first = result
                break
            del results  # the last reference: the loop's asyncgen hook closes it
            # Its calls in flight are held at the turnstile: this waits until
            # the generator's clean-up has cancelled them (or fails at the deadline).
            await settle()
        await releaser
        assert first == 0
    gc.collect()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert pool.stats().put == 4  # the window; nothing was submitted after the break


async def test_map_on_a_stopped_pool_raises_pool_closed(make: Any) -> None:
    """map() of a stopped pool raises PoolClosed when iterated."""
    pool = make()
    async with pool:
        pass
    with pytest.raises(looppool.PoolClosed):
        async for _ in pool.map(fw.square, [1]):
            pass


async def test_bad_arguments_raise_at_the_call() -> None:
    """A function that is not callable, a bad window or a non-iterable raise at the call."""
    async with InlinePool(looppool.FunctionWorker) as pool:
        with pytest.raises(TypeError, match="takes a function to call first, not 5"):
            pool.map(5, [1])
        for window in (0, -1, 1.5, True):
            with pytest.raises(ValueError, match="window must be a positive int or None"):
                pool.map(fw.square, [1], window=window)
        with pytest.raises(TypeError, match="iterable or an async iterable of arguments, not 7"):
            pool.map(fw.square, 7)
        with pytest.raises(TypeError, match="of argument tuples, not None"):
            pool.starmap(fw.add, None)
        with pytest.raises(TypeError, match="run\\(\\) takes a function to call first"):
            await pool.run("square", 1)
        assert pool.stats().put == 0
