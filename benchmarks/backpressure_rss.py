"""Results back-pressure: peak RSS while a ``results()`` consumer is slower than the workers.

::

    python benchmarks/backpressure_rss.py [--results 1000000] [--slow-factor 10]
        [--max-results none,4096] [--scenarios stream,fanout-wait,...] [--repeat 3]
        [--workers 2] [--per-message 1000] [--max-pending 10000] [--json out.json]

Two workers put ``--results`` small results (a tuple ``(worker, id)``, about
90 bytes once unpickled in the parent) while one task iterates
``pool.results()`` at a pace ``--slow-factor`` times slower than the rate at
which the pool delivers results to a consumer that does nothing (measured
first, per scenario, with ``max_results=None``). The consumer keeps its pace
by awaiting ``asyncio.sleep`` every few items (every ~2 ms of its schedule),
so it costs no CPU; the parent's loop reads the workers meanwhile. A sampler
task reads the RSS of the parent and of each worker (psutil) every 20 ms; on
Linux the kernel's high-water mark (``VmHWM``) is read too, which no sample
can miss.

Each measured run is a fresh Python process (this script with ``--one``),
so that one run's freed-but-kept heap does not count in the next. "Before"
is ``max_results=None`` (the pool reads its workers as fast as they write,
however far the consumer lags: what every release before ``max_results``
did); "after" is the default, ``max_results=4096``.

The scenarios (``--scenarios``, default all five):

``stream``
    Each message puts one result with ``put_result``; the feeder puts
    ``--results`` messages, then calls ``stop()`` (the README's pattern).
``fanout-wait``
    Each message puts ``--per-message`` results with ``await
    put_result_wait()``, awaiting ``asyncio.sleep(0)`` after each (as a
    handler awaiting I/O between its results would); the feeder calls
    ``stop()`` once the consumer has taken every result.
``fanout-put``
    The same with ``put_result``, which never waits.
``fanout-wait-stop``
    As ``fanout-wait``, but the feeder calls ``stop()`` right after its last
    ``put()``, while the consumer still lags: ``stop()`` (like ``drain()``
    and an awaited ``submit()``) lifts the bound, since it must read what
    the workers still have to send.
``fanout-wait-burst``
    As ``fanout-wait``, but the handler awaits nothing else between its
    ``put_result_wait()`` calls: its loop does not turn, so what it puts is
    not written, and ``put_result_wait()`` finds no reason to wait.

Prints a table (the median of ``--repeat`` runs, and each run's values) and
the whole measurement as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

try:
    import looppool
except ImportError:  # a checkout, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    import looppool

MIB = 1 << 20
SAMPLE_EVERY = 0.02  # seconds between two RSS samples
PACE_SLICE = 0.002  # the consumer sleeps about this often (seconds of its schedule)
CALIBRATION_RESULTS = 200_000  # at most this many results for the rate with a free consumer


@dataclass(frozen=True)
class Scenario:
    """How the workers put their results, and when the feeder stops the pool."""

    name: str
    method: str  # "put_result" or "put_result_wait"
    fanout: bool  # --per-message results per message (else one)
    stop_early: bool  # stop() right after the last put (else once every result is consumed)
    turn: bool = False  # await asyncio.sleep(0) after each result


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("stream", "put_result", fanout=False, stop_early=True),
        Scenario("fanout-wait", "put_result_wait", fanout=True, stop_early=False, turn=True),
        Scenario("fanout-put", "put_result", fanout=True, stop_early=False, turn=True),
        Scenario("fanout-wait-stop", "put_result_wait", fanout=True, stop_early=True, turn=True),
        Scenario("fanout-wait-burst", "put_result_wait", fanout=True, stop_early=False),
    )
}


class Producer(looppool.SafeWorker):
    """``(method, first, count, turn)``: put ``count`` results ``(number, first + i)``.

    With ``turn``, await ``asyncio.sleep(0)`` after each: the loop turns, as
    it would for a handler awaiting I/O between its results.
    """

    async def process_message(self, message: tuple[str, int, int, bool]) -> int:
        method, first, count, turn = message
        number = self.number
        if method == "put_result":
            put = self.put_result
            for i in range(first, first + count):
                put((number, i))
                if turn:
                    await asyncio.sleep(0)
        else:
            put_wait = self.put_result_wait
            for i in range(first, first + count):
                await put_wait((number, i))
                if turn:
                    await asyncio.sleep(0)
        return count


# -- one run, in a process of its own ------------------------------------------------


def high_water_mark(pid: int) -> int | None:
    """The peak RSS the kernel saw for ``pid`` (Linux ``VmHWM``), in bytes; None elsewhere."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Sampler:
    """Peak RSS of the parent and of each worker, sampled on the parent's loop."""

    def __init__(self) -> None:
        self.parent = psutil.Process()
        self.workers: dict[int, psutil.Process] = {}
        self.parent_peak = 0
        self.worker_peak: dict[int, int] = {}
        self.worker_hwm: dict[int, int] = {}
        self.backlog_peak = 0
        self.samples = 0

    def sample(self, pool: looppool.Pool, consumed: int) -> None:
        self.samples += 1
        self.parent_peak = max(self.parent_peak, self.parent.memory_info().rss)
        self.backlog_peak = max(self.backlog_peak, pool.stats().results - consumed)
        for pid in pool.pids:
            if pid is None:
                continue
            try:
                proc = self.workers.get(pid) or self.workers.setdefault(pid, psutil.Process(pid))
                rss = proc.memory_info().rss
            except psutil.Error:
                continue
            self.worker_peak[pid] = max(self.worker_peak.get(pid, 0), rss)
            hwm = high_water_mark(pid)
            if hwm is not None:
                self.worker_hwm[pid] = hwm

    async def run(self, pool: looppool.Pool, consumed: list[int]) -> None:
        while True:
            self.sample(pool, consumed[0])
            await asyncio.sleep(SAMPLE_EVERY)


async def one_run(config: dict[str, Any]) -> dict[str, Any]:
    """Run one scenario once; return what was measured."""
    scenario = SCENARIOS[config["scenario"]]
    total: int = config["results"]
    per_message: int = config["per_message"] if scenario.fanout else 1
    rate: float | None = config["rate"]  # results/s the consumer keeps to; None: as fast as it can
    pool = looppool.Pool(
        Producer,
        size=config["workers"],
        max_results=config["max_results"],
        max_pending=config["max_pending"],
    )
    sampler = Sampler()
    consumed = [0]
    all_consumed = asyncio.Event()
    times: dict[str, float] = {}

    async def feed() -> None:
        first = 0
        while first < total:
            count = min(per_message, total - first)
            await pool.put((scenario.method, first, count, scenario.turn))
            first += count
        times["fed"] = time.perf_counter() - started
        if not scenario.stop_early:
            await all_consumed.wait()
        await pool.stop()

    await pool.start()
    sampler.sample(pool, 0)
    parent_base = sampler.parent.memory_info().rss
    worker_base = max(sampler.worker_peak.values())
    sampling = asyncio.ensure_future(sampler.run(pool, consumed))
    started = time.perf_counter()
    period = 1.0 / rate if rate else 0.0
    every = max(1, int(PACE_SLICE / period)) if period else 0
    async with asyncio.TaskGroup() as tg:
        tg.create_task(feed())
        async for _ in pool.results():
            n = consumed[0] = consumed[0] + 1
            if n == total:
                times["consumed"] = time.perf_counter() - started
                all_consumed.set()
            if every and n % every == 0:
                # Keep the pace: sleep until this item's time on the schedule
                # (sleep(0) if late, which still lets the loop read the workers).
                await asyncio.sleep(max(0.0, started + n * period - time.perf_counter()))
    sampling.cancel()
    stats = pool.stats()
    parent_hwm = high_water_mark(os.getpid())
    return {
        "scenario": scenario.name,
        "max_results": config["max_results"],
        "results": consumed[0],
        "expected": total,
        "messages": stats.put,
        "seconds": round(time.perf_counter() - started, 2),
        "fed_at": round(times.get("fed", 0.0), 2),
        "consumed_at": round(times.get("consumed", 0.0), 2),
        "rate": round(consumed[0] / times["consumed"]) if "consumed" in times else None,
        "target_rate": round(rate) if rate else None,
        "parent_base_mib": round(parent_base / MIB, 1),
        "parent_peak_mib": round(sampler.parent_peak / MIB, 1),
        "parent_hwm_mib": None if parent_hwm is None else round(parent_hwm / MIB, 1),
        "worker_base_mib": round(worker_base / MIB, 1),
        "worker_peak_mib": round(max(sampler.worker_peak.values()) / MIB, 1),
        "worker_hwm_mib": (
            round(max(sampler.worker_hwm.values()) / MIB, 1) if sampler.worker_hwm else None
        ),
        "backlog_peak": sampler.backlog_peak,
        "samples": sampler.samples,
    }


# -- the whole benchmark ---------------------------------------------------------------


def run_child(config: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; return its JSON."""
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"run {config} failed ({done.returncode}):\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if result["results"] != result["expected"]:
        raise RuntimeError(f"run {config} lost results: {result}")
    return result


def parse_max_results(text: str) -> list[int | None]:
    values: list[int | None] = []
    for part in text.split(","):
        part = part.strip().lower()
        if part == "none":
            values.append(None)
        else:
            value = int(part)
            if value < 1:
                raise argparse.ArgumentTypeError(f"max_results must be >= 1 or none: {part}")
            values.append(value)
    return values


def parse_scenarios(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}"
        )
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--results", type=int, default=1_000_000, help="results per run")
    parser.add_argument(
        "--slow-factor",
        type=float,
        default=10.0,
        help="how many times slower than a free consumer the results() consumer is",
    )
    parser.add_argument(
        "--max-results",
        type=parse_max_results,
        default="none,4096",
        metavar="N|none[,...]",
        help="the max_results values to compare ('none': unbounded, the 'before')",
    )
    parser.add_argument(
        "--scenarios",
        type=parse_scenarios,
        default=",".join(SCENARIOS),
        metavar="NAME[,...]",
        help=f"from {', '.join(SCENARIOS)}",
    )
    parser.add_argument("--per-message", type=int, default=1000, help="results per fan-out message")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--max-pending", type=int, default=10_000, help="the pool's max_pending")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement (median)")
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds one run may take before it fails"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("results", "per_message", "workers", "max_pending", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.slow_factor > 0:
        parser.error("--slow-factor must be > 0")
    return args


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 1) if present else None


def fmt(value: object) -> str:
    return "-" if value is None else str(value)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one is not None:
        print(json.dumps(asyncio.run(one_run(json.loads(args.one)))))
        return 0
    base = {
        "results": args.results,
        "per_message": args.per_message,
        "workers": args.workers,
        "max_pending": args.max_pending,
    }
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(),
        "looppool": looppool.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "results": args.results,
        "slow_factor": args.slow_factor,
        "per_message": args.per_message,
        "workers": args.workers,
        "max_pending": args.max_pending,
        "repeat": args.repeat,
        "scenarios": {},
    }
    rows: list[list[str]] = []
    for name in args.scenarios:
        # The rate a consumer that does nothing gets, unbounded: the producers' pace.
        calibration = run_child(
            {
                **base,
                "results": min(args.results, CALIBRATION_RESULTS),
                "scenario": name,
                "max_results": None,
                "rate": None,
            },
            args.timeout,
        )
        free_rate = calibration["rate"]
        rate = free_rate / args.slow_factor
        print(
            f"{name}: a free consumer gets {free_rate:,} results/s; "
            f"the slow one keeps to {rate:,.0f}/s",
            file=sys.stderr,
            flush=True,
        )
        entry: dict[str, Any] = {"free_rate": free_rate, "target_rate": round(rate), "runs": {}}
        report["scenarios"][name] = entry
        for max_results in args.max_results:
            runs = []
            for i in range(args.repeat):
                config = {**base, "scenario": name, "max_results": max_results, "rate": rate}
                run = run_child(config, args.timeout)
                print(f"  max_results={fmt(max_results)} run {i + 1}: {run}", file=sys.stderr)
                runs.append(run)
            key = fmt(max_results)
            entry["runs"][key] = runs
            summary = {
                field: median([r[field] for r in runs])
                for field in (
                    "parent_base_mib",
                    "parent_peak_mib",
                    "parent_hwm_mib",
                    "worker_peak_mib",
                    "worker_hwm_mib",
                    "backlog_peak",
                    "seconds",
                )
            }
            entry.setdefault("median", {})[key] = summary
            rows.append(
                [
                    name,
                    key,
                    fmt(summary["parent_peak_mib"]),
                    fmt(summary["parent_hwm_mib"]),
                    fmt(
                        None
                        if summary["parent_peak_mib"] is None or summary["parent_base_mib"] is None
                        else round(summary["parent_peak_mib"] - summary["parent_base_mib"], 1)
                    ),
                    fmt(summary["worker_peak_mib"]),
                    fmt(summary["worker_hwm_mib"]),
                    f"{int(summary['backlog_peak'] or 0):,}",
                    fmt(summary["seconds"]),
                ]
            )
    header = [
        "scenario",
        "max_results",
        "parent peak RSS MiB",
        "parent VmHWM MiB",
        "parent growth MiB",
        "worker peak RSS MiB",
        "worker VmHWM MiB",
        "unread results, peak",
        "seconds",
    ]
    print(f"\n{args.results:,} results, consumer {args.slow_factor:g}x slower, ", end="")
    print(
        f"median of {args.repeat} run(s), {args.workers} workers, max_pending={args.max_pending}\n"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    text = json.dumps(report, indent=2)
    print()
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


# The guard matters: spawned worker processes import this file again (as
# ``__mp_main__``), and must not start a benchmark of their own.
if __name__ == "__main__":
    sys.exit(main())
