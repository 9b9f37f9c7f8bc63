"""What runs inside a worker process.

::

    main thread: the worker's event loop            other threads
    ─────────────────────────────────────           ──────────────────────────────
    factory() → initialise() → EV_READY             barrier mode only: the shared
    channel readable (add_reader) → frames          listener blocks taking one
    _on_items(items) ◄── call_soon_threadsafe ◄──── message from the shared queue,
      process_message(msg) (task, or inline           hands it over, then waits at
      for a plain def)                                the Barrier
      put_result(v) ─┐
      done / reply ──┼──► Outbox ──► result pipe ──► parent
      log records ───┘  (one frame per loop turn)
    STOP → finish or cancel → finalise() → EV_BYE    parent watcher thread: pidfd →
                                                      os._exit when the parent dies

The channel from the parent is read by the loop itself: the first design's
task-listener thread (docs/design.md) cost a thread hand-over per frame
(10-25 µs of latency per round trip, measured), and a pipe that only this
process reads needs no thread blocking on it. A thread remains where
something must block: the barrier, and the shared queue whose lock the
readers take in turn.

The module stays light: a spawned worker imports it and the user's module only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Final

from . import _protocol as P
from ._pipes import SharedReader
from ._runner import MessageRunner
from ._worker import Worker

EXIT_ORPHANED: Final = 70  # the parent died; the worker ended itself


@dataclass(frozen=True)
class ChildConfig:
    """Everything a worker process needs; pickled for spawn and forkserver."""

    factory: Callable[[], Worker]
    number: int
    pool_name: str
    parent_pid: int
    channel: Connection  # parent -> worker frames (read end)
    results: Connection  # worker -> parent frames (write end)
    loop: str  # "asyncio" | "uvloop"
    log_level: int
    forked: bool
    concurrency: int
    shared_queue: SharedReader | None = None  # barrier mode: (id, want_reply, payload) items
    barrier: Any = None  # barrier mode: multiprocessing.Barrier
    monitor: dict[str, Any] | None = None  # WorkerMonitor options, or None


def worker_main(cfg: ChildConfig) -> None:
    """The target of each worker process."""
    _reset_inherited_state(cfg)
    outbox = Outbox(cfg.results.fileno())
    _forward_logging(outbox, cfg.log_level)
    _watch_parent(cfg.parent_pid)
    _set_title(cfg)
    runtime = _Runtime(cfg, outbox)
    try:
        with asyncio.Runner(loop_factory=_loop_factory(cfg.loop)) as runner:
            runner.run(runtime.main())
    finally:
        # Whatever ended the loop, what is logged from now on is written at once.
        outbox.detach()


def _loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if kind == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop


def _reset_inherited_state(cfg: ChildConfig) -> None:
    # The parent decides when workers stop: SIGINT from a terminal and SIGTERM
    # sent to the process group reach every worker too, and would cut
    # message-based shutdown short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if cfg.forked:
        # A forked child inherits the parent's signal wake-up fd (the parent
        # loop's self-pipe) and, on Python 3.11, its running-loop state; both
        # would make the worker's own loop misbehave.
        signal.set_wakeup_fd(-1)
        asyncio.events._set_running_loop(None)
        asyncio.set_event_loop(None)


def _set_title(cfg: ChildConfig) -> None:
    try:
        from setproctitle import setproctitle
    except ImportError:
        return
    setproctitle(f"looppool: {cfg.pool_name} worker {cfg.number}")


def _watch_parent(parent_pid: int) -> None:
    """End this process as soon as the pool's process dies: no orphans.

    Under fork, siblings inherit each other's pipe ends, so end-of-file on a
    pipe cannot tell us the parent is gone; a pidfd can. Under forkserver our
    OS parent is the fork server, hence the pool's pid is passed explicitly.
    """
    try:
        pidfd = os.pidfd_open(parent_pid)
    except ProcessLookupError:
        os._exit(EXIT_ORPHANED)
    except (AttributeError, OSError):
        # No pidfd (not Linux >= 5.3): multiprocessing's parent sentinel
        # works for spawn and forkserver.
        import multiprocessing

        parent = multiprocessing.parent_process()
        if parent is None or parent.sentinel is None:
            return
        pidfd = parent.sentinel

    def watch() -> None:
        select.select([pidfd], [], [])
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="looppool-parent-watcher", daemon=True).start()


class Outbox:
    """Collects what the worker sends and writes it as one frame per loop turn.

    Items come from the loop thread (results, acks) and from any thread
    (log records). The first item of a batch schedules one flush on the loop;
    until the loop is attached, or after it is gone, items are written at once.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        # One lock guards both the batch and the write: with two flushers
        # (the loop, and a thread logging after the loop closed) a batch taken
        # first must also be written first, or events would arrive reordered.
        self._lock = threading.Lock()
        self._items: list[tuple[Any, ...]] = []
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def detach(self) -> None:
        self._loop = None
        self.flush()

    def add(self, item: tuple[Any, ...]) -> None:
        with self._lock:
            self._items.append(item)
            if self._scheduled:
                return
            self._scheduled = True
            loop = self._loop
        if loop is None:
            self.flush()
        elif threading.get_ident() == self._loop_thread:
            try:
                loop.call_soon(self.flush)
            except RuntimeError:  # the loop is closed (SystemExit tore it down): write now
                self.flush()
        else:
            try:
                loop.call_soon_threadsafe(self.flush)
            except RuntimeError:  # the loop closed between the check and the call
                self.flush()

    def flush(self) -> None:
        with self._lock:
            self._scheduled = False
            items, self._items = self._items, []
            if items:
                P.write_all(self._fd, P.encode(items))


class _ForwardHandler(logging.Handler):
    """Sends every log record of the worker to the parent's logging."""

    def __init__(self, outbox: Outbox) -> None:
        super().__init__()
        self._outbox = outbox

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = dict(record.__dict__)
            # Render here: args and exc_info may not be picklable.
            data["msg"] = record.getMessage()
            data["args"] = None
            if record.exc_info:
                data["exc_text"] = logging.Formatter().formatException(record.exc_info)
            data["exc_info"] = None
            for key, value in list(data.items()):
                if not isinstance(value, (str, int, float, bool, type(None))):
                    data[key] = repr(value)
            self._outbox.add((P.EV_LOG, data))
        except Exception:
            self.handleError(record)


def _forward_logging(outbox: Outbox, level: int) -> None:
    # Under fork the child inherits the parent's handlers: they would write
    # the parent's files from every worker and duplicate what is forwarded.
    manager = logging.Logger.manager
    for existing in [logging.getLogger(), *manager.loggerDict.values()]:
        if isinstance(existing, logging.Logger):
            for handler in existing.handlers[:]:
                existing.removeHandler(handler)
    root = logging.getLogger()
    root.addHandler(_ForwardHandler(outbox))
    root.setLevel(level)


class _Runtime:
    """Runs one worker object on the process's event loop."""

    def __init__(self, cfg: ChildConfig, outbox: Outbox) -> None:
        self.cfg = cfg
        self.out = outbox
        # Only barrier mode counts slots of the shared listener; rounds mode
        # skips the call for every message.
        release = self._release_slot if cfg.shared_queue is not None else None
        self.runner = MessageRunner(
            cfg.factory, cfg.number, outbox.add, release, pool_name=cfg.pool_name
        )
        self.loop: asyncio.AbstractEventLoop
        self.stop_requested: asyncio.Future[bool]
        # Barrier mode: the listener takes a message only when a slot is free.
        self.slots = threading.Semaphore(cfg.concurrency)
        self.shared_ids: set[int] = set()
        self.decoder = P.FrameDecoder()

    async def main(self) -> None:
        self.loop = loop = asyncio.get_running_loop()
        self.stop_requested = loop.create_future()
        self.out.attach(loop)
        worker = await self.runner.initialise()
        if worker is None:
            self.out.detach()
            if self.runner.start_exit is not None:
                # sys.exit(n) in initialise(): the process exits with n, as asked.
                raise SystemExit(self.runner.start_exit.code)
            return
        monitor = self._start_monitor()
        self.out.add((P.EV_READY, os.getpid(), worker.safe))
        self._start_listeners()
        cancel = await self.stop_requested
        await self.runner.finish_in_flight(cancel)
        if monitor is not None:
            await monitor.aclose()
        await self.runner.finalise()
        self.out.add((P.EV_BYE,))
        self.out.detach()

    def _start_monitor(self) -> Any:
        options = self.cfg.monitor
        if not options:
            return None
        from ._monitor import WorkerMonitor

        monitor = WorkerMonitor(
            loop=self.loop,
            number=self.cfg.number,
            pool_name=self.cfg.pool_name,
            counters=self.runner.counters,
            on_blocked=self._on_blocked,
            on_metrics=self._on_metrics,
            **options,
        )
        monitor.start()
        return monitor

    def _on_blocked(self) -> None:
        self.out.add((P.EV_BLOCKED,))  # thread-safe: called from the watchdog thread

    def _on_metrics(self, gauges: dict[str, float]) -> None:
        self.out.add((P.EV_METRICS, gauges))

    # -- receiving ---------------------------------------------------------

    def _start_listeners(self) -> None:
        # The channel is read by the loop itself (add_reader), not by a
        # listener thread: a thread's hand-over (call_soon_threadsafe, the
        # self-pipe wake-up, the GIL passing back) cost 10-25 µs per round
        # trip, and a pipe this process alone reads needs no blocking reader.
        fd = self.cfg.channel.fileno()
        os.set_blocking(fd, False)  # our own file description: the parent closed its copy
        self.loop.add_reader(fd, self._on_channel_readable, fd)
        if self.cfg.shared_queue is not None:
            threading.Thread(
                target=self._listen_shared, name="looppool-barrier-listener", daemon=True
            ).start()

    def _hand_over(self, callback: Callable[..., None], *args: Any) -> bool:
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: the worker is exiting
            return False
        return True

    def _on_channel_readable(self, fd: int) -> None:
        """Run what the parent sent: one or more frames, each a batch of messages."""
        frames = self.decoder.read(fd)
        if frames is None:
            # The parent closed the channel without a STOP: it is gone or
            # giving up on us. Stop like a Worker.
            self.loop.remove_reader(fd)
            self._on_items([(P.OP_STOP, True)])
            return
        for items in frames:
            self._on_items(items)
            if items[-1][0] == P.OP_STOP:
                self.loop.remove_reader(fd)
                return

    def _listen_shared(self) -> None:
        """Barrier mode: take one message, hand it over, *then* meet the others.

        Handing over first matters: waiting at the barrier while holding a
        message would make a lone message wait for n - 1 others.
        """
        queue = self.cfg.shared_queue
        assert queue is not None
        barrier = self.cfg.barrier
        while True:
            self.slots.acquire()
            try:
                item = queue.get()
            except (EOFError, OSError):
                # The parent ended this generation and closed the queue (or
                # died): the channel's STOP, or the parent watcher, ends us.
                return
            # TAKEN is queued before the message runs, so the parent learns who
            # held it even if the message kills this process at once.
            self.out.add((P.EV_TAKEN, item[0]))
            if not self._hand_over(self._on_shared, item):
                return
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                return

    def _on_shared(self, item: tuple[int, bool, bytes, Any]) -> None:
        # Only messages from the shared queue took a slot of the semaphore:
        # directed ones, sent by the parent within its own window, did not.
        self.shared_ids.add(item[0])
        self._on_items([(P.OP_MSG, *item)])

    def _release_slot(self, mid: int) -> None:
        if mid in self.shared_ids:
            self.shared_ids.discard(mid)
            self.slots.release()

    def _on_items(self, items: list[tuple[Any, ...]]) -> None:
        runner = self.runner
        for item in items:
            if item[0] == P.OP_MSG:
                if self.stop_requested.done():
                    # Barrier mode: the shared listener took it after the stop
                    # began. Do not start it; the parent sends it again or
                    # counts it lost.
                    runner.refuse(item[1])
                else:
                    runner.start(item[1], item[2], item[3], item[4])  # [4]: the trace
            elif not self.stop_requested.done():
                self.stop_requested.set_result(bool(item[1]))
