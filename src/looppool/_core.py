"""The parent's bookkeeping, shared by :class:`~looppool.Pool` and ``RayPool``.

A pool keeps, per worker number, a *slot*: the messages dealt to it and not
yet sent (``queue``), and those sent and not yet finished (``held``). Every
accepted message ends as exactly one of processed, failed or lost, and the
counters, ``drain()``, ``max_pending`` and ``submit()`` futures all follow from
that one ledger. Everything here runs on the parent's event loop, so it needs
no locks.

What differs between pools — how a worker is started, how a batch reaches it,
how its death is learnt — is left to the subclass (the methods at the end).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import itertools
import logging
import pickle
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any, Final, Generic, Self, TypeVar

from . import _protocol as P
from . import _tracing
from ._errors import (
    LooppoolError,
    PoolBroken,
    PoolClosed,
    QueueFull,
    RemoteError,
    RemoteTraceback,
    WorkerLost,
    WorkerStartError,
)
from ._worker import Worker

logger = logging.getLogger("looppool")

DEFAULT_CONCURRENCY: Final = 1000
DEFAULT_MAX_PENDING: Final = 10_000
# A SafeWorker message that was running alone in a worker when that worker
# died has a *strike*; at this many strikes it is a poison message, failed
# with WorkerLost rather than sent again.
MAX_STRIKES: Final = 2
MAX_START_FAILURES: Final = 3  # consecutive failed replacements of one worker before giving up
RESPAWN_BACKOFF: Final = 0.1  # seconds, doubled per consecutive failure

ResultCallback = Callable[[Any], Awaitable[None] | None]


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of a pool's counters, from ``pool.stats()``.

    ``put`` counts messages accepted (a broadcast counts once per worker);
    every accepted message ends as exactly one of ``processed``, ``failed``
    (its handler raised) or ``lost`` (its worker died, or the pool stopped
    before running it), or is still ``pending``. ``redelivered`` counts
    deliveries after a ``SafeWorker`` died, ``respawns`` the
    replacement workers started, ``blocked`` the blocked-loop episodes
    reported, and ``in_flight`` the messages each worker holds now.
    """

    put: int
    processed: int
    failed: int
    lost: int
    results: int
    pending: int
    redelivered: int
    respawns: int
    blocked: int
    in_flight: tuple[int, ...]


class State(enum.Enum):
    """A pool's life cycle."""

    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class SlotState(enum.Enum):
    """The life cycle of the worker currently serving a slot."""

    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"  # told to stop
    DEAD = "dead"


class Msg:
    """One accepted message, until it is processed, failed or lost."""

    __slots__ = ("delivery", "epoch", "future", "id", "payload", "strikes", "target", "trace")

    def __init__(
        self,
        mid: int,
        payload: bytes,
        target: int | None,
        future: asyncio.Future[Any] | None,
        epoch: int,
    ) -> None:
        self.id = mid
        self.payload = payload
        self.target = target
        self.future = future
        self.epoch = epoch
        # Deaths of a worker in which this message was the only one it held.
        self.strikes = 0
        # Tracing (issue 14): the caller's trace context, carried to the
        # worker with the message (None: no span was current), and which
        # delivery of the message this is: 1, then one more each time a
        # worker holding it died and it is sent again (stats().redelivered).
        self.trace: _tracing.Carrier | None = None
        self.delivery = 1


class Slot:
    """One worker number, and the worker (process or actor) serving it now."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.state = SlotState.DEAD
        self.pid: int | None = None
        self.queue: deque[Msg] = deque()
        self.held: dict[int, Msg] = {}
        # Groups of messages that a dead worker of this number held, each to
        # be run alone on a worker of this number (its replacement) before it
        # takes anything else: a death while a group runs alone is charged to
        # that group only. See _quarantine.
        self.suspects: deque[list[Msg]] = deque()
        # A suspect group is in flight: nothing joins it until it is done.
        self.isolating = False
        self.ready: asyncio.Future[None] | None = None
        self.exited: asyncio.Future[Any] | None = None
        self.start_error: tuple[str, str] | None = None
        self.said_bye = False
        self.killed = False
        self.failures = 0
        # Worker metrics (issue 14): the last EV_METRICS gauges of the worker
        # serving this slot; None until it reports, and again once it ends.
        self.metrics: Mapping[str, float] | None = None

    @property
    def alive(self) -> bool:
        return self.state is not SlotState.DEAD

    @property
    def dealable(self) -> bool:
        """Whether fair rounds deal to it now: ready, and not isolating suspects."""
        return self.state is SlotState.READY and not (self.isolating or self.suspects)


S = TypeVar("S", bound=Slot)


class PoolCore(Generic[S]):
    """The parent API and its ledger; subclasses start, feed and watch workers."""

    _noun = "worker"  # what a worker is called in messages: "worker", "actor"
    # How replies and results are decoded (InlinePool(pickle=False): as they are).
    _loads: Callable[[Any], Any] = staticmethod(pickle.loads)

    def __init__(
        self,
        worker: type[Worker] | Callable[[], Worker],
        size: int,
        *,
        concurrency: int,
        max_pending: int,
        on_result: ResultCallback | None,
        name: str | None,
    ) -> None:
        if not callable(worker):
            raise TypeError(f"worker must be a Worker subclass or a callable, not {worker!r}")
        if isinstance(worker, type) and not issubclass(worker, Worker):
            raise TypeError(
                f"worker class {worker.__qualname__} does not derive from looppool.Worker"
            )
        check_int("size", size)
        check_int("concurrency", concurrency)
        check_int("max_pending", max_pending)
        if on_result is not None and not callable(on_result):
            raise TypeError(f"on_result must be callable, not {on_result!r}")
        self._factory = worker
        self._size = size
        self._concurrency = concurrency
        self._max_pending = max_pending
        self._on_result = on_result
        self._on_result_async = on_result is not None and (
            inspect.iscoroutinefunction(on_result)
            or inspect.iscoroutinefunction(getattr(on_result, "__call__", None))  # noqa: B004
        )
        self.name = name if name is not None else describe_factory(worker)
        # A class (or a partial of one) tells now whether it is a SafeWorker;
        # an opaque factory is settled when its first worker reports ready.
        self._safe = is_safe(worker)

        self._state = State.NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: list[S] = [self._new_slot(n) for n in range(size)]
        self._ids = itertools.count()
        self._round: deque[int] = deque()
        self._redeal_turn = 0
        self._dirty: dict[S, None] = {}
        self._pump_scheduled = False
        self._pending = 0
        self._room_waiters: deque[asyncio.Future[None]] = deque()
        self._epoch = 0
        self._epoch_counts: dict[int, int] = {}
        self._drain_waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._result_buf: deque[Any] = deque()
        self._result_waiter: asyncio.Future[None] | None = None
        self._callback_task: asyncio.Task[None] | None = None
        self._delivered = 0  # results handed to an async on_result and finished
        self._delivered_waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._stopped = asyncio.Event()
        self._no_more_results = False
        self._stop_begun = False
        self._accepting_respawns = False
        self._broken: PoolBroken | None = None
        self._closing_reason = "the pool is stopped"
        self._n_put = 0
        self._n_processed = 0
        self._n_failed = 0
        self._n_lost = 0
        self._n_results = 0
        self._n_redelivered = 0
        self._n_respawns = 0
        self._n_blocked = 0

    # -- public properties ----------------------------------------------------

    @property
    def size(self) -> int:
        """The number of workers."""
        return self._size

    @property
    def pids(self) -> tuple[int | None, ...]:
        """The pid of each worker's current process (``None`` while it has none)."""
        return tuple(s.pid if s.alive else None for s in self._slots)

    def stats(self) -> PoolStats:
        """Return a frozen snapshot of the pool's counters."""
        return PoolStats(
            put=self._n_put,
            processed=self._n_processed,
            failed=self._n_failed,
            lost=self._n_lost,
            results=self._n_results,
            pending=self._pending,
            redelivered=self._n_redelivered,
            respawns=self._n_respawns,
            blocked=self._n_blocked,
            in_flight=tuple(len(s.held) for s in self._slots),
        )

    def worker_metrics(self) -> dict[int, Mapping[str, float]]:
        """The latest resource gauges of each worker, by worker number (read-only).

        Filled when the pool forwards them (``worker_metrics=True``): every
        ``metrics_interval`` seconds, and once before the worker is ready,
        each worker sends what :class:`~looppool.metrics.ResourceReporter`
        measures — ``cpu`` (share of a core over the last interval; absent
        from the first report), ``rss`` and ``maxrss`` (bytes), ``loop.lag``
        (milliseconds), ``loop.tasks`` (and ``loop.ready``, ``loop.timers``
        on asyncio's loop) — plus ``start_time``, when it started (after its
        ``initialise()``; seconds since the Unix epoch). A worker that died
        is left out until its replacement reports. Empty when the pool
        forwards no worker metrics.
        """
        return {s.number: MappingProxyType(dict(s.metrics)) for s in self._slots if s.metrics}

    # -- life cycle -------------------------------------------------------------

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
        if self._state is not State.NEW:
            raise PoolClosed(f"{self!r} was already started; a pool starts once")
        self._loop = asyncio.get_running_loop()
        self._state = State.STARTING
        try:
            self._before_start()
            for slot in self._slots:
                slot.ready = self._loop.create_future()
                self._launch(slot)
            await self._await_ready([s.ready for s in self._slots if s.ready is not None])
            if self._stop_begun:
                # stop() killed the workers, but every one had reported ready
                # first (a race with fast workers): the start still failed.
                raise PoolClosed("stop() was called while the pool was starting")
        except BaseException as exc:
            for slot in self._slots:
                if slot.ready is not None and not slot.ready.done():
                    # Nobody awaits these any more (start() was cancelled, or
                    # another worker failed): a worker killed below must not
                    # leave an error nobody retrieves.
                    slot.ready.cancel()
            await self._kill_all()
            self._finish()
            if self._stop_begun and isinstance(exc, WorkerStartError):
                raise PoolClosed("stop() was called while the pool was starting") from exc
            raise
        if self._on_result_async:
            self._callback_task = self._loop.create_task(self._run_callbacks())
        self._state = State.RUNNING
        self._accepting_respawns = True
        self._deal_round()

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
        if self._state is State.NEW:
            self._state = State.STOPPED
            self._stopped.set()
            self._no_more_results = True  # results() of a pool never started ends at once
            return
        if self._stop_begun:
            await self._stopped.wait()
            return
        self._stop_begun = True
        if self._state is State.STARTING:
            # start() is awaiting the workers in another task: end them; it
            # cleans up and raises PoolClosed.
            await self._kill_all()
            await self._stopped.wait()
            return
        self._state = State.STOPPING
        self._wake_all_room_waiters()
        try:
            async with asyncio.timeout(timeout):
                await self._stop_workers(graceful)
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
        if graceful and self._safe:
            # Every message accepted so far runs; replacements stay on so that
            # a death while draining does not strand the messages it held.
            while self._pending and self._broken is None:
                await self._drain_upto(self._epoch)
        else:
            self._closing_reason = "the pool stopped before the message was processed"
            self._drop_queued()
        self._accepting_respawns = False
        self._tell_all_to_stop()
        exits = [s.exited for s in self._slots if s.exited is not None and not s.exited.done()]
        if exits:
            await asyncio.wait(exits)
        # Every worker has ended, so every result is in: let the async
        # on_result consumer finish the backlog, then end.
        self._no_more_results = True
        self._wake_results()
        if self._callback_task is not None:
            await self._callback_task

    def _finish(self) -> None:
        """Release everything once no worker runs (or none could start)."""
        self._state = State.STOPPED
        self._accepting_respawns = False
        self._release()
        self._lose_all(PoolClosed(self._closing_reason))
        for waiters in (self._drain_waiters, self._delivered_waiters):
            while waiters:
                fut = waiters.popleft()[1]
                if not fut.done():
                    fut.set_result(None)
        if self._callback_task is not None and not self._callback_task.done():
            self._callback_task.cancel()
        self._stopped.set()
        self._no_more_results = True
        self._wake_results()

    async def _kill_all(self) -> None:
        # No replacement may start for a worker we are killing on purpose.
        self._accepting_respawns = False
        self._kill_alive()
        exits = [s.exited for s in self._slots if s.exited is not None and not s.exited.done()]
        if exits:
            # Shielded: a killed worker is reported within moments; waiting
            # for that must not be abandoned because the caller is cancelled.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(asyncio.wait(exits))

    # -- sending --------------------------------------------------------------

    def _pickle(self, message: Any) -> bytes:
        if self._state is not State.RUNNING:
            self._raise_closed()
        try:
            return pickle.dumps(message, P.PROTOCOL)
        except Exception as exc:
            raise TypeError(
                f"the message {short_repr(message)} cannot be pickled, so it cannot be "
                f"sent to a {self._noun}: {type(exc).__name__}: {exc}"
            ) from exc

    def _raise_closed(self) -> None:
        if self._broken is not None:
            raise self._broken
        if self._state is State.NEW or self._state is State.STARTING:
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

    async def put(self, message: Any, *, worker: int | None = None) -> None:
        """Send a message; wait while ``max_pending`` messages are pending.

        The message is pickled here, so one that cannot be pickled raises
        ``TypeError`` at once. ``worker=k`` sends it to worker ``k``; without
        it, messages are dealt to the workers in fair rounds.
        """
        self._check_target(worker)
        payload = self._pickle(message)
        if self._pending >= self._max_pending:
            await self._wait_for_room()
        self._accept(payload, worker, None)

    def put_nowait(self, message: Any, *, worker: int | None = None) -> None:
        """Send a message, or raise :class:`~looppool.QueueFull` if ``max_pending`` are pending."""
        self._check_target(worker)
        payload = self._pickle(message)
        if self._pending >= self._max_pending:
            raise QueueFull(
                f"{self._pending} messages are pending in {self.name!r} (max_pending="
                f"{self._max_pending}); await put() to wait for room"
            )
        self._accept(payload, worker, None)

    async def broadcast(self, message: Any) -> None:
        """Send a message to every worker, each exactly once."""
        payload = self._pickle(message)
        if self._pending >= self._max_pending:
            await self._wait_for_room()
        for number in range(self._size):
            self._accept(payload, number, None)

    async def submit(self, message: Any, *, worker: int | None = None) -> Any:
        """Send a message and return what ``process_message`` returned for it.

        If the handler raised, the same exception is raised here with the
        worker's traceback as its ``__cause__`` (:class:`~looppool.RemoteTraceback`);
        an exception that cannot be pickled becomes :class:`~looppool.RemoteError`.
        If the worker died holding it, :class:`~looppool.WorkerLost` is raised.
        """
        self._check_target(worker)
        payload = self._pickle(message)
        if self._pending >= self._max_pending:
            await self._wait_for_room()
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        self._accept(payload, worker, future)
        return await future

    async def drain(self) -> None:
        """Return once every message put before the call is finished and its results are in."""
        if self._state is State.NEW:
            return
        await self._drain_upto(self._epoch)
        if self._broken is not None:
            raise self._broken
        if self._on_result_async:
            await self._delivered_upto(self._n_results)

    async def _drain_upto(self, epoch: int) -> None:
        if not self._epoch_counts or next(iter(self._epoch_counts)) > epoch:
            return
        assert self._loop is not None
        self._epoch += 1  # messages accepted from now on are not waited for
        fut: asyncio.Future[None] = self._loop.create_future()
        self._drain_waiters.append((epoch, fut))
        await fut

    async def _wait_for_room(self) -> None:
        assert self._loop is not None
        while self._pending >= self._max_pending:
            if self._state is not State.RUNNING:
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
        if self._state is not State.RUNNING:
            self._raise_closed()

    def _wake_room(self) -> None:
        while self._room_waiters:
            fut = self._room_waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def _wake_all_room_waiters(self) -> None:
        while self._room_waiters:
            fut = self._room_waiters.popleft()
            if not fut.done():
                fut.set_result(None)

    def _accept(
        self, payload: bytes, target: int | None, future: asyncio.Future[Any] | None
    ) -> None:
        msg = Msg(next(self._ids), payload, target, future, self._epoch)
        msg.trace = _tracing.capture()  # Tracing (issue 14): None unless a span is current
        counts = self._epoch_counts
        counts[msg.epoch] = counts.get(msg.epoch, 0) + 1
        self._pending += 1
        self._n_put += 1
        if target is not None:
            self._enqueue(self._slots[target], msg)
        elif not self._share(msg):
            self._enqueue(self._slots[self._next_in_round()], msg)

    def _next_in_round(self) -> int:
        """Fair rounds: each round deals one message to every live worker, in order."""
        slots = self._slots
        while True:
            if not self._round:
                self._deal_round()
            number = self._round.popleft()
            if slots[number].dealable or not any(slots[n].dealable for n in self._round):
                return number

    def _deal_round(self) -> None:
        # A worker running a suspect group alone is skipped, as one being
        # replaced is: what was dealt to it would wait for the whole group.
        ready = [s.number for s in self._slots if s.dealable]
        if not ready:
            ready = [s.number for s in self._slots if s.state is SlotState.READY]
        if not ready:
            # Every worker is being replaced: deal to those starting; their
            # messages wait in the parent until they are ready.
            ready = [s.number for s in self._slots if s.state is SlotState.STARTING]
        if not ready:
            raise self._broken or PoolBroken(f"pool {self.name!r} has no worker left")
        self._round.extend(ready)

    def _enqueue(self, slot: S, msg: Msg) -> None:
        slot.queue.append(msg)
        if slot.state is SlotState.READY and len(slot.held) < self._concurrency:
            self._mark_dirty(slot)

    def _mark_dirty(self, slot: S) -> None:
        if (slot.queue or slot.suspects) and slot.state is SlotState.READY:
            self._dirty[slot] = None
            if not self._pump_scheduled:
                self._pump_scheduled = True
                assert self._loop is not None
                self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        """Move queued messages into each worker's window: one batch per worker per turn."""
        self._pump_scheduled = False
        dirty, self._dirty = self._dirty, {}
        window = self._concurrency
        for slot in dirty:
            if slot.state is not SlotState.READY or slot.isolating:
                continue  # a suspect group runs alone: nothing joins it
            queue, held = slot.queue, slot.held
            if slot.suspects:
                if held:
                    continue  # it runs alone: wait until this worker holds nothing
                batch = slot.suspects.popleft()
                slot.isolating = True
            else:
                room = min(window - len(held), len(queue))
                if room <= 0:
                    continue
                batch = [queue.popleft() for _ in range(room)]
            for msg in batch:
                held[msg.id] = msg
            self._send(slot, batch)

    def _drop_queued(self) -> None:
        """Lose every message not yet sent to a worker (a non-graceful stop)."""
        exc = PoolClosed(f"the pool stopped before the message was sent to a {self._noun}")
        for slot in self._slots:
            while slot.queue:
                self._lose(slot.queue.popleft(), exc)
            self._lose_suspects(slot, exc)

    def _lose_suspects(self, slot: S, exc: LooppoolError) -> None:
        while slot.suspects:
            for msg in slot.suspects.popleft():
                self._lose(msg, exc)

    def _unsend(self, slot: S, batch: list[Msg]) -> None:
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

    # -- receiving ------------------------------------------------------------

    def _dispatch(self, slot: S, items: list[tuple[Any, ...]]) -> None:
        """Handle a batch of events from a worker (see ``_protocol``)."""
        for item in items:
            op = item[0]
            if op == P.EV_DONE:
                self._on_done(slot, item[1], item[2], item[3])
            elif op == P.EV_RESULT:
                self._on_result_payload(item[1])
            elif op == P.EV_LOG:
                self._on_log(slot, item[1])
            elif op == P.EV_TAKEN:
                self._on_taken(slot, item[1])
            elif op == P.EV_READY:
                self._safe = item[2]  # authoritative: the factory's product decides
                self._ready_info(slot, item[3:])
                self._on_ready(slot, item[1])
            elif op == P.EV_START_FAILED:
                slot.start_error = (item[1], item[2])
            elif op == P.EV_BLOCKED:
                self._n_blocked += 1
            elif op == P.EV_METRICS:
                slot.metrics = item[1]  # Worker metrics (issue 14)
            elif op == P.EV_BYE:
                slot.said_bye = True

    def _on_done(self, slot: S, mid: int, status: int, payload: Any) -> None:
        msg = slot.held.pop(mid, None)
        if msg is None:
            msg = self._find_unassigned(mid)
            if msg is None:
                return  # already given up on (its worker was declared lost)
        future = msg.future
        if status == P.DONE_OK:
            self._n_processed += 1
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
        elif status == P.DONE_FAILED:
            self._n_failed += 1
            if future is not None and not future.done():
                future.set_exception(rebuild_exception(payload, self._loads))
        elif slot.state is not SlotState.STOPPING:
            # Cancelled though nobody asked this worker to stop: its loop is
            # being torn down (SystemExit in another message). The worker is
            # dying: keep the message held, so that its death rescues it.
            slot.held[mid] = msg
            return
        elif self._resend_cancelled(slot, msg):
            return
        else:
            self._n_lost += 1
            if future is not None and not future.done():
                future.set_exception(PoolClosed("the pool stopped while the message was running"))
        self._complete(msg)
        if slot.isolating and not slot.held:
            # The group ran alone and ended: its members were innocent.
            slot.isolating = False
            if not any(s.suspects or s.isolating for s in self._slots):
                self._isolation_over()
        self._mark_dirty(slot)

    def _complete(self, msg: Msg) -> None:
        self._pending -= 1
        counts = self._epoch_counts
        left = counts[msg.epoch] - 1
        if left:
            counts[msg.epoch] = left
        else:
            del counts[msg.epoch]
            self._resolve_drains()
        if self._room_waiters:
            self._wake_room()

    def _resolve_drains(self) -> None:
        oldest = next(iter(self._epoch_counts), None)
        waiters = self._drain_waiters
        while waiters and (oldest is None or waiters[0][0] < oldest):
            fut = waiters.popleft()[1]
            if not fut.done():
                fut.set_result(None)

    def _lose(self, msg: Msg, exc: LooppoolError) -> None:
        self._n_lost += 1
        if msg.future is not None and not msg.future.done():
            msg.future.set_exception(exc)
        self._complete(msg)

    def _on_result_payload(self, payload: bytes) -> None:
        self._n_results += 1
        try:
            value = self._loads(payload)
        except Exception:
            logger.exception("pool %s: a result could not be unpickled in the parent", self.name)
            return
        callback = self._on_result
        if callback is None or self._on_result_async:
            self._result_buf.append(value)
            self._wake_results()
            return
        try:
            callback(value)
        except Exception:
            logger.exception("pool %s: on_result raised", self.name)

    def _wake_results(self) -> None:
        waiter = self._result_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _next_result(self) -> tuple[bool, Any]:
        """Wait for the next buffered result; ``(False, None)`` once none can come."""
        while not self._result_buf:
            if self._no_more_results:
                return False, None
            assert self._loop is not None
            waiter = self._result_waiter
            if waiter is None or waiter.done():
                waiter = self._result_waiter = self._loop.create_future()
            await asyncio.shield(waiter)  # several readers may share one waiter
        return True, self._result_buf.popleft()

    async def results(self) -> AsyncIterator[Any]:
        """Yield every result the workers put; end once the pool stopped and all were yielded."""
        if self._on_result is not None:
            raise LooppoolError("this pool sends results to on_result; results() has none to yield")
        while True:
            more, value = await self._next_result()
            if not more:
                return
            yield value

    async def _run_callbacks(self) -> None:
        callback = self._on_result
        assert callback is not None
        while True:
            more, value = await self._next_result()
            if not more:
                return
            try:
                await callback(value)  # type: ignore[misc]
            except Exception:
                logger.exception("pool %s: on_result raised", self.name)
            self._delivered += 1
            waiters = self._delivered_waiters
            while waiters and waiters[0][0] <= self._delivered:
                fut = waiters.popleft()[1]
                if not fut.done():
                    fut.set_result(None)

    async def _delivered_upto(self, count: int) -> None:
        if self._delivered >= count or self._stopped.is_set():
            return
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._delivered_waiters.append((count, fut))
        await fut

    def _on_log(self, slot: S, data: dict[str, Any]) -> None:
        record = logging.makeLogRecord(data)
        record.worker = slot.number
        record.msg = f"[worker {slot.number}] {record.msg}"
        target = logging.getLogger(record.name)
        if target.isEnabledFor(record.levelno):
            target.handle(record)

    def _on_ready(self, slot: S, pid: int | None) -> None:
        if slot.state is SlotState.STOPPING:
            return  # told to stop while initialising: it stops once ready
        slot.state = SlotState.READY
        slot.failures = 0
        if pid is not None:
            slot.pid = pid
        if slot.ready is not None and not slot.ready.done():
            slot.ready.set_result(None)
        slot.ready = None
        if self._state is State.STOPPING and not self._accepting_respawns:
            return
        self._mark_dirty(slot)

    # -- supervision ------------------------------------------------------------

    def _on_worker_end(self, slot: S, cause: str, lost: WorkerLost) -> None:
        """A worker ended (its process exited, its actor died): account and replace.

        ``cause`` describes the end in words; ``lost`` is what a message it
        held fails with, if it is not delivered again.
        """
        previous = slot.state
        slot.state = SlotState.DEAD
        slot.metrics = None  # Worker metrics (issue 14): a dead worker's gauges are stale
        if slot.exited is not None and not slot.exited.done():
            slot.exited.set_result(lost.exitcode)
        if previous is SlotState.STARTING:
            reason, tb = slot.start_error or (cause, "")
            if slot.ready is not None:  # the pool's start() awaits this one
                if not slot.ready.done():
                    slot.ready.set_exception(
                        WorkerStartError(slot.number, reason, tb, lost.exitcode)
                    )
                slot.ready = None
                return
            if not slot.killed:
                slot.failures += 1
                logger.error(
                    "pool %s: replacement of worker %d failed: %s", self.name, slot.number, reason
                )
        elif not (slot.said_bye or slot.killed):
            logger.error(
                "pool %s: worker %d (pid %s) died (%s)", self.name, slot.number, slot.pid, cause
            )
        if previous is SlotState.STOPPING or slot.killed:
            # Told to stop (or killed by us): nothing to replace.
            if slot.said_bye or slot.killed:
                # What it still holds it took but never ran (barrier mode: a
                # message refused after the stop began): send it again, or
                # lose it if the pool is stopping.
                for msg in list(slot.held.values()):
                    self._requeue(slot, msg)
                slot.held.clear()
            else:
                # It died while finishing its messages (a barrier-mode restart
                # stops the survivors, and one may die too): they died with
                # it, and that counts as a delivery, or a message that kills
                # every worker it reaches would be sent for ever.
                self._rescue(slot, lost)
            self._after_stopped_end()
            return
        self._rescue(slot, lost)
        if self._accepting_respawns:
            self._replace(slot)

    def _rescue(self, slot: S, lost: WorkerLost) -> None:
        """Decide the fate of the messages a dead worker held or had queued."""
        held = sorted(slot.held.values(), key=lambda m: m.id)
        slot.held.clear()
        slot.isolating = False
        if self._safe and self._accepting_respawns:
            self._quarantine(slot, held, lost)
        else:
            for msg in held:
                self._lose(msg, lost)
        if not self._accepting_respawns:
            self._lose_suspects(slot, lost)
        # What it had not been sent yet played no part in its death: a
        # directed message waits for the replacement, a shared one is dealt
        # to another worker at once.
        keep: deque[Msg] = deque()
        again: list[Msg] = []
        for msg in slot.queue:
            (keep.append if msg.target is not None else again.append)(msg)
        slot.queue = keep
        if not self._accepting_respawns:
            while slot.queue:
                self._lose(slot.queue.popleft(), lost)
        for msg in again:
            if self._share(msg):
                continue
            others = [s for s in self._slots if s.state is SlotState.READY]
            if not others:
                others = [s for s in self._slots if s is not slot]
            if not others or not self._accepting_respawns:
                if self._accepting_respawns:
                    slot.queue.append(msg)  # a pool of one: wait for the replacement
                else:
                    self._lose(msg, lost)
                continue
            self._redeal_turn = (self._redeal_turn + 1) % len(others)
            self._enqueue(others[self._redeal_turn], msg)

    def _quarantine(self, slot: S, held: list[Msg], lost: WorkerLost) -> None:
        """Charge a SafeWorker's death only to the messages that could have caused it.

        A worker that dies holding several messages says nothing about which
        one killed it, so none is charged: they become *suspects*, split in
        two groups, and each group runs alone on the replacement (nothing else
        joins a worker while a group runs there). A group that dies is split
        again; one that ends was innocent. A message that was the only one
        its worker held when it died gets a strike, and at ``MAX_STRIKES`` it
        is a poison message, failed with ``lost``. So a poison message among
        ``k`` neighbours costs about ``log2(k) + 2`` worker deaths, and every
        neighbour is run again until it finishes: at least once, never lost.
        """
        if not held:
            return
        if len(held) == 1:
            msg = held[0]
            msg.strikes += 1
            if msg.strikes >= MAX_STRIKES:
                self._lose(msg, lost)
                return
            groups = [held]
        else:
            half = len(held) // 2
            groups = [held[:half], held[half:]]
        self._n_redelivered += len(held)
        for msg in held:
            msg.delivery += 1  # Tracing (issue 14): the span shows the redelivery
        # Ahead of older suspects of this number: bisecting one death's
        # suspects to the end finds a culprit in the fewest deaths.
        slot.suspects.extendleft(reversed(groups))

    def _requeue(self, slot: S, msg: Msg) -> None:
        """Send again a message that a stopping worker took but did not run."""
        if not self._accepting_respawns:
            self._lose(msg, PoolClosed(self._closing_reason))
        elif msg.target is not None:
            slot.queue.appendleft(msg)
        elif not self._share(msg):
            self._enqueue(self._slots[self._next_in_round()], msg)

    def _replace(self, slot: S) -> None:
        """Start a replacement for a dead worker, after a back-off if it keeps failing."""
        assert self._loop is not None
        if slot.failures >= MAX_START_FAILURES:
            last = slot.start_error[0] if slot.start_error else f"its {self._noun} died"
            self._break(
                f"worker {slot.number} failed to start {slot.failures} times in a row "
                f"(last: {last})"
            )
            return
        slot.state = SlotState.STARTING  # counts as alive: no second replacement is scheduled
        delay = RESPAWN_BACKOFF * (2 ** (slot.failures - 1)) if slot.failures else 0.0
        self._loop.call_later(delay, self._respawn, slot)

    def _respawn(self, slot: S) -> None:
        if not self._accepting_respawns:
            slot.state = SlotState.DEAD
            closed = PoolClosed(self._closing_reason)
            while slot.queue:
                self._lose(slot.queue.popleft(), closed)
            self._lose_suspects(slot, closed)
            return
        self._n_respawns += 1
        try:
            self._launch(slot)
        except Exception as exc:
            slot.state = SlotState.DEAD
            self._break(f"worker {slot.number} could not be restarted: {exc!r}")
            return
        logger.info("pool %s: worker %d restarted", self.name, slot.number)

    def _break(self, reason: str) -> None:
        """Give up: a worker keeps failing to start. Fail everything, loudly."""
        if self._broken is not None:
            return
        logger.critical("pool %s is broken: %s", self.name, reason)
        self._broken = PoolBroken(f"pool {self.name!r} is broken: {reason}")
        self._closing_reason = str(self._broken)
        self._accepting_respawns = False
        if self._state is State.RUNNING:
            self._state = State.STOPPING
        self._lose_all(self._broken)
        self._kill_alive()

    def _lose_all(self, exc: LooppoolError) -> None:
        """Fail every message not finished, wherever it waits; free their room."""
        for slot in self._slots:
            for msg in [*slot.held.values(), *slot.queue]:
                self._lose(msg, exc)
            slot.held.clear()
            slot.queue.clear()
            slot.isolating = False
            self._lose_suspects(slot, exc)
        self._lose_unassigned(exc)
        self._wake_all_room_waiters()

    def _kill_alive(self) -> None:
        """Kill every live worker, marked as killed on purpose (not replaced, not logged)."""
        for slot in self._slots:
            if slot.alive:
                slot.killed = True
                self._kill(slot)

    def _tell_all_to_stop(self) -> None:
        """Send STOP to every live worker not told yet: finish (SafeWorker) or cancel (Worker)."""
        cancel = not self._safe
        for slot in self._slots:
            if slot.alive and slot.state is not SlotState.STOPPING:
                slot.state = SlotState.STOPPING
                self._send_stop(slot, cancel)

    # -- what a kind of pool provides -------------------------------------------

    def _new_slot(self, number: int) -> S:
        raise NotImplementedError

    def _before_start(self) -> None:
        """Prepare what the workers share (connect to a cluster, make queues)."""

    def _launch(self, slot: S) -> None:
        """Start a worker for ``slot``; it reports EV_READY or ends."""
        raise NotImplementedError

    def _send(self, slot: S, batch: list[Msg]) -> None:
        """Send a batch of messages (now in ``slot.held``) to the slot's worker."""
        raise NotImplementedError

    def _send_stop(self, slot: S, cancel: bool) -> None:
        """Tell the worker to stop: finish (``cancel=False``) or cancel what it holds."""
        raise NotImplementedError

    def _kill(self, slot: S) -> None:
        """End the slot's worker at once; its end is reported as usual."""
        raise NotImplementedError

    def _release(self) -> None:
        """Close what the pool holds once no worker runs."""

    def _share(self, msg: Msg) -> bool:
        """Barrier mode: put a shared message on the shared queue; False if not in use."""
        return False

    def _ready_info(self, slot: S, extra: tuple[Any, ...]) -> None:
        """What a worker reports beyond its pid when ready (an actor: its node)."""

    def _on_taken(self, slot: S, mid: int) -> None:
        """Barrier mode: a worker took a message from the shared queue."""

    def _find_unassigned(self, mid: int) -> Msg | None:
        """Barrier mode: a message finished that no slot was known to hold."""
        return None

    def _lose_unassigned(self, exc: LooppoolError) -> None:
        """Barrier mode: lose the messages still on the shared queue."""

    def _resend_cancelled(self, slot: S, msg: Msg) -> bool:
        """Barrier mode: keep a message cancelled by a generation restart, to send again."""
        return False

    def _after_stopped_end(self) -> None:
        """A stopping worker ended (barrier mode: maybe start the next generation)."""

    def _isolation_over(self) -> None:
        """No suspect group is left to run alone (barrier mode: resume the shared queue)."""


def check_int(name: str, value: object) -> None:
    """Raise ValueError unless ``value`` is a positive int (bools are not ints here)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, not {value!r}")


def is_safe(worker: Any) -> bool:
    """Whether a worker class (or a partial of one) is a SafeWorker."""
    func = getattr(worker, "func", worker)  # functools.partial of a class
    return isinstance(func, type) and issubclass(func, Worker) and func.safe


def describe_factory(worker: Any) -> str:
    """A default pool name: the worker class's (or factory's) name."""
    func = getattr(worker, "func", worker)  # functools.partial
    return str(getattr(func, "__name__", type(func).__name__))


def short_repr(value: Any) -> str:
    """``repr(value)``, at most 80 characters, never raising."""
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__qualname__} object>"
    return text if len(text) <= 80 else text[:77] + "..."


def rebuild_exception(payload: Any, loads: Callable[[Any], Any] = pickle.loads) -> BaseException:
    """Re-create a worker's exception from an EV_DONE failure payload."""
    if payload is None:
        return RemoteError("Exception", "process_message failed", "")
    pickled, type_name, text, tb = payload
    exc: BaseException | None = None
    if pickled is not None:
        try:
            exc = loads(pickled)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteError(type_name, text, tb)
    exc.__cause__ = RemoteTraceback(tb)
    return exc
