"""A pool's life: start, stop (graceful or not, with a timeout), and the end of it all.

Part of ``PoolCore`` (see ``_base``). ``Phase`` says what each stage accepts.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Self

from ._base import (
    Phase,
    PoolBase,
    S,
    logger,
)
from ._errors import (
    PoolClosed,
    WorkerStartError,
)
from ._worker import MessageT, ReplyT, ResultT


class LifeCycle(PoolBase[S, MessageT, ReplyT, ResultT]):
    """start(), stop() and ``async with``: the phases of a pool."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.stop()
        else:
            # The body failed (Ctrl-C's cancellation included): start nothing
            # more, let in-flight messages finish (SafeWorker) or cancel them.
            await self._shutdown(graceful=False, timeout=None)

    async def start(self) -> None:
        """Start the workers; return once every one has run ``initialise()``.

        Raises :class:`~looppool.WorkerStartError` if one fails, leaving no
        worker behind.
        """
        if self._phase is not Phase.NEW:
            raise PoolClosed(f"{self!r} was already started; a pool starts once")
        self._loop = loop = asyncio.get_running_loop()
        self._phase = Phase.STARTING
        try:
            self._before_start()
            self._dist.start()
            for slot in self._slots:
                slot.ready = loop.create_future()
                self._launch(slot)
                self._launched(slot)
            await self._await_ready([s.ready for s in self._slots if s.ready is not None])
            if self._phase is not Phase.STARTING:
                # stop() killed the workers, but every one had reported ready
                # first (a race with fast workers): the start still failed.
                raise PoolClosed("stop() was called while the pool was starting")
        except BaseException as exc:
            stopped = self._phase is not Phase.STARTING
            for slot in self._slots:
                if slot.ready is not None and not slot.ready.done():
                    # Nobody awaits these any more (start() was cancelled, or
                    # another worker failed): a worker killed below must not
                    # leave an error nobody retrieves.
                    slot.ready.cancel()
            self._phase = Phase.STOPPING
            await self._kill_all()
            self._finish()
            if stopped and isinstance(exc, WorkerStartError):
                raise PoolClosed("stop() was called while the pool was starting") from exc
            raise
        self._stream.start(loop)
        self._phase = Phase.RUNNING
        if self._hang_timeout is not None:
            now = loop.time()
            for slot in self._slots:
                slot.last_seen = now
            self._watchdog = loop.call_later(self._hang_timeout / 4, self._watch)

    async def _await_ready(self, futures: list[asyncio.Future[None]]) -> None:
        pending: set[asyncio.Future[None]] = set(futures)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            # Retrieve every error, not just the first: several workers may
            # fail in one loop turn, and an error never retrieved is reported
            # as "Future exception was never retrieved" when collected.
            errors = [error for fut in done if (error := fut.exception()) is not None]
            if errors:
                raise errors[0]  # start() cancels the others

    async def stop(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Stop the pool as its worker class defines; idempotent.

        A :class:`~looppool.SafeWorker` pool processes every message put
        before the call, and delivers its results, first. A
        :class:`~looppool.Worker` pool drops queued messages and cancels those
        in flight. Workers still alive after ``timeout`` seconds are killed.
        Afterwards :meth:`put` raises :class:`~looppool.PoolClosed`.
        """
        await self._shutdown(graceful=True, timeout=timeout)

    async def _shutdown(self, *, graceful: bool, timeout: float | None) -> None:  # noqa: ASYNC109
        phase = self._phase
        if phase is Phase.NEW:
            self._phase = Phase.STOPPED
            self._stopped.set()
            self._stream.close()  # results() of a pool never started ends at once
            return
        if phase in (Phase.DRAINING, Phase.STOPPING, Phase.STOPPED):
            await self._stopped.wait()
            return
        if phase is Phase.STARTING:
            # start() is awaiting the workers in another task: end them; it
            # cleans up and raises PoolClosed.
            self._phase = Phase.STOPPING
            await self._kill_all()
            await self._stopped.wait()
            return
        self._wake_all_room_waiters()
        try:
            async with asyncio.timeout(timeout):
                await self._stop_workers(graceful and phase is Phase.RUNNING)
        except TimeoutError:
            for slot in self._slots:
                if slot.alive:
                    logger.warning(
                        "pool %s: stop(timeout=%s) expired; killing worker %d (pid %s)",
                        self.name,
                        timeout,
                        slot.number,
                        slot.pid,
                    )
            await self._kill_all()
        except BaseException:
            # Cancelled (a second Ctrl-C) or failed: end the workers now.
            await self._kill_all()
            raise
        finally:
            self._finish()

    async def _stop_workers(self, graceful: bool) -> None:
        self._resume_all()  # stopping waits for every result: read them all
        if graceful and self._ledger.safe:
            # Every message accepted so far runs; replacements stay on so that
            # a death while draining does not strand the messages it held.
            self._phase = Phase.DRAINING
            while self._ledger.pending and self._broken is None:
                await self._drain_past(self._ledger.begin_drain())
        else:
            self._end_reason = "the pool stopped before the message was processed"
            exc = PoolClosed(f"the pool stopped before the message was sent to a {self._noun}")
            self._settle_lost(self._ledger.lose_queued(), exc)
        self._phase = Phase.STOPPING
        self._tell_all_to_stop()
        await self._workers_exited()
        # Every worker has ended, so every result is in: let the async
        # on_result consumer finish the backlog, then end.
        await self._stream.finish()

    def _finish(self) -> None:
        """Release everything once no worker runs (or none could start)."""
        self._phase = Phase.STOPPED
        if self._watchdog is not None:
            self._watchdog.cancel()
        for slot in self._slots:
            # Normally cancelled when the worker ended; not if the wait for
            # that end was cut short (a start() cancelled twice): no timer
            # may fire, and log a kill, after the pool has stopped.
            slot.cancel_start_timer()
        self._release()
        self._lose_all(PoolClosed(self._end_reason))
        while self._drain_waiters:
            fut = self._drain_waiters.popleft()[1]
            if not fut.done():
                fut.set_result(None)
        self._stream.abandon()
        self._stopped.set()

    async def _workers_exited(self) -> None:
        exits = [s.exited for s in self._slots if s.exited is not None and not s.exited.done()]
        if exits:
            await asyncio.wait(exits)

    async def _kill_all(self) -> None:
        """Kill every live worker (nothing replaces them) and wait until each has ended."""
        if self._phase is not Phase.STOPPED:
            # No replacement may start for a worker we are killing on purpose
            # (one may be due: a respawn waits out its back-off).
            self._phase = Phase.STOPPING
        self._kill_alive()
        # Shielded: a killed worker is reported within moments; waiting for
        # that must not be abandoned because the caller is cancelled.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self._workers_exited())
