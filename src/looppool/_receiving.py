"""What comes from the workers: replies, results, logs, readiness — and back-pressure on results.

Part of ``PoolCore`` (see ``_base``). The transport hands each batch of a
worker's events to ``_dispatch``.
"""

from __future__ import annotations

import logging
from collections.abc import (
    AsyncIterator,
)
from typing import Any

from . import _protocol as P
from ._base import (
    _DONE_OK,
    _EV_ACKS,
    _EV_DONE,
    _EV_RESULT,
    _EV_RESULTS,
    _PROCESSED,
    Farewell,
    Phase,
    PoolBase,
    S,
    rebuild_exception,
)
from ._errors import (
    PoolClosed,
    RemoteError,
)
from ._ledger import Outcome, SlotState
from ._worker import MessageT, ReplyT, ResultT


class Receiving(PoolBase[S, MessageT, ReplyT, ResultT]):
    """Events from the workers, and ``max_results``."""

    def _dispatch(self, slot: S, items: list[tuple[Any, ...]]) -> None:
        """Handle a batch of events from a worker (see ``_protocol``)."""
        # Per frame, not per item: a frame carries up to thousands of results
        # and acks, so the handlers are looked up once, and the wake-ups that
        # follow an end (_after_end, the pump) run once after the whole frame.
        # Nothing they wake runs before this returns (it is all futures and
        # call_soon), so waking them at the end changes no order.
        on_done = self._on_done
        add_result = self._stream.add
        add_results = self._stream.add_many
        processed_many = self._ledger.processed_many
        ended = False
        for item in items:
            op = item[0]
            if op == _EV_DONE:
                on_done(slot, item[1], item[2], item[3])
                ended = True
            elif op == _EV_RESULTS:
                add_results(item[1])
            elif op == _EV_ACKS:
                for mid in processed_many(slot, item[1]):  # (the ones it cannot end itself)
                    on_done(slot, mid, _DONE_OK, None)
                ended = True
            elif op == _EV_RESULT:
                add_result(item[1])
            else:
                self._dispatch_other(slot, item)
        if ended:
            # The pump first: call_soon runs callbacks in order, so the
            # workers get their next batch (from what is queued) before a
            # producer woken for the room refills the queue, which takes it a
            # whole burst of put() calls; the other way round left the
            # workers idle for that burst.
            if self._ledger.dirty and not self._pump_scheduled:
                self._schedule_pump()
            self._after_end()
        if self._hang_timeout is not None:
            assert self._loop is not None
            slot.last_seen = self._loop.time()
        if (
            self._max_results is not None
            and self._stream.backlog >= self._max_results
            and self._stream.consumed
            and not self._awaited()
        ):
            self._pause(slot)

    def _dispatch_other(self, slot: S, item: tuple[Any, ...]) -> None:
        """Handle one event other than a result or an ack (the rare ones)."""
        op = item[0]
        if op == P.EV_LOG:
            self._on_log(slot, item[1])
        elif op == P.EV_TAKEN:
            self._dist.taken(slot, item[1])
        elif op == P.EV_READY:
            self._ledger.safe = item[2]  # authoritative: the factory's product decides
            self._ready_info(slot, item[3:])
            self._on_ready(slot, item[1])
        elif op == P.EV_START_FAILED:
            # The first reason stands: an initialise() cancelled because
            # start_timeout expired (InlinePool) reports a CancelledError after.
            if slot.start_error is None:
                slot.start_error = (item[1], item[2])
        elif op == P.EV_BLOCKED:
            self._ledger.counts.blocked += 1
        elif op == P.EV_METRICS:
            slot.metrics = item[1]
        elif op == P.EV_BYE:
            slot.farewell = Farewell.BYE
        elif op == P.EV_ALIVE:
            slot.rss = item[1]
            if self._max_memory is not None and item[1] > self._max_memory:
                self._maybe_retire()
        elif op == P.EV_STACK:
            slot.stack = item[1]

    def _on_done(self, slot: S, mid: int, status: int, payload: Any) -> None:
        msg = slot.held.pop(mid, None)
        if msg is None:
            msg = self._dist.find(mid)
            if msg is None:
                return  # already given up on (its worker was declared lost)
        future = msg.reply
        if status == _DONE_OK:
            outcome = _PROCESSED
            if future is not None and not future.done():
                try:
                    future.set_result(self._loads(payload))
                except Exception as exc:
                    future.set_exception(
                        RemoteError(
                            type(exc).__qualname__,
                            f"the reply could not be unpickled in the parent: {exc!r}",
                        )
                    )
        elif status == P.DONE_FAILED or status == P.DONE_TIMED_OUT:
            outcome = Outcome.FAILED
            if status == P.DONE_TIMED_OUT:
                self._ledger.counts.timed_out += 1
            if future is not None and not future.done():
                future.set_exception(rebuild_exception(payload, self._loads))
        elif msg.cancelled:
            outcome = Outcome.CANCELLED  # as its submit() asked
        elif slot.state is not SlotState.STOPPING:
            # Cancelled though nobody asked this worker to stop: its loop is
            # being torn down (SystemExit in another message). The worker is
            # dying: keep the message held, so that its death rescues it.
            slot.held[mid] = msg
            return
        elif self._dist.resend_cancelled(slot, msg):
            return
        else:
            outcome = Outcome.LOST
            if future is not None and not future.done():
                future.set_exception(PoolClosed("the pool stopped while the message was running"))
        if self._ledger.finish(slot, msg, outcome):
            self._dist.isolation_over()
        # The caller, _dispatch, wakes the waiters (_after_end) and the pump once per frame.

    def results(self) -> AsyncIterator[ResultT]:
        """Yield every result the workers put; end once the pool stopped and all were yielded.

        ``results()`` ends only after :meth:`stop` (``drain()`` does not end
        it): iterate it in one task while another puts the messages and then
        stops the pool. Raises :class:`LooppoolError` on a pool made with
        ``on_result``.
        """
        return self._stream.results()

    def _on_log(self, slot: S, data: dict[str, Any]) -> None:
        record = logging.makeLogRecord(data)
        record.worker = slot.number
        record.msg = f"[worker {slot.number}] {record.msg}"
        target = logging.getLogger(record.name)
        if target.isEnabledFor(record.levelno):
            target.handle(record)

    def _on_ready(self, slot: S, pid: int | None) -> None:
        if slot.overdue:
            return  # start_timeout killed it first: it ends as a failed start
        slot.cancel_start_timer()
        slot.initialised = True
        if self._hang_timeout is not None:
            assert self._loop is not None
            slot.last_seen = self._loop.time()  # the clock starts once it is ready
        if slot.state is SlotState.STOPPING:
            return  # told to stop while initialising: it stops once ready
        slot.state = SlotState.READY
        slot.failures = 0
        if pid is not None:
            slot.pid = pid
        if slot.ready is not None and not slot.ready.done():
            slot.ready.set_result(None)
        slot.ready = None
        slot.delivered = 0
        slot.stack = ""
        slot.rss = 0
        if self._max_messages is not None or self._max_memory is not None:
            self._maybe_retire()  # another may have waited for this one's recycling
        if self._phase is Phase.RUNNING or self._accepting_respawns:
            self._ledger.mark(slot)
            if self._ledger.dirty:
                self._schedule_pump()

    # -- results back-pressure (max_results) ------------------------------------

    def _awaited(self) -> bool:
        """Whether someone waits for what the workers send: then it is always read."""
        return bool(self._awaiting or self._drain_waiters) or self._phase in (
            Phase.DRAINING,
            Phase.STOPPING,
        )

    def _pause(self, slot: S) -> None:
        """Stop reading a worker: ``max_results`` results wait for a lagging ``results()``.

        Its pipe then fills, the worker stops starting messages, and the
        producer's ``put()`` waits for room: memory stays bounded. Only while
        someone iterates ``results()`` (a consumer that will catch up), and
        nobody awaits a reply, ``drain()`` or ``stop()`` (which need what is
        behind those results in the pipe): otherwise nothing could end the wait.
        """
        if slot not in self._paused:
            self._paused.add(slot)
            self._pause_reading(slot)

    def _resume_all(self) -> None:
        paused, self._paused = self._paused, set()
        for slot in paused:
            if self._hang_timeout is not None:
                assert self._loop is not None
                slot.last_seen = self._loop.time()  # its silence was ours
            self._resume_reading(slot)

    def _results_consumed(self) -> None:
        if self._paused and (self._max_results is None or self._stream.backlog < self._max_results):
            self._resume_all()
