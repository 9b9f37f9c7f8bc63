"""W5's stream on a warm pool: MiB/s of payloads echoed by a Pool that has moved them before.

    python benchmarks/w5_steady.py [--passes 5] [--scale 1]

``looppool bench`` starts a new pool for each W5 measurement and streams a
few messages (16 x 1 MiB, 2 x 16 MiB), so whatever a pool warms up (buffers,
shared memory) is cold there. Here one pool streams each payload once to
warm up, then ``--passes`` more times (64 x 1 MiB, 8 x 16 MiB, both times
``--scale``); each line is the median MiB/s over the passes (payload bytes
both ways, as W5 counts them). Compare branches by running it with each one's
environment, alternately.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import looppool

MIB = 1 << 20


class Echo(looppool.Worker):
    """Puts each message back as a result (W5's handler)."""

    async def process_message(self, message: Any) -> None:
        self.put_result(message)


async def stream(pool: looppool.Pool, messages: list[Any]) -> float:
    """Put every message, take every result; the wall time."""
    results = pool.results()
    t0 = time.perf_counter()
    for message in messages:
        await pool.put(message)
    for _ in messages:
        await anext(results)
    return time.perf_counter() - t0


def kinds(data: bytes) -> dict[str, Callable[[int], Any]]:
    """How to make each W5 payload type of n bytes (numpy when installed)."""
    made: dict[str, Callable[[int], Any]] = {
        "bytes": lambda n: data[:n],
        "bytearray": lambda n: bytearray(data[:n]),
    }
    try:
        import numpy as np
    except ImportError:
        return made
    made["numpy"] = lambda n: np.frombuffer(data[:n], dtype="u1").copy()
    return made


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0, help="payload sizes times this")
    args = parser.parse_args()
    sizes = [(max(1, int(MIB * args.scale)), 64), (max(1, int(16 * MIB * args.scale)), 8)]
    data = os.urandom(max(size for size, _ in sizes))  # random: zero pages copy as if cached
    print(f"w5_steady - looppool {looppool.__version__}, load {os.getloadavg()[0]:.2f}")
    async with looppool.Pool(Echo, size=2, start_method="spawn") as pool:
        for kind, make in kinds(data).items():
            for size, count in sizes:
                messages = [make(size)] * count
                await stream(pool, messages)  # warm-up
                rates = [
                    2 * count * size / MIB / await stream(pool, messages)
                    for _ in range(args.passes)
                ]
                print(
                    f"{kind} {size / MIB:g} MiB x {count}: {statistics.median(rates):,.0f} MiB/s "
                    f"[{min(rates):,.0f}-{max(rates):,.0f}]",
                    flush=True,
                )


if __name__ == "__main__":
    asyncio.run(main())
