"""Functions for the FunctionWorker tests; a module of its own so that spawned workers import it.

Also :class:`Turnstile`, which holds calls in the workers until the test lets
each one through, and counts how many wait at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Awaitable
from typing import Any, NoReturn

import looppool


def square(x: int) -> int:
    return x * x


async def async_square(x: int) -> int:
    await asyncio.sleep(0)  # a real suspension: it runs as a task
    return x * x


def add(x: int, y: int, *, z: int = 0) -> int:
    return x + y + z


async def async_add(x: int, y: int, *, z: int = 0) -> int:
    await asyncio.sleep(0)
    return x + y + z


def returns_awaitable(x: int) -> Awaitable[int]:
    """A plain function returning an awaitable: the worker awaits it."""
    return async_square(x)


def fail(text: str) -> NoReturn:
    raise ValueError(text)


async def async_fail(text: str) -> NoReturn:
    await asyncio.sleep(0)
    raise ValueError(text)


def fail_on(bad: int, x: int) -> int:
    """``x``, except for ``bad``: ValueError."""
    if x == bad:
        raise ValueError(f"{x} is bad")
    return x


class UnpicklableError(Exception):
    """An exception whose argument cannot be pickled."""

    def __init__(self, lock: Any) -> None:
        super().__init__(lock)
        self.lock = lock


def raise_unpicklable() -> NoReturn:
    raise UnpicklableError(threading.Lock())


def unpicklable_result() -> Any:
    return threading.Lock()


def die() -> NoReturn:
    """End the worker process abruptly."""
    os._exit(3)


async def hold(turnstile: Turnstile, key: int) -> int:
    """Wait at ``turnstile`` until the test lets ``key`` through; return ``key``."""
    await turnstile.wait(key)
    return key


async def hold_if(turnstile: Turnstile, held: bool, key: int) -> int:
    """``hold`` for ``held`` keys; return the others at once."""
    if held:
        await turnstile.wait(key)
    return key


#: Set by Configured.initialise() in the worker; read by configured().
SETTING: str | None = None


class Configured(looppool.FunctionWorker):
    """A FunctionWorker subclass with an initialise(), as an executor's initializer."""

    def __init__(self, setting: str = "default") -> None:
        self.setting = setting

    def initialise(self) -> None:
        global SETTING
        SETTING = f"{self.setting} in worker {self.number}"

    def finalise(self) -> None:
        global SETTING
        SETTING = None


def configured() -> str | None:
    return SETTING


class Turnstile:
    """Holds calls at a Unix socket until the test lets each through, by key.

    In a worker, :meth:`wait` connects, sends its key and waits for one byte.
    In the test, :meth:`serve` answers; :meth:`arrivals` waits until so many
    calls arrived, :meth:`release` lets one key through, :meth:`open` every
    one, now and later. ``waiting`` and ``peak`` count the calls held now and
    at most at once. Pickled, it is only its path.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.arrived: list[int] = []
        self.peak = 0
        self._waiting: dict[int, asyncio.StreamWriter] = {}
        self._writers: list[asyncio.StreamWriter] = []
        self._arrival_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._open = False
        self._server: asyncio.AbstractServer | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    async def wait(self, key: int) -> None:
        """In a worker: return once the test lets ``key`` through."""
        reader, writer = await asyncio.open_unix_connection(self.path)
        try:
            writer.write(f"{key}\n".encode())
            await writer.drain()
            await reader.readexactly(1)
        finally:
            writer.close()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def serve(self) -> None:
        """In the test: start answering calls."""
        self._server = await asyncio.start_unix_server(self._on_arrival, self.path)

    async def _on_arrival(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        line = await reader.readline()
        if not line:
            return  # the call was cancelled (in the worker) before it sent its key
        key = int(line)
        self.arrived.append(key)
        if self._open:
            writer.write(b"!")
        else:
            self._waiting[key] = writer
            self.peak = max(self.peak, len(self._waiting))
        for count, fut in self._arrival_waiters:
            if len(self.arrived) >= count and not fut.done():
                fut.set_result(None)

    async def arrivals(self, count: int) -> list[int]:
        """In the test: wait until ``count`` calls have arrived; return their keys in order."""
        if len(self.arrived) < count:
            fut = asyncio.get_running_loop().create_future()
            self._arrival_waiters.append((count, fut))
            async with asyncio.timeout(30):
                await fut
        return self.arrived[:count]

    def release(self, key: int) -> None:
        """In the test: let the call waiting with ``key`` through."""
        self._waiting.pop(key).write(b"!")

    def open(self) -> None:
        """In the test: let every call through, now and later."""
        self._open = True
        for writer in self._waiting.values():
            writer.write(b"!")
        self._waiting.clear()

    async def close(self) -> None:
        """In the test: stop the server."""
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in self._writers:
            with contextlib.suppress(OSError):
                await writer.wait_closed()
