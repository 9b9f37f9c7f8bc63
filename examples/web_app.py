#!/usr/bin/env python3
"""An aiohttp web app whose handlers offload CPU work to a looppool pool.

A request handler that computes (here: a PBKDF2 password hash, ~20 ms of
CPU) would stall the server's event loop for every other request. With
``await pool.submit(...)`` the work runs in another process, on that
process's own loop, and the handler awaits the reply; the web server keeps
serving. The pool starts and stops with the app, through ``cleanup_ctx``.

    python examples/web_app.py            # serves http://127.0.0.1:8080/hash?password=...
    python examples/web_app.py --smoke    # starts on a free port, sends requests, stops

Needs aiohttp (``pip install 'looppool[demo]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

import looppool

ROUNDS = 100_000
SALT = b"looppool-example"

POOL = web.AppKey("pool", looppool.Pool)
WORKERS = web.AppKey("workers", int)


class HashWorker(looppool.Worker):
    """Hashes a password with PBKDF2 (pure CPU); replies ``(hex digest, worker number)``."""

    def process_message(self, message: tuple[str, int]) -> tuple[str, int]:
        """``message`` is ``(password, rounds)``."""
        password, rounds = message
        digest = hashlib.pbkdf2_hmac("sha256", password.encode(), SALT, rounds)
        return digest.hex(), self.number


async def pool_context(app: web.Application) -> AsyncIterator[None]:
    """Start the pool with the app, stop it at the app's clean-up."""
    async with looppool.Pool(HashWorker, size=app[WORKERS], name="web-hash") as pool:
        app[POOL] = pool
        yield


async def hash_password(request: web.Request) -> web.Response:
    """``GET /hash?password=...``: the PBKDF2 hash, computed in the pool."""
    password = request.query.get("password")
    if password is None:
        raise web.HTTPBadRequest(text="give ?password=...\n")
    digest, worker = await request.app[POOL].submit((password, ROUNDS))
    return web.json_response({"password": password, "pbkdf2": digest, "worker": worker})


async def health(request: web.Request) -> web.Response:
    """``GET /health``: answered on the server's own loop, at once."""
    stats = request.app[POOL].stats()
    return web.json_response({"processed": stats.processed, "pending": stats.pending})


def make_app(workers: int) -> web.Application:
    """The application: its routes and the pool's life cycle."""
    app = web.Application()
    app[WORKERS] = workers
    app.cleanup_ctx.append(pool_context)
    app.router.add_get("/hash", hash_password)
    app.router.add_get("/health", health)
    return app


async def smoke(workers: int, requests: int) -> None:
    """Start the app on a free port, send ``requests`` hash requests at once, stop."""
    runner = web.AppRunner(make_app(workers))
    await runner.setup()  # runs cleanup_ctx up to its yield: the pool is started
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        base = f"http://{host}:{port}"
        async with aiohttp.ClientSession(raise_for_status=True) as session:

            async def get(path: str) -> dict[str, object]:
                async with session.get(base + path) as response:
                    body: dict[str, object] = await response.json()
                    return body

            replies = await asyncio.gather(
                *(get(f"/hash?password=secret{i}") for i in range(requests))
            )
            for reply in replies:
                digest = str(reply["pbkdf2"])[:16]
                print(f"{reply['password']}: {digest}... by worker {reply['worker']}")
            print("health:", await get("/health"))
    finally:
        await runner.cleanup()  # the rest of cleanup_ctx: the pool stops
    print(f"served {requests} hash requests with {workers} worker processes")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1")
    parser.add_argument("--smoke", action="store_true", help="send a few requests and stop")
    args = parser.parse_args()
    if args.smoke:
        asyncio.run(smoke(args.workers, 8))
    else:
        web.run_app(make_app(args.workers), host="127.0.0.1", port=args.port)
