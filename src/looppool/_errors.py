"""The exceptions looppool raises.

::

    LooppoolError                 every error of this package derives from it
    ├── PoolClosed                put/submit/broadcast after stop(), or a message
    │                             dropped because the pool stopped before running it
    ├── QueueFull                 put_nowait() above max_pending (also an
    │                             asyncio.QueueFull)
    ├── WorkerStartError          a worker's process or initialise() failed at start
    ├── WorkerLost                the worker process holding a message died
    ├── MessageTimeout            a message ran past its deadline (also a TimeoutError)
    ├── PoolBroken                workers keep dying on start: the pool gave up
    ├── RemoteError               a worker's exception that could not cross the
    │                             process boundary (unpicklable), as text
    └── RemoteTraceback           the worker-side traceback, attached as
                                  ``__cause__`` of exceptions re-raised by submit()
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = [
    "LooppoolError",
    "MessageTimeout",
    "PoolBroken",
    "PoolClosed",
    "QueueFull",
    "RemoteError",
    "RemoteTraceback",
    "WorkerLost",
    "WorkerStartError",
]


class LooppoolError(Exception):
    """Base class of every exception raised by looppool."""


class PoolClosed(LooppoolError):
    """The pool is stopped (or stopping): it takes no new messages.

    Also raised by ``submit()`` for a message that the pool dropped because it
    stopped before the message could run (a ``Worker`` pool's stop, or a stop
    caused by an exception in the body of ``async with``).
    """


class QueueFull(LooppoolError, asyncio.QueueFull):
    """``put_nowait()`` found ``max_pending`` messages already accepted.

    Also an :class:`asyncio.QueueFull`, which ``asyncio.Queue.put_nowait()``
    raises in the same case: code written for an ``asyncio.Queue`` catches it.
    """


class WorkerStartError(LooppoolError):
    """A worker failed to start: its ``initialise()`` raised, or its process died.

    ``number`` is the worker's number, ``remote_traceback`` the worker-side
    traceback as text (empty if the process died without one) and ``exitcode``
    the process's exit code (negative: killed by that signal), if it exited.
    """

    def __init__(
        self,
        number: int,
        reason: str,
        remote_traceback: str = "",
        exitcode: int | None = None,
    ) -> None:
        self.number = number
        self.reason = reason
        self.remote_traceback = remote_traceback
        self.exitcode = exitcode
        text = f"worker {number} failed to start: {reason}"
        if remote_traceback:
            text += "\n\nWorker traceback:\n" + remote_traceback.rstrip()
        super().__init__(text)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.number, self.reason, self.remote_traceback, self.exitcode))


class WorkerLost(LooppoolError):
    """The worker process that held the message died before finishing it.

    In a :class:`~looppool.Worker` pool, every message the dead worker held
    fails with it. In a :class:`~looppool.SafeWorker` pool only a poison
    message does: one that was the only message in two workers that died.
    ``number``, ``pid`` and ``exitcode`` (negative: the signal that killed it)
    name the (last) process.
    """

    def __init__(self, number: int, pid: int | None, exitcode: int | None) -> None:
        self.number = number
        self.pid = pid
        self.exitcode = exitcode
        super().__init__(
            f"worker {number} (pid {pid}) died ({describe_exit(exitcode)}) "
            "before finishing the message"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.number, self.pid, self.exitcode))


class MessageTimeout(LooppoolError, TimeoutError):
    """A message ran longer than its deadline (``message_timeout``, or ``timeout=``).

    Its handler was cancelled inside the worker at the deadline
    (``CancelledError`` in ``process_message``, so ``finally`` blocks ran) and
    the message counts as failed. ``timeout`` is the deadline in seconds and
    ``number`` the worker that ran it.
    """

    def __init__(self, timeout: float, number: int) -> None:
        self.timeout = timeout
        self.number = number
        super().__init__(
            f"the message ran longer than its timeout of {timeout:g} s in worker {number}; "
            "its handler was cancelled"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.timeout, self.number))


class PoolBroken(LooppoolError):
    """The pool gave up: workers kept dying while starting (a crash loop)."""


class RemoteError(LooppoolError):
    """An exception raised in a worker that could not be sent to the parent.

    ``type_name`` is the qualified name of its type, ``text`` its ``repr()``,
    and ``remote_traceback`` the worker-side traceback.
    """

    def __init__(self, type_name: str, text: str, remote_traceback: str = "") -> None:
        self.type_name = type_name
        self.text = text
        self.remote_traceback = remote_traceback
        super().__init__(f"{text} (raised in a worker; its type {type_name} could not be pickled)")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.type_name, self.text, self.remote_traceback))


class RemoteTraceback(LooppoolError):
    """The traceback of an exception as it was raised in a worker process.

    Attached as ``__cause__`` of the exception that ``submit()`` re-raises, so
    that both tracebacks print.
    """

    def __init__(self, tb: str) -> None:
        self.tb = tb
        super().__init__(tb)

    def __str__(self) -> str:
        return self.tb


def describe_exit(exitcode: int | None) -> str:
    """Describe a ``multiprocessing`` exit code in words (``killed by SIGKILL``)."""
    import signal

    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by {name}"
    return f"exit code {exitcode}"


def short_repr(value: Any) -> str:
    """``repr(value)``, at most 80 characters, never raising."""
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__qualname__} object>"
    return text if len(text) <= 80 else text[:77] + "..."
