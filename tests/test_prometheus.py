"""looppool.metrics.PrometheusCollector, and the worker gauges a pool forwards to its parent.

Scrapes are parsed back with prometheus_client's own parser. Needs the
``prometheus`` extra (in the ``test`` extra).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "prometheus_client", reason="prometheus_client is not installed (extra prometheus)"
)

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import looppool
import pool_workers as w
from looppool._monitor import WorkerMonitor
from looppool.metrics import PrometheusCollector
from looppool.testing import InlinePool

SRC = Path(looppool.__file__).resolve().parent.parent
DEADLINE = 10.0  # seconds a wait for a report may take before the test fails

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(*pools: Any) -> Samples:
    """Register a collector of ``pools`` in a fresh registry, scrape it, parse the text back."""
    registry = CollectorRegistry()
    registry.register(PrometheusCollector(*pools))
    text = generate_latest(registry).decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, pool: str, worker: int | None = None) -> float | None:
    """One sample's value, or None if the scrape has no such sample."""
    labels = {"pool": pool} if worker is None else {"pool": pool, "worker": str(worker)}
    return samples.get((name, tuple(sorted(labels.items()))))


async def test_a_scrape_after_a_known_workload(start_method: str, loop_kind: str) -> None:
    """Counters, pending, in-flight and every worker's resource gauges, as the pool counts them."""
    starting = time.time()
    async with looppool.Pool(
        w.Raising,
        size=2,
        name="known",
        worker_metrics=True,
        start_method=start_method,
        loop=loop_kind,
    ) as pool:
        ready = time.time()
        for number in range(6):
            await pool.put(number)  # 6 processed, a result each
        await pool.put("raise")
        await pool.put("raise")  # 2 failed (logged in the parent)
        assert await pool.submit("x") == "x"  # 1 processed, 1 result
        await pool.broadcast("b")  # 2 processed, 2 results
        await pool.drain()
        samples = scrape(pool)
    expected = {
        "looppool_messages_put_total": 11,
        "looppool_messages_processed_total": 9,
        "looppool_messages_failed_total": 2,
        "looppool_messages_lost_total": 0,
        "looppool_messages_redelivered_total": 0,
        "looppool_results_total": 9,
        "looppool_worker_respawns_total": 0,
        "looppool_worker_blocked_loops_total": 0,
        "looppool_messages_pending": 0,
        "looppool_workers": 2,
    }
    assert {name: value(samples, name, "known") for name in expected} == expected
    for number in range(2):
        assert value(samples, "looppool_messages_in_flight", "known", number) == 0
        rss = value(samples, "looppool_worker_rss_bytes", "known", number)
        peak = value(samples, "looppool_worker_peak_rss_bytes", "known", number)
        assert rss is not None
        assert peak is not None
        assert 0 < rss <= peak
        tasks = value(samples, "looppool_worker_loop_tasks", "known", number)
        assert tasks is not None
        assert tasks >= 1
        lag = value(samples, "looppool_worker_loop_lag_seconds", "known", number)
        assert lag is not None
        assert lag >= 0
        started = value(samples, "looppool_worker_start_time_seconds", "known", number)
        assert started is not None
        assert starting < started < ready


async def test_a_killed_worker_is_counted_and_its_gauges_are_replaced(
    start_method: str, loop_kind: str
) -> None:
    """SIGKILL a worker: respawns_total is 1, and its gauges are the replacement's."""
    async with looppool.Pool(
        w.Info,
        size=2,
        name="killed",
        worker_metrics=True,
        start_method=start_method,
        loop=loop_kind,
    ) as pool:
        old_pid = await pool.submit("pid", worker=0)
        before = scrape(pool)
        started = value(before, "looppool_worker_start_time_seconds", "killed", 0)
        assert started is not None
        killed_at = time.time()
        os.kill(old_pid, signal.SIGKILL)
        # A message directed to worker 0 waits for its replacement, which
        # reports its gauges before it says it is ready.
        new_pid = await pool.submit("pid", worker=0)
        assert new_pid != old_pid
        after = scrape(pool)
    assert value(after, "looppool_worker_respawns_total", "killed") == 1
    assert value(after, "looppool_messages_lost_total", "killed") == 0
    replaced = value(after, "looppool_worker_start_time_seconds", "killed", 0)
    assert replaced is not None
    assert started < killed_at < replaced
    rss = value(after, "looppool_worker_rss_bytes", "killed", 0)
    assert rss is not None
    assert rss > 0
    # The other worker is the one it was.
    other = value(after, "looppool_worker_start_time_seconds", "killed", 1)
    assert other is not None
    assert other < killed_at
    assert other == value(before, "looppool_worker_start_time_seconds", "killed", 1)


async def test_without_worker_metrics_only_the_parents_counts_are_exposed(
    loop_kind: str,
) -> None:
    """worker_metrics is off by default: the workers forward nothing; counters still work."""
    async with looppool.Pool(w.Echo, size=2, name="plain", loop=loop_kind) as pool:
        await pool.submit(1)
        samples = scrape(pool)
        assert pool.worker_metrics() == {}
    assert value(samples, "looppool_messages_processed_total", "plain") == 1
    assert not [
        name
        for name, _ in samples
        if name.startswith("looppool_worker_")
        # The pool's counters of workers are not forwarded gauges.
        and not name.startswith(
            (
                "looppool_worker_respawns",
                "looppool_worker_blocked",
                "looppool_worker_recycled",
                "looppool_worker_hung",
            )
        )
    ]


async def test_worker_metrics_are_read_only_snapshots(loop_kind: str) -> None:
    """pool.worker_metrics() maps each worker number to a read-only mapping of its gauges."""
    async with looppool.Pool(w.Echo, size=2, worker_metrics=True, loop=loop_kind) as pool:
        metrics = pool.worker_metrics()
    assert sorted(metrics) == [0, 1]
    gauges = metrics[0]
    assert {"rss", "maxrss", "loop.lag", "loop.tasks", "start_time"} <= set(gauges)
    assert "cpu" not in gauges  # the first report's share of a core would mean nothing
    with pytest.raises(TypeError):
        gauges["rss"] = 0  # type: ignore[index]


def test_worker_metrics_must_be_a_bool() -> None:
    """A mistaken worker_metrics value fails in the constructor."""
    with pytest.raises(TypeError, match="worker_metrics must be True or False"):
        looppool.Pool(w.Echo, size=1, worker_metrics="yes")  # type: ignore[arg-type]


async def test_the_monitor_forwards_a_report_every_interval(loop_kind: str) -> None:
    """A WorkerMonitor with worker_metrics sends a first report at once, then one per interval."""
    reports: list[dict[str, float]] = []
    two = asyncio.Event()

    def received(gauges: dict[str, float]) -> None:
        reports.append(gauges)
        if len(reports) == 2:
            two.set()

    monitor = WorkerMonitor(
        loop=asyncio.get_running_loop(),
        number=0,
        pool_name="unit",
        statsd=None,
        statsd_prefix=None,
        interval=0.02,
        blocking_threshold=None,
        counters=dict,
        worker_metrics=True,
        on_metrics=received,
    )
    starting = time.time()
    monitor.start()
    try:
        assert len(reports) == 1  # sent by start() itself, before the worker says it is ready
        async with asyncio.timeout(DEADLINE):
            await two.wait()
    finally:
        await monitor.aclose()
    first, second = reports
    assert "cpu" not in first
    assert second["cpu"] >= 0
    assert starting <= first["start_time"] <= time.time()
    for report in (first, second):
        assert report["start_time"] == first["start_time"]
        assert report["rss"] > 0
        assert report["loop.tasks"] >= 1


class FakePool:
    """Any object with a name, stats() and worker_metrics() is a pool to the collector."""

    def __init__(self, name: str, metrics: Mapping[int, Mapping[str, float]]) -> None:
        self.name = name
        self.metrics = metrics

    def stats(self) -> looppool.PoolStats:
        return looppool.PoolStats(
            put=7, processed=3, failed=1, lost=1, results=5, pending=2, redelivered=1,
            respawns=1, blocked=4, in_flight=(1, 1, 0), cancelled=6, timed_out=8, recycled=9,
            hung=10,
        )  # fmt: skip

    def worker_metrics(self) -> Mapping[int, Mapping[str, float]]:
        return self.metrics


def test_names_units_and_labels() -> None:
    """Each PoolStats field and forwarded gauge becomes its metric, in base units."""
    gauges = {
        "cpu": 0.5, "rss": 1000.0, "maxrss": 2000.0, "loop.lag": 250.0, "loop.tasks": 7.0,
        "loop.ready": 2.0, "loop.timers": 3.0, "start_time": 1.5e9,
    }  # fmt: skip
    samples = scrape(FakePool("fake", {2: gauges}))
    pool = {
        "looppool_messages_put_total": 7,
        "looppool_messages_processed_total": 3,
        "looppool_messages_failed_total": 1,
        "looppool_messages_lost_total": 1,
        "looppool_results_total": 5,
        "looppool_messages_redelivered_total": 1,
        "looppool_worker_respawns_total": 1,
        "looppool_worker_blocked_loops_total": 4,
        "looppool_messages_cancelled_total": 6,
        "looppool_messages_timed_out_total": 8,
        "looppool_worker_recycled_total": 9,
        "looppool_worker_hung_total": 10,
        "looppool_messages_pending": 2,
        "looppool_workers": 3,
    }
    assert {name: value(samples, name, "fake") for name in pool} == pool
    assert [value(samples, "looppool_messages_in_flight", "fake", n) for n in range(3)] == [1, 1, 0]
    worker = {
        "looppool_worker_cpu_ratio": 0.5,
        "looppool_worker_rss_bytes": 1000,
        "looppool_worker_peak_rss_bytes": 2000,
        "looppool_worker_loop_lag_seconds": 0.25,  # sent in milliseconds
        "looppool_worker_loop_tasks": 7,
        "looppool_worker_loop_ready_callbacks": 2,
        "looppool_worker_loop_timers": 3,
        "looppool_worker_start_time_seconds": 1.5e9,
    }
    assert {name: value(samples, name, "fake", 2) for name in worker} == worker
    # Nothing else: every sample is one of those above.
    assert len(samples) == len(pool) + 3 + len(worker)


def test_a_gauge_a_worker_does_not_send_has_no_sample() -> None:
    """uvloop has no loop.ready/loop.timers, and a first report no cpu: no sample, not 0."""
    samples = scrape(FakePool("fake", {0: {"rss": 1.0}}))
    assert value(samples, "looppool_worker_rss_bytes", "fake", 0) == 1
    assert value(samples, "looppool_worker_cpu_ratio", "fake", 0) is None
    assert value(samples, "looppool_worker_loop_ready_callbacks", "fake", 0) is None


def test_every_pool_stats_field_is_exposed() -> None:
    """A field added to PoolStats must get its line in _prometheus.COUNTERS (or a gauge)."""
    from looppool import _prometheus

    assert _prometheus.unmapped_fields() == []
    names = {f.name for f in dataclasses.fields(looppool.PoolStats)}
    assert {field for field, _, _ in _prometheus.COUNTERS} <= names


async def test_one_collector_for_several_pools_and_any_kind_of_pool() -> None:
    """Two pools in one collector, told apart by the pool label; InlinePool is accepted."""
    async with InlinePool(w.Echo, size=1, name="a") as a, InlinePool(w.Echo, size=2, name="b") as b:
        await a.submit(1)
        await b.submit(1)
        await b.submit(2)
        samples = scrape(a, b)
    assert value(samples, "looppool_messages_processed_total", "a") == 1
    assert value(samples, "looppool_messages_processed_total", "b") == 2
    assert value(samples, "looppool_workers", "b") == 2


def test_mistakes_are_refused_at_once() -> None:
    """No pool, a non-pool, or two pools of one name: a clear error from the constructor."""
    with pytest.raises(TypeError, match="at least one pool"):
        PrometheusCollector()
    with pytest.raises(TypeError, match="needs a name"):
        PrometheusCollector(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="two pools are named 'same'"):
        PrometheusCollector(FakePool("same", {}), FakePool("same", {}))


def test_the_collector_describes_its_families() -> None:
    """describe() names every family, so a registry checks names without scraping pools."""
    collector = PrometheusCollector(FakePool("fake", {}))
    names = {family.name for family in collector.describe()}
    assert "looppool_messages_processed" in names  # counters are named without _total
    assert "looppool_worker_rss_bytes" in names
    registry = CollectorRegistry()
    registry.register(collector)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(PrometheusCollector(FakePool("other", {})))


def test_looppool_metrics_works_without_prometheus_client() -> None:
    """Without prometheus_client, looppool.metrics imports; the collector says what to install."""
    script = textwrap.dedent(
        """
        import sys

        class Hide:
            def find_spec(self, name, path, target=None):
                if name.partition(".")[0] == "prometheus_client":
                    raise ImportError("hidden")

        sys.meta_path.insert(0, Hide())
        import looppool.metrics
        assert "prometheus_client" not in sys.modules
        try:
            looppool.metrics.Nothing
        except AttributeError as exc:
            print("AttributeError:", exc)
        try:
            from looppool.metrics import PrometheusCollector
        except ImportError as exc:
            print("ImportError:", exc)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "AttributeError: module 'looppool.metrics' has no attribute 'Nothing'" in proc.stdout
    assert "pip install 'looppool[prometheus]'" in proc.stdout
