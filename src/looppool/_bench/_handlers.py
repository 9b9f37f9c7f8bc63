"""The benchmark's workload handlers, as every system under test runs them.

Child processes (spawned workers of every system) import this module by
reference to unpickle a handler, so it stays light: no psutil, no
aiomultiprocess, no harness.

Each workload has one plain handler — a function of one message — and the
looppool :class:`~looppool.Worker` classes wrap the same functions:

* ``tiny`` (W1, W4): ``x * 2``, no await.
* ``io`` (W2): ``await asyncio.sleep(0.05)``.
* ``mixed`` (W3): 2 ms of CPU, then ``await asyncio.sleep(0.02)``.
* ``echo`` (W5): returns its (large) message unchanged.

Two sets of looppool workers: the *README path* (:data:`README_WORKERS`:
``async def process_message``, as the README teaches) and the *tuned* one
(:data:`WORKERS`: a plain ``def`` where the workload allows).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .._worker import Worker

__all__ = [
    "IO_SLEEP",
    "MIXED_CPU",
    "MIXED_SLEEP",
    "HANDLERS",
    "README_WORKERS",
    "WORKERS",
    "EchoReply",
    "EchoStream",
    "Handler",
    "IoReply",
    "IoStream",
    "MixedReply",
    "MixedStream",
    "TinyAsyncReply",
    "TinyAsyncStream",
    "TinyReply",
    "TinyStream",
    "aio_echo",
    "aio_io",
    "aio_mixed",
    "aio_tiny",
    "burn",
    "echo",
    "io",
    "mixed",
    "tiny",
]

#: W2's sleep per message, in seconds.
IO_SLEEP = 0.05
#: W3's CPU burn per message, in seconds of the loop thread's CPU time.
MIXED_CPU = 0.002
#: W3's sleep per message, after the burn.
MIXED_SLEEP = 0.02

#: A workload handler: a function of one message, plain or ``async``.
Handler = Callable[[Any], Any]


def burn(seconds: float) -> None:
    """Spin on this thread's CPU clock until it has advanced by ``seconds``.

    ``time.thread_time`` rather than ``process_time``: a worker also runs a
    listener thread, whose CPU must not shorten the burn; and rather than
    ``perf_counter``, so that a preempted worker still burns its full share
    of CPU and the W3 lower bound (CPU seconds / cores) stays exact.
    """
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def tiny(x: int) -> int:
    """W1/W4: double ``x``, without awaiting anything."""
    return x * 2


async def io(x: int) -> int:
    """W2: wait 50 ms on the loop, as an IO call would."""
    await asyncio.sleep(IO_SLEEP)
    return x


async def mixed(x: int) -> int:
    """W3: burn 2 ms of CPU, then wait 20 ms on the loop."""
    burn(MIXED_CPU)
    await asyncio.sleep(MIXED_SLEEP)
    return x


async def aio_tiny(x: int) -> int:
    """:func:`tiny` as a coroutine function (aiomultiprocess accepts only these)."""
    return x * 2


def echo(x: Any) -> Any:
    """W5: return the message itself (a result as large as the message)."""
    return x


async def aio_echo(x: Any) -> Any:
    """:func:`echo` as a coroutine function."""
    return x


aio_io = io
aio_mixed = mixed

#: Workload name → (plain handler, coroutine-function handler).
HANDLERS: dict[str, tuple[Handler, Callable[[Any], Awaitable[Any]]]] = {
    "tiny": (tiny, aio_tiny),
    "io": (io, aio_io),
    "mixed": (mixed, aio_mixed),
    "echo": (echo, aio_echo),
}


# looppool workers. The *Reply classes return the value (for Pool.submit);
# the *Stream classes send it with put_result (for Pool.put + results), so
# that a stream run does not also build a reply nobody awaits.


class TinyAsyncReply(Worker):
    """W1/W4 for ``submit``, as the README writes it: ``async def``, returns ``x * 2``."""

    async def process_message(self, message: Any) -> Any:
        """Return ``x * 2``."""
        return message * 2


class TinyAsyncStream(Worker):
    """W1 for ``put``, as the README writes it: ``async def``, puts ``x * 2``."""

    async def process_message(self, message: Any) -> None:
        """Send ``x * 2`` to the parent's result stream."""
        self.put_result(message * 2)


class EchoReply(Worker):
    """W5 for ``submit``: returns the message."""

    async def process_message(self, message: Any) -> Any:
        """Return the message."""
        return message


class EchoStream(Worker):
    """W5 for ``put``: puts the message back as a result."""

    async def process_message(self, message: Any) -> None:
        """Send the message back to the parent's result stream."""
        self.put_result(message)


class TinyReply(Worker):
    """W1/W4 for ``submit``, tuned: a plain ``def``, returns ``x * 2``."""

    def process_message(self, message: Any) -> Any:
        """Return ``x * 2``."""
        return message * 2


class TinyStream(Worker):
    """W1 for ``put``, tuned: a plain ``def``, sends ``x * 2`` as a result."""

    def process_message(self, message: Any) -> None:
        """Send ``x * 2`` to the parent's result stream."""
        self.put_result(message * 2)


class IoReply(Worker):
    """W2 for ``submit``."""

    async def process_message(self, message: Any) -> Any:
        """Sleep 50 ms, return the message."""
        await asyncio.sleep(IO_SLEEP)
        return message


class IoStream(Worker):
    """W2 for ``put``."""

    async def process_message(self, message: Any) -> None:
        """Sleep 50 ms, send the message back as a result."""
        await asyncio.sleep(IO_SLEEP)
        self.put_result(message)


class MixedReply(Worker):
    """W3 for ``submit``."""

    async def process_message(self, message: Any) -> Any:
        """Burn 2 ms of CPU, sleep 20 ms, return the message."""
        burn(MIXED_CPU)
        await asyncio.sleep(MIXED_SLEEP)
        return message


class MixedStream(Worker):
    """W3 for ``put``."""

    async def process_message(self, message: Any) -> None:
        """Burn 2 ms of CPU, sleep 20 ms, send the message back as a result."""
        burn(MIXED_CPU)
        await asyncio.sleep(MIXED_SLEEP)
        self.put_result(message)


#: Workload handler name → (stream worker class, reply worker class), tuned:
#: a plain ``def`` handler where the workload does not await.
WORKERS: dict[str, tuple[type[Worker], type[Worker]]] = {
    "tiny": (TinyStream, TinyReply),
    "io": (IoStream, IoReply),
    "mixed": (MixedStream, MixedReply),
    "echo": (EchoStream, EchoReply),
}
#: The same, as the README teaches: every handler an ``async def``.
README_WORKERS: dict[str, tuple[type[Worker], type[Worker]]] = {
    "tiny": (TinyAsyncStream, TinyAsyncReply),
    "io": (IoStream, IoReply),
    "mixed": (MixedStream, MixedReply),
    "echo": (EchoStream, EchoReply),
}


# ProcessPoolExecutor: an executor's worker runs one call at a time on a
# plain thread, so async handlers need a loop. One loop per process, made by
# the executor's initializer and kept for the life of the process, is cheaper
# than asyncio.run() per call (which builds and closes a loop every time).
# This is per-process state by nature, set once in each executor child.

_ppe_loop: asyncio.AbstractEventLoop | None = None


def ppe_init(loop_kind: str) -> None:
    """ProcessPoolExecutor initializer: make this process's event loop."""
    global _ppe_loop
    if loop_kind == "uvloop":
        import uvloop

        _ppe_loop = uvloop.new_event_loop()
    else:
        _ppe_loop = asyncio.new_event_loop()
    asyncio.set_event_loop(_ppe_loop)


def _ppe_run(awaitable: Awaitable[Any]) -> Any:
    if _ppe_loop is None:  # pragma: no cover - the initializer always ran
        return asyncio.run(awaitable)  # type: ignore[arg-type]
    return _ppe_loop.run_until_complete(awaitable)


def ppe_call(handler: Handler, message: Any) -> Any:
    """Run one message in an executor child; an async handler on its loop."""
    if inspect.iscoroutinefunction(handler):
        return _ppe_run(handler(message))
    return handler(message)


def ppe_batch(handler: Handler, messages: list[Any]) -> list[Any]:
    """Run a batch in an executor child; async handlers concurrently on its loop."""
    if inspect.iscoroutinefunction(handler):

        async def gather() -> list[Any]:
            return list(await asyncio.gather(*(handler(m) for m in messages)))

        result: list[Any] = _ppe_run(gather())
        return result
    return [handler(m) for m in messages]
