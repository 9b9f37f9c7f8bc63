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
import contextlib
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Final

from . import _protocol as P
from ._pipes import SharedItem, SharedReader
from ._runner import Heartbeat, MessageRunner
from ._worker import Worker

EXIT_ORPHANED: Final = 70  # the parent died; the worker ended itself
# Barrier mode: the channel items a shared message's ``needs`` counts.
_COUNTED: Final = frozenset({P.OP_MSG, P.OP_SKIP})


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
    # barrier mode: (id, want_reply, payload, needs) items; see _Runtime._on_shared
    shared_queue: SharedReader | None = None
    barrier: Any = None  # barrier mode: multiprocessing.Barrier
    monitor: dict[str, Any] | None = None  # WorkerMonitor options, or None
    # The heartbeat, once ready: EV_ALIVE every ``beat`` seconds when nothing
    # else was sent (always, with the RSS, if ``report_rss``); with
    # ``hang_timeout``, a watcher thread reports where a stuck loop is.
    beat: float | None = None
    hang_timeout: float | None = None
    report_rss: bool = False


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


#: Bytes a worker may have waiting for its result pipe (the parent reads it
#: slowly, or not at all while its results() consumer lags) before it starts
#: no more messages and ``put_result_wait()`` waits: memory stays bounded.
OUTBOX_LIMIT: Final = 4 << 20
# Bound once: Outbox.add tests them for every result and ack.
_EV_RESULT: Final = P.EV_RESULT
_EV_DONE: Final = P.EV_DONE
_DONE_OK: Final = P.DONE_OK


def _unfolded(items: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """``items`` with each EV_RESULTS item unfolded into its EV_RESULTs."""
    out: list[tuple[Any, ...]] = []
    for item in items:
        if item[0] == P.EV_RESULTS:
            out += [(P.EV_RESULT, payload) for payload in item[1]]
        else:
            out.append(item)
    return out


class Outbox:
    """Collects what the worker sends and writes it as one frame per loop turn.

    Items come from the loop thread (results, acks) and from any thread
    (log records). The first item of a batch schedules one flush on the loop;
    until the loop is attached, or after it is gone, items are written at once.

    While the loop runs, the pipe is written without blocking: what the pipe
    does not take waits in ``_unsent`` and goes out when the loop sees the
    pipe writable, so a parent that reads slowly never blocks the worker's
    loop (its handlers, timers and heartbeat go on). Above ``OUTBOX_LIMIT``
    bytes waiting, ``over`` is true until half of it has gone: the runtime
    then stops reading new messages, and ``wait_room()`` waits.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        # One lock guards the batch, the unsent bytes and the write: with two
        # flushers (the loop, and a thread logging after the loop closed, or
        # the hang watcher) a batch taken first must also be written first,
        # or events would arrive reordered.
        self._lock = threading.Lock()
        self._items: list[tuple[Any, ...]] = []
        # The run of results and of plain acks (DONE_OK, no reply) added
        # since the last other item, folded into one EV_RESULTS and one
        # EV_ACKS item (see _close_runs).
        self._results: list[bytes] = []
        self._acks: list[int] = []
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._unsent = P.Unsent()
        self._watching = False  # add_writer is on
        self.over = False
        #: Called on the loop when ``over`` turns false again.
        self.on_room: Callable[[], None] | None = None
        self._room_waiters: list[asyncio.Future[None]] = []
        #: When a frame was last written (time.monotonic()): the heartbeat skips a beat after one.
        self.last_write = 0.0

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()
        os.set_blocking(self._fd, False)

    def detach(self) -> None:
        """The loop is ending: write everything now, blocking."""
        with self._lock:
            loop, self._loop = self._loop, None
            if self._watching and loop is not None and not loop.is_closed():
                loop.remove_writer(self._fd)
            self._watching = False
            with contextlib.suppress(OSError):
                os.set_blocking(self._fd, True)
                while self._unsent:
                    self._unsent.write(self._fd)
            self._unsent = P.Unsent()
        self.flush()

    def add(self, item: tuple[Any, ...]) -> None:
        with self._lock:
            op = item[0]
            if op == _EV_RESULT:
                self._results.append(item[1])
            elif op == _EV_DONE and item[2] == _DONE_OK and item[3] is None:
                self._acks.append(item[1])
            else:
                self._close_runs()
                self._items.append(item)
            if self._scheduled:
                return
            self._scheduled = True
            loop = self._loop
        self._schedule(loop)

    # The two per-message events, without a tuple to build and take apart:
    # add((EV_RESULT, payload)) and add((EV_DONE, mid, DONE_OK, None)).

    def add_result(self, payload: Any) -> None:
        with self._lock:
            self._results.append(payload)
            if self._scheduled:
                return
            self._scheduled = True
            loop = self._loop
        self._schedule(loop)

    def add_ack(self, mid: int) -> None:
        with self._lock:
            self._acks.append(mid)
            if self._scheduled:
                return
            self._scheduled = True
            loop = self._loop
        self._schedule(loop)

    def _schedule(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Flush once this loop turn ends (called by the first add since the last flush)."""
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

    def _close_runs(self) -> None:
        """Append the runs of results and acks to the batch (called with the lock held).

        Results go before acks: within a run, each message's results were
        added before its ack, and moving an ack after later results keeps
        that (the parent needs a message's results before its ack, never the
        reverse). Every other item closes the runs first, so that nothing
        else is reordered: a log record, EV_BYE or a failure's EV_DONE still
        follows the acks added before it.
        """
        if self._results:
            self._items.append((P.EV_RESULTS, self._results))
            self._results = []
        if self._acks:
            self._items.append((P.EV_ACKS, self._acks))
            self._acks = []

    def flush(self) -> None:
        with self._lock:
            self._scheduled = False
            self._close_runs()
            items, self._items = self._items, []
            if items:
                frame = P.encode(items)
                if type(frame) is list:
                    # Large payloads: a frame per result or reply, so that the
                    # parent takes each as soon as it has read it.
                    frame = P.encode_each(_unfolded(items))
                self._write(frame)

    def send_now(self, item: tuple[Any, ...]) -> None:
        """Write one item at once, from any thread (the hang watcher: the loop may be stuck)."""
        with self._lock:
            self._write(P.encode([item]))

    def _write(self, data: P.Frame) -> None:
        # Called with the lock held.
        self.last_write = time.monotonic()
        loop = self._loop
        try:
            if loop is None:
                P.write_frame_all(self._fd, data)
                return
            if self._unsent:
                self._unsent.add(data)  # behind what waits: order matters
            else:
                written = P.write_frame(self._fd, data)
                if type(data) is bytes and written == len(data):
                    return
                # Out-of-band buffers wait as views of the payload, not copies.
                self._unsent.add(data, written)
                if not self._unsent:
                    return
        except OSError:
            # EPIPE: the parent is gone (the parent watcher ends this
            # process); nothing can be sent any more.
            self._unsent = P.Unsent()
            return
        if self._unsent.nbytes > OUTBOX_LIMIT:
            self.over = True
        if not self._watching:
            self._watching = True
            if threading.get_ident() == self._loop_thread:
                loop.add_writer(self._fd, self._on_writable)
            else:
                with contextlib.suppress(RuntimeError):  # the loop is closing
                    loop.call_soon_threadsafe(loop.add_writer, self._fd, self._on_writable)

    def _on_writable(self) -> None:
        with self._lock:
            try:
                self._unsent.write(self._fd)
            except BlockingIOError:
                return
            except OSError:
                self._unsent.clear()  # the parent is gone: drop it
            if not self._unsent:
                assert self._loop is not None
                self._loop.remove_writer(self._fd)
                self._watching = False
            room = self.over and self._unsent.nbytes <= OUTBOX_LIMIT // 2
            if room:
                self.over = False
        if room:
            waiters, self._room_waiters = self._room_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
            if self.on_room is not None:
                self.on_room()

    async def wait_room(self) -> None:
        """Wait (on the loop) until less than ``OUTBOX_LIMIT`` bytes wait for the pipe."""
        while self.over and self._loop is not None:
            fut = self._loop.create_future()
            self._room_waiters.append(fut)
            await fut


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
            cfg.factory,
            cfg.number,
            outbox.add,
            release,
            emit_result=outbox.add_result,
            emit_ack=outbox.add_ack,
            wait_room=outbox.wait_room,
            pool_name=cfg.pool_name,
            eager=True,
        )
        self.loop: asyncio.AbstractEventLoop
        self.stop_requested: asyncio.Future[bool]
        # Barrier mode: the listener takes a message only when a slot is free.
        self.slots = threading.Semaphore(cfg.concurrency)
        self.shared_ids: set[int] = set()
        # Barrier mode: messages read from the channel so far, and shared
        # messages waiting for channel messages put before them.
        self.channel_received = 0
        self.waiting_shared: list[tuple[int, tuple[Any, ...]]] = []  # (need, OP_MSG item)
        self.decoder = P.FrameDecoder()
        # Back-pressure: the channel is read (and the shared queue taken from)
        # only while the outbox has room; see Outbox.over.
        self.reading = False
        self.flowing = threading.Event()
        self.flowing.set()
        outbox.on_room = self._resume_reading

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
        heartbeat = None
        if self.cfg.beat is not None:
            heartbeat = Heartbeat(
                loop,
                self.out.add,
                self.out.send_now,
                lambda: self.out.last_write,
                self.cfg.beat,
                self.cfg.hang_timeout,
                self.cfg.report_rss,
            )
            heartbeat.start()
        self._start_listeners()
        cancel = await self.stop_requested
        await self.runner.finish_in_flight(cancel)
        if monitor is not None:
            await monitor.aclose()
        await self.runner.finalise()
        # The heartbeat goes on through finalise(): a slow one (closing
        # clients, flushing) is not a hang; one that blocks the loop is.
        if heartbeat is not None:
            heartbeat.close()
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
        self.reading = True
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
            self._stop_reading()
            self._on_items([(P.OP_STOP, True)])
            return
        for items in frames:
            if self.cfg.shared_queue is not None:
                self.channel_received += sum(item[0] in _COUNTED for item in items)
            self._on_items(items)
            if self.waiting_shared:
                self._start_waiting_shared()
            if items[-1][0] == P.OP_STOP:
                self._stop_reading()
                return
        if self.out.over:
            # The parent does not read our results as fast as we make them:
            # start nothing new (the messages wait in the pipe, then in the
            # parent, whose max_pending holds the producer back) until the
            # outbox has room again.
            self._stop_reading()
            self.flowing.clear()

    def _stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.cfg.channel.fileno())

    def _resume_reading(self) -> None:
        self.flowing.set()
        if not self.reading and not self.stop_requested.done():
            self.reading = True
            fd = self.cfg.channel.fileno()
            self.loop.add_reader(fd, self._on_channel_readable, fd)

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
            self.flowing.wait()  # back-pressure, as for the channel
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

    def _on_shared(self, item: SharedItem) -> None:
        """Start a message from the shared queue, once what was put before it has arrived.

        A message put to this worker (``worker=k``, broadcast) travels on its
        channel, a shared one on the shared queue, and nothing orders the
        two: ``needs[k]`` is how many channel messages the parent had sent or
        queued for worker k when it put this one, and it starts only after
        this worker has read as many. (The seed's "put a state to each worker,
        then shared work" pattern relies on that order.)
        """
        mid, want_reply, payload, needs, timeout, trace = item
        # Only messages from the shared queue took a slot of the semaphore:
        # directed ones, sent by the parent within its own window, did not.
        self.shared_ids.add(mid)
        need = needs[self.cfg.number]
        if need > self.channel_received:
            self.waiting_shared.append((need, (P.OP_MSG, mid, want_reply, payload, timeout, trace)))
            return
        self._on_items([(P.OP_MSG, mid, want_reply, payload, timeout, trace)])

    def _start_waiting_shared(self) -> None:
        waiting, self.waiting_shared = self.waiting_shared, []
        for need, msg in waiting:
            if need > self.channel_received:
                self.waiting_shared.append((need, msg))
            else:
                self._on_items([msg])

    def _release_slot(self, mid: int) -> None:
        if mid in self.shared_ids:
            self.shared_ids.discard(mid)
            self.slots.release()

    def _on_items(self, items: list[tuple[Any, ...]]) -> None:
        runner = self.runner
        for item in items:
            op = item[0]
            if op == P.OP_MSG:
                if self.stop_requested.done():
                    # Barrier mode: the shared listener took it after the stop
                    # began. Do not start it; the parent sends it again or
                    # counts it lost.
                    runner.refuse(item[1])
                else:
                    runner.start(item[1], item[2], item[3], item[4], item[5])
            elif op == P.OP_CANCEL:
                runner.cancel(item[1])
            elif op == P.OP_SKIP:
                pass  # counted in channel_received; nothing to run
            elif not self.stop_requested.done():
                self.stop_requested.set_result(bool(item[1]))
                # Barrier mode: a shared message still waiting for channel
                # messages will not get them (a stopping worker is sent
                # nothing more): it is not started, and the parent sends it
                # again or counts it lost.
                waiting, self.waiting_shared = self.waiting_shared, []
                for _, waiting_msg in waiting:
                    runner.refuse(waiting_msg[1])
