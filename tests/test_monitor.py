"""Tests of looppool._monitor: the worker runtime's WorkerMonitor and its helpers.

Datagrams are received by a real UDP socket bound to 127.0.0.1; every loop
test runs on asyncio and on uvloop. Nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

import looppool
from looppool import _monitor
from looppool._monitor import (
    WorkerMonitor,
    check_statsd_option,
    metric_prefix,
    parse_statsd_address,
)
from looppool.metrics import StatsdClient
from statsd_server import StatsdServer

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


@pytest.fixture
def server() -> Iterator[StatsdServer]:
    """A statsd server on 127.0.0.1."""
    server = StatsdServer()
    yield server
    server.close()


def closed_port() -> int:
    """A UDP port on 127.0.0.1 that nothing listens on (a statsd server that is down)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def counters() -> dict[str, float]:
    """What the worker runtime passes as counters."""
    return {"messages.in_flight": 1, "messages.processed": 7, "messages.failed": 0}


def monitor(**options: Any) -> WorkerMonitor:
    """A WorkerMonitor on the running loop, with the options a test does not care about."""
    defaults: dict[str, Any] = {
        "loop": asyncio.get_running_loop(),
        "number": 3,
        "pool_name": "crawl",
        "statsd": None,
        "statsd_prefix": "app",
        "interval": 0.01,
        "blocking_threshold": None,
        "counters": counters,
    }
    return WorkerMonitor(**(defaults | options))


# -- parse_statsd_address, check_statsd_option, metric_prefix -------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:8125", ("127.0.0.1", 8125)),
        ("localhost:1", ("localhost", 1)),
        ("statsd.example.com:65535", ("statsd.example.com", 65535)),
        ("[::1]:8125", ("::1", 8125)),
    ],
)
def test_parse_statsd_address(address: str, expected: tuple[str, int]) -> None:
    """host:port and [ipv6]:port split into (host, port)."""
    assert parse_statsd_address(address) == expected


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("", "no port"),
        ("127.0.0.1", "no port"),
        ("127.0.0.1:", "port ''"),
        (":8125", "empty host"),
        ("[]:8125", "empty host"),
        ("host:port", "port 'port'"),
        ("host:0", "port '0'"),
        ("host:65536", "port '65536'"),
        ("host:-1", "port '-1'"),
        ("host: 8125", "port ' 8125'"),
        (" host:8125", "spaces around the host"),
        ("::1:8125", "brackets"),
    ],
)
def test_parse_statsd_address_rejects_bad_input(address: str, why: str) -> None:
    """A malformed address is a ValueError naming the value, the reason and the expected form."""
    with pytest.raises(ValueError, match="is not 'host:port'") as info:
        parse_statsd_address(address)
    assert repr(address) in str(info.value)
    assert why in str(info.value)
    assert "'127.0.0.1:8125'" in str(info.value)


def test_parse_statsd_address_rejects_non_strings() -> None:
    """A non-str address is a TypeError."""
    with pytest.raises(TypeError, match="must be a str"):
        parse_statsd_address(("127.0.0.1", 8125))  # type: ignore[arg-type]


def test_check_statsd_option() -> None:
    """None, an address, a client and a client factory pass; anything else is refused."""
    with StatsdClient("127.0.0.1", closed_port()) as client:
        for good in (None, "127.0.0.1:8125", client, functools.partial(StatsdClient, "h", 1)):
            check_statsd_option(good)
    with pytest.raises(ValueError, match="host:port"):
        check_statsd_option("127.0.0.1")
    with pytest.raises(TypeError, match="statsd must be"):
        check_statsd_option(8125)


@pytest.mark.parametrize(
    ("statsd_prefix", "pool_name", "expected"),
    [
        ("app", "crawl", "app.crawl.worker.3"),
        ("my.app.", "crawl", "my.app.crawl.worker.3"),
        (None, "crawl", "crawl.worker.3"),
        ("", "crawl", "crawl.worker.3"),
        ("app", "my pool.v2", "app.my_pool_v2.worker.3"),
    ],
)
def test_metric_prefix(statsd_prefix: str | None, pool_name: str, expected: str) -> None:
    """Gauges are {statsd_prefix}.{pool_name}.worker.{number}; the pool name is one component."""
    assert metric_prefix(statsd_prefix, pool_name, 3) == expected


# -- WorkerMonitor ---------------------------------------------------------------------------


def test_monitor_reports_worker_gauges_to_an_address(
    run: Callable[[Coroutine[Any, Any, None]], None], server: StatsdServer
) -> None:
    """statsd='host:port' sends {prefix}.{pool}.worker.{n}.* gauges, counters included."""

    async def main() -> None:
        mon = monitor(statsd=server.address)
        mon.start()
        try:
            assert mon.reporter is not None
            assert mon.detector is None
            client = mon.reporter.client
            report = await server.areport()
        finally:
            await mon.aclose()
        assert isinstance(client, StatsdClient)
        assert client.closed  # made by the monitor, so closed by it
        assert mon.reporter is None
        names = {name.removeprefix("app.crawl.worker.3.") for name in report}
        assert {"cpu", "rss", "maxrss", "loop.lag", "loop.tasks"} <= names
        assert report["app.crawl.worker.3.messages.processed"] == 7

    run(main())


def test_monitor_without_statsd_prefix(
    run: Callable[[Coroutine[Any, Any, None]], None], server: StatsdServer
) -> None:
    """statsd_prefix=None drops the prefix part of the names."""

    async def main() -> None:
        mon = monitor(statsd=server.address, statsd_prefix=None, number=0)
        mon.start()
        try:
            report = await server.areport()
        finally:
            await mon.aclose()
        assert all(name.startswith("crawl.worker.0.") for name in report)

    run(main())


def test_monitor_uses_a_client_instance_and_leaves_it_open(
    run: Callable[[Coroutine[Any, Any, None]], None], server: StatsdServer
) -> None:
    """A client object is used as is and not closed: it belongs to the user."""

    async def main() -> None:
        with StatsdClient("127.0.0.1", server.port, prefix="user") as client:
            mon = monitor(statsd=client)
            mon.start()
            try:
                report = await server.areport()
            finally:
                await mon.aclose()
            assert not client.closed
        assert "user.app.crawl.worker.3.cpu" in report

    run(main())


def test_monitor_calls_a_client_factory_and_closes_its_client(
    run: Callable[[Coroutine[Any, Any, None]], None], server: StatsdServer
) -> None:
    """A callable is called in start() for the client, which aclose() closes."""
    made: list[StatsdClient] = []

    def factory() -> StatsdClient:
        made.append(StatsdClient("127.0.0.1", server.port))
        return made[-1]

    async def main() -> None:
        mon = monitor(statsd=factory)
        mon.start()
        try:
            await server.areport()
        finally:
            await mon.aclose()
        [client] = made
        assert client.closed

    run(main())


def test_monitor_with_a_down_server_disturbs_nothing(
    run: Callable[[Coroutine[Any, Any, None]], None], caplog: pytest.LogCaptureFixture
) -> None:
    """Reporting to a closed port raises nothing, logs nothing, and the loop runs on."""

    class Refused(StatsdClient):
        """The client "host:port" makes, signalling its second refused report."""

        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            self.refused: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def send(self, values: Any, counts: Any = None) -> None:
            super().send(values, counts)
            if self.dropped >= 2 * len(values) and not self.refused.done():
                self.refused.set_result(None)

    async def main() -> None:
        mon = monitor(statsd=functools.partial(Refused, "127.0.0.1", closed_port()))
        mon.start()
        try:
            assert mon.reporter is not None
            assert isinstance(mon.reporter.client, Refused)
            await mon.reporter.client.refused
        finally:
            await mon.aclose()

    caplog.set_level(logging.DEBUG, logger="looppool")
    run(main())
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_monitor_without_statsd_or_threshold_does_nothing(
    run: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    """statsd=None and blocking_threshold=None start neither reporter nor detector."""

    async def main() -> None:
        mon = monitor()
        mon.start()
        assert (mon.reporter, mon.detector) == (None, None)
        await mon.aclose()
        await mon.aclose()

    run(main())


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
    """Return once the loop has run its overdue timers (the detector's heartbeat included)."""
    loop = asyncio.get_running_loop()
    turned = loop.create_future()
    loop.call_later(0, turned.set_result, None)  # timers fire in deadline order
    await turned


def test_monitor_reports_each_blocking_episode(
    run: Callable[[Coroutine[Any, Any, None]], None], caplog: pytest.LogCaptureFixture
) -> None:
    """blocking_threshold logs the blocking line once per episode and calls on_blocked."""
    episodes: list[int] = []
    fired = threading.Event()
    blocking_lines: list[int] = []

    def on_blocked() -> None:
        episodes.append(threading.get_ident())
        fired.set()

    async def main() -> None:
        mon = monitor(blocking_threshold=0.05, on_blocked=on_blocked)
        mon.start()
        try:
            assert mon.detector is not None
            for _ in range(2):
                fired.clear()
                blocking_lines.append(block_in_sleep_until(fired))
                await loop_turns()
        finally:
            await mon.aclose()
        assert mon.detector is None

    caplog.set_level(logging.WARNING, logger="looppool.worker")
    run(main())
    assert len(episodes) == 2
    assert threading.get_ident() not in episodes  # called from the watchdog thread
    warnings = [r.getMessage() for r in caplog.records if r.name == "looppool.worker"]
    assert len(warnings) == 2
    for message, line in zip(warnings, blocking_lines, strict=True):
        assert f'File "{__file__}", line {line}, in ' in message


def test_monitor_start_survives_a_failing_client_factory(
    run: Callable[[Coroutine[Any, Any, None]], None], caplog: pytest.LogCaptureFixture
) -> None:
    """A factory that raises (e.g. a DNS failure) is logged; the detector still starts."""

    def factory() -> StatsdClient:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def main() -> None:
        mon = monitor(statsd=factory, blocking_threshold=60.0)
        mon.start()
        try:
            assert mon.reporter is None
            assert mon.detector is not None
        finally:
            await mon.aclose()

    caplog.set_level(logging.ERROR, logger="looppool.worker")
    run(main())
    [record] = caplog.records
    assert "statsd metrics disabled" in record.getMessage()
    assert record.exc_info is not None
    assert record.exc_info[0] is socket.gaierror


class BadClient:
    """A statsd client whose close() raises, or never returns."""

    def __init__(self, close: str) -> None:
        self.mode = close
        self.gauges: list[str] = []

    def gauge(self, name: str, value: float) -> None:
        self.gauges.append(name)

    async def close(self) -> None:
        if self.mode == "raise":
            raise OSError("close failed")
        await asyncio.Event().wait()  # hangs


@pytest.mark.parametrize("close", ["raise", "hang"])
def test_monitor_aclose_never_raises(
    run: Callable[[Coroutine[Any, Any, None]], None],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    close: str,
) -> None:
    """aclose() logs a client whose close() raises or hangs (bounded by CLOSE_TIMEOUT)."""
    monkeypatch.setattr(_monitor, "CLOSE_TIMEOUT", 0.05)

    async def main() -> None:
        mon = monitor(statsd=functools.partial(BadClient, close), interval=60.0)
        mon.start()
        await mon.aclose()

    caplog.set_level(logging.ERROR, logger="looppool.worker")
    run(main())
    [record] = caplog.records
    assert "closing the statsd client failed" in record.getMessage()
    assert record.exc_info is not None
    assert record.exc_info[0] is (OSError if close == "raise" else TimeoutError)


@pytest.mark.skipif(aiostatsd is None, reason="aiostatsd is not installed")
def test_monitor_runs_and_stops_an_aiostatsd_client(
    run: Callable[[Coroutine[Any, Any, None]], None], server: StatsdServer
) -> None:
    """An aiostatsd factory: the monitor runs the client's task, reports, and stops it."""

    async def main() -> None:
        factory = functools.partial(
            aiostatsd.client.StatsdClient, "127.0.0.1", server.port, flush_interval=0.01
        )
        mon = monitor(statsd=factory)
        mon.start()
        try:
            task = mon._client_task
            assert task is not None
            report = await server.areport()
        finally:
            await mon.aclose()
        assert task.done()
        assert not task.cancelled()
        assert "app.crawl.worker.3.rss" in report
        assert all(value == int(value) for value in report.values())

    run(main())


# -- end to end, through a pool ------------------------------------------------------------


class Blocker(looppool.Worker):
    """Echoes messages; the message "block" blocks its loop for a second."""

    def process_message(self, message: str) -> str:
        if message == "block":
            time.sleep(1.0)  # block the worker's loop on purpose (threshold: 0.1 s)
        return message


@pytest.mark.asyncio
async def test_pool_workers_send_gauges_and_report_blocked_loops(
    start_method: str, loop_kind: str, server: StatsdServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Pool(statsd=, blocking_threshold=): worker gauges reach statsd, a block reaches logging."""
    caplog.set_level(logging.WARNING, logger="looppool.worker")
    async with looppool.Pool(
        Blocker,
        size=2,
        name="crawl",
        loop=loop_kind,
        start_method=start_method,
        statsd=server.address,
        statsd_prefix="e2e",
        metrics_interval=0.05,
        blocking_threshold=0.1,
    ) as pool:
        report = await server.areport()
        assert await pool.submit("block") == "block"
        stats = pool.stats()
    [worker] = {name.split(".")[3] for name in report}  # whichever worker reported first
    assert worker in {"0", "1"}
    assert f"e2e.crawl.worker.{worker}.messages.processed" in report
    assert f"e2e.crawl.worker.{worker}.messages.timed_out" in report
    assert f"e2e.crawl.worker.{worker}.rss" in report
    assert stats.blocked == 1
    [record] = [r for r in caplog.records if "Event loop blocked" in r.getMessage()]
    assert "time.sleep(1.0)  # block the worker" in record.getMessage()
