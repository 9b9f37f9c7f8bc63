"""Barrier mode (``distribution="barrier"``): the original package's shared queue and Barrier.

::

    parent                                      worker k (one listener thread each)
    ──────                                      ───────────────────────────────────
    put(m) ─► place(): out[id] = m ─► shared queue ─► take one message (whole frames,
                                                      under the queue's lock)
                       EV_TAKEN ◄────────────────── ◄─ report it, hand it to the loop,
    taken(): out ─► slot.held                          then wait at the Barrier
    put(m, worker=k), broadcast, suspects ─► the worker's own channel (as in rounds)

A dead party can never leave a ``multiprocessing.Barrier`` (nor can
``abort()`` be relied on: it may wait for the dead party for ever), so any
death restarts the whole *generation*: the survivors are told to stop (a
``SafeWorker`` finishes what it holds, a ``Worker`` cancels it), and once
every worker has ended, a fresh queue, Barrier and workers start, and what
the old generation left is sent again. Meanwhile, and while the suspects of
a death run alone on a worker (see ``Ledger._isolate``), nothing is written
to the queue: the listener of an isolated worker would take it and join the
group. Every message on the queue is also in ``out`` until a worker reports
taking it, so ending a generation just drops the queue.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from ._distribution import Distribution
from ._ledger import Ledger, Msg, Outcome, Slot, SlotState
from ._pipes import SharedQueue

__all__ = ["BarrierDistribution"]

logger = logging.getLogger("looppool")


class Host(Protocol):
    """What barrier mode needs of its pool."""

    name: str

    @property
    def _ledger(self) -> Ledger: ...

    @property
    def _accepting_respawns(self) -> bool: ...

    def _tell_all_to_stop(self, cancel: bool | None = None) -> None: ...

    def _respawn(self, slot: Any, death: bool = True) -> None: ...

    def _give_up_on(self, slot: Any) -> bool: ...

    def _channel_sent(self, slot: Any) -> int: ...

    def _send_cancel(self, slot: Any, mid: int) -> None: ...

    @property
    def _max_messages(self) -> int | None: ...

    def _maybe_retire(self) -> None: ...


class BarrierDistribution(Distribution):
    """Shared messages through one queue and a Barrier; a death restarts every worker."""

    def __init__(self, host: Host, ctx: Any, loop: asyncio.AbstractEventLoop, size: int) -> None:
        self._host = host
        self._ctx = ctx
        self._loop = loop
        self._size = size
        self._queue: SharedQueue | None = None
        self._barrier: Any = None
        # Shared messages accepted and not yet taken by a worker, by id.
        self._out: dict[int, Msg] = {}
        # The generation is ending: its workers were told to stop; and
        # whether for a death (its replacements count as respawns) or only to
        # recycle a worker.
        self._regenerating = False
        self._for_death = False
        # Shared messages withdrawn (their submit was cancelled) after they
        # were written to the queue: a worker that takes one cancels it.
        self._withdrawn: set[int] = set()

    # -- the generation's shared objects ------------------------------------------

    def start(self) -> None:
        self._queue = SharedQueue(self._ctx, self._loop)
        self._barrier = self._ctx.Barrier(self._size)

    def worker_options(self) -> dict[str, Any]:
        assert self._queue is not None
        return {"shared_queue": self._queue.reader, "barrier": self._barrier}

    def _close_queue(self) -> None:
        self._withdrawn.clear()  # a new queue holds none of them
        # What it did not take is still in _out: the next generation gets it
        # again, or the stopping pool counts it lost.
        if self._queue is None:
            return
        self._queue.close()
        # Drop the generation's semaphores now, while nothing else runs: their
        # finalizers unregister them from multiprocessing's resource tracker.
        # Left to a pool caught in a reference cycle, they would be collected
        # whenever the cyclic GC runs, possibly inside the resource tracker's
        # own call (Python 3.13: "ResourceTracker called reentrantly ... might
        # leak"), which a test run hit.
        self._queue = None
        self._barrier = None

    def close(self) -> list[Msg]:
        self._close_queue()
        unassigned = list(self._out.values())
        self._out.clear()
        return unassigned

    # -- messages -------------------------------------------------------------------

    def place(self, msg: Msg) -> bool:
        self._out[msg.id] = msg
        if self._writing():
            self._write(msg)
        return True

    def _writing(self) -> bool:
        return (
            self._queue is not None
            and not self._regenerating
            and not self._host._ledger.isolating()
        )

    def _write(self, msg: Msg) -> None:
        assert self._queue is not None
        self._queue.put(
            msg.id,
            msg.reply is not None,
            msg.payload,
            self._needs(msg),
            msg.timeout,
            None if msg.trace is None else (msg.trace, msg.delivery),
        )

    def _needs(self, msg: Msg) -> tuple[int, ...]:
        """How many channel messages each worker must have read before it starts ``msg``.

        Those it was sent already, and those waiting to be sent that were put
        before ``msg``: from one producer, a message put to a worker starts
        there before a shared message put after it (the seed's "set each
        worker's state, then work" pattern needs that order).
        """
        needs = []
        for slot in self._host._ledger.slots:
            queue = slot.queue
            if not queue or queue[-1].id < msg.id:
                before = len(queue)  # the usual case: msg is newer than all of them
            else:
                before = sum(m.id < msg.id for m in queue)
            needs.append(self._host._channel_sent(slot) + before)
        return tuple(needs)

    def _write_backlog(self) -> None:
        for msg in sorted(self._out.values(), key=lambda m: m.id):
            self._write(msg)

    def taken(self, slot: Slot, mid: int) -> None:
        msg = self._out.pop(mid, None)
        if msg is not None:
            self._host._ledger.take(slot, msg)
            if self._host._max_messages is not None:
                self._host._maybe_retire()
        elif mid in self._withdrawn:
            self._withdrawn.discard(mid)
            self._host._send_cancel(slot, mid)

    def withdraw(self, msg: Msg) -> None:
        if self._out.pop(msg.id, None) is msg:
            self._host._ledger.end(msg, Outcome.CANCELLED)
            if self._queue is not None:
                self._withdrawn.add(msg.id)

    def retire(self, slot: Slot) -> bool:
        # One worker cannot leave a Barrier: the whole generation is replaced.
        self._begin_restart(death=False)
        return True

    def find(self, mid: int) -> Msg | None:
        return self._out.pop(mid, None)

    def resend_cancelled(self, slot: Slot, msg: Msg) -> bool:
        if self._regenerating and self._host._accepting_respawns:
            # Cancelled by a generation restart, not by the user: it is sent
            # again once this worker has said goodbye (see _on_worker_end).
            slot.held[msg.id] = msg
            return True
        return False

    def isolation_over(self) -> None:
        if self._writing():
            self._write_backlog()

    # -- deaths and generations -------------------------------------------------------

    def worker_died(self, slot: Slot) -> None:
        if self._host._accepting_respawns:
            # Begin the restart first: what the dead worker held must not go
            # back on this generation's queue, where a stopping survivor would
            # take it and count a delivery it never ran.
            self._begin_restart(death=True)

    def worker_ended(self, slot: Slot) -> bool:
        self._maybe_finish_generation()
        return True

    def _begin_restart(self, death: bool) -> None:
        self._for_death = self._for_death or death
        if self._regenerating:
            return
        self._regenerating = True
        logger.warning(
            "pool %s: restarting every worker (distribution='barrier' cannot replace one)",
            self._host.name,
        )
        # A retirement lets every worker finish what it holds, whatever its
        # class: cancelling a plain Worker's messages to send them again
        # would restart them for ever when the next generation retires as
        # soon (max_messages_per_worker below a batch) - no progress at all.
        self._host._tell_all_to_stop(cancel=None if death else False)

    def _maybe_finish_generation(self) -> None:
        """Once the old generation has exited, start a new one and send again what it left."""
        host = self._host
        slots = host._ledger.slots
        if not self._regenerating or any(s.alive for s in slots):
            return
        self._regenerating = False
        if not host._accepting_respawns:
            return
        for slot in slots:
            if host._give_up_on(slot):
                return
        self._close_queue()
        self.start()
        death, self._for_death = self._for_death, False
        for slot in slots:
            assert slot.state is SlotState.DEAD
            host._respawn(slot, death)
        if self._writing():
            self._write_backlog()
