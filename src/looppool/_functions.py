"""Plain functions on a pool: :class:`FunctionWorker`, and what ``run``, ``map`` and
``starmap`` of a pool do.

::

  parent                                                worker k (a FunctionWorker)
  ──────                                                ───────────────────────────
  await pool.run(fn, *args, **kwargs)                   process_message(call)
    Call(Function(fn), args, kwargs) ── submit() ────►    fn = call.function.load()
    (fn pickled once, by reference: module + name)        fn(*args, **kwargs) on the loop:
                                                            a plain def runs inline,
                                                            an async def as a task
    its return value, or its exception ◄──────────────── the reply, as for submit()

  async for r in pool.map(fn, items, window=w):
    _Window: at most w calls submitted and not yet yielded; each result
    yielded lets the next item in (pulled lazily, from a sync or async iterable)

All three are sugar over ``submit()``: errors, worker deaths, stop and
``max_pending`` are the pool's. This module is imported by spawned workers (it
defines their class), so it stays light.
"""

from __future__ import annotations

import asyncio
import pickle
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
)
from typing import Any

from ._errors import short_repr
from ._protocol import PROTOCOL
from ._worker import SafeWorker

__all__ = ["FunctionWorker"]

Submit = Callable[[Any], Awaitable[Any]]

_IMPORTABLE = (
    "a worker imports a function by its module and name, so pass a function defined with "
    "'def' at the top level of a module (not a lambda, nor a function defined inside "
    "another function); bind extra arguments with functools.partial or pass them as "
    "arguments"
)


class FunctionWorker(SafeWorker):
    """The built-in worker that runs plain functions: a pool of it serves
    :meth:`~looppool.Pool.run`, :meth:`~looppool.Pool.map` and
    :meth:`~looppool.Pool.starmap`::

        async with looppool.Pool(looppool.FunctionWorker, size=4) as pool:
            digest = await pool.run(hash_file, path)
            async for size in pool.map(fetch_size, urls):
                ...

    Each call runs on the worker's event loop, up to the pool's
    ``concurrency`` at once per worker. An ``async def`` function runs as a
    task, overlapping with the others while it awaits. A plain ``def``
    function runs inline: while it runs, nothing else runs on that worker's
    loop — give a function that blocks on I/O an ``async def`` wrapper that
    awaits ``asyncio.to_thread(blocking_function, ...)``. A function that
    returns an awaitable has it awaited.

    A function travels by reference (its module and name, as with
    ``ProcessPoolExecutor``): it must be defined at the top level of a module
    that the workers can import — under ``spawn`` and ``forkserver`` the worker
    imports it afresh; under ``fork`` it must have existed when the pool
    started. A lambda or a local function raises :exc:`TypeError` in the
    caller; one that the worker cannot import fails that call with
    :exc:`ImportError`.

    It is a :class:`~looppool.SafeWorker`: ``stop()`` lets every call
    accepted before it finish, and if a worker process dies, the calls it
    held run again on its replacement (at least once), so a call that kills
    its process fails alone with :exc:`~looppool.WorkerLost` rather than
    taking its neighbours with it. Subclass it to give the workers an
    :meth:`~looppool.Worker.initialise` (the executor's ``initializer``) and
    a :meth:`~looppool.Worker.finalise`; ``put()`` and ``submit()`` of other
    messages are refused.
    """

    def process_message(self, message: Any) -> Any:
        """Run one call of ``run()``, ``map()`` or ``starmap()``; return what it returned."""
        if not isinstance(message, Call):
            raise TypeError(
                f"{type(self).__qualname__} runs the calls of pool.run(), pool.map() and "
                f"pool.starmap(); it cannot process the message {short_repr(message)}"
            )
        return message.invoke(self.number)


class Function:
    """A function on its way to the workers, pickled once however many calls carry it.

    Pickled apart from its calls' arguments, so that a function that cannot
    be pickled, or not loaded in the worker, fails with an error saying so.
    """

    __slots__ = ("_fn", "_pickled", "name")

    def __init__(
        self, fn: Callable[..., Any] | None, name: str, pickled: bytes | None = None
    ) -> None:
        self._fn = fn
        self._pickled = pickled
        self.name = name

    def __reduce__(self) -> tuple[Any, ...]:
        return (_arrived, (self.name, self.pickled()))

    def pickled(self) -> bytes:
        """The function pickled (by reference); TypeError saying what to do if it cannot be."""
        if self._pickled is None:
            try:
                self._pickled = pickle.dumps(self._fn, PROTOCOL)
            except Exception as exc:
                raise TypeError(
                    f"the function {self.name} cannot be pickled "
                    f"({type(exc).__name__}: {exc}): {_IMPORTABLE}"
                ) from exc
        return self._pickled

    def load(self, number: int) -> Callable[..., Any]:
        """In the worker: the function itself, imported by its module and name."""
        if self._fn is None:
            assert self._pickled is not None
            try:
                self._fn = pickle.loads(self._pickled)
            except Exception as exc:
                raise ImportError(
                    f"worker {number} could not load the function {self.name} "
                    f"({type(exc).__name__}: {exc}); under the 'spawn' and 'forkserver' "
                    "start methods its module must be importable in the worker, and under "
                    "'fork' it must have existed when the pool started"
                ) from exc
        return self._fn


def _arrived(name: str, pickled: bytes) -> Function:
    """Unpickling a :class:`Function`: load the function itself only when it is called."""
    return Function(None, name, pickled)


class Call:
    """One call of a function: what ``run()``, ``map()`` and ``starmap()`` submit."""

    __slots__ = ("args", "function", "kwargs")

    def __init__(self, function: Function, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.function = function
        self.args = args
        self.kwargs = kwargs

    def __reduce__(self) -> tuple[Any, ...]:
        return (Call, (self.function, self.args, self.kwargs))

    def __repr__(self) -> str:
        return f"<looppool call of {self.function.name}>"

    def invoke(self, number: int) -> Any:
        """Call the function (in worker ``number``); an awaitable it returns is for the runner."""
        return self.function.load(number)(*self.args, **self.kwargs)


# -- the parent side -------------------------------------------------------------------------


def make_call(
    factory: Any, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Call:
    """The message of ``pool.run(fn, *args, **kwargs)``, for a pool made by ``factory``."""
    check_function_pool(factory, "run")
    return Call(_function(fn, "run"), args, kwargs)


def map_calls(
    submit: Submit,
    factory: Any,
    fn: Callable[..., Any],
    iterable: Iterable[Any] | AsyncIterable[Any],
    *,
    star: bool,
    ordered: bool,
    window: int | None,
    default_window: int,
) -> AsyncGenerator[Any, None]:
    """``pool.map()`` (``star=False``) or ``pool.starmap()``: check now, iterate later.

    The arguments are checked here, at the call, so that a mistake raises
    where it was made; the returned generator submits nothing until it is
    first iterated.
    """
    what = "starmap" if star else "map"
    check_function_pool(factory, what)
    function = _function(fn, what)
    if window is None:
        window = default_window
    elif not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be a positive int or None, not {window!r}")
    items: Iterator[Any] | None = None
    async_items: AsyncIterator[Any] | None = None
    if isinstance(iterable, AsyncIterable):
        async_items = aiter(iterable)
    else:
        try:
            items = iter(iterable)
        except TypeError:
            raise TypeError(
                f"{what}() takes an iterable or an async iterable of "
                f"{'argument tuples' if star else 'arguments'}, not {short_repr(iterable)}"
            ) from None
    calls = _Window(submit, function, items, async_items, star, ordered, window, what)
    return calls.results()


def check_function_pool(factory: Any, what: str) -> None:
    """Raise TypeError unless the pool's worker is a FunctionWorker (a subclass, a partial)."""
    cls = getattr(factory, "func", factory)  # functools.partial of a class
    if isinstance(cls, type) and issubclass(cls, FunctionWorker):
        return
    raise TypeError(
        f"pool.{what}() needs a pool of looppool.FunctionWorker (or of a subclass of it), and "
        f"this pool's worker is {_name(cls)}: make one with "
        "looppool.Pool(looppool.FunctionWorker, size=...), or send this pool's messages "
        "with submit()"
    )


def _function(fn: Any, what: str) -> Function:
    if not callable(fn):
        raise TypeError(f"{what}() takes a function to call first, not {short_repr(fn)}")
    return Function(fn, _name(fn))


class _Window:
    """The calls of one ``map()``: at most ``size`` submitted and not yet yielded.

    A call counts until its result is *yielded*, not merely finished, so that
    results waiting behind a slow one (``ordered=True``) are bounded too. Each
    call is a task awaiting ``submit()``; the tasks' done-callbacks, and that
    of the task pulling an async iterable's next item, wake :meth:`results`.
    Nothing polls.
    """

    def __init__(
        self,
        submit: Submit,
        function: Function,
        items: Iterator[Any] | None,
        async_items: AsyncIterator[Any] | None,
        star: bool,
        ordered: bool,
        size: int,
        what: str,
    ) -> None:
        self._submit = submit
        self._function = function
        self._items = items if items is not None else iter(())
        self._async_items = async_items  # pulled instead of _items when given
        self._star = star
        self._ordered = ordered
        self._size = size
        # ordered: every call not yet yielded, in input order (the head is next).
        self._calls: deque[asyncio.Task[Any]] = deque()
        # unordered: calls not finished, and finished ones not yet yielded (in
        # the order they finished); together, the calls not yet yielded.
        self._running: set[asyncio.Task[Any]] = set()
        self._finished: deque[asyncio.Task[Any]] = deque()
        self._fetch: asyncio.Task[Any] | None = None  # an async iterable's next item
        self._exhausted = False  # no item will come: the iterable ended or raised
        self._source_error: Exception | None = None
        self._wakeup: asyncio.Future[None] | None = None
        # Its tasks are named, so that a dump of the loop's tasks says whose they are.
        self._task_name = f"looppool.{what} of {function.name}"

    async def results(self) -> AsyncGenerator[Any, None]:
        """Yield the results; the first exception (a call's, the iterable's) ends it."""
        try:
            while True:
                self._refill()
                task = self._next_finished()
                if task is not None:
                    yield task.result()  # raises the call's exception, ending the iteration
                    continue
                if self._source_error is not None and not (self._ordered and self._calls):
                    # In input order: raised once every call before it is yielded.
                    raise self._source_error
                if self._exhausted and self._unyielded() == 0:
                    return
                # Nothing is ready, and nothing was awaited since the checks
                # above: a call finishing now completes the wake-up future
                # below rather than slipping between the check and the wait.
                self._wakeup = asyncio.get_running_loop().create_future()
                try:
                    await self._wakeup
                finally:
                    self._wakeup = None
        finally:
            # Ended early (break, aclose(), an exception, a cancellation):
            # cancel what is still in flight and wait for it, so that no task
            # outlives the iteration and no exception goes unretrieved.
            await self._cancel_all()

    def _unyielded(self) -> int:
        return len(self._calls) + len(self._running) + len(self._finished)

    def _refill(self) -> None:
        """Submit calls for the next items while the window has room."""
        fetch = self._fetch
        if fetch is not None:
            if not fetch.done():
                return  # one pull at a time; its done-callback wakes us
            self._fetch = None
            try:
                item = fetch.result()
            except Exception as exc:
                self._exhausted, self._source_error = True, exc
            else:
                if item is _END:
                    self._exhausted = True
                else:
                    self._start(item)
        while not self._exhausted and self._unyielded() < self._size:
            if self._async_items is not None:
                # Pulled by a task, so that results keep being yielded while a
                # slow source makes its next item.
                self._fetch = asyncio.get_running_loop().create_task(
                    _next_item(self._async_items), name=f"{self._task_name}: next item"
                )
                self._fetch.add_done_callback(self._wake)
                return
            try:
                item = next(self._items)
            except StopIteration:
                self._exhausted = True
            except Exception as exc:
                self._exhausted, self._source_error = True, exc
            else:
                self._start(item)

    def _start(self, item: Any) -> None:
        task = asyncio.get_running_loop().create_task(self._call(item), name=self._task_name)
        if self._ordered:
            self._calls.append(task)
            task.add_done_callback(self._wake)
        else:
            self._running.add(task)
            task.add_done_callback(self._on_finished)

    async def _call(self, item: Any) -> Any:
        if not self._star:
            return await self._submit(Call(self._function, (item,), {}))
        try:
            args = tuple(item)
        except TypeError:
            raise TypeError(
                "starmap() takes an iterable of argument tuples, and one item is "
                f"{short_repr(item)}"
            ) from None
        return await self._submit(Call(self._function, args, {}))

    def _next_finished(self) -> asyncio.Task[Any] | None:
        if self._ordered:
            if self._calls and self._calls[0].done():
                return self._calls.popleft()
            return None
        return self._finished.popleft() if self._finished else None

    def _on_finished(self, task: asyncio.Task[Any]) -> None:
        if task in self._running:  # not when cancelled by _cancel_all
            self._running.discard(task)
            self._finished.append(task)
        self._wake(task)

    def _wake(self, _: object) -> None:
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def _cancel_all(self) -> None:
        tasks = [*self._calls, *self._running, *self._finished]
        if self._fetch is not None:
            tasks.append(self._fetch)
        self._calls.clear()
        self._running.clear()
        self._finished.clear()
        self._fetch = None
        for task in tasks:
            task.cancel()
        if tasks:
            # gather retrieves every exception, even if this wait is cancelled.
            await asyncio.gather(*tasks, return_exceptions=True)


_END = object()  # an async iterable's end, as the result of its pulling task


async def _next_item(items: AsyncIterator[Any]) -> Any:
    # StopAsyncIteration is not raised out of the task: a result says it.
    try:
        return await anext(items)
    except StopAsyncIteration:
        return _END


def _name(value: Any) -> str:
    """``module.qualname`` of a function or class, else a short repr."""
    qualname = getattr(value, "__qualname__", None)
    module = getattr(value, "__module__", None)
    if isinstance(qualname, str):
        return f"{module}.{qualname}" if isinstance(module, str) else qualname
    return short_repr(value)
