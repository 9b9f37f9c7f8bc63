#!/usr/bin/env python3
"""The seed's ``FetchWorker`` example, in asyncio form.

A pool of processes fetches URLs with aiohttp; each worker puts
``(url, the response's Server header)`` and the parent prints every result
(the seed's ``pool.process_message = print`` is ``on_result=print``). To run
offline, the example first starts a small local site on 127.0.0.1 whose pages
answer with the Server headers the seed's four sites sent.

    python examples/fetch_worker.py            # 4 workers, 40 URLs
    python examples/fetch_worker.py --smoke    # 2 workers, 4 URLs

Needs aiohttp (``pip install 'looppool[demo]'``).
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
from aiohttp import web

import looppool

#: The seed's sites, served locally: path -> the Server header it answers with.
SITES = {
    "python.org": "nginx",
    "tornadoweb.org": "TornadoServer/6.4",
    "google.com": "gws",
    "stackoverflow.com": "cloudflare",
}


class FetchWorker(looppool.SafeWorker):
    """Fetches a URL and puts ``(url, Server header)``.

    A ``SafeWorker``: when the pool stops, every URL put before is fetched.
    """

    session: aiohttp.ClientSession

    async def initialise(self) -> None:
        """Open this worker's HTTP session (one per process, on its own loop)."""
        self.session = aiohttp.ClientSession()

    async def process_message(self, url: str) -> None:
        """Fetch ``url``; put ``(url, Server header)`` as the result."""
        async with self.session.get(url) as response:
            await response.read()
            self.put_result((url, response.headers.get("Server")))

    async def finalise(self) -> None:
        """Close the HTTP session."""
        await self.session.close()


async def start_site() -> tuple[web.AppRunner, str]:
    """Start the local site on 127.0.0.1 (a free port); return it and its base URL."""

    async def page(request: web.Request) -> web.Response:
        site = request.match_info["site"]
        return web.Response(text=f"<h1>{site}</h1>", headers={"Server": SITES[site]})

    app = web.Application()
    app.router.add_get("/{site}/", page)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


async def main(size: int, rounds: int) -> None:
    """Fetch every site ``rounds`` times with a pool of ``size`` processes."""
    runner, base = await start_site()
    try:
        urls = [f"{base}/{site}/" for _ in range(rounds) for site in SITES]
        async with looppool.Pool(FetchWorker, size=size, on_result=print) as pool:
            for url in urls:
                pool.put_nowait(url)
            # Leaving the block stops the pool; a SafeWorker pool fetches
            # every URL put before, and on_result gets every result, first.
        print(f"fetched {pool.stats().processed} URLs with {size} worker processes")
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4, help="worker processes (default 4)")
    parser.add_argument("--rounds", type=int, default=10, help="fetches of each site")
    parser.add_argument("--smoke", action="store_true", help="a quick run: 2 workers, 4 URLs")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.rounds = 2, 1
    asyncio.run(main(args.size, args.rounds))
