"""Workers for the tests of ``looppool run`` (tests/test_cli.py), and helpers.

``looppool run cli_workers:Echo`` imports this module from the current
directory, so the tests run the command with ``tests/`` as the working
directory; it must stay importable without pytest (workers started with
"spawn" import it).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import select
from typing import Any

import looppool

#: The workers' logger: its warnings reach the command's stderr, where the
#: tests read them to know what a worker is doing.
log = logging.getLogger("cli_workers")


class Echo(looppool.Worker):
    """Puts every message back as its result."""

    def process_message(self, message: Any) -> None:
        """Put ``message`` as the result."""
        self.put_result(message)


class Double(looppool.SafeWorker):
    """Puts ``{"in": x, "out": 2x}`` and replies ``2x``, finishing out of order."""

    async def process_message(self, message: int) -> int:
        """Yield to the loop a message-dependent number of times, then answer."""
        # Later messages often finish first: --ordered must put them back in order.
        for _ in range((message * 7) % 5):
            await asyncio.sleep(0)
        self.put_result({"in": message, "out": 2 * message})
        return 2 * message


class Picky(looppool.SafeWorker):
    """Raises ``ValueError`` for a message ``{"fail": true}``; echoes the others."""

    def process_message(self, message: Any) -> Any:
        """Echo ``message`` unless it asks to fail."""
        if isinstance(message, dict) and message.get("fail"):
            raise ValueError(f"asked to fail: {message}")
        self.put_result(message)
        return message


class Unserialisable(looppool.SafeWorker):
    """Puts a set (picklable, not JSON) for the message ``"set"``; echoes others."""

    def process_message(self, message: Any) -> Any:
        """Put a set for ``"set"``, else echo."""
        value = {1, 2} if message == "set" else message
        self.put_result(value)
        return value


class NoStart(looppool.Worker):
    """A worker whose ``initialise()`` fails."""

    def initialise(self) -> None:
        """Fail."""
        raise RuntimeError("no database today")

    def process_message(self, message: Any) -> None:
        """Never reached."""


class Idle(looppool.Worker):
    """A subclass that forgets to override ``process_message``."""


class NotAWorker:
    """A class that does not derive from looppool.Worker."""

    def process_message(self, message: Any) -> None:
        """Looks like a worker, is not one."""


async def _held(message: Any) -> Any:
    """What Held and HeldPlain do with a message."""
    if not (isinstance(message, dict) and "hold" in message):
        return message
    if "fifo" not in message:
        log.warning("holding %s", message["hold"])
        await asyncio.Event().wait()  # until the worker is killed, or cancelled
    # The FIFO is open for reading before the warning says so: a test that
    # has read the warning opens the other end without waiting. Linux does
    # not report the FIFO readable before something is written to it.
    fd = os.open(message["fifo"], os.O_RDONLY | os.O_NONBLOCK)
    try:
        log.warning("holding %s", message["hold"])
        loop = asyncio.get_running_loop()
        readable = loop.create_future()
        loop.add_reader(fd, readable.set_result, None)
        try:
            await readable
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)
    return message["hold"]


class Held(looppool.SafeWorker):
    """Puts and replies each message; ``{"hold": x, ...}`` is held first, then answers ``x``.

    ``{"hold": x}`` logs the warning "holding x" (the command writes it on
    stderr), then waits: until something is written to the FIFO that
    ``{"fifo": path}`` names, or forever without one.
    """

    async def process_message(self, message: Any) -> Any:
        """Hold the message if it asks; then put it as the result and reply it."""
        message = await _held(message)
        self.put_result(message)
        return message


class HeldPlain(looppool.Worker):
    """:class:`Held` as a plain Worker: a stop cancels the messages it holds."""

    async def process_message(self, message: Any) -> Any:
        """Hold the message if it asks; then put it as the result and reply it."""
        message = await _held(message)
        self.put_result(message)
        return message


class SlowStart(looppool.Worker):
    """A worker whose ``initialise()`` logs "initialising" and never returns."""

    async def initialise(self) -> None:
        """Log, then wait forever."""
        log.warning("initialising")
        await asyncio.Event().wait()

    def process_message(self, message: Any) -> None:
        """Never reached."""


#: A factory (not a class): accepted by ``looppool run``.
double_factory = functools.partial(Double)

#: Neither a class nor a callable.
not_callable = 42


def process_is_gone(pid: int, deadline: float) -> bool:
    """Wait up to ``deadline`` seconds for process ``pid`` to exit (no polling).

    Uses a pidfd: it becomes readable when the process exits. True if it has.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], deadline)
        return bool(readable)
    finally:
        os.close(fd)


def processes_marked(marker: str) -> list[int]:
    """Pids of live processes whose environment holds ``LOOPPOOL_TEST_MARK=marker``.

    A test runs a command with that variable set: every process it starts
    inherits it, so whatever is still alive afterwards was left behind.
    """
    import psutil

    found = []
    needle = f"LOOPPOOL_TEST_MARK={marker}".encode()
    for proc in psutil.process_iter():
        try:
            with open(f"/proc/{proc.pid}/environ", "rb") as file:
                if needle in file.read().split(b"\0"):
                    found.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return found


def leftover_processes(marker: str, deadline: float = 10.0) -> list[int]:
    """Processes marked with ``marker`` still alive after ``deadline`` seconds each.

    A helper such as multiprocessing's resource tracker exits on its own once
    its parent has gone, a moment later: each marked process gets until the
    deadline to exit; those that do not are left-overs.
    """
    return [pid for pid in processes_marked(marker) if not process_is_gone(pid, deadline)]
