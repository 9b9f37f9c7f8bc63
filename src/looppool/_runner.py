"""Running one worker object's messages on its event loop.

Shared by the worker process (``_child``) and the Ray actor (``ray``): both
build the worker, run ``initialise()``, start each message (inline for a plain
``def`` handler, as a task for an awaitable), and report every outcome as an
event of ``_protocol`` through an ``emit`` callable.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import pickle
import traceback
from collections.abc import Awaitable, Callable
from typing import Any, Final

from . import _protocol as P
from . import _tracing
from ._worker import Worker

CANCEL_GRACE: Final = 1.0  # seconds a cancelled Worker's tasks get to run their finally blocks

logger = logging.getLogger("looppool.worker")

Emit = Callable[[tuple[Any, ...]], None]


def pickle_dumps(value: Any) -> bytes:
    """``pickle.dumps`` with the protocol the pool uses."""
    return pickle.dumps(value, P.PROTOCOL)


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
        dumps: Callable[[Any], Any] = pickle_dumps,
        loads: Callable[[Any], Any] = pickle.loads,
        log: logging.Logger | logging.LoggerAdapter[logging.Logger] = logger,
        pool_name: str = "",
    ) -> None:
        self.factory = factory
        self.number = number
        self.emit = emit
        self.on_done = on_done
        # InlinePool(pickle=False) hands objects over as they are.
        self.dumps = dumps
        self.loads = loads
        self.log = log
        self.pool_name = pool_name
        self.tasks: set[asyncio.Task[None]] = set()
        self.start_exit: SystemExit | None = None  # sys.exit() in initialise()
        self.in_flight = 0
        self.processed = 0
        self.failed = 0
        self.worker: Worker | None = None
        self._process: Callable[[Any], Any] = _not_started
        # The spans of traced messages in flight, by message id; empty (and
        # only checked for emptiness) while no message carries a trace.
        self._spans: dict[int, Any] = {}

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
        }

    def put_result(self, value: Any) -> None:
        # Pickled here, in the caller: an unpicklable result raises inside
        # process_message and fails that message, not a whole frame.
        self.emit((P.EV_RESULT, self.dumps(value)))

    def start(
        self, mid: int, want_reply: bool, payload: bytes, trace: _tracing.Trace | None = None
    ) -> None:
        """Start one message: inline if the handler is plain, as a task if it awaits.

        ``trace`` (the last field of OP_MSG) is the caller's trace context:
        the message then runs in a span of its own.
        """
        if trace is not None:
            self._start_traced(mid, want_reply, payload, trace)
            return
        self.in_flight += 1
        try:
            result = self._process(self.loads(payload))
        except Exception as exc:
            self._failed(mid, want_reply, exc)
            return
        if inspect.isawaitable(result):
            task = asyncio.get_running_loop().create_task(self._await(mid, want_reply, result))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        else:
            self._succeeded(mid, want_reply, result)

    def _start_traced(
        self, mid: int, want_reply: bool, payload: bytes, trace: _tracing.Trace
    ) -> None:
        begun = _tracing.begin(
            trace, worker=self.worker, pool_name=self.pool_name, number=self.number, mid=mid
        )
        if begun is None:  # OpenTelemetry is not importable here: run it untraced
            self.start(mid, want_reply, payload)
            return
        span, token = begun
        self._spans[mid] = span
        try:
            # The span is current while process_message starts: its own spans
            # nest under it, and the task made for an async handler copies
            # this context. A plain handler's span ends inside this call.
            self.start(mid, want_reply, payload)
        finally:
            _tracing.detach(token)

    def refuse(self, mid: int) -> None:
        """Report a message that arrived after the stop began: it was not started."""
        self.in_flight += 1
        self._done(mid, P.DONE_CANCELLED, None)

    async def _await(self, mid: int, want_reply: bool, awaitable: Awaitable[Any]) -> None:
        try:
            result = await awaitable
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Cancelled by a Worker pool's stop: the message is lost.
                self._done(mid, P.DONE_CANCELLED, None)
                raise
            # The handler's own CancelledError (an inner task it awaited was
            # cancelled): nobody cancelled this message, so it failed.
            self._failed(mid, want_reply, exc)
        except Exception as exc:
            self._failed(mid, want_reply, exc)
        else:
            self._succeeded(mid, want_reply, result)

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

    def _failed(self, mid: int, want_reply: bool, exc: BaseException) -> None:
        self.failed += 1
        if self._spans:
            _tracing.failed(self._spans.get(mid), exc)
        if not want_reply:
            # Nobody awaits this message: the parent's log is where it shows
            # (tagged there with the worker number).
            self.log.error("process_message raised %s", type(exc).__name__, exc_info=exc)
            self._done(mid, P.DONE_FAILED, None)
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
        self._done(mid, P.DONE_FAILED, (pickled, name, repr(exc), text))

    async def finish_in_flight(self, cancel: bool) -> None:
        """Wait for the messages in flight; cancel them first if ``cancel`` (Worker's stop)."""
        if not self.tasks:
            return
        if cancel:
            for task in self.tasks:
                task.cancel()
            await asyncio.wait(set(self.tasks), timeout=CANCEL_GRACE)
        else:
            while self.tasks:
                await asyncio.wait(set(self.tasks))


def _not_started(message: Any) -> Any:
    raise RuntimeError("a message arrived before the worker was initialised")
