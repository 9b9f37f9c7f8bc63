"""Process and event-loop metrics sent to statsd, and blocked-loop detection.

Three pieces, each usable on its own in any asyncio program (the parent of a
pool included), and used by every worker when the pool is given
``statsd=``/``blocking_threshold=``::

    ResourceReporter ── every `interval` s, a loop.call_later chain ──► client.send(...)
      gauges: cpu, rss, maxrss, loop.lag, loop.tasks,                  │
              loop.ready, loop.timers, counters()                      ▼
      counters: the increase of each cumulative      StatsdClient: one UDP datagram per
                counters() item since the last report  report, from a non-blocking socket

    BlockingDetector
      loop thread:     heartbeat callback every threshold/4 (call_later)
      watchdog thread: sleeps until "heartbeat overdue by threshold", then logs
                       the loop thread's stack once per blocking episode

* :class:`StatsdClient` — plain statsd over UDP, no dependency. A statsd
  server that is down or unreachable never raises into the caller: the lost
  values are counted in :attr:`StatsdClient.dropped` and forgotten.
* :class:`ResourceReporter` — the periodic gauges, and counters for running
  totals; the client may be a :class:`StatsdClient`, an
  ``aiostatsd.client.StatsdClient`` or any object with a ``gauge(name,
  value)`` or ``send_gauge(name, value)`` method (and, for counters, an
  ``incr``, ``increment`` or ``send_counter`` method).
* :class:`BlockingDetector` — the asyncio form of Tornado's
  ``IOLoop.set_blocking_log_threshold``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import re
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Collection, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Protocol, Self

try:
    import resource
except ImportError:  # pragma: no cover - Windows has no resource module
    resource = None  # type: ignore[assignment]

if TYPE_CHECKING:
    import psutil

__all__ = [
    "DEFAULT_INTERVAL",
    "BlockingDetector",
    "Counters",
    "GaugeClient",
    "ResourceReporter",
    "SendGaugeClient",
    "StatsdClient",
]

#: Seconds between two reports of a :class:`ResourceReporter`.
DEFAULT_INTERVAL: Final = 10.0

#: Largest datagram :class:`StatsdClient` builds when it batches metrics:
#: under Ethernet's 1500-byte MTU less the IP and UDP headers (28 bytes, 48
#: with IPv6), so that no datagram is fragmented on the way to the server.
MAX_DATAGRAM: Final = 1400

#: The logger of :class:`BlockingDetector` unless one is given.
BLOCKING_LOGGER: Final = "looppool.worker"

#: Heartbeats per threshold: a block is always reported once it has lasted
#: ``threshold * (1 + 1/_BEATS_PER_THRESHOLD)``, never before ``threshold``.
_BEATS_PER_THRESHOLD: Final = 4

# cystatsd, under aiostatsd, takes gauge values as a C ``int``: it truncates
# floats and raises OverflowError beyond 32 bits.
_INT32_MIN: Final = -(2**31)
_INT32_MAX: Final = 2**31 - 1

# Characters that end a statsd name or a line: ``name:value|type|@rate\n``.
_UNSAFE_NAME = re.compile(r"[:|@\s]")

_logger = logging.getLogger("looppool.metrics")

#: A callable returning extra values for :class:`ResourceReporter`, such as
#: ``{"messages.in_flight": 3, "messages.processed": 1200}``: gauges, except
#: the running totals named in its ``cumulative``, which are sent as counters.
Counters = Callable[[], Mapping[str, float]]

#: The methods that add to a statsd counter, in the order they are looked for:
#: this module's and ``statsd``'s ``incr``, ``datadog``'s ``increment``,
#: ``aiostatsd``'s ``send_counter``.
_COUNTER_METHODS: Final = ("incr", "increment", "send_counter")


class GaugeClient(Protocol):
    """A statsd client with ``gauge(name, value)`` (this module's, ``statsd``, ``datadog``)."""

    def gauge(self, name: str, value: float, /) -> object:
        """Send one gauge."""


class SendGaugeClient(Protocol):
    """A statsd client with ``send_gauge(name, value)`` (``aiostatsd``)."""

    def send_gauge(self, name: str, value: float, /) -> object:
        """Send one gauge."""


# -- the statsd client ---------------------------------------------------------------------


def _metric_name(name: str) -> str:
    return _UNSAFE_NAME.sub("_", name)


def _format_value(value: float) -> str | None:
    """Render a number as statsd expects it, or ``None`` if statsd cannot carry it."""
    if isinstance(value, int):  # bool included
        return str(int(value))
    value = float(value)
    if not math.isfinite(value):
        return None
    # Fixed notation: some servers do not parse "1e-07". Six decimals are
    # finer than any gauge here needs (a microsecond, a millionth of a core).
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


class StatsdClient:
    """Send statsd metrics as plain UDP datagrams from a non-blocking socket.

    ``prefix`` (e.g. ``"myapp"``) is put before every name with a dot. The
    address is resolved once, here: an unknown host raises :class:`OSError`
    at construction. After that nothing raises: a datagram the system will not
    send — the server is down (``ECONNREFUSED``), the socket buffer is full
    (``EAGAIN``, ``ENOBUFS``), the network is unreachable — is dropped and
    counted. :attr:`sent` and :attr:`dropped` count metric values, not
    datagrams.

    :meth:`gauges` puts many gauges in one datagram (lines separated by
    ``"\\n"``, each datagram at most ``max_datagram`` bytes). The client is
    picklable: a copy opens its own socket, so an instance can be handed to a
    pool's workers under every start method.

    Meant to be used from one thread (an event loop's); calls from several
    threads send correct datagrams but may miscount :attr:`sent`/:attr:`dropped`.
    """

    def __init__(
        self, host: str, port: int, prefix: str = "", *, max_datagram: int = MAX_DATAGRAM
    ) -> None:
        if max_datagram < 64:
            raise ValueError(f"max_datagram must be at least 64 bytes, not {max_datagram}")
        self.host: Final = host
        self.port: Final = port
        self.prefix: Final = _metric_name(prefix.strip("."))
        self.max_datagram: Final = max_datagram
        #: Metric values handed to the system.
        self.sent = 0
        #: Metric values lost: refused by the system, or not finite.
        self.dropped = 0
        self._sock: socket.socket | None = self._open()

    def _open(self) -> socket.socket:
        # A *connected* UDP socket: the kernel routes once, and reports an
        # ICMP "port unreachable" as ECONNREFUSED on a later send, which is how
        # drops to a stopped server get counted (an unconnected socket would
        # lose them silently).
        error: OSError | None = None
        for family, kind, proto, _, address in socket.getaddrinfo(
            self.host, self.port, type=socket.SOCK_DGRAM
        ):
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                sock.connect(address)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            return sock
        raise error or OSError(f"no address found for {self.host}:{self.port}")

    def _prefixed(self, name: str) -> str:
        name = _metric_name(name)
        return f"{self.prefix}.{name}" if self.prefix else name

    def gauge(self, name: str, value: float) -> None:
        """Set the gauge ``name`` to ``value``: the datagram ``prefix.name:value|g``."""
        self.send({name: value})

    def gauges(self, values: Mapping[str, float]) -> None:
        """Set many gauges, batched into as few datagrams as fit in ``max_datagram``."""
        self.send(values)

    def send(self, gauges: Mapping[str, float], counts: Mapping[str, float] | None = None) -> None:
        """Set ``gauges`` and add ``counts`` to counters, batched into as few datagrams as fit.

        The gauges' lines come first, then the counters' (``prefix.name:value|c``).
        """
        lines = self._gauge_lines(gauges)
        for name, value in (counts or {}).items():
            text = _format_value(value)
            if text is None:
                self.dropped += 1
                continue
            lines.append((f"{self._prefixed(name)}:{text}|c", 1))
        self._send_lines(lines)

    def _gauge_lines(self, values: Mapping[str, float]) -> list[tuple[str, int]]:
        lines: list[tuple[str, int]] = []
        for name, value in values.items():
            text = _format_value(value)
            if text is None:
                self.dropped += 1
                continue
            full = self._prefixed(name)
            if text.startswith("-"):
                # "name:-5|g" means "decrease by 5" to statsd: a negative
                # value is set by zeroing first, in the same datagram so the
                # two lines cannot be reordered.
                lines.append((f"{full}:0|g\n{full}:{text}|g", 1))
            else:
                lines.append((f"{full}:{text}|g", 1))
        return lines

    def incr(self, name: str, value: float = 1) -> None:
        """Add ``value`` to the counter ``name``: ``prefix.name:value|c``."""
        self._send_metric(name, value, "c")

    def timing(self, name: str, milliseconds: float) -> None:
        """Record a duration in milliseconds: ``prefix.name:milliseconds|ms``."""
        self._send_metric(name, milliseconds, "ms")

    def _send_metric(self, name: str, value: float, kind: str) -> None:
        text = _format_value(value)
        if text is None:
            self.dropped += 1
            return
        self._send_lines([(f"{self._prefixed(name)}:{text}|{kind}", 1)])

    def _send_lines(self, lines: Iterable[tuple[str, int]]) -> None:
        """Send ``(line, values_in_it)`` pairs, packed into datagrams."""
        batch: list[bytes] = []
        size = 0
        count = 0
        for line, values in lines:
            data = line.encode()
            if batch and size + 1 + len(data) > self.max_datagram:
                self._send_datagram(b"\n".join(batch), count)
                batch, size, count = [], 0, 0
            size += len(data) + (1 if batch else 0)
            batch.append(data)
            count += values
        if batch:
            self._send_datagram(b"\n".join(batch), count)

    def _send_datagram(self, data: bytes, count: int) -> None:
        sock = self._sock
        if sock is None:
            self.dropped += count
            return
        try:
            sock.send(data)
        except OSError:
            # ECONNREFUSED (server down), EAGAIN/ENOBUFS (buffer full),
            # ENETUNREACH, EMSGSIZE...: metrics are best effort, and a
            # monitoring outage must never become the application's outage.
            self.dropped += count
        else:
            self.sent += count

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._sock is None

    def close(self) -> None:
        """Close the socket; idempotent. Later metrics are counted as dropped."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __reduce__(self) -> tuple[Callable[..., StatsdClient], tuple[str, int, str]]:
        # A socket cannot be pickled: the copy (e.g. in a spawned worker)
        # resolves the address again and opens its own; the counts start at 0.
        factory = functools.partial(type(self), max_datagram=self.max_datagram)
        return factory, (self.host, self.port, self.prefix)

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else "open"
        prefix = f" prefix={self.prefix!r}" if self.prefix else ""
        return (
            f"<StatsdClient {self.host}:{self.port}{prefix} {state}, "
            f"{self.sent} sent, {self.dropped} dropped>"
        )


# -- the resource reporter -----------------------------------------------------------------


class _Sender:
    """Sends a report's gauges and counter increments through a duck-typed statsd client."""

    def __init__(self, client: object) -> None:
        if isinstance(client, type):
            raise TypeError(
                f"expected a statsd client instance, got the class {client.__qualname__}"
            )
        self._client = client
        if isinstance(client, StatsdClient):
            self.counters = True
            self._send: Callable[[Mapping[str, float], Mapping[str, float]], None] = client.send
            return
        gauge = getattr(client, "gauge", None)
        send_gauge = getattr(client, "send_gauge", None)
        method = gauge if callable(gauge) else send_gauge
        if not callable(method):
            raise TypeError(
                f"{client!r} is not a statsd client: it has neither a gauge(name, value) "
                "nor a send_gauge(name, value) method"
            )
        self._gauge: Callable[[str, float], object] = method
        if type(client).__module__.partition(".")[0] == "aiostatsd" and callable(send_gauge):
            self._gauge = send_gauge
            self._to_int = True
        else:
            self._to_int = False
        counter = None
        for name in _COUNTER_METHODS:
            counter = getattr(client, name, None)
            if callable(counter):
                break
        #: Whether the client has a counter method; without one, running
        #: totals are sent as gauges, as they are.
        self.counters = callable(counter)
        self._counter: Callable[[str, float], object] | None = counter
        self._send = self._send_each

    def __call__(self, gauges: Mapping[str, float], counts: Mapping[str, float]) -> None:
        """Send ``gauges``, and ``counts`` as counter increments (only if :attr:`counters`)."""
        self._send(gauges, counts)

    def _send_each(self, gauges: Mapping[str, float], counts: Mapping[str, float]) -> None:
        for name, value in gauges.items():
            self._send_one(self._gauge, name, value)
        if self._counter is not None:
            for name, value in counts.items():
                self._send_one(self._counter, name, value)

    def _send_one(self, method: Callable[[str, float], object], name: str, value: float) -> None:
        if not self._to_int:
            method(name, value)
        elif math.isfinite(value):
            # cystatsd takes a C int: round rather than truncate, and saturate
            # rather than raise OverflowError (an RSS above 2 GiB).
            method(name, min(max(round(value), _INT32_MIN), _INT32_MAX))


def _peak_rss(memory: Any) -> float | None:
    """The process's peak resident set size in bytes, where the platform tells it."""
    if resource is not None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # Linux and the BSDs count kibibytes, macOS bytes.
        return float(peak if sys.platform == "darwin" else peak * 1024)
    peak_wset = getattr(memory, "peak_wset", None)  # Windows
    return float(peak_wset) if peak_wset is not None else None


class ResourceReporter:
    """Send the process's and the event loop's vital signs to statsd.

    Every ``interval`` seconds, on the event loop, it sends ``{prefix}.{metric}``
    for each of:

    ``cpu``
        CPU time used by the process (all threads) over the interval, as a
        share of one core: ``0.25`` is a quarter of a core, ``1.5`` a core and a half.
    ``rss``, ``maxrss``
        Resident set size now, and its peak since the process started; bytes.
    ``loop.lag``
        Milliseconds by which the reporter's own timer fired late: how long
        ready work waited behind CPU-bound callbacks.
    ``loop.tasks``
        Tasks of the loop not yet done.
    ``loop.ready``, ``loop.timers``
        Callbacks ready to run, and timers pending (cancelled ones excluded).
        Only where the loop exposes them: asyncio's own loops do, uvloop does
        not, and then these two are not sent.

    plus every item of ``counters()`` (a name-to-number mapping), if given:
    as a gauge, except the items named in ``cumulative``. Those are running
    totals (messages processed since the process started, say), sent as
    statsd **counters**: each report adds the increase since the previous
    report (``name:increase|c``; the whole total the first time, and again
    after the total went down, as a counter restarted from zero does). A
    statsd server sums counters over its flush interval and across
    processes, so a pool's total, or its rate, is the sum of its workers',
    and a worker that is replaced starts from zero without breaking it. An
    increase that the client failed to send is not sent again.

    ``client`` is a :class:`StatsdClient` (all metrics of a report in one
    datagram), an ``aiostatsd.client.StatsdClient`` (values rounded to the
    32-bit integers cystatsd carries; a fraction such as ``cpu`` loses its
    decimals), or any object with a ``gauge(name, value)`` or
    ``send_gauge(name, value)`` method, and for counters an ``incr(name,
    value)``, ``increment(name, value)`` or ``send_counter(name, value)``
    method; a client without one gets the running totals as gauges. The
    reporter neither starts nor closes the client. A client or ``counters``
    that raises is logged (once until it works again, on the
    ``looppool.metrics`` logger) and the reporting goes on.

    The timer is a ``loop.call_later`` chain, so the lag it measures is the
    loop's own. Use it on one loop::

        async with ResourceReporter(StatsdClient("127.0.0.1", 8125), "myapp.parent"):
            await serve()
    """

    def __init__(
        self,
        client: StatsdClient | GaugeClient | SendGaugeClient,
        prefix: str,
        interval: float = DEFAULT_INTERVAL,
        *,
        counters: Counters | None = None,
        cumulative: Collection[str] = (),
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be a positive number of seconds, not {interval!r}")
        if isinstance(cumulative, str):
            raise TypeError(
                f"cumulative must be a collection of names, not the string {cumulative!r} "
                f"(write cumulative=[{cumulative!r}])"
            )
        self._send = _Sender(client)
        #: The names of ``counters()`` items that are running totals, sent as counters.
        self.cumulative: Final = frozenset(cumulative)
        self._totals: dict[str, float] = {}  # each cumulative item at the last report
        self.client: Final = client
        self.prefix: Final = prefix.strip(".")
        self.interval: Final = float(interval)
        self._counters = counters
        self._loop = loop
        #: Reports sent.
        self.reports = 0
        #: The last report (even one the client failed to send), by full name:
        #: gauges, and for each cumulative item the increase sent.
        self.last_report: Mapping[str, float] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0  # loop.time() at which the pending report should run
        self._cpu_mark = (0.0, 0.0)  # (time.monotonic(), time.process_time()) of the last report
        self._process: psutil.Process | None = None
        self._failing: set[str] = set()  # what failed last time: log only a failure's start

    @property
    def running(self) -> bool:
        """Whether a report is scheduled."""
        return self._handle is not None

    def start(self) -> None:
        """Schedule the reports; call on the loop's thread (from a coroutine or callback)."""
        if self._handle is not None:
            raise RuntimeError(f"{self!r} is already started")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        elif self._loop.is_running() and asyncio._get_running_loop() is not self._loop:
            raise RuntimeError("ResourceReporter.start() must be called on the loop's thread")
        # psutil costs ~25 ms to import: only processes that report pay it.
        import psutil

        self._process = psutil.Process()
        self._cpu_mark = (time.monotonic(), time.process_time())
        self._schedule(self._loop)

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._due = loop.time() + self.interval
        self._handle = loop.call_later(self.interval, self._tick)

    def _tick(self) -> None:
        loop = self._loop
        assert loop is not None
        lag_ms = max(0.0, loop.time() - self._due) * 1000.0
        handle = self._handle
        try:
            self.report(lag_ms)
        finally:
            # Re-arm even if the report failed: one bad report must not end
            # the chain; but not if counters() or the client called stop().
            # The next interval counts from now, not from when this report
            # was due, so a long block causes no burst of reports.
            if self._handle is handle is not None:
                self._schedule(loop)

    def report(self, lag_ms: float = 0.0) -> Mapping[str, float]:
        """Measure and send one report now, and return it (full names to values).

        The timer calls this; it is public for tests and benchmarks. ``lag_ms``
        is the ``loop.lag`` to send. The cumulative items of ``counters()``
        appear with the increase sent as a counter (with the total, for a
        client that has no counter method). Never raises: failures are logged.
        """
        try:
            gauges, totals = self._measure(lag_ms)
        except Exception:
            self._failed("measure", "%r failed to measure", self)
            return {}
        self._failing.discard("measure")
        counts: dict[str, float] = {}
        if self._send.counters:
            counts = self._increases(totals)
        else:
            gauges.update(totals)
        try:
            self._send(gauges, counts)
        except Exception:
            self._failed("client", "statsd client %r failed to send metrics", self.client)
        else:
            self._failing.discard("client")
            self.reports += 1
        self.last_report = report = {**gauges, **counts}
        return report

    def _increases(self, totals: Mapping[str, float]) -> dict[str, float]:
        """How much each running total grew since the last report; remember the totals."""
        counts = {}
        for name, total in totals.items():
            before = self._totals.get(name, 0.0)
            # A total below the last one was restarted from zero: all of it is new.
            counts[name] = total - before if total >= before else total
            self._totals[name] = total
        return counts

    def _measure(self, lag_ms: float) -> tuple[dict[str, float], dict[str, float]]:
        """The gauges and the cumulative totals, by full name."""
        loop = self._loop
        assert loop is not None
        assert self._process is not None
        now, cpu_now = time.monotonic(), time.process_time()
        then, cpu_then = self._cpu_mark
        self._cpu_mark = (now, cpu_now)
        memory = self._process.memory_info()
        rss = float(memory.rss)
        metrics: dict[str, float] = {
            "cpu": (cpu_now - cpu_then) / (now - then) if now > then else 0.0,
            "rss": rss,
        }
        peak = _peak_rss(memory)
        if peak is not None:
            # Linux's peak (getrusage) and current RSS (/proc/self/statm) come
            # from counters that are synchronised lazily: the peak can read a
            # few pages below the current value. A peak is never below it.
            metrics["maxrss"] = max(peak, rss)
        metrics["loop.lag"] = lag_ms
        metrics["loop.tasks"] = float(len(asyncio.all_tasks(loop)))
        # Private attributes of asyncio's BaseEventLoop; other loops (uvloop)
        # keep these in C and do not show them: send what is there.
        ready = getattr(loop, "_ready", None)
        if ready is not None:
            metrics["loop.ready"] = float(len(ready))
        scheduled = getattr(loop, "_scheduled", None)
        if scheduled is not None:
            # Cancelled timers stay in the heap until purged; asyncio counts them.
            cancelled = getattr(loop, "_timer_cancelled_count", 0)
            metrics["loop.timers"] = float(max(0, len(scheduled) - cancelled))
        if self._counters is not None:
            try:
                extra = dict(self._counters())
            except Exception:
                self._failed("counters", "counters callable %r failed", self._counters)
            else:
                self._failing.discard("counters")
                metrics.update(extra)
        prefix = self.prefix
        gauges: dict[str, float] = {}
        totals: dict[str, float] = {}
        for name, value in metrics.items():
            into = totals if name in self.cumulative else gauges
            into[f"{prefix}.{name}" if prefix else name] = value
        return gauges, totals

    def _failed(self, what: str, message: str, *args: object) -> None:
        # Called every interval while the failure lasts: log its start only.
        if what not in self._failing:
            self._failing.add(what)
            _logger.warning(message + "; reporting goes on", *args, exc_info=True)

    async def stop(self) -> None:
        """Cancel the pending report; idempotent. Call on the loop's thread."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.cancel()

    async def aclose(self) -> None:
        """Same as :meth:`stop` (for ``contextlib.aclosing``)."""
        await self.stop()

    async def __aenter__(self) -> ResourceReporter:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return (
            f"<ResourceReporter {self.prefix!r} every {self.interval:g} s, {state}, "
            f"{self.reports} reports>"
        )


# -- the blocking detector -----------------------------------------------------------------


class _WatchdogRun:
    """What the loop thread and one watchdog thread share besides the heartbeat."""

    __slots__ = ("awaiting_turn", "stopped", "wake")

    def __init__(self) -> None:
        # The watchdog's only wake-up source besides its deadline: set by
        # stop(), and by the first heartbeat after a reported episode.
        self.wake = threading.Event()
        # Set by the watchdog while it waits for the loop to end a reported
        # episode; the next heartbeat then sets wake.
        self.awaiting_turn = False
        self.stopped = False


class BlockingDetector:
    """Log the loop thread's stack when the event loop is blocked too long.

    The asyncio equivalent of Tornado's ``IOLoop.set_blocking_log_threshold``.
    When the loop has not run its timers for more than ``threshold`` seconds
    (one callback running that long, or a backlog of callbacks), a WARNING is
    logged on ``logger`` (default: the ``looppool.worker`` logger) with the
    loop thread's current stack: its last lines show the code that blocks.
    One warning per blocking episode, however long it lasts; :attr:`blocked`
    counts the episodes.

    ``on_block(blocked_for, stack_text)``, if given, is then called **from the
    watchdog thread**, not from the loop (which is blocked): it must be
    thread-safe (e.g. ``loop.call_soon_threadsafe`` or an atomic counter).
    ``blocked_for`` is how long the loop had been blocked when it was noticed.

    Precision: the loop thread sends a heartbeat every ``threshold / 4``. A
    block is reported once it has lasted at least ``threshold`` and at most
    ``1.25 * threshold``. Thresholds below about 10 ms make the heartbeat a
    load of its own.

    Cost on a healthy loop: one ``call_later`` callback per ``threshold / 4``
    on the loop (1-2 µs of CPU each), about one wake-up of the watchdog
    thread per ``threshold``; nothing else. On an idle loop the wake-ups
    themselves are the cost: about 0.05 % of a core at a 1 s threshold.

    Use :meth:`start` / :meth:`stop` on the loop's thread, or ``with``. The
    watchdog is a daemon thread; a process that forks keeps it only in the parent.
    """

    def __init__(
        self,
        threshold: float,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        on_block: Callable[[float, str], object] | None = None,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
    ) -> None:
        if not threshold > 0:
            raise ValueError(f"threshold must be a positive number of seconds, not {threshold!r}")
        self.threshold: Final = float(threshold)
        self.logger: Final = logger if logger is not None else logging.getLogger(BLOCKING_LOGGER)
        #: Blocking episodes seen so far.
        self.blocked = 0
        self._period = self.threshold / _BEATS_PER_THRESHOLD
        self._loop = loop
        self._on_block = on_block
        self._handle: asyncio.TimerHandle | None = None
        self._thread: threading.Thread | None = None
        self._loop_thread_id = 0

        # Shared between the loop thread (writer) and the watchdog (reader).
        # Plain attributes suffice: each read or write of one is atomic, and
        # the loop writes _next_due *before* _beats, so a watchdog that reads
        # _beats and then _next_due never pairs a new count with an old due
        # time (which could report a block that is not one).
        self._beats = 0  # heartbeats run so far
        self._next_due = 0.0  # time.monotonic() at which the next heartbeat is due
        # The state shared with the watchdog of the current start()...stop().
        # A new one per run: a watchdog that outlived stop()'s join timeout
        # (stuck in a slow log handler) then never disturbs a new run's.
        self._run = _WatchdogRun()

    @property
    def running(self) -> bool:
        """Whether the watchdog is running."""
        return self._thread is not None

    def start(self) -> None:
        """Start the heartbeat and the watchdog thread; call on the loop's thread."""
        if self._thread is not None:
            raise RuntimeError(f"{self!r} is already started")
        loop = self._loop if self._loop is not None else asyncio.get_running_loop()
        if loop.is_running() and asyncio._get_running_loop() is not loop:
            # The stack shown must be the loop thread's, and call_later is
            # not thread-safe: both need us on that thread.
            raise RuntimeError("BlockingDetector.start() must be called on the loop's thread")
        self._loop = loop
        self._loop_thread_id = threading.get_ident()
        self._run = run = _WatchdogRun()
        self._beat()
        thread = threading.Thread(
            target=self._watch,
            args=(loop, run),
            name="looppool-blocking-watchdog",
            daemon=True,  # never keeps a process alive, never joined at exit
        )
        thread.start()
        self._thread = thread

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the heartbeat and the watchdog; idempotent. Call on the loop's thread.

        Returns once the watchdog thread has ended (it wakes at once), or
        after ``timeout`` seconds if it is stuck in a slow ``on_block`` or
        log handler.
        """
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.cancel()
        thread, self._thread = self._thread, None
        if thread is None:
            return
        # stopped before set(): the watchdog clears the event and then reads
        # stopped, so it cannot clear this wake-up and still miss the stop.
        self._run.stopped = True
        self._run.wake.set()
        if thread is not threading.current_thread():
            thread.join(timeout)

    def __enter__(self) -> BlockingDetector:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _beat(self) -> None:
        """The heartbeat, on the loop thread: "the loop turned, and will again soon"."""
        loop = self._loop
        assert loop is not None
        self._next_due = time.monotonic() + self._period
        self._beats += 1
        self._handle = loop.call_later(self._period, self._beat)
        # Read after _beats was written. The watchdog sets awaiting_turn and
        # then reads _beats: either it sees this beat, or this sees its flag.
        run = self._run
        if run.awaiting_turn:
            run.wake.set()

    def _watch(self, loop: asyncio.AbstractEventLoop, run: _WatchdogRun) -> None:
        """The watchdog thread's body.

        This is not polling. The thread sleeps in ``Event.wait(timeout)`` until
        the one moment at which the loop *could* first be called blocked — the
        next heartbeat's due time plus the threshold — and not before: on a
        healthy loop each wake-up finds a newer heartbeat, computes the next
        such moment and sleeps again (one futex wake-up, two attribute reads,
        a clock read: a few microseconds, about once per threshold). The
        heartbeat never wakes this thread, except to end a reported episode;
        during a long block, and while the loop is not running at all, the
        thread sleeps without a timeout.
        """
        wake = run.wake
        while not run.stopped:
            beats = self._beats
            deadline = self._next_due + self.threshold
            timeout = deadline - time.monotonic()
            if timeout > 0:
                if wake.wait(timeout):
                    wake.clear()  # then read stopped: see stop()
                continue
            if self._beats != beats:
                continue  # the loop turned while we woke up
            # A loop that is not running (between two run_until_complete()
            # calls, or closed without stop()) is idle, not blocked.
            if loop.is_running():
                self._report(beats, time.monotonic() - self._next_due)
            # One warning per episode: sleep until the loop turns again.
            run.awaiting_turn = True
            if self._beats == beats and not run.stopped:
                wake.wait()
            run.awaiting_turn = False
            wake.clear()

    def _report(self, beats: int, blocked_for: float) -> None:
        frame = sys._current_frames().get(self._loop_thread_id)
        if frame is None:
            stack = "    (the loop's thread has no Python frame)\n"
        else:
            stack = "".join(traceback.format_stack(frame))
        del frame  # a frame refers to every local of the loop thread: do not keep it
        if self._beats != beats:
            # The loop moved on while we took the stack: it shows whatever
            # runs now, not what blocked. Do not blame the wrong line.
            return
        self.blocked += 1
        self.logger.warning(
            "Event loop blocked for %.3f s (threshold %.3f s); the loop thread is at:\n%s",
            blocked_for,
            self.threshold,
            stack.rstrip("\n"),
        )
        if self._on_block is not None:
            try:
                self._on_block(blocked_for, stack)
            except Exception:
                self.logger.exception("on_block callback %r failed", self._on_block)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<BlockingDetector threshold={self.threshold:g} s, {state}, {self.blocked} blocked>"


# -- PrometheusCollector (issue 14), re-exported lazily --------------------------------------
# prometheus_client is optional (extra ``prometheus``): importing this module
# must not import it, nor fail without it.
if TYPE_CHECKING:
    from ._prometheus import PrometheusCollector as PrometheusCollector
else:

    def __getattr__(name: str) -> Any:
        if name == "PrometheusCollector":
            from ._prometheus import PrometheusCollector  # ImportError if it is absent

            return PrometheusCollector
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
