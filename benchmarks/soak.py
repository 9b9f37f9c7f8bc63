"""Soak run: millions of small messages through a SafeWorker pool while workers get SIGKILL.

::

    python benchmarks/soak.py [--seconds 150] [--messages 20000000] [--kill-every 3] ...
    nox -s soak -- --seconds 60

The feeder puts message ids 0, 1, 2, ... (one in ``--submit-every`` goes through
``submit()`` instead, with at most ``--submits-in-flight`` awaiting their
replies) until ``--messages`` are accepted or ``--seconds`` have passed; a
killer task sends SIGKILL to a random working worker every ``--kill-every``
seconds. Every message puts its id as a result; the parent counts how many
times it saw each id. At the end the pool stops, and the run checks that:

* every accepted id was processed at least once (distinct ids seen == accepted);
* no message was lost or failed, and the pool's counts add up;
* every submit got its own id back;
* no worker process is left.

It prints the counts, respawns, rate, and the RSS of the parent and of the
workers (psutil) at the start, middle and end, and exits 1 if a check failed,
2 if the run did not finish within its deadline. ``--json`` prints the
summary as JSON as well.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

try:
    import looppool
except ImportError:  # a checkout, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    import looppool

MB = 1024 * 1024
PID_REQUEST = -1  # the message asking a worker for its pid
#: multiprocessing helpers that live as long as the interpreter, not pool workers.
HELPERS = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")


class SoakWorker(looppool.SafeWorker):
    """Puts the message (an id) as its one result and replies with it."""

    def process_message(self, message: int) -> int:
        if message == PID_REQUEST:
            return os.getpid()
        self.put_result(message)
        return message


# -- measuring ----------------------------------------------------------------


def rss(pid: int) -> int | None:
    """The resident set size of a process in bytes, or None if it is gone."""
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None


@dataclasses.dataclass(frozen=True)
class Sample:
    """Memory and progress at one moment of a run."""

    elapsed: float
    done: int  # messages finished (processed, failed or lost)
    parent_rss: int
    worker_rss: tuple[int | None, ...]

    @classmethod
    def take(cls, pool: looppool.Pool, started: float) -> Sample:
        stats = pool.stats()
        return cls(
            elapsed=time.monotonic() - started,
            done=stats.processed + stats.failed + stats.lost,
            parent_rss=rss(os.getpid()) or 0,
            worker_rss=tuple(None if pid is None else rss(pid) for pid in pool.pids),
        )

    def describe(self) -> str:
        workers = " ".join("-" if r is None else f"{r / MB:.1f}" for r in self.worker_rss)
        return f"parent {self.parent_rss / MB:.1f} MB, workers {workers} MB"

    def as_dict(self) -> dict[str, Any]:
        return {
            "elapsed": round(self.elapsed, 2),
            "done": self.done,
            "parent_rss_mb": round(self.parent_rss / MB, 1),
            "worker_rss_mb": [None if r is None else round(r / MB, 1) for r in self.worker_rss],
        }


def child_processes() -> set[int]:
    """Pids of this process's descendants, multiprocessing's helpers excepted."""
    found = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if not any(helper in cmdline for helper in HELPERS):
            found.add(proc.pid)
    return found


def kill_worker(pid: int) -> bool:
    """SIGKILL ``pid`` if it is still our child (so not a recycled pid); return whether it was."""
    try:
        if psutil.Process(pid).ppid() != os.getpid():
            return False
        os.kill(pid, signal.SIGKILL)
    except (psutil.Error, ProcessLookupError):
        return False
    return True


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The parent's event loop: uvloop for "uvloop" (and "auto" when installed)."""
    if kind != "asyncio":
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise
        else:
            factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
            return factory
    return asyncio.new_event_loop


# -- the run ------------------------------------------------------------------


@dataclasses.dataclass
class Soak:
    """The state of one soak run."""

    args: argparse.Namespace
    seen: bytearray
    accepted: int = 0  # ids 0 .. accepted-1 were accepted by put() or submit()
    submitted: int = 0
    bad_replies: int = 0
    submit_errors: int = 0
    kills: int = 0
    pid_requests: int = 0
    samples: list[Sample] = dataclasses.field(default_factory=list)

    def on_result(self, mid: int) -> None:
        count = self.seen[mid]  # 1 + the number of times it was seen, up to 255
        if count < 255:
            self.seen[mid] = count + 1

    async def feed(self, pool: looppool.Pool, deadline: float) -> None:
        """Put ids until --messages are accepted or the deadline passes."""
        every = self.args.submit_every
        in_flight = asyncio.Semaphore(self.args.submits_in_flight)
        clock = time.monotonic

        async def submit(mid: int) -> None:
            try:
                reply = await pool.submit(mid)
            except looppool.LooppoolError as exc:
                self.submit_errors += 1
                print(f"submit({mid}) raised {exc!r}", file=sys.stderr)
            else:
                self.bad_replies += reply != mid
            finally:
                in_flight.release()

        async with asyncio.TaskGroup() as tg:
            for mid in range(self.args.messages):
                if not mid & 0x3FF and clock() >= deadline:
                    break
                if every and mid % every == 0:
                    await in_flight.acquire()
                    tg.create_task(submit(mid))
                    self.submitted += 1
                else:
                    await pool.put(mid)
                self.accepted = mid + 1

    async def kill_now_and_then(self, pool: looppool.Pool) -> None:
        """Every --kill-every seconds, SIGKILL a random worker that is up and working."""
        rng = random.Random(self.args.seed)
        while True:
            await asyncio.sleep(self.args.kill_every)  # pacing, not synchronisation
            number = rng.randrange(pool.size)
            # Ask the worker for its pid: the reply proves it is running, not
            # starting (a replacement killed while starting counts towards
            # the pool's crash-loop limit, which is another test).
            self.pid_requests += 1
            pid = await pool.submit(PID_REQUEST, worker=number)
            if kill_worker(pid):
                self.kills += 1

    async def sample_now_and_then(self, pool: looppool.Pool, started: float) -> None:
        while True:
            await asyncio.sleep(self.args.sample_every)
            sample = Sample.take(pool, started)
            self.samples.append(sample)
            stats = pool.stats()
            print(
                f"[{sample.elapsed:6.1f}s] accepted {self.accepted:>10,}  done {sample.done:>10,}"
                f"  {sample.done / max(sample.elapsed, 1e-9):>9,.0f} msg/s  kills {self.kills:>3}"
                f"  respawns {stats.respawns:>3}  redelivered {stats.redelivered:>4}"
                f"  {sample.describe()}",
                file=sys.stderr,
                flush=True,
            )

    async def run(self) -> looppool.PoolStats:
        args = self.args
        pool = looppool.Pool(
            SoakWorker,
            size=args.size,
            loop=args.loop,
            start_method=args.start_method,
            distribution=args.distribution,
            on_result=self.on_result,
            max_pending=args.max_pending,
            name="soak",
        )
        await pool.start()
        started = time.monotonic()
        self.samples.append(Sample.take(pool, started))
        print(
            f"soak: {args.size} workers ({pool.loop_kind}, {pool.start_method}, "
            f"{args.distribution}), up to "
            f"{args.messages:,} messages or {args.seconds:g} s, a kill every "
            f"{args.kill_every:g} s; at start: {self.samples[0].describe()}",
            file=sys.stderr,
            flush=True,
        )
        background: list[asyncio.Task[None]] = []
        try:
            background = [
                asyncio.create_task(self.kill_now_and_then(pool)),
                asyncio.create_task(self.sample_now_and_then(pool, started)),
            ]
            await self.feed(pool, started + args.seconds)
            await pool.drain()
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            self.samples.append(Sample.take(pool, started))
            await pool.stop(timeout=args.stop_timeout)
        return pool.stats()


def summarise(soak: Soak, stats: looppool.PoolStats, elapsed: float) -> dict[str, Any]:
    """The figures and the verdict of a finished run."""
    accepted = soak.accepted
    window = soak.seen[:accepted]
    distinct = accepted - window.count(1)
    duplicates = sum(window) - accepted - distinct
    samples = soak.samples
    middle = min(samples, key=lambda s: abs(s.elapsed - samples[-1].elapsed / 2))
    problems = []
    if distinct != accepted:
        problems.append(f"{accepted - distinct} accepted messages never ran")
    if stats.lost or stats.failed:
        problems.append(f"{stats.lost} lost and {stats.failed} failed messages")
    if stats.pending or stats.put != stats.processed + stats.failed + stats.lost:
        problems.append(f"the counts do not add up: {stats}")
    if stats.put != accepted + soak.pid_requests:
        problems.append(f"{stats.put} messages put, but {accepted} ids and pid requests sent")
    if soak.bad_replies or soak.submit_errors:
        problems.append(f"{soak.bad_replies} wrong replies and {soak.submit_errors} submit errors")
    if soak.kills and not stats.respawns:
        problems.append("workers were killed but none was replaced")
    return {
        "elapsed_s": round(elapsed, 1),
        "accepted": accepted,
        "submitted": soak.submitted,
        "processed": stats.processed,
        "distinct_seen": distinct,
        "duplicate_results": duplicates,
        "redelivered": stats.redelivered,
        "lost": stats.lost,
        "failed": stats.failed,
        "kills": soak.kills,
        "respawns": stats.respawns,
        # From the first put to the last result: start and stop are not counted.
        "rate_msg_per_s": round(samples[-1].done / samples[-1].elapsed),
        "memory": {
            "start": samples[0].as_dict(),
            "middle": middle.as_dict(),
            "end": samples[-1].as_dict(),
        },
        "problems": problems,
    }


def print_summary(summary: dict[str, Any]) -> None:
    mem = summary["memory"]
    lines = [
        f"elapsed        {summary['elapsed_s']:.1f} s",
        f"accepted       {summary['accepted']:,} ({summary['submitted']:,} through submit)",
        f"processed      {summary['processed']:,}  (distinct ids seen: "
        f"{summary['distinct_seen']:,}; duplicate results: {summary['duplicate_results']:,})",
        f"redelivered    {summary['redelivered']:,}",
        f"lost / failed  {summary['lost']:,} / {summary['failed']:,}",
        f"kills          {summary['kills']}  (respawns: {summary['respawns']})",
        f"rate           {summary['rate_msg_per_s']:,} messages/s",
    ]
    for when in ("start", "middle", "end"):
        m = mem[when]
        workers = " ".join("-" if r is None else f"{r:.1f}" for r in m["worker_rss_mb"])
        lines.append(
            f"RSS {when:<6}     parent {m['parent_rss_mb']:.1f} MB, workers {workers} MB"
            f"  (at {m['elapsed']:.0f} s, {m['done']:,} done)"
        )
    print("\n".join(lines))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=150.0, help="feed for at most this long")
    parser.add_argument(
        "--messages", type=int, default=20_000_000, help="feed at most this many messages"
    )
    parser.add_argument("--size", type=int, default=2, help="worker processes")
    parser.add_argument("--kill-every", type=float, default=3.0, help="seconds between kills")
    parser.add_argument(
        "--submit-every",
        type=int,
        default=10,
        help="every Nth message is submitted (0: none)",
    )
    parser.add_argument("--submits-in-flight", type=int, default=1000)
    parser.add_argument("--max-pending", type=int, default=10_000)
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto")
    parser.add_argument("--start-method", choices=["fork", "spawn", "forkserver"], default=None)
    parser.add_argument("--distribution", choices=["rounds", "barrier"], default="rounds")
    parser.add_argument("--stop-timeout", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=None, help="seed of the kill schedule")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON too")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.seconds <= 0 or args.kill_every <= 0 or args.sample_every <= 0:
        parser.error("--messages, --seconds, --kill-every and --sample-every must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # One counter byte per id, starting at 1. Filled, not zeroed (a zeroed
    # bytearray is calloc'ed: its pages would join the RSS only as ids are
    # counted, and look like growth of the pool).
    soak = Soak(args, bytearray(b"\x01") * args.messages)
    before = child_processes()
    started = time.monotonic()
    # The whole run has a deadline: feeding, draining and stopping included.
    limit = args.seconds + args.stop_timeout + 120.0
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        try:
            stats = runner.run(asyncio.wait_for(soak.run(), limit))
        except TimeoutError:
            print(f"soak: FAILED, the run did not finish within {limit:g} s", file=sys.stderr)
            return 2
    elapsed = time.monotonic() - started
    summary = summarise(soak, stats, elapsed)
    left = child_processes() - before
    if left:
        summary["problems"].append(f"processes left behind: {sorted(left)}")
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    print_summary(summary)
    if args.json:
        print(json.dumps(summary, indent=2))
    sys.stdout.flush()
    if summary["problems"]:
        for problem in summary["problems"]:
            print(f"soak: FAILED: {problem}", file=sys.stderr)
        return 1
    print("soak: OK, every accepted message was processed at least once", file=sys.stderr)
    return 0


# The guard matters: spawned workers import this file again (as __mp_main__).
if __name__ == "__main__":
    sys.exit(main())
