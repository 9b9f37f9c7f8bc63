"""Paired CPU per message on the README path: two looppool trees, alternately, medians.

The numbers of docs/performance.md's "What was optimised" come from this
script. Each tree is a Python interpreter (a virtualenv with that tree
installed, ``pip install -e '<tree>[bench]'``); the rounds run one tree, then
the other, so that load from the rest of the machine falls on both alike.

One measurement (``--one``) is the README's pattern on ``Pool(W, size=2)``:

* ``stream``: one task awaits ``pool.put(x)`` for N ints while another runs
  ``async for r in pool.results()``; the handler calls ``self.put_result``;
* ``submit``: ``await pool.submit(x)`` N times in a row.

2,000 messages (200 round trips) of warm-up are not counted. The parent's
CPU comes from ``time.process_time()``, the workers' from psutil.

    python benchmarks/paired.py --python base=/tmp/venv-base/bin/python \\
        --python new=.venv/bin/python --rounds 7 --modes stream,submit
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from typing import Any

KEYS = ("rate", "parent_us", "workers_us")


async def _measure(n: int, mode: str) -> dict[str, Any]:
    import psutil

    import looppool
    from looppool._bench import _handlers

    stream_cls, reply_cls = _handlers.README_WORKERS["tiny"]
    async with looppool.Pool(reply_cls if mode == "submit" else stream_cls, size=2) as pool:
        workers = [psutil.Process(pid) for pid in pool.pids]

        def workers_cpu() -> float:
            return sum(sum(w.cpu_times()[:2]) for w in workers)

        if mode == "submit":
            for i in range(200):
                await pool.submit(i)
            cpu, kids, began = time.process_time(), workers_cpu(), time.perf_counter()
            for i in range(n):
                await pool.submit(i)
        else:
            loop = asyncio.get_running_loop()
            warm, done = loop.create_future(), loop.create_future()

            async def read() -> None:
                got = 0
                async for _ in pool.results():
                    got += 1
                    if got == 2000:
                        warm.set_result(None)
                    elif got == 2000 + n:
                        done.set_result(None)

            reader = asyncio.create_task(read())
            for i in range(2000):
                await pool.put(i)
            await warm
            cpu, kids, began = time.process_time(), workers_cpu(), time.perf_counter()
            for i in range(n):
                await pool.put(i)
            await done
        wall = time.perf_counter() - began
        cpu, kids = time.process_time() - cpu, workers_cpu() - kids
    if mode != "submit":
        await reader
    return {
        "mode": mode,
        "rate": n / wall,
        "parent_us": cpu / n * 1e6,
        "workers_us": kids / n * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", action="append", default=[], metavar="NAME=INTERPRETER")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--modes", default="stream,submit")
    parser.add_argument("-n", type=int, default=100_000, help="messages per stream measurement")
    parser.add_argument("--submits", type=int, default=3_000, help="round trips per submit one")
    parser.add_argument("--one", metavar="MODE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(asyncio.run(_measure(args.n, args.one))))
        return
    if len(args.python) != 2:
        parser.error("give two trees: --python base=... --python new=...")
    trees = dict(spec.split("=", 1) for spec in args.python)
    modes = args.modes.split(",")
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for _ in range(args.rounds):
        for mode in modes:
            n = args.n if mode == "stream" else args.submits
            for name, python in trees.items():
                done = subprocess.run(
                    [python, __file__, "--one", mode, "-n", str(n)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                runs.setdefault((mode, name), []).append(json.loads(done.stdout.splitlines()[-1]))
    (a, b) = trees
    print(f"{args.rounds} rounds, medians; ratio: {b} ÷ {a}")
    for mode in modes:
        for key in KEYS:
            first = statistics.median(r[key] for r in runs[mode, a])
            second = statistics.median(r[key] for r in runs[mode, b])
            ratio = f"{second / first:5.2f}" if first else "    -"  # (psutil counts 10 ms ticks)
            print(f"{mode:7} {key:11} {a} {first:11.2f}  {b} {second:11.2f}  {ratio}")


if __name__ == "__main__":
    sys.exit(main())
