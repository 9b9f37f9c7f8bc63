"""looppool beyond one machine: :class:`RayPool`, the same workers as Ray actors.

::

  parent: the Ray driver (the user's asyncio app)          Ray async actor k (LooppoolActor)
  ───────────────────────────────────────────────          ───────────────────────────────────
  put(m) ── pickle in caller ─► fair rounds ─► slot k queue       hosts the user's Worker, on
  put(m, worker=k) / broadcast / submit ─────► slot k queue       the actor's event loop
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

Monitoring: with ``statsd=`` or ``blocking_threshold=``, each actor runs the
same :class:`~looppool._monitor.WorkerMonitor` as a Pool's worker process, on
the actor's loop: started after ``initialise()``, closed before
``finalise()``. Its gauges go from the actor's node straight to statsd; its
blocked-loop warnings are log records like any other, and each episode is an
``EV_BLOCKED`` event counted in ``stats().blocked``. Events made on other
threads (log records, the detector's watchdog) join the actor's event buffer
at once, in the order they happen, so a warning logged while a handler
blocks reaches the parent before that handler's reply, as in Pool.
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
import logging
import os
import pickle
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from . import _protocol as P
from . import _tracing
from ._child import _ForwardHandler
from ._core import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_RESULTS,
    Farewell,
    PoolCore,
    ResultCallback,
    WorkerSlot,
)
from ._errors import WorkerLost
from ._ledger import Msg, SlotState
from ._monitor import WorkerMonitor, monitor_options
from ._runner import Heartbeat, MessageRunner
from ._worker import MessageT, ReplyT, ResultT, Worker

__all__ = ["RESERVED_OPTIONS", "RayPool"]


#: Actor calls that may run beside the deliveries: ``start``, ``next_events``, ``stop``.
CONTROL_CALLS: Final = 4  # start, next_events, stop, cancel (each returns at once but stop)
#: Actor options RayPool sets itself; passing them would break its guarantees.
RESERVED_OPTIONS: Final = frozenset(
    {
        "max_concurrency",  # from ``concurrency``
        "max_restarts",  # RayPool replaces dead actors itself, and re-delivers what they held
        "max_task_retries",  # a retried delivery would run messages twice
        "allow_out_of_order_execution",
        "lifetime",  # a detached actor would outlive its pool's driver
        "get_if_exists",
        "namespace",
    }
)


# -- the actor side -------------------------------------------------------------


class LooppoolActor:
    """Hosts one :class:`~looppool.Worker` inside a Ray async actor.

    :class:`RayPool` creates one per worker number; users do not construct it.
    Every method is a coroutine, so Ray runs the actor on one event loop
    (in a thread of the actor's process; uvloop when Ray finds it installed,
    else asyncio's); the worker's hooks and every ``process_message`` task
    run on that loop, as in a Pool's worker process.
    """

    def __init__(
        self,
        factory: Callable[[], Worker],
        number: int,
        pool_name: str,
        log_level: int,
        monitor: dict[str, Any] | None = None,
        beat: tuple[float, float | None, bool] | None = None,
    ) -> None:
        self._runner = MessageRunner(factory, number, self.add, pool_name=pool_name)
        # (interval, hang_timeout, report_rss) of the heartbeat, as in a worker process.
        self._beat = beat
        self._heartbeat: Heartbeat | None = None
        self._last_sent = 0.0
        self._number = number
        self._pool_name = pool_name
        self._log_level = log_level
        self._monitor_options = monitor
        self._monitor: WorkerMonitor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        # A deque: the loop thread and other threads (log records, the
        # blocking detector's watchdog) append to it, each item at the moment
        # it is made, and deque.append and popleft are atomic.
        self._events: deque[tuple[Any, ...]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._started = asyncio.Event()
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
        if self._closed:
            return
        # Appended now, from whichever thread: a log record made while a
        # handler blocks the loop precedes that handler's EV_DONE, as in Pool.
        self._events.append(item)
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread:
            self._wake()
        else:
            # The waiter belongs to the loop: only the loop may complete it.
            with contextlib.suppress(RuntimeError):  # the loop is closed: the actor is ending
                loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        """Answer the outstanding ``next_events`` call, if it waits (on the loop's thread)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _attach(self) -> None:
        """Remember the actor's loop and its thread (every coroutine of the actor runs there)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()

    def _close(self) -> None:
        self._closed = True
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
            self._handler = None
        self._wake()

    async def next_events(self) -> bytes | None:
        """Wait until there are events; return them as one pickled batch (``None``: ended).

        The parent keeps exactly one of these calls outstanding: this is the
        actor-to-parent channel, and it costs nothing while the actor is idle.
        """
        self._attach()  # before the first wait: another thread's add() must know the loop
        events = self._events
        while not events:
            if self._closed:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        # popleft, not a swap of lists: another thread may append meanwhile.
        items = [events.popleft() for _ in range(len(events))]
        self._last_sent = time.monotonic()
        return pickle.dumps(items, P.PROTOCOL)

    # -- life cycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Build the worker and run ``initialise()``; report ready or failed as an event."""
        self._attach()
        # The worker's log records go to the parent's logging, as in Pool.
        # Only the root logger gets a handler: Ray's own loggers keep theirs.
        self._handler = _ForwardHandler(self)  # type: ignore[arg-type]
        root = logging.getLogger()
        root.addHandler(self._handler)
        root.setLevel(self._log_level)
        try:
            worker = await self._runner.initialise()
            if worker is not None:
                # As in a Pool's worker: after initialise(), before EV_READY.
                self._monitor = self._start_monitor()
                if self._beat is not None:
                    assert self._loop is not None
                    # Events made on other threads join the buffer at once, but
                    # a stuck loop cannot answer next_events: the stack of a
                    # hung actor never reaches the parent (it is killed without).
                    self._heartbeat = Heartbeat(
                        self._loop, self.add, self.add, lambda: self._last_sent, *self._beat
                    )
                    self._heartbeat.start()
        finally:
            self._started.set()  # stop() may now proceed, started or not
        if worker is None:
            self._close()
            return
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
            if self._runner.worker is not None:
                await self._runner.finish_in_flight(cancel)
                monitor, self._monitor = self._monitor, None
                if monitor is not None:
                    await monitor.aclose()  # never raises
                await self._runner.finalise()
                # Through finalise(), as in a worker process: slow is not hung.
                if self._heartbeat is not None:
                    self._heartbeat.close()
        finally:
            self.add((P.EV_BYE,))
            self._close()

    def _start_monitor(self) -> WorkerMonitor | None:
        """Start the statsd reporter and the blocking detector on this loop, if asked for."""
        if not self._monitor_options:
            return None
        assert self._loop is not None
        monitor = WorkerMonitor(
            loop=self._loop,
            number=self._number,
            pool_name=self._pool_name,
            counters=self._runner.counters,
            on_blocked=self._on_blocked,
            on_metrics=self._on_metrics,
            **self._monitor_options,
        )
        monitor.start()  # never raises: a bad address is logged, and the actor runs on
        return monitor

    def _on_blocked(self) -> None:
        self.add((P.EV_BLOCKED,))  # from the detector's watchdog thread: add() is thread-safe

    async def cancel(self, mid: int) -> None:
        """Cancel message ``mid`` if it runs here (its ``submit()`` was cancelled)."""
        self._runner.cancel(mid)

    def _on_metrics(self, gauges: dict[str, float]) -> None:
        self.add((P.EV_METRICS, gauges))

    def _run_frame(self, frame: bytes) -> None:
        runner = self._runner
        # Each item: (id, want_reply, payload, timeout, trace), as OP_MSG's fields.
        for mid, want_reply, payload, timeout, trace in pickle.loads(frame):
            if self._cancel:
                runner.refuse(mid)
            else:
                runner.start(mid, want_reply, payload, timeout, trace)


# -- the parent side ------------------------------------------------------------


class _ActorSlot(WorkerSlot):
    """A slot served by a Ray actor."""

    def __init__(self, number: int) -> None:
        super().__init__(number)
        self.actor: Any = None  # ray.actor.ActorHandle
        self.node: str | None = None
        self.sent = 0  # delivery batches sent to the current actor
        self.listener: asyncio.Task[None] | None = None
        # Cleared while max_results holds back reading: the listener waits before its next call.
        self.flowing = asyncio.Event()
        self.flowing.set()


class RayPool(PoolCore[_ActorSlot, MessageT, ReplyT, ResultT]):
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
    * ``name`` — shown in logs and metric names.
    * ``statsd``, ``statsd_prefix``, ``metrics_interval``,
      ``blocking_threshold``, ``worker_metrics`` — monitoring, as in
      :class:`looppool.Pool` (see :mod:`looppool.metrics`): each actor sends
      its gauges from its own node (``"host:port"`` is resolved there; a
      client instance travels to the actors with cloudpickle), a blocked
      actor loop logs a warning that reaches the parent's logging, and
      ``worker_metrics=True`` forwards each actor's gauges to the driver
      (:meth:`worker_metrics`, :class:`looppool.metrics.PrometheusCollector`).
    * ``**ray_actor_options`` — passed to ``.options()`` of every actor:
      ``num_cpus`` (default 1: an actor per core), ``resources``,
      ``scheduling_strategy`` (``"SPREAD"`` spreads the actors over nodes),
      ``runtime_env``, ``memory``... Those RayPool sets itself
      (:data:`RESERVED_OPTIONS`) are refused.
    """

    _noun = "actor"
    # The driver pulls an actor's events with calls its blocked loop cannot answer.
    _no_stack = "an actor's stack cannot be fetched while its loop is blocked"

    def __init__(
        self,
        worker: type[Worker[MessageT, ReplyT, ResultT]]
        | Callable[[], Worker[MessageT, ReplyT, ResultT]],
        size: int,
        *,
        address: str | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        max_pending: int = DEFAULT_MAX_PENDING,
        on_result: ResultCallback | None = None,
        name: str | None = None,
        statsd: str | object | None = None,
        statsd_prefix: str | None = None,
        metrics_interval: float = 10.0,
        blocking_threshold: float | None = None,
        message_timeout: float | None = None,
        hang_timeout: float | None = None,
        max_messages_per_worker: int | None = None,
        max_memory_per_worker: int | None = None,
        max_results: int | None = DEFAULT_MAX_RESULTS,
        worker_metrics: bool = False,
        start_timeout: float | None = None,
        **ray_actor_options: Any,
    ) -> None:
        super().__init__(
            worker,
            size,
            concurrency=concurrency,
            max_pending=max_pending,
            on_result=on_result,
            name=name,
            message_timeout=message_timeout,
            hang_timeout=hang_timeout,
            max_messages_per_worker=max_messages_per_worker,
            max_memory_per_worker=max_memory_per_worker,
            max_results=max_results,
            start_timeout=start_timeout,
        )
        if address is not None and not isinstance(address, str):
            raise TypeError(f"address must be a str or None, not {address!r}")
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
        self._monitor = monitor_options(
            statsd, statsd_prefix, metrics_interval, blocking_threshold, worker_metrics
        )
        if self._monitor is not None:
            try:
                ray.cloudpickle.dumps(statsd)  # type: ignore[no-untyped-call, unused-ignore]
            except Exception as exc:
                raise TypeError(
                    f"statsd={statsd!r} cannot be pickled, which Ray needs to send it to the "
                    f"actors; pass 'host:port' or a factory of clients: {exc}"
                ) from exc
        options: dict[str, Any] = {"num_cpus": 1, **ray_actor_options}
        options.update(
            max_concurrency=concurrency + CONTROL_CALLS,
            max_restarts=0,
            max_task_retries=0,
        )
        # .options() checks the names and values now, at the point of the mistake.
        self._actor_class: Any = _ACTOR_CLASS.options(**options)
        self._address = address

    def _new_slot(self, number: int) -> _ActorSlot:
        return _ActorSlot(number)

    @property
    def actors(self) -> tuple[Any, ...]:
        """The Ray actor handle serving each worker number (``None`` while it has none)."""
        return tuple(s.actor for s in self._slots)

    @property
    def pids(self) -> tuple[int | None, ...]:
        """The pid of each actor's process, on its node (``None`` until it is ready)."""
        return super().pids

    @property
    def nodes(self) -> tuple[str | None, ...]:
        """The IP address of the node each actor runs on (``None`` until it is ready)."""
        return tuple(s.node if s.alive else None for s in self._slots)

    def __repr__(self) -> str:
        return f"<looppool.ray.RayPool {self._describe()}>"

    # -- actors ---------------------------------------------------------------

    def _before_start(self) -> None:
        if not ray.is_initialized():
            # Blocks this loop while Ray connects (or starts a local
            # instance): ray.init installs its SIGTERM handler only when
            # called on the main thread, so it is not sent to a thread.
            ray.init(address=self._address)

    def _launch(self, slot: _ActorSlot) -> None:
        """Create an actor for ``slot``, ask it to start, and listen to it."""
        assert self._loop is not None
        actor = self._actor_class.remote(
            self._factory,
            slot.number,
            self.name,
            logging.getLogger().getEffectiveLevel(),
            self._monitor,
            self._heartbeat_options(),
        )
        slot.actor = actor
        slot.state = SlotState.STARTING
        slot.pid = slot.node = None
        slot.sent = 0
        slot.start_error = None
        slot.farewell = Farewell.NONE
        slot.exited = self._loop.create_future()
        # Its outcome arrives as EV_READY or EV_START_FAILED; if the actor
        # cannot even be created, the listener's call fails with the reason.
        actor.start.remote()
        slot.listener = self._loop.create_task(
            self._listen(slot, actor), name=f"looppool-ray-listener-{self.name}-{slot.number}"
        )

    async def _listen(self, slot: _ActorSlot, actor: Any) -> None:
        """Keep one ``next_events`` call outstanding on ``actor``; dispatch each answer."""
        try:
            while True:
                await slot.flowing.wait()
                data = await actor.next_events.remote()
                if data is None:
                    break
                self._dispatch(slot, pickle.loads(data))
                if slot.farewell is Farewell.BYE:
                    break
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # RayActorError (dead, killed, its node lost) or any failure of
            # the channel itself: either way this actor is done for.
            self._on_actor_end(slot, actor, exc)
            return
        self._on_actor_end(slot, actor, None)

    def _ready_info(self, slot: _ActorSlot, extra: tuple[Any, ...]) -> None:
        slot.node = extra[0] if extra else None

    def _on_actor_end(self, slot: _ActorSlot, actor: Any, error: BaseException | None) -> None:
        """The actor said goodbye, or is gone: the analogue of a worker process's exit."""
        if slot.actor is not actor:
            return
        slot.actor = None
        # Whatever happened, this actor must not run anything more: a merely
        # unreachable one could otherwise run a re-delivered message twice.
        _kill(actor)
        lost = WorkerLost(slot.number, slot.pid, None)
        lost.__cause__ = error
        self._on_worker_end(slot, f"its actor died: {_describe_ray_error(error)}", lost)

    def _send(self, slot: _ActorSlot, batch: list[Msg]) -> None:
        items = [
            (msg.id, msg.reply is not None, msg.payload, msg.timeout, _tracing.wire(msg))
            for msg in batch
        ]
        # Fire and forget: if the actor dies, its listener learns it and
        # rescues what it held; the call's own error adds nothing.
        slot.actor.deliver.remote(slot.sent, pickle.dumps(items, P.PROTOCOL))
        slot.sent += 1

    def _pause_reading(self, slot: _ActorSlot) -> None:
        slot.flowing.clear()

    def _resume_reading(self, slot: _ActorSlot) -> None:
        slot.flowing.set()

    def _send_cancel(self, slot: _ActorSlot, mid: int) -> None:
        if slot.actor is not None:
            # A cancel sent before the delivery it cancels may arrive first
            # (Ray does not order calls to an async actor): then the message
            # runs to its end, and counts as done. Rare: the delivery left at
            # the loop turn the message was accepted in.
            slot.actor.cancel.remote(mid)

    def _send_stop(self, slot: _ActorSlot, cancel: bool) -> None:
        if slot.actor is not None:
            slot.actor.stop.remote(cancel, slot.sent)

    def _kill(self, slot: _ActorSlot) -> None:
        if slot.actor is not None:
            _kill(slot.actor)

    def _release(self) -> None:
        for slot in self._slots:
            if slot.listener is not None and not slot.listener.done():
                slot.listener.cancel()


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
