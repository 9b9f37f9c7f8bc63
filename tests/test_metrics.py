"""Tests of looppool.metrics: StatsdClient, ResourceReporter and BlockingDetector.

Datagrams are received by a real UDP socket bound to 127.0.0.1; every loop
test runs on asyncio and on uvloop. Nothing sleeps to synchronise: tests wait
on futures and events with a deadline. ``time.sleep`` appears only where a
test blocks its event loop on purpose.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import pickle
import socket
import threading
import time
import types
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from looppool.metrics import BlockingDetector, ResourceReporter, StatsdClient
from statsd_server import StatsdServer, lines, metrics

T = TypeVar("T")

#: Longest any single wait in these tests may take before the test fails.
DEADLINE = 10.0

LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
}
try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is not on Windows
    pass
else:
    LOOP_FACTORIES["uvloop"] = uvloop.new_event_loop

try:
    import aiostatsd.client
except ImportError:
    aiostatsd = None


@pytest.fixture(params=sorted(LOOP_FACTORIES))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, T]], T]:
    """Run a coroutine on a fresh loop of each kind (debug mode), with a deadline."""
    factory = LOOP_FACTORIES[request.param]

    def run(coro: Coroutine[Any, Any, T]) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(DEADLINE):
                return await coro

        with asyncio.Runner(loop_factory=factory, debug=True) as runner:
            return runner.run(bounded())

    return run


def closed_port() -> int:
    """A UDP port on 127.0.0.1 that nothing listens on (a statsd server that is down)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def block_loop(seconds: float) -> None:
    """Block the calling thread, the event loop's, on purpose."""
    time.sleep(seconds)


@pytest.fixture
def server() -> Iterator[StatsdServer]:
    """A statsd server on 127.0.0.1."""
    server = StatsdServer()
    yield server
    server.close()


@pytest.fixture
def client(server: StatsdServer) -> Iterator[StatsdClient]:
    """A StatsdClient sending to ``server``."""
    with StatsdClient("127.0.0.1", server.port) as client:
        yield client


# -- StatsdClient ---------------------------------------------------------------------------


def test_gauge_is_one_statsd_datagram(server: StatsdServer) -> None:
    """gauge() sends ``prefix.name:value|g``, integers without decimals."""
    with StatsdClient("127.0.0.1", server.port, prefix="app") as client:
        client.gauge("requests", 3)
        client.gauge("ratio", 0.25)
        client.gauge("rss", 123456789.0)
    assert server.receive() == b"app.requests:3|g"
    assert server.receive() == b"app.ratio:0.25|g"
    assert server.receive() == b"app.rss:123456789|g"
    assert (client.sent, client.dropped) == (3, 0)


def test_incr_and_timing(server: StatsdServer, client: StatsdClient) -> None:
    """incr() sends a ``|c`` counter (1 by default), timing() a ``|ms`` timer."""
    client.incr("hits")
    client.incr("hits", 5)
    client.timing("fetch", 12.5)
    assert [server.receive() for _ in range(3)] == [b"hits:1|c", b"hits:5|c", b"fetch:12.5|ms"]


def test_send_puts_gauges_and_counters_in_one_datagram(server: StatsdServer) -> None:
    """send() sends the gauges' lines, then the counters' (``|c``), in one datagram."""
    with StatsdClient("127.0.0.1", server.port, prefix="app") as client:
        client.send({"rss": 10, "lag": 0.5}, {"processed": 7, "failed": 0})
    assert server.receive() == b"app.rss:10|g\napp.lag:0.5|g\napp.processed:7|c\napp.failed:0|c"
    assert (client.sent, client.dropped) == (4, 0)


def test_gauges_are_batched_under_the_datagram_limit(server: StatsdServer) -> None:
    """gauges() packs lines into as few datagrams as fit in max_datagram, in order."""
    values = {f"metric.number.{i}": i for i in range(100)}
    with StatsdClient("127.0.0.1", server.port, max_datagram=200) as client:
        client.gauges(values)
    received: list[str] = []
    datagrams = 0
    while len(received) < len(values):
        datagram = server.receive()
        assert len(datagram) <= 200
        received += lines(datagram)
        datagrams += 1
    assert received == [f"{name}:{value}|g" for name, value in values.items()]
    assert 1 < datagrams < len(values)
    assert client.sent == len(values)


def test_negative_gauge_is_zeroed_first(server: StatsdServer, client: StatsdClient) -> None:
    """A negative gauge is sent as 0 then the value, as statsd reads "-5|g" as a decrement."""
    client.gauge("temperature", -5)
    assert server.receive() == b"temperature:0|g\ntemperature:-5|g"


def test_unsafe_name_characters_are_replaced(server: StatsdServer) -> None:
    """Characters that would end a statsd name (``:|@`` and spaces) become ``_``."""
    with StatsdClient("127.0.0.1", server.port, prefix="my app") as client:
        client.gauge("a:b|c@d e\nf", 1)
    assert server.receive() == b"my_app.a_b_c_d_e_f:1|g"


def test_values_statsd_cannot_carry_are_dropped(server: StatsdServer, client: StatsdClient) -> None:
    """NaN and infinities are counted as dropped, and the other gauges still go."""
    client.gauges({"a": math.nan, "b": math.inf, "c": 1e-7, "d": 2})
    assert server.receive() == b"c:0|g\nd:2|g"
    assert (client.sent, client.dropped) == (2, 2)


def test_down_server_never_raises_and_drops_are_counted() -> None:
    """Sending to a closed port raises nothing; refused datagrams are counted as dropped."""
    with StatsdClient("127.0.0.1", closed_port()) as client:
        for i in range(4):
            client.gauge("g", i)
        client.incr("c")
        client.timing("t", 1)
    # Linux reports the ICMP "port unreachable" of one datagram on the next send.
    assert client.dropped >= 1
    assert client.sent + client.dropped == 6


def test_close_is_idempotent_and_later_metrics_are_dropped(client: StatsdClient) -> None:
    """After close() (twice), sending raises nothing and counts the metrics as dropped."""
    client.close()
    client.close()
    client.gauges({"a": 1, "b": 2})
    assert client.closed
    assert (client.sent, client.dropped) == (0, 2)
    assert "closed" in repr(client)


def test_pickled_copy_opens_its_own_socket(server: StatsdServer, client: StatsdClient) -> None:
    """A pickled client (as a spawned worker gets it) sends through a socket of its own."""
    with pickle.loads(pickle.dumps(client)) as copy:
        assert copy is not client
        assert (copy.host, copy.port, copy.prefix) == (client.host, client.port, client.prefix)
        copy.gauge("from.copy", 1)
    client.gauge("from.original", 2)
    assert server.receive() == b"from.copy:1|g"
    assert server.receive() == b"from.original:2|g"


# -- ResourceReporter -----------------------------------------------------------------------

RESOURCE_METRICS = {"cpu", "rss", "maxrss", "loop.lag", "loop.tasks"}


CUMULATIVE = ("messages.processed", "messages.failed")


def test_reporter_sends_every_metric_in_one_datagram(
    run: Callable[[Coroutine[Any, Any, None]], None], server: StatsdServer, client: StatsdClient
) -> None:
    """A report has cpu, rss, maxrss, loop gauges and counters() (totals as |c), prefixed."""

    def counters() -> dict[str, float]:
        return {"messages.in_flight": 2, "messages.processed": 40, "messages.failed": 1}

    async def main() -> None:
        async with ResourceReporter(
            client, "app.w.0", 0.01, counters=counters, cumulative=CUMULATIVE
        ) as reporter:
            kinds = await server.akinds()
            asyncio_loop = hasattr(asyncio.get_running_loop(), "_ready")
        expected = RESOURCE_METRICS | set(counters())
        if asyncio_loop:  # uvloop does not expose its queues
            expected |= {"loop.ready", "loop.timers"}
        assert kinds.keys() == {f"app.w.0.{name}" for name in expected}
        counted = {name for name, (_, kind) in kinds.items() if kind == "c"}
        assert counted == {f"app.w.0.{name}" for name in CUMULATIVE}
        report = {name: value for name, (value, _) in kinds.items()}
        assert report["app.w.0.messages.processed"] == 40  # the first report: all of it
        assert report["app.w.0.messages.in_flight"] == 2
        assert report["app.w.0.rss"] > 0
        assert report["app.w.0.maxrss"] >= report["app.w.0.rss"]
        assert report["app.w.0.cpu"] >= 0
        assert report["app.w.0.loop.tasks"] >= 1  # this test's own task
        assert reporter.reports >= 1

    run(main())


def test_reporter_measures_loop_lag(
    run: Callable[[Coroutine[Any, Any, None]], None], server: StatsdServer, client: StatsdClient
) -> None:
    """loop.lag is how late the report's timer fired: at least the time the loop was blocked."""

    async def main() -> None:
        async with ResourceReporter(client, "", 0.01):
            block_loop(0.3)  # the timer is due at 0.01 s
            report = await server.areport()
        assert report["loop.lag"] >= 250

    run(main())


def test_reporter_with_a_down_server_goes_on(
    run: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    """With nothing listening, reports keep coming, drops are counted, nothing is raised."""

    class Counting(StatsdClient):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            self.third_report: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.reports = 0

        def send(self, values: Any, counts: Any = None) -> None:
            super().send(values, counts)
            self.reports += 1
            if self.reports == 3:
                self.third_report.set_result(None)

    async def main() -> None:
        with Counting("127.0.0.1", closed_port()) as down:
            async with ResourceReporter(down, "w", 0.01) as reporter:
                await down.third_report
            assert reporter.reports >= 3
            assert down.dropped >= 1

    run(main())


class Recorder:
    """A duck-typed statsd client: records what its ``method`` receives."""

    def __init__(self, method: str = "gauge", fail: int = 0) -> None:
        self.received: dict[str, float] = {}
        self.calls = 0
        self.fail = fail  # how many calls raise before the recorder works
        self.report: asyncio.Future[dict[str, float]] = asyncio.get_running_loop().create_future()
        setattr(self, method, self._record)

    def _record(self, name: str, value: float) -> None:
        self.calls += 1
        if self.calls <= self.fail:
            raise ConnectionError("statsd client broken")
        self.received[name] = value
        if name.endswith("loop.tasks") and not self.report.done():
            self.report.set_result(dict(self.received))


@pytest.mark.parametrize("method", ["gauge", "send_gauge"])
def test_reporter_accepts_duck_typed_clients(
    run: Callable[[Coroutine[Any, Any, None]], None], method: str
) -> None:
    """Any object with gauge(name, value) or send_gauge(name, value) receives each gauge."""

    async def main() -> None:
        recorder = Recorder(method)
        async with ResourceReporter(recorder, "p", 0.01):  # type: ignore[arg-type]
            report = await recorder.report
        assert {name.removeprefix("p.") for name in report} >= RESOURCE_METRICS
        assert all(isinstance(value, float) for value in report.values())

    run(main())


def test_cumulative_totals_are_sent_as_their_increase(
    run: Callable[[Coroutine[Any, Any, None]], None], server: StatsdServer, client: StatsdClient
) -> None:
    """Each report adds what a running total grew by; after a restart (a drop), the new total."""
    totals = iter([5, 8, 8, 3, 4])

    def counters() -> dict[str, float]:
        return {"done": next(totals), "busy": 1}

    async def main() -> None:
        reporter = ResourceReporter(client, "w", 60.0, counters=counters, cumulative={"done"})
        reporter.start()
        try:
            reports = [reporter.report() for _ in range(5)]
        finally:
            await reporter.stop()
        assert [r["w.done"] for r in reports] == [5, 3, 0, 3, 1]
        assert all(r["w.busy"] == 1 for r in reports)
        sent = [metrics(server.receive()) for _ in range(5)]
        assert [m["w.done"] for m in sent] == [(5, "c"), (3, "c"), (0, "c"), (3, "c"), (1, "c")]
        assert all(m["w.busy"] == (1, "g") for m in sent)

    run(main())


class CountingRecorder:
    """A duck-typed client with gauge() and a counter method named ``method``."""

    def __init__(self, method: str) -> None:
        self.gauges: dict[str, float] = {}
        self.counts: list[tuple[str, float]] = []
        setattr(self, method, lambda name, value: self.counts.append((name, value)))

    def gauge(self, name: str, value: float) -> None:
        """Record a gauge."""
        self.gauges[name] = value


@pytest.mark.parametrize("method", ["incr", "increment", "send_counter"])
def test_duck_typed_clients_get_counters_through_their_counter_method(
    run: Callable[[Coroutine[Any, Any, None]], None], method: str
) -> None:
    """incr/increment/send_counter(name, value) receive the increases; gauge() the rest."""
    totals = iter([2, 6])

    def counters() -> dict[str, float]:
        return {"done": next(totals)}

    async def main() -> None:
        recorder = CountingRecorder(method)
        reporter = ResourceReporter(
            recorder,  # type: ignore[arg-type]
            "p",
            60.0,
            counters=counters,
            cumulative=["done"],
        )
        reporter.start()
        try:
            reporter.report()
            reporter.report()
        finally:
            await reporter.stop()
        assert recorder.counts == [("p.done", 2), ("p.done", 4)]
        assert "p.done" not in recorder.gauges
        assert {name.removeprefix("p.") for name in recorder.gauges} >= RESOURCE_METRICS

    run(main())


def test_a_client_without_counters_gets_totals_as_gauges(
    run: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    """A client with gauge() only receives each running total itself, as a gauge."""
    totals = iter([2, 6])

    def counters() -> dict[str, float]:
        return {"done": next(totals)}

    async def main() -> None:
        received: list[tuple[str, float]] = []
        client = types.SimpleNamespace(gauge=lambda name, value: received.append((name, value)))
        reporter = ResourceReporter(client, "p", 60.0, counters=counters, cumulative=["done"])
        reporter.start()
        try:
            assert reporter.report()["p.done"] == 2
            assert reporter.report()["p.done"] == 6
        finally:
            await reporter.stop()
        assert [value for name, value in received if name == "p.done"] == [2, 6]

    run(main())


def test_cumulative_must_be_names_not_one_string(client: StatsdClient) -> None:
    """cumulative="name" (a string, whose letters would be the names) is a TypeError."""
    with pytest.raises(TypeError, match=r"write cumulative=\['messages.processed'\]"):
        ResourceReporter(client, "p", cumulative="messages.processed")


def test_reporter_rejects_what_is_not_a_client() -> None:
    """A client without gauge()/send_gauge(), or a class, is a TypeError at construction."""
    with pytest.raises(TypeError, match="neither a gauge"):
        ResourceReporter(object(), "p")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="class StatsdClient"):
        ResourceReporter(StatsdClient, "p")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="interval"):
        ResourceReporter(types.SimpleNamespace(gauge=print), "p", 0)


def test_reporter_goes_on_when_the_client_raises(
    run: Callable[[Coroutine[Any, Any, None]], None], caplog: pytest.LogCaptureFixture
) -> None:
    """A client that raises is logged once and the next report still goes out."""

    async def main() -> None:
        recorder = Recorder(fail=2)  # two reports in a row fail: one warning
        async with ResourceReporter(recorder, "p", 0.01):  # type: ignore[arg-type]
            await recorder.report

    with caplog.at_level(logging.WARNING, logger="looppool.metrics"):
        run(main())
    failures = [r for r in caplog.records if r.name == "looppool.metrics"]
    assert len(failures) == 1
    assert failures[0].exc_info is not None
    assert "statsd client" in failures[0].getMessage()


def test_reporter_goes_on_when_counters_raise(
    run: Callable[[Coroutine[Any, Any, None]], None],
    server: StatsdServer,
    client: StatsdClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """counters() raising is logged once; the resource gauges still go, report after report."""

    def counters() -> dict[str, float]:
        raise RuntimeError("counters broken")

    async def main() -> None:
        async with ResourceReporter(client, "w", 0.01, counters=counters):
            first, second = await server.areport(), await server.areport()
        assert {"w.cpu", "w.rss"} <= first.keys()
        assert first.keys() == second.keys()

    with caplog.at_level(logging.WARNING, logger="looppool.metrics"):
        run(main())
    failures = [r for r in caplog.records if r.name == "looppool.metrics"]
    assert [r.getMessage().startswith("counters callable") for r in failures] == [True]


def test_stop_cancels_the_pending_report(
    run: Callable[[Coroutine[Any, Any, None]], None], client: StatsdClient
) -> None:
    """stop() cancels the timer chain; it is idempotent; start() twice is an error."""

    async def main() -> None:
        reporter = ResourceReporter(client, "w", 60.0)
        reporter.start()
        with pytest.raises(RuntimeError, match="already started"):
            reporter.start()
        handle = reporter._handle
        assert handle is not None
        assert reporter.running
        await reporter.stop()
        await reporter.aclose()
        assert handle.cancelled()
        assert not reporter.running
        assert reporter.reports == 0

    run(main())


def test_report_can_be_called_directly(
    run: Callable[[Coroutine[Any, Any, None]], None], client: StatsdClient
) -> None:
    """report() sends one report at once and returns its gauges (the benchmark uses it)."""

    async def main() -> None:
        reporter = ResourceReporter(client, "w", 60.0)
        reporter.start()
        try:
            report = reporter.report(lag_ms=1.5)
        finally:
            await reporter.stop()
        assert report["w.loop.lag"] == 1.5
        assert reporter.last_report == report
        assert client.sent == len(report)

    run(main())


def test_loop_queues_are_read_on_asyncio(client: StatsdClient) -> None:
    """On asyncio's loop, loop.ready and loop.timers count live callbacks and timers only."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with ResourceReporter(client, "w", 60.0) as reporter:  # its timer: 1
            timers = [loop.call_later(60, print) for _ in range(3)]
            timers[0].cancel()
            ready = [loop.call_soon(print) for _ in range(2)]
            ready[0].cancel()  # a cancelled handle stays in the ready queue, and counts
            report = reporter.report()
            for handle in timers + ready:
                handle.cancel()
        assert report["w.loop.timers"] == 3
        assert report["w.loop.ready"] == 2

    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        runner.run(main())


def test_reporter_start_off_the_loop_thread_is_refused(
    run: Callable[[Coroutine[Any, Any, None]], None], client: StatsdClient
) -> None:
    """start() from a thread other than the running loop's raises RuntimeError."""

    async def main() -> None:
        reporter = ResourceReporter(client, "w", loop=asyncio.get_running_loop())
        with pytest.raises(RuntimeError, match="loop's thread"):
            await asyncio.to_thread(reporter.start)
        assert not reporter.running

    run(main())


@pytest.mark.skipif(aiostatsd is None, reason="aiostatsd is not installed")
def test_reporter_sends_through_aiostatsd(
    run: Callable[[Coroutine[Any, Any, None]], None], server: StatsdServer
) -> None:
    """An aiostatsd client gets the gauges and counters as integers (cystatsd carries C ints)."""

    def counters() -> dict[str, float]:
        return {"done": 3}

    async def main() -> None:
        statsd = aiostatsd.client.StatsdClient("127.0.0.1", server.port, flush_interval=0.01)
        task = asyncio.create_task(statsd.run())
        try:
            async with ResourceReporter(
                statsd, "aio", 0.01, counters=counters, cumulative=["done"]
            ):
                kinds = await server.akinds()
        finally:
            await statsd.stop()
            await task
        report = {name: value for name, (value, _) in kinds.items()}
        assert {name.removeprefix("aio.") for name in report} >= RESOURCE_METRICS
        assert all(value == int(value) for value in report.values())
        assert report["aio.rss"] > 0
        assert kinds["aio.done"] == (3, "c")

    run(main())


# -- BlockingDetector -----------------------------------------------------------------------

THRESHOLD = 0.05


def block_in_sleep_until(event: threading.Event) -> int:
    """Block the calling (loop) thread in time.sleep() until ``event`` is set.

    Returns the line number that blocks. It is one line, so that the loop
    thread's stack names it whether the thread is sleeping or checking.
    """
    deadline = time.monotonic() + DEADLINE

    def over() -> bool:
        return event.is_set() or time.monotonic() > deadline

    line = inspect.currentframe().f_lineno + 1  # type: ignore[union-attr]
    _ = [time.sleep(0.005) for _ in iter(over, True)]  # type: ignore[func-returns-value]
    assert event.is_set(), f"the detector did not fire within {DEADLINE} s"
    return line


async def loop_turns() -> None:
    """Return once the loop has run its overdue timers (the detector's heartbeat included).

    Timers fire in deadline order, so one due now fires after every timer
    that fell due while the loop was blocked.
    """
    loop = asyncio.get_running_loop()
    turned = loop.create_future()
    loop.call_later(0, turned.set_result, None)
    await turned


class BlockWatcher:
    """An on_block callback that records its calls and signals the first of each episode."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str, int]] = []
        self.fired = threading.Event()

    def __call__(self, blocked_for: float, stack: str) -> None:
        self.calls.append((blocked_for, stack, threading.get_ident()))
        self.fired.set()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The WARNING records of the looppool.worker logger."""
    return [
        r for r in caplog.records if r.name == "looppool.worker" and r.levelno == logging.WARNING
    ]


def test_blocked_loop_logs_one_warning_naming_the_blocking_line(
    run: Callable[[Coroutine[Any, Any, None]], None], caplog: pytest.LogCaptureFixture
) -> None:
    """A loop blocked in time.sleep gets one warning, with the stack ending at that line."""
    watcher = BlockWatcher()
    lines: list[int] = []

    async def main() -> None:
        detector = BlockingDetector(THRESHOLD, on_block=watcher)
        detector.start()
        try:
            lines.append(block_in_sleep_until(watcher.fired))
            block_loop(4 * THRESHOLD)  # the same episode goes on: no second warning
            await loop_turns()
        finally:
            detector.stop()
        assert detector.blocked == 1

    caplog.set_level(logging.WARNING, logger="looppool.worker")
    run(main())
    [record] = warnings_of(caplog)
    message = record.getMessage()
    assert message.startswith("Event loop blocked for ")
    assert f'File "{__file__}", line {lines[0]}, in ' in message
    assert "time.sleep(0.005)" in message
    [(blocked_for, stack, thread)] = watcher.calls
    assert blocked_for >= THRESHOLD
    assert stack.rstrip("\n") in message
    assert thread != threading.get_ident()  # called from the watchdog thread


def test_each_blocking_episode_is_counted(
    run: Callable[[Coroutine[Any, Any, None]], None], caplog: pytest.LogCaptureFixture
) -> None:
    """Two blocks with a loop turn between them are two episodes, two warnings."""
    watcher = BlockWatcher()

    async def main() -> None:
        with BlockingDetector(THRESHOLD, on_block=watcher) as detector:
            block_in_sleep_until(watcher.fired)
            await loop_turns()
            watcher.fired.clear()
            block_in_sleep_until(watcher.fired)
            await loop_turns()
        assert detector.blocked == 2

    caplog.set_level(logging.WARNING, logger="looppool.worker")
    run(main())
    assert len(warnings_of(caplog)) == 2
    assert len(watcher.calls) == 2


def test_failing_on_block_is_logged_and_watching_goes_on(
    run: Callable[[Coroutine[Any, Any, None]], None], caplog: pytest.LogCaptureFixture
) -> None:
    """An on_block that raises is logged with its traceback; later episodes are still seen."""
    fired = threading.Event()

    def on_block(blocked_for: float, stack: str) -> None:
        fired.set()
        raise ZeroDivisionError("on_block broken")

    async def main() -> None:
        with BlockingDetector(THRESHOLD, on_block=on_block) as detector:
            for _ in range(2):
                fired.clear()
                block_in_sleep_until(fired)
                await loop_turns()
        assert detector.blocked == 2

    caplog.set_level(logging.WARNING, logger="looppool.worker")
    run(main())
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2
    assert all(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in errors)


def test_custom_logger_gets_the_warning(
    run: Callable[[Coroutine[Any, Any, None]], None], caplog: pytest.LogCaptureFixture
) -> None:
    """logger= replaces the default looppool.worker logger."""
    watcher = BlockWatcher()

    async def main() -> None:
        with BlockingDetector(THRESHOLD, on_block=watcher, logger=logging.getLogger("app.loop")):
            block_in_sleep_until(watcher.fired)
            await loop_turns()

    caplog.set_level(logging.WARNING)
    run(main())
    assert [r.name for r in caplog.records if "Event loop blocked" in r.getMessage()] == [
        "app.loop"
    ]


def test_healthy_loop_is_not_reported(
    run: Callable[[Coroutine[Any, Any, None]], None], caplog: pytest.LogCaptureFixture
) -> None:
    """A loop that keeps turning is never reported, however long it runs."""
    threshold = 0.2  # generous: a busy machine may pause a thread for some milliseconds

    async def main() -> None:
        with BlockingDetector(threshold) as detector:
            for _ in range(10):
                await asyncio.sleep(threshold / 4)  # the loop's own work: idle waiting
                block_loop(threshold / 20)  # and short blocking bursts
        assert detector.blocked == 0

    caplog.set_level(logging.WARNING, logger="looppool.worker")
    run(main())
    assert warnings_of(caplog) == []


def test_watchdog_is_a_daemon_thread_ended_by_stop(
    run: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    """The watchdog is a daemon; stop() ends it (idempotently); the detector can restart."""

    async def main() -> None:
        detector = BlockingDetector(60.0)
        for _ in range(2):
            detector.start()
            thread = detector._thread
            assert thread is not None
            assert thread.daemon
            assert thread.is_alive()
            assert detector.running
            with pytest.raises(RuntimeError, match="already started"):
                detector.start()
            detector.stop()
            detector.stop()
            assert not thread.is_alive()
            assert not detector.running
        assert "stopped" in repr(detector)

    run(main())


def test_start_off_the_loop_thread_is_refused(
    run: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    """start() from a thread other than the running loop's raises RuntimeError."""

    async def main() -> None:
        detector = BlockingDetector(THRESHOLD, loop=asyncio.get_running_loop())
        with pytest.raises(RuntimeError, match="loop's thread"):
            await asyncio.to_thread(detector.start)
        assert not detector.running

    run(main())


def test_threshold_must_be_positive() -> None:
    """A threshold of zero or less is a ValueError."""
    for threshold in (0, -1.0, math.nan):
        with pytest.raises(ValueError, match="threshold"):
            BlockingDetector(threshold)
