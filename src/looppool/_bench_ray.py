"""The standard workloads (W1-W4) on :class:`looppool.ray.RayPool`: the distributed row.

The same workloads, handlers and measurement as ``looppool bench``
(:mod:`looppool._bench`), run on RayPool with ``size`` actors:

* W1: 20,000 tiny messages (``x * 2``) streamed with ``put`` + ``on_result``;
* W2: 2,000 messages that ``await asyncio.sleep(0.05)``;
* W3: 400 messages that burn 2 ms of CPU, then sleep 20 ms;
* W4: 200 sequential ``submit`` round trips of ``x * 2``: p50 and p99.

Each workload gets a fresh pool: its start is timed apart, a warm-up runs
untimed, then ``repeat`` runs are timed. A stream run is timed from the first
``put`` to the arrival of the last result in the parent. CPU per message is
the user + system CPU of this process and all its descendants over the run:
when this function started Ray itself, that includes Ray's daemons and the
actors; on a cluster it covers the driver only.

:func:`run` returns plain numbers (lists named as the fields of the main
harness's ``Result``); ``python -m looppool._bench_ray`` prints them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from ._bench import _handlers
from ._bench._systems import _Counter

__all__ = ["WORKLOADS", "RayCallFloor", "Workload", "main", "render", "run"]


@dataclasses.dataclass(frozen=True)
class Workload:
    """One standard workload, as in the main harness."""

    title: str
    handler: str
    count: int
    quick_count: int
    kind: str  # "rate" | "wall" | "latency"
    warmup: int


WORKLOADS: Final = {
    "W1": Workload("tiny: x * 2, no await", "tiny", 20_000, 400, "rate", 2_000),
    "W2": Workload("io: await asyncio.sleep(0.05)", "io", 2_000, 100, "wall", 200),
    "W3": Workload("mixed: 2 ms CPU, then sleep 20 ms", "mixed", 400, 40, "wall", 40),
    "W4": Workload("latency: sequential round trips of x * 2", "tiny", 200, 30, "latency", 20),
}
#: High enough that neither limits a workload (every W2 message may sleep at once).
CONCURRENCY: Final = 4096
MAX_PENDING: Final = 1 << 20
#: Object store of a Ray instance started here: the workloads move small values.
OBJECT_STORE_BYTES: Final = 100 * 1024 * 1024


def _cpu_seconds() -> float | None:
    """User + system CPU seconds of this process and of every live descendant."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency
        return None
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile ``q`` (0 to 100) of sorted values."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


async def _workload(
    key: str, size: int, count: int, repeat: int, log: Callable[[str], None]
) -> dict[str, Any]:
    from .ray import RayPool

    workload = WORKLOADS[key]
    title, kind, warmup = workload.title, workload.kind, workload.warmup
    stream_cls, reply_cls = _handlers.WORKERS[workload.handler]
    counter = _Counter()
    out: dict[str, Any] = {
        "workload": key,
        "title": title,
        "system": "ray",
        "size": size,
        "count": count,
        "start_seconds": [],
        "wall_seconds": [],
        "rate": [],
        "cpu_us_per_message": [],
        "p50_us": [],
        "p99_us": [],
    }
    reply = kind == "latency"
    pool = RayPool(
        reply_cls if reply else stream_cls,
        size,
        concurrency=CONCURRENCY,
        max_pending=MAX_PENDING,
        on_result=None if reply else counter,
        name=f"bench-ray-{key}",
    )
    t0 = time.perf_counter()
    await pool.start()
    out["start_seconds"].append(time.perf_counter() - t0)
    try:
        if reply:
            for i in range(min(count, warmup)):
                await pool.submit(i)
            for _ in range(repeat):
                latencies = []
                for i in range(count):
                    t0 = time.perf_counter()
                    value = await pool.submit(i)
                    latencies.append(time.perf_counter() - t0)
                    if value != i * 2:
                        raise AssertionError(f"RayPool replied {value!r} to {i}")
                latencies.sort()
                out["p50_us"].append(_percentile(latencies, 50) * 1e6)
                out["p99_us"].append(_percentile(latencies, 99) * 1e6)
                out["wall_seconds"].append(sum(latencies))
        else:

            async def stream(messages: range) -> None:
                done = counter.arm(len(messages))
                for message in messages:
                    await pool.put(message)
                await done

            await stream(range(min(count, warmup)))
            for _ in range(repeat):
                cpu0 = _cpu_seconds()
                t0 = time.perf_counter()
                await stream(range(count))
                wall = time.perf_counter() - t0
                cpu1 = _cpu_seconds()
                out["wall_seconds"].append(wall)
                out["rate"].append(count / wall)
                if cpu0 is not None and cpu1 is not None:
                    out["cpu_us_per_message"].append((cpu1 - cpu0) / count * 1e6)
    finally:
        await pool.stop()
    log(f"{key} on RayPool ({size} actors): done")
    return out


class RayCallFloor:
    """A bare async Ray actor: W4's floor, Ray's own round trip without RayPool."""

    async def call(self, x: int) -> int:
        """Return ``x * 2``."""
        return x * 2


async def _floor(count: int, warmup: int, repeat: int) -> dict[str, Any]:
    import ray

    actor_class: Any = ray.remote(RayCallFloor)  # Ray's stubs do not type actor methods
    actor = actor_class.options(num_cpus=0).remote()
    out: dict[str, Any] = {
        "title": "a bare async Ray actor call returning x * 2 (no RayPool)",
        "count": count,
        "p50_us": [],
        "p99_us": [],
    }
    try:
        for i in range(warmup):
            await actor.call.remote(i)
        for _ in range(repeat):
            latencies = []
            for i in range(count):
                t0 = time.perf_counter()
                await actor.call.remote(i)
                latencies.append(time.perf_counter() - t0)
            latencies.sort()
            out["p50_us"].append(_percentile(latencies, 50) * 1e6)
            out["p99_us"].append(_percentile(latencies, 99) * 1e6)
    finally:
        ray.kill(actor)
    return out


def _ensure_ray(size: int, address: str | None) -> bool:
    """Connect to Ray (or start a small local instance); return whether it was started here."""
    # With this setting Ray binds a local instance to 127.0.0.1 only; it is
    # read when ray is imported, so it has no effect if ray already was.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return False
    if address is None:
        ray.init(
            address="local",
            num_cpus=size,
            include_dashboard=False,
            object_store_memory=OBJECT_STORE_BYTES,
            _node_ip_address="127.0.0.1",
        )
        return True
    ray.init(address=address)
    return False


async def run(
    size: int = 2,
    *,
    address: str | None = None,
    workloads: Sequence[str] = ("W1", "W2", "W3", "W4"),
    quick: bool = False,
    repeat: int = 1,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the standard workloads on RayPool with ``size`` actors; return the numbers.

    ``address=None`` starts a local Ray instance (``num_cpus=size``, no
    dashboard, 127.0.0.1 only) and shuts it down at the end; any other
    address is passed to ``ray.init``, and a process already connected to
    Ray keeps its connection. ``quick`` runs the short counts.

    The result: ``{"system": "ray", "size", "ray_version", "python",
    "started_ray", "workloads": {key: {...}}}``, where each workload holds
    lists (one entry per run) named as the main harness's ``Result``
    fields: ``start_seconds``, ``wall_seconds``, ``rate``,
    ``cpu_us_per_message`` (W1-W3), ``p50_us``, ``p99_us`` (W4). With W4,
    ``"ray_call_floor"`` holds the p50 and p99 of bare async actor calls
    (Ray's own round trip, the floor under RayPool's W4).
    """
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        raise ValueError(f"unknown workloads {unknown}; known: {sorted(WORKLOADS)}")
    say = log if log is not None else (lambda line: None)
    started = _ensure_ray(size, address)
    import ray

    try:
        results: dict[str, Any] = {}
        floor: dict[str, Any] | None = None
        for key in workloads:
            count = WORKLOADS[key].quick_count if quick else WORKLOADS[key].count
            results[key] = await _workload(key, size, count, repeat, say)
            if key == "W4":
                floor = await _floor(count, WORKLOADS[key].warmup, repeat)
    finally:
        if started:
            ray.shutdown()
    return {
        "system": "ray",
        "size": size,
        "ray_version": ray.__version__,
        "python": platform.python_version(),
        "started_ray": started,
        "workloads": results,
        "ray_call_floor": floor,
    }


def _med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def render(report: dict[str, Any]) -> list[str]:
    """The numbers of :func:`run` as a Markdown table."""
    lines = [
        f"RayPool, {report['size']} actors (Ray {report['ray_version']}, "
        f"Python {report['python']}); medians of the runs",
        "",
        "| workload | count | start | wall | rate | CPU/msg | p50 | p99 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in report["workloads"].items():
        latency = bool(r["p50_us"])
        lines.append(
            "| "
            + " | ".join(
                [
                    f"{key} {r['title']}",
                    f"{r['count']:,}",
                    f"{_med(r['start_seconds']):.2f} s",
                    "" if latency else f"{_med(r['wall_seconds']):.3f} s",
                    "" if latency else f"{_med(r['rate']):,.0f} msg/s",
                    f"{_med(r['cpu_us_per_message']):.0f} µs" if r["cpu_us_per_message"] else "",
                    f"{_med(r['p50_us']):,.0f} µs" if latency else "",
                    f"{_med(r['p99_us']):,.0f} µs" if latency else "",
                ]
            )
            + " |"
        )
    floor = report.get("ray_call_floor")
    if floor:
        lines.append(
            f"| W4 floor: {floor['title']} | {floor['count']:,} |  |  |  |  | "
            f"{_med(floor['p50_us']):,.0f} µs | {_med(floor['p99_us']):,.0f} µs |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m looppool._bench_ray``: run the workloads, print a table (or JSON)."""
    parser = argparse.ArgumentParser(prog="python -m looppool._bench_ray", description=__doc__)
    parser.add_argument("--size", type=int, default=2, help="number of actors (default 2)")
    parser.add_argument("--address", default=None, help="Ray address (default: a local instance)")
    parser.add_argument("--quick", action="store_true", help="short counts")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per workload")
    parser.add_argument("--workloads", default="W1,W2,W3,W4", help="comma-separated")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    report = asyncio.run(
        run(
            args.size,
            address=args.address,
            workloads=[w.strip() for w in args.workloads.split(",") if w.strip()],
            quick=args.quick,
            repeat=args.repeat,
            log=lambda line: print(line, file=sys.stderr),
        )
    )
    print(json.dumps(report, indent=2) if args.json else "\n".join(render(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
