"""Workers for tests/test_large.py; a module of its own so that spawned workers can import it."""

from __future__ import annotations

import os
import socket
from typing import Any

import looppool


def pattern(size: int, seed: int = 0) -> bytes:
    """``size`` bytes that differ from one position to the next (a shifted copy would not match)."""
    block = bytes((i * 7 + seed) % 251 for i in range(251))
    return (block * (size // len(block) + 1))[:size]


class Large(looppool.SafeWorker):
    """Puts each message as a result and replies with it.

    ``"pid"``: replies with its pid. ``("make", n)``: replies with ``pattern(n)``.
    ``("block", path)``: blocks its loop (a plain blocking read, so the
    worker reads nothing from its pipe meanwhile) until the test's latch at
    ``path`` answers.
    """

    def process_message(self, message: Any) -> Any:
        if type(message) is str and message == "pid":
            return os.getpid()
        if type(message) is tuple and message[0] == "make":
            return pattern(message[1])
        if type(message) is tuple and message[0] == "block":
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(message[1])
                sock.recv(1)
            return "unblocked"
        self.put_result(message)
        return message
