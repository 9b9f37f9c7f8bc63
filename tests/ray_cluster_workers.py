"""The worker and the driver program of test_ray_cluster.py (the README's ``crawl.py``).

The test starts every node of its cluster with this directory on
``PYTHONPATH``, as a user installs their package on every node, and runs
:func:`main` as the driver, in a process of its own::

    python -c "import ray_cluster_workers as w; w.main()" ADDRESS [--kill]

(``ADDRESS`` is what ``RayPool`` gets as ``address=``; ``None`` for ``None``.)

The driver prints one line, ``REPORT {json}``, saying where each actor ran,
every result, and the pool's counters.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import looppool

# Ray is imported where it is used: the test process imports this module for
# its constants and must not import Ray (tests/test_ray.py configures Ray's
# networking before its first import, in the same process).
DEADLINE = 60.0  # seconds the whole driver may take once Ray answers
MESSAGES = 10
HOLDS = 4
GATE = "looppool-test-gate"  # the name of the Gate actor of a run


class Gate:
    """A Ray actor the holds wait at, wherever they run: opened once, by the driver.

    (A message to the worker could not open it: after a death the held
    messages run alone on the replacement, and nothing else reaches it.)
    """

    def __init__(self) -> None:
        self.opened = asyncio.Event()

    async def wait(self) -> None:
        await self.opened.wait()

    async def open(self) -> None:
        self.opened.set()


class Where(looppool.SafeWorker):
    """Says which Ray node and process run it; ("hold", i) waits until the gate opens."""

    def initialise(self) -> None:
        import ray

        self.node = ray.get_runtime_context().get_node_id()

    async def process_message(self, message: Any) -> Any:
        if message == "where":
            return {"number": self.number, "node": self.node, "pid": os.getpid()}
        kind, i = message
        if kind == "hold":
            self.put_result(["holding", self.number, self.node, os.getpid(), i])
            import ray

            await ray.get_actor(GATE).wait.remote()
        self.put_result(["done", self.number, self.node, os.getpid(), [kind, i]])
        return None


async def _read_until(
    results: AsyncIterator[Any], seen: list[Any], enough: Callable[[list[Any]], bool]
) -> None:
    while not enough(seen):
        seen.append(await anext(results))


def _holding(seen: list[Any]) -> int:
    return sum(1 for r in seen if r[0] == "holding")


async def crawl(address: str | None, kill: bool) -> dict[str, Any]:
    """Run a pool of two actors on the cluster at ``address``; kill actor 0 mid-run if told."""
    import ray

    from looppool.ray import RayPool

    report: dict[str, Any] = {}
    seen: list[Any] = []
    pool = RayPool(Where, 2, address=address, num_cpus=1)
    async with asyncio.timeout(DEADLINE), pool:
        results = pool.results()
        report["where"] = [await pool.submit("where", worker=k) for k in range(2)]
        report["alive_nodes"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        for i in range(MESSAGES):
            await pool.put(["msg", i])
        await pool.drain()
        if kill:
            gate = ray.remote(Gate).options(name=GATE, num_cpus=0).remote()
            for i in range(HOLDS):
                await pool.put(["hold", i])
            await _read_until(results, seen, lambda s: _holding(s) == HOLDS)
            ray.kill(pool.actors[0])
            # What actor 0 held runs again on its replacement, alone, one
            # suspect at a time (the poison-message rule): the first says
            # "holding"; the second runs once the first has ended.
            await _read_until(results, seen, lambda s: _holding(s) == HOLDS + 1)
            await gate.open.remote()
            await pool.drain()
            report["replacement"] = await pool.submit("where", worker=0)
    report["results"] = seen + [r async for r in results]
    report["stats"] = dataclasses.asdict(pool.stats())
    return report


def main() -> None:
    """The driver's entry point: ``ADDRESS [--kill]``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("address", help='what RayPool gets as address=; "None" for None')
    parser.add_argument("--kill", action="store_true")
    args = parser.parse_args()
    address = None if args.address == "None" else args.address
    report = asyncio.run(crawl(address, args.kill))
    print("REPORT " + json.dumps(report), flush=True)
