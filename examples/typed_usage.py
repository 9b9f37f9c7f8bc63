#!/usr/bin/env python3
"""looppool's API with full annotations: this file passes ``mypy --strict``.

    python examples/typed_usage.py
    mypy --strict examples/typed_usage.py

A worker says its types as ``SafeWorker[Message, Reply, Result]``: what
``process_message`` takes, what it returns (``submit()``'s reply) and what
``put_result`` sends (what ``results()`` yields). A pool of it carries them:
``Pool(WordCounter)`` is a ``Pool[Job, int, WordCount]``, so mypy checks the
messages put and knows the replies and results (``assert_type`` below). A
worker that says nothing is ``Any`` throughout.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import Counter
from dataclasses import dataclass
from typing import assert_type

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


class WordCounter(looppool.SafeWorker[Job, int, WordCount]):
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


async def collect(pool: looppool.Pool[Job, int, WordCount]) -> list[WordCount]:
    """Every result of ``pool``: typed ``WordCount`` by the worker's declaration."""
    counts: list[WordCount] = []
    async for result in pool.results():
        assert_type(result, WordCount)
        counts.append(result)
    return counts


async def main() -> int:
    """Count words in a few jobs; show a reply, results, a remote error and the stats."""
    factory = functools.partial(WordCounter, top=2)
    jobs = [
        Job("fox", "the quick brown fox jumps over the lazy dog the end"),
        Job("pool", "a pool of loops a loop per process a process per core"),
        Job("seed", "looppool was a pool of tornado loops"),
    ]
    async with looppool.Pool(factory, size=2, loop="asyncio", concurrency=8) as pool:
        greeting = Job("greeting", "hello hello world")
        assert_type(pool, looppool.Pool[Job, int, WordCount])
        words = await pool.submit(greeting)
        assert_type(words, int)
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


# -- plain functions, without a Worker class ------------------------------------------
#
# run(), map() and starmap() are typed by the function they call: its
# parameters check the arguments, and the result is its return type (an
# async function's awaited). Functions must be importable by the workers:
# defined at the top level of a module, as these are.


def word_total(text: str) -> int:
    """How many words ``text`` has (a plain function: runs inline on a worker's loop)."""
    return len(text.split())


async def repeat(text: str, times: int) -> str:
    """``text`` repeated (an async function: runs as a task on a worker's loop)."""
    await asyncio.sleep(0)
    return " ".join([text] * times)


async def functions() -> int:
    """Call plain and async functions on a FunctionWorker pool: one call, map and starmap."""
    texts = ["the quick brown fox", "a pool of loops", "looppool"]
    async with looppool.Pool(looppool.FunctionWorker, size=2, loop="asyncio") as pool:
        total: int = await pool.run(word_total, texts[0])
        echo: str = await pool.run(repeat, "echo", times=2)
        totals: list[int] = [n async for n in pool.map(word_total, texts)]
        lines: list[str] = [line async for line in pool.starmap(repeat, [("hip", 2), ("ho", 1)])]
    print(f"run: {total} words; {echo!r}")
    print(f"map: {totals}; starmap: {lines}")
    return 0 if totals == [4, 4, 1] else 1


async def _typing_is_checked(
    pool: looppool.Pool, counter: looppool.Pool[Job, int, WordCount]
) -> None:
    """Never run: lines mypy must reject (``--strict`` fails on an ignore that is not needed)."""
    await counter.put("not a job")  # type: ignore[arg-type]
    text: str = await counter.submit(Job("a", "b"))  # type: ignore[assignment]
    async for count in counter.results():
        count.missing  # type: ignore[attr-defined]  # noqa: B018
    print(text)
    wrong: str = await pool.run(word_total, "a b")  # type: ignore[call-overload]
    await pool.run(word_total, 3)  # type: ignore[call-overload]
    await pool.run(repeat, "a")  # type: ignore[call-overload]
    async for n in pool.map(repeat, ["a"]):  # type: ignore[arg-type]
        print(n, wrong)


if __name__ == "__main__":
    # The worker's ValueError is logged in the parent (with its traceback):
    # keep the example's output to what it prints.
    logging.basicConfig(level=logging.CRITICAL)
    raise SystemExit(asyncio.run(main()) or asyncio.run(functions()))
