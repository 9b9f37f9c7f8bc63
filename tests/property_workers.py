"""Workers for the property-based tests; a module of its own so that spawned workers import it."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import looppool


class Recorder(looppool.SafeWorker):
    """Reports every message it runs, with its worker number and pid; never kills itself.

    A message is ``(key, kind, delay)``: ``key`` identifies it in the test,
    ``delay`` (seconds) keeps it in flight for a while so that a kill can land
    while the worker holds it. Every message puts exactly one result,
    ``(key, number, pid)``, in the same loop step as its acknowledgement, so the
    parent receives both or neither. ``kind == "fail"`` raises after putting
    its result. ``kind == "die"`` is a poison message: after its delay it
    ends the worker process (``os._exit``) wherever it runs, putting nothing.
    The reply is ``("done", key, number, pid)``.
    """

    async def process_message(self, message: tuple[Any, str, float]) -> Any:
        key, kind, delay = message
        if delay:
            await asyncio.sleep(delay)
        if kind == "die":
            os._exit(9)
        pid = os.getpid()
        self.put_result((key, self.number, pid))
        if kind == "fail":
            raise ValueError(f"message {key!r} was told to fail")
        return ("done", key, self.number, pid)


class Holder(looppool.SafeWorker):
    """Holds ``("hold", tag)`` messages at a gate, first putting ``("holding", tag, pid)``.

    Any other message ``(kind, tag, ...)`` is replied to with its tag at once.
    """

    def __init__(self, gate: Any) -> None:
        self.gate = gate

    async def process_message(self, message: tuple[Any, ...]) -> Any:
        kind, tag = message[:2]
        if kind == "hold":
            self.put_result(("holding", tag, os.getpid()))
            await self.gate.wait()
        return tag
