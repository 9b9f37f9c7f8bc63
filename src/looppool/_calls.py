"""run, map and starmap: plain functions on a FunctionWorker pool (the work is in ``_functions``).

Part of ``PoolCore`` (see ``_base``): thin sugar over ``submit()``.
"""

from __future__ import annotations

from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Awaitable,
    Callable,
    Iterable,
)
from typing import Any, ParamSpec, TypeVar, TypeVarTuple, cast, overload

from . import _functions
from ._base import (
    S,
)
from ._sending import Sending
from ._worker import MessageT, ReplyT, ResultT

# The types of run(), map() and starmap(): a function's parameters, its
# arguments, and what it returns (an async function's awaitable unwrapped).
ArgsP = ParamSpec("ArgsP")
ArgT = TypeVar("ArgT")
ArgsTs = TypeVarTuple("ArgsTs")
R = TypeVar("R")


class FunctionCalls(Sending[S, MessageT, ReplyT, ResultT]):
    """``run``, ``map`` and ``starmap``, on ``submit()``."""

    @property
    def _submit_call(self) -> Callable[[Any], Awaitable[Any]]:
        # submit() of a FunctionWorker pool: its messages are calls, its
        # replies what they return (the pool's own types say Any there).
        return cast("Callable[[Any], Awaitable[Any]]", self.submit)

    @overload
    async def run(
        self, fn: Callable[ArgsP, Awaitable[R]], /, *args: ArgsP.args, **kwargs: ArgsP.kwargs
    ) -> R: ...
    @overload
    async def run(
        self, fn: Callable[ArgsP, R], /, *args: ArgsP.args, **kwargs: ArgsP.kwargs
    ) -> R: ...
    async def run(
        self, fn: Callable[ArgsP, Any], /, *args: ArgsP.args, **kwargs: ArgsP.kwargs
    ) -> Any:
        """Call ``fn(*args, **kwargs)`` in a worker of a :class:`~looppool.FunctionWorker` pool.

        Returns what ``fn`` returned (awaited, for an ``async def``), or raises
        what it raised, as :meth:`submit` does. ``fn`` must be picklable by
        reference, a function defined at the top level of a module (a lambda
        raises :exc:`TypeError` here). On a pool of another worker, raises
        :exc:`TypeError`.
        """
        return await self._submit_call(_functions.make_call(self._factory, fn, args, kwargs))

    @overload
    def map(
        self,
        fn: Callable[[ArgT], Awaitable[R]],
        iterable: Iterable[ArgT] | AsyncIterable[ArgT],
        /,
        *,
        ordered: bool = True,
        window: int | None = None,
    ) -> AsyncGenerator[R, None]: ...
    @overload
    def map(
        self,
        fn: Callable[[ArgT], R],
        iterable: Iterable[ArgT] | AsyncIterable[ArgT],
        /,
        *,
        ordered: bool = True,
        window: int | None = None,
    ) -> AsyncGenerator[R, None]: ...
    def map(
        self,
        fn: Callable[[Any], Any],
        iterable: Iterable[Any] | AsyncIterable[Any],
        /,
        *,
        ordered: bool = True,
        window: int | None = None,
    ) -> AsyncGenerator[Any, None]:
        """Yield ``fn(item)`` for every item, computed in the workers of a FunctionWorker pool.

        ``async for result in pool.map(fn, items):`` — ``items`` is an
        iterable or an async iterable, pulled lazily: at most ``window`` calls
        are submitted and not yet yielded (default: ``size * concurrency``,
        at most ``max_pending``). Results come in input order
        (``ordered=True``) or as they finish. The first exception, a call's
        (as :meth:`submit` raises it) or the iterable's, ends the iteration;
        the calls still in flight are then cancelled, as they are when the
        loop is left early (wrap it in ``contextlib.aclosing`` for that to
        happen at once rather than when the iterator is collected).
        """
        return _functions.map_calls(
            self._submit_call,
            self._factory,
            fn,
            iterable,
            star=False,
            ordered=ordered,
            window=window,
            default_window=min(self._size * self._concurrency, self._max_pending),
        )

    @overload
    def starmap(
        self,
        fn: Callable[[*ArgsTs], Awaitable[R]],
        iterable: Iterable[tuple[*ArgsTs]] | AsyncIterable[tuple[*ArgsTs]],
        /,
        *,
        ordered: bool = True,
        window: int | None = None,
    ) -> AsyncGenerator[R, None]: ...
    @overload
    def starmap(
        self,
        fn: Callable[[*ArgsTs], R],
        iterable: Iterable[tuple[*ArgsTs]] | AsyncIterable[tuple[*ArgsTs]],
        /,
        *,
        ordered: bool = True,
        window: int | None = None,
    ) -> AsyncGenerator[R, None]: ...
    def starmap(
        self,
        fn: Callable[..., Any],
        iterable: Iterable[Any] | AsyncIterable[Any],
        /,
        *,
        ordered: bool = True,
        window: int | None = None,
    ) -> AsyncGenerator[Any, None]:
        """:meth:`map` for functions of several arguments: yield ``fn(*args)`` for each tuple."""
        return _functions.map_calls(
            self._submit_call,
            self._factory,
            fn,
            iterable,
            star=True,
            ordered=ordered,
            window=window,
            default_window=min(self._size * self._concurrency, self._max_pending),
        )
