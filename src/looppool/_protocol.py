"""The wire format between the parent and its workers.

Both directions carry *frames*: a 4-byte big-endian length, then a pickle of a
list of tuples, each tuple starting with an op code below. One frame carries
every item a side produced during one turn of its event loop, so a busy pool
pays one system call and one pickle per batch rather than per message.

Messages and results are pickled by whoever creates them (the caller of
``put`` in the parent, the caller of ``put_result`` in the worker) and travel
as ``bytes`` inside the frame, so a value that cannot be pickled fails at the
point of the mistake and never poisons a frame shared with other messages.

Only the pool's own processes write to these pipes (they are created by the
parent and inherited by, or passed to, its children), so unpickling a frame
never unpickles data from anywhere else.
"""

from __future__ import annotations

import os
import pickle
import struct
from typing import Any, Final

HEADER: Final = struct.Struct("!I")
PROTOCOL: Final = pickle.HIGHEST_PROTOCOL

# parent -> worker
# (OP_MSG, id, want_reply, payload, timeout, trace): timeout in seconds, or None.
# trace: None, or (carrier, delivery) when the caller had an OpenTelemetry span
# current: its W3C trace context as a dict, and which delivery of the message
# this is (1, then 2... after a worker holding it died). See _tracing.
OP_MSG: Final = 1
OP_STOP: Final = 2  # (OP_STOP, cancel)
OP_CANCEL: Final = 3  # (OP_CANCEL, id): cancel that message if it runs (its submit was cancelled)
OP_SKIP: Final = 4  # (OP_SKIP, id): barrier mode, a withdrawn message's place on the channel

# worker -> parent
EV_READY: Final = 10  # (EV_READY, pid)
EV_START_FAILED: Final = 11  # (EV_START_FAILED, reason, traceback)
EV_RESULT: Final = 12  # (EV_RESULT, payload)
EV_DONE: Final = 13  # (EV_DONE, id, status, payload)
EV_LOG: Final = 14  # (EV_LOG, record dict)
EV_TAKEN: Final = 15  # (EV_TAKEN, id): barrier mode, taken from the shared queue
EV_BLOCKED: Final = 16  # (EV_BLOCKED,): a blocked-loop episode began
EV_BYE: Final = 17  # (EV_BYE,): clean exit follows
EV_ALIVE: Final = 18  # (EV_ALIVE, rss): the loop turns (hang_timeout); rss in bytes, or 0
EV_STACK: Final = 19  # (EV_STACK, text): the loop has not turned for a while; where it is stuck
# Pool(worker_metrics=True): the worker's resource gauges, every metrics_interval
# (and once before EV_READY), as a {name: value} dict (see _monitor.MetricsForwarder).
EV_METRICS: Final = 20  # (EV_METRICS, gauges)
# A worker process's outbox folds runs of the two per-message events into one
# item each, so that a frame of a thousand messages carries two lists rather
# than two thousand tuples (less to pickle, unpickle and dispatch):
EV_RESULTS: Final = 21  # (EV_RESULTS, [payload, ...]): EV_RESULTs, in order
EV_ACKS: Final = 22  # (EV_ACKS, [id, ...]): EV_DONEs with status DONE_OK and payload None

# EV_DONE statuses
DONE_OK: Final = 0  # payload: pickled reply, or None when no reply was asked for
DONE_FAILED: Final = 1  # payload: None, or (pickled exception | None, type name, repr, traceback)
DONE_CANCELLED: Final = 2  # cancelled: a Worker pool's stop, or its submit() was cancelled
DONE_TIMED_OUT: Final = 3  # cancelled at its deadline; payload as for DONE_FAILED

PIPE_SIZE: Final = 1 << 20
# Bytes per non-blocking read: a 1 MiB read costs ~15 µs even when little is there.
READ_SIZE: Final = 1 << 16


def encode(items: Any) -> bytes:
    """Pickle ``items`` (a list of tuples between the pool's processes) into one frame."""
    body = pickle.dumps(items, PROTOCOL)
    return HEADER.pack(len(body)) + body


def enlarge_pipe(fd: int) -> None:
    """Grow a pipe's kernel buffer (Linux), so fewer writes block or split."""
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except (ImportError, AttributeError, OSError):
        # Not Linux, or above /proc/sys/fs/pipe-max-size: the default is correct, only smaller.
        pass


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write every byte to a blocking fd (a pipe write above PIPE_BUF may be partial)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def read_exactly(fd: int, size: int) -> bytes:
    """Read exactly ``size`` bytes from a blocking fd; EOFError if it ends first."""
    chunks: list[bytes] = []
    while size:
        chunk = os.read(fd, size)
        if not chunk:
            raise EOFError("the pipe closed in the middle of a frame")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


class FrameDecoder:
    """Splits a byte stream into frames (the parent side, fed by non-blocking reads)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[list[tuple[Any, ...]]]:
        """Add bytes read from the pipe; return the frames now complete, decoded."""
        buf = self._buf
        buf += data
        frames: list[list[tuple[Any, ...]]] = []
        start = 0
        size = len(buf)
        while size - start >= HEADER.size:
            (length,) = HEADER.unpack_from(buf, start)
            end = start + HEADER.size + length
            if end > size:
                break
            frames.append(pickle.loads(memoryview(buf)[start + HEADER.size : end]))
            start = end
        if start:
            del buf[:start]
        return frames

    def read(self, fd: int) -> list[list[tuple[Any, ...]]] | None:
        """Read what a non-blocking ``fd`` holds; the frames now complete, or None at its end.

        ``[]`` when nothing (or only part of a frame) was there; a read error
        counts as the end: the writer is gone, and how it went is learnt
        elsewhere (the process sentinel, the channel's STOP).
        """
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return []
        except OSError:
            return None
        return self.feed(data) if data else None
