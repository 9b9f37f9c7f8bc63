"""Worker classes for the tests; a module of its own so that spawned workers can import it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from typing import Any

import looppool


class Echo(looppool.SafeWorker):
    """Puts (its number, the message) as a result and replies with the message."""

    async def process_message(self, message: Any) -> Any:
        self.put_result((self.number, message))
        return message


class SyncEcho(looppool.SafeWorker):
    """Echo with plain (non-async) hooks."""

    def initialise(self) -> None:
        self.prefix = "sync"

    def process_message(self, message: Any) -> Any:
        self.put_result((self.number, message))
        return (self.prefix, message)


class Doubler(looppool.Worker):
    """A plain Worker that replies with twice the message."""

    def process_message(self, message: int) -> int:
        return message * 2


class Scaled(looppool.SafeWorker):
    """A worker whose constructor takes an argument (built with functools.partial)."""

    def __init__(self, factor: int) -> None:
        self.factor = factor

    async def process_message(self, message: int) -> int:
        return message * self.factor


class Raising(looppool.SafeWorker):
    """Raises for messages that say so, echoes the others."""

    async def process_message(self, message: Any) -> Any:
        if message == "raise":
            raise ValueError(f"worker {self.number} was told to raise")
        if message == "unpicklable-exception":
            raise UnpicklableError(threading.Lock())
        if message == "unpicklable-result":
            self.put_result(threading.Lock())
        if message == "unpicklable-reply":
            return threading.Lock()
        self.put_result((self.number, message))
        return message


class UnpicklableError(Exception):
    """An exception carrying a lock: it cannot be pickled."""


class FailingInit(looppool.SafeWorker):
    """initialise() raises in worker 1."""

    def initialise(self) -> None:
        if self.number == 1:
            raise RuntimeError("cannot open the database")

    def process_message(self, message: Any) -> Any:
        return message


class Gated(looppool.SafeWorker):
    """Holds "hold" messages until a multiprocessing.Event opens; reports concurrency."""

    def __init__(self, gate: Any) -> None:
        self.gate = gate
        self.running = 0
        self.peak = 0

    async def process_message(self, message: Any) -> Any:
        if message == "peak":
            return self.peak
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            if message == "hold-report":
                self.put_result((self.number, "holding"))
            if message in ("hold", "hold-report"):
                # The gate is a multiprocessing.Event: wait for it in a thread
                # (blocking on it, not polling), so the loop stays free.
                await asyncio.get_running_loop().run_in_executor(None, self.gate.wait)
            self.put_result((self.number, message))
            return message
        finally:
            self.running -= 1


class Cancellable(looppool.Worker):
    """A Worker whose "hang" messages wait forever; reports cancellation as a result."""

    async def process_message(self, message: Any) -> Any:
        if message == "hang":
            self.put_result((self.number, "started"))
            try:
                await asyncio.Event().wait()
            finally:
                self.put_result((self.number, "cancelled"))
        self.put_result((self.number, message))
        return message


class SafeSlow(looppool.SafeWorker):
    """A SafeWorker that yields to its loop a few times per message."""

    async def process_message(self, message: Any) -> Any:
        for _ in range(3):
            await asyncio.sleep(0)
        self.put_result((self.number, message))
        return message


class Info(looppool.SafeWorker):
    """Replies with facts about the worker process."""

    async def process_message(self, message: Any) -> Any:
        loop = asyncio.get_running_loop()
        if message == "loop":
            return type(loop).__module__
        if message == "pid":
            return os.getpid()
        if message == "signals":
            return (
                signal.getsignal(signal.SIGINT) == signal.SIG_IGN,
                signal.getsignal(signal.SIGTERM) == signal.SIG_IGN,
            )
        if message == "log":
            logging.getLogger("tests.worker").warning("hello from worker %d", self.number)
            return None
        if message == "log-error":
            try:
                raise KeyError("missing")
            except KeyError:
                logging.getLogger("tests.worker").exception("it failed in %d", self.number)
            return None
        return message


class Stateful(looppool.SafeWorker):
    """Keeps a table updated by ("set", value) messages; replies with its table."""

    def initialise(self) -> None:
        self.table: list[Any] = []

    def process_message(self, message: Any) -> Any:
        if isinstance(message, tuple) and message[0] == "set":
            self.table.append(message[1])
            self.put_result((self.number, message[1]))
            return None
        return list(self.table)


class Finalising(looppool.SafeWorker):
    """Puts a result from finalise(), to show that it runs at stop."""

    async def process_message(self, message: Any) -> Any:
        return message

    async def finalise(self) -> None:
        self.put_result((self.number, "finalised"))


class NotAWorker:
    """A class that is not a looppool.Worker."""


def make_not_a_worker() -> Any:
    """A factory returning something that is not a Worker."""
    return NotAWorker()


class Gate:
    """A latch the test opens; workers wait on it over a Unix socket.

    Unlike a multiprocessing.Event, it survives a waiter that is killed: a
    multiprocessing Condition's notify_all() waits for every sleeper to wake,
    so setting an Event whose waiter died hangs the setter for ever.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self._open = False
        self._writers: list[asyncio.StreamWriter] = []

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    async def wait(self) -> None:
        """In a worker: return once the test opens the gate."""
        reader, writer = await asyncio.open_unix_connection(self.path)
        try:
            await reader.read(1)
        finally:
            writer.close()

    async def serve(self) -> None:
        """In the test: start answering waiters."""
        self._server = await asyncio.start_unix_server(self._on_waiter, self.path)

    async def _on_waiter(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open:
            writer.write(b"!")
        self._writers.append(writer)

    def open(self) -> None:
        """In the test: release every waiter, now and later."""
        self._open = True
        for writer in self._writers:
            if not writer.is_closing():
                writer.write(b"!")

    async def close(self) -> None:
        """In the test: stop the server."""
        # Connections first: since Python 3.12 the server's wait_closed()
        # waits for every connection it accepted to close.
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in self._writers:
            # The socket closes a loop turn after close(); a test counting fds looks at once.
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class Fragile(looppool.SafeWorker):
    """A SafeWorker that can be told to die in several ways; holds "hold" messages at a gate."""

    def __init__(self, gate: Any = None, marker: str | None = None) -> None:
        self.gate = gate
        self.marker = marker

    def initialise(self) -> None:
        # The crash-loop test creates the marker after the first start, so
        # every replacement fails while the first generation started fine.
        if self.marker is not None and os.path.exists(self.marker):
            raise RuntimeError("replacement refuses to start")

    async def process_message(self, message: Any) -> Any:
        if message == "pid":
            return os.getpid()
        if message == "exit":
            os._exit(3)
        if message == "segv":
            import ctypes

            ctypes.string_at(0)
        if message == "hold":
            self.put_result((self.number, "holding", os.getpid()))
            await self.gate.wait()
        if message == "hang":
            self.put_result((self.number, "hanging", os.getpid()))
            await asyncio.Event().wait()
        self.put_result((self.number, message))
        return message


class FragileWorker(Fragile, looppool.Worker):
    """Fragile with plain Worker semantics: a death fails what it held."""

    safe = False


class FailsEverywhere(looppool.SafeWorker):
    """initialise() raises in every worker."""

    def initialise(self) -> None:
        raise RuntimeError(f"worker {self.number} cannot start")


class DiesInInit(looppool.SafeWorker):
    """Exits abruptly inside initialise()."""

    def initialise(self) -> None:
        os._exit(4)


class StateHolder(looppool.SafeWorker):
    """The seed's stateful worker: ``("set", v)`` sets its state, ``("get",)`` reports it."""

    def initialise(self) -> None:
        self.state: Any = None

    def process_message(self, message: Any) -> Any:
        if message[0] == "set":
            self.state = message[1]
            return None
        self.put_result((self.number, self.state))
        return None


class Blob:
    """Megabytes in an object a weak reference can watch (a bytearray cannot have one)."""

    def __init__(self, megabytes: int) -> None:
        self.data = bytearray(megabytes << 20)


class Big(looppool.SafeWorker):
    """Replies, and puts a result, of ``message`` megabytes (a Blob)."""

    def process_message(self, message: int) -> Any:
        self.put_result(Blob(message))
        return Blob(message)


class Label(str):
    """A str subclass: it must arrive as itself, not as a plain str."""


class Mirror(looppool.SafeWorker):
    """Puts the message itself as a result, and replies with it."""

    async def process_message(self, message: Any) -> Any:
        self.put_result(message)
        return message
