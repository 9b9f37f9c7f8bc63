"""The parent's end of the results: ``results()``, or the ``on_result`` callback.

::

    EV_RESULT payload ──► add() ──► unpickle ──► on_result(value)        (a plain callback)
                                       └──────► buffer ──► results()     (no callback)
                                                   └────► callback task ──► await on_result(value)

A result is held only until it is handed out: neither the buffer, nor the
iterator, nor the callback task keeps a reference to a value once it has been
yielded or passed on (a result of tens of megabytes must not stay alive while
the stream waits for the next one).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ._errors import LooppoolError
from ._ledger import Counts

__all__ = ["ResultCallback", "ResultStream"]

logger = logging.getLogger("looppool")

ResultCallback = Callable[[Any], Awaitable[None] | None]


def is_async_callable(callback: object) -> bool:
    """Whether calling ``callback`` returns an awaitable (an ``async def`` or such an object)."""
    return inspect.iscoroutinefunction(callback) or inspect.iscoroutinefunction(
        getattr(callback, "__call__", None)  # noqa: B004
    )


class ResultStream:
    """Buffers results for ``results()``, or hands them to ``on_result``."""

    def __init__(
        self,
        name: str,
        counts: Counts,
        loads: Callable[[Any], Any],
        on_result: ResultCallback | None,
    ) -> None:
        if on_result is not None and not callable(on_result):
            raise TypeError(f"on_result must be callable, not {on_result!r}")
        self._name = name
        self._counts = counts
        self._loads = loads
        self._callback = on_result
        self.callback_is_async = on_result is not None and is_async_callable(on_result)
        self._buf: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False  # no result can come any more
        # Iterators of results() in use: someone will read what waits.
        self._consumers = 0
        # The tasks iterating them (see is_consumer).
        self._consumer_tasks: dict[asyncio.Task[Any], int] = {}
        #: Called each time a result is handed out (the pool resumes reading).
        self.on_consumed: Callable[[], None] | None = None
        # An async on_result: results it has finished with, and who waits for a count.
        self._delivered = 0
        self._delivered_waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def backlog(self) -> int:
        """Results waiting to be handed out."""
        return len(self._buf)

    @property
    def consumed(self) -> bool:
        """Whether something takes results out: a results() iterator, or an async on_result."""
        return self._consumers > 0 or self._task is not None

    def is_consumer(self, task: asyncio.Task[Any] | None) -> bool:
        """Whether ``task`` reads the results: it iterates results(), or runs an async on_result."""
        return task is not None and (task in self._consumer_tasks or task is self._task)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the task that awaits an async ``on_result`` for every result."""
        if self.callback_is_async:
            self._task = loop.create_task(self._run_callbacks())

    def add(self, payload: Any) -> None:
        """A worker's result arrived (pickled): pass it on."""
        self._counts.results += 1
        try:
            value = self._loads(payload)
        except Exception:
            logger.exception("pool %s: a result could not be unpickled in the parent", self._name)
            return
        callback = self._callback
        if callback is None or self.callback_is_async:
            self._buf.append(value)
            self._wake()
            return
        try:
            callback(value)
        except Exception:
            logger.exception("pool %s: on_result raised", self._name)

    def add_many(self, payloads: list[Any]) -> None:
        """:meth:`add` for each of a worker's results in one frame (EV_RESULTS), in order."""
        if self._callback is not None:
            for payload in payloads:
                self.add(payload)
            return
        # results(): the usual case, with the look-ups and the wake-up once per frame.
        self._counts.results += len(payloads)
        loads = self._loads
        append = self._buf.append
        for payload in payloads:
            try:
                value = loads(payload)
            except Exception:
                logger.exception(
                    "pool %s: a result could not be unpickled in the parent", self._name
                )
                continue
            append(value)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _ready(self) -> bool:
        """Wait until a result is buffered (True) or none can come any more (False)."""
        while not self._buf:
            if self._closed:
                return False
            waiter = self._waiter
            if waiter is None or waiter.done():
                waiter = self._waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(waiter)  # several readers may share one waiter
        return True

    async def results(self) -> AsyncIterator[Any]:
        """Yield every result; end once the pool has stopped and every one was yielded."""
        if self._callback is not None:
            raise LooppoolError(
                f"pool {self._name!r} was made with on_result={self._callback!r}, which "
                "receives every result: results() would never yield one. Iterate over "
                "results() on a pool made without on_result, or handle results in the callback."
            )
        self._consumers += 1
        task = asyncio.current_task()
        if task is not None:
            self._consumer_tasks[task] = self._consumer_tasks.get(task, 0) + 1
        try:
            # _ready() only when the buffer is empty: a coroutine per result
            # is most of what handing one out costs.
            while self._buf or await self._ready():
                # Popped as it is yielded, never bound to a local of this frame:
                # once the caller drops it, nothing here keeps it alive.
                yield self._buf.popleft()
                if self.on_consumed is not None:
                    self.on_consumed()
        finally:
            self._consumers -= 1
            if task is not None:
                left = self._consumer_tasks.pop(task) - 1
                if left:
                    self._consumer_tasks[task] = left

    async def _run_callbacks(self) -> None:
        callback = self._callback
        assert callback is not None
        while await self._ready():
            try:
                await callback(self._buf.popleft())  # type: ignore[misc]
            except Exception:
                logger.exception("pool %s: on_result raised", self._name)
            if self.on_consumed is not None:
                self.on_consumed()
            self._delivered += 1
            waiters = self._delivered_waiters
            while waiters and waiters[0][0] <= self._delivered:
                fut = waiters.popleft()[1]
                if not fut.done():
                    fut.set_result(None)

    async def caught_up(self) -> None:
        """Return once an async ``on_result`` has finished with every result so far."""
        if not self.callback_is_async:
            return
        count = self._counts.results
        if self._delivered >= count or self._task is None or self._task.done():
            return
        fut = asyncio.get_running_loop().create_future()
        self._delivered_waiters.append((count, fut))
        await fut

    def close(self) -> None:
        """No result can come any more: ``results()`` ends once it has yielded the buffer."""
        self._closed = True
        self._wake()

    async def finish(self) -> None:
        """Close, and wait until an async ``on_result`` has been given every result."""
        self.close()
        if self._task is not None:
            await self._task

    def abandon(self) -> None:
        """Close and give up on the callbacks still to run; release who waits for them."""
        self.close()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        while self._delivered_waiters:
            fut = self._delivered_waiters.popleft()[1]
            if not fut.done():
                fut.set_result(None)
