"""The harness: workloads, measurement, the table, the targets.

Four workloads on ``--size`` (2) workers, every system in the same process
and the same run, one system at a time (so that one system's idle polling
does not slow another). A measurement starts the system (timed apart, shown
as "start"), warms it up (untimed), times a run, and stops the system. By
default the ``--repeat`` runs are interleaved: round after round, each
system gets one fresh start and one run, so noise from the rest of the
machine falls on every system alike. The table gives the median and the
min-max of the runs.

* A stream run is timed from the first submission to the arrival of the last
  result in the parent. Its CPU cost is the user + system CPU time of the
  parent and all its descendant processes over the run (psutil), per message.
* A latency run is ``count`` sequential round trips (send one, await its
  reply, then the next); its p50 and p99 are taken over the round trips of
  the run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from . import _handlers
from ._ray import LATENCY_ONLY, RAY_SYSTEMS, RaySession
from ._systems import (
    ALL_SYSTEMS,
    DEFAULT_SYSTEMS,
    DESCRIPTIONS,
    Skip,
    best_loop,
    make_system,
)

__all__ = ["main"]

Kind = Literal["rate", "wall", "latency"]

#: The W3 bound: all its CPU spread perfectly over the workers.
W3_CPU_SECONDS = _handlers.MIXED_CPU
#: How long one measurement (start, warm-up, repeats, stop) may take.
MEASUREMENT_TIMEOUT = 120.0


@dataclasses.dataclass(frozen=True)
class Workload:
    """One standard workload."""

    key: str
    title: str
    handler: str
    count: int
    quick_count: int
    kind: Kind
    warmup: int


WORKLOADS = {
    "W1": Workload("W1", "tiny: x * 2, no await", "tiny", 20_000, 400, "rate", 2_000),
    "W2": Workload("W2", "io: await asyncio.sleep(0.05)", "io", 2_000, 100, "wall", 200),
    "W3": Workload("W3", "mixed: 2 ms CPU, then sleep 20 ms", "mixed", 400, 40, "wall", 40),
    "W4": Workload(
        "W4", "latency: sequential round trips of x * 2", "tiny", 200, 30, "latency", 20
    ),
}
#: W1 on looppool with 1, 2, 4, 8 workers.
SCALING = "scaling"
DEFAULT_SCALING_SIZES = (1, 2, 4, 8)
QUICK_SCALING_SIZES = (1, 2)


@dataclasses.dataclass
class Result:
    """The measurements of one system on one workload."""

    workload: str
    system: str
    size: int
    count: int
    start_seconds: list[float] = dataclasses.field(default_factory=list)
    wall_seconds: list[float] = dataclasses.field(default_factory=list)
    rate: list[float] = dataclasses.field(default_factory=list)
    cpu_us_per_message: list[float] = dataclasses.field(default_factory=list)
    p50_us: list[float] = dataclasses.field(default_factory=list)
    p99_us: list[float] = dataclasses.field(default_factory=list)
    skipped: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether there are measurements to show."""
        return (
            self.skipped is None and self.error is None and bool(self.wall_seconds or self.p50_us)
        )


@dataclasses.dataclass
class Target:
    """One target line: what, whether it was met, and the numbers."""

    system: str
    name: str
    met: bool
    detail: str


# ------------------------------------------------------------- measurement


def _psutil() -> Any:
    try:
        return importlib.import_module("psutil")
    except ImportError:  # pragma: no cover - psutil is a dependency
        return None


def _cpu_snapshot() -> dict[int, float] | None:
    """CPU seconds (user + system) of this process and of each descendant."""
    psutil = _psutil()
    if psutil is None:  # pragma: no cover
        return None
    me = psutil.Process()
    snapshot: dict[int, float] = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        snapshot[proc.pid] = times.user + times.system
    return snapshot


def _cpu_delta(before: dict[int, float] | None, after: dict[int, float] | None) -> float | None:
    if before is None or after is None:
        return None
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile ``q`` (0 to 100) of sorted values."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


async def _series(
    jobs: Sequence[tuple[str, int]],
    workload: Workload,
    *,
    count: int,
    repeat: int,
    interleave: bool,
    start_method: str | None,
    log: Callable[[str], None],
) -> list[Result]:
    """Measure each (system, size) job ``repeat`` times.

    Interleaved (the default), each round starts every job afresh for one
    run, in an order rotated each round: a burst of noise from elsewhere on
    the machine then spreads over every system instead of landing on one.
    """
    results = [Result(workload.key, name, size, count) for name, size in jobs]
    rounds, runs = (repeat, 1) if interleave else (1, repeat)
    for number in range(rounds):
        shift = number % len(results)
        log(f"{workload.key}: round {number + 1}/{rounds}")
        for result in results[shift:] + results[:shift]:
            if result.skipped is None and result.error is None:
                await _measure(result, workload, runs=runs, start_method=start_method, log=log)
    return results


async def _measure(
    result: Result,
    workload: Workload,
    *,
    runs: int,
    start_method: str | None,
    log: Callable[[str], None],
) -> None:
    """Start the system of ``result``, warm it up, time ``runs`` runs, stop it."""
    name, count = result.system, result.count
    label = f"{name} ({result.size} workers)"
    system = make_system(name, result.size, start_method)
    reply = workload.kind == "latency"
    try:
        system.check(workload.handler, count, reply)
    except Skip as skip:
        result.skipped = str(skip)
        log(f"  {label}: skipped ({skip})")
        return
    try:
        async with asyncio.timeout(MEASUREMENT_TIMEOUT):
            t0 = time.perf_counter()
            try:
                await system.start(workload.handler, reply)
                result.start_seconds.append(time.perf_counter() - t0)
                if reply:
                    await _latency_runs(system, workload, count, runs, result)
                else:
                    await _stream_runs(system, workload, count, runs, result)
            finally:
                await system.stop()
    except Exception as exc:  # one broken system must not hide the others
        result.error = f"{type(exc).__name__}: {exc}"
        log(f"  {label}: FAILED ({result.error})")


async def _stream_runs(
    system: Any, workload: Workload, count: int, repeat: int, result: Result
) -> None:
    messages = list(range(count))
    await system.stream(list(range(min(count, workload.warmup))))
    for _ in range(repeat):
        before = _cpu_snapshot()
        t0 = time.perf_counter()
        await system.stream(messages)
        wall = time.perf_counter() - t0
        cpu = _cpu_delta(before, _cpu_snapshot())
        result.wall_seconds.append(wall)
        result.rate.append(count / wall)
        if cpu is not None:
            result.cpu_us_per_message.append(cpu / count * 1e6)


async def _latency_runs(
    system: Any, workload: Workload, count: int, repeat: int, result: Result
) -> None:
    for i in range(workload.warmup):
        await system.call(i)
    for _ in range(repeat):
        latencies = []
        perf_counter = time.perf_counter
        for i in range(count):
            t0 = perf_counter()
            value = await system.call(i)
            latencies.append(perf_counter() - t0)
            if value != i * 2:
                raise AssertionError(f"{system.name} replied {value!r} to {i}")
        latencies.sort()
        result.p50_us.append(_percentile(latencies, 50) * 1e6)
        result.p99_us.append(_percentile(latencies, 99) * 1e6)
        result.wall_seconds.append(sum(latencies))


# ------------------------------------------------------------------ output


def _med(values: Sequence[float]) -> float:
    return statistics.median(values)


def _spread(values: Sequence[float], fmt: Callable[[float], str]) -> str:
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(_med(values))} [{fmt(min(values))}-{fmt(max(values))}]"


def _fmt_rate(v: float) -> str:
    return f"{v:,.0f}"


def _fmt_s(v: float) -> str:
    return f"{v:.3f}"


def _fmt_us(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def _ratio(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  " + "  ".join(cells).rstrip())
    lines.insert(1, "  " + "  ".join("-" * w for w in widths))
    return lines


def _family(name: str) -> str:
    if name.startswith("limit"):
        return "limit"
    if name == "ppe-batch":
        return "reference"  # needs every message up front: not a streaming peer
    if name == "ray-call":
        return "reference"  # Ray's bare call: the floor under looppool-ray, not a pool
    return "looppool" if name.startswith("looppool") else "peer"


def _best(results: Sequence[Result], family: str, key: Callable[[Result], float]) -> Result | None:
    """The result of ``family`` whose ``key`` (lower is better) is least."""
    candidates = [r for r in results if r.ok and _family(r.system) == family]
    return min(candidates, key=key, default=None)


def _not_run(results: Sequence[Result], label: Callable[[Result], str]) -> list[str]:
    """Footnotes for the results that have no numbers: skipped, or failed."""
    lines = []
    for r in results:
        if r.skipped is not None:
            lines.append(f"  not run: {label(r)} — {r.skipped}")
        elif r.error is not None:
            lines.append(f"  FAILED: {label(r)} — {r.error}")
    return lines


def _cpu(r: Result) -> str:
    # The mean, not the median: psutil counts CPU time in clock ticks (10 ms
    # on Linux), so one run's figure is coarse; the mean over runs is the
    # total CPU over the total messages.
    if not r.cpu_us_per_message:
        return "n/a"
    return _fmt_us(statistics.fmean(r.cpu_us_per_message))


def _render_stream(workload: Workload, count: int, results: Sequence[Result]) -> list[str]:
    rate_kind = workload.kind == "rate"
    ok = [r for r in results if r.ok]

    def key(r: Result) -> float:
        return -_med(r.rate) if rate_kind else _med(r.wall_seconds)

    limit = _best(results, "limit", key)
    peer = _best(results, "peer", key)

    def ratio(r: Result, base: Result | None) -> float | None:
        if base is None:
            return None
        if rate_kind:
            return _med(r.rate) / _med(base.rate)
        return _med(r.wall_seconds) / _med(base.wall_seconds)

    main_col = "msgs/s" if rate_kind else "wall s"
    header = [
        "system",
        f"{main_col} median [min-max]",
        "CPU µs/msg mean",
        "vs limit",
        "vs best peer",
    ]
    if workload.key == "W3":
        header.append("vs CPU bound")
    header.append("start s")
    bound = count * W3_CPU_SECONDS / (results[0].size if results else 1)
    rows = []
    for r in ok:
        row = [
            r.system,
            _spread(r.rate, _fmt_rate) if rate_kind else _spread(r.wall_seconds, _fmt_s),
            _cpu(r),
            _ratio(ratio(r, limit)),
            _ratio(ratio(r, peer)),
        ]
        if workload.key == "W3":
            row.append(_ratio(_med(r.wall_seconds) / bound))
        row.append(_fmt_s(_med(r.start_seconds)))
        rows.append(row)
    size = results[0].size if results else 0
    lines = [
        f"{workload.key} {workload.title} — {count:,} messages, {size} workers",
    ]
    lines += _table(header, rows) if rows else []
    lines += _not_run(results, lambda r: r.system)
    lines.append("  CPU: user + system time of the parent and every worker, per message")
    if rate_kind:
        lines.append("  ratios: msgs/s ÷ the limit's / the best peer's (higher is better)")
    else:
        lines.append("  ratios: wall time ÷ the limit's / the best peer's (lower is better)")
    if workload.key == "W3":
        lines.append(
            f"  CPU bound: {count} x {W3_CPU_SECONDS * 1e3:.0f} ms / {size} workers = {bound:.3f} s"
        )
    if peer is not None:
        lines.append(f"  best peer: {peer.system}")
    return lines


def _render_latency(workload: Workload, count: int, results: Sequence[Result]) -> list[str]:
    ok = [r for r in results if r.ok]
    limit = _best(results, "limit", lambda r: _med(r.p50_us))
    peer = _best(results, "peer", lambda r: _med(r.p50_us))

    def ratio(r: Result, base: Result | None, attr: str) -> float | None:
        if base is None:
            return None
        return _med(getattr(r, attr)) / _med(getattr(base, attr))

    header = [
        "system",
        "p50 µs median [min-max]",
        "p99 µs median [min-max]",
        "p50 vs limit",
        "p99 vs limit",
        "p50 vs peer",
        "p99 vs peer",
        "start s",
    ]
    rows = [
        [
            r.system,
            _spread(r.p50_us, _fmt_us),
            _spread(r.p99_us, _fmt_us),
            _ratio(ratio(r, limit, "p50_us")),
            _ratio(ratio(r, limit, "p99_us")),
            _ratio(ratio(r, peer, "p50_us")),
            _ratio(ratio(r, peer, "p99_us")),
            _fmt_s(_med(r.start_seconds)),
        ]
        for r in ok
    ]
    size = results[0].size if results else 0
    lines = [f"{workload.key} {workload.title} — {count} round trips, {size} workers"]
    lines += _table(header, rows) if rows else []
    lines += _not_run(results, lambda r: r.system)
    lines.append("  ratios: latency ÷ the limit's / the best peer's (lower is better)")
    if peer is not None:
        lines.append(f"  best peer (by p50): {peer.system}")
    return lines


def _render_scaling(count: int, system: str, results: Sequence[Result]) -> list[str]:
    base = next((r for r in results if r.ok and r.size == 2), None)
    header = ["workers", "msgs/s median [min-max]", "CPU µs/msg mean", "vs 2 workers", "start s"]
    rows = []
    for r in [r for r in results if r.ok]:
        rows.append(
            [
                str(r.size),
                _spread(r.rate, _fmt_rate),
                _cpu(r),
                _ratio(_med(r.rate) / _med(base.rate)) if base else "",
                _fmt_s(_med(r.start_seconds)),
            ]
        )
    lines = [f"Scaling: W1 ({count:,} messages) on {system}"]
    lines += _table(header, rows) if rows else []
    lines += _not_run(results, lambda r: f"{r.size} workers")
    return lines


def _ray_notes(workload: Workload, results: Sequence[Result], where: str) -> list[str]:
    """Footnotes for the Ray rows of one table: where they ran; RayPool over Ray's floor."""
    ran = [r for r in results if r.ok and r.system in RAY_SYSTEMS]
    if not ran:
        return []
    names = ", ".join(r.system for r in ran)
    lines = [f"  {names}: measured after the other systems, on {where}"]
    pool = next((r for r in ran if r.system == "looppool-ray"), None)
    floor = next((r for r in ran if r.system == "ray-call"), None)
    if workload.kind == "latency" and pool and floor:
        lines.append(
            f"  looppool-ray ÷ ray-call (RayPool over Ray's own round trip): "
            f"p50 {_med(pool.p50_us) / _med(floor.p50_us):.2f}x, "
            f"p99 {_med(pool.p99_us) / _med(floor.p99_us):.2f}x"
        )
    return lines


def _targets(
    by_workload: dict[str, list[Result]], scaling: list[Result], counts: dict[str, int]
) -> list[Target]:
    """Check each looppool configuration (fair rounds) against the targets."""
    targets: list[Target] = []

    def find(workload: str, system: str) -> Result | None:
        return next((r for r in by_workload.get(workload, []) if r.system == system and r.ok), None)

    names = [
        n
        for n in ("looppool-uvloop", "looppool-asyncio")
        if any(r.system == n for rs in by_workload.values() for r in rs)
    ]
    for name in names:
        w1, aiomp = find("W1", name), find("W1", "aiomp")
        if w1 and aiomp:
            ratio = _med(w1.rate) / _med(aiomp.rate)
            targets.append(
                Target(
                    name,
                    "W1 msgs/s ≥ 4 x aiomultiprocess",
                    ratio >= 4,
                    f"{_fmt_rate(_med(w1.rate))} vs aiomp {_fmt_rate(_med(aiomp.rate))}: "
                    f"{ratio:.1f}x",
                )
            )
        if w1 and w1.cpu_us_per_message:
            cpu = statistics.fmean(w1.cpu_us_per_message)
            targets.append(
                Target(name, "W1 CPU/msg ≤ 15 µs", cpu <= 15, f"{cpu:.1f} µs per message")
            )
        w2 = find("W2", name)
        limit2 = _best(by_workload.get("W2", []), "limit", lambda r: _med(r.wall_seconds))
        if w2 and limit2:
            ratio = _med(w2.wall_seconds) / _med(limit2.wall_seconds)
            targets.append(
                Target(
                    name,
                    "W2 wall ≤ 1.5 x limit",
                    ratio <= 1.5,
                    f"{_med(w2.wall_seconds):.3f} s vs {limit2.system} "
                    f"{_med(limit2.wall_seconds):.3f} s: "
                    f"{ratio:.2f}x",
                )
            )
        w3 = find("W3", name)
        if w3:
            bound = counts["W3"] * W3_CPU_SECONDS / w3.size
            ratio = _med(w3.wall_seconds) / bound
            targets.append(
                Target(
                    name,
                    "W3 wall ≤ 1.10 x CPU bound",
                    ratio <= 1.10,
                    f"{_med(w3.wall_seconds):.3f} s vs {bound:.3f} s: {ratio:.2f}x",
                )
            )
        w4 = find("W4", name)
        limit4 = _best(by_workload.get("W4", []), "limit", lambda r: _med(r.p50_us))
        if w4 and limit4:
            r50 = _med(w4.p50_us) / _med(limit4.p50_us)
            r99 = _med(w4.p99_us) / _med(limit4.p99_us)
            targets.append(
                Target(
                    name,
                    "W4 p50 ≤ 2 x limit",
                    r50 <= 2,
                    f"{_fmt_us(_med(w4.p50_us))} µs vs {limit4.system} "
                    f"{_fmt_us(_med(limit4.p50_us))} µs: "
                    f"{r50:.2f}x",
                )
            )
            targets.append(
                Target(
                    name,
                    "W4 p99 ≤ 3 x limit",
                    r99 <= 3,
                    f"{_fmt_us(_med(w4.p99_us))} µs vs {limit4.system} "
                    f"{_fmt_us(_med(limit4.p99_us))} µs: "
                    f"{r99:.2f}x",
                )
            )
    two = next((r for r in scaling if r.ok and r.size == 2), None)
    eight = next((r for r in scaling if r.ok and r.size == 8), None)
    if two and eight:
        ratio = _med(eight.rate) / _med(two.rate)
        targets.append(
            Target(
                two.system,
                "scaling: 8 workers ≥ 70 % of 2 workers (W1)",
                ratio >= 0.70,
                f"{_fmt_rate(_med(eight.rate))} vs {_fmt_rate(_med(two.rate))} msgs/s: {ratio:.0%}",
            )
        )
    return targets


# -------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="looppool bench",
        description=(
            "Time looppool against ProcessPoolExecutor, aiomultiprocess and a raw-pipe "
            "limit on the standard workloads (W1 tiny, W2 io, W3 mixed, W4 latency) "
            "and W1's scaling with the number of workers."
        ),
    )
    parser.add_argument(
        "--repeat", type=int, default=5, metavar="N", help="timed runs per measurement (5)"
    )
    parser.add_argument(
        "--workloads",
        default=",".join([*WORKLOADS, SCALING]),
        metavar="LIST",
        help=f"comma-separated, from {', '.join([*WORKLOADS, SCALING])} (all)",
    )
    parser.add_argument(
        "--systems",
        default=",".join(DEFAULT_SYSTEMS),
        metavar="LIST",
        help=f"comma-separated, from {', '.join(ALL_SYSTEMS)} (all)",
    )
    parser.add_argument("--size", type=int, default=2, help="worker processes (2)")
    parser.add_argument(
        "--scaling-sizes",
        default=None,
        metavar="LIST",
        help="worker counts for the scaling run (1,2,4,8; --quick: 1,2)",
    )
    parser.add_argument(
        "--scaling-system",
        default=None,
        metavar="NAME",
        help="the looppool system of the scaling run (looppool-uvloop if uvloop is "
        "installed, else looppool-asyncio)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, for a smoke test (numbers mean little)"
    )
    parser.add_argument(
        "--start-method",
        choices=["spawn", "forkserver", "fork", "default"],
        default="spawn",
        help="start method of looppool and ProcessPoolExecutor workers (spawn; "
        "aiomultiprocess and the limit always spawn)",
    )
    parser.add_argument(
        "--parent-loop",
        choices=["asyncio", "uvloop"],
        default="asyncio",
        help="the event loop of the parent, for every system (asyncio)",
    )
    parser.add_argument(
        "--no-interleave",
        dest="interleave",
        action="store_false",
        help="run each system's repeats back to back on one start, instead of one run "
        "per system per round, each on a fresh start",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDRESS",
        help="Ray for the looppool-ray and ray-call rows: by default a local instance "
        "started for them (--size CPUs, 127.0.0.1 only) and shut down after; or an "
        "address for ray.init ('auto', 'host:6379', 'ray://host:10001')",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return parser


def _split(text: str, known: Sequence[str], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in known]
    if unknown:
        raise ValueError(f"unknown {what}: {', '.join(unknown)}; known: {', '.join(known)}")
    return items


async def _run(args: argparse.Namespace, out: Callable[[str], None]) -> dict[str, Any]:
    workload_keys = [k.upper() if k.upper() in WORKLOADS else k for k in args.workload_list]
    start_method = None if args.start_method == "default" else args.start_method
    counts = {k: (w.quick_count if args.quick else w.count) for k, w in WORKLOADS.items()}

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    load_before = os.getloadavg()[0]
    keys = [key for key in workload_keys if key != SCALING]
    local = [name for name in args.system_list if name not in RAY_SYSTEMS]
    on_ray = [name for name in args.system_list if name in RAY_SYSTEMS]

    def jobs(names: list[str], workload: Workload) -> list[tuple[str, int]]:
        return [
            (name, args.size)
            for name in names
            if workload.kind == "latency" or name not in LATENCY_ONLY
        ]

    async def series(names: list[str], key: str) -> list[Result]:
        return await _series(
            jobs(names, WORKLOADS[key]),
            WORKLOADS[key],
            count=counts[key],
            repeat=args.repeat,
            interleave=args.interleave,
            start_method=start_method,
            log=log,
        )

    by_workload: dict[str, list[Result]] = {}
    for key in keys:
        by_workload[key] = await series(local, key) if local else []
    scaling_system = args.scaling_system or (
        "looppool-uvloop" if best_loop() == "uvloop" else "looppool-asyncio"
    )
    scaling: list[Result] = []
    if SCALING in workload_keys:
        scaling = await _series(
            [(scaling_system, size) for size in args.scaling_size_list],
            WORKLOADS["W1"],
            count=counts["W1"],
            repeat=args.repeat,
            interleave=args.interleave,
            start_method=start_method,
            log=log,
        )
    # The Ray rows come last, in a phase of their own: Ray's daemons live
    # only while they are measured (see ._ray).
    ray_note: str | None = None
    ray_where = ""
    if on_ray and keys:
        session = RaySession(args.size, args.ray_address)
        log("Ray: connecting (a local instance takes a few seconds to start)")
        t0 = time.perf_counter()
        try:
            ray_note = session.open()
            if ray_note is None:
                log(f"Ray: ready in {time.perf_counter() - t0:.1f} s: {session.where}")
        except Exception as exc:  # installed, but it cannot start or connect: a failure
            error = f"Ray did not start: {type(exc).__name__}: {exc}"
            log(f"  {error}")
            session.close()
            for key in keys:
                for name, size in jobs(on_ray, WORKLOADS[key]):
                    by_workload[key].append(Result(key, name, size, counts[key], error=error))
        else:
            try:
                if ray_note is None:
                    ray_where = session.where
                    for key in keys:
                        by_workload[key] += await series(on_ray, key)
                else:
                    log(f"  {', '.join(on_ray)}: not run ({ray_note})")
            finally:
                session.close()
    sections: list[list[str]] = []
    for key in keys:
        workload, results = WORKLOADS[key], by_workload[key]
        if workload.kind == "latency":
            section = _render_latency(workload, counts[key], results)
        else:
            section = _render_stream(workload, counts[key], results)
        sections.append(section + _ray_notes(workload, results, ray_where))
    if SCALING in workload_keys:
        sections.append(_render_scaling(counts["W1"], scaling_system, scaling))
    targets = _targets(by_workload, scaling, counts)
    load_after = os.getloadavg()[0]

    loop = best_loop()
    out(
        f"looppool bench — {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}; parent loop {args.parent_loop}, "
        f"start method {args.start_method}; {args.repeat} runs each"
        f"{' (interleaved)' if args.interleave else ''}, "
        f"median [min-max]{' (--quick: small sizes)' if args.quick else ''}"
    )
    out(
        f"load average (1 min) {load_before:.2f} before, {load_after:.2f} after: "
        f"on a machine busy with other work, every number is slower and noisier"
    )
    out("")
    for section in sections:
        for line in section:
            out(line)
        out("")
    out("Systems:")
    for name in dict.fromkeys([*args.system_list, *([scaling_system] if scaling else [])]):
        if ray_note is None or name not in on_ray:
            out(f"  {name:<17} {DESCRIPTIONS[name].format(loop=loop)}")
    if ray_note is not None:
        out(f"  {', '.join(on_ray)}: not run — {ray_note}")
    out("")
    if targets:
        out("Targets (medians of this run):")
        for t in targets:
            out(f"  [{'met' if t.met else 'MISSED'}] {t.system}: {t.name} — {t.detail}")
    else:
        out("Targets: none checked (looppool, or what it is compared with, did not run)")
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average": [load_before, load_after],
        },
        "options": {
            "repeat": args.repeat,
            "size": args.size,
            "quick": args.quick,
            "start_method": args.start_method,
            "parent_loop": args.parent_loop,
            "interleave": args.interleave,
            "counts": counts,
            "systems": args.system_list,
            "workloads": workload_keys,
            "ray_address": args.ray_address,
        },
        "not_run": dict.fromkeys(on_ray, ray_note) if ray_note is not None else {},
        "results": [dataclasses.asdict(r) for rs in by_workload.values() for r in rs],
        "scaling": [dataclasses.asdict(r) for r in scaling],
        "targets": [dataclasses.asdict(t) for t in targets],
        "failed": [
            f"{r.workload}/{r.system}/{r.size}"
            for r in [*[r for rs in by_workload.values() for r in rs], *scaling]
            if r.error is not None
        ],
    }


def _family_tree() -> dict[int, int]:
    """Every descendant of this process: pid to parent pid."""
    psutil = _psutil()
    if psutil is None:  # pragma: no cover
        return {}
    tree = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            tree[proc.pid] = proc.ppid()
        except psutil.Error:
            continue
    return tree


def _leftovers(before: set[int]) -> list[str]:
    """Kill and describe child processes the run started that are still alive (none should be).

    multiprocessing's resource tracker and fork server are left alone: they
    live as long as this interpreter, by design, and end with it. So are the
    processes that existed before the run, and their descendants: a Ray
    instance this process was connected to, with the workers its raylet
    starts, is not the benchmark's to end.
    """
    psutil = _psutil()
    if psutil is None:  # pragma: no cover
        return []
    tree = _family_tree()

    def predates(pid: int) -> bool:
        while pid in tree:
            if pid in before:
                return True
            pid = tree[pid]
        return False

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "resource_tracker" in cmdline or "forkserver" in cmdline or predates(proc.pid):
            continue
        found.append(f"pid {proc.pid}: {cmdline[:120]}")
        try:
            proc.kill()
            proc.wait(5)
        except psutil.Error:
            pass
    return found


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the benchmark, print the tables; see the package."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        args.system_list = _split(args.systems, ALL_SYSTEMS, "system")
        args.workload_list = _split(
            ",".join(k.upper() if k.upper() in WORKLOADS else k for k in args.workloads.split(",")),
            [*WORKLOADS, SCALING],
            "workload",
        )
        sizes = args.scaling_sizes or ",".join(
            map(str, QUICK_SCALING_SIZES if args.quick else DEFAULT_SCALING_SIZES)
        )
        args.scaling_size_list = [int(s) for s in sizes.split(",") if s.strip()]
        if args.scaling_system is not None and args.scaling_system not in ALL_SYSTEMS:
            raise ValueError(f"unknown system {args.scaling_system!r}")
        if args.repeat < 1 or args.size < 1 or min(args.scaling_size_list, default=1) < 1:
            raise ValueError("--repeat, --size and the scaling sizes must be ≥ 1")
    except ValueError as exc:
        parser.error(str(exc))

    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if args.parent_loop == "uvloop":
        factory = importlib.import_module("uvloop").new_event_loop
    lines: list[str] = []

    def out(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    before = set(_family_tree())
    with asyncio.Runner(loop_factory=factory) as runner:
        report = runner.run(_run(args, out))
    left = _leftovers(before)
    report["leftover_processes"] = left
    report["table"] = "\n".join(lines)
    for line in left:
        print(f"error: a child process was left behind and killed: {line}", file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 1 if report["failed"] or left else 0
