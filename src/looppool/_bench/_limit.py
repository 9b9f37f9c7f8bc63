"""The *limit*: the floor of per-message IPC on this machine.

The least a pool of asyncio workers can do, written out by hand::

    parent (asyncio)                                  child k (asyncio or uvloop)
    put(msg) ─► outbox k ─► one frame per loop turn ─► raw pipe ─► unpickle the batch
                 (call_soon flush: every message             sync handler: call it
                  put in the same turn shares a frame)       async handler: one task each
    on_frame ◄── raw pipe ◄── one frame per loop turn ◄── replies (id, value), batched

* One pair of raw pipes (``os.pipe`` under ``multiprocessing.Pipe``) per
  child; frames are a 4-byte length and a pickled list. Both ends use the
  loop's pipe transports (``connect_read_pipe``/``connect_write_pipe``), so
  nothing polls: the loops wait in epoll.
* Each message and reply carries an id, as any pool needs to route replies.
* No supervision, fairness, back-pressure, logging or error routing: it is a
  floor, not a pool. A handler that raises kills the child's loop.
* Children are always spawned: under ``fork`` a child would inherit the
  pipe ends of the children forked before it and never see end-of-file.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import multiprocessing
import multiprocessing.connection
import pickle
import signal
import struct
from collections.abc import Callable
from typing import Any

from ._handlers import Handler

__all__ = ["START_TIMEOUT", "STOP_TIMEOUT", "LimitPool", "resolve", "wait_exit"]

_HEADER = struct.Struct("!I")
_PICKLE = pickle.HIGHEST_PROTOCOL
#: How long stop() waits for a child to exit by itself before killing it.
STOP_TIMEOUT = 5.0
#: How long start() waits for the children to be ready.
START_TIMEOUT = 60.0


class _FrameReader(asyncio.Protocol):
    """Cut a byte stream into length-prefixed frames."""

    def __init__(self, on_frame: Callable[[bytes], None], on_eof: Callable[[], None]) -> None:
        self._buf = bytearray()
        self._on_frame = on_frame
        self._on_eof = on_eof

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos, end = 0, len(buf)
        while end - pos >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buf, pos)
            stop = pos + _HEADER.size + size
            if stop > end:
                break
            self._on_frame(bytes(buf[pos + _HEADER.size : stop]))
            pos = stop
        if pos:
            del buf[:pos]

    def eof_received(self) -> bool | None:
        self._on_eof()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        # eof_received is not called when the read fails (EPIPE, EBADF):
        # report that as an end too, so nobody waits for a dead peer.
        self._on_eof()


class _WriteEnd(asyncio.Protocol):
    """The protocol of a write pipe: tells when the pipe is closed."""

    def __init__(self, closed: asyncio.Future[None]) -> None:
        self._closed = closed

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed.done():
            self._closed.set_result(None)


def _send(transport: asyncio.WriteTransport, batch: list[Any]) -> None:
    data = pickle.dumps(batch, _PICKLE)
    transport.writelines((_HEADER.pack(len(data)), data))


# ---------------------------------------------------------------- the child


def _child_main(
    rconn: multiprocessing.connection.Connection,
    wconn: multiprocessing.connection.Connection,
    handler: Handler,
    loop_kind: str,
) -> None:
    """Entry point of a limit child: serve frames until end-of-file."""
    # The parent decides when children end (by closing their pipe).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if loop_kind == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve(rconn, wconn, handler))


async def _serve(
    rconn: multiprocessing.connection.Connection,
    wconn: multiprocessing.connection.Connection,
    handler: Handler,
) -> None:
    loop = asyncio.get_running_loop()
    closed = loop.create_future()
    wtransport, _ = await loop.connect_write_pipe(lambda: _WriteEnd(closed), wconn)
    outbox: list[tuple[int, Any]] = []
    flush_pending = False
    tasks: set[asyncio.Task[Any]] = set()
    finished = loop.create_future()
    eof = False
    is_async = inspect.iscoroutinefunction(handler)

    def flush() -> None:
        nonlocal flush_pending
        flush_pending = False
        _send(wtransport, outbox)
        outbox.clear()
        if eof and not tasks and not finished.done():
            finished.set_result(None)

    def schedule_flush() -> None:
        nonlocal flush_pending
        if not flush_pending:
            flush_pending = True
            loop.call_soon(flush)

    def task_done(mid: int, task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        outbox.append((mid, task.result()))
        schedule_flush()

    def on_frame(frame: bytes) -> None:
        batch: list[tuple[int, Any]] = pickle.loads(frame)
        if is_async:
            for mid, message in batch:
                task = loop.create_task(handler(message))
                tasks.add(task)
                task.add_done_callback(functools.partial(task_done, mid))
        else:
            outbox.extend([(mid, handler(message)) for mid, message in batch])
            schedule_flush()

    def on_eof() -> None:
        nonlocal eof
        eof = True
        if not tasks and not flush_pending and not finished.done():
            finished.set_result(None)

    await loop.connect_read_pipe(lambda: _FrameReader(on_frame, on_eof), rconn)
    _send(wtransport, [])  # ready
    await finished
    # close() writes out what is buffered first; wait for that, or the
    # loop would end with the last replies still in the transport.
    wtransport.close()
    await closed


# --------------------------------------------------------------- the parent


class LimitPool:
    """The parent side of the limit: ``put`` (stream) and ``submit`` (reply).

    Messages are dealt round-robin to the children. Stream results go to
    ``on_result``; replies to ``submit`` resolve its future.
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
        self._writers: list[asyncio.WriteTransport] = []
        self._outboxes: list[list[tuple[int, Any]]] = []
        self._ended: list[asyncio.Future[None]] = []
        self._ready: list[asyncio.Future[None]] = []
        self._flush_pending = False
        self._next = 0
        self._stopped = False

    def __repr__(self) -> str:
        return f"<LimitPool size={self._size} loop={self._loop_kind} {len(self._waiters)} waiting>"

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
                    name="looppool-bench-limit",
                    daemon=True,
                )
                proc.start()
                self._procs.append(proc)
                to_child_r.close()
                from_child_w.close()
                wtransport, _ = await loop.connect_write_pipe(asyncio.Protocol, to_child_w)
                self._writers.append(wtransport)
                self._outboxes.append([])
                ended: asyncio.Future[None] = loop.create_future()
                ready: asyncio.Future[None] = loop.create_future()
                self._ended.append(ended)
                self._ready.append(ready)
                reader = _FrameReader(
                    functools.partial(self._on_frame, ready=ready),
                    functools.partial(resolve, ended),
                )
                await loop.connect_read_pipe(functools.partial(_same, reader), from_child_r)
            async with asyncio.timeout(START_TIMEOUT):
                for number, (ready, ended) in enumerate(zip(self._ready, self._ended, strict=True)):
                    # A child that dies while starting (say, an import error)
                    # closes its pipe before it is ready: fail at once.
                    await asyncio.wait({ready, ended}, return_when=asyncio.FIRST_COMPLETED)
                    if not ready.done():
                        proc = self._procs[number]
                        await wait_exit(proc, STOP_TIMEOUT)
                        raise RuntimeError(
                            f"limit child {number} (pid {proc.pid}) exited while starting, "
                            f"exit code {proc.exitcode}"
                        )
        except BaseException:
            await self.stop()
            raise

    def _on_frame(self, frame: bytes, *, ready: asyncio.Future[None]) -> None:
        replies: list[tuple[int, Any]] = pickle.loads(frame)
        if not ready.done():
            ready.set_result(None)
        waiters = self._waiters
        on_result = self._on_result
        for mid, value in replies:
            waiter = waiters.pop(mid, None)
            if waiter is None:
                on_result(value)
            elif not waiter.done():
                waiter.set_result(value)

    def _flush(self) -> None:
        self._flush_pending = False
        for writer, outbox in zip(self._writers, self._outboxes, strict=True):
            if outbox:
                _send(writer, outbox)
                outbox.clear()

    def _deal(self, mid: int, message: Any) -> None:
        k = self._next
        self._next = (k + 1) % self._size
        self._outboxes[k].append((mid, message))
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush)

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
        self._flush()
        for writer in self._writers:
            writer.close()
        if self._ended:
            await asyncio.wait(self._ended, timeout=STOP_TIMEOUT)
        for proc in self._procs:
            await wait_exit(proc, STOP_TIMEOUT)
            if proc.exitcode is None:
                proc.kill()
                await wait_exit(proc, STOP_TIMEOUT)
            proc.join(0)
        self._procs.clear()
        self._writers.clear()
        self._outboxes.clear()
        for waiter in self._waiters.values():
            waiter.cancel()
        self._waiters.clear()


def _same(reader: _FrameReader) -> _FrameReader:
    return reader


def resolve(future: asyncio.Future[None]) -> None:
    """Resolve ``future`` unless it is done."""
    if not future.done():
        future.set_result(None)


async def wait_exit(proc: Any, grace: float) -> None:
    """Wait up to ``grace`` seconds for a process to end, watching its sentinel (no polling)."""
    if proc.exitcode is not None:
        return
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()
    loop.add_reader(proc.sentinel, resolve, gone)
    try:
        await asyncio.wait_for(gone, grace)
    except TimeoutError:
        return
    finally:
        loop.remove_reader(proc.sentinel)
    # The sentinel closes a moment before the process can be reaped: a
    # short blocking join, for a process already on its way out.
    proc.join(1)
