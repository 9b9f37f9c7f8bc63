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
from typing import Any, Literal

from . import _protocol as P
from . import _tracing
from ._child import ChildConfig, worker_main
from ._core import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_PENDING,
    MAX_START_FAILURES,
    Msg,
    PoolCore,
    PoolStats,
    ResultCallback,
    Slot,
    SlotState,
    State,
    logger,
)
from ._errors import LooppoolError, WorkerLost, describe_exit
from ._monitor import monitor_options
from ._pipes import PipeWriter, SharedQueue
from ._worker import Worker

__all__ = ["Pool", "PoolStats"]

LoopKind = Literal["auto", "asyncio", "uvloop"]
StartMethod = Literal["fork", "spawn", "forkserver"]
Distribution = Literal["rounds", "barrier"]


class _ProcSlot(Slot):
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


class Pool(PoolCore[_ProcSlot]):
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
    * ``worker_metrics`` — every ``metrics_interval`` seconds, each worker
      sends its resource gauges to the parent: :meth:`worker_metrics`,
      :class:`looppool.metrics.PrometheusCollector`.
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
        worker_metrics: bool = False,
    ) -> None:
        super().__init__(
            worker,
            size if size is not None else (os.cpu_count() or 1),
            concurrency=concurrency,
            max_pending=max_pending,
            on_result=on_result,
            name=name,
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
        # barrier mode
        self._shared_queue: SharedQueue | None = None
        self._barrier: Any = None
        self._shared_out: dict[int, Msg] = {}
        self._regenerating = False

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
        in_flight = sum(len(s.held) for s in self._slots)
        return (
            f"<looppool.Pool {self.name!r} {self._state.value}, {self._size} workers "
            f"({self._loop_kind}, {self._start_method}), {in_flight} in flight, "
            f"{self._pending} pending>"
        )

    # -- processes ------------------------------------------------------------

    def _before_start(self) -> None:
        atexit.register(self._kill_at_exit)
        if self._distribution == "barrier":
            self._new_generation_objects()

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
            shared_queue=self._shared_queue.reader if self._shared_queue is not None else None,
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
        slot.state = SlotState.STARTING
        slot.channel, slot.results = channel_w, results_r
        slot.writer = PipeWriter(self._loop, channel_w.fileno())
        slot.rfd = results_r.fileno()
        os.set_blocking(slot.rfd, False)
        slot.decoder = P.FrameDecoder()
        slot.start_error = None
        slot.said_bye = False
        slot.killed = False
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
        # Tracing (issue 14): the last field is _tracing.wire(msg), inlined
        # here because this runs for every message: None, or (carrier, delivery).
        frame = P.encode(
            [
                (
                    P.OP_MSG,
                    msg.id,
                    msg.future is not None,
                    msg.payload,
                    None if msg.trace is None else (msg.trace, msg.delivery),
                )
                for msg in batch
            ]
        )
        if not self._write(slot, frame):
            # The worker died before we noticed: these never reached it, so
            # its death must not be charged to them.
            self._unsend(slot, batch)

    def _send_stop(self, slot: _ProcSlot, cancel: bool) -> None:
        self._write(slot, P.encode([(P.OP_STOP, cancel)]))

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

    def _write(self, slot: _ProcSlot, data: bytes) -> bool:
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

    # -- barrier mode -----------------------------------------------------------

    def _new_generation_objects(self) -> None:
        assert self._loop is not None
        self._shared_queue = SharedQueue(self._ctx, self._loop)
        self._barrier = self._ctx.Barrier(self._size)

    def _share(self, msg: Msg) -> bool:
        if self._shared_queue is None:
            return False
        self._shared_out[msg.id] = msg
        # While a generation restarts, or suspects of a death run alone on a
        # worker (see _quarantine), nothing is written: a listener of the
        # isolated worker would take it and join the group. The backlog is
        # written when that ends.
        if not self._regenerating and not self._isolating():
            # Tracing (issue 14): the trace context, if any, and the delivery count.
            self._shared_queue.put(msg.id, msg.future is not None, msg.payload, _tracing.wire(msg))
        return True

    def _isolating(self) -> bool:
        return any(s.suspects or s.isolating for s in self._slots)

    def _isolation_over(self) -> None:
        if self._shared_queue is not None and not self._regenerating:
            self._write_shared_backlog()

    def _write_shared_backlog(self) -> None:
        assert self._shared_queue is not None
        for msg in sorted(self._shared_out.values(), key=lambda m: m.id):
            # Tracing (issue 14): the trace context, if any, and the delivery count.
            self._shared_queue.put(msg.id, msg.future is not None, msg.payload, _tracing.wire(msg))

    def _on_taken(self, slot: _ProcSlot, mid: int) -> None:
        msg = self._shared_out.pop(mid, None)
        if msg is not None:
            slot.held[msg.id] = msg

    def _find_unassigned(self, mid: int) -> Msg | None:
        return self._shared_out.pop(mid, None)

    def _lose_unassigned(self, exc: LooppoolError) -> None:
        for msg in list(self._shared_out.values()):
            self._lose(msg, exc)
        self._shared_out.clear()
        if self._shared_queue is not None and self._state is State.STOPPED:
            self._close_shared_queue()

    def _resend_cancelled(self, slot: _ProcSlot, msg: Msg) -> bool:
        if self._regenerating and self._accepting_respawns:
            # Cancelled by a generation restart, not by the user: it is sent
            # again once this worker has said goodbye (see _on_worker_end).
            slot.held[msg.id] = msg
            return True
        return False

    def _rescue(self, slot: _ProcSlot, lost: WorkerLost) -> None:
        if self._shared_queue is not None and self._accepting_respawns:
            # Begin the restart first: what the dead worker held must not go
            # back on this generation's queue, where a stopping survivor would
            # take it and count a delivery it never ran.
            self._begin_generation_restart()
        super()._rescue(slot, lost)

    def _replace(self, slot: _ProcSlot) -> None:
        if self._shared_queue is None:
            super()._replace(slot)
            return
        # A dead party can never be removed from a multiprocessing.Barrier
        # (nor can abort() be relied on: it may wait for the dead party
        # forever). Replace the whole generation instead.
        self._begin_generation_restart()
        self._maybe_finish_generation()

    def _after_stopped_end(self) -> None:
        self._maybe_finish_generation()

    def _begin_generation_restart(self) -> None:
        if self._regenerating:
            return
        self._regenerating = True
        logger.warning(
            "pool %s: restarting every worker (distribution='barrier' cannot replace one)",
            self.name,
        )
        self._tell_all_to_stop()

    def _maybe_finish_generation(self) -> None:
        """Once the old generation has exited, start a new one and send again what it left."""
        if not self._regenerating or any(s.alive for s in self._slots):
            return
        self._regenerating = False
        if not self._accepting_respawns:
            return
        for slot in self._slots:
            if slot.failures >= MAX_START_FAILURES:
                super()._replace(slot)  # gives up, loudly
                return
        self._close_shared_queue()
        self._new_generation_objects()
        for slot in self._slots:
            self._respawn(slot)
        if not self._isolating():
            self._write_shared_backlog()

    def _close_shared_queue(self) -> None:
        # What it did not take is still in _shared_out: the next generation
        # gets it again, or the stopping pool counts it lost.
        assert self._shared_queue is not None
        self._shared_queue.close()
        # Drop the generation's semaphores now, while nothing else runs: their
        # finalizers unregister them from multiprocessing's resource tracker.
        # Left to a pool caught in a reference cycle, they would be collected
        # whenever the cyclic GC runs, possibly inside the resource tracker's
        # own call (Python 3.13: "ResourceTracker called reentrantly ... might
        # leak"), which a test run hit.
        self._shared_queue = None
        self._barrier = None


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
