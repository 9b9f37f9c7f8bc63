"""Large payloads: pickle protocol 5 buffers out of band, both ways, under fork and spawn."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import pytest

import looppool
from large_workers import Large, pattern
from looppool import _protocol as P

MIB = 1 << 20


@pytest.fixture
def make(start_method: str, loop_kind: str) -> Any:
    """Build a Pool of Large workers with this run's start method and loop kind."""

    def build(size: int = 1, **options: Any) -> looppool.Pool:
        options.setdefault("start_method", start_method)
        options.setdefault("loop", loop_kind)
        return looppool.Pool(Large, size=size, **options)

    return build


async def echo(pool: looppool.Pool, message: Any) -> tuple[Any, Any]:
    """Send ``message``; its reply, and the result the worker put for it."""
    results = pool.results()
    reply = await pool.submit(message)
    result = await anext(results)
    return reply, result


@pytest.mark.parametrize("size", [10, 3 * MIB])
async def test_bytes_and_bytearray_round_trip_as_message_result_and_reply(
    make: Any, size: int
) -> None:
    """bytes and bytearray, small and above the out-of-band threshold, come back equal and typed."""
    async with make() as pool:
        for value in (pattern(size), bytearray(pattern(size, 1))):
            reply, result = await echo(pool, value)
            for got in (reply, result):
                assert type(got) is type(value)
                assert got == value


@pytest.mark.parametrize("size", [64, 2 * MIB])
async def test_memoryview_round_trips_with_its_format_shape_and_bytes(make: Any, size: int) -> None:
    """A memoryview (which pickle refuses alone) arrives as a memoryview of the same items."""
    data = bytearray(pattern(size))
    view = memoryview(data).cast("I", [size // 16, 4])
    async with make() as pool:
        reply, result = await echo(pool, view)
        for got in (reply, result):
            assert isinstance(got, memoryview)
            assert (got.format, got.shape) == ("I", (size // 16, 4))
            assert got.tobytes() == bytes(data)


async def test_numpy_arrays_round_trip_anywhere_in_a_message(make: Any) -> None:
    """numpy arrays, alone or inside other objects, large or small, come back equal."""
    np = pytest.importorskip("numpy")
    big = np.arange(MIB, dtype="f8").reshape(1024, 1024)
    message = {"big": big, "small": np.arange(10), "columns": big[:, 3]}  # a strided view
    async with make() as pool:
        reply, result = await echo(pool, message)
        for got in (reply, result):
            assert got.keys() == message.keys()
            for key, array in message.items():
                assert got[key].dtype == array.dtype
                assert np.array_equal(got[key], array)


async def test_a_reply_larger_than_the_pipe_arrives_intact(make: Any) -> None:
    """A reply of several times the pipe's buffer is written in parts and read back whole."""
    async with make() as pool:
        assert await pool.submit(("make", 8 * P.PIPE_SIZE)) == pattern(8 * P.PIPE_SIZE)


async def test_a_mutable_buffer_changed_after_put_is_delivered_as_it_was_at_put(
    make: Any,
) -> None:
    """put() snapshots a bytearray (and a numpy array): a later change does not travel."""
    data = bytearray(pattern(2 * MIB))
    async with make() as pool:
        results = pool.results()
        await pool.put(data)
        data[:] = bytes(len(data))
        assert await anext(results) == bytearray(pattern(2 * MIB))
        np = pytest.importorskip("numpy")
        array = np.arange(MIB // 8, dtype="i8")
        await pool.put(array)
        array[:] = -1
        assert np.array_equal(await anext(results), np.arange(MIB // 8, dtype="i8"))


class Latch:
    """A Unix socket a worker blocks on (see Large's "block"); the test knows when it waits."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.waiting = asyncio.Event()
        self._open = False
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.AbstractServer | None = None

    async def serve(self) -> None:
        """Start answering waiters."""
        self._server = await asyncio.start_unix_server(self._on_waiter, self.path)

    async def _on_waiter(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        if self._open:
            writer.write(b"!")
        self.waiting.set()

    def open(self) -> None:
        """Release every waiter, now and later."""
        self._open = True
        for writer in self._writers:
            writer.write(b"!")

    async def close(self) -> None:
        """Stop the server and close its connections."""
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def latch() -> AsyncIterator[Latch]:
    """A latch in a fresh directory, removed afterwards."""
    directory = tempfile.mkdtemp(prefix="lp-")
    latch = Latch(os.path.join(directory, "latch"))
    await latch.serve()
    yield latch
    await latch.close()
    shutil.rmtree(directory)


async def test_a_large_message_half_way_through_a_dying_workers_pipe_is_redelivered_intact(
    make: Any, latch: Latch
) -> None:
    """A SafeWorker killed with a large message partly in its pipe: the replacement gets it whole.

    The worker's loop is blocked, so the parent has written only what the
    pipe holds and keeps the rest; after the kill, what was in the pipe is
    gone with it and the message is sent again, from its first byte, to the
    replacement.
    """
    message = bytearray(pattern(16 * MIB, 3))
    async with make() as pool:
        pid = await pool.submit("pid")
        blocked = asyncio.ensure_future(pool.submit(("block", latch.path)))
        await latch.waiting.wait()
        big = asyncio.ensure_future(pool.submit(message))
        # Two loop turns, in the loop's FIFO order: in the first the submit
        # task accepts the message and schedules the pool's pump; in the
        # second the pump writes what the pipe takes of it. (One turn was a
        # race: the kill could come before the write.)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert pool.stats().in_flight[0] == 2  # "block" and the large message: sent
        os.kill(pid, signal.SIGKILL)
        latch.open()  # the replacement runs "block" again: let it through
        assert await big == message
        assert await blocked == "unblocked"
        stats = pool.stats()
        assert stats.respawns == 1
        assert stats.redelivered == 2
        assert pool.pids[0] != pid
