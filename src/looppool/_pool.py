"""The parent side: :class:`Pool`.

::

  user's tasks                     Pool (all on the parent's event loop)
  ────────────                     ─────────────────────────────────────────────────────
  put(m) ── pickle in caller ──►  _accept ─► dealer: fair rounds ─► slot k queue
  put(m, worker=k) ─────────────►  _accept ───────────────────────► slot k queue
  broadcast(m) ─────────────────►  _accept x n ───────────────────► every slot's queue
  submit(m) ── future ──────────►  _accept ─► ...
                                   _pump (once per loop turn): queue ─► held (≤ concurrency)
                                        one frame per worker ─► channel pipe ─► worker k
  results() / on_result ◄──────── _on_readable ◄── result pipe ◄── worker k
  drain() / submit() futures ◄─── EV_DONE acks (always after that message's results)
  supervisor ◄──────────────────── pidfd / process sentinel readable: the worker exited
                                   → rescue its messages, respawn it

Everything here runs on one event loop, so the bookkeeping needs no locks; the
only blocking calls are ``Process.start()`` and reaping a process that has
already exited.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import enum
import importlib.util
import inspect
import itertools
import logging
import multiprocessing
import os
import pickle
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any, Final, Literal

from . import _protocol as P
from ._child import ChildConfig, worker_main
from ._errors import (
    LooppoolError,
    PoolBroken,
    PoolClosed,
    QueueFull,
    RemoteError,
    RemoteTraceback,
    WorkerLost,
    WorkerStartError,
    describe_exit,
)
from ._worker import Worker

__all__ = ["Pool", "PoolStats"]

logger = logging.getLogger("looppool")

DEFAULT_CONCURRENCY: Final = 1000
DEFAULT_MAX_PENDING: Final = 10_000
MAX_DELIVERIES: Final = 2  # a SafeWorker message is delivered again once after a death
MAX_START_FAILURES: Final = 3  # consecutive failed respawns of one worker before giving up
RESPAWN_BACKOFF: Final = 0.1  # seconds, doubled per consecutive failure
READ_SIZE: Final = 1 << 20

LoopKind = Literal["auto", "asyncio", "uvloop"]
StartMethod = Literal["fork", "spawn", "forkserver"]
Distribution = Literal["rounds", "barrier"]
ResultCallback = Callable[[Any], Awaitable[None] | None]


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of a pool's counters, from :meth:`Pool.stats`.

    ``put`` counts messages accepted (a broadcast counts once per worker);
    every accepted message ends as exactly one of ``processed``, ``failed``
    (its handler raised) or ``lost`` (its worker died, or the pool stopped
    before running it), or is still ``pending``. ``redelivered`` counts
    second deliveries after a ``SafeWorker`` died, ``respawns`` the
    replacement processes started, ``blocked`` the blocked-loop episodes
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


class _State(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class _SlotState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"  # sent OP_STOP
    DEAD = "dead"


class _Msg:
    __slots__ = ("deliveries", "epoch", "future", "id", "payload", "target")

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
        self.deliveries = 0


class _Slot:
    """One worker number and the process currently serving it."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.state = _SlotState.DEAD
        self.process: multiprocessing.process.BaseProcess | None = None
        self.pid: int | None = None
        self.channel: Connection | None = None
        self.results: Connection | None = None
        self.wfd = -1
        self.rfd = -1
        self.exit_fd = -1
        self.pidfd = -1
        self.out = bytearray()
        self.queue: deque[_Msg] = deque()
        self.held: dict[int, _Msg] = {}
        self.decoder = P.FrameDecoder()
        self.ready: asyncio.Future[None] | None = None
        self.exited: asyncio.Future[int | None] | None = None
        self.start_error: tuple[str, str] | None = None
        self.said_bye = False
        self.killed = False
        self.failures = 0
        self.exitcode: int | None = None

    @property
    def alive(self) -> bool:
        return self.state is not _SlotState.DEAD


def _describe_factory(worker: Any) -> str:
    func = getattr(worker, "func", worker)  # functools.partial
    return str(getattr(func, "__name__", type(func).__name__))


class Pool:
    """A pool of worker processes, each running its own event loop.

    ::

        async with looppool.Pool(MyWorker, size=4) as pool:
            await pool.put(message)
            reply = await pool.submit(message)
            async for result in pool.results(): ...

    ``worker`` is a :class:`~looppool.Worker` subclass or a picklable
    zero-argument callable returning one (``functools.partial``).

    Options:

    * ``size`` — number of worker processes (default: CPU count).
    * ``loop`` — ``"auto"`` (uvloop if importable), ``"asyncio"`` or ``"uvloop"``.
    * ``start_method`` — ``None`` (the platform's default), ``"fork"``,
      ``"spawn"`` or ``"forkserver"``.
    * ``concurrency`` — most messages in flight at once in one worker.
    * ``max_pending`` — most messages accepted and not yet finished; above it
      ``put`` waits and ``put_nowait`` raises :class:`~looppool.QueueFull`.
    * ``on_result`` — a callback (plain or ``async``) receiving every result
      instead of :meth:`results`.
    * ``name`` — shown in process titles, metrics and logs.
    * ``distribution`` — ``"rounds"`` (the parent deals fair rounds) or
      ``"barrier"`` (one shared queue, listeners meet at a
      ``multiprocessing.Barrier``).
    * ``statsd``, ``statsd_prefix``, ``metrics_interval``,
      ``blocking_threshold`` — monitoring, see :mod:`looppool.metrics`.
    """

    def __init__(
        self,
        worker: type[Worker] | Callable[[], Worker],
        size: int | None = None,
        *,
        loop: LoopKind = "auto",
        start_method: StartMethod | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        max_pending: int = DEFAULT_MAX_PENDING,
        on_result: ResultCallback | None = None,
        name: str | None = None,
        distribution: Distribution = "rounds",
        statsd: str | object | None = None,
        statsd_prefix: str | None = None,
        metrics_interval: float = 10.0,
        blocking_threshold: float | None = None,
    ) -> None:
        if not callable(worker):
            raise TypeError(f"worker must be a Worker subclass or a callable, not {worker!r}")
        if isinstance(worker, type) and not issubclass(worker, Worker):
            raise TypeError(
                f"worker class {worker.__qualname__} does not derive from looppool.Worker"
            )
        if size is None:
            size = os.cpu_count() or 1
        _check_int("size", size)
        _check_int("concurrency", concurrency)
        _check_int("max_pending", max_pending)
        if loop not in ("auto", "asyncio", "uvloop"):
            raise ValueError(f"loop must be 'auto', 'asyncio' or 'uvloop', not {loop!r}")
        has_uvloop = importlib.util.find_spec("uvloop") is not None
        if loop == "uvloop" and not has_uvloop:
            raise ValueError("loop='uvloop' was asked for, but uvloop is not installed")
        if distribution not in ("rounds", "barrier"):
            raise ValueError(f"distribution must be 'rounds' or 'barrier', not {distribution!r}")
        methods = multiprocessing.get_all_start_methods()
        if start_method is not None and start_method not in methods:
            raise ValueError(f"start_method must be None or one of {methods}, not {start_method!r}")
        if on_result is not None and not callable(on_result):
            raise TypeError(f"on_result must be callable, not {on_result!r}")
        self._ctx = multiprocessing.get_context(start_method)
        self._start_method: str = self._ctx.get_start_method()
        if self._start_method != "fork":
            try:
                pickle.dumps(worker, P.PROTOCOL)
            except RuntimeError:
                # multiprocessing's locks and events pickle only while a
                # process is being spawned: they will travel then.
                pass
            except Exception as exc:
                raise TypeError(
                    f"the worker factory {worker!r} cannot be pickled, which the "
                    f"{self._start_method!r} start method needs: {exc}"
                ) from exc
        self._monitor: dict[str, Any] | None = None
        if statsd is not None or blocking_threshold is not None:
            if blocking_threshold is not None and blocking_threshold <= 0:
                raise ValueError(
                    f"blocking_threshold must be > 0 or None, not {blocking_threshold}"
                )
            if metrics_interval <= 0:
                raise ValueError(f"metrics_interval must be > 0, not {metrics_interval}")
            from ._monitor import check_statsd_option

            check_statsd_option(statsd)  # raises at the point of the mistake
            self._monitor = {
                "statsd": statsd,
                "statsd_prefix": statsd_prefix,
                "interval": metrics_interval,
                "blocking_threshold": blocking_threshold,
            }

        self._factory = worker
        self._size = size
        self._loop_kind = ("uvloop" if has_uvloop else "asyncio") if loop == "auto" else loop
        self._concurrency = concurrency
        self._max_pending = max_pending
        self._on_result = on_result
        self._on_result_async = on_result is not None and (
            inspect.iscoroutinefunction(on_result)
            or inspect.iscoroutinefunction(getattr(on_result, "__call__", None))  # noqa: B004
        )
        self.name = name if name is not None else _describe_factory(worker)
        self._distribution = distribution
        # A class (or a partial of one) tells now whether it is a SafeWorker;
        # an opaque factory is settled when its first worker reports ready.
        self._safe = _is_safe(worker)

        self._state = _State.NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots = [_Slot(n) for n in range(size)]
        self._ids = itertools.count()
        self._round: deque[int] = deque()
        self._redeal_turn = 0
        self._dirty: dict[_Slot, None] = {}
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
        self._delivered_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._stopped = asyncio.Event()
        self._no_more_results = False
        self._stop_begun = False
        self._accepting_respawns = False
        self._broken: PoolBroken | None = None
        self._closing_reason = "the pool is stopped"
        # barrier mode
        self._shared_queue: Any = None
        self._barrier: Any = None
        self._shared_out: dict[int, _Msg] = {}
        self._regenerating = False
        # counters
        self._n_put = 0
        self._n_processed = 0
        self._n_failed = 0
        self._n_lost = 0
        self._n_results = 0
        self._n_redelivered = 0
        self._n_respawns = 0
        self._n_blocked = 0

    # -- public properties --------------------------------------------------

    @property
    def size(self) -> int:
        """The number of worker processes."""
        return self._size

    @property
    def loop_kind(self) -> str:
        """The event loop the workers run: ``"asyncio"`` or ``"uvloop"``."""
        return self._loop_kind

    @property
    def start_method(self) -> str:
        """The multiprocessing start method in use."""
        return self._start_method

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

    def __repr__(self) -> str:
        in_flight = sum(len(s.held) for s in self._slots)
        return (
            f"<looppool.Pool {self.name!r} {self._state.value}, {self._size} workers "
            f"({self._loop_kind}, {self._start_method}), {in_flight} in flight, "
            f"{self._pending} pending>"
        )

    # -- life cycle -----------------------------------------------------------

    async def __aenter__(self) -> Pool:
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
        process behind.
        """
        if self._state is not _State.NEW:
            raise PoolClosed(f"{self!r} was already started; a pool starts once")
        self._loop = asyncio.get_running_loop()
        self._state = _State.STARTING
        atexit.register(self._kill_at_exit)
        if self._distribution == "barrier":
            self._new_generation_objects()
        try:
            for slot in self._slots:
                slot.ready = self._loop.create_future()
                self._spawn(slot)
            await self._await_ready([s.ready for s in self._slots if s.ready is not None])
        except BaseException as exc:
            await self._kill_all()
            self._finish()
            if self._stop_begun and isinstance(exc, WorkerStartError):
                raise PoolClosed("stop() was called while the pool was starting") from exc
            raise
        if self._on_result_async:
            self._callback_task = self._loop.create_task(self._run_callbacks())
        self._state = _State.RUNNING
        self._accepting_respawns = True
        self._deal_round()

    async def _await_ready(self, futures: list[asyncio.Future[None]]) -> None:
        pending: set[asyncio.Future[None]] = set(futures)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            for fut in done:
                if fut.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise fut.exception()  # type: ignore[misc]

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
        if self._state is _State.NEW:
            self._state = _State.STOPPED
            self._stopped.set()
            return
        if self._stop_begun:
            await self._stopped.wait()
            return
        self._stop_begun = True
        if self._state is _State.STARTING:
            # start() is awaiting the workers in another task: end them; it
            # cleans up and raises PoolClosed.
            await self._kill_all()
            await self._stopped.wait()
            return
        self._state = _State.STOPPING
        self._wake_all_room_waiters()
        try:
            async with asyncio.timeout(timeout):
                await self._stop_workers(graceful)
        except TimeoutError:
            alive = [s for s in self._slots if s.alive]
            for slot in alive:
                logger.warning(
                    "pool %s: stop(timeout=%s) expired; killing worker %d (pid %s)",
                    self.name,
                    timeout,
                    slot.number,
                    slot.pid,
                )
            await self._kill_all()
        except BaseException:
            # Cancelled (a second Ctrl-C) or failed: end the processes now.
            await self._kill_all()
            raise
        finally:
            self._finish()

    async def _stop_workers(self, graceful: bool) -> None:
        if graceful and self._safe:
            # Every message accepted so far runs; respawns stay on so that a
            # death while draining does not strand the messages it held.
            await self._wait_idle()
        else:
            self._closing_reason = "the pool stopped before the message was processed"
            self._drop_queued()
        self._accepting_respawns = False
        cancel = not self._safe
        for slot in self._slots:
            if slot.alive:
                slot.state = _SlotState.STOPPING
                self._write(slot, P.encode([(P.OP_STOP, cancel)]))
        exits = [s.exited for s in self._slots if s.exited is not None and not s.exited.done()]
        if exits:
            await asyncio.wait(exits)
        # Every worker has exited, so every result is in: let the async
        # on_result consumer finish the backlog, then end.
        self._no_more_results = True
        self._wake_results()
        if self._callback_task is not None:
            await self._callback_task

    async def _wait_idle(self) -> None:
        while self._pending and self._broken is None:
            await self._drain_upto(self._epoch)

    def _finish(self) -> None:
        """Release everything once no worker process runs (or none could start)."""
        self._state = _State.STOPPED
        self._accepting_respawns = False
        with contextlib.suppress(Exception):
            atexit.unregister(self._kill_at_exit)
        for slot in self._slots:
            self._close_slot(slot)
        reason = self._closing_reason
        for slot in self._slots:
            for msg in [*slot.held.values(), *slot.queue]:
                self._lose(msg, PoolClosed(reason))
            slot.held.clear()
            slot.queue.clear()
        for msg in list(self._shared_out.values()):
            self._lose(msg, PoolClosed(reason))
        self._shared_out.clear()
        if self._shared_queue is not None:
            self._close_shared_queue()
        self._wake_all_room_waiters()
        for _, fut in self._drain_waiters:
            if not fut.done():
                fut.set_result(None)
        self._drain_waiters.clear()
        for _, fut in self._delivered_waiters:
            if not fut.done():
                fut.set_result(None)
        self._delivered_waiters.clear()
        if self._callback_task is not None and not self._callback_task.done():
            self._callback_task.cancel()
        self._stopped.set()
        self._no_more_results = True
        self._wake_results()

    async def _kill_all(self) -> None:
        # No replacement may start for a worker we are killing on purpose.
        self._accepting_respawns = False
        for slot in self._slots:
            if slot.alive and slot.process is not None:
                slot.killed = True
                with contextlib.suppress(Exception):
                    slot.process.kill()
        exits = [s.exited for s in self._slots if s.exited is not None and not s.exited.done()]
        if exits:
            # Shielded: a process that got SIGKILL exits at once; reaping it
            # must not be abandoned because the caller is being cancelled.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(asyncio.wait(exits))

    def _kill_at_exit(self) -> None:
        # multiprocessing's own exit handler would SIGTERM (ignored by our
        # workers) and join them: the interpreter would hang at exit.
        live = [s for s in self._slots if s.alive and s.process is not None]
        if not live:
            return
        logger.warning(
            "pool %s was not stopped before the interpreter exited; killing its workers",
            self.name,
        )
        for slot in live:
            assert slot.process is not None
            with contextlib.suppress(Exception):
                slot.process.kill()
                slot.process.join(5)

    # -- sending --------------------------------------------------------------

    def _pickle(self, message: Any) -> bytes:
        if self._state is not _State.RUNNING:
            self._raise_closed()
        try:
            return pickle.dumps(message, P.PROTOCOL)
        except Exception as exc:
            raise TypeError(
                f"the message {_short_repr(message)} cannot be pickled, so it cannot be "
                f"sent to a worker process: {type(exc).__name__}: {exc}"
            ) from exc

    def _raise_closed(self) -> None:
        if self._broken is not None:
            raise self._broken
        if self._state is _State.NEW or self._state is _State.STARTING:
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
        if self._state is _State.NEW:
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
            if self._state is not _State.RUNNING:
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
        if self._state is not _State.RUNNING:
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
        msg = _Msg(next(self._ids), payload, target, future, self._epoch)
        counts = self._epoch_counts
        counts[msg.epoch] = counts.get(msg.epoch, 0) + 1
        self._pending += 1
        self._n_put += 1
        if target is not None:
            self._enqueue(self._slots[target], msg)
        elif self._shared_queue is not None:
            self._share(msg)
        else:
            self._enqueue(self._slots[self._next_in_round()], msg)

    def _next_in_round(self) -> int:
        """Fair rounds: each round deals one message to every live worker, in order."""
        while True:
            if not self._round:
                self._deal_round()
            number = self._round.popleft()
            if self._slots[number].state is _SlotState.READY or not self._round_has_ready():
                return number

    def _round_has_ready(self) -> bool:
        return any(self._slots[n].state is _SlotState.READY for n in self._round)

    def _deal_round(self) -> None:
        ready = [s.number for s in self._slots if s.state is _SlotState.READY]
        if not ready:
            # Every worker is being replaced: deal to those starting; their
            # messages wait in the parent until they are ready.
            ready = [s.number for s in self._slots if s.state is _SlotState.STARTING]
        if not ready:
            raise self._broken or PoolBroken(f"pool {self.name!r} has no worker left")
        self._round.extend(ready)

    def _enqueue(self, slot: _Slot, msg: _Msg) -> None:
        slot.queue.append(msg)
        if slot.state is _SlotState.READY and len(slot.held) < self._concurrency:
            self._dirty[slot] = None
            if not self._pump_scheduled:
                self._pump_scheduled = True
                assert self._loop is not None
                self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        """Move queued messages into each worker's window: one frame per worker per turn."""
        self._pump_scheduled = False
        dirty, self._dirty = self._dirty, {}
        window = self._concurrency
        for slot in dirty:
            if slot.state is not _SlotState.READY:
                continue
            queue, held = slot.queue, slot.held
            room = min(window - len(held), len(queue))
            if room <= 0:
                continue
            items: list[tuple[Any, ...]] = []
            for _ in range(room):
                msg = queue.popleft()
                msg.deliveries += 1
                held[msg.id] = msg
                items.append((P.OP_MSG, msg.id, msg.future is not None, msg.payload))
            self._write(slot, P.encode(items))

    def _mark_dirty(self, slot: _Slot) -> None:
        if slot.queue and slot.state is _SlotState.READY:
            self._dirty[slot] = None
            if not self._pump_scheduled:
                self._pump_scheduled = True
                assert self._loop is not None
                self._loop.call_soon(self._pump)

    def _write(self, slot: _Slot, data: bytes) -> None:
        if slot.wfd < 0:
            return
        if slot.out:
            slot.out += data
            return
        try:
            written = os.write(slot.wfd, data)
        except BlockingIOError:
            written = 0
        except OSError:
            return  # the worker is gone; its sentinel will tell us
        if written < len(data):
            slot.out += memoryview(data)[written:]
            assert self._loop is not None
            self._loop.add_writer(slot.wfd, self._on_writable, slot)

    def _on_writable(self, slot: _Slot) -> None:
        try:
            written = os.write(slot.wfd, slot.out)
        except BlockingIOError:
            return
        except OSError:
            written = len(slot.out)
        del slot.out[:written]
        if not slot.out:
            assert self._loop is not None
            self._loop.remove_writer(slot.wfd)

    def _drop_queued(self) -> None:
        """Lose every message not yet sent to a worker (a non-graceful stop)."""
        exc = PoolClosed("the pool stopped before the message was sent to a worker")
        for slot in self._slots:
            while slot.queue:
                self._lose(slot.queue.popleft(), exc)

    # -- receiving ------------------------------------------------------------

    def _on_readable(self, slot: _Slot) -> None:
        try:
            data = os.read(slot.rfd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            # End of file: the worker closed its end (it is exiting). Stop
            # watching, or the loop would call us for ever; the process
            # sentinel does the rest.
            assert self._loop is not None
            self._loop.remove_reader(slot.rfd)
            return
        for frame in slot.decoder.feed(data):
            self._dispatch(slot, frame)

    def _read_rest(self, slot: _Slot) -> None:
        """Read all the worker wrote before it exited: it is in the pipe already."""
        if slot.rfd < 0:
            return
        while True:
            try:
                data = os.read(slot.rfd, READ_SIZE)
            except (BlockingIOError, OSError):
                return
            if not data:
                return
            for frame in slot.decoder.feed(data):
                self._dispatch(slot, frame)

    def _dispatch(self, slot: _Slot, items: list[tuple[Any, ...]]) -> None:
        for item in items:
            op = item[0]
            if op == P.EV_DONE:
                self._on_done(slot, item[1], item[2], item[3])
            elif op == P.EV_RESULT:
                self._on_result_payload(item[1])
            elif op == P.EV_LOG:
                self._on_log(slot, item[1])
            elif op == P.EV_TAKEN:
                msg = self._shared_out.pop(item[1], None)
                if msg is not None:
                    msg.deliveries += 1
                    slot.held[msg.id] = msg
            elif op == P.EV_READY:
                self._safe = item[2]  # authoritative: the factory's product decides
                self._on_ready(slot, item[1])
            elif op == P.EV_START_FAILED:
                slot.start_error = (item[1], item[2])
            elif op == P.EV_BLOCKED:
                self._n_blocked += 1
            elif op == P.EV_BYE:
                slot.said_bye = True

    def _on_done(self, slot: _Slot, mid: int, status: int, payload: Any) -> None:
        msg = slot.held.pop(mid, None)
        if msg is None:
            msg = self._shared_out.pop(mid, None)
            if msg is None:
                return  # already given up on (its worker was declared lost)
        future = msg.future
        if status == P.DONE_OK:
            self._n_processed += 1
            if future is not None and not future.done():
                try:
                    future.set_result(pickle.loads(payload))
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
                future.set_exception(_rebuild_exception(payload))
        elif self._regenerating and self._accepting_respawns:
            # Cancelled by a generation restart, not by the user: send it again.
            slot.held[mid] = msg
            return
        else:
            self._n_lost += 1
            if future is not None and not future.done():
                future.set_exception(PoolClosed("the pool stopped while the message was running"))
        self._complete(msg)
        if slot.queue:
            self._mark_dirty(slot)

    def _complete(self, msg: _Msg) -> None:
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

    def _lose(self, msg: _Msg, exc: LooppoolError) -> None:
        self._n_lost += 1
        if msg.future is not None and not msg.future.done():
            msg.future.set_exception(exc)
        self._complete(msg)

    def _on_result_payload(self, payload: bytes) -> None:
        self._n_results += 1
        try:
            value = pickle.loads(payload)
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
        """Wait for the next buffered result; ``(False, None)`` once the pool stopped."""
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
            while self._delivered_waiters and self._delivered_waiters[0][0] <= self._delivered:
                fut = self._delivered_waiters.pop(0)[1]
                if not fut.done():
                    fut.set_result(None)

    async def _delivered_upto(self, count: int) -> None:
        if self._delivered >= count or self._stopped.is_set():
            return
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._delivered_waiters.append((count, fut))
        await fut

    def _on_log(self, slot: _Slot, data: dict[str, Any]) -> None:
        record = logging.makeLogRecord(data)
        record.worker = slot.number
        record.msg = f"[worker {slot.number}] {record.msg}"
        target = logging.getLogger(record.name)
        if target.isEnabledFor(record.levelno):
            target.handle(record)

    # -- processes ------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        """Start a process for ``slot`` and watch it (synchronous: no other fork may interleave)."""
        assert self._loop is not None
        ctx = self._ctx
        channel_r, channel_w = ctx.Pipe(duplex=False)
        results_r, results_w = ctx.Pipe(duplex=False)
        for conn in (channel_w, results_w):
            P.enlarge_pipe(conn.fileno())
        cfg = ChildConfig(
            factory=self._factory,
            number=slot.number,
            pool_name=self.name,
            parent_pid=os.getpid(),
            channel=channel_r,
            results=results_w,
            loop=self._loop_kind,
            log_level=logging.getLogger().getEffectiveLevel(),
            forked=self._start_method == "fork",
            concurrency=self._concurrency,
            shared_queue=self._shared_queue,
            barrier=self._barrier,
            monitor=self._monitor,
        )
        process = ctx.Process(
            target=worker_main, args=(cfg,), name=f"{self.name}-worker-{slot.number}"
        )
        try:
            process.start()
        finally:
            # Close the child's ends at once, before any other fork: a sibling
            # that inherited them would keep our reads from seeing end-of-file.
            channel_r.close()
            results_w.close()
        slot.process = process
        slot.pid = process.pid
        slot.state = _SlotState.STARTING
        slot.channel, slot.results = channel_w, results_r
        slot.wfd, slot.rfd = channel_w.fileno(), results_r.fileno()
        os.set_blocking(slot.wfd, False)
        os.set_blocking(slot.rfd, False)
        slot.out = bytearray()
        slot.decoder = P.FrameDecoder()
        slot.start_error = None
        slot.said_bye = False
        slot.killed = False
        slot.exitcode = None
        slot.exited = self._loop.create_future()
        slot.exit_fd = self._exit_fd(slot, process)
        self._loop.add_reader(slot.rfd, self._on_readable, slot)
        self._loop.add_reader(slot.exit_fd, self._on_exit, slot)

    def _exit_fd(self, slot: _Slot, process: multiprocessing.process.BaseProcess) -> int:
        # A pidfd is readable once the process is reapable, so join() below
        # never blocks. Under forkserver the fork server is the OS parent and
        # reports the exit code through the sentinel instead.
        slot.pidfd = -1
        if self._start_method != "forkserver" and hasattr(os, "pidfd_open"):
            assert process.pid is not None
            try:
                slot.pidfd = os.pidfd_open(process.pid)
                return slot.pidfd
            except OSError:
                pass
        return process.sentinel

    def _on_exit(self, slot: _Slot) -> None:
        assert self._loop is not None
        assert slot.process is not None
        self._loop.remove_reader(slot.exit_fd)
        self._read_rest(slot)
        slot.process.join()
        exitcode = slot.process.exitcode
        slot.exitcode = exitcode
        previous = slot.state
        self._close_slot(slot)
        slot.state = _SlotState.DEAD
        if slot.exited is not None and not slot.exited.done():
            slot.exited.set_result(exitcode)
        if previous is _SlotState.STARTING:
            reason, tb = slot.start_error or (f"its process died ({describe_exit(exitcode)})", "")
            if slot.ready is not None:  # the pool's start() awaits this one
                if not slot.ready.done():
                    slot.ready.set_exception(WorkerStartError(slot.number, reason, tb, exitcode))
                slot.ready = None
                return
        if previous is _SlotState.STARTING and not slot.killed:
            slot.failures += 1
            logger.error(
                "pool %s: replacement of worker %d failed: %s", self.name, slot.number, reason
            )
        elif not (slot.said_bye or slot.killed):
            logger.error(
                "pool %s: worker %d (pid %s) died (%s)",
                self.name,
                slot.number,
                slot.pid,
                describe_exit(exitcode),
            )
        if previous is _SlotState.STOPPING or slot.killed:
            # Told to stop (or killed by us): nothing to replace. In barrier
            # mode a stopping worker's listener may have taken a message it
            # never ran; it is sent again (or lost if the pool is stopping).
            self._give_back(slot)
            self._maybe_finish_generation()
            return
        self._rescue(slot, WorkerLost(slot.number, slot.pid, exitcode))
        if not self._accepting_respawns:
            return
        if self._shared_queue is None:
            self._respawn_later(slot)
        else:
            # A dead party can never be removed from a multiprocessing.Barrier
            # (nor can abort() be relied on: it may wait for the dead party
            # forever). Replace the whole generation instead.
            self._begin_generation_restart()
            self._maybe_finish_generation()

    def _give_back(self, slot: _Slot) -> None:
        for msg in list(slot.held.values()):
            self._requeue(slot, msg)
        slot.held.clear()

    def _requeue(self, slot: _Slot, msg: _Msg) -> None:
        """Send again a message that a worker took but did not run (it was stopping)."""
        if not self._accepting_respawns:
            self._lose(msg, PoolClosed(self._closing_reason))
        elif msg.target is not None:
            slot.queue.appendleft(msg)
        elif self._shared_queue is not None:
            msg.deliveries -= 1  # it never ran
            self._share(msg)
        else:
            self._enqueue(self._slots[self._next_in_round()], msg)

    def _rescue(self, slot: _Slot, lost: WorkerLost) -> None:
        """Decide the fate of the messages a dead worker held or had queued."""
        held = list(slot.held.values())
        slot.held.clear()
        keep: deque[_Msg] = deque()  # directed to this number: wait for its replacement
        again: list[_Msg] = []  # shared: deal to another worker
        for msg in held:
            if self._safe and msg.deliveries < MAX_DELIVERIES and self._accepting_respawns:
                self._n_redelivered += 1
                (keep.append if msg.target is not None else again.append)(msg)
            else:
                self._lose(msg, lost)
        for msg in slot.queue:
            (keep.append if msg.target is not None else again.append)(msg)
        slot.queue = keep
        if not self._accepting_respawns:
            while slot.queue:
                self._lose(slot.queue.popleft(), lost)
        for msg in again:
            if self._shared_queue is not None:
                self._share(msg)
                continue
            others = [s for s in self._slots if s.state is _SlotState.READY]
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

    def _respawn_later(self, slot: _Slot) -> None:
        assert self._loop is not None
        if slot.failures >= MAX_START_FAILURES:
            last = slot.start_error[0] if slot.start_error else describe_exit(slot.exitcode)
            self._break(
                f"worker {slot.number} failed to start {slot.failures} times in a row "
                f"(last: {last})"
            )
            return
        slot.state = _SlotState.STARTING  # counts as alive: no second respawn is scheduled
        delay = RESPAWN_BACKOFF * (2 ** (slot.failures - 1)) if slot.failures else 0.0
        self._loop.call_later(delay, self._respawn, slot)

    def _respawn(self, slot: _Slot) -> None:
        if not self._accepting_respawns:
            slot.state = _SlotState.DEAD
            while slot.queue:
                self._lose(slot.queue.popleft(), PoolClosed(self._closing_reason))
            return
        self._n_respawns += 1
        try:
            self._spawn(slot)
        except Exception as exc:
            slot.state = _SlotState.DEAD
            self._break(f"worker {slot.number} could not be restarted: {exc!r}")
            return
        logger.info("pool %s: worker %d restarted (pid %s)", self.name, slot.number, slot.pid)

    def _on_ready(self, slot: _Slot, pid: int) -> None:
        slot.state = _SlotState.READY
        slot.failures = 0
        if slot.ready is not None and not slot.ready.done():
            slot.ready.set_result(None)
        slot.ready = None
        if self._state is _State.STOPPING and not self._accepting_respawns:
            return
        self._mark_dirty(slot)

    def _break(self, reason: str) -> None:
        """Give up: a worker keeps failing to start. Fail everything, loudly."""
        if self._broken is not None:
            return
        logger.critical("pool %s is broken: %s", self.name, reason)
        self._broken = PoolBroken(f"pool {self.name!r} is broken: {reason}")
        self._closing_reason = str(self._broken)
        self._accepting_respawns = False
        if self._state is _State.RUNNING:
            self._state = _State.STOPPING
        for slot in self._slots:
            for msg in [*slot.held.values(), *slot.queue]:
                self._lose(msg, self._broken)
            slot.held.clear()
            slot.queue.clear()
        for msg in list(self._shared_out.values()):
            self._lose(msg, self._broken)
        self._shared_out.clear()
        self._wake_all_room_waiters()
        for slot in self._slots:
            if slot.alive and slot.process is not None:
                slot.killed = True
                with contextlib.suppress(Exception):
                    slot.process.kill()

    def _close_slot(self, slot: _Slot) -> None:
        loop = self._loop
        if slot.rfd >= 0:
            if loop is not None:
                loop.remove_reader(slot.rfd)
            slot.rfd = -1
        if slot.wfd >= 0:
            if loop is not None:
                loop.remove_writer(slot.wfd)
            slot.wfd = -1
        for conn in (slot.channel, slot.results):
            if conn is not None:
                conn.close()
        slot.channel = slot.results = None
        if slot.pidfd >= 0:
            if loop is not None:
                loop.remove_reader(slot.pidfd)
            os.close(slot.pidfd)
            slot.pidfd = -1
        slot.out = bytearray()

    # -- barrier mode -----------------------------------------------------------

    def _new_generation_objects(self) -> None:
        self._shared_queue = self._ctx.Queue()
        self._barrier = self._ctx.Barrier(self._size)

    def _share(self, msg: _Msg) -> None:
        self._shared_out[msg.id] = msg
        if not self._regenerating:
            # Pickled already: the queue's feeder thread only frames bytes,
            # so it cannot fail on a message and drop it with a log line.
            self._shared_queue.put((msg.id, msg.future is not None, msg.payload))

    def _begin_generation_restart(self) -> None:
        if self._regenerating:
            return
        self._regenerating = True
        logger.warning(
            "pool %s: restarting every worker (distribution='barrier' cannot replace one)",
            self.name,
        )
        cancel = not self._safe
        for slot in self._slots:
            if slot.alive and slot.state is not _SlotState.STOPPING:
                slot.state = _SlotState.STOPPING
                self._write(slot, P.encode([(P.OP_STOP, cancel)]))

    def _maybe_finish_generation(self) -> None:
        """Once the old generation has exited, start a new one and send again what it left."""
        if not self._regenerating or any(s.alive for s in self._slots):
            return
        self._regenerating = False
        if not self._accepting_respawns:
            return
        for slot in self._slots:
            if slot.failures >= MAX_START_FAILURES:
                self._respawn_later(slot)  # gives up, loudly
                return
        self._close_shared_queue()
        self._new_generation_objects()
        for slot in self._slots:
            self._respawn(slot)
        for msg in sorted(self._shared_out.values(), key=lambda m: m.id):
            self._share(msg)

    def _close_shared_queue(self) -> None:
        queue = self._shared_queue
        self._shared_queue = None
        # The feeder thread may still hold messages nobody will read: do not
        # let interpreter exit wait for it.
        queue.cancel_join_thread()
        queue.close()


def _check_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, not {value!r}")


def _is_safe(worker: Any) -> bool:
    func = getattr(worker, "func", worker)  # functools.partial of a class
    return isinstance(func, type) and issubclass(func, Worker) and func.safe


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__qualname__} object>"
    return text if len(text) <= 80 else text[:77] + "..."


def _rebuild_exception(payload: Any) -> BaseException:
    if payload is None:
        return RemoteError("Exception", "process_message failed", "")
    pickled, type_name, text, tb = payload
    exc: BaseException | None = None
    if pickled is not None:
        try:
            exc = pickle.loads(pickled)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteError(type_name, text, tb)
    exc.__cause__ = RemoteTraceback(tb)
    return exc
