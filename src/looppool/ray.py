"""looppool beyond one machine: :class:`RayPool`, the same workers as Ray actors.

::

  parent: the Ray driver (the user's asyncio app)          Ray async actor k (LooppoolActor)
  ───────────────────────────────────────────────          ───────────────────────────────────
  put(m) ── pickle in caller ─► fair rounds ─► slot k queue       hosts the user's Worker, on
  put(m, worker=k) / broadcast / submit ─────► slot k queue       the actor's asyncio loop
  _pump (once per loop turn, ≤ concurrency held per slot):
      actor.deliver.remote(seq, frame) ───────────────────────► run each message as a task:
                                                                    process_message(msg)
                                                                    put_result(v), acks, logs
  listener task k:                                                  ─► event buffer
      await actor.next_events.remote() ◄──── one batch ◄──────── answered as soon as the
      dispatch results, acks, log records                          buffer holds something
      RayActorError ─► the actor is gone: rescue its messages, start a new actor

Nothing polls: each actor has exactly one ``next_events`` call outstanding,
which the actor answers only when it has something to report (a hanging
call, awaited as an ``ObjectRef``); a dead actor makes that call raise
``RayActorError`` at once. Ray's streaming generators would do the same job,
but Ray Client (``ray://`` addresses) does not support them; a plain call works
with every way of connecting.

Messages travel in batches: one ``deliver`` call per actor per turn of the
parent's loop carries every message dealt to that actor, and one answer of
``next_events`` carries every result, acknowledgement and log record the actor
produced meanwhile. A call per message would cost Ray's per-call overhead
(tens of microseconds in the driver) on every message.

Messages are therefore not Ray calls: they run as tasks on the actor's loop,
at most ``concurrency`` per actor (the parent's window, as in Pool). The
actor's ``max_concurrency`` is ``concurrency + CONTROL_CALLS``: deliveries in
flight never outnumber the messages in the window, and ``start``, ``stop``
and ``next_events`` get slots of their own, so no call waits for a slot.

Logging: each actor's root logger gets a handler that sends log records to
the parent, where they go through the parent's ``logging`` tagged with the
worker number, as in Pool. Anything written to stdout or stderr (``print``)
is Ray's business: with ``log_to_driver`` (``ray.init``'s default) Ray's log
monitor copies it to the driver's terminal, prefixed
``(LooppoolActor pid=..., ip=...)``.
"""

from __future__ import annotations

try:
    import ray
    import ray.exceptions
    import ray.util
except ImportError as exc:  # pragma: no cover - exercised by a test that hides ray
    raise ImportError(
        "looppool.ray needs Ray, which is not installed: pip install 'looppool[ray]'"
    ) from exc

import asyncio
import contextlib
import enum
import inspect
import itertools
import logging
import os
import pickle
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, Final

from . import _protocol as P
from ._child import _format_exception, _ForwardHandler
from ._errors import (
    LooppoolError,
    PoolBroken,
    PoolClosed,
    QueueFull,
    RemoteError,
    WorkerLost,
    WorkerStartError,
)
from ._pool import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_PENDING,
    MAX_DELIVERIES,
    MAX_START_FAILURES,
    RESPAWN_BACKOFF,
    PoolStats,
    ResultCallback,
    _check_int,
    _describe_factory,
    _is_safe,
    _rebuild_exception,
    _short_repr,
)
from ._worker import Worker

__all__ = ["RESERVED_OPTIONS", "RayPool"]

logger = logging.getLogger("looppool")
worker_logger = logging.getLogger("looppool.worker")

#: Seconds a cancelled ``Worker``'s tasks get to run their ``finally`` blocks (as in Pool).
CANCEL_GRACE: Final = 1.0
#: Actor calls that may run beside the deliveries: ``start``, ``next_events``, ``stop``.
CONTROL_CALLS: Final = 3
#: Actor options RayPool sets itself; passing them would break its guarantees.
RESERVED_OPTIONS: Final = frozenset(
    {
        "max_concurrency",  # from ``concurrency``
        "max_restarts",  # RayPool replaces dead actors itself, and re-delivers once
        "max_task_retries",  # a retried delivery would run messages twice
        "allow_out_of_order_execution",
        "lifetime",  # a detached actor would outlive its pool's driver
        "get_if_exists",
        "namespace",
    }
)


# -- the actor side -------------------------------------------------------------


async def _maybe_await(value: Awaitable[Any] | None) -> None:
    if inspect.isawaitable(value):
        await value


class LooppoolActor:
    """Hosts one :class:`~looppool.Worker` inside a Ray async actor.

    :class:`RayPool` creates one per worker number; users do not construct it.
    Every method is a coroutine, so Ray runs the actor on one asyncio loop
    (in a thread of the actor's process); the worker's hooks and every
    ``process_message`` task run on that loop, as in a Pool's worker process.
    """

    def __init__(
        self, factory: Callable[[], Worker], number: int, pool_name: str, log_level: int
    ) -> None:
        self._factory = factory
        self._number = number
        self._pool_name = pool_name
        self._log_level = log_level
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._events: list[tuple[Any, ...]] = []
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._started = asyncio.Event()
        self._worker: Worker | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._cancel = False
        # Deliveries are numbered: Ray does not promise that an async actor
        # starts calls in the order they were sent, but messages must start
        # in the order the parent dealt them, as in Pool.
        self._next_seq = 0
        self._early: dict[int, bytes] = {}
        self._caught_up: tuple[int, asyncio.Future[None]] | None = None
        self._handler: logging.Handler | None = None

    # -- events to the parent ---------------------------------------------------

    def add(self, item: tuple[Any, ...]) -> None:
        """Queue one event for the parent; callable from any thread (log records)."""
        loop = self._loop
        if loop is not None and threading.get_ident() != self._loop_thread:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the actor is ending
                loop.call_soon_threadsafe(self.add, item)
            return
        if self._closed:
            return
        self._events.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _close(self) -> None:
        self._closed = True
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
            self._handler = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next_events(self) -> bytes | None:
        """Wait until there are events; return them as one pickled batch (``None``: ended).

        The parent keeps exactly one of these calls outstanding: this is the
        actor-to-parent channel, and it costs nothing while the actor is idle.
        """
        loop = asyncio.get_running_loop()
        while not self._events:
            if self._closed:
                return None
            self._waiter = loop.create_future()
            await self._waiter
        items, self._events = self._events, []
        return pickle.dumps(items, P.PROTOCOL)

    # -- life cycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Build the worker and run ``initialise()``; report ready or failed as an event."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        # The worker's log records go to the parent's logging, as in Pool.
        # Only the root logger gets a handler: Ray's own loggers keep theirs.
        self._handler = _ForwardHandler(self)  # type: ignore[arg-type]
        root = logging.getLogger()
        root.addHandler(self._handler)
        root.setLevel(self._log_level)
        try:
            worker = self._factory()
            if not isinstance(worker, Worker):
                raise TypeError(
                    f"the worker factory returned {worker!r}, not an instance of looppool.Worker"
                )
            worker.number = self._number
            worker._looppool_sink = self._put_result
            await _maybe_await(worker.initialise())
        except BaseException as exc:
            self.add((P.EV_START_FAILED, f"{type(exc).__name__}: {exc}", _format_exception(exc)))
            self._close()
            return
        finally:
            self._started.set()  # stop() may now proceed, started or not
        self._worker = worker
        # (unused-ignore: without Ray installed, mypy sees it as Any)
        node = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call, unused-ignore]
        self.add((P.EV_READY, os.getpid(), worker.safe, node))

    async def deliver(self, seq: int, frame: bytes) -> None:
        """Start the messages of one batch (``seq`` numbers the batches from 0)."""
        if seq != self._next_seq:
            self._early[seq] = frame
            return
        self._run_frame(frame)
        self._next_seq += 1
        while self._next_seq in self._early:
            self._run_frame(self._early.pop(self._next_seq))
            self._next_seq += 1
        caught_up = self._caught_up
        if caught_up is not None and self._next_seq >= caught_up[0]:
            if not caught_up[1].done():
                caught_up[1].set_result(None)
            self._caught_up = None

    async def stop(self, cancel: bool, sent: int) -> None:
        """Finish (or cancel) every message of the ``sent`` batches, run ``finalise()``, end."""
        await self._started.wait()
        try:
            self._cancel = cancel  # batches still on their way are cancelled on arrival
            if self._next_seq < sent:
                fut = asyncio.get_running_loop().create_future()
                self._caught_up = (sent, fut)
                await fut
            if self._worker is not None:
                await self._finish_in_flight(cancel)
                try:
                    await _maybe_await(self._worker.finalise())
                except Exception:
                    worker_logger.exception("worker %d: finalise() raised", self._number)
        finally:
            self.add((P.EV_BYE,))
            self._close()

    # -- running messages ---------------------------------------------------------

    def _run_frame(self, frame: bytes) -> None:
        for mid, want_reply, payload in pickle.loads(frame):
            if self._cancel:
                self.add((P.EV_DONE, mid, P.DONE_CANCELLED, None))
            else:
                self._start(mid, want_reply, payload)

    def _start(self, mid: int, want_reply: bool, payload: bytes) -> None:
        assert self._worker is not None
        try:
            result = self._worker.process_message(pickle.loads(payload))
        except Exception as exc:
            self._failed(mid, want_reply, exc)
            return
        if inspect.isawaitable(result):
            assert self._loop is not None
            task = self._loop.create_task(self._await(mid, want_reply, result))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self._succeeded(mid, want_reply, result)

    async def _await(self, mid: int, want_reply: bool, awaitable: Awaitable[Any]) -> None:
        try:
            result = await awaitable
        except asyncio.CancelledError:
            self.add((P.EV_DONE, mid, P.DONE_CANCELLED, None))
            raise
        except Exception as exc:
            self._failed(mid, want_reply, exc)
        else:
            self._succeeded(mid, want_reply, result)

    def _succeeded(self, mid: int, want_reply: bool, result: Any) -> None:
        payload: bytes | None = None
        if want_reply:
            try:
                payload = pickle.dumps(result, P.PROTOCOL)
            except Exception as exc:
                error = TypeError(
                    f"worker {self._number}: the reply of process_message could not be "
                    f"pickled: {type(exc).__name__}: {exc}"
                )
                error.__cause__ = exc
                self._failed(mid, want_reply, error)
                return
        self.add((P.EV_DONE, mid, P.DONE_OK, payload))

    def _failed(self, mid: int, want_reply: bool, exc: Exception) -> None:
        if not want_reply:
            worker_logger.error(
                "worker %d: process_message raised %s",
                self._number,
                type(exc).__name__,
                exc_info=exc,
            )
            self.add((P.EV_DONE, mid, P.DONE_FAILED, None))
            return
        text = _format_exception(exc)
        try:
            pickled: bytes | None = pickle.dumps(exc, P.PROTOCOL)
            pickle.loads(pickled)  # type: ignore[arg-type]
        except Exception:
            pickled = None
        name = f"{type(exc).__module__}.{type(exc).__qualname__}"
        self.add((P.EV_DONE, mid, P.DONE_FAILED, (pickled, name, repr(exc), text)))

    def _put_result(self, value: Any) -> None:
        # Pickled here, in the caller: an unpicklable result fails its message.
        self.add((P.EV_RESULT, pickle.dumps(value, P.PROTOCOL)))

    async def _finish_in_flight(self, cancel: bool) -> None:
        if not self._tasks:
            return
        if cancel:
            for task in self._tasks:
                task.cancel()
            await asyncio.wait(set(self._tasks), timeout=CANCEL_GRACE)
        else:
            while self._tasks:
                await asyncio.wait(set(self._tasks))


# -- the parent side ------------------------------------------------------------


class _State(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class _SlotState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"  # told to stop
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
    """One worker number and the actor currently serving it."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.state = _SlotState.DEAD
        self.actor: Any = None  # ray.actor.ActorHandle
        self.pid: int | None = None
        self.node: str | None = None
        self.sent = 0  # delivery batches sent to the current actor
        self.queue: deque[_Msg] = deque()
        self.held: dict[int, _Msg] = {}
        self.listener: asyncio.Task[None] | None = None
        self.ready: asyncio.Future[None] | None = None
        self.exited: asyncio.Future[None] | None = None
        self.start_error: tuple[str, str] | None = None
        self.said_bye = False
        self.killed = False
        self.failures = 0

    @property
    def alive(self) -> bool:
        return self.state is not _SlotState.DEAD


class RayPool:
    """A pool of Ray async actors, each hosting one :class:`~looppool.Worker`.

    The parent API is :class:`looppool.Pool`'s::

        async with looppool.ray.RayPool(MyWorker, 4, address="auto") as pool:
            await pool.put(message)
            reply = await pool.submit(message)
            async for result in pool.results(): ...

    ``worker`` is a :class:`~looppool.Worker` subclass or a zero-argument
    callable returning one (``functools.partial``); Ray pickles it with
    cloudpickle, and the worker's module must be importable on every node
    (install it, or ship it with ``runtime_env``).

    Options:

    * ``size`` — number of actors (worker numbers ``0`` to ``size - 1``).
    * ``address`` — passed to ``ray.init()`` if this process is not
      connected to Ray yet: ``None`` (``RAY_ADDRESS`` if set, else the
      cluster last started with ``ray start`` on this machine, else a new
      local instance), ``"auto"`` (a running cluster, or an error),
      ``"host:6379"`` or ``"ray://host:10001"`` (Ray Client). A process
      already connected keeps its connection, whatever ``address`` says;
      RayPool never calls ``ray.shutdown()``.
    * ``concurrency`` — most messages in flight at once in one actor.
    * ``max_pending`` — most messages accepted and not yet finished; above it
      ``put`` waits and ``put_nowait`` raises :class:`~looppool.QueueFull`.
    * ``on_result`` — a callback (plain or ``async``) receiving every result
      instead of :meth:`results`.
    * ``name`` — shown in logs.
    * ``**ray_actor_options`` — passed to ``.options()`` of every actor:
      ``num_cpus`` (default 1: an actor per core), ``resources``,
      ``scheduling_strategy`` (``"SPREAD"`` spreads the actors over nodes),
      ``runtime_env``, ``memory``... Those RayPool sets itself
      (:data:`RESERVED_OPTIONS`) are refused.
    """

    def __init__(
        self,
        worker: type[Worker] | Callable[[], Worker],
        size: int,
        *,
        address: str | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        max_pending: int = DEFAULT_MAX_PENDING,
        on_result: ResultCallback | None = None,
        name: str | None = None,
        **ray_actor_options: Any,
    ) -> None:
        if not callable(worker):
            raise TypeError(f"worker must be a Worker subclass or a callable, not {worker!r}")
        if isinstance(worker, type) and not issubclass(worker, Worker):
            raise TypeError(
                f"worker class {worker.__qualname__} does not derive from looppool.Worker"
            )
        _check_int("size", size)
        _check_int("concurrency", concurrency)
        _check_int("max_pending", max_pending)
        if address is not None and not isinstance(address, str):
            raise TypeError(f"address must be a str or None, not {address!r}")
        if on_result is not None and not callable(on_result):
            raise TypeError(f"on_result must be callable, not {on_result!r}")
        reserved = sorted(RESERVED_OPTIONS.intersection(ray_actor_options))
        if reserved:
            raise TypeError(
                f"RayPool sets the actor option(s) {', '.join(reserved)} itself "
                "(use concurrency= for max_concurrency)"
            )
        try:
            ray.cloudpickle.dumps(worker)  # type: ignore[no-untyped-call, unused-ignore]
        except Exception as exc:
            raise TypeError(
                f"the worker factory {worker!r} cannot be pickled, which Ray needs: {exc}"
            ) from exc
        options: dict[str, Any] = {"num_cpus": 1, **ray_actor_options}
        options.update(
            max_concurrency=concurrency + CONTROL_CALLS,
            max_restarts=0,
            max_task_retries=0,
        )
        # .options() checks the names and values now, at the point of the mistake.
        self._actor_class: Any = _ACTOR_CLASS.options(**options)

        self._factory = worker
        self._size = size
        self._address = address
        self._concurrency = concurrency
        self._max_pending = max_pending
        self._on_result = on_result
        self._on_result_async = on_result is not None and (
            inspect.iscoroutinefunction(on_result)
            or inspect.iscoroutinefunction(getattr(on_result, "__call__", None))  # noqa: B004
        )
        self.name = name if name is not None else _describe_factory(worker)
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
        self._delivered = 0
        self._delivered_waiters: list[tuple[int, asyncio.Future[None]]] = []
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

    # -- public properties --------------------------------------------------

    @property
    def size(self) -> int:
        """The number of actors."""
        return self._size

    @property
    def actors(self) -> tuple[Any, ...]:
        """The Ray actor handle serving each worker number (``None`` while it has none)."""
        return tuple(s.actor for s in self._slots)

    @property
    def pids(self) -> tuple[int | None, ...]:
        """The pid of each actor's process, on its node (``None`` until it is ready)."""
        return tuple(s.pid if s.alive else None for s in self._slots)

    @property
    def nodes(self) -> tuple[str | None, ...]:
        """The IP address of the node each actor runs on (``None`` until it is ready)."""
        return tuple(s.node if s.alive else None for s in self._slots)

    def stats(self) -> PoolStats:
        """Return a frozen snapshot of the pool's counters (``blocked`` is always 0)."""
        return PoolStats(
            put=self._n_put,
            processed=self._n_processed,
            failed=self._n_failed,
            lost=self._n_lost,
            results=self._n_results,
            pending=self._pending,
            redelivered=self._n_redelivered,
            respawns=self._n_respawns,
            blocked=0,
            in_flight=tuple(len(s.held) for s in self._slots),
        )

    def __repr__(self) -> str:
        in_flight = sum(len(s.held) for s in self._slots)
        return (
            f"<looppool.ray.RayPool {self.name!r} {self._state.value}, {self._size} actors, "
            f"{in_flight} in flight, {self._pending} pending>"
        )

    # -- life cycle -----------------------------------------------------------

    async def __aenter__(self) -> RayPool:
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
        """Connect to Ray if needed, start the actors; return once each ran ``initialise()``.

        Raises :class:`~looppool.WorkerStartError` if one fails, leaving no
        actor behind. Like any Ray actor, one that needs resources the
        cluster lacks waits for them (an autoscaler may add nodes).
        """
        if self._state is not _State.NEW:
            raise PoolClosed(f"{self!r} was already started; a pool starts once")
        self._loop = asyncio.get_running_loop()
        self._state = _State.STARTING
        try:
            if not ray.is_initialized():
                # Blocks this loop while Ray connects (or starts a local
                # instance): ray.init installs its SIGTERM handler only when
                # called on the main thread, so it is not sent to a thread.
                ray.init(address=self._address)
            for slot in self._slots:
                slot.ready = self._loop.create_future()
                self._launch(slot)
            await self._await_ready([s.ready for s in self._slots if s.ready is not None])
        except BaseException:
            await self._kill_all()
            self._finish()
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
                error = fut.exception()
                if error is not None:
                    for other in pending:
                        other.cancel()
                    raise error

    async def stop(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Stop the pool as its worker class defines; idempotent.

        A :class:`~looppool.SafeWorker` pool processes every message put
        before the call, and delivers its results, first. A
        :class:`~looppool.Worker` pool drops queued messages and cancels those
        in flight. Actors still running after ``timeout`` seconds are killed
        (``ray.kill``). Afterwards :meth:`put` raises :class:`~looppool.PoolClosed`.
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
        self._state = _State.STOPPING
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
            await self._kill_all()
            raise
        finally:
            self._finish()

    async def _stop_workers(self, graceful: bool) -> None:
        if graceful and self._safe:
            # Every message accepted so far runs; replacements stay on so that
            # a death while draining does not strand the messages it held.
            await self._wait_idle()
        else:
            self._closing_reason = "the pool stopped before the message was processed"
            self._drop_queued()
        self._accepting_respawns = False
        cancel = not self._safe
        for slot in self._slots:
            if slot.actor is not None and slot.state is not _SlotState.STOPPING:
                slot.state = _SlotState.STOPPING
                slot.actor.stop.remote(cancel, slot.sent)
        exits = [s.exited for s in self._slots if s.exited is not None and not s.exited.done()]
        if exits:
            await asyncio.wait(exits)
        self._no_more_results = True
        self._wake_results()
        if self._callback_task is not None:
            await self._callback_task

    async def _wait_idle(self) -> None:
        while self._pending and self._broken is None:
            await self._drain_upto(self._epoch)

    def _finish(self) -> None:
        """Release everything once no actor runs (or none could start)."""
        self._state = _State.STOPPED
        self._accepting_respawns = False
        reason = self._closing_reason
        for slot in self._slots:
            for msg in [*slot.held.values(), *slot.queue]:
                self._lose(msg, PoolClosed(reason))
            slot.held.clear()
            slot.queue.clear()
            if slot.listener is not None and not slot.listener.done():
                slot.listener.cancel()
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
        for slot in self._slots:
            if slot.alive and slot.actor is not None:
                slot.killed = True
                _kill(slot.actor)
        exits = [s.exited for s in self._slots if s.exited is not None and not s.exited.done()]
        if exits:
            # Shielded: a killed actor's listener reports within milliseconds;
            # that must not be abandoned because the caller is being cancelled.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(asyncio.wait(exits))

    # -- sending --------------------------------------------------------------

    def _pickle(self, message: Any) -> bytes:
        if self._state is not _State.RUNNING:
            self._raise_closed()
        try:
            return pickle.dumps(message, P.PROTOCOL)
        except Exception as exc:
            raise TypeError(
                f"the message {_short_repr(message)} cannot be pickled, so it cannot be "
                f"sent to an actor: {type(exc).__name__}: {exc}"
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
        it, messages are dealt to the actors in fair rounds.
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
        If the actor died holding it, :class:`~looppool.WorkerLost` is raised.
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
        number = target if target is not None else self._next_in_round()
        self._enqueue(self._slots[number], msg)

    def _next_in_round(self) -> int:
        """Fair rounds: each round deals one message to every live actor, in order."""
        while True:
            if not self._round:
                self._deal_round()
            number = self._round.popleft()
            if self._slots[number].state is _SlotState.READY or not any(
                self._slots[n].state is _SlotState.READY for n in self._round
            ):
                return number

    def _deal_round(self) -> None:
        ready = [s.number for s in self._slots if s.state is _SlotState.READY]
        if not ready:
            # Every actor is being replaced: deal to those starting; their
            # messages wait in the parent until they are ready.
            ready = [s.number for s in self._slots if s.state is _SlotState.STARTING]
        if not ready:
            raise self._broken or PoolBroken(f"pool {self.name!r} has no worker left")
        self._round.extend(ready)

    def _enqueue(self, slot: _Slot, msg: _Msg) -> None:
        slot.queue.append(msg)
        if slot.state is _SlotState.READY and len(slot.held) < self._concurrency:
            self._mark_dirty(slot)

    def _mark_dirty(self, slot: _Slot) -> None:
        if slot.queue and slot.state is _SlotState.READY:
            self._dirty[slot] = None
            if not self._pump_scheduled:
                self._pump_scheduled = True
                assert self._loop is not None
                self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        """Move queued messages into each actor's window: one ``deliver`` call per actor a turn."""
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
            items: list[tuple[int, bool, bytes]] = []
            for _ in range(room):
                msg = queue.popleft()
                msg.deliveries += 1
                held[msg.id] = msg
                items.append((msg.id, msg.future is not None, msg.payload))
            # Fire and forget: if the actor dies, its listener learns it and
            # rescues what it held; the call's own error adds nothing.
            slot.actor.deliver.remote(slot.sent, pickle.dumps(items, P.PROTOCOL))
            slot.sent += 1

    def _drop_queued(self) -> None:
        """Lose every message not yet sent to an actor (a non-graceful stop)."""
        exc = PoolClosed("the pool stopped before the message was sent to a worker")
        for slot in self._slots:
            while slot.queue:
                self._lose(slot.queue.popleft(), exc)

    # -- receiving ------------------------------------------------------------

    async def _listen(self, slot: _Slot, actor: Any) -> None:
        """Keep one ``next_events`` call outstanding on ``actor``; dispatch each answer."""
        try:
            while True:
                data = await actor.next_events.remote()
                if data is None:
                    break
                self._dispatch(slot, pickle.loads(data))
                if slot.said_bye:
                    break
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # RayActorError (dead, killed, its node lost) or any failure of
            # the channel itself: either way this actor is done for.
            self._on_actor_end(slot, actor, exc)
            return
        self._on_actor_end(slot, actor, None)

    def _dispatch(self, slot: _Slot, items: list[tuple[Any, ...]]) -> None:
        for item in items:
            op = item[0]
            if op == P.EV_DONE:
                self._on_done(slot, item[1], item[2], item[3])
            elif op == P.EV_RESULT:
                self._on_result_payload(item[1])
            elif op == P.EV_LOG:
                self._on_log(slot, item[1])
            elif op == P.EV_READY:
                slot.pid, slot.node = item[1], item[3]
                self._safe = item[2]  # authoritative: the factory's product decides
                self._on_ready(slot)
            elif op == P.EV_START_FAILED:
                slot.start_error = (item[1], item[2])
            elif op == P.EV_BYE:
                slot.said_bye = True

    def _on_done(self, slot: _Slot, mid: int, status: int, payload: Any) -> None:
        msg = slot.held.pop(mid, None)
        if msg is None:
            return  # already given up on
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

    # -- actors ---------------------------------------------------------------

    def _launch(self, slot: _Slot) -> None:
        """Create an actor for ``slot``, ask it to start, and listen to it."""
        assert self._loop is not None
        actor = self._actor_class.remote(
            self._factory, slot.number, self.name, logging.getLogger().getEffectiveLevel()
        )
        slot.actor = actor
        slot.state = _SlotState.STARTING
        slot.pid = slot.node = None
        slot.sent = 0
        slot.start_error = None
        slot.said_bye = False
        slot.killed = False
        slot.exited = self._loop.create_future()
        # Its outcome arrives as EV_READY or EV_START_FAILED; if the actor
        # cannot even be created, the listener's call fails with the reason.
        actor.start.remote()
        slot.listener = self._loop.create_task(
            self._listen(slot, actor), name=f"looppool-ray-listener-{self.name}-{slot.number}"
        )

    def _on_actor_end(self, slot: _Slot, actor: Any, error: BaseException | None) -> None:
        """The actor said goodbye, or is gone: the analogue of a worker process's exit."""
        if slot.actor is not actor:
            return
        previous = slot.state
        slot.state = _SlotState.DEAD
        slot.actor = None
        # Whatever happened, this actor must not run anything more: a merely
        # unreachable one could otherwise run a re-delivered message twice.
        _kill(actor)
        if slot.exited is not None and not slot.exited.done():
            slot.exited.set_result(None)
        if previous is _SlotState.STARTING and not slot.killed:
            reason, tb = slot.start_error or (f"its actor died: {_describe_ray_error(error)}", "")
            start_error = WorkerStartError(slot.number, reason, tb)
            if slot.ready is not None:  # the pool's start() awaits this one
                if not slot.ready.done():
                    slot.ready.set_exception(start_error)
                slot.ready = None
                return
            slot.failures += 1
            logger.error(
                "pool %s: replacement of worker %d failed: %s", self.name, slot.number, reason
            )
        elif not (slot.said_bye or slot.killed):
            logger.error(
                "pool %s: worker %d (pid %s, node %s) died: %s",
                self.name,
                slot.number,
                slot.pid,
                slot.node,
                _describe_ray_error(error),
            )
        if previous is _SlotState.STOPPING or slot.killed:
            # Told to stop (or killed by us): nothing to replace.
            for msg in list(slot.held.values()):
                self._lose(msg, PoolClosed(self._closing_reason))
            slot.held.clear()
            return
        lost = WorkerLost(slot.number, slot.pid, None)
        lost.__cause__ = error
        self._rescue(slot, lost)
        if self._accepting_respawns:
            self._respawn_later(slot)

    def _rescue(self, slot: _Slot, lost: WorkerLost) -> None:
        """Decide the fate of the messages a dead actor held or had queued."""
        held = sorted(slot.held.values(), key=lambda m: m.id)
        slot.held.clear()
        keep: deque[_Msg] = deque()  # directed to this number: wait for its replacement
        again: list[_Msg] = []  # shared: deal to another actor
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
            last = slot.start_error[0] if slot.start_error else "its actor died"
            self._break(
                f"worker {slot.number} failed to start {slot.failures} times in a row "
                f"(last: {last})"
            )
            return
        slot.state = _SlotState.STARTING  # counts as alive: no second replacement is scheduled
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
            self._launch(slot)
        except Exception as exc:
            slot.state = _SlotState.DEAD
            self._break(f"worker {slot.number} could not be restarted: {exc!r}")
            return
        logger.info("pool %s: worker %d restarted (new actor)", self.name, slot.number)

    def _on_ready(self, slot: _Slot) -> None:
        if slot.state is _SlotState.STOPPING:
            return  # told to stop while initialising: it stops once ready
        slot.state = _SlotState.READY
        slot.failures = 0
        if slot.ready is not None and not slot.ready.done():
            slot.ready.set_result(None)
        slot.ready = None
        if self._state is _State.STOPPING and not self._accepting_respawns:
            return
        self._mark_dirty(slot)

    def _break(self, reason: str) -> None:
        """Give up: an actor keeps failing to start. Fail everything, loudly."""
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
        self._wake_all_room_waiters()
        for slot in self._slots:
            if slot.alive and slot.actor is not None:
                slot.killed = True
                _kill(slot.actor)


def _kill(actor: Any) -> None:
    with contextlib.suppress(Exception):  # already dead, or Ray is shutting down
        ray.kill(actor, no_restart=True)


def _describe_ray_error(error: BaseException | None) -> str:
    if error is None:
        return "it ended without saying goodbye"
    text = str(error).strip().splitlines()
    detail = text[-1] if text else ""
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


_ACTOR_CLASS: Any = ray.remote(LooppoolActor)
