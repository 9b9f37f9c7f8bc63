"""A state machine over the ledger alone: accepts, sends, ends, deaths, withdrawals and drains.

``looppool._ledger.Ledger`` is plain synchronous code, so this machine drives
one directly, as ``_core`` does, with no process and no event loop: it sets
the slots' states itself (a death is DEAD, then ``worker_died()``, then
STARTING; a replacement becomes READY and is ``mark()``-ed), plays the
workers (``take_batches()`` is what they were sent; ``finish()`` what they
report), and keeps a model of every accepted message beside it.

A *poison* message kills every worker that runs it; a *crash* kills a worker
whatever it holds, noticed at once or only after writes to it failed
(``unsend()``). After every step the model checks that each accepted message
is in exactly one place (a queue, a worker, a suspect group) or has ended,
exactly once and as the model expects; that the counters add up; that a
SafeWorker message is lost only after ``MAX_STRIKES`` deaths alone (an
innocent one only after that many crashes, never of a neighbour's poison);
that ``redelivered`` counts the sends again; that shared messages go round
the dealable workers; and that ``drained(epoch)`` says exactly whether the
messages accepted before that ``begin_drain()`` have ended. Whenever it runs
the pool until idle (at will, on a graceful stop, before a fresh pool replaces
a stopped or broken one, and at the end), nothing may stall: every message ends.

The default run takes a few seconds; ``LOOPPOOL_PROPERTY_SCALE=20`` hunts
twenty times longer, as for ``test_properties``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from looppool._ledger import MAX_STRIKES, Ledger, Msg, Outcome, Slot, SlotState

kinds = st.sampled_from(["ok", "ok", "ok", "fail", "poison"])
workers = st.sampled_from([None, None, None, None, 0, 1, 2, 3])  # modulo the size: half shared
picks = st.integers(0, 1000)  # which of the candidates, modulo their number


class RecordingLedger(Ledger):
    """A Ledger that notes every ``end()``: each message must end exactly once."""

    def __init__(self, size: int, concurrency: int, slots: list[Slot]) -> None:
        super().__init__(size, concurrency, slots)
        self.ends: list[tuple[Msg, Outcome]] = []

    def end(self, msg: Msg, outcome: Outcome) -> None:
        self.ends.append((msg, outcome))
        super().end(msg, outcome)


@dataclass(eq=False)
class Model:
    """What the model knows of one accepted message."""

    msg: Msg
    kind: str  # "ok", "fail" or "poison" (kills every worker that runs it)
    target: int | None  # worker=k, or None: dealt in fair rounds
    submit: bool  # it has a reply: its submit() can be cancelled
    worker: int | None = None  # the slot whose current worker holds it
    owed: int | None = None  # the slot whose next worker must run it alone (a suspect)
    death: int = -1  # while owed: the death that made it a suspect ...
    held_then: int = 0  # ... and how many messages that worker held
    sends: int = 0  # batches that reached a worker with it
    resends: int = 0  # of those, as a suspect
    suspected: int = 0  # deaths that made it a suspect (each adds a delivery)
    strikes: int = 0  # deaths while it was the only message its worker held
    crashes_alone: int = 0  # of those, crashes (not its own poison)
    withdrawn: bool = False  # its submit() was cancelled while a worker held it
    outcome: Outcome | None = None

    @property
    def id(self) -> int:
        return self.msg.id

    def __repr__(self) -> str:
        where = (
            f"held by {self.worker}"
            if self.worker is not None
            else f"a suspect of {self.owed} (death {self.death})"
            if self.owed is not None
            else "waiting"
        )
        return (
            f"<message {self.id} {self.kind} to {self.target}: {where}, {self.outcome}, "
            f"sent {self.sends}x, {self.strikes} strikes, {self.crashes_alone} crashes alone"
            f"{', withdrawn' if self.withdrawn else ''}>"
        )


class LedgerMachine(RuleBasedStateMachine):
    """Drives one Ledger as the pool does and checks it against a model after every step."""

    SAFE: ClassVar[bool]  # SafeWorker (suspects run again) or Worker (what a death held is lost)

    def __init__(self) -> None:
        super().__init__()
        self.size = 0
        self.concurrency = 0
        self.patience = 0  # messages accepted before the pool may stop or break
        self.ledger: RecordingLedger | None = None
        self.forget()

    def forget(self) -> None:
        """A fresh model, for a fresh pool."""
        self.models: dict[int, Model] = {}
        self.running = True  # accepting messages and respawning workers
        self.gone: set[int] = set()  # crashed, not noticed yet: writes to them fail
        self.isolating: set[int] = set()  # slots whose worker runs a suspect group alone
        self.deaths = 0
        self.redelivered = 0  # the model's count of messages made suspects
        self.resends = 0  # suspects that reached a worker again
        self.dropped = 0  # suspects that ended before they were sent again
        self.drains: list[tuple[int, frozenset[int]]] = []  # (epoch, pending at begin_drain)
        self.deals: list[int] = []  # the slot each shared message was dealt to, in order
        self.dealable_since: dict[int, int] = {}  # slot -> len(deals) when it became dealable
        self.last_directed: dict[int, int] = {}  # slot -> id of the last directed first send

    # -- helpers -----------------------------------------------------------------

    @property
    def books(self) -> RecordingLedger:
        assert self.ledger is not None
        return self.ledger

    def slot(self, number: int) -> Slot:
        return self.books.slots[number]

    def pending(self) -> list[Model]:
        return [m for m in self.models.values() if m.outcome is None]

    def held_by(self, number: int) -> list[Model]:
        return sorted((m for m in self.pending() if m.worker == number), key=lambda m: m.id)

    def owed_to(self, number: int) -> list[Model]:
        return [m for m in self.pending() if m.owed == number]

    def dealable(self, number: int) -> bool:
        """The model's view: ready, not running suspects alone, none waiting to."""
        return (
            self.slot(number).state is SlotState.READY
            and number not in self.isolating
            and not self.owed_to(number)
        )

    def working(self, number: int) -> bool:
        """Whether slot ``number`` has a worker that runs what it holds (and can die of it)."""
        return self.slot(number).state in (SlotState.READY, SlotState.STOPPING) and (
            number not in self.gone
        )

    def where(self, msg: Msg) -> list[int]:
        """The slots whose queue holds ``msg`` (one, if it waits in a queue)."""
        return [s.number for s in self.books.slots if any(m is msg for m in s.queue)]

    def record_ends(self, expected: dict[int, Outcome]) -> None:
        """Check the ends the ledger recorded since the last call against ``expected``."""
        ends, self.books.ends = self.books.ends, []
        got: dict[int, Outcome] = {}
        for msg, outcome in ends:
            model = self.models[msg.id]
            assert msg.id not in got, f"{model} ended twice: {got[msg.id]} then {outcome}"
            assert model.outcome is None, f"{model} ended twice: then {outcome}"
            got[msg.id] = outcome
        assert got == expected, f"ended {got}, expected {expected}"
        for mid, outcome in got.items():
            model = self.models[mid]
            model.outcome = outcome
            model.worker = None
            if model.owed is not None:
                model.owed = None
                self.dropped += 1
            if outcome is Outcome.LOST and self.running and self.SAFE:
                assert model.strikes == MAX_STRIKES, f"{model} lost with {model.strikes} strikes"
                if model.kind != "poison":
                    assert model.crashes_alone >= MAX_STRIKES, f"innocent {model} lost"

    def die(self, number: int, crash: bool) -> None:
        """Slot ``number``'s worker ended: the pool rescues what it held, then replaces it."""
        slot = self.slot(number)
        redeliver = self.running  # the pool's _accepting_respawns
        held = self.held_by(number)
        live = [m for m in held if not m.withdrawn]
        expected = {m.id: Outcome.CANCELLED for m in held if m.withdrawn}
        if redeliver and self.SAFE:
            if len(live) == 1:
                live[0].strikes += 1
                live[0].crashes_alone += crash
            if len(live) == 1 and live[0].strikes >= MAX_STRIKES:
                expected[live[0].id] = Outcome.LOST
            else:
                for m in live:
                    m.owed, m.death, m.held_then = number, self.deaths, len(live)
                    m.suspected += 1
                self.redelivered += len(live)
        else:
            expected.update((m.id, Outcome.LOST) for m in live)
        if not redeliver:
            expected.update((msg.id, Outcome.LOST) for msg in slot.queue)
            expected.update((m.id, Outcome.LOST) for m in self.owed_to(number))
        for m in held:
            m.worker = None
        shared = [msg for msg in slot.queue if msg.target is None]
        self.isolating.discard(number)
        self.gone.discard(number)
        self.deaths += 1
        slot.state = SlotState.DEAD
        lost = sorted(msg.id for msg in self.books.worker_died(slot, redeliver))
        losing = sorted(mid for mid, outcome in expected.items() if outcome is Outcome.LOST)
        assert lost == losing, f"worker_died() lost {lost}, expected {losing}"
        self.record_ends(expected)
        if not redeliver:
            assert not slot.queue, f"{slot} keeps messages"
            assert not slot.suspects, f"{slot} keeps suspects"
            return
        # What it had not been sent: directed messages wait for the
        # replacement, shared ones are dealt again to a ready worker if any.
        assert all(msg.target == number for msg in slot.queue), f"{slot.queue} wait for {slot}"
        ready = any(s.state is SlotState.READY for s in self.books.slots)
        for msg in shared:
            (now,) = self.where(msg)
            if ready:
                assert self.slot(now).state is SlotState.READY, f"{msg} dealt to {self.slot(now)}"
        slot.state = SlotState.STARTING

    def send(self) -> None:
        """Send what the ledger has room for (the pool's _pump), playing the workers' pipes."""
        for slot, batch in self.books.take_batches():
            number = slot.number
            assert slot.state is SlotState.READY, slot
            if number in self.gone:
                # The write fails: it never reached the worker (not a delivery).
                self.books.unsend(slot, batch)
                continue
            models = [self.models[msg.id] for msg in batch]
            assert models, "an empty batch"
            for m in models:
                assert m.outcome is None, f"{m} sent after it ended"
                assert m.worker is None, f"{m} sent while a worker holds it"
                assert m.target in (None, number), f"{m} sent to worker {number}"
            owed = [m for m in models if m.owed is not None]
            if owed:
                # A suspect group runs alone on a worker that holds nothing,
                # and it is (part of) one half of one death's suspects.
                assert len(owed) == len(models), f"suspects sent with others: {models}"
                assert all(m.owed == number for m in owed), models
                assert not self.held_by(number), f"suspects joined {self.held_by(number)}"
                assert len({m.death for m in owed}) == 1, f"suspects of two deaths: {models}"
                held_then = owed[0].held_then
                half = 1 if held_then == 1 else (held_then + 1) // 2
                assert len(owed) <= half, f"{models}: more than half of {held_then}"
                # The newest death's suspects go first (bisecting it to the end
                # finds a culprit in the fewest deaths), its first half first.
                others = [m for m in self.owed_to(number) if m not in owed]
                newest = max(m.death for m in [*owed, *others])
                assert owed[0].death == newest, f"{models} sent before newer suspects"
                first = min(m.id for m in [*owed, *others] if m.death == newest)
                assert first in {m.id for m in owed}, f"{models} sent before message {first}"
                self.isolating.add(number)
                for m in owed:
                    m.owed = None
                    m.resends += 1
                self.resends += len(owed)
            else:
                assert number not in self.isolating, f"{models} joined a suspect group"
                assert not self.owed_to(number), f"{models} sent before the suspects"
                for m in models:
                    assert m.sends == 0, f"{m} sent again though it was no suspect"
                    if m.target is not None:
                        last = self.last_directed.get(number, -1)
                        assert m.id > last, f"{m} sent to worker {number} after {last}"
                        self.last_directed[number] = m.id
            for m in models:
                m.sends += 1
                m.worker = number
            assert len(self.held_by(number)) <= self.concurrency, slot
        assert not self.books.dirty, "take_batches() left dirty slots"

    def accept_one(self, kind: str, worker: int | None, submit: bool) -> None:
        """Accept one message (worker: modulo the size) and check where it waits."""
        target = None if worker is None else worker % self.size
        dealable = {n for n in range(self.size) if self.dealable(n)}
        reply = object() if submit else None
        msg = self.books.accept(kind, target, reply)
        self.models[msg.id] = Model(msg, kind, target, submit)
        self.record_ends({})
        (number,) = self.where(msg)
        if target is not None:
            assert number == target, f"{msg} queued for worker {number}"
            return
        # Fair rounds skip a worker being replaced or running suspects alone
        # (what was dealt to it would wait) while another can take it.
        assert number in dealable or not dealable, (
            f"{msg} dealt to worker {number} ({self.slot(number)}) though "
            f"{sorted(dealable)} could take it"
        )
        self.deals.append(number)

    def make_ready(self, number: int) -> None:
        """Slot ``number``'s replacement finished initialising (the pool's _on_ready)."""
        slot = self.slot(number)
        assert slot.state is SlotState.STARTING
        slot.state = SlotState.READY
        slot.delivered = 0
        self.books.mark(slot)

    def finish_one(self, m: Model, cancelled: bool) -> None:
        """The worker holding ``m`` reports it ended (cancelled: as its submit() asked)."""
        assert m.worker is not None
        number = m.worker
        slot = self.slot(number)
        if cancelled:
            outcome = Outcome.CANCELLED
        elif not self.running and not self.SAFE:
            outcome = Outcome.LOST  # a stopping Worker cancels what it holds
        else:
            outcome = Outcome.FAILED if m.kind == "fail" else Outcome.PROCESSED
        assert slot.held.pop(m.id) is m.msg
        over = self.books.finish(slot, m.msg, outcome)
        self.record_ends({m.id: outcome})
        ended_isolation = number in self.isolating and not self.held_by(number)
        if ended_isolation:
            self.isolating.discard(number)
        quiet = not self.isolating and not any(x.owed is not None for x in self.pending())
        assert over == (ended_isolation and quiet), f"finish() said {over}"

    def finishable(self) -> list[Model]:
        """Messages a working worker holds that can end (a poison one only if cancelled)."""
        return [
            m
            for m in self.pending()
            if m.worker is not None
            and self.working(m.worker)
            and (m.kind != "poison" or m.withdrawn)
        ]

    def poisoned(self) -> list[int]:
        """Working workers holding a poison message whose submit was not cancelled."""
        return sorted(
            {
                m.worker
                for m in self.pending()
                if m.kind == "poison" and not m.withdrawn and m.worker is not None
            }
            & {n for n in range(self.size) if self.working(n)}
        )

    def crashable(self) -> list[int]:
        """Slots with a worker (starting, ready or stopping) whose crash is not pending."""
        return [n for n in range(self.size) if self.slot(n).alive and n not in self.gone]

    def step_towards_idle(self) -> bool:
        """Take one step that brings the pool nearer to idle; False if there is none."""
        if self.gone:
            self.die(min(self.gone), crash=True)
            return True
        for slot in self.books.slots:
            if slot.state is SlotState.STARTING and self.running:
                self.make_ready(slot.number)
                return True
        if self.books.dirty:
            self.send()
            return True
        poisoned = self.poisoned()
        if poisoned:
            self.die(poisoned[0], crash=False)
            return True
        held = self.finishable()
        if held:
            self.finish_one(held[0], cancelled=held[0].withdrawn)
            return True
        for slot in self.books.slots:
            if slot.state is SlotState.STOPPING and not slot.held:
                slot.state = SlotState.DEAD  # it finished what it held and exited
                return True
        return False

    # -- rules -----------------------------------------------------------------

    @initialize(
        size=st.integers(2, 4),
        concurrency=st.integers(1, 3),
        patience=st.sampled_from([15, 5, 40]),
    )
    def start(self, size: int, concurrency: int, patience: int) -> None:
        """A pool of ``size`` ready workers, each sent at most ``concurrency`` messages."""
        self.size, self.concurrency, self.patience = size, concurrency, patience
        self.open()

    def open(self) -> None:
        """A new pool's books, its workers all ready."""
        self.forget()
        slots = [Slot(n) for n in range(self.size)]
        for slot in slots:
            slot.state = SlotState.READY
        self.ledger = RecordingLedger(self.size, self.concurrency, slots)
        self.ledger.safe = self.SAFE

    def close(self) -> None:
        """Run until idle: every accepted message has ended, and every drain is over."""
        self.run_until_idle()
        assert self.books.lose_all() == [], "lose_all() found messages after idle"
        self.record_ends({})
        assert all(m.outcome is not None for m in self.models.values()), self.pending()
        assert all(self.books.drained(epoch) for epoch, _ in self.drains), self.drains

    @precondition(lambda self: self.running)
    @rule(kind=kinds, worker=workers, submit=st.booleans())
    def accept(self, kind: str, worker: int | None, submit: bool) -> None:
        """put() or submit() a message, directed to a worker or dealt in fair rounds."""
        self.accept_one(kind, worker, submit)

    @precondition(lambda self: self.running)
    @rule(
        batch=st.lists(st.tuples(kinds, workers, st.booleans()), min_size=2, max_size=8),
        send=st.booleans(),
    )
    def accept_many(self, batch: list[tuple[str, int | None, bool]], send: bool) -> None:
        """Several messages at once (then sent, or not yet), so that workers hold full windows."""
        for kind, worker, submit in batch:
            self.accept_one(kind, worker, submit)
        if send:
            self.send()

    @precondition(lambda self: self.books.dirty)
    @rule()
    def pump(self) -> None:
        """Send what the windows have room for; a crashed, unnoticed worker's batch comes back."""
        self.send()

    @precondition(lambda self: self.finishable())
    @rule(pick=picks, cancel=st.booleans())
    def finish(self, pick: int, cancel: bool) -> None:
        """A worker reports a message it held ended (processed, failed, or cancelled if asked)."""
        held = self.finishable()
        m = held[pick % len(held)]
        self.finish_one(m, cancelled=m.withdrawn and (cancel or m.kind == "poison"))

    def ackable(self) -> list[Model]:
        """Messages that may end as plain processed ones (a worker's EV_ACKS)."""
        return [
            m
            for m in self.finishable()
            if m.kind == "ok" and not m.withdrawn and (self.running or self.SAFE)
        ]

    @precondition(lambda self: self.ackable())
    @rule(pick=picks, data=st.data())
    def finish_acks(self, pick: int, data: st.DataObject) -> None:
        """A worker acks processed messages at once; what processed_many leaves ends one by one."""
        numbers = sorted({m.worker for m in self.ackable() if m.worker is not None})
        number = numbers[pick % len(numbers)]
        acked = data.draw(st.permutations([m for m in self.ackable() if m.worker == number]))
        isolating = number in self.isolating
        rest = self.books.processed_many(self.slot(number), [m.id for m in acked])
        ended = [m for m in acked if m.id not in rest]
        assert not (isolating and ended), "processed_many ended a suspect group's message"
        assert all(m.msg.reply is None for m in ended), "processed_many ended a submit"
        self.record_ends({m.id: Outcome.PROCESSED for m in ended})
        for m in acked:
            if m.id in rest:
                self.finish_one(m, cancelled=False)

    @precondition(lambda self: self.poisoned())
    @rule(pick=picks)
    def poison_kills(self, pick: int) -> None:
        """A worker running a poison message dies of it, with whatever else it held."""
        poisoned = self.poisoned()
        self.die(poisoned[pick % len(poisoned)], crash=False)

    @precondition(lambda self: self.crashable())
    @rule(pick=picks, noticed=st.booleans())
    def crash(self, pick: int, noticed: bool) -> None:
        """A worker crashes whatever it holds: noticed at once, or only later (writes fail)."""
        crashable = self.crashable()
        number = crashable[pick % len(crashable)]
        slot = self.slot(number)
        if noticed or slot.state is not SlotState.READY:
            self.die(number, crash=True)
        else:
            self.gone.add(number)

    @precondition(lambda self: self.gone)
    @rule(pick=picks)
    def notice(self, pick: int) -> None:
        """The pool notices a crash it had missed, and rescues what that worker held."""
        gone = sorted(self.gone)
        self.die(gone[pick % len(gone)], crash=True)

    @precondition(
        lambda self: self.running and any(s.state is SlotState.STARTING for s in self.books.slots)
    )
    @rule(pick=picks, crashes_at_once=st.booleans(), send=st.booleans())
    def ready(self, pick: int, crashes_at_once: bool, send: bool) -> None:
        """A replacement is ready (maybe crashed at once, unnoticed); then sent to, or not yet."""
        starting = [s.number for s in self.books.slots if s.state is SlotState.STARTING]
        number = starting[pick % len(starting)]
        self.make_ready(number)
        if crashes_at_once:
            self.gone.add(number)  # what is sent to it comes back (unsend)
        if send:
            self.send()

    @precondition(lambda self: any(m.submit and not m.withdrawn for m in self.pending()))
    @rule(pick=picks)
    def withdraw(self, pick: int) -> None:
        """A submit() is cancelled: withdrawn if no worker holds it, else cancelled there."""
        submits = [m for m in self.pending() if m.submit and not m.withdrawn]
        m = submits[pick % len(submits)]
        slot = self.books.withdraw(m.msg)
        if m.worker is not None:
            assert slot is self.slot(m.worker), f"withdraw({m}) gave {slot}"
            assert m.msg.cancelled, f"withdraw({m}) did not mark it cancelled"
            m.withdrawn = True
            self.record_ends({})
        else:
            assert slot is None, f"withdraw({m}) gave {slot}, but no worker holds it"
            self.record_ends({m.id: Outcome.CANCELLED})

    @precondition(lambda self: self.running or self.pending())
    @rule()
    def begin_drain(self) -> None:
        """drain() begins: it waits for exactly the messages accepted before it."""
        waited = frozenset(m.id for m in self.pending())
        epoch = self.books.begin_drain()
        if not waited:
            assert epoch is None, f"begin_drain() gave {epoch} with nothing pending"
            return
        assert epoch is not None, f"begin_drain() gave None with {sorted(waited)} pending"
        self.drains.append((epoch, waited))

    @precondition(lambda self: self.pending() or self.gone)
    @rule()
    def run_until_idle(self) -> None:
        """Deliver, finish and rescue until nothing can move: then every message has ended."""
        for _ in range(10_000):
            if not self.step_towards_idle():
                break
        else:
            raise AssertionError("the pool never became idle")
        assert not self.pending(), f"stalled: {self.pending()}, {self.books.slots}"
        assert self.books.pending == 0, self.books.pending
        assert not self.isolating, "isolating, though idle"
        assert not self.books.isolating(), "isolating, though idle"
        assert self.books.begin_drain() is None, "begin_drain() waits, with nothing pending"

    @precondition(lambda self: self.running and len(self.models) >= self.patience)
    @rule(graceful=st.booleans())
    def stop(self, graceful: bool) -> None:
        """stop(): a SafeWorker pool runs everything first; else what waits is lost at once."""
        if graceful and self.SAFE:
            self.run_until_idle()
            self.running = False
        else:
            self.running = False
            waiting = [m for m in self.pending() if m.worker is None]
            lost = self.books.lose_queued()
            assert sorted(msg.id for msg in lost) == sorted(m.id for m in waiting), lost
            self.record_ends({m.id: Outcome.LOST for m in waiting})
        for slot in self.books.slots:
            if slot.state is SlotState.STARTING:
                # A replacement not launched yet never will be (the pool's _respawn).
                slot.state = SlotState.DEAD
                assert self.books.lose_waiting(slot) == [], f"{slot} still had messages"
            elif slot.alive:
                slot.state = SlotState.STOPPING  # takes nothing more

    @precondition(lambda self: self.running and len(self.models) >= self.patience)
    @rule()
    def break_pool(self) -> None:
        """The pool breaks (a worker keeps failing to start): everything pending is lost."""
        pending = self.pending()
        self.running = False
        lost = self.books.lose_all()
        assert sorted(msg.id for msg in lost) == sorted(m.id for m in pending), lost
        self.record_ends({m.id: Outcome.LOST for m in pending})
        self.isolating.clear()
        self.gone.clear()
        for slot in self.books.slots:
            slot.state = SlotState.DEAD  # killed
        assert not self.books.isolating(), "isolating after lose_all()"

    @precondition(lambda self: not self.running)
    @rule()
    def start_again(self) -> None:
        """The stopped (or broken) pool ends with every message ended; a new one starts."""
        self.close()
        self.open()

    # -- invariants ----------------------------------------------------------------

    @invariant()
    def every_message_is_in_one_place(self) -> None:
        """Each pending message is queued, held or a suspect, once, where the model says."""
        seen: dict[int, str] = {}
        for slot in self.books.slots:
            number = slot.number
            places = [
                *((msg, "queued") for msg in slot.queue),
                *((msg, "held") for msg in slot.held.values()),
                *((msg, "suspect") for group in slot.suspects for msg in group),
            ]
            for msg, place in places:
                assert msg.id not in seen, f"{msg} {seen[msg.id]} and {place} at {number}"
                seen[msg.id] = f"{place} at {number}"
                m = self.models[msg.id]
                assert m.msg is msg, f"{msg} is not {m}"
                assert m.outcome is None, f"{m} is {place} at {number}"
                if place == "held":
                    assert m.worker == number, f"{m} held at {number}"
                elif place == "suspect":
                    assert m.owed == number, f"{m} a suspect at {number}"
                    assert m.worker is None, f"{m} a suspect at {number}"
                else:
                    assert m.owed is None, f"{m} queued at {number}"
                    assert m.worker is None, f"{m} queued at {number}"
                    assert m.target in (None, number), f"{m} queued at {number}"
            assert all(mid == msg.id for mid, msg in slot.held.items()), slot.held
            assert all(group for group in slot.suspects), f"an empty suspect group at {slot}"
            assert slot.taken == 0, slot
        assert set(seen) == {m.id for m in self.pending()}, "a pending message is nowhere"

    @invariant()
    def nothing_sendable_is_forgotten(self) -> None:
        """A ready worker with room and something to send is in ``dirty`` (it will be sent)."""
        for slot in self.books.slots:
            number = slot.number
            if slot.state is not SlotState.READY or number in self.gone or slot.isolating:
                continue  # (a crash not noticed yet: its death rescues what waits)
            if slot.suspects:
                sendable = not slot.held
            else:
                sendable = bool(slot.queue) and len(slot.held) < self.concurrency
            assert not sendable or slot in self.books.dirty, f"{slot} is not in dirty"

    @invariant()
    def counts_add_up(self) -> None:
        """put == processed + failed + lost + cancelled + pending, and each as the model says."""
        c = self.books.counts
        outcomes = [m.outcome for m in self.models.values()]
        assert c.put == len(self.models), c
        assert self.books.pending == outcomes.count(None), (c, self.books.pending)
        assert c.processed == outcomes.count(Outcome.PROCESSED), c
        assert c.failed == outcomes.count(Outcome.FAILED), c
        assert c.lost == outcomes.count(Outcome.LOST), c
        assert c.cancelled == outcomes.count(Outcome.CANCELLED), c
        assert c.put == c.processed + c.failed + c.lost + c.cancelled + self.books.pending, c

    @invariant()
    def suspects_as_modelled(self) -> None:
        """Strikes, isolation and ``redelivered`` follow the deaths the model saw."""
        ledger = self.books
        for m in self.models.values():
            assert m.msg.strikes == m.strikes, m
            assert m.msg.delivery == 1 + m.suspected, (m, m.msg.delivery)
            assert m.sends == 1 + m.resends or (m.sends == 0 and m.resends == 0), m
        owed = sum(m.owed is not None for m in self.pending())
        assert ledger.counts.redelivered == self.redelivered, ledger.counts
        assert self.redelivered == self.resends + owed + self.dropped, (
            f"redelivered {self.redelivered}: {self.resends} sent again, {owed} waiting, "
            f"{self.dropped} ended first"
        )
        if not self.SAFE:
            assert self.redelivered == 0, "a Worker's message was made a suspect"
        for slot in ledger.slots:
            assert slot.isolating == (slot.number in self.isolating), slot
            assert slot.dealable == self.dealable(slot.number), slot
        assert ledger.isolating() == bool(owed or self.isolating), "isolating() is wrong"

    @invariant()
    def drained_exactly_when_its_messages_ended(self) -> None:
        """drained(epoch) is true exactly when every message pending at its begin_drain ended."""
        for epoch, waited in self.drains:
            done = all(self.models[mid].outcome is not None for mid in waited)
            assert self.books.drained(epoch) == done, (epoch, sorted(waited))

    @invariant()
    def track_dealing(self) -> None:
        """Shared messages go round: no worker gains more than 2 over one dealable throughout.

        From the moment worker t is dealable and stays so, every round dealt
        includes it, and a round deals each worker at most once: another
        worker can gain on t only the rest of the round under way and the
        part of the current one dealt before t's turn.
        """
        deals = self.deals
        for number in range(self.size):
            if not self.dealable(number):
                self.dealable_since.pop(number, None)
                continue
            since = self.dealable_since.setdefault(number, len(deals))
            recent = deals[since:]
            mine = recent.count(number)
            for other in range(self.size):
                assert recent.count(other) - mine <= 2, (
                    f"worker {other} got {recent.count(other)} shared messages, and worker "
                    f"{number}, dealable all along, {mine}: {recent}"
                )

    def teardown(self) -> None:
        """Run until idle: every accepted message has ended, and every drain is over."""
        if self.ledger is None or sys.exc_info()[1] is not None:
            return  # (a step failed: its error is the one to report, not what follows)
        self.close()


class SafeLedgerMachine(LedgerMachine):
    """A SafeWorker pool's books: what a death held runs again, alone, until it is poison."""

    SAFE = True


class WorkerLedgerMachine(LedgerMachine):
    """A Worker pool's books: what a death held is lost; what it had not been sent is not."""

    SAFE = False


#: Multiplies the number of examples, for a longer hunt: LOOPPOOL_PROPERTY_SCALE=20 pytest ...
SCALE = int(os.environ.get("LOOPPOOL_PROPERTY_SCALE", "1"))

LEDGER = settings(
    max_examples=120 * SCALE,
    stateful_step_count=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_safe_worker_ledger_keeps_its_books() -> None:
    """Random accepts, sends, ends, poison, crashes, withdrawals and drains: SafeWorker books."""
    run_state_machine_as_test(SafeLedgerMachine, settings=LEDGER)


def test_worker_ledger_keeps_its_books() -> None:
    """The same machine on a Worker ledger: a death loses what it held, nothing else."""
    run_state_machine_as_test(WorkerLedgerMachine, settings=LEDGER)


def _ready_ledger(size: int) -> tuple[Ledger, list[Slot]]:
    """A SafeWorker ledger of ``size`` ready workers, windows of one."""
    slots = [Slot(n) for n in range(size)]
    for slot in slots:
        slot.state = SlotState.READY
    ledger = Ledger(size, 1, slots)
    ledger.safe = True
    return ledger, slots


def _dealt_to(slots: list[Slot], msg: Msg) -> int:
    """The worker whose queue holds ``msg``."""
    (number,) = [s.number for s in slots if msg in s.queue]
    return number


@pytest.mark.parametrize("worker_1", ["starting", "running suspects"])
def test_a_shared_message_skips_a_worker_not_dealable(worker_1: str) -> None:
    """A shared message goes to a dealable worker, not to one being replaced or isolating."""
    ledger, slots = _ready_ledger(2)
    assert _dealt_to(slots, ledger.accept("a", None, None)) == 0  # the round [0, 1] begins
    ledger.accept("b", 1, None)
    assert len(list(ledger.take_batches())) == 2  # worker 0 holds a, worker 1 holds b
    slots[1].state = SlotState.DEAD  # worker 1 dies with b ...
    ledger.worker_died(slots[1], True)
    slots[1].state = SlotState.STARTING  # ... and its replacement starts
    if worker_1 == "running suspects":
        slots[1].state = SlotState.READY
        ledger.mark(slots[1])
        assert [batch for _, batch in ledger.take_batches()] == [[slots[1].held[1]]]
        assert slots[1].isolating  # b runs alone on the replacement
    assert slots[0].dealable
    assert not slots[1].dealable
    # The round [0, 1] ends on worker 1, which cannot take it: a new round begins.
    assert _dealt_to(slots, ledger.accept("c", None, None)) == 0
