#!/usr/bin/env python3
"""looppool's API with full annotations: this file passes ``mypy --strict``.

    python examples/typed_usage.py
    mypy --strict examples/typed_usage.py

Workers take and return typed values; what crosses the process boundary is
typed ``Any`` by the pool (it is whatever the worker sent), so the parent
narrows it once, where it arrives (``isinstance`` on results, a typed
variable for replies).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import Counter
from dataclasses import dataclass

import looppool


@dataclass(frozen=True)
class Job:
    """Count the words of ``text``."""

    name: str
    text: str


@dataclass(frozen=True)
class WordCount:
    """A result: the most common words of one job, and who counted them."""

    name: str
    top: tuple[tuple[str, int], ...]
    worker: int


class WordCounter(looppool.SafeWorker):
    """Counts words; puts a :class:`WordCount`, replies with the number of words."""

    def __init__(self, top: int = 3) -> None:
        self.top = top
        self.jobs = 0

    async def initialise(self) -> None:
        """Nothing to open here; a real worker would open its clients."""
        self.jobs = 0

    async def process_message(self, message: Job) -> int:
        """Count ``message.text``'s words; put the top ones; reply the total."""
        if not message.text:
            raise ValueError(f"job {message.name!r} has no text")
        counts = Counter(message.text.lower().split())
        self.jobs += 1
        self.put_result(WordCount(message.name, tuple(counts.most_common(self.top)), self.number))
        return sum(counts.values())

    async def finalise(self) -> None:
        """Nothing to close."""


async def collect(pool: looppool.Pool) -> list[WordCount]:
    """Every result of ``pool``, narrowed to :class:`WordCount`."""
    counts: list[WordCount] = []
    async for result in pool.results():
        assert isinstance(result, WordCount), result
        counts.append(result)
    return counts


async def main() -> int:
    """Count words in a few jobs; show a reply, results, a remote error and the stats."""
    factory: looppool.WorkerFactory = functools.partial(WordCounter, top=2)
    jobs = [
        Job("fox", "the quick brown fox jumps over the lazy dog the end"),
        Job("pool", "a pool of loops a loop per process a process per core"),
        Job("seed", "looppool was a pool of tornado loops"),
    ]
    async with looppool.Pool(factory, size=2, loop="asyncio", concurrency=8) as pool:
        greeting = Job("greeting", "hello hello world")
        words: int = await pool.submit(greeting)
        print(f"{greeting.name}: {words} words (a reply from submit)")
        try:
            await pool.submit(Job("empty", ""))
        except ValueError as exc:  # re-raised in the parent, with the worker's traceback
            cause = exc.__cause__
            remote = isinstance(cause, looppool.RemoteTraceback)
            print(f"empty: ValueError({exc}); worker traceback attached: {remote}")
        async with asyncio.TaskGroup() as group:
            results = group.create_task(collect(pool))
            for job in jobs:
                await pool.put(job)
            await pool.drain()
            await pool.stop()
    for count in sorted(results.result(), key=lambda c: c.name):
        print(f"{count.name}: top words {list(count.top)}")
    stats: looppool.PoolStats = pool.stats()
    print(f"processed {stats.processed}, failed {stats.failed}, results {stats.results}")
    try:
        await pool.put(jobs[0])
    except looppool.PoolClosed:
        print("after stop, put raises PoolClosed")
    return 0 if stats.failed == 1 else 1


if __name__ == "__main__":
    # The worker's ValueError is logged in the parent (with its traceback):
    # keep the example's output to what it prints.
    logging.basicConfig(level=logging.CRITICAL)
    raise SystemExit(asyncio.run(main()))
