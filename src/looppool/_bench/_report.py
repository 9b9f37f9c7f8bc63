"""The tables and the targets of ``looppool bench``.

Every ratio compares a row with the right floor: a row's "vs limit" is the
limit that runs the same kind of handler (for W1 and W4: ``async def`` rows,
the README path among them, against ``limit-async``; ``def`` rows against
the better of ``limit`` and ``limit-asyncio``; in W2, W3 and W5 every
handler is an ``async def``). A target is graded on the ratio as printed
(two decimals), so a line never says "missed" beside a number that reads
as met.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from collections.abc import Callable, Sequence
from typing import Final

from ._handlers import MIXED_CPU
from ._measure import Result
from ._registry import entry
from ._workloads import Workload, w3_bound

__all__ = [
    "README_PATH",
    "Target",
    "render_latency",
    "render_payloads",
    "render_scaling",
    "render_stream",
    "targets",
]

#: The row the targets are graded on: looppool as the README teaches it.
README_PATH: Final = "looppool"


@dataclasses.dataclass
class Target:
    """One target line: what, whether it was met, and the numbers."""

    system: str
    name: str
    met: bool
    detail: str


# ------------------------------------------------------------------ helpers


def med(values: Sequence[float]) -> float:
    """The median."""
    return statistics.median(values)


def _spread(values: Sequence[float], fmt: Callable[[float], str]) -> str:
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(med(values))} [{fmt(min(values))}-{fmt(max(values))}]"


def fmt_rate(v: float) -> str:
    """A rate: ``185,183``."""
    return f"{v:,.0f}"


def fmt_s(v: float) -> str:
    """Seconds: ``0.427``."""
    return f"{v:.3f}"


def fmt_us(v: float) -> str:
    """Microseconds: ``7.5``, or ``1,487``."""
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def _ratio(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            cell.ljust(w) if i == 0 or header[i] == "" else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  " + "  ".join(cells).rstrip())
    lines.insert(1, "  " + "  ".join("-" * w for w in widths))
    return lines


def _best(
    results: Sequence[Result],
    key: Callable[[Result], float],
    *,
    family: str,
    kind: str | None = None,
) -> Result | None:
    """The result of ``family`` (and handler ``kind``, if given) whose ``key`` is least."""
    candidates = [
        r
        for r in results
        if r.ok
        and entry(r.system).family == family
        and (kind is None or entry(r.system).kind == kind)
    ]
    return min(candidates, key=key, default=None)


def _limit_for(
    r: Result, workload: Workload, results: Sequence[Result], key: Callable[[Result], float]
) -> Result | None:
    """The limit ``r`` is compared with: the same handler kind where the kinds differ."""
    kind = entry(r.system).kind if workload.handler == "tiny" else None
    return _best(results, key, family="limit", kind=kind)


def _not_run(results: Sequence[Result], label: Callable[[Result], str]) -> list[str]:
    """Footnotes for the results that have no numbers: skipped, or failed."""
    lines = []
    for r in results:
        if r.skipped is not None:
            lines.append(f"  not run: {label(r)} — {r.skipped}")
        elif r.error is not None:
            lines.append(f"  FAILED: {label(r)} — {r.error}")
    return list(dict.fromkeys(lines))


def cpu_mean(r: Result) -> float | None:
    """CPU µs per message: the mean over the runs.

    The mean, not the median: psutil counts CPU time in clock ticks (10 ms
    on Linux), so one run's figure is coarse; the mean over runs is the
    total CPU over the total messages.
    """
    return statistics.fmean(r.cpu_us_per_message) if r.cpu_us_per_message else None


def _cpu(r: Result) -> str:
    cpu = cpu_mean(r)
    return "n/a" if cpu is None else fmt_us(cpu)


_LIMIT_NOTE: Final = (
    "  vs limit: ÷ the limit running the same kind of handler (async def rows: limit-async; "
    "def rows: the better of limit, limit-asyncio)"
)


# ------------------------------------------------------------------- tables


def render_stream(workload: Workload, count: int, results: Sequence[Result]) -> list[str]:
    """The table of a stream workload (W1, W2, W3)."""
    rate_kind = workload.kind == "rate"
    ok = [r for r in results if r.ok]

    def key(r: Result) -> float:
        return -med(r.rate) if rate_kind else med(r.wall_seconds)

    peer = _best(results, key, family="peer")

    def ratio(r: Result, base: Result | None) -> float | None:
        if base is None:
            return None
        if rate_kind:
            return med(r.rate) / med(base.rate)
        return med(r.wall_seconds) / med(base.wall_seconds)

    main_col = "msgs/s" if rate_kind else "wall s"
    header = ["system", f"{main_col} median [min-max]", "CPU µs/msg mean", "vs limit"]
    header.append("vs best peer")
    if workload.key == "W3":
        header.append("vs CPU bound")
    header.append("start s")
    size = results[0].size if results else 0
    bound = w3_bound(count, size or 1)
    rows = []
    for r in ok:
        row = [
            r.system,
            _spread(r.rate, fmt_rate) if rate_kind else _spread(r.wall_seconds, fmt_s),
            _cpu(r),
            _ratio(ratio(r, _limit_for(r, workload, results, key))),
            _ratio(ratio(r, peer)),
        ]
        if workload.key == "W3":
            row.append(_ratio(med(r.wall_seconds) / bound))
        row.append(fmt_s(med(r.start_seconds)))
        rows.append(row)
    lines = [f"{workload.key} {workload.title} — {count:,} messages, {size} workers"]
    lines += _table(header, rows) if rows else []
    lines += _not_run(results, lambda r: r.system)
    lines.append("  CPU: user + system time of the parent and every worker, per message")
    if rate_kind:
        lines.append("  ratios: msgs/s ÷ the limit's / the best peer's (higher is better)")
        lines.append(_LIMIT_NOTE)
    else:
        lines.append("  ratios: wall time ÷ the limit's / the best peer's (lower is better)")
    if workload.key == "W3":
        lines.append(
            f"  CPU bound: {count} x {MIXED_CPU * 1e3:.0f} ms / "
            f"{min(size, os.cpu_count() or 1)} workers = {bound:.3f} s"
        )
    if peer is not None:
        lines.append(f"  best peer: {peer.system}")
    return lines


def render_latency(workload: Workload, count: int, results: Sequence[Result]) -> list[str]:
    """The table of the round-trip workload (W4)."""
    ok = [r for r in results if r.ok]

    def key(r: Result) -> float:
        return med(r.p50_us)

    peer = _best(results, key, family="peer")

    def ratio(r: Result, base: Result | None, attr: str) -> float | None:
        if base is None:
            return None
        return float(med(getattr(r, attr)) / med(getattr(base, attr)))

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
    rows = []
    for r in ok:
        limit = _limit_for(r, workload, results, key)
        rows.append(
            [
                r.system,
                _spread(r.p50_us, fmt_us),
                _spread(r.p99_us, fmt_us),
                _ratio(ratio(r, limit, "p50_us")),
                _ratio(ratio(r, limit, "p99_us")),
                _ratio(ratio(r, peer, "p50_us")),
                _ratio(ratio(r, peer, "p99_us")),
                fmt_s(med(r.start_seconds)),
            ]
        )
    size = results[0].size if results else 0
    lines = [f"{workload.key} {workload.title} — {count} round trips, {size} workers"]
    lines += _table(header, rows) if rows else []
    lines += _not_run(results, lambda r: r.system)
    lines.append("  ratios: latency ÷ the limit's / the best peer's (lower is better)")
    lines.append(_LIMIT_NOTE)
    if peer is not None:
        lines.append(f"  best peer (by p50): {peer.system}")
    return lines


def render_payloads(workload: Workload, results: Sequence[Result], notes: list[str]) -> list[str]:
    """The table of W5: a row per payload and system."""
    header = [
        "payload",
        "system",
        "messages",
        "MiB/s median [min-max]",
        "vs limit",
        "vs ppe",
        "peak RSS +MiB",
        "x message",
        "start s",
    ]
    rows = []
    for part in dict.fromkeys(r.part for r in results):
        mine = [r for r in results if r.part == part]
        limit = _best(mine, lambda r: -med(r.mib_per_s), family="limit")
        ppe = next((r for r in mine if r.ok and r.system == "ppe"), None)
        for r in (r for r in mine if r.ok):
            rate = med(r.mib_per_s)
            peak = med(r.peak_rss_mib)
            message_mib = _part_mib(part)
            rows.append(
                [
                    part,
                    r.system,
                    str(r.count),
                    _spread(r.mib_per_s, fmt_rate),
                    _ratio(rate / med(limit.mib_per_s) if limit else None),
                    _ratio(rate / med(ppe.mib_per_s) if ppe else None),
                    f"{peak:,.0f}" if peak >= 10 else f"{peak:.1f}",
                    f"{peak / message_mib:.1f}" if message_mib else "",
                    fmt_s(med(r.start_seconds)),
                ]
            )
    size = results[0].size if results else 0
    lines = [f"{workload.key} {workload.title} — {size} workers"]
    lines += _table(header, rows) if rows else []
    lines += _not_run(results, lambda r: f"{r.system} ({r.part})")
    lines += [f"  not run: {note}" for note in notes]
    lines.append(
        "  MiB/s: payload bytes moved both ways (message and its echo) ÷ wall time "
        "(higher is better); vs limit: ÷ limit-oob's, vs ppe: ÷ ProcessPoolExecutor's"
    )
    lines.append(
        "  peak RSS: the parent's peak resident memory during the run, above its size when "
        "the run began; x message: that ÷ one message's size"
    )
    return lines


def _part_mib(part: str) -> float:
    """The message size in MiB of a W5 part label (``"bytes 16 MiB"`` → 16)."""
    words = part.split()
    return float(words[1]) if len(words) == 3 and words[2] == "MiB" else 0.0


def render_scaling(
    system: str, counts: dict[str, int], by_workload: dict[str, list[Result]]
) -> list[str]:
    """W6: W1 and W3 on ``system`` at each size, a row per size."""
    w1 = {r.size: r for r in by_workload.get("W1", []) if r.ok}
    w3 = {r.size: r for r in by_workload.get("W3", []) if r.ok}
    base = w1.get(2)
    header = [
        "workers",
        "W1 msgs/s median [min-max]",
        "W1 CPU µs/msg",
        "W1 vs 2 workers",
        "W3 wall s median [min-max]",
        "W3 CPU bound s",
        "W3 vs bound",
        "start s",
    ]
    rows = []
    for size in sorted({*w1, *w3}):
        a, b = w1.get(size), w3.get(size)
        bound = w3_bound(counts["W3"], size)
        started = [*(a.start_seconds if a else []), *(b.start_seconds if b else [])]
        rows.append(
            [
                str(size),
                _spread(a.rate, fmt_rate) if a else "",
                _cpu(a) if a else "",
                _ratio(med(a.rate) / med(base.rate)) if a and base else "",
                _spread(b.wall_seconds, fmt_s) if b else "",
                fmt_s(bound),
                _ratio(med(b.wall_seconds) / bound) if b else "",
                fmt_s(med(started)),
            ]
        )
    lines = [
        f"W6 scaling: W1 ({counts['W1']:,} messages) and W3 ({counts['W3']:,} messages) on {system}"
    ]
    lines += _table(header, rows) if rows else []
    for key in ("W1", "W3"):

        def label(r: Result, key: str = key) -> str:
            return f"{key}, {r.size} workers"

        lines += _not_run(by_workload.get(key, []), label)
    lines.append(
        "  W3 CPU bound: messages x 2 ms ÷ min(workers, CPUs): more workers than cores "
        "cannot lower it, only add switching"
    )
    return lines


# ------------------------------------------------------------------ targets


def _grade(system: str, name: str, ratio: float, op: str, bound: float, detail: str) -> Target:
    """A ratio target, graded on the ratio as printed (two decimals)."""
    shown = round(ratio, 2)
    met = shown <= bound if op == "≤" else shown >= bound
    return Target(system, name, met, f"{detail}: {shown:.2f}x")


class _Grader:
    """Collects the target lines of one run, and what could not be graded."""

    def __init__(self, by_workload: dict[str, list[Result]]) -> None:
        self.by_workload = by_workload
        self.found: list[Target] = []
        self.missing: list[str] = []

    def find(self, workload: str, system: str = README_PATH) -> Result | None:
        """The measured result of ``system`` in ``workload``."""
        rows = self.by_workload.get(workload, [])
        return next((r for r in rows if r.system == system and r.ok), None)

    def limit(
        self, workload: str, key: Callable[[Result], float], kind: str | None
    ) -> Result | None:
        """The best limit of ``workload`` that runs handlers of ``kind`` (any, if None)."""
        return _best(self.by_workload.get(workload, []), key, family="limit", kind=kind)

    def ratio(
        self,
        name: str,
        mine: float,
        base: float,
        op: str,
        bound: float,
        fmt: Callable[[float], str],
        unit: str = "",
    ) -> None:
        """Grade ``mine / base`` against ``bound``."""
        detail = f"{fmt(mine)} vs {fmt(base)}{unit}"
        self.found.append(_grade(README_PATH, name, mine / base, op, bound, detail))


def targets(
    by_workload: dict[str, list[Result]],
    counts: dict[str, int],
    scaling: dict[str, list[Result]],
) -> tuple[list[Target], list[str]]:
    """Grade the README path against issue 11's targets; and what could not be graded."""
    if not any(r.system == README_PATH for rs in by_workload.values() for r in rs):
        return [], [f"{README_PATH} (the README path) did not run"]
    g = _Grader(by_workload)
    w1 = g.find("W1")
    if w1:
        lim = g.limit("W1", lambda r: -med(r.rate), "async def")
        if lim is None:
            g.missing.append("W1 vs limit-async")
        else:
            cpu, lim_cpu = cpu_mean(w1), cpu_mean(lim)
            if cpu is not None and lim_cpu:
                g.ratio(f"W1 CPU/msg ≤ 1.5 x {lim.system}", cpu, lim_cpu, "≤", 1.5, fmt_us, " µs")
            rate, lim_rate = med(w1.rate), med(lim.rate)
            g.ratio(f"W1 msgs/s ≥ 0.6 x {lim.system}", rate, lim_rate, "≥", 0.6, fmt_rate)
        aiomp = g.find("W1", "aiomp")
        if aiomp is None:
            g.missing.append("W1 vs aiomp")
        else:
            g.ratio("W1 msgs/s ≥ 8 x aiomp", med(w1.rate), med(aiomp.rate), "≥", 8, fmt_rate)
    w2 = g.find("W2")
    if w2:
        lim2 = g.limit("W2", lambda r: med(r.wall_seconds), None)
        if lim2 is None:
            g.missing.append("W2 vs limit")
        else:
            mine, base = med(w2.wall_seconds), med(lim2.wall_seconds)
            g.ratio(f"W2 wall ≤ 1.3 x {lim2.system}", mine, base, "≤", 1.3, fmt_s, " s")
    w3 = g.find("W3")
    if w3:
        bound = w3_bound(counts["W3"], w3.size)
        g.ratio("W3 wall ≤ 1.10 x CPU bound", med(w3.wall_seconds), bound, "≤", 1.10, fmt_s, " s")
    w4 = g.find("W4")
    if w4:
        lim4 = g.limit("W4", lambda r: med(r.p50_us), "async def")
        if lim4 is None:
            g.missing.append("W4 vs limit-async")
        else:
            for attr, label, bound in (("p50_us", "p50", 1.5), ("p99_us", "p99", 2.0)):
                mine, base = med(getattr(w4, attr)), med(getattr(lim4, attr))
                name = f"W4 {label} ≤ {bound:g} x {lim4.system}"
                g.ratio(name, mine, base, "≤", bound, fmt_us, " µs")
    _payload_targets(g, by_workload.get("W5", []))
    _scaling_target(g, scaling.get("W1", []))
    return g.found, g.missing


def _payload_targets(g: _Grader, results: list[Result]) -> None:
    for part in dict.fromkeys(r.part for r in results):
        mine = [r for r in results if r.part == part and r.ok]
        pool = next((r for r in mine if r.system == README_PATH), None)
        if pool is None:
            continue
        for other, bound in (("limit-oob", 0.7), ("ppe", 2.0)):
            base = next((r for r in mine if r.system == other), None)
            if base is None:
                g.missing.append(f"W5 {part} vs {other}")
                continue
            name = f"W5 {part} MiB/s ≥ {bound:g} x {other}"
            g.ratio(name, med(pool.mib_per_s), med(base.mib_per_s), "≥", bound, fmt_rate)


def _scaling_target(g: _Grader, w1: list[Result]) -> None:
    two = next((r for r in w1 if r.ok and r.size == 2), None)
    eight = next((r for r in w1 if r.ok and r.size == 8), None)
    if two and eight:
        name = "W6: W1 at 8 workers ≥ 0.70 x at 2"
        g.ratio(name, med(eight.rate), med(two.rate), "≥", 0.70, fmt_rate, " msgs/s")
