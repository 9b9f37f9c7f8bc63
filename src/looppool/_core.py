"""The parent API and a pool's life, shared by ``Pool``, ``RayPool`` and ``InlinePool``.

::

    put / submit / broadcast ──► pickle in the caller ──► Ledger.accept ─┐
    drain() ◄── epochs, room ◄───────────────────────────── the ledger ◄─┤
    results() / on_result ◄── ResultStream ◄──┐                           │
                                              │      _pump: Ledger.take_batches
    transport (a subclass): _launch, _send ───┼──────────────────────────►┘
    _dispatch(events from a worker) ──────────┘ EV_DONE → Ledger.finish → settle the reply
    supervision: a worker ended → Ledger.worker_died → fail the lost, replace the worker

The ledger (``_ledger``) keeps the books and does no I/O; the result stream
(``_results``) hands results out; the distribution (``_distribution``) is fair
rounds or barrier mode. This module carries out what the ledger decides, runs
the life cycle (start, stop, a broken pool) and replaces workers. What differs
between pools — how a worker starts, how a batch reaches it, how its end is
learnt — is the transport: the abstract methods at the end, each with its
contract. Everything runs on the parent's event loop, so nothing needs a lock.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import enum
import logging
import pickle
import sys
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
)
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any, Final, Generic, ParamSpec, Self, TypeVar, TypeVarTuple, overload

from . import _functions, _tracing
from . import _protocol as P
from ._distribution import Distribution
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
from ._ledger import Ledger, Msg, NoWorkerLeft, Outcome, Slot, SlotState
from ._results import ResultCallback, ResultStream
from ._worker import Worker

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_MAX_PENDING",
    "Phase",
    "PoolCore",
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

# The types of run(), map() and starmap(): a function's parameters, its
# arguments, and what it returns (an async function's awaitable unwrapped).
ArgsP = ParamSpec("ArgsP")
ArgT = TypeVar("ArgT")
ArgsTs = TypeVarTuple("ArgsTs")
R = TypeVar("R")


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
        # hang_timeout: when the parent last heard from the worker (loop.time()),
        # and the stack its hang watcher sent, if any.
        self.last_seen = 0.0
        self.stack = ""
        self.rss = 0  # bytes, as the worker last reported (max_memory_per_worker)
        # Worker metrics: the last EV_METRICS gauges of the worker serving
        # this slot; None until it reports, and again once it ends.
        self.metrics: Mapping[str, float] | None = None


S = TypeVar("S", bound=WorkerSlot)


class PoolCore(abc.ABC, Generic[S]):
    """The parent API and its life cycle; a transport subclass starts, feeds and watches workers."""

    _noun = "worker"  # what a worker is called in messages: "worker", "actor"
    # How replies and results are decoded (InlinePool(pickle=False): as they are).
    _loads: Callable[[Any], Any] = staticmethod(P.loads)

    def __init__(
        self,
        worker: type[Worker] | Callable[[], Worker],
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

    # -- sending --------------------------------------------------------------

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
        message: Any,
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
        payload = self._pickle(message)
        if self._ledger.pending >= self._max_pending:
            await self._wait_for_room()
        self._accept(payload, worker, None, timeout)

    def put_nowait(
        self, message: Any, *, worker: int | None = None, timeout: float | None = None
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

    async def broadcast(self, message: Any) -> None:
        """Send a message to every worker, each exactly once."""
        payload = self._pickle(message)
        if self._ledger.pending >= self._max_pending:
            await self._wait_for_room()
        for number in range(self._size):
            self._accept(payload, number, None)

    async def submit(
        self,
        message: Any,
        *,
        worker: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (the message's deadline in the worker)
    ) -> Any:
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
        future: asyncio.Future[Any] = self._loop.create_future()
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

    # -- plain functions: a FunctionWorker pool (the work is in _functions) --------

    @overload
    async def run(
        self, fn: Callable[ArgsP, Awaitable[R]], /, *args: ArgsP.args, **kwargs: ArgsP.kwargs
    ) -> R: ...
    @overload
    async def run(
        self, fn: Callable[ArgsP, R], /, *args: ArgsP.args, **kwargs: ArgsP.kwargs
    ) -> R: ...
    async def run(
        self, fn: Callable[ArgsP, Any], /, *args: ArgsP.args, **kwargs: ArgsP.kwargs
    ) -> Any:
        """Call ``fn(*args, **kwargs)`` in a worker of a :class:`~looppool.FunctionWorker` pool.

        Returns what ``fn`` returned (awaited, for an ``async def``), or raises
        what it raised, as :meth:`submit` does. ``fn`` must be picklable by
        reference, a function defined at the top level of a module (a lambda
        raises :exc:`TypeError` here). On a pool of another worker, raises
        :exc:`TypeError`.
        """
        return await self.submit(_functions.make_call(self._factory, fn, args, kwargs))

    @overload
    def map(
        self,
        fn: Callable[[ArgT], Awaitable[R]],
        iterable: Iterable[ArgT] | AsyncIterable[ArgT],
        /,
        *,
        ordered: bool = True,
        window: int | None = None,
    ) -> AsyncGenerator[R, None]: ...
    @overload
    def map(
        self,
        fn: Callable[[ArgT], R],
        iterable: Iterable[ArgT] | AsyncIterable[ArgT],
        /,
        *,
        ordered: bool = True,
        window: int | None = None,
    ) -> AsyncGenerator[R, None]: ...
    def map(
        self,
        fn: Callable[[Any], Any],
        iterable: Iterable[Any] | AsyncIterable[Any],
        /,
        *,
        ordered: bool = True,
        window: int | None = None,
    ) -> AsyncGenerator[Any, None]:
        """Yield ``fn(item)`` for every item, computed in the workers of a FunctionWorker pool.

        ``async for result in pool.map(fn, items):`` — ``items`` is an
        iterable or an async iterable, pulled lazily: at most ``window`` calls
        are submitted and not yet yielded (default: ``size * concurrency``,
        at most ``max_pending``). Results come in input order
        (``ordered=True``) or as they finish. The first exception, a call's
        (as :meth:`submit` raises it) or the iterable's, ends the iteration;
        the calls still in flight are then cancelled, as they are when the
        loop is left early (wrap it in ``contextlib.aclosing`` for that to
        happen at once rather than when the iterator is collected).
        """
        return _functions.map_calls(
            self.submit,
            self._factory,
            fn,
            iterable,
            star=False,
            ordered=ordered,
            window=window,
            default_window=min(self._size * self._concurrency, self._max_pending),
        )

    @overload
    def starmap(
        self,
        fn: Callable[[*ArgsTs], Awaitable[R]],
        iterable: Iterable[tuple[*ArgsTs]] | AsyncIterable[tuple[*ArgsTs]],
        /,
        *,
        ordered: bool = True,
        window: int | None = None,
    ) -> AsyncGenerator[R, None]: ...
    @overload
    def starmap(
        self,
        fn: Callable[[*ArgsTs], R],
        iterable: Iterable[tuple[*ArgsTs]] | AsyncIterable[tuple[*ArgsTs]],
        /,
        *,
        ordered: bool = True,
        window: int | None = None,
    ) -> AsyncGenerator[R, None]: ...
    def starmap(
        self,
        fn: Callable[..., Any],
        iterable: Iterable[Any] | AsyncIterable[Any],
        /,
        *,
        ordered: bool = True,
        window: int | None = None,
    ) -> AsyncGenerator[Any, None]:
        """:meth:`map` for functions of several arguments: yield ``fn(*args)`` for each tuple."""
        return _functions.map_calls(
            self.submit,
            self._factory,
            fn,
            iterable,
            star=True,
            ordered=ordered,
            window=window,
            default_window=min(self._size * self._concurrency, self._max_pending),
        )

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

    # -- hung workers (hang_timeout) and recycling ------------------------------

    def _watch(self) -> None:
        """The pool's one watchdog timer: kill a worker not heard from for ``hang_timeout``."""
        assert self._loop is not None
        assert self._hang_timeout is not None
        now = self._loop.time()
        for slot in self._slots:
            if (
                slot.state in (SlotState.READY, SlotState.STOPPING)
                and slot.farewell is Farewell.NONE
                and slot not in self._paused
                and now - slot.last_seen > self._hang_timeout
            ):
                self._hung(slot, now - slot.last_seen)
        self._watchdog = self._loop.call_later(self._hang_timeout / 4, self._watch)

    def _hung(self, slot: S, silent: float) -> None:
        self._ledger.counts.hung += 1
        where = (
            f"; its loop was {slot.stack}"
            if slot.stack
            else " (it sent no stack: a process stopped by a signal, or stuck outside Python)"
        )
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
        if self._phase is not Phase.RUNNING or any(s.retiring for s in self._slots):
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

    # -- receiving ------------------------------------------------------------

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
        ended = False
        for item in items:
            op = item[0]
            if op == _EV_DONE:
                on_done(slot, item[1], item[2], item[3])
                ended = True
            elif op == _EV_RESULTS:
                add_results(item[1])
            elif op == _EV_ACKS:
                for mid in item[1]:
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

    def results(self) -> AsyncIterator[Any]:
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
        if self._hang_timeout is not None:
            assert self._loop is not None
            slot.last_seen = self._loop.time()  # the clock starts once it is ready
        if self._max_messages is not None or self._max_memory is not None:
            self._maybe_retire()  # another may have waited for this one's recycling
        if self._phase is Phase.RUNNING or self._accepting_respawns:
            self._ledger.mark(slot)
            if self._ledger.dirty:
                self._schedule_pump()

    # -- supervision ------------------------------------------------------------

    def _on_worker_end(self, slot: S, cause: str, lost: WorkerLost) -> None:
        """A worker ended (its process exited, its actor died): account and replace.

        ``cause`` describes the end in words; ``lost`` is what a message it
        held fails with, if it is not delivered again.
        """
        previous = slot.state
        slot.state = SlotState.DEAD
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
                self._replace(slot, death=False)
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

    def _tell_all_to_stop(self) -> None:
        """Send STOP to every live worker not told yet: finish (SafeWorker) or cancel (Worker)."""
        cancel = not self._ledger.safe
        for slot in self._slots:
            if slot.alive and slot.state is not SlotState.STOPPING:
                slot.state = SlotState.STOPPING
                self._send_stop(slot, cancel)

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
