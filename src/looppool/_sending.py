"""What goes to the workers: put, put_nowait, broadcast, submit (and its cancellation), drain.

Part of ``PoolCore`` (see ``_base``). A message is pickled in the caller, so a
mistake raises there; the ledger takes it; the pump sends it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from . import _protocol as P
from . import _tracing
from ._base import (
    _MODULES,
    _OTEL_TRACE,
    _RUNNING,
    Phase,
    PoolBase,
    S,
    check_seconds,
)
from ._errors import (
    PoolBroken,
    PoolClosed,
    QueueFull,
    short_repr,
)
from ._ledger import Msg, NoWorkerLeft
from ._worker import MessageT, ReplyT, ResultT

_AS_IS = P.AS_IS


class Sending(PoolBase[S, MessageT, ReplyT, ResultT]):
    """The calls that send messages, wait for room, and wait for them to end."""

    def _pickle(self, message: Any) -> Any:
        if self._phase is not _RUNNING:
            self._raise_closed()
        try:
            return P.dumps(message)  # large buffers out of band, snapshotted now
        except Exception as exc:
            raise TypeError(
                f"the message {short_repr(message)} cannot be pickled, so it cannot be "
                f"sent to a {self._noun}: {type(exc).__name__}: {exc}"
            ) from exc

    def _raise_closed(self) -> None:
        if self._broken is not None:
            raise self._broken
        if self._phase is Phase.NEW or self._phase is Phase.STARTING:
            raise PoolClosed(f"{self!r} is not started: use 'async with' or await start() first")
        raise PoolClosed(f"{self!r} takes no new messages")

    def _check_target(self, worker: int | None) -> None:
        if worker is None:
            return
        if not isinstance(worker, int) or isinstance(worker, bool):
            raise TypeError(f"worker must be an int or None, not {worker!r}")
        if not 0 <= worker < self._size:
            raise ValueError(
                f"worker={worker} is out of range: this pool has workers 0 to {self._size - 1}"
            )

    async def put(
        self,
        message: MessageT,
        *,
        worker: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (the message's deadline in the worker)
    ) -> None:
        """Send a message; wait while ``max_pending`` messages are pending.

        The message is pickled here, so one that cannot be pickled raises
        ``TypeError`` at once. ``worker=k`` sends it to worker ``k``; without
        it, messages are dealt to the workers in fair rounds. ``timeout``
        (seconds) overrides the pool's ``message_timeout`` for this message.
        """
        # _check_target and _timeout_for, spelt out for the usual arguments:
        # put() is the README's per-message call, and each call saved counts.
        if worker is not None:
            self._check_target(worker)
        timeout = self._message_timeout if timeout is None else check_seconds("timeout", timeout)
        # _pickle's fast path: a plain int or str travels as itself (see P.dumps).
        if type(message) in _AS_IS and self._phase is _RUNNING:
            payload: Any = message
        else:
            payload = self._pickle(message)
        if self._ledger.pending >= self._max_pending:
            await self._wait_for_room()
        self._accept(payload, worker, None, timeout)

    def put_nowait(
        self, message: MessageT, *, worker: int | None = None, timeout: float | None = None
    ) -> None:
        """Send a message, or raise :class:`~looppool.QueueFull` if ``max_pending`` are pending."""
        self._check_target(worker)
        timeout = self._timeout_for(timeout)
        payload = self._pickle(message)
        pending = self._ledger.pending
        if pending >= self._max_pending:
            raise QueueFull(
                f"{pending} messages are pending in {self.name!r} (max_pending="
                f"{self._max_pending}); await put() to wait for room"
            )
        self._accept(payload, worker, None, timeout)

    def _timeout_for(self, timeout: float | None) -> float | None:
        if timeout is None:
            return self._message_timeout
        return check_seconds("timeout", timeout)

    async def broadcast(self, message: MessageT) -> None:
        """Send a message to every worker, each exactly once."""
        payload = self._pickle(message)
        if self._ledger.pending >= self._max_pending:
            await self._wait_for_room()
        for number in range(self._size):
            self._accept(payload, number, None, self._message_timeout)

    async def submit(
        self,
        message: MessageT,
        *,
        worker: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (the message's deadline in the worker)
    ) -> ReplyT:
        """Send a message and return what ``process_message`` returned for it.

        If the handler raised, the same exception is raised here with the
        worker's traceback as its ``__cause__`` (:class:`~looppool.RemoteTraceback`);
        an exception that cannot be pickled becomes :class:`~looppool.RemoteError`.
        If the worker died holding it, :class:`~looppool.WorkerLost` is raised;
        if it ran past ``timeout`` seconds (default: the pool's
        ``message_timeout``), :class:`~looppool.MessageTimeout`.

        Cancelling the task awaiting it withdraws the message if no worker
        has started it (it never runs), or cancels it inside the worker
        (``CancelledError`` in ``process_message``); either way it counts as
        ``cancelled``, and ``drain()`` and ``stop()`` do not wait for it.
        """
        if worker is not None:  # as in put()
            self._check_target(worker)
        timeout = self._message_timeout if timeout is None else check_seconds("timeout", timeout)
        payload = self._pickle(message)
        if self._ledger.pending >= self._max_pending:
            await self._wait_for_room()
        assert self._loop is not None
        future: asyncio.Future[ReplyT] = self._loop.create_future()
        msg = self._accept(payload, worker, future, timeout)
        self._awaiting += 1
        if self._paused:
            self._resume_all()  # its reply may wait behind unread results
        try:
            return await future
        except asyncio.CancelledError:
            if future.cancelled():
                self._withdraw(msg)
            raise
        finally:
            self._awaiting -= 1

    def _accept(
        self, payload: Any, target: int | None, reply: Any, timeout: float | None = None
    ) -> Msg:
        ledger = self._ledger
        # Tracing: the caller's span context, or None (the usual case: when
        # nothing imported OpenTelemetry, skip the call).
        trace = _tracing.capture() if _OTEL_TRACE in _MODULES else None
        try:
            msg = ledger.accept(payload, target, reply, timeout, trace)
        except NoWorkerLeft:
            raise self._broken or PoolBroken(f"pool {self.name!r} has no worker left") from None
        if ledger.dirty and not self._pump_scheduled:
            self._schedule_pump()
        return msg

    def _withdraw(self, msg: Msg) -> None:
        """The submit() of ``msg`` was cancelled: withdraw it, or cancel it where it runs."""
        pending = self._ledger.pending
        slot = self._ledger.withdraw(msg)
        if slot is not None:
            self._send_cancel(slot, msg.id)  # type: ignore[arg-type]
        elif self._ledger.pending == pending:
            self._dist.withdraw(msg)
        if self._ledger.pending < pending:
            self._after_end()

    async def drain(self) -> None:
        """Return once every message put before the call is finished and its results are in."""
        if self._phase is Phase.NEW:
            return
        if self._paused:
            self._resume_all()  # what it waits for may be behind unread results
        await self._drain_past(self._ledger.begin_drain())
        if self._broken is not None:
            raise self._broken
        await self._stream.caught_up()

    async def _drain_past(self, epoch: int | None) -> None:
        if epoch is None or self._phase is Phase.STOPPED:
            return
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._drain_waiters.append((epoch, fut))
        await fut

    async def _wait_for_room(self) -> None:
        assert self._loop is not None
        if self._stream.is_consumer(asyncio.current_task()):
            # The task that reads the results waits for room (a crawler puts
            # the links each page yields): while it waits nobody reads, so a
            # max_results pause would never end, and the room it waits for
            # needs the paused workers. Read them, as for an awaited submit().
            self._awaiting += 1
            try:
                if self._paused:
                    self._resume_all()
                await self._wait_for_room_unpaused()
            finally:
                self._awaiting -= 1
        else:
            await self._wait_for_room_unpaused()

    async def _wait_for_room_unpaused(self) -> None:
        assert self._loop is not None
        while self._ledger.pending >= self._max_pending:
            if self._phase is not Phase.RUNNING:
                self._raise_closed()
            fut: asyncio.Future[None] = self._loop.create_future()
            self._room_waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                # Woken, then cancelled before using the room: pass the
                # wake-up on, or another waiter would sleep with room free.
                if fut.done() and not fut.cancelled():
                    self._wake_room()
                raise
            finally:
                with contextlib.suppress(ValueError):
                    self._room_waiters.remove(fut)
        if self._phase is not Phase.RUNNING:
            self._raise_closed()
