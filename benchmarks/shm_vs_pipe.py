"""Pipe or shared memory for large payloads? (issue 11 item 3: W5 vs ProcessPoolExecutor).

Moves one buffer parent -> child -> parent (an echo), ``--count`` times per
round, for 1 MiB and 16 MiB, several ways side by side in one run; the rounds
interleave the ways (rotated order) and the table shows medians over rounds::

    python benchmarks/shm_vs_pipe.py [--rounds 7] [--sizes 1,16]

The ways (the parent and one child, blocking I/O, no event loop, so only the
transport is timed; every received value is a fresh ``bytearray`` unless said):

* ``pipe``: as looppool does it: a header, then ``os.writev`` of the payload's
  own memory; the receiver ``os.readv``\\ s into a ``bytearray`` made for it.
  The pipes are grown to 1 MiB (``F_SETPIPE_SZ``), as looppool's are.
* ``memfd-copy``: the parent makes two ``os.memfd_create`` regions per child
  (one each way) before it starts; the child inherits and maps them. The
  sender copies the payload into its region and writes only ``(offset,
  length)`` to the pipe; the receiver copies it out into a ``bytearray`` (a
  value that outlives the region: what ``bytes``/``bytearray`` need).
* ``memfd-punch``: as ``memfd-copy``, and the receiver frees the pages it
  copied out (``madvise(MADV_REMOVE)``), so a region holds memory only while a
  payload is in it; the sender's next copy faults fresh pages in.
* ``memfd-adopt``: the same, but the receiver keeps a ``memoryview`` of the
  mapping (no copy out): what a numpy array or memoryview could adopt if its
  region stayed reserved until the value is freed. Only the echo's copy into
  the other region remains (one copy each way). An upper bound.
* ``posix-shm``: ``multiprocessing.shared_memory`` as the docs teach it: a new
  segment per message each way (created and unlinked by the parent, opened by
  the child), copied in and out.

CPU is the user + system time of the parent and the child per MiB moved
(``time.process_time`` on each side). MiB/s counts each payload once per echo
(so a MiB/s of X moves X MiB each way).
"""

from __future__ import annotations

import argparse
import mmap
import os
import platform
import statistics
import struct
import subprocess
import sys
import time
from multiprocessing import shared_memory
from typing import Any

MIB = 1 << 20
#: op, offset, length (op: PIPE, SHM, SHM_NAMED, CPU, QUIT).
HEAD = struct.Struct("!BQQ")
PIPE, SHM, SHM_NAMED, CPU, QUIT = range(5)
IOV_MAX = 64
WAYS = ("pipe", "memfd-copy", "memfd-punch", "memfd-adopt", "posix-shm")


def read_exactly(fd: int, size: int) -> bytes:
    chunks = []
    while size:
        chunk = os.read(fd, size)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_into(fd: int, size: int) -> bytearray:
    """Read ``size`` bytes into a bytearray made for them, as looppool's FrameDecoder does."""
    buf = bytearray(size)
    view = memoryview(buf)
    while view:
        n = os.readv(fd, [view])
        if not n:
            raise EOFError
        view = view[n:]
    return buf


def write_all(fd: int, pieces: list[Any]) -> None:
    views = [memoryview(p).cast("B") for p in pieces]
    while views:
        n = os.writev(fd, views[:IOV_MAX])
        while n:
            if n >= views[0].nbytes:
                n -= views[0].nbytes
                del views[0]
            else:
                views[0] = views[0][n:]
                n = 0


def grow(fd: int) -> None:
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, MIB)
    except (ImportError, AttributeError, OSError):
        pass


def punch(region: memoryview, offset: int, length: int) -> None:
    """Free the pages of ``region[offset:offset + length]`` (whole pages only)."""
    start = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (offset + length) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        region.obj.madvise(mmap.MADV_REMOVE, start, end - start)  # type: ignore[union-attr]


def child(way: str, rfd: int, wfd: int, in_fd: int, out_fd: int, size: int) -> None:
    """Echo every payload back the same way it came."""
    mm_in = mm_out = None
    if way.startswith("memfd"):
        mm_in = memoryview(mmap.mmap(in_fd, size))
        mm_out = memoryview(mmap.mmap(out_fd, size))
    while True:
        op, offset, length = HEAD.unpack(read_exactly(rfd, HEAD.size))
        if op == QUIT:
            return
        if op == CPU:
            os.write(wfd, struct.pack("!d", time.process_time()))
        elif op == PIPE:
            value = read_into(rfd, length)
            write_all(wfd, [HEAD.pack(PIPE, 0, length), value])
        elif op == SHM:
            assert mm_in is not None
            assert mm_out is not None
            source = mm_in[offset : offset + length]
            value: Any = source if way == "memfd-adopt" else bytearray(source)
            if way == "memfd-punch":
                punch(mm_in, offset, length)
            mm_out[:length] = value
            os.write(wfd, HEAD.pack(SHM, 0, length))
        elif op == SHM_NAMED:
            names = read_exactly(rfd, offset).decode().split()
            segments = []
            for name in names:
                # Opened by path, not SharedMemory(name): attaching registers the
                # segment with a resource tracker of this process on 3.11/3.12
                # (gh-82300), which would unlink it when this process exits.
                fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
                segments.append(mmap.mmap(fd, length))
                os.close(fd)
            src, dst = segments
            value = bytearray(memoryview(src)[:length])
            memoryview(dst)[:length] = value
            del value
            src.close()
            dst.close()
            os.write(wfd, HEAD.pack(SHM_NAMED, 0, length))


class Peer:
    """The parent's side of one child moving payloads one way."""

    def __init__(self, way: str, size: int) -> None:
        self.way = way
        self.size = size
        to_child_r, self.to_child = os.pipe()
        self.from_child, from_child_w = os.pipe()
        grow(self.to_child)
        grow(self.from_child)
        self.in_fd = self.out_fd = -1
        fds = [to_child_r, from_child_w]
        if way.startswith("memfd"):
            # Created by the parent and inherited: freed by the kernel when the
            # last fd and mapping go, whichever process dies first or how.
            self.in_fd = os.memfd_create("looppool-req")
            self.out_fd = os.memfd_create("looppool-rep")
            os.ftruncate(self.in_fd, size)
            os.ftruncate(self.out_fd, size)
            self.mm_in = memoryview(mmap.mmap(self.in_fd, size))
            self.mm_out = memoryview(mmap.mmap(self.out_fd, size))
            fds += [self.in_fd, self.out_fd]
        args = [sys.executable, __file__, "--child", way, *map(str, fds[:2])]
        args += [str(self.in_fd), str(self.out_fd), str(size)]
        self.proc = subprocess.Popen(args, pass_fds=fds)
        os.close(to_child_r)
        os.close(from_child_w)

    def cpu(self) -> float:
        os.write(self.to_child, HEAD.pack(CPU, 0, 0))
        (value,) = struct.unpack("!d", read_exactly(self.from_child, 8))
        return float(value)

    def echo(self, payload: bytearray) -> Any:
        n = len(payload)
        if self.way == "pipe":
            write_all(self.to_child, [HEAD.pack(PIPE, 0, n), payload])
            HEAD.unpack(read_exactly(self.from_child, HEAD.size))
            return read_into(self.from_child, n)
        if self.way.startswith("memfd"):
            self.mm_in[:n] = payload
            os.write(self.to_child, HEAD.pack(SHM, 0, n))
            read_exactly(self.from_child, HEAD.size)
            reply = self.mm_out[:n]
            if self.way == "memfd-adopt":
                return reply
            value = bytearray(reply)
            if self.way == "memfd-punch":
                punch(self.mm_out, 0, n)
            return value
        # posix-shm: a new segment each way per message, as the docs teach it.
        src = shared_memory.SharedMemory(create=True, size=n)
        dst = shared_memory.SharedMemory(create=True, size=n)
        try:
            assert src.buf is not None
            assert dst.buf is not None
            src.buf[:n] = payload
            names = f"{src.name.lstrip('/')} {dst.name.lstrip('/')}".encode()
            write_all(self.to_child, [HEAD.pack(SHM_NAMED, len(names), n), names])
            read_exactly(self.from_child, HEAD.size)
            return bytearray(dst.buf[:n])
        finally:
            for segment in (src, dst):
                segment.close()
                segment.unlink()

    def close(self) -> None:
        os.write(self.to_child, HEAD.pack(QUIT, 0, 0))
        self.proc.wait(30)
        os.close(self.to_child)
        os.close(self.from_child)
        if self.in_fd >= 0:
            self.mm_in.release()
            self.mm_out.release()
            os.close(self.in_fd)
            os.close(self.out_fd)


def run(rounds: int, sizes: list[int], count_mib: int) -> None:
    print(
        f"shm_vs_pipe - Python {platform.python_version()}, {platform.system()} "
        f"{platform.release()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
        f"{rounds} rounds, ways interleaved, medians [min-max]"
    )
    for size_mib in sizes:
        size = size_mib * MIB
        count = max(2, count_mib // size_mib)
        payload = bytearray(os.urandom(size))  # random: zero pages copy as if cached
        peers = {way: Peer(way, size) for way in WAYS}
        rates: dict[str, list[float]] = {way: [] for way in WAYS}
        cpus: dict[str, list[float]] = {way: [] for way in WAYS}
        try:
            for way, peer in peers.items():  # warm: map the regions, start the tracker
                if peer.echo(payload) != payload:
                    raise AssertionError(f"{way}: the echo differs")
            for r in range(rounds):
                order = WAYS[r % len(WAYS) :] + WAYS[: r % len(WAYS)]
                for way in order:
                    peer = peers[way]
                    child_cpu = peer.cpu()
                    cpu = time.process_time()
                    start = time.perf_counter()
                    for _ in range(count):
                        out = peer.echo(payload)
                    wall = time.perf_counter() - start
                    cpu = time.process_time() - cpu + peer.cpu() - child_cpu
                    if out != payload:
                        raise AssertionError(f"{way}: the echo differs")
                    del out
                    moved = count * size / MIB
                    rates[way].append(moved / wall)
                    cpus[way].append(cpu * 1e3 / moved)
        finally:
            for peer in peers.values():
                peer.close()
        base = statistics.median(rates["pipe"])
        print(f"\n{size_mib} MiB, {count} echoes per round")
        print(f"  {'way':<12} {'MiB/s median [min-max]':>24} {'vs pipe':>8} {'CPU ms/MiB':>11}")
        for way in WAYS:
            med = statistics.median(rates[way])
            span = f"{med:,.0f} [{min(rates[way]):,.0f}-{max(rates[way]):,.0f}]"
            print(
                f"  {way:<12} {span:>24} {med / base:>7.2f}x {statistics.median(cpus[way]):>11.3f}"
            )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        way, *numbers = sys.argv[2:]
        rfd, wfd, in_fd, out_fd, size = map(int, numbers)
        child(way, rfd, wfd, in_fd, out_fd, size)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sizes", default="1,16", help="MiB, comma-separated")
    parser.add_argument("--mib", type=int, default=64, help="MiB echoed per way per round")
    args = parser.parse_args()
    run(args.rounds, [int(s) for s in args.sizes.split(",")], args.mib)


if __name__ == "__main__":
    main()
