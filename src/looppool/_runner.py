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
from ._errors import MessageTimeout
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
    finishes (barrier mode frees a slot of its listener there).
    """

    def __init__(
        self,
        factory: Callable[[], Worker],
        number: int,
        emit: Emit,
        on_done: Callable[[int], None] | None = None,
        *,
        wait_room: Callable[[], Awaitable[None]] | None = None,
        dumps: Callable[[Any], Any] = pickle_dumps,
        loads: Callable[[Any], Any] = pickle.loads,
        log: logging.Logger | logging.LoggerAdapter[logging.Logger] = logger,
    ) -> None:
        self.factory = factory
        self.number = number
        self.emit = emit
        self.on_done = on_done
        self.wait_room = wait_room
        # InlinePool(pickle=False) hands objects over as they are.
        self.dumps = dumps
        self.loads = loads
        self.log = log
        # The messages running as tasks, by id (a plain def handler never is one).
        self.tasks: dict[int, asyncio.Task[None]] = {}
        # Deadlines: the timer of each message that has one, and those that expired.
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._expired: dict[int, float] = {}
        self.start_exit: SystemExit | None = None  # sys.exit() in initialise()
        self.in_flight = 0
        self.processed = 0
        self.failed = 0
        self.timed_out = 0
        self.worker: Worker | None = None
        self._process: Callable[[Any], Any] = _not_started

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

    def counters(self) -> dict[str, float]:
        """The message counts, for the resource reporter."""
        return {
            "messages.in_flight": self.in_flight,
            "messages.processed": self.processed,
            "messages.failed": self.failed,
            "messages.timed_out": self.timed_out,
        }

    def put_result(self, value: Any) -> None:
        # Pickled here, in the caller: an unpicklable result raises inside
        # process_message and fails that message, not a whole frame.
        self.emit((P.EV_RESULT, self.dumps(value)))

    def start(
        self, mid: int, want_reply: bool, payload: bytes, timeout: float | None = None
    ) -> None:
        """Start one message: inline if the handler is plain, as a task if it awaits.

        ``timeout`` (seconds): cancel its task at that deadline, and fail it
        with :class:`~looppool.MessageTimeout`. A plain ``def`` handler runs
        to its end in one go, so a deadline cannot interrupt it (the pool's
        ``hang_timeout`` covers one that never returns).
        """
        self.in_flight += 1
        try:
            result = self._process(self.loads(payload))
        except Exception as exc:
            self._failed(mid, want_reply, exc)
            return
        if inspect.isawaitable(result):
            loop = asyncio.get_running_loop()
            task = loop.create_task(self._await(mid, want_reply, result))
            self.tasks[mid] = task
            if timeout is not None:
                self._timers[mid] = loop.call_later(timeout, self._expire, mid, timeout)
        else:
            self._succeeded(mid, want_reply, result)

    def cancel(self, mid: int) -> None:
        """Cancel message ``mid`` if it runs here (its ``submit()`` was cancelled)."""
        task = self.tasks.get(mid)
        if task is not None:
            task.cancel()

    def _expire(self, mid: int, timeout: float) -> None:
        task = self.tasks.get(mid)
        if task is not None and not task.done():
            self._expired[mid] = timeout
            task.cancel()

    def refuse(self, mid: int) -> None:
        """Report a message that arrived after the stop began: it was not started."""
        self.in_flight += 1
        self._done(mid, P.DONE_CANCELLED, None)

    async def _await(self, mid: int, want_reply: bool, awaitable: Awaitable[Any]) -> None:
        try:
            result = await awaitable
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            timeout = self._expired.pop(mid, None)
            if timeout is not None and task is not None:
                # Cancelled at its deadline: the message failed, and the task
                # ends normally (its cancellation was ours, and is spent).
                task.uncancel()
                self.timed_out += 1
                self._failed(mid, want_reply, MessageTimeout(timeout, self.number), timed_out=True)
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
            self._succeeded(mid, want_reply, result)
        finally:
            self.tasks.pop(mid, None)
            timer = self._timers.pop(mid, None)
            if timer is not None:
                timer.cancel()

    def _done(self, mid: int, status: int, payload: Any) -> None:
        self.in_flight -= 1
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

    def _failed(
        self, mid: int, want_reply: bool, exc: BaseException, timed_out: bool = False
    ) -> None:
        self.failed += 1
        status = P.DONE_TIMED_OUT if timed_out else P.DONE_FAILED
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
            for task in self.tasks.values():
                task.cancel()
            await asyncio.wait(set(self.tasks.values()), timeout=CANCEL_GRACE)
        else:
            while self.tasks:
                await asyncio.wait(set(self.tasks.values()))


def _not_started(message: Any) -> Any:
    raise RuntimeError("a message arrived before the worker was initialised")
