"""Pipes the parent writes from its event loop, and barrier mode's shared queue.

The parent never blocks on a worker: it writes what the pipe takes and keeps
the rest until the loop says the pipe is writable again (``add_writer``), so a
slow or stuck worker holds back only its own messages.

Barrier mode's shared queue is one such pipe with several readers. It replaces
``multiprocessing.Queue``, whose feeder thread is what made it unsafe here: a
generation that ended with more backlog than the pipe held left the feeder
blocked in ``write()`` for ever (a leaked thread and its buffer per restart),
and closing the queue's reader from the loop to free it raced the feeder's own
close (EBADF). Written from the loop, the queue needs no thread: ending a
generation just drops what was not written — those messages are still in the
parent's ledger and are sent again to the next generation.
"""

from __future__ import annotations

import asyncio
import os
import pickle
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from . import _protocol as P

#: A shared-queue item: ``(id, want_reply, payload, needs, timeout, trace)``.
SharedItem = tuple[int, bool, Any, tuple[int, ...], float | None, Any]


class PipeWriter:
    """Writes frames to a pipe from the event loop without ever blocking it."""

    __slots__ = ("_fd", "_loop", "_out")

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        os.set_blocking(fd, False)
        self._loop = loop
        self._fd = fd
        self._out = P.Unsent()

    def write(self, data: P.Frame) -> bool:
        """Write the frame ``data`` now, or after what waits; False if the reader is gone."""
        if self._fd < 0:
            return False
        if self._out:
            # Something waits already: order matters, so this waits behind it.
            self._out.add(data)
            return True
        try:
            written = P.write_frame(self._fd, data)
        except OSError:
            return False  # EPIPE: every reader is gone (the pool learns why elsewhere)
        if type(data) is not bytes or written < len(data):
            # A frame of pieces (out-of-band buffers) was written in part, or
            # not: what is left waits (add() skips what was written).
            self._out.add(data, written)
            if self._out:
                self._loop.add_writer(self._fd, self._on_writable)
        return True

    def _on_writable(self) -> None:
        try:
            self._out.write(self._fd)
        except BlockingIOError:
            return
        except OSError:
            self._out.clear()  # the reader is gone: nobody will read the rest
        if not self._out:
            self._loop.remove_writer(self._fd)

    def close(self) -> None:
        """Stop writing and drop what waits (the fd belongs to the caller)."""
        if self._fd >= 0 and self._out:
            self._loop.remove_writer(self._fd)
        self._fd = -1
        self._out = P.Unsent()


@dataclass(frozen=True)
class SharedReader:
    """A worker's end of the shared queue: readers take whole frames in turn.

    A reader killed while holding the lock (or mid-frame) blocks every other
    reader for ever; that is fine here because any death in barrier mode
    replaces the whole generation, queue and lock included.
    """

    conn: Connection
    lock: Any  # multiprocessing.Lock

    def get(self) -> SharedItem:
        """Block until a message is there; ``(id, want_reply, payload, needs, timeout, trace)``."""
        fd = self.conn.fileno()
        with self.lock:
            # Exact reads, never buffered: bytes read ahead would belong to
            # the next reader's message.
            # Always one pickle, no out-of-band buffers (see SharedQueue.put).
            length, _ = P.HEADER.unpack(P.read_exactly(fd, P.HEADER.size))
            body = P.read_exactly(fd, length)
        item: SharedItem = pickle.loads(body)
        return item


class SharedQueue:
    """Barrier mode's shared queue, parent side: one pipe, the parent its only writer."""

    def __init__(self, ctx: Any, loop: asyncio.AbstractEventLoop) -> None:
        reader, writer = ctx.Pipe(duplex=False)
        P.enlarge_pipe(writer.fileno())
        self.reader = SharedReader(reader, ctx.Lock())
        # The parent keeps the read end open while the generation lives, so a
        # write while every worker is dead waits in the pipe instead of failing.
        self._writer_conn: Connection = writer
        self._writer = PipeWriter(loop, writer.fileno())

    def put(
        self,
        mid: int,
        want_reply: bool,
        payload: Any,
        needs: tuple[int, ...],
        timeout: float | None,
        trace: Any = None,
    ) -> None:
        """Queue one message (already pickled by the caller).

        ``needs[k]``: how many messages worker k must have read from its own
        channel before it may start this one (see ``_child._Runtime._on_shared``);
        ``timeout``: its deadline in seconds, or None; ``trace``: see OP_MSG.
        """
        # In band: a reader takes a frame under a lock with blocking exact
        # reads; a large payload's buffers are pickled into it (a copy this
        # simple path accepts), so each frame is one pickle.
        self._writer.write(P.encode_in_band((mid, want_reply, payload, needs, timeout, trace)))

    def close(self) -> None:
        """End this queue: what was not written is dropped; both parent ends are closed."""
        self._writer.close()
        self._writer_conn.close()
        self.reader.conn.close()
