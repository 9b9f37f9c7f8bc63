"""Testing support: :class:`InlinePool`, and looppool's pytest plugin.

:class:`InlinePool` has the API of :class:`looppool.Pool` but runs its workers
as tasks on the caller's event loop, in the caller's process: fast unit tests
of a :class:`~looppool.Worker` subclass, with coverage and a debugger that
simply work. Messages, results and replies still make a pickle round trip, so
a value that a real pool could not send fails here too.

The pytest plugin (entry point ``pytest11``, name ``looppool``) adds two
fixtures for pytest-asyncio users::

    async def test_fetch(looppool_factory):
        pool = await looppool_factory(Fetch, size=2)   # a started looppool.Pool
        assert await pool.submit("https://example.org/") > 0

    async def test_fetch_inline(inline_pool_factory):
        pool = await inline_pool_factory(Fetch)        # a started InlinePool

Both stop their pools at teardown; ``looppool_factory`` also fails the test
if a worker process outlives its pool. Options (group ``looppool``, each with
an ini equivalent; the command line wins) give the defaults that
``looppool_factory`` passes to ``Pool``:

* ``--looppool-loop`` / ``looppool_loop``: ``auto``, ``asyncio`` or ``uvloop``;
* ``--looppool-start-method`` / ``looppool_start_method``: ``fork``,
  ``spawn`` or ``forkserver``;
* ``--looppool-stop-timeout`` / ``looppool_stop_timeout``: the ``timeout`` of
  the teardown's ``stop()`` (default: none).

pytest imports this module at start-up in every project that has looppool
installed, so importing it only defines names: psutil is imported, and
processes are started, only when a fixture is used.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import inspect
import logging
import os
import pickle
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from ._core import DEFAULT_CONCURRENCY, DEFAULT_MAX_PENDING, PoolStats
from ._errors import (
    LooppoolError,
    PoolClosed,
    QueueFull,
    RemoteError,
    RemoteTraceback,
    WorkerStartError,
)
from ._pool import Pool
from ._worker import Worker

if TYPE_CHECKING:
    from types import TracebackType

    import psutil

__all__ = ["InlinePool", "InlinePoolFactory", "PoolFactory"]

#: The values ``Pool`` accepts for the options that InlinePool ignores; they
#: are checked all the same, so that a typo fails here as it would in Pool.
LOOP_KINDS: Final = ("auto", "asyncio", "uvloop")
START_METHODS: Final = ("fork", "spawn", "forkserver")
DISTRIBUTIONS: Final = ("rounds", "barrier")

_PROTOCOL: Final = pickle.HIGHEST_PROTOCOL

# The loggers Pool uses: a worker's failures, and the parent's own.
worker_logger: Final = logging.getLogger("looppool.worker")
logger: Final = logging.getLogger("looppool")


class _State(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class _Item:
    """One accepted message on its way through a worker."""

    __slots__ = ("done", "payload", "reply", "seq")

    def __init__(self, seq: int, payload: Any, reply: asyncio.Future[Any] | None) -> None:
        # Order of acceptance: the key in InlinePool._unfinished.
        self.seq = seq
        # The message, pickled when the pool pickles (the worker's task unpickles it).
        self.payload = payload
        # submit()'s future; None for put() and broadcast().
        self.reply = reply
        # Made only when drain() waits for this item.
        self.done: asyncio.Future[None] | None = None


class _Slot:
    """A worker and what it holds: the messages queued for it and those running."""

    __slots__ = ("backlog", "idle", "initialised", "number", "tasks", "worker")

    def __init__(self, number: int, worker: Worker) -> None:
        self.number = number
        self.worker = worker
        # Accepted, waiting for a free place among the worker's `concurrency`.
        self.backlog: collections.deque[_Item] = collections.deque()
        self.tasks: dict[asyncio.Task[None], _Item] = {}
        # Set when a task ends leaving backlog and tasks both empty.
        self.idle = asyncio.Event()
        # initialise() returned: finalise() must run.
        self.initialised = False


async def _call_hook(hook: Callable[..., Any], *args: Any) -> Any:
    """Call a worker hook that may be a plain or a coroutine function."""
    value = hook(*args)
    if inspect.isawaitable(value):
        value = await value
    return value


def _format_exception(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__qualname__} object>"
    return text if len(text) <= 80 else text[:77] + "..."


def _check_choice(option: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(map(repr, choices))}, not {value!r}")


def _check_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, not {value!r}")


def _describe_factory(worker: Any) -> str:
    func = getattr(worker, "func", worker)  # functools.partial
    return str(getattr(func, "__name__", type(func).__name__))


class InlinePool:
    """A stand-in for :class:`looppool.Pool` that runs its workers in this process.

    ``InlinePool(worker, size=1, *, concurrency=..., max_pending=...,
    on_result=None, name=None, pickle=True, **process_options)`` takes what
    ``Pool`` takes. Its ``size`` workers are objects made by ``worker`` and run
    as tasks on the event loop that calls :meth:`start`; each has its number,
    its own ``concurrency`` limit and its own queue. What needs no process
    behaves as in ``Pool``: fair rounds (message *i* of a round goes to worker
    *i*), directed messages, broadcasts, ``max_pending`` and
    :exc:`~looppool.QueueFull`, ``submit()`` re-raising the worker's exception
    with a :exc:`~looppool.RemoteTraceback` as ``__cause__``, failures of
    ``put`` messages logged on ``looppool.worker`` and counted, a
    ``SafeWorker`` stop that processes everything, a ``Worker`` stop that
    cancels what is in flight, :exc:`~looppool.PoolClosed` after the stop and
    :exc:`~looppool.WorkerStartError` when ``initialise()`` raises.

    With ``pickle=True`` (the default) every message, result and reply makes a
    pickle round trip where ``Pool`` would pickle it, so the worker gets a
    copy, and a value that cannot be pickled fails at the same call as in a
    real pool. ``pickle=False`` hands objects over as they are. The worker
    factory itself is never pickled, so a worker class defined inside a test
    works.

    Not emulated, because they need processes: worker crashes, respawns and
    :exc:`~looppool.WorkerLost`, signals, start methods, the loop kind
    (uvloop), the ``"barrier"`` distribution's mechanism (its guarantees
    hold), blocking detection, metrics, process titles, the tagging of worker
    log records, and killing at ``stop(timeout=...)`` (what outlives the
    timeout is cancelled instead). The options for them (``loop``,
    ``start_method``, ``distribution``, ...) are accepted and ignored. All
    workers share one loop: a handler that blocks it blocks them all.
    """

    def __init__(
        self,
        worker: type[Worker] | Callable[[], Worker],
        size: int | None = 1,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        max_pending: int = DEFAULT_MAX_PENDING,
        on_result: Callable[[Any], Awaitable[None] | None] | None = None,
        name: str | None = None,
        pickle: bool = True,
        **process_options: Any,
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
        if on_result is not None and not callable(on_result):
            raise TypeError(f"on_result must be callable, not {on_result!r}")
        _check_choice("loop", process_options.get("loop", "auto"), LOOP_KINDS)
        if process_options.get("start_method") is not None:
            _check_choice("start_method", process_options["start_method"], START_METHODS)
        _check_choice("distribution", process_options.get("distribution", "rounds"), DISTRIBUTIONS)

        self._factory = worker
        self._size = size
        self._concurrency = concurrency
        self._max_pending = max_pending
        self._on_result = on_result
        self._on_result_async = on_result is not None and (
            inspect.iscoroutinefunction(on_result)
            or inspect.iscoroutinefunction(getattr(on_result, "__call__", None))  # noqa: B004
        )
        #: Shown in messages and task names.
        self.name = name if name is not None else _describe_factory(worker)
        self._pickle = pickle

        self._state = _State.NEW
        self._stop_begun = False
        self._stopped = asyncio.Event()
        self._slots: list[_Slot] = []
        self._initialising: asyncio.Future[list[Any]] | None = None
        self._safe = False
        self._next_in_round = 0
        # Accepted and not yet finished, in order of acceptance: what drain()
        # waits for and max_pending limits.
        self._unfinished: dict[int, _Item] = {}
        self._seq = 0
        self._room_waiters: collections.deque[asyncio.Future[None]] = collections.deque()

        # Results wait here for results(), or for an async on_result, which
        # one task calls in order (a plain on_result is called at once).
        self._results: collections.deque[Any] = collections.deque()
        self._results_changed = asyncio.Event()
        self._callback_task: asyncio.Task[None] | None = None
        self._buffered = 0  # results buffered for an async on_result
        self._delivered = 0  # ... and finished by it
        self._delivered_changed = asyncio.Event()
        self._discard_results = False  # start() failed: the workers are as good as killed

        self._n_put = self._n_processed = self._n_failed = self._n_lost = self._n_results = 0

    # -- looking at it ------------------------------------------------------

    @property
    def size(self) -> int:
        """The number of workers."""
        return self._size

    @property
    def pids(self) -> tuple[None, ...]:
        """``None`` for every worker: an InlinePool has no worker processes.

        (Not this process's pid: a test that kills "a worker" would kill itself.)
        """
        return (None,) * self._size

    def stats(self) -> PoolStats:
        """Return a frozen snapshot of the counts (``respawns``, ``blocked``... stay 0)."""
        return PoolStats(
            put=self._n_put,
            processed=self._n_processed,
            failed=self._n_failed,
            lost=self._n_lost,
            results=self._n_results,
            pending=len(self._unfinished),
            redelivered=0,
            respawns=0,
            blocked=0,
            in_flight=tuple(len(slot.tasks) for slot in self._slots)
            if self._slots
            else (0,) * self._size,
        )

    def __repr__(self) -> str:
        in_flight = sum(len(slot.tasks) for slot in self._slots)
        return (
            f"<looppool.testing.InlinePool {self.name!r} {self._state.value}, "
            f"{self._size} workers (inline), {in_flight} in flight, "
            f"{len(self._unfinished)} pending>"
        )

    # -- life cycle ---------------------------------------------------------

    async def __aenter__(self) -> InlinePool:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The body failed (cancellation included): start nothing more, let
        # in-flight messages finish (SafeWorker) or cancel them, as Pool does.
        await self._shutdown(graceful=exc is None, limit=None)

    async def start(self) -> None:
        """Make the workers and run every ``initialise()``, concurrently.

        Raises :exc:`~looppool.WorkerStartError` (chained to the worker's
        exception) if making a worker or its ``initialise()`` fails, and the
        pool is stopped; :exc:`~looppool.PoolClosed` if :meth:`stop` is
        called meanwhile. Where ``Pool`` kills the processes, the workers
        that did initialise run ``finalise()`` (so that what they opened does
        not leak into the next test), and what they send then is dropped.
        """
        if self._state is not _State.NEW:
            raise PoolClosed(f"{self!r} was already started; a pool starts once")
        self._state = _State.STARTING
        try:
            for number in range(self._size):
                self._slots.append(_Slot(number, self._make_worker(number)))
            self._safe = self._slots[0].worker.safe
            # Concurrently, as in worker processes: one initialise() may wait
            # for something that another one provides.
            self._initialising = asyncio.gather(
                *(self._initialise(slot) for slot in self._slots), return_exceptions=True
            )
            outcomes = await self._initialising
            for slot, outcome in zip(self._slots, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    raise WorkerStartError(
                        slot.number,
                        f"{type(outcome).__name__}: {outcome}",
                        _format_exception(outcome),
                    ) from outcome
            if self._stop_begun:
                # stop() came as the last initialise() ended: too late to cancel it.
                raise PoolClosed("stop() was called while the pool was starting")
        except BaseException as exc:
            self._discard_results = True
            await self._finalise([slot for slot in self._slots if slot.initialised])
            self._finish()
            current = asyncio.current_task()
            stopped = isinstance(exc, asyncio.CancelledError) and self._stop_begun
            if stopped and current is not None and not current.cancelling():
                # Our stop() cancelled the initialise() calls, not a caller this task.
                raise PoolClosed("stop() was called while the pool was starting") from None
            raise
        if self._on_result_async:
            self._callback_task = asyncio.get_running_loop().create_task(
                self._run_callbacks(), name=f"{self.name}-on_result"
            )
        self._state = _State.RUNNING

    async def _initialise(self, slot: _Slot) -> None:
        await _call_hook(slot.worker.initialise)
        slot.initialised = True

    def _make_worker(self, number: int) -> Worker:
        try:
            worker = self._factory()
            if not isinstance(worker, Worker):
                raise TypeError(
                    f"the worker factory returned {worker!r}, not an instance of looppool.Worker"
                )
        except Exception as exc:
            raise WorkerStartError(
                number, f"{type(exc).__name__}: {exc}", _format_exception(exc)
            ) from exc
        worker.number = number
        worker._looppool_sink = self._make_sink()
        return worker

    async def stop(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (Pool's API)
        """Stop as the worker class defines; idempotent.

        A ``SafeWorker`` pool processes every message accepted before the
        call and delivers its results; a ``Worker`` pool drops the queued
        messages and cancels those in flight (counted as lost; their
        ``submit()`` raises :exc:`~looppool.PoolClosed`). Then every worker's
        ``finalise()`` runs. What still runs after ``timeout`` seconds,
        ``finalise()`` included, is cancelled (a process pool would kill it).
        Afterwards :meth:`put` raises :exc:`~looppool.PoolClosed`.
        """
        await self._shutdown(graceful=True, limit=timeout)

    async def _shutdown(self, *, graceful: bool, limit: float | None) -> None:
        if self._state is _State.NEW:
            self._finish()
            return
        if self._stop_begun or self._state is _State.STOPPED:
            # Stopping or stopped (a failed start stops too): wait for the first stop.
            await self._stopped.wait()
            return
        self._stop_begun = True
        if self._state is _State.STARTING:
            # start() awaits the initialise() calls in another task: end them
            # (Pool kills the processes); start() cleans up, raises PoolClosed.
            if self._initialising is not None:
                self._initialising.cancel()
            await self._stopped.wait()
            return
        self._state = _State.STOPPING
        # put() calls waiting for room now raise PoolClosed.
        self._wake_all_room_waiters()
        drop_queued = not (graceful and self._safe)
        cancel = not self._safe
        loop = asyncio.get_running_loop()
        stoppers = [
            loop.create_task(
                self._stop_worker(slot, drop_queued, cancel), name=f"{self.name}-stop-{slot.number}"
            )
            for slot in self._slots
        ]
        try:
            _, late = await asyncio.wait(stoppers, timeout=limit)
            if late:
                for task in late:
                    logger.warning(
                        "pool %s: stop(timeout=%s) expired; cancelling worker %d",
                        self.name,
                        limit,
                        stoppers.index(task),
                    )
                # Stands for the kill of the processes that outlived the timeout.
                await self._cancel_all(late)
            for task in stoppers:
                if not task.cancelled():
                    task.result()  # finalise() errors are logged: anything else is a bug
            await self._wait_delivered(self._buffered)
        except BaseException:
            # Cancelled (a second Ctrl-C) or broken: leave nothing running.
            await self._cancel_all(stoppers)
            raise
        finally:
            self._finish()

    async def _stop_worker(self, slot: _Slot, drop_queued: bool, cancel: bool) -> None:
        """Stop one worker, as its process would on the parent's stop message."""
        if drop_queued:
            self._drop_backlog(slot)
        if cancel:
            for task in slot.tasks:
                task.cancel()
        while slot.tasks or slot.backlog:
            slot.idle.clear()
            await slot.idle.wait()
        await self._finalise([slot])

    async def _cancel_all(self, stoppers: Iterable[asyncio.Task[None]]) -> None:
        """Cancel what still runs in the workers: stoppers, finalise, messages."""
        pending = list(stoppers)
        for slot in self._slots:
            self._drop_backlog(slot)
            pending.extend(slot.tasks)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _finalise(self, slots: Iterable[_Slot]) -> None:
        for slot in slots:
            try:
                await _call_hook(slot.worker.finalise)
            except Exception:
                worker_logger.exception("worker %d: finalise() raised", slot.number)

    def _finish(self) -> None:
        """The pool is stopped: nothing runs any more, results() may end."""
        self._state = _State.STOPPED
        for slot in self._slots:
            # put_result() after the stop raises, as on a worker no pool runs.
            with contextlib.suppress(AttributeError):
                del slot.worker._looppool_sink
            self._drop_backlog(slot)
        for item in list(self._unfinished.values()):
            # Only a cancelled stop leaves some: fail their submit().
            self._finish_item(item, lost=True)
        self._wake_all_room_waiters()
        if self._callback_task is not None and not self._callback_task.done():
            self._callback_task.cancel()
        self._delivered_changed.set()
        self._stopped.set()
        self._results_changed.set()

    # -- sending --------------------------------------------------------------

    async def put(self, message: Any, *, worker: int | None = None) -> None:
        """Send a message; wait while ``max_pending`` messages are pending.

        With ``pickle=True`` the message is pickled here, so one that cannot
        be pickled raises ``TypeError`` at once. ``worker=k`` sends it to
        worker ``k``; without it, messages are dealt in fair rounds.
        """
        self._check_target(worker)
        payload = self._encode_message(message)
        await self._wait_for_room()
        self._accept(payload, worker, None)

    def put_nowait(self, message: Any, *, worker: int | None = None) -> None:
        """Send a message, or raise :exc:`~looppool.QueueFull` if ``max_pending`` are pending."""
        self._check_target(worker)
        payload = self._encode_message(message)
        if len(self._unfinished) >= self._max_pending:
            raise QueueFull(
                f"{len(self._unfinished)} messages are pending in {self.name!r} (max_pending="
                f"{self._max_pending}); await put() to wait for room"
            )
        self._accept(payload, worker, None)

    async def broadcast(self, message: Any) -> None:
        """Send a message to every worker, each exactly once (outside the rounds)."""
        payload = self._encode_message(message)
        await self._wait_for_room()
        for number in range(self._size):
            self._accept(payload, number, None)

    async def submit(self, message: Any, *, worker: int | None = None) -> Any:
        """Send a message and return what ``process_message`` returned for it.

        If the handler raised, the same exception (a pickled copy, with
        ``pickle=True``) is raised here with the worker's traceback as its
        ``__cause__`` (:exc:`~looppool.RemoteTraceback`); one that cannot make
        the round trip becomes :exc:`~looppool.RemoteError`. A message that
        the stop dropped or cancelled raises :exc:`~looppool.PoolClosed`.
        """
        self._check_target(worker)
        payload = self._encode_message(message)
        await self._wait_for_room()
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._accept(payload, worker, reply)
        return await reply

    async def drain(self) -> None:
        """Return once every message put before the call is finished and its results are in.

        Finished: processed, failed or lost to the stop. Results are in when
        they are buffered for :meth:`results`, or when ``on_result`` has
        returned for them (awaited, if it is a coroutine function).
        """
        loop = asyncio.get_running_loop()
        waiting: list[asyncio.Future[None]] = []
        for item in self._unfinished.values():
            if item.done is None:
                item.done = loop.create_future()
            waiting.append(item.done)
        if waiting:
            await asyncio.wait(waiting)
        await self._wait_delivered(self._buffered)

    def _check_target(self, worker: int | None) -> None:
        if worker is None:
            return
        if not isinstance(worker, int) or isinstance(worker, bool):
            raise TypeError(f"worker must be an int or None, not {worker!r}")
        if not 0 <= worker < self._size:
            raise ValueError(
                f"worker={worker} is out of range: this pool has workers 0 to {self._size - 1}"
            )

    def _encode_message(self, message: Any) -> Any:
        if self._state is not _State.RUNNING:
            self._raise_closed()
        if not self._pickle:
            return message
        try:
            return pickle.dumps(message, _PROTOCOL)
        except Exception as exc:
            raise TypeError(
                f"the message {_short_repr(message)} cannot be pickled, so it cannot be "
                f"sent to a worker process: {type(exc).__name__}: {exc}"
            ) from exc

    def _raise_closed(self) -> None:
        if self._state is _State.NEW or self._state is _State.STARTING:
            raise PoolClosed(f"{self!r} is not started: use 'async with' or await start() first")
        raise PoolClosed(f"{self!r} takes no new messages")

    async def _wait_for_room(self) -> None:
        loop = asyncio.get_running_loop()
        while len(self._unfinished) >= self._max_pending:
            waiter: asyncio.Future[None] = loop.create_future()
            self._room_waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                # Woken, then cancelled before using the room: pass the
                # wake-up on, or another waiter would sleep with room free.
                if waiter.done() and not waiter.cancelled():
                    self._wake_room()
                raise
            if self._state is not _State.RUNNING:
                self._raise_closed()

    def _wake_room(self) -> None:
        while self._room_waiters:
            waiter = self._room_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _wake_all_room_waiters(self) -> None:
        while self._room_waiters:
            waiter = self._room_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _accept(self, payload: Any, target: int | None, reply: asyncio.Future[Any] | None) -> None:
        if target is None:
            # Fair rounds: message i of a round goes to worker i (no worker
            # of an InlinePool dies, so every round has all of them).
            target = self._next_in_round
            self._next_in_round = (target + 1) % self._size
        item = _Item(self._seq, payload, reply)
        self._seq += 1
        self._unfinished[item.seq] = item
        self._n_put += 1
        slot = self._slots[target]
        if len(slot.tasks) < self._concurrency:
            self._run(slot, item)
        else:
            slot.backlog.append(item)

    # -- the workers' side ------------------------------------------------------

    def _run(self, slot: _Slot, item: _Item) -> None:
        task = asyncio.get_running_loop().create_task(
            self._process(slot, item), name=f"{self.name}-worker-{slot.number}"
        )
        slot.tasks[task] = item
        task.add_done_callback(lambda t: self._after(slot, t))

    async def _process(self, slot: _Slot, item: _Item) -> None:
        reply: Any = None
        try:
            message = pickle.loads(item.payload) if self._pickle else item.payload
            reply = await _call_hook(slot.worker.process_message, message)
            if item.reply is not None and self._pickle:
                # Pool pickles the reply in the worker: one that cannot be
                # pickled fails the message there, with this error.
                try:
                    reply = pickle.dumps(reply, _PROTOCOL)
                except Exception as exc:
                    raise TypeError(
                        f"worker {slot.number}: the reply of process_message could not be "
                        f"pickled: {type(exc).__name__}: {exc}"
                    ) from exc
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                # Cancelled by the stop of a Worker pool: lost, not failed.
                self._finish_item(item, lost=True, reason="while the message was running")
                return
            # process_message let a CancelledError of its own escape.
            self._fail(slot, item, asyncio.CancelledError())
        except Exception as exc:
            self._fail(slot, item, exc)
        else:
            self._n_processed += 1
            if item.reply is not None and not item.reply.done():
                self._set_reply(item.reply, reply)
            self._finish_item(item)

    def _set_reply(self, future: asyncio.Future[Any], reply: Any) -> None:
        if not self._pickle:
            future.set_result(reply)
            return
        try:
            future.set_result(pickle.loads(reply))
        except Exception as exc:
            future.set_exception(
                RemoteError(
                    type(exc).__qualname__,
                    f"the reply could not be unpickled in the parent: {exc!r}",
                )
            )

    def _fail(self, slot: _Slot, item: _Item, exc: BaseException) -> None:
        self._n_failed += 1
        if item.reply is None:
            # Nobody awaits this message: the log is where it shows. (As in
            # Pool, a failure that submit() re-raises is not logged too.)
            # Worded and tagged as Pool forwards a worker's record to the parent.
            worker_logger.error(
                "[worker %d] worker %d: process_message raised %s",
                slot.number,
                slot.number,
                type(exc).__name__,
                exc_info=exc,
                extra={"worker": slot.number},
            )
        elif not item.reply.done():
            item.reply.set_exception(self._remote_exception(exc))
        self._finish_item(item)

    def _remote_exception(self, exc: BaseException) -> BaseException:
        """What Pool's submit() raises for ``exc``: a copy, with the traceback as cause."""
        tb = _format_exception(exc)
        copy: BaseException
        if self._pickle:
            try:
                copy = pickle.loads(pickle.dumps(exc, _PROTOCOL))
            except Exception:
                # An exception may pickle yet fail to unpickle (a custom __init__).
                name = f"{type(exc).__module__}.{type(exc).__qualname__}"
                copy = RemoteError(name, repr(exc), tb)
        else:
            copy = exc  # keeps its worker-side frames, for a debugger
        copy.__cause__ = RemoteTraceback(tb)
        return copy

    def _after(self, slot: _Slot, task: asyncio.Task[None]) -> None:
        item = slot.tasks.pop(task)
        # A no-op when _process finished the item; otherwise the task was
        # cancelled before its first step (process_message never ran), or a
        # BaseException such as SystemExit escaped.
        self._finish_item(item, lost=task.cancelled())
        if slot.backlog and self._state is not _State.STOPPED:
            self._run(slot, slot.backlog.popleft())
        elif not slot.tasks:
            slot.idle.set()

    def _drop_backlog(self, slot: _Slot) -> None:
        while slot.backlog:
            self._finish_item(slot.backlog.popleft(), lost=True)

    def _finish_item(
        self, item: _Item, *, lost: bool = False, reason: str = "before the message was processed"
    ) -> None:
        if self._unfinished.pop(item.seq, None) is None:
            return  # finished already
        if lost:
            self._n_lost += 1
            if item.reply is not None and not item.reply.done():
                item.reply.set_exception(PoolClosed(f"the pool stopped {reason}"))
        if item.done is not None and not item.done.done():
            item.done.set_result(None)
        self._wake_room()

    # -- results ----------------------------------------------------------------

    def _make_sink(self) -> Callable[[Any], None]:
        def put_result(value: Any) -> None:
            if not self._pickle:
                self._deliver(value)
                return
            # Pickled in the caller, as in a worker process: a result that
            # cannot be pickled raises inside process_message.
            payload = pickle.dumps(value, _PROTOCOL)
            if self._discard_results:
                return
            self._n_results += 1
            try:
                value = pickle.loads(payload)
            except Exception:
                logger.exception(
                    "pool %s: a result could not be unpickled in the parent", self.name
                )
                return
            self._deliver(value, counted=True)

        return put_result

    def _deliver(self, value: Any, *, counted: bool = False) -> None:
        if self._discard_results:
            return
        if not counted:
            self._n_results += 1
        callback = self._on_result
        if callback is None or self._on_result_async:
            self._results.append(value)
            if callback is not None:
                self._buffered += 1
            self._results_changed.set()
            return
        try:
            callback(value)
        except Exception:
            logger.exception("pool %s: on_result raised", self.name)

    async def _next_result(self) -> tuple[bool, Any]:
        """Wait for the next buffered result; ``(False, None)`` once the pool stopped."""
        while not self._results:
            if self._state is _State.STOPPED:
                return False, None
            self._results_changed.clear()
            await self._results_changed.wait()
        return True, self._results.popleft()

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
            self._delivered_changed.set()

    async def _wait_delivered(self, count: int) -> None:
        """Wait until an async ``on_result`` has finished ``count`` results."""
        while self._delivered < count and self._state is not _State.STOPPED:
            self._delivered_changed.clear()
            await self._delivered_changed.wait()


# -- the pytest plugin ------------------------------------------------------------
#
# The hooks and helpers below use the name `pytest` only when pytest calls
# them; the fixtures need pytest to be defined, so they are made at the end of
# the module, only when pytest is installed (InlinePool does not need it).


class PoolFactory(Protocol):
    """The type of the ``looppool_factory`` fixture, for annotations."""

    def __call__(
        self,
        worker: type[Worker] | Callable[[], Worker],
        /,
        size: int | None = None,
        **options: Any,
    ) -> Awaitable[Pool]:
        """Make and start a ``looppool.Pool``; the fixture stops it at teardown."""
        ...


class InlinePoolFactory(Protocol):
    """The type of the ``inline_pool_factory`` fixture, for annotations."""

    def __call__(
        self, worker: type[Worker] | Callable[[], Worker], /, size: int | None = 1, **options: Any
    ) -> Awaitable[InlinePool]:
        """Make and start an :class:`InlinePool`; the fixture stops it at teardown."""
        ...


# (dest and ini name, command-line flag, help)
_OPTIONS: Final = (
    (
        "looppool_loop",
        "--looppool-loop",
        f"default event loop of looppool_factory's pools: {', '.join(LOOP_KINDS)}",
    ),
    (
        "looppool_start_method",
        "--looppool-start-method",
        f"default start method of looppool_factory's pools: {', '.join(START_METHODS)}",
    ),
    (
        "looppool_stop_timeout",
        "--looppool-stop-timeout",
        "seconds the fixtures' teardown stop() waits before it kills the workers "
        "(default: no limit)",
    ),
)


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add the ``looppool`` option group and its ini equivalents."""
    group = parser.getgroup("looppool", "looppool worker pools (looppool_factory fixture)")
    for dest, flag, text in _OPTIONS:
        group.addoption(flag, dest=dest, default=None, metavar="VALUE", help=text)
        parser.addini(dest, help=f"default for {flag}", type="string", default=None)


@dataclass(frozen=True)
class _Settings:
    """The plugin's options, read and checked once per session."""

    loop: str | None
    start_method: str | None
    stop_timeout: float | None

    def pool_defaults(self) -> dict[str, Any]:
        """The keywords looppool_factory passes to Pool unless the test gives them."""
        defaults: dict[str, Any] = {}
        if self.loop is not None:
            defaults["loop"] = self.loop
        if self.start_method is not None:
            defaults["start_method"] = self.start_method
        return defaults


def _option(config: pytest.Config, dest: str) -> str | None:
    # The command line wins over the ini file, as in pytest-asyncio.
    value = config.getoption(dest)
    if value is None:
        value = config.getini(dest)
    return str(value) if value else None


def _read_settings(config: pytest.Config) -> _Settings:
    loop = _option(config, "looppool_loop")
    if loop is not None and loop not in LOOP_KINDS:
        raise pytest.UsageError(
            f"{loop!r} is not a valid looppool_loop. Valid kinds: {', '.join(LOOP_KINDS)}."
        )
    start_method = _option(config, "looppool_start_method")
    if start_method is not None and start_method not in START_METHODS:
        raise pytest.UsageError(
            f"{start_method!r} is not a valid looppool_start_method. "
            f"Valid methods: {', '.join(START_METHODS)}."
        )
    text = _option(config, "looppool_stop_timeout")
    stop_timeout = None
    if text is not None:
        try:
            stop_timeout = float(text)
        except ValueError:
            stop_timeout = float("nan")
        if not stop_timeout > 0:  # also false for nan
            raise pytest.UsageError(
                f"{text!r} is not a valid looppool_stop_timeout: give a positive number of seconds."
            )
    return _Settings(loop, start_method, stop_timeout)


def pytest_configure(config: pytest.Config) -> None:
    """Check the options at start-up, so that a typo is a usage error, not failing tests."""
    config.stash[_SETTINGS] = _read_settings(config)


def pytest_report_header(config: pytest.Config) -> str:
    """Show the defaults in effect in the header of a run."""
    settings = config.stash[_SETTINGS]
    timeout = "none" if settings.stop_timeout is None else f"{settings.stop_timeout:g}s"
    return (
        f"looppool: loop={settings.loop or 'auto'}, "
        f"start_method={settings.start_method or 'platform default'}, stop_timeout={timeout}"
    )


def _check_same_loop(fixture_loop: asyncio.AbstractEventLoop, what: str) -> None:
    # The teardown stops the pools on the fixture's loop: a pool started on
    # the test's other loop could not be stopped there. Refuse before starting.
    if asyncio.get_running_loop() is not fixture_loop:
        pytest.fail(
            f"{what} runs on another event loop than this test: the test and the "
            "fixture must share a loop scope (give the test the default "
            "loop_scope='function', or set asyncio_default_fixture_loop_scope to the "
            "test's loop scope)",
            pytrace=False,
        )


def _processes(pids: Iterable[int | None]) -> list[psutil.Process]:
    import psutil

    found = []
    for pid in pids:
        if pid is None:
            continue
        with contextlib.suppress(psutil.NoSuchProcess):
            # A Process remembers its creation time: is_running() later cannot
            # mistake a new process that reused the pid for this one.
            found.append(psutil.Process(pid))
    return found


def _survivors(processes: Iterable[psutil.Process]) -> list[psutil.Process]:
    import psutil

    alive = []
    for process in processes:
        try:
            # A zombie has exited; only its parent has yet to reap it.
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def _kill(processes: Iterable[psutil.Process]) -> None:
    import psutil

    processes = list(processes)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(processes, timeout=5)


async def _looppool_factory(request: pytest.FixtureRequest) -> AsyncIterator[PoolFactory]:
    """Make started ``looppool.Pool`` objects; stop them and check for survivors at teardown.

    ``pool = await looppool_factory(MyWorker, size=2, **pool_options)``. The
    ``looppool_loop`` and ``looppool_start_method`` options are defaults for
    ``loop=`` and ``start_method=``. At teardown every pool is stopped (with
    ``looppool_stop_timeout``), and the test fails, naming the pids, if a
    worker process is still alive after its pool's ``stop()`` returned.
    """
    settings = request.config.stash[_SETTINGS]
    loop = asyncio.get_running_loop()
    made: list[tuple[Pool, list[psutil.Process]]] = []

    async def factory(
        worker: type[Worker] | Callable[[], Worker], /, size: int | None = None, **options: Any
    ) -> Pool:
        _check_same_loop(loop, "looppool_factory")
        for key, value in settings.pool_defaults().items():
            options.setdefault(key, value)
        pool = Pool(worker, size, **options)
        await pool.start()
        made.append((pool, _processes(pool.pids)))
        return pool

    yield factory

    problems: list[str] = []
    for pool, processes in reversed(made):
        # Replacements of workers that died during the test are in pids now.
        known = {p.pid for p in processes}
        processes += _processes(pid for pid in pool.pids if pid not in known)
        try:
            await pool.stop(timeout=settings.stop_timeout)
        except Exception as exc:
            problems.append(f"stopping {pool!r} raised {exc!r}")
        # A process started during the stop (a respawn racing it) shows only now.
        known = {p.pid for p in processes}
        processes += _processes(pid for pid in pool.pids if pid not in known)
        survivors = _survivors(processes)
        if survivors:
            pids = ", ".join(str(p.pid) for p in survivors)
            problems.append(f"worker processes outlived {pool!r}: pids {pids}")
            _kill(survivors)  # or they would outlive the test session too
    if problems:
        pytest.fail("looppool_factory teardown: " + "; ".join(problems), pytrace=False)


async def _inline_pool_factory(
    request: pytest.FixtureRequest,
) -> AsyncIterator[InlinePoolFactory]:
    """Make started :class:`InlinePool` objects; stop them at teardown.

    ``pool = await inline_pool_factory(MyWorker, size=2, **pool_options)``;
    process options (``loop=``, ``start_method=``...) are accepted and
    ignored. Teardown stops every pool with ``looppool_stop_timeout``.
    """
    settings = request.config.stash[_SETTINGS]
    loop = asyncio.get_running_loop()
    made: list[InlinePool] = []

    async def factory(
        worker: type[Worker] | Callable[[], Worker], /, size: int | None = 1, **options: Any
    ) -> InlinePool:
        _check_same_loop(loop, "inline_pool_factory")
        pool = InlinePool(worker, size, **options)
        await pool.start()
        made.append(pool)
        return pool

    yield factory

    for pool in reversed(made):
        await pool.stop(timeout=settings.stop_timeout)


try:
    import pytest
except ImportError:  # InlinePool needs no pytest; the fixtures do.
    pass
else:
    _SETTINGS: Final = pytest.StashKey[_Settings]()

    try:
        from pytest_asyncio import fixture as _async_fixture
    except ImportError:
        # Without pytest-asyncio, plain async fixtures: another async plugin
        # (anyio's) may run them, or pytest says clearly that none does.
        _async_fixture = pytest.fixture  # type: ignore[assignment]

    looppool_factory = _async_fixture(_looppool_factory, name="looppool_factory")
    inline_pool_factory = _async_fixture(_inline_pool_factory, name="inline_pool_factory")
