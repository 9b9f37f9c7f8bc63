"""A poison message (one that kills every worker it runs in) fails alone.

A SafeWorker's death says nothing about which of the messages it held killed
it, so the pool charges none of them: it runs them again in groups, each
alone on a worker, halving a group that dies again, until the culprit has
killed a worker while it was the only message there twice. Every other
message must then succeed, and only the culprit fail with WorkerLost.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import looppool
import poison_workers as pw
from cli_workers import leftover_processes

TESTS = Path(__file__).resolve().parent
SRC = Path(looppool.__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _quiet_deaths(caplog: pytest.LogCaptureFixture) -> None:
    """The deaths are expected: keep their log records out of the report."""
    caplog.set_level(logging.CRITICAL, logger="looppool")


async def submit_all(pool: looppool.Pool, messages: list[Any]) -> list[Any]:
    """submit() every message at once; each outcome, exceptions included, in order."""
    return await asyncio.gather(*(pool.submit(m) for m in messages), return_exceptions=True)


def failures(outcomes: list[Any]) -> dict[int, BaseException]:
    """The outcomes that are exceptions, by index."""
    return {i: o for i, o in enumerate(outcomes) if isinstance(o, BaseException)}


@pytest.mark.parametrize("concurrency", [1, 10, 1000])
@pytest.mark.parametrize("worker", [pw.AsyncPoisoned, pw.SyncPoisoned])
@pytest.mark.parametrize("distribution", ["rounds", "barrier"])
async def test_poison_message_fails_alone(
    start_method: str, loop_kind: str, distribution: str, worker: Any, concurrency: int
) -> None:
    """200 submits, one of them poison: exactly that one fails with WorkerLost."""
    messages: list[Any] = list(range(200))
    messages[57] = pw.POISON
    pool = looppool.Pool(
        worker,
        size=2,
        start_method=start_method,  # type: ignore[arg-type]
        loop=loop_kind,  # type: ignore[arg-type]
        distribution=distribution,  # type: ignore[arg-type]
        concurrency=concurrency,
    )
    async with pool:
        outcomes = await submit_all(pool, messages)
    results = [r async for r in pool.results()]
    failed = failures(outcomes)
    assert list(failed) == [57]
    assert isinstance(failed[57], looppool.WorkerLost)
    assert failed[57].exitcode == pw.EXIT_CODE
    assert [o for i, o in enumerate(outcomes) if i != 57] == [m for m in messages if m != pw.POISON]
    # At least once: an innocent message may run again, but every one ran.
    assert set(results) == set(range(200)) - {57}
    stats = pool.stats()
    assert (stats.processed, stats.failed, stats.lost) == (199, 0, 1)


async def test_two_poison_messages_fail_and_nothing_else(start_method: str, loop_kind: str) -> None:
    """Two poison messages among 300, in both workers at once: only those two fail."""
    messages: list[Any] = list(range(300))
    messages[10] = messages[11] = pw.POISON  # dealt to worker 0 and to worker 1
    async with looppool.Pool(
        pw.AsyncPoisoned,
        size=2,
        start_method=start_method,  # type: ignore[arg-type]
        loop=loop_kind,  # type: ignore[arg-type]
    ) as pool:
        outcomes = await submit_all(pool, messages)
    failed = failures(outcomes)
    assert sorted(failed) == [10, 11]
    assert all(isinstance(e, looppool.WorkerLost) for e in failed.values())
    assert pool.stats().lost == 2
    assert pool.stats().processed == 298


@pytest.mark.parametrize("distribution", ["rounds", "barrier"])
async def test_poison_message_among_ten_thousand(loop_kind: str, distribution: str) -> None:
    """A poison message among 10,000 put() messages: 9,999 results, one lost."""
    async with looppool.Pool(
        pw.AsyncPoisoned,
        size=2,
        start_method="fork",
        loop=loop_kind,  # type: ignore[arg-type]
        distribution=distribution,  # type: ignore[arg-type]
    ) as pool:
        for i in range(10_000):
            await pool.put(pw.POISON if i == 4321 else i)
        await pool.drain()
        stats = pool.stats()
        assert (stats.processed, stats.lost, stats.pending) == (9_999, 1, 0)
    results = Counter([r async for r in pool.results()])
    assert set(results) == set(range(10_000)) - {4321}


async def test_replies_of_finished_neighbours_are_not_failed(
    start_method: str, loop_kind: str
) -> None:
    """Messages that returned before a poison message killed their worker still succeed."""
    async with looppool.Pool(
        pw.LatePoison,
        size=1,
        start_method=start_method,  # type: ignore[arg-type]
        loop=loop_kind,  # type: ignore[arg-type]
    ) as pool:
        outcomes = await submit_all(pool, [*range(20), pw.POISON, *range(20, 40)])
    failed = failures(outcomes)
    assert list(failed) == [20]
    assert isinstance(failed[20], looppool.WorkerLost)
    assert pool.stats().processed == 40


async def test_plain_worker_pool_still_fails_what_a_death_held(
    start_method: str, loop_kind: str
) -> None:
    """A plain Worker pool redelivers nothing: what the dead worker held is lost."""
    async with looppool.Pool(
        pw.PlainPoisoned,
        size=1,
        start_method=start_method,  # type: ignore[arg-type]
        loop=loop_kind,  # type: ignore[arg-type]
    ) as pool:
        outcomes = await submit_all(pool, [0, 1, pw.POISON, 3])
        assert await pool.submit(4) == 4  # the replacement serves on
    failed = failures(outcomes)
    assert 2 in failed
    assert all(isinstance(e, looppool.WorkerLost) for e in failed.values())
    assert pool.stats().respawns == 1
    assert pool.stats().redelivered == 0


def test_command_line_counts_one_poison_line_as_one_lost(tmp_path: Path) -> None:
    """`looppool run` over 100 lines with one poison line: 99 results, '1 lost', status 1."""
    lines = [f'"{pw.POISON}"' if i == 42 else str(i) for i in range(100)]
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(SRC)
    env["LOOPPOOL_TEST_MARK"] = marker
    proc = subprocess.run(
        [sys.executable, "-m", "looppool", "run", "poison_workers:AsyncPoisoned", "--size", "2"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        cwd=TESTS,
        env=env,
        timeout=60,
    )
    assert leftover_processes(marker) == []
    assert proc.returncode == 1, proc.stderr
    assert sorted(int(line) for line in proc.stdout.split()) == [i for i in range(100) if i != 42]
    assert "1 lost" in proc.stderr, proc.stderr
