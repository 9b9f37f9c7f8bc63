"""Prometheus metrics of one or more pools: :class:`PrometheusCollector` (extra ``prometheus``).

A custom collector (prometheus_client's ``Collector`` protocol): nothing is
counted twice and nothing runs between scrapes. Each scrape reads
``pool.stats()`` (the parent's ledger) and ``pool.worker_metrics()`` (the
gauges the workers forward with ``worker_metrics=True``) and turns them into
metric families, labelled with the pool's name::

    scrape ─► collect() ─► pool.stats()          ─► looppool_messages_*_total, pending, in flight
                        └► pool.worker_metrics() ─► looppool_worker_* {worker="k"}

Re-exported as ``looppool.metrics.PrometheusCollector``, lazily: importing
``looppool.metrics`` does not import prometheus_client.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import fields
from typing import Any, Final, Protocol

try:
    from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - exercised by a test that hides prometheus_client
    raise ImportError(
        "looppool.metrics.PrometheusCollector needs prometheus_client, which is not "
        "installed: pip install 'looppool[prometheus]'"
    ) from exc

from ._core import PoolStats

__all__ = [
    "COUNTERS",
    "NOT_COUNTERS",
    "WORKER_GAUGES",
    "PoolLike",
    "PrometheusCollector",
    "unmapped_fields",
]

#: The ``PoolStats`` fields exposed as counters: (field, metric name, help).
#: prometheus_client adds the ``_total`` suffix. A field added to PoolStats
#: is one line here (a test fails until it is).
COUNTERS: Final = (
    (
        "put",
        "looppool_messages_put",
        "Messages accepted by put, put_nowait, submit and broadcast "
        "(a broadcast counts once per worker).",
    ),
    ("processed", "looppool_messages_processed", "Messages whose process_message returned."),
    ("failed", "looppool_messages_failed", "Messages whose process_message raised."),
    (
        "lost",
        "looppool_messages_lost",
        "Messages lost: their worker died holding them, or the pool stopped before running them.",
    ),
    (
        "redelivered",
        "looppool_messages_redelivered",
        "Messages sent again because the SafeWorker holding them died.",
    ),
    ("results", "looppool_results", "Results put by the workers and received by the parent."),
    ("respawns", "looppool_worker_respawns", "Workers started to replace one that died."),
    (
        "blocked",
        "looppool_worker_blocked_loops",
        "Blocked event-loop episodes the workers reported (blocking_threshold).",
    ),
    (
        "cancelled",
        "looppool_messages_cancelled",
        "Messages ended because their submit() was cancelled "
        "(withdrawn, or cancelled in a worker).",
    ),
    (
        "timed_out",
        "looppool_messages_timed_out",
        "Messages failed at their deadline (message_timeout, timeout=): MessageTimeout.",
    ),
    (
        "recycled",
        "looppool_worker_recycled",
        "Workers retired and replaced (max_messages_per_worker, max_memory_per_worker).",
    ),
    (
        "hung",
        "looppool_worker_hung",
        "Workers killed and replaced because their loop stopped turning (hang_timeout).",
    ),
)

#: The ``PoolStats`` fields exposed otherwise (gauges below).
NOT_COUNTERS: Final = frozenset({"pending", "in_flight"})

#: The forwarded worker gauges: (name in worker_metrics(), metric name, help, scale).
WORKER_GAUGES: Final = (
    (
        "cpu",
        "looppool_worker_cpu_ratio",
        "CPU time the worker process used over the last metrics interval, as a share of one core.",
        1.0,
    ),
    ("rss", "looppool_worker_rss_bytes", "Resident memory of the worker process.", 1.0),
    (
        "maxrss",
        "looppool_worker_peak_rss_bytes",
        "Peak resident memory of the worker process since it started.",
        1.0,
    ),
    (
        "loop.lag",
        "looppool_worker_loop_lag_seconds",
        "How late the worker's last metrics timer fired: how long ready work waits "
        "behind CPU-bound callbacks on its event loop.",
        0.001,  # sent in milliseconds, as the statsd gauge is
    ),
    ("loop.tasks", "looppool_worker_loop_tasks", "Tasks of the worker's event loop not done.", 1.0),
    (
        "loop.ready",
        "looppool_worker_loop_ready_callbacks",
        "Callbacks ready to run on the worker's event loop (asyncio's loop only, not uvloop).",
        1.0,
    ),
    (
        "loop.timers",
        "looppool_worker_loop_timers",
        "Timers pending on the worker's event loop (asyncio's loop only, not uvloop).",
        1.0,
    ),
    (
        "start_time",
        "looppool_worker_start_time_seconds",
        "When the worker started (after its initialise()), in seconds since the Unix epoch.",
        1.0,
    ),
)


class PoolLike(Protocol):
    """What the collector reads: a ``name`` and ``stats()`` (``worker_metrics()`` if it has it)."""

    @property
    def name(self) -> str:
        """The pool's name: the ``pool`` label."""
        ...

    def stats(self) -> PoolStats:
        """The pool's counters."""
        ...


class PrometheusCollector(Collector):
    """Expose the counters and gauges of looppool pools to Prometheus.

    ::

        from prometheus_client import REGISTRY
        from looppool.metrics import PrometheusCollector

        pool = looppool.Pool(Fetch, name="crawl", worker_metrics=True)
        REGISTRY.register(PrometheusCollector(pool))

    Give every pool of a process to one collector (``PrometheusCollector(a,
    b)``): a registry refuses two collectors of the same metric names. Each
    pool is told apart by the label ``pool`` (its name), each worker by the
    label ``worker`` (its number). The collector accepts any pool with a
    ``name`` and ``stats()`` — :class:`looppool.Pool`, ``RayPool``,
    ``InlinePool`` — and adds the per-worker resource gauges of those that
    forward them (``worker_metrics=True``; see ``pool.worker_metrics()``).

    Counters (``_total``), from ``pool.stats()``: see :data:`COUNTERS`.
    Gauges: ``looppool_messages_pending``, ``looppool_messages_in_flight``
    (per worker), ``looppool_workers``, and the :data:`WORKER_GAUGES`.

    A scrape reads the pool's state without a lock. From the pool's own
    event loop (an aiohttp handler calling ``generate_latest``) a scrape
    sees one consistent moment; from another thread (prometheus_client's
    ``start_http_server``) each value is exact, but two values may straddle
    one update of the pool (``put`` counted, ``pending`` not yet).
    """

    def __init__(self, *pools: PoolLike) -> None:
        if not pools:
            raise TypeError("PrometheusCollector needs at least one pool")
        names: set[str] = set()
        for pool in pools:
            if not callable(getattr(pool, "stats", None)) or not isinstance(
                getattr(pool, "name", None), str
            ):
                raise TypeError(f"{pool!r} is not a pool: it needs a name (str) and a stats()")
            if pool.name in names:
                raise ValueError(
                    f"two pools are named {pool.name!r}: give them distinct names "
                    "(Pool(..., name=...)), the label that tells their metrics apart"
                )
            names.add(pool.name)
        self.pools: Final = pools

    def describe(self) -> Iterable[Metric]:
        """The metric families, without samples (a registry checks names with them)."""
        counters, pending, in_flight, workers, gauges = self._families()
        return [*counters, pending, in_flight, workers, *gauges]

    def collect(self) -> Iterable[Metric]:
        """Read every pool now; one family per metric, one sample per pool (and worker)."""
        counters, pending, in_flight, workers, gauges = self._families()
        for pool in self.pools:
            name = pool.name
            stats = pool.stats()
            for family, (field, _, _) in zip(counters, COUNTERS, strict=True):
                family.add_metric([name], getattr(stats, field))
            pending.add_metric([name], stats.pending)
            workers.add_metric([name], len(stats.in_flight))
            for number, count in enumerate(stats.in_flight):
                in_flight.add_metric([name, str(number)], count)
            for number, values in sorted(_worker_metrics(pool).items()):
                for gauge, (key, _, _, scale) in zip(gauges, WORKER_GAUGES, strict=True):
                    value = values.get(key)
                    if value is not None:
                        gauge.add_metric([name, str(number)], value * scale)
        yield from counters
        yield from (pending, in_flight, workers)
        yield from gauges

    def _families(
        self,
    ) -> tuple[
        list[CounterMetricFamily],
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        list[GaugeMetricFamily],
    ]:
        pool, worker = ["pool"], ["pool", "worker"]
        counters = [CounterMetricFamily(metric, text, labels=pool) for _, metric, text in COUNTERS]
        pending = GaugeMetricFamily(
            "looppool_messages_pending",
            "Messages accepted and not yet processed, failed, lost or cancelled.",
            labels=pool,
        )
        in_flight = GaugeMetricFamily(
            "looppool_messages_in_flight",
            "Messages a worker holds now (sent to it, not yet done).",
            labels=worker,
        )
        workers = GaugeMetricFamily(
            "looppool_workers", "Workers of the pool (its size).", labels=pool
        )
        gauges = [
            GaugeMetricFamily(metric, text, labels=worker) for _, metric, text, _ in WORKER_GAUGES
        ]
        return counters, pending, in_flight, workers, gauges

    def __repr__(self) -> str:
        return f"<PrometheusCollector of {', '.join(repr(p.name) for p in self.pools)}>"


def _worker_metrics(pool: object) -> Mapping[int, Mapping[str, float]]:
    method: Any = getattr(pool, "worker_metrics", None)
    if not callable(method):
        return {}
    found: Mapping[int, Mapping[str, float]] = method()
    return found


def unmapped_fields() -> list[str]:
    """The PoolStats fields this collector neither counts nor gauges (a test wants none)."""
    known = {field for field, _, _ in COUNTERS} | NOT_COUNTERS
    return [f.name for f in fields(PoolStats) if f.name not in known]
