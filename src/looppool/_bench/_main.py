"""The harness: ``looppool bench``'s options, the run, the report.

Five workloads on ``--size`` (2) workers and W6 (scaling), every system in
the same process and the same run, one system at a time (so that one
system's idle polling does not slow another). A measurement starts the
system (timed apart, shown as "start"), warms it up (untimed), times a run,
and stops the system. By default the ``--repeat`` runs are interleaved:
round after round, each system gets one fresh start and one run, so noise
from the rest of the machine falls on every system alike. The tables give
the median and the min-max of the runs (:mod:`._measure` says what is
timed, :mod:`._report` what is compared with what).

The harness learns the systems from :mod:`._registry`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

from . import _ray
from ._measure import Result, series
from ._registry import best_loop, entry, names
from ._report import (
    README_PATH,
    Target,
    cpu_mean,
    med,
    render_latency,
    render_payloads,
    render_scaling,
    render_stream,
    targets,
)
from ._workloads import (
    QUICK_SCALING_SIZES,
    SCALING,
    SCALING_SIZES,
    WORKLOADS,
    Payload,
)

__all__ = ["main"]

_ALL_WORKLOADS = [*WORKLOADS, SCALING]


# -------------------------------------------------------------- the options


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="looppool bench",
        description=(
            "Time looppool against ProcessPoolExecutor, aiomultiprocess and raw-pipe "
            "limits on the standard workloads (W1 tiny, W2 io, W3 mixed, W4 latency, "
            "W5 large payloads) and W6 (W1 and W3 at 1, 2, 4 and 8 workers)."
        ),
    )
    parser.add_argument(
        "--repeat", type=int, default=5, metavar="N", help="timed runs per measurement (5)"
    )
    parser.add_argument(
        "--workloads",
        default=",".join(_ALL_WORKLOADS),
        metavar="LIST",
        help=f"comma-separated, from {', '.join(_ALL_WORKLOADS)} (all)",
    )
    parser.add_argument(
        "--systems",
        default=None,
        metavar="LIST",
        help=f"comma-separated, from {', '.join(names())} (all)",
    )
    parser.add_argument("--size", type=int, default=2, help="worker processes (2)")
    parser.add_argument(
        "--scaling-sizes",
        default=None,
        metavar="LIST",
        help="worker counts of W6 (1,2,4,8; --quick: 1,2)",
    )
    parser.add_argument(
        "--scaling-system",
        default=README_PATH,
        metavar="NAME",
        help=f"the looppool system of W6 ({README_PATH}: the README path)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes, for a smoke test (numbers mean little; targets are not graded)",
    )
    parser.add_argument(
        "--start-method",
        choices=["spawn", "forkserver", "fork", "default"],
        default="spawn",
        help="start method of looppool and ProcessPoolExecutor workers (spawn; "
        "aiomultiprocess and the limits always spawn)",
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


def _split(text: str, known: list[str], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in known]
    if unknown:
        raise ValueError(f"unknown {what}: {', '.join(unknown)}; known: {', '.join(known)}")
    return items


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        args.system_list = _split(args.systems or ",".join(names()), names(), "system")
        args.workload_list = _split(args.workloads.upper(), _ALL_WORKLOADS, "workload")
        sizes = args.scaling_sizes or ",".join(
            map(str, QUICK_SCALING_SIZES if args.quick else SCALING_SIZES)
        )
        args.scaling_size_list = [int(s) for s in sizes.split(",") if s.strip()]
        if entry(args.scaling_system).family != "looppool" or entry(args.scaling_system).on_ray:
            raise ValueError(f"W6 runs a local looppool system, not {args.scaling_system!r}")
        if args.repeat < 1 or args.size < 1 or min(args.scaling_size_list, default=1) < 1:
            raise ValueError("--repeat, --size and the scaling sizes must be ≥ 1")
    except ValueError as exc:
        parser.error(str(exc))
    return args


# ------------------------------------------------------------------ the run


@dataclasses.dataclass
class _Run:
    """What one run measured."""

    counts: dict[str, int]
    payloads: list[tuple[Payload, int]]
    #: Payloads that could not be made here, and why.
    payload_notes: list[str]
    by_workload: dict[str, list[Result]] = dataclasses.field(default_factory=dict)
    #: W6: ``"W1"`` and ``"W3"`` on the scaling system, at each size.
    scaling: dict[str, list[Result]] = dataclasses.field(default_factory=dict)
    #: Why the Ray rows did not run, or None.
    ray_note: str | None = None
    #: Where the Ray rows ran.
    ray_where: str = ""


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def _measure_all(args: argparse.Namespace) -> _Run:
    counts = {k: (w.quick_count if args.quick else w.count) for k, w in WORKLOADS.items()}
    payloads, notes = [], []
    for payload in WORKLOADS["W5"].payloads:
        why = payload.available()
        if why is None:
            payloads.append((payload, payload.quick_count if args.quick else payload.count))
        elif f"{payload.type} payloads — {why}" not in notes:
            notes.append(f"{payload.type} payloads — {why}")
    run = _Run(counts, payloads, notes)
    start_method = None if args.start_method == "default" else args.start_method

    async def measure(jobs: list[tuple[str, int]], key: str) -> list[Result]:
        return await series(
            jobs,
            WORKLOADS[key],
            count=counts[key],
            payloads=payloads if key == "W5" else (),
            repeat=args.repeat,
            interleave=args.interleave,
            start_method=start_method,
            log=_log,
        )

    local = [n for n in args.system_list if not entry(n).on_ray]
    on_ray = [n for n in args.system_list if entry(n).on_ray]
    keys = [k for k in args.workload_list if k != SCALING]
    for key in keys:
        run.by_workload[key] = await measure(_jobs(local, key, args.size), key)
    if SCALING in args.workload_list:
        for key in ("W1", "W3"):
            jobs = [(args.scaling_system, size) for size in args.scaling_size_list]
            run.scaling[key] = await measure(jobs, key)
    if on_ray and any(_jobs(on_ray, key, args.size) for key in keys):
        await _ray_phase(args, run, on_ray, keys, measure)
    return run


def _jobs(systems: list[str], key: str, size: int) -> list[tuple[str, int]]:
    """The (system, size) jobs of workload ``key``: the systems that run it."""
    return [(name, size) for name in systems if key in entry(name).workloads]


async def _ray_phase(
    args: argparse.Namespace,
    run: _Run,
    on_ray: list[str],
    keys: list[str],
    measure: Callable[[list[tuple[str, int]], str], Any],
) -> None:
    """Measure the Ray rows, last and on their own: Ray's daemons live only meanwhile."""
    session = _ray.RaySession(args.size, args.ray_address)
    _log("Ray: connecting (a local instance takes a few seconds to start)")
    t0 = time.perf_counter()
    try:
        run.ray_note = session.open()
        if run.ray_note is None:
            _log(f"Ray: ready in {time.perf_counter() - t0:.1f} s: {session.where}")
    except Exception as exc:  # installed, but it cannot start or connect: a failure
        error = f"Ray did not start: {type(exc).__name__}: {exc}"
        _log(f"  {error}")
        session.close()
        for key in keys:
            for name, size in _jobs(on_ray, key, args.size):
                run.by_workload[key].append(Result(key, name, size, run.counts[key], error=error))
        return
    try:
        if run.ray_note is None:
            run.ray_where = session.where
            for key in keys:
                jobs = _jobs(on_ray, key, args.size)
                if jobs:
                    run.by_workload[key] += await measure(jobs, key)
        else:
            _log(f"  {', '.join(on_ray)}: not run ({run.ray_note})")
    finally:
        session.close()


# --------------------------------------------------------------- the report


def _ray_notes(key: str, results: list[Result], where: str) -> list[str]:
    """Footnotes for the Ray rows of one table: where they ran; RayPool over Ray's floor."""
    ran = [r for r in results if r.ok and entry(r.system).on_ray]
    if not ran:
        return []
    lines = [f"  {', '.join(r.system for r in ran)}: measured after the other systems, on {where}"]
    pool = next((r for r in ran if r.system == "looppool-ray"), None)
    floor = next((r for r in ran if r.system == "ray-call"), None)
    if WORKLOADS[key].kind == "latency" and pool and floor:
        lines.append(
            f"  looppool-ray ÷ ray-call (RayPool over Ray's own round trip): "
            f"p50 {med(pool.p50_us) / med(floor.p50_us):.2f}x, "
            f"p99 {med(pool.p99_us) / med(floor.p99_us):.2f}x"
        )
    return lines


def _deadline_notes(key: str, results: list[Result]) -> list[str]:
    """A footnote: what the deadline options cost, ``looppool-deadlines`` over ``looppool``."""
    ran = {r.system: r for r in results if r.ok}
    with_, without = ran.get("looppool-deadlines"), ran.get(README_PATH)
    if with_ is None or without is None:
        return []
    head = f"  looppool-deadlines ÷ {README_PATH} (message_timeout and hang_timeout set): "
    if WORKLOADS[key].kind == "latency":
        return [
            head + f"p50 {med(with_.p50_us) / med(without.p50_us):.2f}x, "
            f"p99 {med(with_.p99_us) / med(without.p99_us):.2f}x"
        ]
    if WORKLOADS[key].kind != "rate":
        return []
    line = head + f"msgs/s {med(with_.rate) / med(without.rate):.2f}x"
    cpu, base = cpu_mean(with_), cpu_mean(without)
    if cpu is not None and base:  # psutil counts in 10 ms ticks: a quick run may read 0
        line += f", CPU/msg {cpu / base:.2f}x ({cpu - base:+.1f} µs)"
    return [line]


def _sections(args: argparse.Namespace, run: _Run) -> list[list[str]]:
    sections = []
    for key, results in run.by_workload.items():
        workload = WORKLOADS[key]
        if workload.kind == "latency":
            section = render_latency(workload, run.counts[key], results)
        elif workload.kind == "bytes":
            section = render_payloads(workload, results, run.payload_notes)
        else:
            section = render_stream(workload, run.counts[key], results)
        sections.append(
            section + _deadline_notes(key, results) + _ray_notes(key, results, run.ray_where)
        )
    if run.scaling:
        sections.append(render_scaling(args.scaling_system, run.counts, run.scaling))
    return sections


def _print_report(
    args: argparse.Namespace,
    run: _Run,
    graded: list[Target],
    ungraded: list[str],
    load: tuple[float, float],
    out: Callable[[str], None],
) -> None:
    out(
        f"looppool bench — {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}; parent loop {args.parent_loop}, "
        f"start method {args.start_method}; {args.repeat} runs each"
        f"{' (interleaved)' if args.interleave else ''}, "
        f"median [min-max]{' (--quick: small sizes)' if args.quick else ''}"
    )
    out(
        f"load average (1 min) {load[0]:.2f} before, {load[1]:.2f} after: "
        f"on a machine busy with other work, every number is slower and noisier"
    )
    out("")
    for section in _sections(args, run):
        for line in section:
            out(line)
        out("")
    out("Systems:")
    used = [*args.system_list, *([args.scaling_system] if run.scaling else [])]
    width = max(len(n) for n in used)
    for name in dict.fromkeys(used):
        if run.ray_note is None or not entry(name).on_ray:
            out(f"  {name:<{width}}  {entry(name).description.format(loop=best_loop())}")
    if run.ray_note is not None:
        out(f"  {', '.join(n for n in used if entry(n).on_ray)}: not run — {run.ray_note}")
    out("")
    if args.quick:
        out("Targets: graded only in full runs (--quick numbers mean little)")
    elif graded:
        out(f"Targets (issue 11), graded on the README path ({README_PATH}), medians of this run:")
        for t in graded:
            out(f"  [{'met' if t.met else 'MISSED'}] {t.system}: {t.name} — {t.detail}")
        if ungraded:
            out(f"  not graded (a row they compare with did not run): {', '.join(ungraded)}")
    else:
        out(f"Targets: none graded ({'; '.join(ungraded) or 'nothing to compare'})")


async def _run(args: argparse.Namespace, out: Callable[[str], None]) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    run = await _measure_all(args)
    graded, ungraded = ([], []) if args.quick else targets(run.by_workload, run.counts, run.scaling)
    load_after = os.getloadavg()[0]
    _print_report(args, run, graded, ungraded, (load_before, load_after), out)
    on_ray = [n for n in args.system_list if entry(n).on_ray]
    everything = [*(r for rs in run.by_workload.values() for r in rs)]
    everything += [r for rs in run.scaling.values() for r in rs]
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
            "counts": run.counts,
            "payloads": {p.label: n for p, n in run.payloads},
            "systems": args.system_list,
            "workloads": args.workload_list,
            "scaling_system": args.scaling_system,
            "scaling_sizes": args.scaling_size_list,
            "ray_address": args.ray_address,
        },
        "not_run": dict.fromkeys(on_ray, run.ray_note) if run.ray_note is not None else {},
        "results": [dataclasses.asdict(r) for rs in run.by_workload.values() for r in rs],
        "scaling": {k: [dataclasses.asdict(r) for r in rs] for k, rs in run.scaling.items()},
        "targets": [dataclasses.asdict(t) for t in graded],
        "targets_not_graded": ungraded,
        "failed": [
            f"{r.workload}/{r.system}/{r.size}{'/' + r.part if r.part else ''}"
            for r in everything
            if r.error is not None
        ],
    }


# ------------------------------------------------------------ leftovers


def _psutil() -> Any:
    try:
        return importlib.import_module("psutil")
    except ImportError:  # pragma: no cover - psutil is a dependency
        return None


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
    args = _parse(argv)
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
