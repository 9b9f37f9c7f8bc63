"""``limit-oob``: the floor for large payloads (W5), pickle protocol 5 out of band.

The :mod:`._limit` pool, for messages of megabytes::

    parent (asyncio)                                        child k (asyncio or uvloop)
    put(obj) ─► pickle.dumps((id, obj), 5, buffer_callback) ─► os.writev(header,
                 the buffers are kept, not copied                 pickle, *buffers)
                                                              ─► os.readv straight into one
                                                                 bytearray per buffer
                                                              ─► pickle.loads(.., buffers=)
    on_result ◄── the same, back ◄──────────────────────────── handler: one task per message

* A frame is a header (the pickle's length and the number of buffers), the
  length of each buffer, the pickle, then the buffers' bytes. The sender
  hands the header, the pickle and memoryviews of the payload's own memory
  to ``os.writev``; the receiver ``os.readv``\\ s the pickle and each buffer
  into a ``bytearray`` made for it. So the payload is copied by the pipe
  (into the kernel and out) and by nothing else.
* Which objects go out of band: numpy arrays by their own protocol-5
  reduction (unpickled with ``numpy.frombuffer`` over the received
  ``bytearray``: no copy). ``bytes`` and ``bytearray`` are always pickled in
  band by the pickler (it does not ask ``reducer_override`` about them), so a
  message that *is* one of them is wrapped to go out of band: a
  ``bytearray`` comes back as the received ``bytearray`` itself (no copy), a
  ``bytes`` as a copy of it (``bytes`` is immutable: it cannot adopt memory
  that was read into). Anything else is pickled as protocol 5 pickles it.
* The pipes are the default size (64 KiB on Linux); nothing polls: the
  loops wait for the pipes in epoll (``add_reader``/``add_writer``).
* As in :mod:`._limit`: no supervision, fairness, back-pressure or error
  routing, and the children are spawned.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import itertools
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import struct
from collections.abc import Callable
from typing import Any

from ._handlers import Handler
from ._limit import START_TIMEOUT, STOP_TIMEOUT, resolve, wait_exit

__all__ = ["OobPool", "dumps", "loads"]

#: A frame's header: the pickle's length, the number of out-of-band buffers.
_HEAD = struct.Struct("!QI")
#: One buffer's length, after the header.
_LENGTH = struct.Struct("!Q")
#: At most this many pieces per ``writev``/``readv`` (POSIX's IOV_MAX is ≥ 16;
#: Linux's 1024).
_IOV_MAX = 512
#: The message id of the ready frame each child sends first.
_READY = -1


# ---------------------------------------------------------------- pickling


class _BytesOut:
    """A ``bytes`` message, pickled as an out-of-band buffer."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return (_as_bytes, (pickle.PickleBuffer(self.data),))


class _BytearrayOut:
    """A ``bytearray`` message, pickled as an out-of-band buffer."""

    __slots__ = ("data",)

    def __init__(self, data: bytearray) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return (_as_bytearray, (pickle.PickleBuffer(self.data),))


def _as_bytes(buffer: Any) -> bytes:
    # A read-only buffer arrives as a read-only memoryview of the bytearray
    # it was read into; bytes must copy it.
    return bytes(buffer)


def _as_bytearray(buffer: Any) -> bytearray:
    # A writable buffer arrives as the very object given to loads(): the
    # bytearray it was read into, adopted as it is.
    if type(buffer) is bytearray:
        return buffer
    return bytearray(buffer)  # pickled in band (a reader that gave no buffers)


def dumps(obj: Any) -> tuple[bytes, list[memoryview]]:
    """Pickle ``obj`` (protocol 5): the pickle, and the out-of-band buffers' memory."""
    if type(obj) is tuple and len(obj) == 2:
        mid, value = obj
        if type(value) is bytes:
            obj = (mid, _BytesOut(value))
        elif type(value) is bytearray:
            obj = (mid, _BytearrayOut(value))
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return data, [b.raw() for b in buffers]


def loads(data: bytes | bytearray, buffers: list[bytearray]) -> Any:
    """Unpickle what :func:`dumps` made, its buffers read into ``buffers``."""
    return pickle.loads(data, buffers=buffers)


def _frame(obj: Any) -> list[Any]:
    """The pieces of one frame, for ``os.writev``."""
    data, buffers = dumps(obj)
    head = [_HEAD.pack(len(data), len(buffers))]
    head += [_LENGTH.pack(b.nbytes) for b in buffers]
    return [b"".join(head), data, *buffers]


# ------------------------------------------------------------ the two ends


class _Sender:
    """Writes frames to a non-blocking pipe, from the loop, without copying them."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        os.set_blocking(fd, False)
        self._loop = loop
        self._fd = fd
        self._queue: collections.deque[memoryview] = collections.deque()
        self._closing = False
        self.closed: asyncio.Future[None] = loop.create_future()

    def send(self, obj: Any) -> None:
        """Queue one frame; write what the pipe takes now, the rest when it has room."""
        idle = not self._queue
        views = (memoryview(piece).cast("B") for piece in _frame(obj))
        # An empty piece (an empty buffer) would make writev return 0 for ever.
        self._queue.extend(view for view in views if view.nbytes)
        if idle:
            self._write()
            if self._queue:
                self._loop.add_writer(self._fd, self._write_more)

    def _write(self) -> None:
        queue = self._queue
        while queue:
            try:
                n = os.writev(self._fd, list(itertools.islice(queue, _IOV_MAX)))
            except BlockingIOError:
                return
            except OSError:  # the reader is gone (EPIPE): nobody will read the rest
                queue.clear()
                return
            while n:
                head = queue[0]
                if n >= head.nbytes:
                    n -= head.nbytes
                    queue.popleft()
                else:
                    queue[0] = head[n:]
                    n = 0

    def _write_more(self) -> None:
        self._write()
        if not self._queue:
            self._loop.remove_writer(self._fd)
            if self._closing:
                self._close_now()

    def close(self) -> None:
        """Close the pipe once everything queued is written."""
        self._closing = True
        if not self._queue:
            self._close_now()

    def abort(self) -> None:
        """Close the pipe now, dropping what is not written; idempotent."""
        if self._queue:
            self._loop.remove_writer(self._fd)
            self._queue.clear()
        self._close_now()

    def _close_now(self) -> None:
        if not self.closed.done():
            os.close(self._fd)
            self.closed.set_result(None)


class _Receiver:
    """Reads frames from a non-blocking pipe straight into their buffers."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        on_message: Callable[[Any], None],
        on_eof: Callable[[], None],
    ) -> None:
        os.set_blocking(fd, False)
        self._loop = loop
        self._fd = fd
        self._on_message = on_message
        self._on_eof = on_eof
        self._targets: list[memoryview] = []
        self._next: Callable[[], None] = self._want_head
        self._head = bytearray(_HEAD.size)
        self._lengths = bytearray()
        self._data = bytearray()
        self._buffers: list[bytearray] = []
        self._want_head()
        loop.add_reader(fd, self._read)

    def _want_head(self) -> None:
        self._targets = [memoryview(self._head)]
        self._next = self._got_head

    def _got_head(self) -> None:
        size, count = _HEAD.unpack(self._head)
        self._data = bytearray(size)
        if count:
            self._lengths = bytearray(count * _LENGTH.size)
            self._targets = [memoryview(self._lengths)]
            self._next = self._got_lengths
        else:
            self._buffers = []
            self._targets = [memoryview(self._data)] if size else []
            self._next = self._got_frame

    def _got_lengths(self) -> None:
        lengths = [n for (n,) in _LENGTH.iter_unpack(self._lengths)]
        self._buffers = [bytearray(n) for n in lengths]
        self._targets = [memoryview(b) for b in [self._data, *self._buffers] if len(b)]
        self._next = self._got_frame

    def _got_frame(self) -> None:
        message = loads(self._data, self._buffers)
        self._data, self._buffers = bytearray(), []
        self._want_head()
        self._on_message(message)

    def _read(self) -> None:
        targets = self._targets
        while True:
            if not targets:  # an empty pickle or buffer: nothing to read
                self._next()
                targets = self._targets
                continue
            try:
                n = os.readv(self._fd, targets[:_IOV_MAX])
            except BlockingIOError:
                return
            except OSError:
                n = 0
            if n == 0:
                self.close()
                self._on_eof()
                return
            while n:
                head = targets[0]
                if n >= head.nbytes:
                    n -= head.nbytes
                    del targets[0]
                else:
                    targets[0] = head[n:]
                    n = 0
            if not targets:
                self._next()
                targets = self._targets

    def close(self) -> None:
        """Stop reading and close the pipe; idempotent."""
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1


def _take_fd(conn: multiprocessing.connection.Connection) -> int:
    """The pipe of ``conn`` as a bare descriptor, now ours to close (``conn`` is closed)."""
    fd = os.dup(conn.fileno())
    conn.close()
    return fd


# ---------------------------------------------------------------- the child


def _child_main(
    rconn: multiprocessing.connection.Connection,
    wconn: multiprocessing.connection.Connection,
    handler: Handler,
    loop_kind: str,
) -> None:
    """Entry point of a limit-oob child: serve frames until end-of-file."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if loop_kind == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve(_take_fd(rconn), _take_fd(wconn), handler))


async def _serve(rfd: int, wfd: int, handler: Handler) -> None:
    loop = asyncio.get_running_loop()
    sender = _Sender(loop, wfd)
    tasks: set[asyncio.Task[Any]] = set()
    finished = loop.create_future()
    eof = False
    is_async = inspect.iscoroutinefunction(handler)

    def maybe_finished() -> None:
        if eof and not tasks and not finished.done():
            finished.set_result(None)

    def task_done(mid: int, task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        sender.send((mid, task.result()))
        maybe_finished()

    def on_message(message: tuple[int, Any]) -> None:
        mid, value = message
        if is_async:
            task = loop.create_task(handler(value))
            tasks.add(task)
            task.add_done_callback(functools.partial(task_done, mid))
        else:
            sender.send((mid, handler(value)))

    def on_eof() -> None:
        nonlocal eof
        eof = True
        maybe_finished()

    receiver = _Receiver(loop, rfd, on_message, on_eof)
    sender.send((_READY, None))
    try:
        await finished
    finally:
        receiver.close()
    sender.close()
    # Wait until the last replies are written, or the loop would end first.
    await sender.closed


# --------------------------------------------------------------- the parent


class OobPool:
    """The parent side of ``limit-oob``: ``put`` (stream) and ``submit`` (reply).

    Messages are dealt round-robin to the children, one frame each. Stream
    results go to ``on_result``; replies to ``submit`` resolve its future.
    """

    def __init__(
        self,
        handler: Handler,
        size: int,
        *,
        loop_kind: str = "asyncio",
        on_result: Callable[[Any], None] | None = None,
    ) -> None:
        self._handler = handler
        self._size = size
        self._loop_kind = loop_kind
        self._on_result = on_result or (lambda value: None)
        self._ids = itertools.count()
        self._waiters: dict[int, asyncio.Future[Any]] = {}
        self._procs: list[Any] = []
        self._senders: list[_Sender] = []
        self._receivers: list[_Receiver] = []
        self._ended: list[asyncio.Future[None]] = []
        self._ready: list[asyncio.Future[None]] = []
        self._next = 0
        self._stopped = False

    def __repr__(self) -> str:
        return f"<OobPool size={self._size} loop={self._loop_kind} {len(self._waiters)} waiting>"

    async def start(self) -> None:
        """Spawn the children and wait until each has its loop running."""
        loop = asyncio.get_running_loop()
        ctx = multiprocessing.get_context("spawn")
        try:
            for _ in range(self._size):
                to_child_r, to_child_w = ctx.Pipe(duplex=False)
                from_child_r, from_child_w = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=_child_main,
                    args=(to_child_r, from_child_w, self._handler, self._loop_kind),
                    name="looppool-bench-limit-oob",
                    daemon=True,
                )
                proc.start()
                self._procs.append(proc)
                to_child_r.close()
                from_child_w.close()
                self._senders.append(_Sender(loop, _take_fd(to_child_w)))
                ended: asyncio.Future[None] = loop.create_future()
                ready: asyncio.Future[None] = loop.create_future()
                self._ended.append(ended)
                self._ready.append(ready)
                self._receivers.append(
                    _Receiver(
                        loop,
                        _take_fd(from_child_r),
                        functools.partial(self._on_message, ready=ready),
                        functools.partial(resolve, ended),
                    )
                )
            async with asyncio.timeout(START_TIMEOUT):
                for number, (ready, ended) in enumerate(zip(self._ready, self._ended, strict=True)):
                    # A child that dies while starting closes its pipe first.
                    await asyncio.wait({ready, ended}, return_when=asyncio.FIRST_COMPLETED)
                    if not ready.done():
                        proc = self._procs[number]
                        await wait_exit(proc, STOP_TIMEOUT)
                        raise RuntimeError(
                            f"limit-oob child {number} (pid {proc.pid}) exited while starting, "
                            f"exit code {proc.exitcode}"
                        )
        except BaseException:
            await self.stop()
            raise

    def _on_message(self, message: tuple[int, Any], *, ready: asyncio.Future[None]) -> None:
        mid, value = message
        if mid == _READY:
            resolve(ready)
            return
        waiter = self._waiters.pop(mid, None)
        if waiter is None:
            self._on_result(value)
        elif not waiter.done():
            waiter.set_result(value)

    def _deal(self, mid: int, message: Any) -> None:
        k = self._next
        self._next = (k + 1) % self._size
        self._senders[k].send((mid, message))

    def put(self, message: Any) -> None:
        """Send a message; its result goes to ``on_result``."""
        self._deal(next(self._ids), message)

    def submit(self, message: Any) -> asyncio.Future[Any]:
        """Send a message; the future resolves to the handler's return value."""
        mid = next(self._ids)
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters[mid] = waiter
        self._deal(mid, message)
        return waiter

    async def stop(self) -> None:
        """Close the pipes, let each child finish what it holds, and reap it; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        for sender in self._senders:
            sender.close()
        if self._ended:
            await asyncio.wait(self._ended, timeout=STOP_TIMEOUT)
        for receiver in self._receivers:
            receiver.close()
        for sender in self._senders:
            sender.abort()
        for proc in self._procs:
            await wait_exit(proc, STOP_TIMEOUT)
            if proc.exitcode is None:
                proc.kill()
                await wait_exit(proc, STOP_TIMEOUT)
            proc.join(0)
        self._procs.clear()
        self._senders.clear()
        self._receivers.clear()
        for waiter in self._waiters.values():
            waiter.cancel()
        self._waiters.clear()
