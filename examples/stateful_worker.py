#!/usr/bin/env python3
"""Stateful workers: a lookup table computed in the parent, sent with ``broadcast``.

The seed's "Stateful worker" section: when every worker needs the same table
(exchange rates here) but computing it is expensive or needs a resource only
the parent has (a database connection), compute it once in the parent and
send it to every worker with ``await pool.broadcast(...)`` — each live worker
gets it exactly once. The seed relied on ``2n - 1`` messages reaching every
worker; ``broadcast`` says what it means.

Each refresh is followed by ``drain()`` here, so that every conversion put
afterwards uses the new table. In a service, a task would refresh the table
on a timer while conversions keep flowing.

    python examples/stateful_worker.py           # 2 workers, 5 refreshes
    python examples/stateful_worker.py --smoke   # 2 workers, 3 refreshes
"""

from __future__ import annotations

import argparse
import asyncio
import random
from collections import defaultdict
from dataclasses import dataclass

import looppool

CURRENCIES = ("EUR", "GBP", "JPY", "CHF")


@dataclass(frozen=True)
class Rates:
    """A new version of the lookup table (broadcast to every worker)."""

    version: int
    table: dict[str, float]


@dataclass(frozen=True)
class Convert:
    """Convert ``amount`` US dollars to ``currency``."""

    amount: float
    currency: str


@dataclass(frozen=True)
class Converted:
    """A conversion's result: which table version and worker computed it."""

    amount: float
    currency: str
    value: float
    version: int
    worker: int


class RatesWorker(looppool.Worker):
    """Keeps the latest :class:`Rates`; answers :class:`Convert` messages with it.

    A plain ``def`` handler: it runs to completion as each message arrives,
    so a table replaced mid-stream is never half-read.
    """

    def initialise(self) -> None:
        """Start with no table."""
        self.rates = Rates(0, {})

    def process_message(self, message: Rates | Convert) -> None:
        """Replace the table, or convert with the current one."""
        if isinstance(message, Rates):
            self.rates = message
            self.put_result(("loaded", self.number, message.version))
            return
        value = round(message.amount * self.rates.table[message.currency], 2)
        self.put_result(
            Converted(message.amount, message.currency, value, self.rates.version, self.number)
        )


def compute_rates(version: int) -> Rates:
    """The expensive part, done once per version in the parent (here: made up)."""
    rng = random.Random(version)
    base = {"EUR": 0.92, "GBP": 0.79, "JPY": 151.0, "CHF": 0.88}
    return Rates(version, {c: r * rng.uniform(0.95, 1.05) for c, r in base.items()})


async def main(size: int, versions: int, per_version: int) -> bool:
    """Refresh the table ``versions`` times; convert ``per_version`` amounts after each."""
    loaded: dict[int, list[int]] = defaultdict(list)
    conversions: list[tuple[int, Converted]] = []  # (version current at put, result)
    current = 0

    def on_result(result: tuple[str, int, int] | Converted) -> None:
        if isinstance(result, Converted):
            conversions.append((current, result))
        else:
            _, worker, version = result
            loaded[worker].append(version)

    async with looppool.Pool(RatesWorker, size=size, on_result=on_result) as pool:
        for version in range(1, versions + 1):
            await pool.broadcast(compute_rates(version))
            await pool.drain()  # every worker has the new table
            current = version
            for i in range(per_version):
                await pool.put(Convert(100.0 + i, CURRENCIES[i % len(CURRENCIES)]))
            await pool.drain()  # every conversion done and its result received

    for worker in sorted(loaded):
        print(f"worker {worker} loaded table versions {loaded[worker]}")
    shown: set[tuple[int, int]] = set()
    for _, result in conversions:  # one conversion per table version and worker
        if (result.version, result.worker) in shown:
            continue
        shown.add((result.version, result.worker))
        print(
            f"  {result.amount:.2f} USD = {result.value:.2f} {result.currency} "
            f"(table v{result.version}, worker {result.worker})"
        )
    fresh = all(result.version == version for version, result in conversions)
    every = all(loaded[w] == list(range(1, versions + 1)) for w in range(size))
    print(
        f"{len(conversions)} conversions; each used the table current when it was put: {fresh}; "
        f"every worker loaded every version once: {every}"
    )
    return fresh and every


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--versions", type=int, default=5, help="table refreshes")
    parser.add_argument("--per-version", type=int, default=20, help="conversions per refresh")
    parser.add_argument("--smoke", action="store_true", help="a quick run")
    args = parser.parse_args()
    if args.smoke:
        args.versions, args.per_version = 3, 8
    ok = asyncio.run(main(args.size, args.versions, args.per_version))
    raise SystemExit(0 if ok else 1)
