#!/usr/bin/env python3
"""Plain functions on a pool, as with ``ProcessPoolExecutor`` or aiomultiprocess.

No Worker class: a pool of ``looppool.FunctionWorker`` runs the functions it
is given, each call on a worker's event loop.

* ``await pool.run(f, *args, **kwargs)`` — one call (``run_in_executor``,
  aiomultiprocess's ``apply``);
* ``async for r in pool.map(f, items)`` — a call per item, at most
  ``window`` in flight, in input order or (``ordered=False``) as they finish;
* ``pool.starmap(f, argument_tuples)`` — the same with several arguments.

A plain ``def`` runs inline on the worker's loop; an ``async def`` runs as a
task, so one worker overlaps many that await. Functions travel by reference:
they are defined at the top level of this module, which the workers import
(under the spawn start method this script is imported as ``__mp_main__``,
hence the ``if __name__ == "__main__":`` guard).

    python examples/functions.py           # 2 workers, 200 items
    python examples/functions.py --smoke   # 2 workers, 40 items
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
from collections.abc import AsyncIterator

import looppool


def digest(password: bytes, rounds: int = 20_000) -> str:
    """CPU work: a plain function, run inline on a worker's loop."""
    return hashlib.pbkdf2_hmac("sha256", password, b"example salt", rounds).hex()[:16]


async def fetch_and_digest(name: str) -> tuple[str, int, str]:
    """I/O, then CPU: an async function, many at once on each worker's loop."""
    await asyncio.sleep(0.01)  # stands for a request to a slow service
    return name, os.getpid(), digest(name.encode(), rounds=2_000)


def check(password: bytes) -> str:
    """Fails for an empty password: the exception reaches the caller."""
    if not password:
        raise ValueError("an empty password")
    return digest(password)


async def names(count: int) -> AsyncIterator[str]:
    """An async source of items: map() pulls from it only as its window has room."""
    for i in range(count):
        await asyncio.sleep(0)
        yield f"user-{i}"


async def main(size: int, count: int) -> bool:
    async with looppool.Pool(looppool.FunctionWorker, size=size) as pool:
        one = await pool.run(digest, b"secret")
        print(f"run: digest(b'secret') = {one}")

        passwords = (f"password {i}".encode() for i in range(count))
        digests = [d async for d in pool.map(digest, passwords, window=4 * size)]
        print(f"map: {len(digests)} digests in input order, window {4 * size}")

        pids = set()
        async for _name, pid, _digest in pool.map(fetch_and_digest, names(count), ordered=False):
            pids.add(pid)
        print(f"map of an async function over an async source: {len(pids)} workers served it")

        pairs = [(b"a", 1_000), (b"b", 2_000)]
        print(f"starmap: {[d async for d in pool.starmap(digest, pairs)]}")

        try:
            await pool.run(check, b"")
        except ValueError as exc:
            remote = isinstance(exc.__cause__, looppool.RemoteTraceback)
            print(f"run raised ValueError({exc}); worker traceback attached: {remote}")
    return len(digests) == count and digests[0] == digest(b"password 0")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--count", type=int, default=200, help="items to map (default 200)")
    parser.add_argument("--smoke", action="store_true", help="a quick run")
    args = parser.parse_args()
    if args.smoke:
        args.count = 40
    raise SystemExit(0 if asyncio.run(main(args.size, args.count)) else 1)
