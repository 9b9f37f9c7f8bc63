"""Workers that end, hang or are due for recycling: rescue what they held, replace them.

Part of ``PoolCore`` (see ``_base``). A worker's end, whatever it is, reaches
``_on_worker_end`` exactly once (the transport's contract).
"""

from __future__ import annotations

from ._base import (
    MAX_START_FAILURES,
    MEMORY_CHECK,
    RESPAWN_BACKOFF,
    Farewell,
    Phase,
    PoolBase,
    S,
    logger,
)
from ._errors import (
    PoolBroken,
    PoolClosed,
    WorkerLost,
    WorkerStartError,
)
from ._ledger import Outcome, SlotState
from ._worker import MessageT, ReplyT, ResultT


class Supervision(PoolBase[S, MessageT, ReplyT, ResultT]):
    """Deaths, hangs (``hang_timeout``), recycling and replacements."""

    def _watch(self) -> None:
        """The pool's one watchdog timer: kill a worker not heard from for ``hang_timeout``."""
        assert self._loop is not None
        assert self._hang_timeout is not None
        now = self._loop.time()
        for slot in self._slots:
            if (
                slot.state in (SlotState.READY, SlotState.STOPPING)
                # One told to stop while still in initialise() is starting, not
                # hung: its heartbeat begins once it is ready (start_timeout's).
                and slot.initialised
                and slot.farewell is Farewell.NONE
                and slot not in self._paused
                and now - slot.last_seen > self._hang_timeout
            ):
                self._hung(slot, now - slot.last_seen)
        self._watchdog = self._loop.call_later(self._hang_timeout / 4, self._watch)

    def _hung(self, slot: S, silent: float) -> None:
        self._ledger.counts.hung += 1
        where = f"; its loop was {slot.stack}" if slot.stack else f" ({self._no_stack})"
        logger.error(
            "pool %s: worker %d (pid %s) was silent for %.1f s (hang_timeout=%g): its loop "
            "is blocked or its process stopped; killing it%s",
            self.name,
            slot.number,
            slot.pid,
            silent,
            self._hang_timeout,
            where,
        )
        slot.farewell = Farewell.HUNG  # a death: replaced, and what it held rescued
        self._kill(slot)

    def _launched(self, slot: S) -> None:
        """After a launch: with ``start_timeout``, kill the worker if it is not ready by then."""
        slot.initialised = False
        slot.overdue = False
        if self._start_timeout is not None:
            assert self._loop is not None
            slot.start_timer = self._loop.call_later(self._start_timeout, self._start_overdue, slot)

    def _start_overdue(self, slot: S) -> None:
        slot.start_timer = None
        # The timer is cancelled when the worker reports ready and when it
        # ends, so one that fires finds a worker still in initialise() (or
        # told to stop while in it: the stop waits for the same readiness),
        # unless the pool is already killing it on purpose.
        if not slot.alive or slot.farewell is not Farewell.NONE:
            return
        # Its ready may be in the pipe, unread (the parent's loop was busy
        # when both became due): the decision stands, the ready is ignored,
        # and the worker ends as a failed start. Otherwise a start() could
        # return with this worker marked ready and then dead for good.
        slot.overdue = True
        reason = (
            f"initialise() did not finish within start_timeout={self._start_timeout:g} s "
            f"(the {self._noun} was killed)"
        )
        slot.start_error = (reason, "")
        pid = f" (pid {slot.pid})" if slot.pid is not None else ""
        logger.error(
            "pool %s: worker %d%s did not finish initialise() within "
            "start_timeout=%g s; killing it",
            self.name,
            slot.number,
            pid,
            self._start_timeout,
        )
        # Farewell stays NONE: to the supervision it is a worker that failed
        # to start (start() raises WorkerStartError; a replacement's failure
        # counts towards breaking the pool, with the back-off between tries).
        self._kill(slot)

    def _heartbeat_options(self) -> tuple[float, float | None, bool] | None:
        """A worker's heartbeat: ``(interval, hang_timeout, report_rss)``, or None for none.

        Every quarter of ``hang_timeout``, so that the parent hears from an
        idle worker well within it; every ``MEMORY_CHECK`` seconds, with the
        RSS, for ``max_memory_per_worker``.
        """
        beats = []
        if self._hang_timeout is not None:
            beats.append(self._hang_timeout / 4)
        if self._max_memory is not None:
            beats.append(MEMORY_CHECK)
        if not beats:
            return None
        return (min(beats), self._hang_timeout, self._max_memory is not None)

    def _maybe_retire(self) -> None:
        """Retire a worker past ``max_messages_per_worker`` or ``max_memory_per_worker``.

        One at a time, so that throughput dips by one worker's share at most.
        """
        # A replacement still starting (after a retirement or a death) counts
        # as the one: another retired meanwhile would make two dips at once.
        if self._phase is not Phase.RUNNING or any(
            s.retiring or s.state is SlotState.STARTING for s in self._slots
        ):
            return
        for slot in self._slots:
            if slot.state is not SlotState.READY:
                continue
            if self._max_messages is not None and slot.delivered >= self._max_messages:
                why = f"{slot.delivered} messages (max_messages_per_worker={self._max_messages})"
            elif self._max_memory is not None and slot.rss > self._max_memory:
                limit = self._max_memory >> 20
                why = f"{slot.rss >> 20} MiB RSS (max_memory_per_worker={limit} MiB)"
            else:
                continue
            logger.info(
                "pool %s: recycling worker %d (pid %s) after %s",
                self.name,
                slot.number,
                slot.pid,
                why,
            )
            slot.retiring = True
            if not self._dist.retire(slot):
                # It takes nothing more, finishes what it holds (whatever its
                # class), runs finalise() and exits; a fresh one replaces it.
                slot.state = SlotState.STOPPING
                self._send_stop(slot, False)
            return

    # -- supervision ------------------------------------------------------------

    def _on_worker_end(self, slot: S, cause: str, lost: WorkerLost) -> None:
        """A worker ended (its process exited, its actor died): account and replace.

        ``cause`` describes the end in words; ``lost`` is what a message it
        held fails with, if it is not delivered again.
        """
        previous = slot.state
        slot.state = SlotState.DEAD
        slot.cancel_start_timer()
        slot.metrics = None  # a dead worker's gauges are stale
        if slot.exited is not None and not slot.exited.done():
            slot.exited.set_result(lost.exitcode)
        farewell = slot.farewell
        if previous is SlotState.STARTING:
            reason, tb = slot.start_error or (cause, "")
            if slot.ready is not None:  # the pool's start() awaits this one
                if not slot.ready.done():
                    slot.ready.set_exception(
                        WorkerStartError(slot.number, reason, tb, lost.exitcode)
                    )
                slot.ready = None
                return
            if farewell is not Farewell.KILLED:
                slot.failures += 1
                logger.error(
                    "pool %s: replacement of worker %d failed: %s", self.name, slot.number, reason
                )
        elif farewell is Farewell.NONE:
            logger.error(
                "pool %s: worker %d (pid %s) died (%s)", self.name, slot.number, slot.pid, cause
            )
        self._paused.discard(slot)
        if slot.retiring:
            # Recycled: it stopped when told (or died doing so: what it held
            # died with it), and a fresh worker takes its number.
            slot.retiring = False
            if farewell is Farewell.BYE:
                self._ledger.counts.recycled += 1
                self._requeue_held(slot)
            else:
                self._rescue(slot, lost)
            if not self._dist.worker_ended(slot) and self._accepting_respawns:
                # A retiring worker that died is a death all the same (respawns).
                self._replace(slot, death=farewell is not Farewell.BYE)
            return
        if previous is SlotState.STOPPING or farewell is Farewell.KILLED:
            # Told to stop (or killed by us): nothing to replace.
            if farewell is Farewell.BYE or farewell is Farewell.KILLED:
                # What it still holds it took but never ran (barrier mode: a
                # message refused after the stop began): send it again, or
                # lose it if the pool is stopping.
                self._requeue_held(slot)
            else:
                # It died while finishing its messages (a barrier-mode restart
                # stops the survivors, and one may die too): they died with
                # it, and that counts as a death, or a message that kills
                # every worker it reaches would be sent for ever.
                self._rescue(slot, lost)
            self._dist.worker_ended(slot)
            return
        self._dist.worker_died(slot)
        self._rescue(slot, lost)
        if not self._dist.worker_ended(slot) and self._accepting_respawns:
            self._replace(slot)

    def _rescue(self, slot: S, lost: WorkerLost) -> None:
        """Decide the fate of the messages a dead worker held or had queued."""
        self._settle_lost(self._ledger.worker_died(slot, self._accepting_respawns), lost)
        # (Messages may have ended there that are not among the lost: those
        # whose submit was cancelled. Who waits for them must hear of it.)
        self._after_end()
        if self._ledger.dirty:
            self._schedule_pump()

    def _requeue_held(self, slot: S) -> None:
        """Send again what a worker that stopped (or was killed) took and did not start."""
        msgs = self._ledger.release_held(slot)
        if not self._accepting_respawns:
            for msg in msgs:
                self._ledger.end(msg, Outcome.LOST)
            self._settle_lost(msgs, PoolClosed(self._end_reason))
            return
        # Directed ones go back to the head of their queue, so newest first.
        for msg in reversed([m for m in msgs if m.target is not None]):
            self._ledger.requeue(slot, msg)
        for msg in msgs:
            if msg.target is None:
                self._ledger.requeue(slot, msg)
        if self._ledger.dirty:
            self._schedule_pump()

    def _give_up_on(self, slot: S) -> bool:
        """Break the pool if ``slot``'s replacements keep failing to start; True if it did."""
        if slot.failures < MAX_START_FAILURES:
            return False
        last = slot.start_error[0] if slot.start_error else f"its {self._noun} died"
        self._break(
            f"worker {slot.number} failed to start {slot.failures} times in a row (last: {last})"
        )
        return True

    def _replace(self, slot: S, death: bool = True) -> None:
        """Start a replacement for a dead worker, after a back-off if it keeps failing."""
        assert self._loop is not None
        if self._give_up_on(slot):
            return
        slot.state = SlotState.STARTING  # counts as alive: no second replacement is scheduled
        delay = RESPAWN_BACKOFF * (2 ** (slot.failures - 1)) if slot.failures else 0.0
        self._loop.call_later(delay, self._respawn, slot, death)

    def _respawn(self, slot: S, death: bool = True) -> None:
        if not self._accepting_respawns:
            slot.state = SlotState.DEAD
            self._settle_lost(self._ledger.lose_waiting(slot), PoolClosed(self._end_reason))
            return
        if death:
            self._ledger.counts.respawns += 1
        try:
            self._launch(slot)
        except Exception as exc:
            slot.state = SlotState.DEAD
            self._break(f"worker {slot.number} could not be restarted: {exc!r}")
            return
        self._launched(slot)
        logger.info("pool %s: worker %d restarted", self.name, slot.number)

    def _break(self, reason: str) -> None:
        """Give up: a worker keeps failing to start. Fail everything, loudly."""
        if self._broken is not None:
            return
        logger.critical("pool %s is broken: %s", self.name, reason)
        self._broken = PoolBroken(f"pool {self.name!r} is broken: {reason}")
        self._end_reason = str(self._broken)
        if self._phase is Phase.RUNNING:
            self._phase = Phase.BROKEN
        self._lose_all(self._broken)
        self._kill_alive()

    def _kill_alive(self) -> None:
        """Kill every live worker, marked as killed on purpose (not replaced, not logged)."""
        for slot in self._slots:
            if slot.alive:
                slot.farewell = Farewell.KILLED
                self._kill(slot)

    def _tell_all_to_stop(self, cancel: bool | None = None) -> None:
        """Send STOP to every live worker not told yet: finish (SafeWorker) or cancel (Worker).

        ``cancel`` overrides what the worker class says (a barrier-mode retirement finishes).
        """
        if cancel is None:
            cancel = not self._ledger.safe
        for slot in self._slots:
            if slot.alive and slot.state is not SlotState.STOPPING:
                slot.state = SlotState.STOPPING
                self._send_stop(slot, cancel)
