"""A worker's monitoring: its statsd reporter, its blocked-loop detector, its forwarded gauges.

The worker runtime builds one :class:`WorkerMonitor` from the pool's
``statsd``/``statsd_prefix``/``metrics_interval``/``blocking_threshold``/
``worker_metrics`` options, starts it after ``initialise()`` and closes it
before ``finalise()``.
Monitoring never stops the work: nothing here raises into the runtime once
the pool's constructor has accepted the options (:func:`check_statsd_option`).

What ``statsd`` may be:

* ``"host:port"`` — this package's :class:`~looppool.metrics.StatsdClient`,
  created in the worker and closed with it. No dependency.
* a client instance (``gauge(name, value)`` or ``send_gauge(name, value)``):
  used as is, never closed (it is the user's). Under ``spawn`` and
  ``forkserver`` it reaches the worker pickled; ``StatsdClient`` pickles.
* a zero-argument callable returning a client, e.g.
  ``functools.partial(aiostatsd.client.StatsdClient, "127.0.0.1", 8125)``:
  called in the worker, on its loop, and the client closed with the worker.
  This is how to use aiostatsd, whose client is bound to the loop it was made
  on and cannot be pickled; the monitor runs its ``run()`` task and awaits its
  ``stop()``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from .metrics import BLOCKING_LOGGER, BlockingDetector, ResourceReporter, StatsdClient

__all__ = [
    "MetricsForwarder",
    "WorkerMonitor",
    "check_statsd_option",
    "metric_prefix",
    "parse_statsd_address",
]

logger = logging.getLogger(BLOCKING_LOGGER)

#: The worker runtime's counters that are running totals since the process
#: started: sent as statsd counters (their increase per report), so that a
#: statsd server sums them over the workers and across replaced processes.
CUMULATIVE_COUNTERS: Final = ("messages.processed", "messages.failed", "messages.timed_out")

#: Longest wait for a client's close()/stop() at worker shutdown: a statsd
#: client must not hold a stopping worker (aiostatsd's stop() never returns
#: if its run() failed).
CLOSE_TIMEOUT: Final = 2.0

_PORT = re.compile(r"[0-9]{1,5}")
_COMPONENT_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_PREFIX_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def parse_statsd_address(address: str) -> tuple[str, int]:
    """Split ``"host:port"`` (``"[::1]:8125"`` for IPv6) into ``(host, port)``.

    Raises :class:`ValueError` naming the bad value and the expected form.
    Only the syntax is checked: the host is resolved in the workers.
    """
    if not isinstance(address, str):
        raise TypeError(f"statsd address must be a str 'host:port', not {address!r}")

    def bad(why: str) -> ValueError:
        return ValueError(
            f"statsd address {address!r} is not 'host:port' ({why}); "
            "e.g. '127.0.0.1:8125', 'statsd.local:8125' or '[::1]:8125'"
        )

    host, colon, port = address.rpartition(":")
    if not colon:
        raise bad("no port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host:
            raise bad("empty host")
    elif ":" in host:
        raise bad("an IPv6 host must be written in brackets")
    if not host or host != host.strip():
        raise bad("empty host" if not host.strip() else "spaces around the host")
    if not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
        raise bad(f"port {port!r} is not a number from 1 to 65535")
    return host, int(port)


def _is_client(value: object) -> bool:
    return not isinstance(value, type) and any(
        callable(getattr(value, method, None)) for method in ("gauge", "send_gauge")
    )


def check_statsd_option(statsd: object) -> None:
    """Check a pool's ``statsd`` option in the parent, where a mistake is made.

    Accepts ``None``, ``"host:port"``, a statsd client instance or a
    zero-argument callable returning one (see this module's docstring).
    Raises :class:`ValueError` for a malformed address and :class:`TypeError`
    for anything else.
    """
    if statsd is None or _is_client(statsd):
        return
    if isinstance(statsd, str):
        parse_statsd_address(statsd)
    elif not callable(statsd):
        raise TypeError(
            f"statsd must be 'host:port', a statsd client (with a gauge(name, value) or "
            f"send_gauge(name, value) method) or a callable returning one, not {statsd!r}"
        )


def monitor_options(
    statsd: object,
    statsd_prefix: str | None,
    metrics_interval: float,
    blocking_threshold: float | None,
    worker_metrics: bool = False,
) -> dict[str, Any] | None:
    """Check a pool's monitoring options in its constructor; return the workers' monitor options.

    ``None`` when none of ``statsd``, ``blocking_threshold`` and
    ``worker_metrics`` is given (no monitor). ``Pool`` and ``RayPool`` both
    call this, so they raise the same errors for the same mistakes.
    """
    if not isinstance(worker_metrics, bool):
        raise TypeError(f"worker_metrics must be True or False, not {worker_metrics!r}")
    if statsd is None and blocking_threshold is None and not worker_metrics:
        return None
    if blocking_threshold is not None and blocking_threshold <= 0:
        raise ValueError(f"blocking_threshold must be > 0 or None, not {blocking_threshold}")
    if metrics_interval <= 0:
        raise ValueError(f"metrics_interval must be > 0, not {metrics_interval}")
    check_statsd_option(statsd)  # raises at the point of the mistake
    return {
        "statsd": statsd,
        "statsd_prefix": statsd_prefix,
        "interval": metrics_interval,
        "blocking_threshold": blocking_threshold,
        "worker_metrics": worker_metrics,
    }


def metric_prefix(statsd_prefix: str | None, pool_name: str, number: int) -> str:
    """``{statsd_prefix}.{pool_name}.worker.{number}``, without the prefix if it is empty.

    The pool name becomes one component (dots and spaces become ``_``);
    ``statsd_prefix`` may have dots of its own (``"myapp.prod"``).
    """
    parts = [_COMPONENT_UNSAFE.sub("_", pool_name) or "pool", "worker", str(number)]
    prefix = _PREFIX_UNSAFE.sub("_", statsd_prefix or "").strip(".")
    return ".".join([prefix, *parts] if prefix else parts)


def _is_aiostatsd(client: object) -> bool:
    return type(client).__module__.partition(".")[0] == "aiostatsd"


class MetricsForwarder:
    """A gauge client for :class:`ResourceReporter` that sends each report to the parent.

    ``Pool(worker_metrics=True)``: the reporter calls :meth:`gauge` once per
    gauge, all in one loop callback; the first call of a report schedules
    one :meth:`flush`, which hands the whole report to ``send`` as one dict
    (one EV_METRICS event). Every report also carries ``start_time``, when
    the worker started reporting — right after its ``initialise()``, in
    seconds since the Unix epoch — so a replaced worker shows as one. The
    first report leaves ``cpu`` out: a share of a core over no interval yet
    means nothing.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, send: Callable[[dict[str, float]], None]
    ) -> None:
        self._loop = loop
        self._send = send
        self._batch: dict[str, float] | None = None
        self._first = True
        # Wall-clock time, to the microsecond: psutil's create_time() counts
        # in clock ticks from a boot time known to the second, so a worker
        # replaced within moments could not be told from the one it replaced.
        self.start_time: Final = time.time()

    def gauge(self, name: str, value: float) -> None:
        """Add one gauge of the report being made."""
        if self._batch is None:
            self._batch = {"start_time": self.start_time}
            self._loop.call_soon(self.flush)
        self._batch[name] = float(value)

    def flush(self) -> None:
        """Send the report made so far, if any."""
        batch, self._batch = self._batch, None
        if batch:
            if self._first:
                self._first = False
                batch.pop("cpu", None)
            self._send(batch)


class WorkerMonitor:
    """One worker's :class:`ResourceReporter` and :class:`BlockingDetector`.

    Built and driven by the worker runtime (users do not construct it):
    :meth:`start` on the worker's loop after ``initialise()``, :meth:`aclose`
    before ``finalise()``. Gauges are named
    ``{statsd_prefix}.{pool_name}.worker.{number}.{metric}``. ``statsd=None``
    disables the reporter, ``blocking_threshold=None`` the detector.
    ``on_blocked()`` is called once per blocking episode, from the detector's
    watchdog thread.
    """

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        number: int,
        pool_name: str,
        statsd: str | object | None,
        statsd_prefix: str | None,
        interval: float,
        blocking_threshold: float | None,
        counters: Callable[[], Mapping[str, float]],
        on_blocked: Callable[[], None] | None = None,
        worker_metrics: bool = False,
        on_metrics: Callable[[dict[str, float]], None] | None = None,
    ) -> None:
        self.loop: Final = loop
        self.number: Final = number
        self.prefix: Final = metric_prefix(statsd_prefix, pool_name, number)
        self.reporter: ResourceReporter | None = None
        self.detector: BlockingDetector | None = None
        # worker_metrics: a second reporter, whose client is the parent.
        self.forwarder: ResourceReporter | None = None
        self._statsd = statsd
        self._interval = interval
        self._threshold = blocking_threshold
        self._counters = counters
        self._on_blocked = on_blocked
        self._forward = on_metrics if worker_metrics else None
        self._owned_client: object | None = None  # a client we made, so we close
        self._client_task: asyncio.Task[object] | None = None  # aiostatsd's run()

    def start(self) -> None:
        """Start reporting and watching; call on the worker's running loop. Never raises.

        A statsd address that does not resolve, or a client factory that
        raises, is logged and leaves the worker running without metrics.
        """
        if self._statsd is not None:
            try:
                self._start_reporter()
            except Exception:
                logger.exception(
                    "worker %d: statsd metrics disabled: cannot set up statsd=%r",
                    self.number,
                    self._statsd,
                )
        if self._threshold is not None:
            try:
                detector = BlockingDetector(
                    self._threshold, loop=self.loop, on_block=self._blocked, logger=logger
                )
                detector.start()
            except Exception:
                logger.exception("worker %d: blocking detection disabled", self.number)
            else:
                self.detector = detector
        if self._forward is not None:
            try:
                self._start_forwarder(self._forward)
            except Exception:
                logger.exception("worker %d: worker metrics disabled", self.number)

    def _start_forwarder(self, send: Callable[[dict[str, float]], None]) -> None:
        forwarder = MetricsForwarder(self.loop, send)
        reporter = ResourceReporter(forwarder, "", self._interval, loop=self.loop)
        reporter.start()
        # A first report now, sent before the worker says it is ready, so the
        # parent has every worker's gauges from the moment start() returns
        # (and a replacement's as soon as it is ready).
        reporter.report()
        forwarder.flush()
        self.forwarder = reporter

    def _start_reporter(self) -> None:
        statsd = self._statsd
        if isinstance(statsd, str):
            client: object = StatsdClient(*parse_statsd_address(statsd))
            self._owned_client = client
        elif _is_client(statsd):
            client = statsd
        elif callable(statsd):
            client = statsd()
            self._owned_client = client
            if _is_aiostatsd(client):
                # aiostatsd sends from a task of its own: run() until stop().
                task = self.loop.create_task(client.run())  # type: ignore[attr-defined]
                task.add_done_callback(self._client_task_done)
                self._client_task = task
        else:
            raise TypeError(f"statsd={statsd!r} is not a client, a factory or 'host:port'")
        reporter = ResourceReporter(
            client,  # type: ignore[arg-type]  # checked by ResourceReporter
            self.prefix,
            self._interval,
            counters=self._counters,
            cumulative=CUMULATIVE_COUNTERS,
            loop=self.loop,
        )
        reporter.start()
        self.reporter = reporter

    def _client_task_done(self, task: asyncio.Task[object]) -> None:
        # Retrieve the exception, or asyncio logs "Task exception was never
        # retrieved" at some later garbage collection, far from its cause.
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "worker %d: the statsd client's run() failed",
                self.number,
                exc_info=task.exception(),
            )

    def _blocked(self, blocked_for: float, stack: str) -> None:
        # On the watchdog thread, as on_blocked is documented to be.
        if self._on_blocked is not None:
            self._on_blocked()

    async def aclose(self) -> None:
        """Stop reporting and watching, and close the client made here. Never raises."""
        forwarder, self.forwarder = self.forwarder, None
        if forwarder is not None:
            await forwarder.aclose()  # only cancels its timer: cannot fail
        detector, self.detector = self.detector, None
        if detector is not None:
            try:
                detector.stop()
            except Exception:
                logger.exception("worker %d: stopping the blocking detector failed", self.number)
        reporter, self.reporter = self.reporter, None
        if reporter is not None:
            try:
                await reporter.aclose()
            except Exception:
                logger.exception("worker %d: stopping the resource reporter failed", self.number)
        client, self._owned_client = self._owned_client, None
        if client is not None:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await self._close_client(client)
            except Exception:  # TimeoutError included
                logger.exception("worker %d: closing the statsd client failed", self.number)

    async def _close_client(self, client: object) -> None:
        task, self._client_task = self._client_task, None
        if task is not None and task.done():
            return  # aiostatsd's run() ended (and was logged): stop() would wait forever
        try:
            for name in ("aclose", "close", "stop"):
                method = getattr(client, name, None)
                if callable(method):
                    result = method()
                    if inspect.isawaitable(result):
                        await result
                    break
        finally:
            if task is not None and not task.done():
                task.cancel()

    def __repr__(self) -> str:
        parts = [f"worker {self.number}", repr(self.prefix)]
        if self.reporter is not None:
            parts.append(f"reporting every {self.reporter.interval:g} s")
        if self.detector is not None:
            parts.append(f"blocking threshold {self.detector.threshold:g} s")
        if self.forwarder is not None:
            parts.append(f"forwarding every {self.forwarder.interval:g} s")
        return f"<WorkerMonitor {', '.join(parts)}>"
