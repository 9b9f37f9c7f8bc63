"""Worker classes for the RayPool tests; a module of its own so that Ray actors can import it.

test_ray.py puts this directory on the actors' ``PYTHONPATH`` (a job-wide
``runtime_env``), as a user would install their worker module on every node.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any

import looppool
from pool_workers import Cancellable as Cancellable

# Workers whose behaviour is the same under Ray as under Pool are shared.
from pool_workers import FailingInit as FailingInit
from pool_workers import Finalising as Finalising
from pool_workers import Gate as Gate
from pool_workers import Scaled as Scaled
from pool_workers import Stateful as Stateful
from pool_workers import SyncEcho as SyncEcho
from pool_workers import UnpicklableError as UnpicklableError


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


class Echo(looppool.SafeWorker):
    """Puts (its number, the message) as a result and replies with the message."""

    async def process_message(self, message: Any) -> Any:
        if message == "pid":
            return os.getpid()
        self.put_result((self.number, message))
        return message


class NotAWorker:
    """A class that is not a looppool.Worker."""


def make_not_a_worker() -> Any:
    """A factory returning something that is not a Worker."""
    return NotAWorker()


class Logging(looppool.SafeWorker):
    """Logs from inside the actor, and prints to its stdout."""

    async def process_message(self, message: Any) -> Any:
        if message == "log":
            logging.getLogger("tests.ray_worker").warning("hello from worker %d", self.number)
        elif message == "log-error":
            try:
                raise KeyError("missing")
            except KeyError:
                logging.getLogger("tests.ray_worker").exception("it failed in %d", self.number)
        elif message == "raise":
            raise ValueError("nobody awaits this one")
        return message


class Gated(looppool.SafeWorker):
    """Holds ("hold", x) messages at a gate, saying so first; reports its peak concurrency."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.running = 0
        self.peak = 0

    async def process_message(self, message: Any) -> Any:
        if message == "pid":
            return os.getpid()
        if message == "peak":
            return self.peak
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            if isinstance(message, tuple) and message[0] == "hold":
                self.put_result((self.number, "holding", message[1]))
                await self.gate.wait()
            self.put_result((self.number, "done", message))
            return message
        finally:
            self.running -= 1


class GatedWorker(looppool.Worker):
    """Gated as a plain Worker: its messages are not re-delivered after a death."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    async def process_message(self, message: Any) -> Any:
        if message == "hold":
            self.put_result((self.number, "holding"))
            await self.gate.wait()
        return message


class Stuck(looppool.SafeWorker):
    """A SafeWorker whose "hang" messages never finish: only a stop timeout ends them."""

    async def process_message(self, message: Any) -> Any:
        if message == "hang":
            self.put_result((self.number, "hanging"))
            await asyncio.Event().wait()
        return message


class Ordered(looppool.SafeWorker):
    """Records the order in which its messages start."""

    def initialise(self) -> None:
        self.seen: list[Any] = []

    def process_message(self, message: Any) -> Any:
        if message == "seen":
            return list(self.seen)
        self.seen.append(message)
        return None


class Fragile(looppool.SafeWorker):
    """Dies (os._exit) on "exit"; refuses to start once a marker file exists."""

    def __init__(self, marker: str | None = None) -> None:
        self.marker = marker

    def initialise(self) -> None:
        # The crash-loop test creates the marker after the first start, so
        # every replacement fails while the first generation started fine.
        if self.marker is not None and os.path.exists(self.marker):
            raise RuntimeError("replacement refuses to start")

    def process_message(self, message: Any) -> Any:
        if message == "exit":
            os._exit(3)
        return message


class Blocking(looppool.SafeWorker):
    """Echoes messages; ("block", seconds) blocks the actor's event loop that long."""

    def process_message(self, message: Any) -> Any:
        if isinstance(message, tuple) and message[0] == "block":
            time.sleep(message[1])  # blocks the actor's loop on purpose
        return message
