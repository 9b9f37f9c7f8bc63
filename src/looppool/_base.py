"""A pool's state, the transport contract, and the plumbing every part shares.

``PoolCore`` (``_core``) is put together from parts that each see this base:
``_lifecycle`` (start, stop, a broken pool), ``_sending`` (put, submit,
broadcast, drain, room), ``_calls`` (run, map, starmap), ``_receiving``
(events from workers, results back-pressure) and ``_supervision`` (deaths,
hangs, recycling, replacements). Here: the attributes they share, set in one
``__init__``; the few methods all of them call (the pump, the wake-ups, the
settling of lost messages); the abstract methods one part provides to another;
and the transport's contract, which ``Pool``, ``RayPool`` and ``InlinePool``
fill in.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import logging
import pickle
import sys
from collections import deque
from collections.abc import (
    Callable,
    Mapping,
)
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Generic, TypeVar

from . import _protocol as P
from ._distribution import Distribution
from ._errors import (
    LooppoolError,
    PoolBroken,
    RemoteError,
    RemoteTraceback,
)
from ._ledger import Ledger, Msg, Outcome, Slot
from ._results import ResultCallback, ResultStream
from ._worker import MessageT, ReplyT, ResultT, Worker

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_MAX_PENDING",
    "DEFAULT_MAX_RESULTS",
    "Farewell",
    "Phase",
    "PoolBase",
    "PoolStats",
    "ResultCallback",
    "WorkerSlot",
]

logger = logging.getLogger("looppool")
_MODULES: Final = sys.modules
_OTEL_TRACE: Final = "opentelemetry.trace"  # what _tracing.capture() looks for first

DEFAULT_CONCURRENCY: Final = 1000
DEFAULT_MAX_PENDING: Final = 10_000
#: Results that may wait unread in the parent while a results() consumer
#: lags, before the pool stops reading what the workers send (see _pause).
DEFAULT_MAX_RESULTS: Final = 4096
#: Seconds between a worker's reports of its memory (max_memory_per_worker).
MEMORY_CHECK: Final = 1.0
MAX_START_FAILURES: Final = 3  # consecutive failed replacements of one worker before giving up
RESPAWN_BACKOFF: Final = 0.1  # seconds, doubled per consecutive failure

# Bound once at import: the per-message paths (put, _dispatch, _on_done) test
# these for every message, and a module global is one look-up where
# ``P.EV_DONE`` or ``Outcome.PROCESSED`` is two.
_EV_DONE: Final = P.EV_DONE
_EV_RESULT: Final = P.EV_RESULT
_EV_RESULTS: Final = P.EV_RESULTS
_EV_ACKS: Final = P.EV_ACKS
_DONE_OK: Final = P.DONE_OK
_PROCESSED: Final = Outcome.PROCESSED


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of a pool's counters, from ``pool.stats()``.

    ``put`` counts messages accepted (a broadcast counts once per worker);
    every accepted message ends as exactly one of ``processed``, ``failed``
    (its handler raised, or ran past its deadline), ``lost`` (its worker
    died, or the pool stopped before running it) or ``cancelled`` (its
    ``submit()`` was cancelled), or is still ``pending``. ``redelivered``
    counts deliveries after a ``SafeWorker`` died, ``respawns`` the
    replacement workers started after deaths, ``blocked`` the blocked-loop
    episodes reported, and ``in_flight`` the messages each worker holds now.
    ``timed_out`` counts the failed messages that ran past their deadline
    (``MessageTimeout``), ``hung`` the workers killed because their loop
    stopped turning (``hang_timeout``), and ``recycled`` the workers retired
    and replaced (``max_messages_per_worker``, ``max_memory_per_worker``).
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
    cancelled: int = 0
    timed_out: int = 0
    hung: int = 0
    recycled: int = 0


class Phase(enum.Enum):
    """A pool's life. Each phase says what the pool accepts.

    ::

        NEW ─► STARTING ─► RUNNING ─► DRAINING ─► STOPPING ─► STOPPED
                  │           │  └──► BROKEN ──────┘ ▲          ▲
                  └───────────┴─────────────────────┴──────────┘ (start failed, or cancelled)
    """

    NEW = "new"
    STARTING = "starting"  # workers initialise; messages are refused
    RUNNING = "running"  # messages accepted; dead workers replaced
    BROKEN = "broken"  # a worker kept failing to start: everything failed; stop() still to come
    DRAINING = "draining"  # stop(): SafeWorker runs what was put; no new messages; replacements on
    STOPPING = "stopping"  # workers told to stop (or killed); nothing replaced
    STOPPED = "stopped"


_RUNNING: Final = Phase.RUNNING  # put() tests it for every message (see _EV_DONE)


class Farewell(enum.Enum):
    """How the current worker of a slot is ending, if the pool knows."""

    NONE = "none"  # still running, or it died unannounced
    BYE = "bye"  # it said goodbye: a clean exit follows
    KILLED = "killed"  # the pool killed it on purpose (stop's timeout, a broken pool)
    HUNG = "hung"  # the pool killed it because its loop stopped turning: a death


class WorkerSlot(Slot):
    """A slot, with what the pool's life cycle keeps of its current worker."""

    def __init__(self, number: int) -> None:
        super().__init__(number)
        self.pid: int | None = None
        # start() awaits this while the worker initialises (None afterwards).
        self.ready: asyncio.Future[None] | None = None
        # Resolved with the exit code when the worker has ended.
        self.exited: asyncio.Future[Any] | None = None
        self.start_error: tuple[str, str] | None = None  # (reason, traceback) from initialise()
        self.farewell = Farewell.NONE
        self.failures = 0  # replacements that failed to start in a row
        # start_timeout: armed when a worker is launched, cancelled when it
        # reports ready or ends; firing, it kills a worker still initialising.
        self.start_timer: asyncio.TimerHandle | None = None
        # The current worker reported ready (initialise() ended); and its
        # start_timeout fired first, so a ready still in its pipe is ignored.
        self.initialised = False
        self.overdue = False
        # hang_timeout: when the parent last heard from the worker (loop.time()),
        # and the stack its hang watcher sent, if any.
        self.last_seen = 0.0
        self.stack = ""
        self.rss = 0  # bytes, as the worker last reported (max_memory_per_worker)
        # Worker metrics: the last EV_METRICS gauges of the worker serving
        # this slot; None until it reports, and again once it ends.
        self.metrics: Mapping[str, float] | None = None

    def cancel_start_timer(self) -> None:
        """Disarm ``start_timeout``'s timer: the worker is ready, has ended, or the pool has."""
        if self.start_timer is not None:
            self.start_timer.cancel()
            self.start_timer = None


S = TypeVar("S", bound=WorkerSlot)


class PoolBase(abc.ABC, Generic[S, MessageT, ReplyT, ResultT]):
    """The state of a pool and the contract of its transport (see the module's docstring)."""

    _noun = "worker"  # what a worker is called in messages: "worker", "actor"
    # Why a hung worker's log has no stack (a transport may know better).
    _no_stack = "it sent no stack: a process stopped by a signal, or stuck outside Python"
    # How replies and results are decoded (InlinePool(pickle=False): as they are).
    _loads: Callable[[Any], Any] = staticmethod(P.loads)

    def __init__(
        self,
        worker: type[Worker[MessageT, ReplyT, ResultT]]
        | Callable[[], Worker[MessageT, ReplyT, ResultT]],
        size: int,
        *,
        concurrency: int,
        max_pending: int,
        on_result: ResultCallback | None,
        name: str | None,
        message_timeout: float | None = None,
        hang_timeout: float | None = None,
        max_messages_per_worker: int | None = None,
        max_memory_per_worker: int | None = None,
        max_results: int | None = DEFAULT_MAX_RESULTS,
        start_timeout: float | None = None,
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
        self._message_timeout = check_seconds("message_timeout", message_timeout)
        self._hang_timeout = check_seconds("hang_timeout", hang_timeout)
        self._start_timeout = check_seconds("start_timeout", start_timeout)
        if max_messages_per_worker is not None:
            check_int("max_messages_per_worker", max_messages_per_worker)
        if max_memory_per_worker is not None:
            check_int("max_memory_per_worker", max_memory_per_worker)
        if max_results is not None:
            check_int("max_results", max_results)
        self._max_messages = max_messages_per_worker
        self._max_memory = max_memory_per_worker
        self._max_results = max_results
        self._factory = worker
        self._size = size
        self._concurrency = concurrency
        self._max_pending = max_pending
        self.name = name if name is not None else describe_factory(worker)
        self._slots: list[S] = [self._new_slot(n) for n in range(size)]
        self._ledger = Ledger(size, concurrency, list(self._slots))
        # A class (or a partial of one) tells now whether it is a SafeWorker;
        # an opaque factory is settled when its first worker reports ready.
        self._ledger.safe = is_safe(worker)
        self._stream = ResultStream(self.name, self._ledger.counts, self._loads, on_result)
        self._stream.on_consumed = self._results_consumed
        self._on_result = on_result
        self._dist = Distribution()
        self._phase = Phase.NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pump_scheduled = False
        self._room_waiters: deque[asyncio.Future[None]] = deque()
        self._drain_waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._stopped = asyncio.Event()
        # Why messages still pending when the pool ends are lost (PoolClosed's text).
        self._end_reason = "the pool is stopped"
        self._broken: PoolBroken | None = None
        # max_results: slots whose results are not read while results() lags,
        # and the submit() calls awaiting a reply (which lift that).
        self._paused: set[S] = set()
        self._awaiting = 0
        self._watchdog: asyncio.TimerHandle | None = None

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
            **self._ledger.counts.as_dict(),
            pending=self._ledger.pending,
            in_flight=tuple(len(s.held) for s in self._slots),
        )

    def _describe(self) -> str:
        """The middle of ``repr()``: name, phase and workers."""
        in_flight = sum(len(s.held) for s in self._slots)
        workers = f"{self._size} {self._noun}{'s' if self._size != 1 else ''}"
        return (
            f"{self.name!r} {self._phase.value}, {workers}{self._transport_info()}, "
            f"{in_flight} in flight, {self._ledger.pending} pending"
        )

    def _transport_info(self) -> str:
        return ""

    @property
    def _accepting_respawns(self) -> bool:
        return self._phase is Phase.RUNNING or (
            self._phase is Phase.DRAINING and self._broken is None
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

    def _schedule_pump(self) -> None:
        if not self._pump_scheduled:
            self._pump_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        """Send what the ledger has room for: one batch per worker per loop turn."""
        self._pump_scheduled = False
        send = self._send
        for slot, batch in self._ledger.take_batches():
            send(slot, batch)  # type: ignore[arg-type]
        if self._max_messages is not None:
            self._maybe_retire()

    # -- settling ---------------------------------------------------------------

    def _after_end(self) -> None:
        """Messages ended: wake the drains and the room waiters that can go on."""
        waiters = self._drain_waiters
        if waiters:
            oldest = self._ledger.oldest_epoch()
            while waiters and (oldest is None or waiters[0][0] < oldest):
                fut = waiters.popleft()[1]
                if not fut.done():
                    fut.set_result(None)
        room = self._max_pending - self._ledger.pending
        while room > 0 and self._room_waiters:
            fut = self._room_waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                room -= 1

    def _settle_lost(self, msgs: list[Msg], exc: LooppoolError) -> None:
        """Fail the replies of messages the ledger counted lost."""
        for msg in msgs:
            future = msg.reply
            if future is not None and not future.done():
                future.set_exception(fresh(exc))
        if msgs:
            self._after_end()

    def _lose_all(self, exc: LooppoolError) -> None:
        """Fail every message not finished, wherever it waits; free their room."""
        lost = self._ledger.lose_all()
        unassigned = self._dist.close()
        for msg in unassigned:
            self._ledger.end(msg, Outcome.LOST)
        self._settle_lost([*lost, *unassigned], exc)
        self._wake_all_room_waiters()

    # -- what the other parts of the pool provide (see PoolCore) ------------------

    @abc.abstractmethod
    def _maybe_retire(self) -> None:
        """Retire a worker past its recycling limits (``_supervision``)."""

    @abc.abstractmethod
    def _results_consumed(self) -> None:
        """The results() consumer took results: resume reading if it caught up (``_receiving``)."""

    @abc.abstractmethod
    def _resume_all(self) -> None:
        """Read every paused worker again (``_receiving``)."""

    @abc.abstractmethod
    async def _drain_past(self, epoch: int | None) -> None:
        """Wait until the messages of epochs before ``epoch`` ended (``_sending``)."""

    @abc.abstractmethod
    def _watch(self) -> None:
        """The watchdog timer's tick (``_supervision``)."""

    @abc.abstractmethod
    def _launched(self, slot: S) -> None:
        """After a launch: a new, uninitialised worker; start_timeout runs (``_supervision``)."""

    @abc.abstractmethod
    def _tell_all_to_stop(self, cancel: bool | None = None) -> None:
        """Send STOP to every live worker (``_supervision``)."""

    @abc.abstractmethod
    def _kill_alive(self) -> None:
        """Kill every live worker on purpose (``_supervision``)."""

    # -- the transport: what a kind of pool provides ------------------------------

    @abc.abstractmethod
    def _new_slot(self, number: int) -> S:
        """Make the slot of worker ``number``: a WorkerSlot with the transport's handles."""

    def _before_start(self) -> None:
        """Prepare what the workers share (connect to a cluster); before any ``_launch``."""

    @abc.abstractmethod
    def _launch(self, slot: S) -> None:
        """Start a worker for ``slot`` and set ``slot.state`` to STARTING.

        Set ``slot.exited`` to a new future. The worker must then report,
        through :meth:`_dispatch`, either ``EV_READY`` or ``EV_START_FAILED``,
        and its end, whatever it is, through :meth:`_on_worker_end` (exactly
        once). May raise if the worker cannot be started at all.
        """

    @abc.abstractmethod
    def _send(self, slot: S, batch: list[Msg]) -> None:
        """Send a batch (already in ``slot.held``) to the slot's worker, in order, without blocking.

        If the batch provably cannot reach the worker (it is gone), call
        ``self._ledger.unsend(slot, batch)``: its end is reported as usual.
        """

    @abc.abstractmethod
    def _send_stop(self, slot: S, cancel: bool) -> None:
        """Tell the worker to stop after what it was sent: finish (or ``cancel``) all it holds."""

    @abc.abstractmethod
    def _kill(self, slot: S) -> None:
        """End the slot's worker at once; its end is reported (``_on_worker_end``) as usual."""

    def _release(self) -> None:
        """Close what the pool holds, once no worker runs."""

    @abc.abstractmethod
    def _send_cancel(self, slot: S, mid: int) -> None:
        """Tell the worker to cancel message ``mid`` if it still runs (its submit was cancelled).

        The worker reports the message as usual (cancelled, or done if it
        finished first).
        """

    def _pause_reading(self, slot: S) -> None:
        """Stop taking in what the worker sends (max_results); its pipe fills and it waits."""

    def _resume_reading(self, slot: S) -> None:
        """Take in what the worker sends again, after :meth:`_pause_reading`."""

    def _ready_info(self, slot: S, extra: tuple[Any, ...]) -> None:
        """What a worker reports beyond its pid when ready (an actor: its node)."""


def check_seconds(name: str, value: object) -> float | None:
    """Return ``value`` as seconds (None stays None); ValueError unless it is a positive number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be None or a positive number of seconds, not {value!r}")
    return float(value)


def fresh(exc: LooppoolError) -> LooppoolError:
    """A copy of ``exc`` (its own object, so each future raises its own traceback)."""
    reduced = exc.__reduce__()
    assert isinstance(reduced, tuple)
    copy: LooppoolError = reduced[0](*reduced[1])
    copy.__cause__ = exc.__cause__
    return copy


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
