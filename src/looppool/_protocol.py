"""The wire format between the parent and its workers.

Both directions carry *frames*: a header (the in-band pickle's length and the
number of out-of-band buffers, 4 bytes each, big-endian), each buffer's length
(8 bytes), the pickle of a list of tuples, each tuple starting with an op code
below, then the buffers' bytes. One frame carries
every item a side produced during one turn of its event loop, so a busy pool
pays one system call and one pickle per batch rather than per message.

Messages and results are pickled by whoever creates them (the caller of
``put`` in the parent, the caller of ``put_result`` in the worker) and travel
as ``bytes`` inside the frame, so a value that cannot be pickled fails at the
point of the mistake and never poisons a frame shared with other messages.

Large payloads (pickle protocol 5 out-of-band buffers of ``OOB_THRESHOLD``
bytes or more, see :func:`dumps`) travel as :class:`Payload`: the frame
carries their bytes after its pickle, written with ``os.writev`` from the
payload's own memory and read with ``os.readv`` straight into a ``bytearray``
made for each, so the pipe is the only copy on the way.

Only the pool's own processes write to these pipes (they are created by the
parent and inherited by, or passed to, its children), so unpickling a frame
never unpickles data from anywhere else.
"""

from __future__ import annotations

import collections
import itertools
import os
import pickle
import struct
from typing import Any, Final

#: A frame's header: the in-band pickle's length, the number of out-of-band buffers.
HEADER: Final = struct.Struct("!II")
#: One out-of-band buffer's length (after the header, one per buffer).
LENGTH: Final = struct.Struct("!Q")
#: Buffers (pickle protocol 5) of this many bytes or more travel out of band.
OOB_THRESHOLD: Final = 1 << 16
#: At most this many pieces per ``writev``/``readv`` (POSIX's IOV_MAX is >= 16).
IOV_MAX: Final = 64
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


class Payload:
    """A value pickled with its large buffers out of band: the pickle, and those buffers.

    Pickled into a frame, the buffers become out-of-band buffers of the frame
    (see :func:`encode`); pickled without a ``buffer_callback`` (barrier
    mode's shared queue, Ray) they are pickled in band, as any bytes are.
    """

    __slots__ = ("buffers", "data")

    def __init__(self, data: bytes, *buffers: Any) -> None:
        self.data = data
        self.buffers = buffers

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return (Payload, (self.data, *[pickle.PickleBuffer(b) for b in self.buffers]))

    def load(self) -> Any:
        """The value."""
        return pickle.loads(self.data, buffers=self.buffers)


class _Bytes:
    """A large ``bytes`` value, pickled out of band (the pickler keeps bytes in band)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return (_as_bytes, (pickle.PickleBuffer(self.data),))


class _Bytearray(_Bytes):
    """A large ``bytearray`` value, pickled out of band."""

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return (_as_bytearray, (pickle.PickleBuffer(self.data),))


class _View:
    """A ``memoryview`` value (which pickle refuses), pickled as its bytes, format and shape."""

    __slots__ = ("format", "shape", "view")

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.format = view.format
        self.shape = view.shape

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return (_as_memoryview, (pickle.PickleBuffer(self.view), self.format, self.shape))


def _as_bytes(buffer: Any) -> bytes:
    # Out of band, a read-only memoryview of the bytearray it was read into:
    # bytes cannot adopt that memory, so this is a copy.
    return buffer if type(buffer) is bytes else bytes(buffer)


def _as_bytearray(buffer: Any) -> bytearray:
    # Out of band, the very bytearray it was read into: adopted as it is.
    return buffer if type(buffer) is bytearray else bytearray(buffer)


def _as_memoryview(buffer: Any, fmt: str, shape: tuple[int, ...]) -> memoryview:
    view: Any = memoryview(buffer)  # Any: typeshed's cast() wants a literal format
    if view.format != fmt or view.shape != shape:
        view = view.cast("B").cast(fmt, shape)
    return memoryview(view)


#: Types whose values hold no buffer: pickled by the plain call.
_NO_BUFFERS: Final = frozenset({int, str, float, bool, type(None), complex})
#: Immutable values that travel as themselves, inside the frame's own pickle:
#: they always pickle, and cannot change after put(), so pickling them on
#: their own (and unpickling them on their own at the other end) would buy
#: nothing. (None is not one: a None payload means "no reply" on the wire.)
AS_IS: Final = frozenset({int, str, float, bool, complex})


def dumps(value: Any) -> Any:
    """Pickle a message, result or reply: bytes, or a :class:`Payload` if it holds large buffers.

    An ``int``, ``str``, ``float``, ``bool`` or ``complex`` (of those exact
    types) is returned as it is: it travels inside the frame's pickle.

    Buffers of ``OOB_THRESHOLD`` bytes or more (a large ``bytes``,
    ``bytearray`` or ``memoryview`` value, numpy arrays anywhere in it) are
    kept out of band. The value is snapshotted now, as a plain pickle would
    be: a buffer whose memory may change (a ``bytearray``, a numpy array) is
    copied once; a ``bytes`` object's memory cannot change and is not copied.
    """
    kind = type(value)
    if kind in AS_IS:
        return value
    if kind in _NO_BUFFERS:
        return pickle.dumps(value, PROTOCOL)  # the plain call: buffer_callback costs ~0.2 µs
    if kind is bytes or kind is bytearray:
        if len(value) < OOB_THRESHOLD:
            return pickle.dumps(value, PROTOCOL)
        value = _Bytes(value) if kind is bytes else _Bytearray(value)
    elif kind is memoryview and value.c_contiguous:
        value = _View(value)
    else:
        # Most values hold no large buffer: one plain pass finds out, cheaper
        # than collecting (a closure per call); one that does is pickled again.
        try:
            return pickle.dumps(value, PROTOCOL, buffer_callback=_in_band_if_small)
        except _LargeBuffer:
            pass
    buffers: list[Any] = []

    def keep(buffer: pickle.PickleBuffer) -> bool:
        if _in_band_if_small(buffer, None):
            return True
        # bytes cannot change, anything else may (even a read-only numpy view
        # of a writable array): snapshot it, as pickling in band would.
        raw = buffer.raw()
        buffers.append(raw if type(raw.obj) is bytes else bytearray(raw))
        return False

    data = pickle.dumps(value, PROTOCOL, buffer_callback=keep)
    return Payload(data, *buffers) if buffers else data


class _LargeBuffer(Exception):
    """A value holds a buffer to send out of band (see :func:`dumps`)."""


def _in_band_if_small(buffer: pickle.PickleBuffer, large: Any = _LargeBuffer) -> bool:
    # buffer_callback: True pickles the buffer in band. Small buffers are
    # cheaper in band than as a piece of every write and read on the way.
    try:
        raw = buffer.raw()
    except BufferError:  # not contiguous: only in band
        return True
    if raw.nbytes < OOB_THRESHOLD:
        return True
    if large is not None:
        raise large
    return False


def loads(payload: Any) -> Any:
    """Unpickle what :func:`dumps` made."""
    kind = type(payload)
    if kind is bytes:
        return pickle.loads(payload)
    if kind is Payload:
        return payload.load()
    return payload  # a value of AS_IS, as it was put


#: A frame as :func:`encode` makes it: its bytes, or its pieces (for ``os.writev``).
Frame = bytes | list[Any]


def encode(items: Any) -> Frame:
    """Pickle ``items`` (a list of tuples between the pool's processes) into one frame.

    ``bytes`` when nothing in it travels out of band; otherwise its pieces:
    the header with the buffers' lengths, the pickle, then each buffer (the
    payloads' own memory, not copied).
    """
    pieces: list[pickle.PickleBuffer] = []
    body = pickle.dumps(items, PROTOCOL, buffer_callback=pieces.append)
    if not pieces:
        return HEADER.pack(len(body), 0) + body
    views = [piece.raw() for piece in pieces]
    head = [HEADER.pack(len(body), len(views))]
    head += [LENGTH.pack(view.nbytes) for view in views]
    return [b"".join(head), body, *views]


def encode_each(items: list[Any]) -> Frame:
    """One frame per item, as the pieces of one run of frames."""
    pieces: list[Any] = []
    for item in items:
        frame = encode([item])
        if isinstance(frame, bytes):
            pieces.append(frame)
        else:
            pieces += frame
    return pieces


def encode_in_band(items: Any) -> bytes:
    """Like :func:`encode`, with every buffer in band (one ``bytes``, no buffers)."""
    body = pickle.dumps(items, PROTOCOL)
    return HEADER.pack(len(body), 0) + body


class Unsent:
    """What a non-blocking writer could not write yet: pieces of frames, in order.

    Small frames are gathered into one ``bytearray``; an out-of-band buffer
    stays a view of its payload's memory (not copied), written by ``writev``.
    """

    __slots__ = ("_queue", "nbytes")

    def __init__(self) -> None:
        self._queue: collections.deque[Any] = collections.deque()
        #: Bytes waiting.
        self.nbytes = 0

    def __bool__(self) -> bool:
        return self.nbytes > 0

    def add(self, frame: Frame, written: int = 0) -> None:
        """Queue ``frame`` but its first ``written`` bytes."""
        pieces = [frame] if isinstance(frame, bytes) else frame
        queue = self._queue
        for piece in pieces:
            view = memoryview(piece).cast("B")
            if written >= view.nbytes:
                written -= view.nbytes
                continue
            if written:
                view = view[written:]
                written = 0
            self.nbytes += view.nbytes
            if view.nbytes < OOB_THRESHOLD:
                # Gathered: a run of small frames is one piece of a writev.
                if queue and type(queue[-1]) is bytearray:
                    queue[-1] += view
                else:
                    queue.append(bytearray(view))
            else:
                queue.append(view)

    def write(self, fd: int) -> int:
        """Write what the non-blocking ``fd`` takes; the bytes written.

        BlockingIOError and other OSErrors (the reader is gone) pass.
        """
        queue = self._queue
        total = 0
        while queue:
            n = os.writev(fd, list(itertools.islice(queue, IOV_MAX)))
            total += n
            self.nbytes -= n
            while n:
                head = queue[0]
                size = len(head) if type(head) is bytearray else head.nbytes
                if n >= size:
                    n -= size
                    queue.popleft()
                elif type(head) is bytearray:
                    del head[:n]
                    n = 0
                else:
                    queue[0] = head[n:]
                    n = 0
        return total

    def clear(self) -> None:
        self._queue.clear()
        self.nbytes = 0


def write_frame(fd: int, frame: Frame) -> int:
    """Write what a non-blocking ``fd`` takes of ``frame`` now; the bytes written.

    BlockingIOError counts as 0; other OSErrors pass (the reader is gone).
    """
    try:
        if isinstance(frame, bytes):
            return os.write(fd, frame)
        return os.writev(fd, frame[:IOV_MAX])
    except BlockingIOError:
        return 0


def write_frame_all(fd: int, frame: Frame) -> None:
    """Write all of ``frame`` to a blocking fd."""
    for piece in [frame] if isinstance(frame, bytes) else frame:
        write_all(fd, piece)


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
    """Splits a byte stream into frames (fed by non-blocking reads).

    Small frames are read in chunks of ``READ_SIZE`` and split; a frame's
    out-of-band buffers are read with ``os.readv`` straight into a
    ``bytearray`` made for each (only what a chunk read past the pickle is
    copied into them).
    """

    __slots__ = ("_buf", "_buffers", "_data", "_targets")

    def __init__(self) -> None:
        self._buf = bytearray()
        # The frame whose buffers are being read: its pickle, its buffers,
        # and the parts of them still to fill (empty between such frames).
        self._data = b""
        self._buffers: list[bytearray] = []
        self._targets: list[memoryview] = []

    def _fill(self, data: Any, start: int) -> int:
        """Copy ``data[start:]`` into the buffers still to fill; the new start."""
        targets = self._targets
        end = len(data)
        # Released before returning: a bytearray with a view on it cannot shrink.
        with memoryview(data) as source:
            while targets and start < end:
                target = targets[0]
                n = min(target.nbytes, end - start)
                target[:n] = source[start : start + n]
                start += n
                if n == target.nbytes:
                    del targets[0]
                else:
                    targets[0] = target[n:]
        return start

    def _finish(self) -> list[tuple[Any, ...]]:
        frame: list[tuple[Any, ...]] = pickle.loads(self._data, buffers=self._buffers)
        self._data = b""
        self._buffers = []
        return frame

    def feed(self, data: bytes) -> list[list[tuple[Any, ...]]]:
        """Add bytes read from the pipe; return the frames now complete, decoded."""
        frames: list[list[tuple[Any, ...]]] = []
        if self._targets:
            used = self._fill(data, 0)
            if self._targets:
                return frames
            frames.append(self._finish())
            data = data[used:]
        buf = self._buf
        buf += data
        start = 0
        size = len(buf)
        while size - start >= HEADER.size:
            length, count = HEADER.unpack_from(buf, start)
            body = start + HEADER.size + count * LENGTH.size
            end = body + length
            if end > size:
                break
            if not count:
                frames.append(pickle.loads(memoryview(buf)[body:end]))
                start = end
                continue
            lengths = [n for (n,) in LENGTH.iter_unpack(buf[start + HEADER.size : body])]
            self._data = bytes(buf[body:end])
            self._buffers = [bytearray(n) for n in lengths]
            self._targets = [memoryview(b) for b in self._buffers if b]
            start = self._fill(buf, end)
            if self._targets:
                break  # the rest is read into the buffers directly
            frames.append(self._finish())
        if start:
            del buf[:start]
        return frames

    def read(self, fd: int) -> list[list[tuple[Any, ...]]] | None:
        """Read what a non-blocking ``fd`` holds; the frames now complete, or None at its end.

        ``[]`` when nothing (or only part of a frame) was there; a read error
        counts as the end: the writer is gone, and how it went is learnt
        elsewhere (the process sentinel, the channel's STOP).
        """
        targets = self._targets
        try:
            if targets:
                n = os.readv(fd, targets[:IOV_MAX])
            else:
                data = os.read(fd, READ_SIZE)
                return self.feed(data) if data else None
        except BlockingIOError:
            return []
        except OSError:
            return None
        if not n:
            return None
        while n:
            target = targets[0]
            if n >= target.nbytes:
                n -= target.nbytes
                del targets[0]
            else:
                targets[0] = target[n:]
                n = 0
        return [] if targets else [self._finish()]
