#!/usr/bin/env python3
"""The seed's ``InstrumentatedWorker`` example, in asyncio form.

What the seed wired by hand in every worker, looppool does once, in the parent:

* **Metrics** — ``Pool(..., statsd="127.0.0.1:8125", statsd_prefix=...)``
  makes every worker send statsd gauges (CPU, RSS, event-loop lag, tasks,
  in-flight and processed messages) every ``metrics_interval`` seconds. No
  statsd client library is needed.
* **Process titles** — each worker names itself with ``setproctitle`` in
  ``initialise()``, so ``ps``/``htop`` show which process is which.
* **Logging** — configured once, in the parent: workers' log records (their
  exceptions' tracebacks included) are forwarded to the parent's ``logging``.
  Set ``SENTRY_DSN`` (with ``sentry-sdk`` installed) and warnings and errors
  from every worker reach Sentry through that one configuration.

By default the example listens for the metrics itself (a small UDP receiver
on 127.0.0.1) and prints a few; ``--statsd HOST:PORT`` sends them to a real
statsd instead.

    python examples/instrumented_worker.py --smoke
    python examples/instrumented_worker.py --statsd 127.0.0.1:8125

Needs setproctitle (``pip install 'looppool[titles]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os

from setproctitle import getproctitle, setproctitle

import looppool

APP_NAME = "instrumented-example"
POOL_NAME = "numbers"

logger = logging.getLogger(__name__)


class InstrumentedWorker(looppool.Worker):
    """Names its process, logs a warning now and then, puts ``(message, number, title)``."""

    def initialise(self) -> None:
        """Give the process a title that says what it is."""
        setproctitle(f"python {APP_NAME} {POOL_NAME} pool worker {self.number}")

    def process_message(self, message: int) -> None:
        """Put ``(message, worker number, process title)``; fail on 13."""
        if message == 13:
            # Logged in the parent with this worker's traceback, counted as failed.
            raise ValueError("13 is unlucky")
        if message % 10 == 7:
            logger.warning("message %d ends in 7", message)  # reaches the parent's handlers
        self.put_result((message, self.number, getproctitle()))


#: The seed's spelling of the class name.
InstrumentatedWorker = InstrumentedWorker


def configure_logging() -> None:
    """Configure logging once, in the parent: stderr, plus Sentry if ``SENTRY_DSN`` is set."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dsn = os.environ.get("SENTRY_DSN")
    if not dsn:
        return
    try:
        sentry_sdk = importlib.import_module("sentry_sdk")
    except ImportError:
        logger.warning("SENTRY_DSN is set but sentry-sdk is not installed: no Sentry")
        return
    # sentry-sdk's logging integration sends ERROR records as events and keeps
    # INFO and WARNING ones as breadcrumbs: forwarded worker records included.
    sentry_sdk.init(dsn=dsn)


class StatsdReceiver(asyncio.DatagramProtocol):
    """A stand-in statsd server: collects the gauges it receives, by worker."""

    def __init__(self, workers: int) -> None:
        self.gauges: dict[str, str] = {}
        self.workers_heard: set[str] = set()
        self.workers = workers
        self.heard_all = asyncio.Event()

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        """Record each ``name:value|g`` line."""
        for line in data.decode(errors="replace").splitlines():
            name, _, value = line.partition(":")
            self.gauges[name] = value
            # name: {prefix}.{pool}.worker.{number}.{metric}
            parts = name.split(".worker.")
            if len(parts) == 2:
                self.workers_heard.add(parts[1].split(".")[0])
        if len(self.workers_heard) >= self.workers:
            self.heard_all.set()


async def main(size: int, messages: int, statsd: str | None, interval: float) -> None:
    """Run ``messages`` through an instrumented pool of ``size`` workers."""
    receiver: StatsdReceiver | None = None
    transport: asyncio.DatagramTransport | None = None
    if statsd is None:
        transport, receiver = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: StatsdReceiver(size), local_addr=("127.0.0.1", 0)
        )
        statsd = "127.0.0.1:{}".format(transport.get_extra_info("sockname")[1])
    try:
        async with looppool.Pool(
            InstrumentedWorker,
            size=size,
            name=POOL_NAME,
            statsd=statsd,
            statsd_prefix=APP_NAME,
            metrics_interval=interval,
        ) as pool:
            for message in range(messages):
                await pool.put(message)
            async with asyncio.TaskGroup() as group:
                group.create_task(pool.drain())
                if receiver is not None:
                    # Keep the pool up until every worker has reported once.
                    group.create_task(asyncio.wait_for(receiver.heard_all.wait(), 30))
            await pool.stop()
            async for message, number, title in pool.results():
                print(f"message {message:3d}: worker {number} ({title})")
        stats = pool.stats()
        print(f"processed {stats.processed}, failed {stats.failed} in {size} workers")
        if receiver is not None:
            print(f"statsd gauges received from {len(receiver.workers_heard)} workers, e.g.:")
            for name in sorted(receiver.gauges)[:8]:
                print(f"  {name} = {receiver.gauges[name]}")
    finally:
        if transport is not None:
            transport.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--messages", type=int, default=40, help="messages to process")
    parser.add_argument(
        "--statsd",
        metavar="HOST:PORT",
        help="send metrics to this statsd (default: a local receiver that prints them)",
    )
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between metrics")
    parser.add_argument("--smoke", action="store_true", help="a quick run")
    args = parser.parse_args()
    if args.smoke:
        args.messages, args.interval = 20, 0.2
    configure_logging()
    asyncio.run(main(args.size, args.messages, args.statsd, args.interval))
