"""Running one worker object's messages on its event loop.

Shared by the worker process (``_child``) and the Ray actor (``ray``): both
build the worker, run ``initialise()``, start each message (inline for a plain
``def`` handler, as a task for an awaitable), and report every outcome as an
event of ``_protocol`` through an ``emit`` callable.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import logging
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from types import CoroutineType
from typing import Any, Final

from . import _protocol as P
from . import _tracing
from ._errors import MessageTimeout
from ._worker import Worker

CANCEL_GRACE: Final = 1.0  # seconds a cancelled Worker's tasks get to run their finally blocks

#: Whether asyncio.Task takes ``eager_start`` (3.12+): see MessageRunner(eager=).
EAGER_TASKS: Final = sys.version_info >= (3, 12)

logger = logging.getLogger("looppool.worker")

Emit = Callable[[tuple[Any, ...]], None]


def format_exception(exc: BaseException) -> str:
    """The traceback of ``exc`` as text."""
    return "".join(traceback.format_exception(exc))


async def maybe_await(value: Awaitable[Any] | None) -> None:
    """Await ``value`` if a hook returned an awaitable (hooks may be ``def`` or ``async def``)."""
    if inspect.isawaitable(value):
        await value


class MessageRunner:
    """Builds one worker and runs its messages on the running loop.

    ``emit`` receives the events; ``on_done(mid)`` is called as each message
    finishes (barrier mode frees a slot of its listener there). A message
    that carries a trace context runs in a span (``_tracing``) tagged with
    ``pool_name`` and the worker number.
    """

    def __init__(
        self,
        factory: Callable[[], Worker],
        number: int,
        emit: Emit,
        on_done: Callable[[int], None] | None = None,
        *,
        emit_result: Callable[[Any], None] | None = None,
        emit_ack: Callable[[int], None] | None = None,
        wait_room: Callable[[], Awaitable[None]] | None = None,
        dumps: Callable[[Any], Any] = P.dumps,
        loads: Callable[[Any], Any] = P.loads,
        log: logging.Logger | logging.LoggerAdapter[logging.Logger] = logger,
        pool_name: str = "",
        eager: bool = False,
    ) -> None:
        self.factory = factory
        self.number = number
        self.emit = emit
        # Shortcuts for the two events every message makes (the worker
        # process's outbox has them): a result, emit((EV_RESULT, payload)),
        # and a plain ack, emit((EV_DONE, mid, DONE_OK, None)).
        self._emit_result = emit_result or self._emit_result_event
        self._emit_ack = emit_ack
        self.on_done = on_done
        self.wait_room = wait_room
        # InlinePool(pickle=False) hands objects over as they are.
        self.dumps = dumps
        self.loads = loads
        self.log = log
        self.pool_name = pool_name
        # The messages running as tasks, by id (a plain def handler never is one).
        self.tasks: dict[int, asyncio.Task[None]] = {}
        # Deadlines: the running messages that have one, by their timeout
        # (see _Deadlines), and those that expired.
        self._deadlines: dict[float, _Deadlines] = {}
        self._expired: dict[int, tuple[float, bool]] = {}  # (timeout, want_reply)
        self.start_exit: SystemExit | None = None  # sys.exit() in initialise()
        self.in_flight = 0
        self.processed = 0
        self.failed = 0
        self.timed_out = 0
        self.worker: Worker | None = None
        self._process: Callable[[Any], Any] = _not_started
        # The spans of traced messages in flight, by message id; empty (and
        # only checked for emptiness) while no message carries a trace.
        self._spans: dict[int, Any] = {}
        # Start an async handler's task eagerly (3.12+, asyncio.Task's
        # eager_start): its first step runs at once, inside start(), as a
        # real task (current_task(), asyncio.timeout() and the context copy
        # are as usual), and one that finishes without suspending is done
        # before it is ever scheduled, so it costs no loop turn. Only the
        # worker process asks for it; InlinePool and Ray keep lazy tasks.
        self._eager = eager and EAGER_TASKS

    async def initialise(self) -> Worker | None:
        """Build the worker and run its ``initialise()``; emit EV_START_FAILED on failure."""
        try:
            worker = self.factory()
            if not isinstance(worker, Worker):
                raise TypeError(
                    f"the worker factory returned {worker!r}, not an instance of looppool.Worker"
                )
            worker.number = self.number
            worker._looppool_sink = self.put_result
            if self.wait_room is not None:
                worker._looppool_room = self.wait_room
            self._process = worker.process_message
            await maybe_await(worker.initialise())
        except BaseException as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self.emit((P.EV_START_FAILED, reason, format_exception(exc)))
            if isinstance(exc, SystemExit):
                self.start_exit = exc
            return None
        self.worker = worker
        return worker

    async def finalise(self) -> None:
        """Run the worker's ``finalise()``; an exception is logged, not raised."""
        if self.worker is None:
            return
        try:
            await maybe_await(self.worker.finalise())
        except Exception:
            self.log.exception("finalise() raised")  # the parent tags it with the worker number
        # A forked worker ends with os._exit, which skips the tracing SDK's
        # atexit flush: the spans it buffers (ours, the handler's) would be
        # lost. Nothing happens unless the process uses OpenTelemetry.
        await _tracing.flush()

    def counters(self) -> dict[str, float]:
        """The message counts, for the resource reporter."""
        return {
            "messages.in_flight": self.in_flight,
            "messages.processed": self.processed,
            "messages.failed": self.failed,
            "messages.timed_out": self.timed_out,
        }

    def _emit_result_event(self, payload: Any) -> None:
        self.emit((P.EV_RESULT, payload))  # (self.emit, not a copy: InlinePool may replace it)

    def put_result(self, value: Any) -> None:
        # Pickled here, in the caller: an unpicklable result raises inside
        # process_message and fails that message, not a whole frame.
        self._emit_result(self.dumps(value))

    def start(
        self,
        mid: int,
        want_reply: bool,
        payload: bytes,
        timeout: float | None = None,
        trace: _tracing.Trace | None = None,
    ) -> None:
        """Start one message: inline if the handler is plain, as a task if it awaits.

        ``timeout`` (seconds): cancel its task at that deadline, and fail it
        with :class:`~looppool.MessageTimeout`. A plain ``def`` handler runs
        to its end in one go, so a deadline cannot interrupt it (the pool's
        ``hang_timeout`` covers one that never returns). ``trace`` (the last
        field of OP_MSG) is the caller's trace context: the message then runs
        in a span of its own.
        """
        if trace is not None:
            self._start_traced(mid, want_reply, payload, timeout, trace)
            return
        self.in_flight += 1
        try:
            result = self._process(self.loads(payload))
        except Exception as exc:
            self._failed(mid, want_reply, exc)
            return
        if type(result) is CoroutineType or inspect.isawaitable(result):  # (the usual case first)
            loop = asyncio.get_running_loop()
            if self._eager:
                task = asyncio.Task(  # type: ignore[call-arg,unused-ignore]
                    self._await(mid, want_reply, result, timeout), loop=loop, eager_start=True
                )
                if task.done():
                    # It finished in its first step, and _await reported it:
                    # nothing to track, no deadline to arm.
                    return
            else:
                task = loop.create_task(self._await(mid, want_reply, result, timeout))
            self.tasks[mid] = task
            if timeout is not None:
                deadlines = self._deadlines.get(timeout)
                if deadlines is None:
                    deadlines = self._deadlines[timeout] = _Deadlines(
                        loop, timeout, self._expire, self._deadlines
                    )
                deadlines.add(mid, want_reply)
        else:
            self._succeeded(mid, want_reply, result)

    def cancel(self, mid: int) -> None:
        """Cancel message ``mid`` if it runs here (its ``submit()`` was cancelled)."""
        task = self.tasks.get(mid)
        if task is not None:
            self._cancel(mid, task)

    def _cancel(self, mid: int, task: asyncio.Task[None]) -> None:
        # A task cancelled before its first step never enters its coroutine,
        # so _await would report nothing and the parent would wait for ever:
        # a done-callback reports it then (and only then: _await's finally
        # has taken it out of self.tasks when it ran).
        task.add_done_callback(functools.partial(self._ended_unstarted, mid))
        task.cancel()

    def _ended_unstarted(self, mid: int, task: asyncio.Task[None]) -> None:
        if self.tasks.pop(mid, None) is None:
            return
        for deadlines in self._deadlines.values():  # (rare: a message cancelled before it ran)
            deadlines.discard(mid)
        expired = self._expired.pop(mid, None)
        if expired is None:
            self._done(mid, P.DONE_CANCELLED, None)
        else:
            self._timed_out(mid, *expired)

    def _expire(self, mid: int, timeout: float, want_reply: bool) -> None:
        task = self.tasks.get(mid)
        if task is not None and not task.done():
            self._expired[mid] = (timeout, want_reply)
            self._cancel(mid, task)

    def _timed_out(self, mid: int, timeout: float, want_reply: bool) -> None:
        self.timed_out += 1
        self._failed(mid, want_reply, MessageTimeout(timeout, self.number), timed_out=True)

    def _start_traced(
        self,
        mid: int,
        want_reply: bool,
        payload: bytes,
        timeout: float | None,
        trace: _tracing.Trace,
    ) -> None:
        begun = _tracing.begin(
            trace, worker=self.worker, pool_name=self.pool_name, number=self.number, mid=mid
        )
        if begun is None:  # OpenTelemetry is not importable here: run it untraced
            self.start(mid, want_reply, payload, timeout)
            return
        span, token = begun
        self._spans[mid] = span
        try:
            # The span is current while process_message starts: its own spans
            # nest under it, and the task made for an async handler copies
            # this context. A plain handler's span ends inside this call.
            self.start(mid, want_reply, payload, timeout)
        finally:
            _tracing.detach(token)

    def refuse(self, mid: int) -> None:
        """Report a message that arrived after the stop began: it was not started."""
        self.in_flight += 1
        self._done(mid, P.DONE_CANCELLED, None)

    async def _await(
        self, mid: int, want_reply: bool, awaitable: Awaitable[Any], time_limit: float | None
    ) -> None:
        try:
            result = await awaitable
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            expired = self._expired.pop(mid, None)
            if expired is not None and task is not None:
                # Cancelled at its deadline: the message failed, and the task
                # ends normally (its cancellation was ours, and is spent).
                task.uncancel()
                self._timed_out(mid, *expired)
            elif task is not None and task.cancelling():
                # Cancelled by a Worker pool's stop, or because its submit()
                # was cancelled: the message did not finish.
                self._done(mid, P.DONE_CANCELLED, None)
                raise
            else:
                # The handler's own CancelledError (an inner task it awaited
                # was cancelled): nobody cancelled this message, so it failed.
                self._failed(mid, want_reply, exc)
        except Exception as exc:
            self._failed(mid, want_reply, exc)
        else:
            expired = self._expired.pop(mid, None)
            if expired is None:
                self._succeeded(mid, want_reply, result)
            else:
                # It swallowed the cancellation at its deadline and returned
                # anyway: late all the same, so it fails as timed out.
                self._timed_out(mid, *expired)
        finally:
            self.tasks.pop(mid, None)
            # (Each test first: most pools set no deadline, and these stay empty.)
            if self._expired:
                self._expired.pop(mid, None)  # (a handler that raised something else)
            if time_limit is not None:
                deadlines = self._deadlines.get(time_limit)
                if deadlines is not None:
                    deadlines.discard(mid)

    def _done(self, mid: int, status: int, payload: Any) -> None:
        self.in_flight -= 1
        if self._spans:
            span = self._spans.pop(mid, None)
            if span is not None:
                _tracing.end(span, status)
        self.emit((P.EV_DONE, mid, status, payload))
        if self.on_done is not None:
            self.on_done(mid)

    def _succeeded(self, mid: int, want_reply: bool, result: Any) -> None:
        if not want_reply and self._emit_ack is not None and not self._spans:
            # _done(mid, DONE_OK, None), spelt out: this runs for every message.
            self.processed += 1
            self.in_flight -= 1
            self._emit_ack(mid)
            if self.on_done is not None:
                self.on_done(mid)
            return
        payload: bytes | None = None
        if want_reply:
            try:
                payload = self.dumps(result)
            except Exception as exc:
                error = TypeError(
                    f"worker {self.number}: the reply of process_message could not be "
                    f"pickled: {type(exc).__name__}: {exc}"
                )
                error.__cause__ = exc
                self._failed(mid, want_reply, error)
                return
        self.processed += 1
        self._done(mid, P.DONE_OK, payload)

    def _failed(
        self, mid: int, want_reply: bool, exc: BaseException, timed_out: bool = False
    ) -> None:
        self.failed += 1
        status = P.DONE_TIMED_OUT if timed_out else P.DONE_FAILED
        if self._spans:
            _tracing.failed(self._spans.get(mid), exc)
        if not want_reply:
            # Nobody awaits this message: the parent's log is where it shows
            # (tagged there with the worker number).
            if timed_out:
                self.log.warning("%s", exc)
            else:
                self.log.error("process_message raised %s", type(exc).__name__, exc_info=exc)
            self._done(mid, status, None)
            return
        text = format_exception(exc)
        try:
            pickled: Any = self.dumps(exc)
            # An exception may pickle yet fail to unpickle (an __init__ that
            # takes other arguments than it passes to Exception).
            self.loads(pickled)
        except Exception:
            pickled = None
        name = f"{type(exc).__module__}.{type(exc).__qualname__}"
        self._done(mid, status, (pickled, name, repr(exc), text))

    async def finish_in_flight(self, cancel: bool) -> None:
        """Wait for the messages in flight; cancel them first if ``cancel`` (Worker's stop)."""
        if not self.tasks:
            return
        if cancel:
            for mid, task in list(self.tasks.items()):
                self._cancel(mid, task)
            await asyncio.wait(set(self.tasks.values()), timeout=CANCEL_GRACE)
        else:
            while self.tasks:
                await asyncio.wait(set(self.tasks.values()))


class _Deadlines:
    """The deadlines of running messages that share one timeout: one loop timer for them all.

    Messages given the same timeout reach their deadlines in the order they
    started, so they wait in an ``OrderedDict`` in that order, and a single
    timer, armed for the oldest, expires them in turn. A timer per message
    (``call_later`` then ``cancel``) cost 2-3.5 µs of a worker's time per
    message; an insert and a pop here cost about 0.3 µs.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        timeout: float,
        expire: Callable[[int, float, bool], None],
        groups: dict[float, _Deadlines],
    ) -> None:
        self._loop = loop
        self._timeout = timeout
        self._expire = expire
        self._groups = groups  # the runner's groups by timeout: an empty one leaves it
        self._due: collections.OrderedDict[int, tuple[float, bool]] = collections.OrderedDict()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, mid: int, want_reply: bool) -> None:
        when = self._loop.time() + self._timeout
        self._due[mid] = (when, want_reply)
        if self._timer is None:
            self._timer = self._loop.call_at(when, self._fire)

    def discard(self, mid: int) -> None:
        # The timer stays armed: when it fires it finds who is due then.
        self._due.pop(mid, None)

    def _fire(self) -> None:
        self._timer = None
        due = self._due
        # Loops may run a timer a little early (asyncio by its clock's
        # resolution, uvloop by its millisecond clock): a deadline this close
        # counts as reached, rather than re-arming for it again and again.
        now = self._loop.time() + 0.001
        while due:
            mid, (when, want_reply) = next(iter(due.items()))
            if when > now:
                self._timer = self._loop.call_at(when, self._fire)
                return
            del due[mid]
            self._expire(mid, self._timeout, want_reply)
        if self._groups.get(self._timeout) is self:
            del self._groups[self._timeout]  # nobody runs with this timeout now


def _not_started(message: Any) -> Any:
    raise RuntimeError("a message arrived before the worker was initialised")


class Heartbeat:
    """The worker's side of ``hang_timeout`` and of memory recycling.

    Every ``interval`` seconds a callback on the loop notes that the loop
    turns and, unless a frame went to the parent meanwhile, sends EV_ALIVE
    (always, with the process's RSS, when ``report_rss``). The parent,
    which hears from the worker at least that often, kills it when it has not
    for ``hang_timeout``. Before that, a thread that blocks on an Event (it
    wakes every ``interval``, nothing busy-waits) sees the loop stuck for half
    of ``hang_timeout`` and sends, at once and from its own thread, the stack
    the loop's thread is stuck in, for the parent to log when it kills the
    worker. A stopped process (SIGSTOP) runs neither: it is killed without a
    stack.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        emit: Emit,
        emit_now: Emit,
        last_sent: Callable[[], float],
        interval: float,
        hang_timeout: float | None,
        report_rss: bool,
    ) -> None:
        self._loop = loop
        self._emit = emit  # on the loop's thread
        self._emit_now = emit_now  # from any thread, written at once
        self._last_sent = last_sent  # time.monotonic() of the last frame to the parent
        self._interval = interval
        self._hang_timeout = hang_timeout
        self._process: Any = None
        if report_rss:
            import psutil

            self._process = psutil.Process()
        self._turned = time.monotonic()
        self._handle: asyncio.TimerHandle | None = None
        self._stopped = threading.Event()
        self._loop_thread = threading.get_ident()

    def start(self) -> None:
        self._beat()
        if self._hang_timeout is not None:
            threading.Thread(target=self._watch, name="looppool-hang-watcher", daemon=True).start()

    def close(self) -> None:
        self._stopped.set()
        if self._handle is not None:
            self._handle.cancel()

    def _beat(self) -> None:
        now = self._turned = time.monotonic()
        if self._process is not None:
            try:
                rss = int(self._process.memory_info().rss)
            except Exception:  # psutil failing must not stop the heartbeat
                rss = 0
            self._emit((P.EV_ALIVE, rss))
        elif now - self._last_sent() >= self._interval:
            self._emit((P.EV_ALIVE, 0))
        self._handle = self._loop.call_later(self._interval, self._beat)

    def _watch(self) -> None:
        import sys
        import traceback

        assert self._hang_timeout is not None
        reported = False
        while not self._stopped.wait(self._interval):
            stuck = time.monotonic() - self._turned
            if stuck < self._hang_timeout / 2:
                reported = False
                continue
            if reported:
                continue
            reported = True
            frame = sys._current_frames().get(self._loop_thread)
            stack = "".join(traceback.format_stack(frame)) if frame is not None else ""
            with contextlib.suppress(Exception):  # the parent may be gone
                self._emit_now((P.EV_STACK, f"stuck for {stuck:.1f} s in:\n{stack}"))
