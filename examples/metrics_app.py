#!/usr/bin/env python3
"""An aiohttp app whose ``/metrics`` shows its looppool pool to Prometheus.

The app offloads PBKDF2 hashing to a pool (as examples/web_app.py does) and
exposes, on ``GET /metrics`` in Prometheus's text format, the pool's
counters (``looppool_messages_processed_total``...), what each worker holds,
and each worker's resource gauges (CPU, memory, event-loop lag, tasks),
which the workers forward to the parent (``worker_metrics=True``): one
scrape endpoint for the whole pool, and no statsd server. It listens on
127.0.0.1 only.

    python examples/metrics_app.py          # http://127.0.0.1:8080/metrics, /hash?password=...
    python examples/metrics_app.py --smoke  # a known workload, a killed worker, one scrape

Needs aiohttp and prometheus_client (``pip install 'looppool[demo,prometheus]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import signal
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

import looppool
from looppool.metrics import PrometheusCollector

ROUNDS = 100_000
SALT = b"looppool-example"

POOL = web.AppKey("pool", looppool.Pool)
REGISTRY = web.AppKey("registry", CollectorRegistry)
WORKERS = web.AppKey("workers", int)
INTERVAL = web.AppKey("interval", float)


class HashWorker(looppool.SafeWorker):
    """Hashes ``(password, rounds)`` with PBKDF2; replies ``(hex digest, worker number)``.

    ``"pid"`` replies with the worker's process id.
    """

    def process_message(self, message: tuple[str, int] | str) -> tuple[str, int] | int:
        """Hash a password, or tell the pid."""
        if isinstance(message, str):  # "pid"
            return os.getpid()
        password, rounds = message
        digest = hashlib.pbkdf2_hmac("sha256", password.encode(), SALT, rounds)
        return digest.hex(), self.number


async def pool_context(app: web.Application) -> AsyncIterator[None]:
    """Start the pool with the app; register its collector; stop it at the app's clean-up."""
    pool = looppool.Pool(
        HashWorker,
        size=app[WORKERS],
        name="hash",
        worker_metrics=True,  # the workers' gauges, every metrics_interval seconds
        metrics_interval=app[INTERVAL],
    )
    # The app's own registry: prometheus_client's global REGISTRY works as
    # well (it adds the process_* and python_* metrics of this process).
    registry = CollectorRegistry()
    registry.register(PrometheusCollector(pool))
    async with pool:
        app[POOL], app[REGISTRY] = pool, registry
        yield


async def hash_password(request: web.Request) -> web.Response:
    """``GET /hash?password=...``: the PBKDF2 hash, computed in the pool."""
    password = request.query.get("password")
    if password is None:
        raise web.HTTPBadRequest(text="give ?password=...\n")
    digest, worker = await request.app[POOL].submit((password, ROUNDS))
    return web.json_response({"password": password, "pbkdf2": digest, "worker": worker})


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: the Prometheus text format, read from the pool on this loop."""
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_app(workers: int, interval: float = 10.0) -> web.Application:
    """The application: its routes and the pool's life cycle."""
    app = web.Application()
    app[WORKERS] = workers
    app[INTERVAL] = interval
    app.cleanup_ctx.append(pool_context)
    app.router.add_get("/hash", hash_password)
    app.router.add_get("/metrics", metrics)
    return app


async def kill(pid: int) -> None:
    """SIGKILL a worker and wait until its process has exited (on a pidfd: no polling).

    Waiting makes the run deterministic: a message sent to the worker's
    number now cannot reach the dying process, so it is not a redelivery.
    """
    loop = asyncio.get_running_loop()
    fd = os.pidfd_open(pid)
    try:
        exited = loop.create_future()
        loop.add_reader(fd, exited.set_result, None)
        os.kill(pid, signal.SIGKILL)
        await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def smoke(workers: int, requests: int) -> None:
    """Hash ``requests`` passwords over HTTP, kill a worker, then scrape ``/metrics``."""
    app = make_app(workers)
    runner = web.AppRunner(app)
    await runner.setup()  # runs cleanup_ctx up to its yield: the pool is started
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        base = f"http://{host}:{port}"
        pool = app[POOL]
        async with aiohttp.ClientSession(raise_for_status=True) as session:

            async def get(path: str) -> None:
                async with session.get(base + path) as response:
                    await response.read()

            await asyncio.gather(*(get(f"/hash?password=secret{i}") for i in range(requests)))
            victim = pool.pids[workers - 1]
            assert victim is not None
            await kill(victim)
            # Directed to the killed worker's number, this waits for its
            # replacement, which sends its gauges before it is ready.
            replacement = await pool.submit("pid", worker=workers - 1)
            print(f"killed worker {workers - 1} (pid {victim}); replaced by pid {replacement}")
            async with session.get(f"{base}/metrics") as response:
                text = await response.text()
        print(f"GET /metrics ({response.headers['Content-Type']}):")
        for line in text.splitlines():
            if line.startswith("looppool_"):
                print("  " + line)
    finally:
        await runner.cleanup()  # the rest of cleanup_ctx: the pool stops


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1")
    parser.add_argument(
        "--metrics-interval", type=float, default=10.0, help="seconds between worker reports"
    )
    parser.add_argument("--smoke", action="store_true", help="a known workload, then one scrape")
    args = parser.parse_args()
    if args.smoke:
        asyncio.run(smoke(args.workers, 8))
    else:
        app = make_app(args.workers, args.metrics_interval)
        web.run_app(app, host="127.0.0.1", port=args.port)
