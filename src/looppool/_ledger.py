"""The parent's ledger: every accepted message, where it waits, and how it ended.

::

    accept ──► shared? ──yes──► the distribution (barrier mode: its shared queue)
                 │ no, or rounds                       │ a worker took it
                 ▼                                     ▼
            fair rounds ──► slot.queue ──► take_batches() ──► slot.held ──► finish()
                                              ▲                  │ the worker died
                             slot.suspects ───┘                  ▼
                             (run alone)   ◄── worker_died(): lose, isolate, re-deal

Every accepted message ends exactly once, as processed, failed or lost, and
the counts, ``drain()``'s epochs and ``max_pending``'s room all follow from
that. The ledger is plain synchronous code: no event loop, no I/O, no
callbacks into the pool. Its methods change the books and return what the
pool must now do — the messages to settle (their ``reply`` is the pool's
opaque handle, a future), the batches to send — and ``dirty`` lists the
slots that may have something to send. The pool (``_core``) carries it out.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any, Final

__all__ = [
    "MAX_STRIKES",
    "Counts",
    "Ledger",
    "Msg",
    "Outcome",
    "Slot",
    "SlotState",
]

#: A SafeWorker message that was the only one its worker held when that
#: worker died has a *strike*; at this many it is a poison message, failed
#: rather than sent again.
MAX_STRIKES: Final = 2


class SlotState(enum.Enum):
    """The life of the worker (process or actor) serving a slot now."""

    STARTING = "starting"  # launched; initialise() runs; messages wait in the parent
    READY = "ready"  # takes messages
    STOPPING = "stopping"  # told to stop: takes no more, finishes or cancels what it holds
    DEAD = "dead"  # no worker (between a death and its replacement, or after stop)


#: SlotState.READY, bound once: the per-message paths test it (a global is
#: one look-up; an enum member through its class is two).
_READY: Final = SlotState.READY


class Outcome(enum.Enum):
    """How a message ended."""

    PROCESSED = "processed"
    FAILED = "failed"  # its handler raised, or ran past its deadline
    LOST = "lost"  # its worker died, or the pool stopped before running it
    CANCELLED = "cancelled"  # its submit() was cancelled: withdrawn, or cancelled in the worker


_PROCESSED: Final = Outcome.PROCESSED  # the usual outcome, bound once (see _READY)


@dataclass(slots=True)
class Counts:
    """The pool's counters; ``stats()`` copies them into a ``PoolStats``."""

    put: int = 0  # messages accepted (a broadcast counts once per worker)
    processed: int = 0
    failed: int = 0
    lost: int = 0
    results: int = 0  # put_result() values that reached the parent
    redelivered: int = 0  # sends again after a SafeWorker died holding the message
    respawns: int = 0  # replacement workers started after a death
    blocked: int = 0  # blocked-loop episodes the workers reported
    cancelled: int = 0  # ended because their submit() was cancelled
    timed_out: int = 0  # of the failed: cancelled at their deadline (MessageTimeout)
    recycled: int = 0  # workers retired (max_messages/max_memory_per_worker) and replaced
    hung: int = 0  # workers killed because their loop stopped turning (hang_timeout)

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Msg:
    """One accepted message, until it is processed, failed or lost."""

    __slots__ = (
        "cancelled",
        "delivery",
        "epoch",
        "id",
        "payload",
        "reply",
        "strikes",
        "taken",
        "target",
        "timeout",
        "trace",
    )

    def __init__(
        self,
        mid: int,
        payload: Any,
        target: int | None,
        reply: Any,
        epoch: int,
        timeout: float | None = None,
        trace: Any = None,
    ) -> None:
        self.id = mid
        self.payload = payload  # pickled by the caller (bytes), or as is (InlinePool)
        self.target = target  # worker=k, or None: dealt in fair rounds
        self.reply = reply  # the pool's handle (submit()'s future), or None for put()
        self.epoch = epoch  # drain() waits for the epochs before its own
        # Deaths of a worker in which this message was the only one it held.
        self.strikes = 0
        # Held by a worker that took it from barrier mode's shared queue.
        self.taken = False
        self.timeout = timeout  # seconds it may run in a worker, or None
        # Its submit() was cancelled while a worker held it: told to cancel it.
        self.cancelled = False
        # Tracing: the caller's trace context, carried to the worker with the
        # message (None: no span was current; the pool fills it in), and
        # which delivery of the message this is: 1, then one more each time
        # a worker holding it died and it is sent again (counts.redelivered).
        self.trace: Any = trace
        self.delivery = 1

    def __repr__(self) -> str:
        return f"<Msg {self.id} target={self.target} strikes={self.strikes}>"


class Slot:
    """One worker number: what the parent keeps for it, whichever worker serves it now.

    Pools subclass it to add the handles of their kind of worker.
    """

    def __init__(self, number: int) -> None:
        self.number = number
        self.state = SlotState.DEAD
        # Dealt or directed to this number, not sent yet (oldest first).
        self.queue: deque[Msg] = deque()
        # Sent to the current worker and not finished, by id.
        self.held: dict[int, Msg] = {}
        # Groups of messages that a dead worker of this number held, each to
        # run alone on a worker of this number before it takes anything else:
        # a death while a group runs alone is charged to that group only.
        self.suspects: deque[list[Msg]] = deque()
        # A suspect group is in flight: nothing joins it until it is done.
        self.isolating = False
        # Of ``held``, the messages the worker took from barrier mode's shared
        # queue: its own semaphore bounds those, so they take no room in the
        # window for messages sent on its channel (one of them may be waiting
        # for such a message: counting it would deadlock a full window).
        self.taken = 0
        # Messages sent to its current worker (max_messages_per_worker).
        self.delivered = 0
        # Its worker was told to stop so that a fresh one replaces it
        # (recycling): what is dealt to it meanwhile waits for the fresh one.
        self.retiring = False

    @property
    def alive(self) -> bool:
        """Whether a worker serves this slot (starting, ready or stopping)."""
        return self.state is not SlotState.DEAD

    @property
    def dealable(self) -> bool:
        """Whether fair rounds deal to it now: ready, and not isolating suspects."""
        return self.state is SlotState.READY and not (self.isolating or self.suspects)

    def __repr__(self) -> str:
        return (
            f"<Slot {self.number} {self.state.value}: {len(self.queue)} queued, "
            f"{len(self.held)} held, {len(self.suspects)} suspect groups>"
        )


class Ledger:
    """The books of one pool (see the module's docstring).

    ``shared`` is where shared messages go instead of fair rounds (barrier
    mode's shared queue), or None. ``safe`` says whether a dead worker's
    messages are sent again (SafeWorker) or lost (Worker).
    """

    def __init__(self, size: int, concurrency: int, slots: list[Slot]) -> None:
        assert len(slots) == size
        self.size = size
        self.concurrency = concurrency
        self.slots = slots
        self.safe = False
        self.counts = Counts()
        #: Accepted and not yet ended.
        self.pending = 0
        #: Slots that may have something to send: ``take_batches()`` looks at them.
        self.dirty: dict[Slot, None] = {}
        self.shared: SharedPlace | None = None
        self._ids = itertools.count()
        self._cursor = 0  # next_in_round() looks at this worker first
        self._redeal_turn = 0
        # drain(): messages accepted from epoch e on are not waited for by a
        # drain() that began in epoch e - 1. Pending messages per epoch, oldest first.
        self.epoch = 0
        self._epoch_counts: dict[int, int] = {}

    # -- accepting ------------------------------------------------------------------

    def accept(
        self,
        payload: Any,
        target: int | None,
        reply: Any,
        timeout: float | None = None,
        trace: Any = None,
    ) -> Msg:
        """Take a new message into the books and put it where it waits."""
        msg = Msg(next(self._ids), payload, target, reply, self.epoch, timeout, trace)
        if target is not None:
            slot: Slot | None = self.slots[target]
        elif self.shared is not None and self.shared.place(msg):
            slot = None
        else:
            slot = self.slots[self.next_in_round()]  # may raise NoWorkerLeft: nothing counted yet
        counts = self._epoch_counts
        epoch = msg.epoch
        counts[epoch] = counts.get(epoch, 0) + 1
        self.pending += 1
        self.counts.put += 1
        if slot is not None:
            # enqueue(), spelt out: this runs for every message put.
            slot.queue.append(msg)
            if slot.state is _READY and len(slot.held) - slot.taken < self.concurrency:
                self.dirty[slot] = None
        return msg

    def next_in_round(self) -> int:
        """Fair rounds: each round deals one message to every live worker, in order.

        A cursor goes round the workers and deals to the next dealable one
        (``Slot.dealable``: ready, and not running a suspect group alone), so
        between two messages dealt to a dealable worker every other worker
        gets at most one. A worker that becomes dealable again (a replacement
        is ready, an isolation ended) takes its turn when the cursor reaches
        it. Nothing is allocated: this runs for every message dealt.
        """
        slots = self.slots
        size = self.size
        start = number = self._cursor
        while True:
            slot = slots[number]
            number += 1
            if number == size:
                number = 0
            # Slot.dealable, spelt out: a property call and two global
            # look-ups cost more than the test.
            if slot.state is _READY and not slot.isolating and not slot.suspects:
                self._cursor = number
                return slot.number
            if number == start:
                return self._next_not_dealable()

    def _next_not_dealable(self) -> int:
        # Nobody can take a message now: it waits with a worker. One that is
        # ready (running a suspect group alone) before one being replaced,
        # whose messages wait in the parent until it is ready.
        slots = self.slots
        size = self.size
        start = self._cursor
        for ok in (
            lambda s: s.state is SlotState.READY,
            lambda s: s.state is SlotState.STARTING or s.retiring,
        ):
            for k in range(size):
                slot = slots[(start + k) % size]
                if ok(slot):
                    self._cursor = (slot.number + 1) % size
                    return slot.number
        raise NoWorkerLeft

    def enqueue(self, slot: Slot, msg: Msg) -> None:
        """Queue a message for a slot's worker (it is sent when the window has room)."""
        slot.queue.append(msg)
        if slot.state is SlotState.READY and len(slot.held) - slot.taken < self.concurrency:
            self.dirty[slot] = None

    def mark(self, slot: Slot) -> None:
        """Note that a slot may have something to send (it is ready, or has room again)."""
        if (slot.queue or slot.suspects) and slot.state is SlotState.READY:
            self.dirty[slot] = None

    # -- sending ----------------------------------------------------------------------

    def take_batches(self) -> Iterator[tuple[Slot, list[Msg]]]:
        """Move what each dirty slot's window has room for from its queue into ``held``.

        Yields one batch per slot, to be sent as one frame. A suspect group
        goes alone, once its worker holds nothing, and nothing joins it.
        """
        dirty, self.dirty = self.dirty, {}
        window = self.concurrency
        for slot in dirty:
            if slot.state is not SlotState.READY or slot.isolating:
                continue
            held = slot.held
            if slot.suspects:
                if held:
                    continue  # it runs alone: wait until this worker holds nothing
                batch = slot.suspects.popleft()
                slot.isolating = True
            else:
                queue = slot.queue
                room = min(window - len(held) + slot.taken, len(queue))
                if room <= 0:
                    continue
                batch = [queue.popleft() for _ in range(room)]
            for msg in batch:
                if not msg.cancelled:  # (a queued one cancelled is a placeholder: see withdraw)
                    held[msg.id] = msg
            slot.delivered += len(batch)
            yield slot, batch

    def unsend(self, slot: Slot, batch: list[Msg]) -> None:
        """A batch provably never reached the slot's worker (it was gone): not a delivery.

        Its messages go back to the head of the queue, or of the suspects if
        it was a suspect group, so that the dead worker's rescue neither
        charges them with its death nor loses their order.
        """
        for msg in batch:
            slot.held.pop(msg.id, None)
        if slot.isolating:
            slot.isolating = False
            slot.suspects.appendleft(batch)
        else:
            slot.queue.extendleft(reversed(batch))

    # -- ending ----------------------------------------------------------------------

    def finish(self, slot: Slot, msg: Msg, outcome: Outcome) -> bool:
        """A message ``slot``'s worker held has ended. True if that ended an isolation.

        (The caller has taken it out of ``slot.held``.)
        """
        if msg.taken:
            msg.taken = False
            slot.taken -= 1
        self.end(msg, outcome)
        if (slot.queue or slot.suspects) and slot.state is _READY:  # mark(), spelt out
            self.dirty[slot] = None
        if slot.isolating and not slot.held:
            # The group ran alone and ended: its members were innocent.
            slot.isolating = False
            self.mark(slot)
            return not any(s.suspects or s.isolating for s in self.slots)
        return False

    def processed_many(self, slot: Slot, mids: list[int]) -> list[int]:
        """Plain acks: ``slot``'s worker processed these messages, and no reply was asked.

        Ends each as :meth:`finish` would, in one pass: a worker acks a
        whole frame's messages at once (``EV_ACKS``). Returns the ids to be
        finished one by one instead (``finish()``): those ``slot`` does not
        hold, those with a reply to resolve, and every one while the slot
        runs a suspect group alone or holds messages taken from the shared
        queue.
        """
        if slot.isolating or slot.taken:
            return mids
        held = slot.held
        rest: list[int] = []
        ended = 0
        for mid in mids:
            msg = held.get(mid)
            if msg is None or msg.reply is not None:
                rest.append(mid)
                continue
            del held[mid]
            self.end(msg, _PROCESSED)
            ended += 1
        if ended and (slot.queue or slot.suspects) and slot.state is _READY:  # mark()
            self.dirty[slot] = None
        return rest

    def end(self, msg: Msg, outcome: Outcome) -> None:
        """Count a message as ended, wherever it was."""
        if outcome is _PROCESSED:
            self.counts.processed += 1
        elif outcome is Outcome.FAILED:
            self.counts.failed += 1
        elif outcome is Outcome.LOST:
            self.counts.lost += 1
        else:
            self.counts.cancelled += 1
        self.pending -= 1
        counts = self._epoch_counts
        left = counts[msg.epoch] - 1
        if left:
            counts[msg.epoch] = left
        else:
            del counts[msg.epoch]

    def oldest_epoch(self) -> int | None:
        """The epoch of the oldest message still pending, or None if none is."""
        return next(iter(self._epoch_counts), None)

    def begin_drain(self) -> int | None:
        """Start a drain: the epoch it waits past, or None if nothing before it is pending.

        Messages accepted from now on are not waited for.
        """
        oldest = self.oldest_epoch()
        if oldest is None or oldest > self.epoch:
            return None
        self.epoch += 1
        return self.epoch - 1

    def drained(self, epoch: int) -> bool:
        """Whether every message of ``epoch`` and before has ended."""
        oldest = self.oldest_epoch()
        return oldest is None or oldest > epoch

    def lose_queued(self) -> list[Msg]:
        """End as lost every message not sent to a worker yet; return them."""
        lost: list[Msg] = []
        for slot in self.slots:
            lost.extend(_live(slot.queue))
            slot.queue.clear()
            lost.extend(self._take_suspects(slot))
        for msg in lost:
            self.end(msg, Outcome.LOST)
        return lost

    def lose_all(self) -> list[Msg]:
        """End as lost every message the slots hold or queue; return them."""
        lost: list[Msg] = []
        for slot in self.slots:
            lost.extend(self.release_held(slot))
            lost.extend(_live(slot.queue))
            lost.extend(self._take_suspects(slot))
            slot.queue.clear()
            slot.isolating = False
        for msg in lost:
            self.end(msg, Outcome.LOST)
        return lost

    def lose_waiting(self, slot: Slot) -> list[Msg]:
        """End as lost what waits for ``slot``'s next worker (none will start); return it."""
        lost = [*_live(slot.queue), *self._take_suspects(slot)]
        slot.queue.clear()
        for msg in lost:
            self.end(msg, Outcome.LOST)
        return lost

    @staticmethod
    def _take_suspects(slot: Slot) -> list[Msg]:
        taken = [msg for group in slot.suspects for msg in group]
        slot.suspects.clear()
        return taken

    # -- deaths -------------------------------------------------------------------------

    def worker_died(self, slot: Slot, redeliver: bool) -> list[Msg]:
        """Decide the fate of what a dead worker held and had queued; return the lost.

        With ``redeliver`` (a SafeWorker pool that replaces workers) what it
        held becomes suspects (:meth:`_isolate`); otherwise it is lost. What
        it had not been sent played no part in its death: a directed message
        waits for the replacement, a shared one is dealt to another worker
        at once — or lost, without ``redeliver``.
        """
        held = self.release_held(slot)
        slot.isolating = False
        # Those whose submit() was cancelled end as cancelled: never again.
        for msg in held:
            if msg.cancelled:
                self.end(msg, Outcome.CANCELLED)
        held = [msg for msg in held if not msg.cancelled]
        lost: list[Msg] = []
        if redeliver and self.safe:
            lost += self._isolate(slot, held)
        else:
            lost += held
        if not redeliver:
            lost += _live(slot.queue)
            slot.queue.clear()
            lost += self._take_suspects(slot)
        for msg in lost:
            self.end(msg, Outcome.LOST)
        again = [msg for msg in slot.queue if msg.target is None]
        if again:
            slot.queue = deque(msg for msg in slot.queue if msg.target is not None)
            for msg in again:
                self._redeal(slot, msg)
        return lost

    def release_held(self, slot: Slot) -> list[Msg]:
        """Take every message out of ``slot.held`` (its worker ended), oldest first."""
        held = sorted(slot.held.values(), key=lambda m: m.id)
        slot.held.clear()
        for msg in held:
            msg.taken = False
        slot.taken = 0
        return held

    def take(self, slot: Slot, msg: Msg) -> None:
        """A worker took ``msg`` from barrier mode's shared queue: it holds it now."""
        slot.held[msg.id] = msg
        msg.taken = True
        slot.taken += 1
        slot.delivered += 1

    def _redeal(self, dead: Slot, msg: Msg) -> None:
        """Deal a shared message that waited for a dead worker to another one."""
        if self.shared is not None and self.shared.place(msg):
            return
        others = [s for s in self.slots if s.state is SlotState.READY]
        if not others:
            others = [s for s in self.slots if s is not dead]
        if not others:
            dead.queue.append(msg)  # a pool of one: wait for the replacement
            return
        self._redeal_turn = (self._redeal_turn + 1) % len(others)
        self.enqueue(others[self._redeal_turn], msg)

    def _isolate(self, slot: Slot, held: list[Msg]) -> list[Msg]:
        """Charge a SafeWorker's death only to the messages that could have caused it.

        A worker that dies holding several messages says nothing about which
        one killed it, so none is charged: they become *suspects*, split in
        two groups, and each group runs alone on the replacement (nothing else
        joins a worker while a group runs there). A group that dies is split
        again; one that ends was innocent. A message that was the only one
        its worker held when it died gets a strike, and at ``MAX_STRIKES`` it
        is a poison message: returned, to be failed. So a poison message
        among ``k`` neighbours costs about ``log2(k) + 2`` worker deaths, and
        every neighbour runs again until it finishes: at least once, never
        lost.
        """
        if not held:
            return []
        if len(held) == 1:
            msg = held[0]
            msg.strikes += 1
            if msg.strikes >= MAX_STRIKES:
                return [msg]
            groups = [held]
        else:
            half = len(held) // 2
            groups = [held[:half], held[half:]]
        self.counts.redelivered += len(held)
        for msg in held:
            msg.delivery += 1
        # Ahead of older suspects of this number: bisecting one death's
        # suspects to the end finds a culprit in the fewest deaths.
        slot.suspects.extendleft(reversed(groups))
        return []

    def withdraw(self, msg: Msg) -> Slot | None:
        """A message's submit() was cancelled: end it at once if no worker has it.

        Returns the slot whose worker holds it (told to cancel it; it ends
        when that worker reports), or None: withdrawn and ended as cancelled,
        or not in the books any more (ended already, or taken by the
        distribution: the caller asks it).
        """
        for slot in self.slots if msg.target is None else (self.slots[msg.target],):
            if slot.held.get(msg.id) is msg:
                msg.cancelled = True
                return slot
            if msg in slot.queue:
                if self.shared is None:
                    slot.queue.remove(msg)
                else:
                    # Barrier mode: shared messages written already count on
                    # this worker reading it from its channel (see _barrier's
                    # needs): it stays queued, and goes as a placeholder that
                    # runs nothing.
                    msg.cancelled = True
                self.end(msg, Outcome.CANCELLED)
                return None
            for group in slot.suspects:
                if msg in group:
                    group.remove(msg)
                    if not group:
                        slot.suspects.remove(group)
                    self.end(msg, Outcome.CANCELLED)
                    return None
        return None

    def requeue(self, slot: Slot, msg: Msg) -> None:
        """Send again a message a stopping worker took but did not start (barrier mode)."""
        if msg.target is not None:
            slot.queue.appendleft(msg)
        elif self.shared is None or not self.shared.place(msg):
            self.enqueue(self.slots[self.next_in_round()], msg)

    def isolating(self) -> bool:
        """Whether any suspect group waits or runs."""
        return any(s.suspects or s.isolating for s in self.slots)


def _live(queue: deque[Msg]) -> list[Msg]:
    """The messages of a queue that are still pending (not barrier mode's placeholders)."""
    return [msg for msg in queue if not msg.cancelled]


class SharedPlace:
    """Where a distribution other than fair rounds puts shared messages (barrier mode)."""

    def place(self, msg: Msg) -> bool:
        """Take a shared message; False to leave it to fair rounds."""
        return False


class NoWorkerLeft(Exception):
    """Fair rounds found no worker to deal to (every one is dead and none starting)."""
