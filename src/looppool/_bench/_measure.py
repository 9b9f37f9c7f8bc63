"""Measurement: start a system, warm it up, time its runs, stop it.

* A stream run is timed from the first submission to the arrival of the last
  result in the parent. Its CPU cost is the user + system CPU time of the
  parent and all its descendant processes over the run (psutil), per message.
* A latency run is ``count`` sequential round trips (send one, await its
  reply, then the next); its p50 and p99 are taken over the round trips of
  the run.
* A W5 run streams one payload; its rate is the payload bytes moved both
  ways over the wall time, and the parent's peak RSS above what it was when
  the run began is taken too (:class:`PeakRss`). One start of a system runs
  every payload in turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

from ._registry import Skip, System, make_system
from ._workloads import MIB, Payload, Workload

__all__ = ["MEASUREMENT_TIMEOUT", "PeakRss", "Result", "series"]

#: How long one measurement (start, warm-up, repeats, stop) may take.
MEASUREMENT_TIMEOUT: Final = 120.0
#: W5's warm-up messages, before one of full size.
WARMUP_BYTES: Final = 4096
#: How often the fallback RSS sampler looks, where the kernel keeps no peak.
RSS_SAMPLE_SECONDS: Final = 0.001


@dataclasses.dataclass
class Result:
    """The measurements of one system on one workload (W5: on one payload)."""

    workload: str
    system: str
    size: int
    count: int
    #: W5: the payload's label (``"bytes 1 MiB"``); otherwise empty.
    part: str = ""
    start_seconds: list[float] = dataclasses.field(default_factory=list)
    wall_seconds: list[float] = dataclasses.field(default_factory=list)
    rate: list[float] = dataclasses.field(default_factory=list)
    cpu_us_per_message: list[float] = dataclasses.field(default_factory=list)
    p50_us: list[float] = dataclasses.field(default_factory=list)
    p99_us: list[float] = dataclasses.field(default_factory=list)
    #: W5: payload MiB moved per second, both ways.
    mib_per_s: list[float] = dataclasses.field(default_factory=list)
    #: W5: the parent's peak RSS over the run, above its RSS when the run began.
    peak_rss_mib: list[float] = dataclasses.field(default_factory=list)
    skipped: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether there are measurements to show."""
        return (
            self.skipped is None and self.error is None and bool(self.wall_seconds or self.p50_us)
        )


# ------------------------------------------------------------------ probes


def _psutil() -> Any:
    try:
        return importlib.import_module("psutil")
    except ImportError:  # pragma: no cover - psutil is a dependency
        return None


def cpu_snapshot() -> dict[int, float] | None:
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


def cpu_delta(before: dict[int, float] | None, after: dict[int, float] | None) -> float | None:
    """CPU seconds spent between two snapshots (processes started between them included)."""
    if before is None or after is None:
        return None
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (Linux), or None."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak RSS of this process to its RSS now (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
    except OSError:
        return False
    return True


class PeakRss:
    """The peak resident set size of this process over a ``with`` block, above its start.

    On Linux the kernel keeps the peak (``VmHWM``), reset at the start of the
    block: exact, and free. Elsewhere a thread samples psutil's RSS every
    millisecond (cheap enough for a benchmark; a spike shorter than that can
    be missed).
    """

    def __init__(self) -> None:
        self.growth_bytes = 0
        self._start = 0
        self._kernel = False
        self._sampled = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRss:
        rss = _status_kib("VmRSS")
        self._kernel = rss is not None and _reset_peak() and _status_kib("VmHWM") is not None
        if self._kernel:
            assert rss is not None
            self._start = rss * 1024
        else:
            self._start = self._sampled = self._rss()
            self._thread = threading.Thread(target=self._sample, name="bench-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._kernel:
            peak = (_status_kib("VmHWM") or 0) * 1024
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            peak = max(self._sampled, self._rss())
        self.growth_bytes = max(0, peak - self._start)

    @staticmethod
    def _rss() -> int:
        psutil = _psutil()
        return int(psutil.Process().memory_info().rss) if psutil is not None else 0

    def _sample(self) -> None:
        # Event.wait as the interval: the block's end wakes the sampler at once.
        while not self._stop.wait(RSS_SAMPLE_SECONDS):
            self._sampled = max(self._sampled, self._rss())


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile ``q`` (0 to 100) of sorted values."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


# ------------------------------------------------------------- measuring


async def series(
    jobs: Sequence[tuple[str, int]],
    workload: Workload,
    *,
    count: int,
    payloads: Sequence[tuple[Payload, int]] = (),
    repeat: int,
    interleave: bool,
    start_method: str | None,
    log: Callable[[str], None],
) -> list[Result]:
    """Measure each (system, size) job ``repeat`` times.

    Interleaved (the default), each round starts every job afresh for one
    run, in an order rotated each round: a burst of noise from elsewhere on
    the machine then spreads over every system instead of landing on one.
    W5 (``payloads``: each with its count) has a result per job and payload.
    """
    groups = [
        [Result(workload.key, name, size, n, label) for label, n in _parts(count, payloads)]
        for name, size in jobs
    ]
    rounds, runs = (repeat, 1) if interleave else (1, repeat)
    for number in range(rounds):
        shift = number % len(groups) if groups else 0
        log(f"{workload.key}: round {number + 1}/{rounds}")
        for group in groups[shift:] + groups[:shift]:
            if all(r.skipped is None and r.error is None for r in group):
                await _measure(group, workload, payloads, runs, start_method, log)
    return [r for group in groups for r in group]


def _parts(count: int, payloads: Sequence[tuple[Payload, int]]) -> list[tuple[str, int]]:
    if not payloads:
        return [("", count)]
    return [(payload.label, n) for payload, n in payloads]


async def _measure(
    group: list[Result],
    workload: Workload,
    payloads: Sequence[tuple[Payload, int]],
    runs: int,
    start_method: str | None,
    log: Callable[[str], None],
) -> None:
    """Start the system of ``group``, warm it up, time ``runs`` runs of each part, stop it."""
    first = group[0]
    name, size = first.system, first.size
    label = f"{name} ({size} workers)"
    system = make_system(name, size, start_method)
    reply = workload.kind == "latency"
    try:
        system.check(workload.handler, first.count, reply)
    except Skip as skip:
        for result in group:
            result.skipped = str(skip)
        log(f"  {label}: skipped ({skip})")
        return
    try:
        async with asyncio.timeout(MEASUREMENT_TIMEOUT):
            t0 = time.perf_counter()
            try:
                await system.start(workload.handler, reply)
                started = time.perf_counter() - t0
                for result in group:
                    result.start_seconds.append(started)
                if reply:
                    await _latency_runs(system, workload, runs, first)
                elif payloads:
                    for (payload, _), result in zip(payloads, group, strict=True):
                        await _payload_runs(system, payload, runs, result)
                else:
                    await _stream_runs(system, workload, runs, first)
            finally:
                await system.stop()
    except Exception as exc:  # one broken system must not hide the others
        error = f"{type(exc).__name__}: {exc}"
        for result in group:
            result.error = error
        log(f"  {label}: FAILED ({error})")


async def _stream_runs(system: System, workload: Workload, repeat: int, result: Result) -> None:
    count = result.count
    messages = list(range(count))
    await system.stream(list(range(min(count, workload.warmup))))
    for _ in range(repeat):
        before = cpu_snapshot()
        t0 = time.perf_counter()
        await system.stream(messages)
        wall = time.perf_counter() - t0
        cpu = cpu_delta(before, cpu_snapshot())
        result.wall_seconds.append(wall)
        result.rate.append(count / wall)
        if cpu is not None:
            result.cpu_us_per_message.append(cpu / count * 1e6)


@contextlib.contextmanager
def _checking(system: System, payload: Payload) -> Iterator[None]:
    system.counter.expect = payload.expect
    try:
        yield
        system.counter.check(system.name)
    finally:
        system.counter.expect = None
        system.counter.wrong = None


async def _payload_runs(system: System, payload: Payload, repeat: int, result: Result) -> None:
    count = result.count
    message = payload.make()
    messages = [message] * count
    moved = 2 * count * payload.size
    # Warm-up: small ones for every worker (the first numpy array imports
    # numpy in the worker: 100 ms or more), then one of full size.
    await system.stream([payload.make(WARMUP_BYTES)] * (2 * system.size) + [message])
    with _checking(system, payload):
        for _ in range(repeat):
            with PeakRss() as peak:
                before = cpu_snapshot()
                t0 = time.perf_counter()
                await system.stream(messages)
                wall = time.perf_counter() - t0
                cpu = cpu_delta(before, cpu_snapshot())
            result.wall_seconds.append(wall)
            result.rate.append(count / wall)
            result.mib_per_s.append(moved / MIB / wall)
            result.peak_rss_mib.append(peak.growth_bytes / MIB)
            if cpu is not None:
                result.cpu_us_per_message.append(cpu / count * 1e6)


async def _latency_runs(system: System, workload: Workload, repeat: int, result: Result) -> None:
    for i in range(workload.warmup):
        await system.call(i)
    for _ in range(repeat):
        latencies = []
        perf_counter = time.perf_counter
        for i in range(result.count):
            t0 = perf_counter()
            value = await system.call(i)
            latencies.append(perf_counter() - t0)
            if value != i * 2:
                raise AssertionError(f"{system.name} replied {value!r} to {i}")
        latencies.sort()
        result.p50_us.append(percentile(latencies, 50) * 1e6)
        result.p99_us.append(percentile(latencies, 99) * 1e6)
        result.wall_seconds.append(sum(latencies))
