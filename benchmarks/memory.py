"""Memory flatness: a million put() and a million submit(), with RSS sampled along the way.

::

    python benchmarks/memory.py [--messages 1000000] [--in-flight 4000] [--samples 10]

Phase "put" sends ``--messages`` small messages with ``put()`` (results go to
an ``on_result`` callback that counts them); phase "submit" sends as many
through ``submit()``, keeping ``--in-flight`` submits awaiting their replies
at once. The RSS of the parent and of each worker is sampled ``--samples``
times per phase. No worker is killed.

A phase is flat when, after the first tenth of it (allocator and caches
warming up), no process's RSS grows by more than ``--tolerance-mb`` (default
8 MB: 8 bytes per message of a million, far below any per-message leak, which
costs at least an object of ~50 bytes). Exits 1 if a phase is not flat or a
message went missing.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    import looppool
except ImportError:  # a checkout, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    import looppool

from soak import MB, Sample, SoakWorker, child_processes, loop_factory


class Memory:
    """One memory run: its counters and samples."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results = 0
        self.bad_replies = 0
        self.samples: dict[str, list[Sample]] = {"put": [], "submit": []}

    def on_result(self, value: int) -> None:
        self.results += 1

    async def put_phase(self, pool: looppool.Pool, started: float) -> None:
        n = self.args.messages
        every = max(n // self.args.samples, 1)
        samples = self.samples["put"]
        samples.append(Sample.take(pool, started))
        for mid in range(n):
            await pool.put(mid)
            if (mid + 1) % every == 0:
                # Sample what the pool holds at this point: the messages put
                # so far that are still pending are part of the picture.
                samples.append(Sample.take(pool, started))
        await pool.drain()
        samples.append(Sample.take(pool, started))

    async def submit_phase(self, pool: looppool.Pool, started: float) -> None:
        n = self.args.messages
        every = max(n // self.args.samples, 1)
        samples = self.samples["submit"]
        samples.append(Sample.take(pool, started))
        in_flight = asyncio.Semaphore(self.args.in_flight)

        async def submit(mid: int) -> None:
            try:
                self.bad_replies += await pool.submit(mid) != mid
            finally:
                in_flight.release()

        async with asyncio.TaskGroup() as tg:
            for mid in range(n):
                await in_flight.acquire()
                tg.create_task(submit(mid))
                if (mid + 1) % every == 0:
                    samples.append(Sample.take(pool, started))
        await pool.drain()
        samples.append(Sample.take(pool, started))

    async def run(self) -> looppool.PoolStats:
        args = self.args
        async with looppool.Pool(
            SoakWorker,
            size=args.size,
            loop=args.loop,
            start_method=args.start_method,
            distribution=args.distribution,
            on_result=self.on_result,
            name="memory",
        ) as pool:
            started = time.monotonic()
            await self.put_phase(pool, started)
            gc.collect()
            await self.submit_phase(pool, started)
        return pool.stats()


def growth(samples: list[Sample]) -> tuple[float, list[float]]:
    """RSS growth in MB of the parent and each worker, from a tenth into the phase to its end."""
    warm = samples[min(1, len(samples) - 1)]
    end = samples[-1]
    workers = [
        (b - a) / MB if a is not None and b is not None else 0.0
        for a, b in zip(warm.worker_rss, end.worker_rss, strict=True)
    ]
    return (end.parent_rss - warm.parent_rss) / MB, workers


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000, help="messages per phase")
    parser.add_argument("--in-flight", type=int, default=4000, help="concurrent submits")
    parser.add_argument("--samples", type=int, default=10, help="samples per phase")
    parser.add_argument("--size", type=int, default=2, help="worker processes")
    parser.add_argument("--tolerance-mb", type=float, default=8.0)
    parser.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto")
    parser.add_argument("--start-method", choices=["fork", "spawn", "forkserver"], default=None)
    parser.add_argument("--distribution", choices=["rounds", "barrier"], default="rounds")
    parser.add_argument("--json", action="store_true", help="print the samples as JSON too")
    args = parser.parse_args(argv)
    if args.messages < args.samples or args.samples < 2 or args.in_flight < 1:
        parser.error("need --messages >= --samples >= 2 and --in-flight >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    memory = Memory(args)
    before = child_processes()
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        stats = runner.run(asyncio.wait_for(memory.run(), 1800))
    problems = []
    report: dict[str, Any] = {}
    for phase, samples in memory.samples.items():
        first, last = samples[0], samples[-1]
        parent, workers = growth(samples)
        seconds = last.elapsed - first.elapsed
        rate = (last.done - first.done) / seconds
        print(f"{phase}: {last.done - first.done:,} messages in {seconds:.1f} s ({rate:,.0f}/s)")
        print(f"  {'done':>10}  {'parent MB':>9}  workers MB")
        for s in samples:
            workers_mb = "  ".join(f"{(r or 0) / MB:6.1f}" for r in s.worker_rss)
            print(f"  {s.done - first.done:>10,}  {s.parent_rss / MB:>9.1f}  {workers_mb}")
        text = ", ".join(f"{w:+.1f}" for w in workers)
        print(f"  growth after warm-up: parent {parent:+.1f} MB, workers {text} MB")
        if max(parent, *workers) > args.tolerance_mb:
            problems.append(f"{phase}: memory grew beyond {args.tolerance_mb} MB")
        report[phase] = {
            "messages": last.done - first.done,
            "seconds": round(seconds, 1),
            "rate_msg_per_s": round(rate),
            "growth_after_warmup_mb": {"parent": round(parent, 1), "workers": workers},
            "samples": [s.as_dict() for s in samples],
        }
    if memory.results != args.messages * 2 or stats.processed != args.messages * 2:
        problems.append(f"{memory.results} results and {stats} for {args.messages * 2} messages")
    if memory.bad_replies:
        problems.append(f"{memory.bad_replies} wrong replies")
    if stats.lost or stats.failed or stats.pending:
        problems.append(f"messages lost, failed or pending: {stats}")
    left = child_processes() - before
    if left:
        problems.append(f"processes left behind: {sorted(left)}")
    if args.json:
        print(json.dumps(report, indent=2))
    sys.stdout.flush()
    for problem in problems:
        print(f"memory: FAILED: {problem}", file=sys.stderr)
    if not problems:
        print("memory: OK, flat", file=sys.stderr)
    return 1 if problems else 0


# The guard matters: spawned workers import this file again (as __mp_main__).
if __name__ == "__main__":
    sys.exit(main())
