"""Workers with a poison message, for test_poison.py (a module of its own: spawn imports it)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import looppool

#: What a poison message is: it ends the worker process wherever it runs.
POISON = "poison"
EXIT_CODE = 3


class AsyncPoisoned(looppool.SafeWorker):
    """Replies with the message after a short await; ``"poison"`` ends the process."""

    async def process_message(self, message: Any) -> Any:
        if message == POISON:
            os._exit(EXIT_CODE)
        # Keep every message in flight for a moment, so that a worker holds
        # many of them when a poison message ends it.
        await asyncio.sleep(0.001)
        self.put_result(message)
        return message


class SyncPoisoned(looppool.SafeWorker):
    """The same with a plain ``def`` handler (it runs inline, never as a task)."""

    def process_message(self, message: Any) -> Any:
        if message == POISON:
            os._exit(EXIT_CODE)
        self.put_result(message)
        return message


class LatePoison(looppool.SafeWorker):
    """``"poison"`` ends the process after the others in its worker have returned."""

    async def process_message(self, message: Any) -> Any:
        if message == POISON:
            # Every other message of this worker returns meanwhile: their
            # replies must not be reported as unfinished when this dies.
            await asyncio.sleep(0.05)
            os._exit(EXIT_CODE)
        return message


class PlainPoisoned(AsyncPoisoned):
    """AsyncPoisoned as a plain ``looppool.Worker``: a death fails what it held."""

    safe = False
