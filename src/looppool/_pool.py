"""The parent side: :class:`Pool`, whose workers are processes.

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

The ledger (rounds, windows, drain, results, rescue) is in ``_core``; this
module starts processes, moves frames through their pipes and learns of their
deaths. Everything runs on one event loop, so nothing needs a lock; the only
blocking calls are ``Process.start()`` and reaping a process that has already
exited.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import multiprocessing
import os
import pickle
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Literal

from . import _protocol as P
from ._barrier import BarrierDistribution
from ._child import ChildConfig, worker_main
from ._core import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_RESULTS,
    Farewell,
    PoolCore,
    PoolStats,
    ResultCallback,
    WorkerSlot,
    logger,
)
from ._errors import WorkerLost, describe_exit
from ._ledger import Msg, SlotState
from ._monitor import monitor_options
from ._pipes import PipeWriter
from ._worker import MessageT, ReplyT, ResultT, Worker

__all__ = ["Pool", "PoolStats"]

LoopKind = Literal["auto", "asyncio", "uvloop"]
StartMethod = Literal["fork", "spawn", "forkserver"]
Distribution = Literal["rounds", "barrier"]


class _ProcSlot(WorkerSlot):
    """A slot served by a worker process."""

    def __init__(self, number: int) -> None:
        super().__init__(number)
        self.process: multiprocessing.process.BaseProcess | None = None
        self.channel: Connection | None = None
        self.results: Connection | None = None
        self.writer: PipeWriter | None = None
        self.rfd = -1
        self.exit_fd = -1
        self.pidfd = -1
        self.decoder = P.FrameDecoder()
        # Messages written to the current worker's channel (barrier mode's order).
        self.channel_sent = 0
        self.reading = False  # its result pipe is watched (not paused by max_results)
        self.eof = False  # its result pipe has ended


class Pool(PoolCore[_ProcSlot, MessageT, ReplyT, ResultT]):
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
    * ``message_timeout`` — seconds a message may run in a worker (from
      when the worker starts it) before its handler is cancelled and it fails
      with :class:`~looppool.MessageTimeout`; ``timeout=`` of ``put`` and
      ``submit`` overrides it per message. Default: none.
    * ``hang_timeout`` — seconds a worker's loop may go without turning
      (blocked in C, ``time.sleep``, a deadlock, SIGSTOP) before the worker is
      killed and replaced as if it had died; the stack it was stuck in is
      logged. Default: none.
    * ``start_timeout`` — seconds a worker may take from its launch to the end
      of ``initialise()``; one still starting then is killed: at
      :meth:`start` the pool raises :class:`~looppool.WorkerStartError`, and
      a replacement that overruns counts as a failed start (three in a row
      break the pool). Default: none.
    * ``max_messages_per_worker``, ``max_memory_per_worker`` (bytes of RSS) —
      recycling: a worker past either finishes what it holds, runs
      ``finalise()`` and is replaced by a fresh one, one worker at a time.
    * ``max_results`` — results that may wait unread while a ``results()``
      consumer lags before the pool stops reading the workers (they then
      stop starting messages, and ``put`` waits): memory stays bounded.
      Default 4096; ``None``: no bound.
    * ``worker_metrics`` — every ``metrics_interval`` seconds, each worker
      sends its resource gauges to the parent: :meth:`worker_metrics`,
      :class:`looppool.metrics.PrometheusCollector`.
    """

    def __init__(
        self,
        worker: type[Worker[MessageT, ReplyT, ResultT]]
        | Callable[[], Worker[MessageT, ReplyT, ResultT]],
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
        message_timeout: float | None = None,
        hang_timeout: float | None = None,
        max_messages_per_worker: int | None = None,
        max_memory_per_worker: int | None = None,
        max_results: int | None = DEFAULT_MAX_RESULTS,
        worker_metrics: bool = False,
        start_timeout: float | None = None,
    ) -> None:
        super().__init__(
            worker,
            size if size is not None else (os.cpu_count() or 1),
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
        self._monitor = monitor_options(
            statsd, statsd_prefix, metrics_interval, blocking_threshold, worker_metrics
        )

        self._loop_kind = ("uvloop" if has_uvloop else "asyncio") if loop == "auto" else loop
        self._distribution = distribution

    def _new_slot(self, number: int) -> _ProcSlot:
        return _ProcSlot(number)

    @property
    def loop_kind(self) -> str:
        """The event loop the workers run: ``"asyncio"`` or ``"uvloop"``."""
        return self._loop_kind

    @property
    def start_method(self) -> str:
        """The multiprocessing start method in use."""
        return self._start_method

    def __repr__(self) -> str:
        return f"<looppool.Pool {self._describe()}>"

    def _transport_info(self) -> str:
        return f" ({self._loop_kind}, {self._start_method})"

    # -- processes ------------------------------------------------------------

    def _before_start(self) -> None:
        atexit.register(self._kill_at_exit)
        if self._distribution == "barrier":
            assert self._loop is not None
            barrier = BarrierDistribution(self, self._ctx, self._loop, self._size)
            self._dist = self._ledger.shared = barrier

    def _launch(self, slot: _ProcSlot) -> None:
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
            monitor=self._monitor,
            beat=(self._heartbeat_options() or (None,))[0],
            hang_timeout=self._hang_timeout,
            report_rss=self._max_memory is not None,
            **self._dist.worker_options(),
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
        slot.state = SlotState.STARTING
        slot.channel, slot.results = channel_w, results_r
        slot.writer = PipeWriter(self._loop, channel_w.fileno())
        slot.rfd = results_r.fileno()
        os.set_blocking(slot.rfd, False)
        slot.decoder = P.FrameDecoder()
        slot.start_error = None
        slot.farewell = Farewell.NONE
        slot.channel_sent = 0
        slot.reading = True
        slot.eof = False
        slot.exited = self._loop.create_future()
        slot.exit_fd = self._exit_fd(slot, process)
        self._loop.add_reader(slot.rfd, self._on_readable, slot)
        self._loop.add_reader(slot.exit_fd, self._on_exit, slot)

    def _exit_fd(self, slot: _ProcSlot, process: multiprocessing.process.BaseProcess) -> int:
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

    def _on_exit(self, slot: _ProcSlot) -> None:
        assert self._loop is not None
        assert slot.process is not None
        self._loop.remove_reader(slot.exit_fd)
        self._read_rest(slot)
        slot.process.join()
        exitcode = slot.process.exitcode
        # Release its sentinel fd now rather than whenever the Process object
        # is collected: a pool that restarts workers for weeks must not
        # accumulate fds.
        slot.process.close()
        slot.process = None
        self._close_slot(slot)
        self._on_worker_end(
            slot,
            f"its process died ({describe_exit(exitcode)})",
            WorkerLost(slot.number, slot.pid, exitcode),
        )

    def _send(self, slot: _ProcSlot, batch: list[Msg]) -> None:
        items = [
            (
                P.OP_MSG,
                msg.id,
                msg.reply is not None,
                msg.payload,
                msg.timeout,
                None if msg.trace is None else (msg.trace, msg.delivery),
            )
            if not msg.cancelled
            else (P.OP_SKIP, msg.id)  # barrier mode: a withdrawn message's place
            for msg in batch
        ]
        frame = P.encode(items)
        if type(frame) is list and len(items) > 1:
            # Large payloads: a frame per message, so that the worker starts
            # each as soon as it has read it, not once it has read them all.
            frame = P.encode_each(items)
        if self._write(slot, frame):
            slot.channel_sent += len(batch)
        else:
            # The worker died before we noticed: these never reached it, so
            # its death must not be charged to them.
            self._ledger.unsend(slot, batch)

    def _send_stop(self, slot: _ProcSlot, cancel: bool) -> None:
        self._write(slot, P.encode([(P.OP_STOP, cancel)]))

    def _send_cancel(self, slot: _ProcSlot, mid: int) -> None:
        self._write(slot, P.encode([(P.OP_CANCEL, mid)]))

    def _pause_reading(self, slot: _ProcSlot) -> None:
        if slot.rfd >= 0 and slot.reading:
            assert self._loop is not None
            self._loop.remove_reader(slot.rfd)
            slot.reading = False

    def _resume_reading(self, slot: _ProcSlot) -> None:
        if slot.rfd >= 0 and not slot.reading and not slot.eof:
            assert self._loop is not None
            self._loop.add_reader(slot.rfd, self._on_readable, slot)
            slot.reading = True

    def _channel_sent(self, slot: _ProcSlot) -> int:
        return slot.channel_sent

    def _kill(self, slot: _ProcSlot) -> None:
        if slot.process is not None:
            with contextlib.suppress(Exception):
                slot.process.kill()

    def _release(self) -> None:
        with contextlib.suppress(Exception):
            atexit.unregister(self._kill_at_exit)
        for slot in self._slots:
            self._close_slot(slot)

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

    def _write(self, slot: _ProcSlot, data: P.Frame) -> bool:
        """Write a frame without blocking; False if the worker is already gone.

        When the worker is gone its pidfd or sentinel tells the pool why.
        """
        return slot.writer is not None and slot.writer.write(data)

    def _on_readable(self, slot: _ProcSlot) -> None:
        frames = slot.decoder.read(slot.rfd)
        if frames is None:
            # End of file: the worker closed its end (it is exiting). Stop
            # watching, or the loop would call us for ever; the process
            # sentinel does the rest.
            assert self._loop is not None
            self._loop.remove_reader(slot.rfd)
            slot.reading = False
            slot.eof = True
            return
        for frame in frames:
            self._dispatch(slot, frame)

    def _read_rest(self, slot: _ProcSlot) -> None:
        """Read all the worker wrote before it exited: it is in the pipe already."""
        if slot.rfd < 0:
            return
        while True:
            # Not decoder.read(): it cannot tell an empty pipe from a read
            # that ended inside a frame, and here the rest of a big frame may
            # still be waiting in the pipe.
            try:
                data = os.read(slot.rfd, P.READ_SIZE)
            except OSError:  # BlockingIOError included: the pipe is empty
                return
            if not data:
                return
            for frame in slot.decoder.feed(data):
                self._dispatch(slot, frame)

    def _close_slot(self, slot: _ProcSlot) -> None:
        loop = self._loop
        if slot.rfd >= 0:
            if loop is not None:
                loop.remove_reader(slot.rfd)
            slot.rfd = -1
        if slot.writer is not None:
            slot.writer.close()
            slot.writer = None
        for conn in (slot.channel, slot.results):
            if conn is not None:
                conn.close()
        slot.channel = slot.results = None
        if slot.pidfd >= 0:
            if loop is not None:
                loop.remove_reader(slot.pidfd)
            os.close(slot.pidfd)
            slot.pidfd = -1


def _prepare_titles() -> None:
    """Set setproctitle up now, at import, so that forked workers inherit it ready.

    setproctitle finds the process's argv by walking back from the first
    environment string; once that variable has been changed (the string now
    lives elsewhere), its one-time set-up fails and titles silently stay
    unchanged, in this process and in every child forked from it. Users
    change ``os.environ`` after their imports, so importing looppool is the
    last safe moment (seen with setproctitle 1.3.8 on Python 3.11-3.13;
    tested). The set-up changes nothing visible in this process.
    """
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.getproctitle()  # runs its one-time set-up


_prepare_titles()
