"""Workers for test_deadlines.py and test_cancel.py (a module of their own: spawn imports it)."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import time
from typing import Any

import looppool


class Slow(looppool.SafeWorker):
    """Messages are ``(kind, arg)``; each kind does something slow, or fails to end.

    * ``("sleep", s)`` awaits ``s`` seconds; its ``finally`` puts ``("finally", s)``;
    * ``("stubborn", s)`` awaits ``s`` seconds, swallows a cancellation, replies "late";
    * ``("block", s)`` blocks the loop with ``time.sleep(s)``;
    * ``("echo", x)`` replies ``x`` (and puts ``("echo", x, pid)``);
    * ``("pid", _)`` replies with the process id;
    * ``("grow", n)`` keeps ``n`` more bytes for the life of the worker (after a short await);
    * ``("results", (n, size))`` puts ``n`` results of ``size`` bytes with put_result_wait.
    """

    def initialise(self) -> None:
        self.hoard: list[bytearray] = []

    async def process_message(self, message: tuple[str, Any]) -> Any:
        kind, arg = message
        if kind == "sleep":
            try:
                await asyncio.sleep(arg)
            finally:
                self.put_result(("finally", arg))
            return "slept"
        if kind == "stubborn":
            with contextlib.suppress(asyncio.CancelledError):  # it ignores its deadline
                await asyncio.sleep(arg)
            return "late"
        if kind == "block":
            time.sleep(arg)  # noqa: ASYNC251 (blocking the loop is the point)
            return "blocked"
        if kind == "echo":
            self.put_result(("echo", arg, os.getpid()))
            return arg
        if kind == "pid":
            return os.getpid()
        if kind == "grow":
            await asyncio.sleep(0.2)
            self.hoard.append(bytearray(arg))
            return len(self.hoard)
        if kind == "results":
            count, size = arg
            for i in range(count):
                await self.put_result_wait((i, b"x" * size))
            return count
        raise ValueError(f"unknown kind {kind!r}")


class SlowFinalise(Slow):
    """Slow, with a ``finalise()`` that takes 1.5 s (awaiting) and then logs "finalised"."""

    async def finalise(self) -> None:
        await asyncio.sleep(1.5)
        logging.getLogger("tests.limit_workers").warning("finalised")


class SlowWorker(Slow, looppool.Worker):
    """Slow as a plain ``looppool.Worker``."""

    safe = False


class SlowStart(Slow):
    """Slow, whose ``initialise()`` hangs once for each file ``{base}.{i}`` it can claim.

    ``how``: ``"await"`` waits for ever (the loop turns), ``"block"`` blocks
    the loop with ``time.sleep``, a number of seconds makes it slow, not
    stuck (it awaits that long). Claiming is removing the file, which one
    process wins, so ``n`` files make exactly ``n`` starts hang, whichever
    workers they are.
    """

    def __init__(self, base: str, how: str | float = "await") -> None:
        self.base = base
        self.how = how

    async def initialise(self) -> None:
        super().initialise()
        for path in sorted(glob.glob(f"{glob.escape(self.base)}.*")):
            try:
                os.remove(path)
            except FileNotFoundError:
                continue  # another worker claimed it first
            # Forwarded to the parent's logging: a test can wait for this start.
            logging.getLogger("tests.limit_workers").warning("initialise() held by %s", path)
            if isinstance(self.how, float):
                await asyncio.sleep(self.how)
                return
            if self.how == "block":
                time.sleep(3600)  # noqa: ASYNC251 (a loop blocked in initialise is the point)
            await asyncio.Event().wait()  # never set: initialise() awaits for ever


def hang_starts(base: str, count: int) -> None:
    """Make the next ``count`` starts of a SlowStart(base) pool hang in initialise()."""
    for i in range(count):
        with open(f"{base}.{i}", "w"):
            pass


class SlowStartWorker(SlowStart, looppool.Worker):
    """SlowStart as a plain ``looppool.Worker``."""

    safe = False
