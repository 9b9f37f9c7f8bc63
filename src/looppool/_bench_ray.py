"""``python -m looppool._bench_ray``: the Ray rows of ``looppool bench``, beside Pool's.

RayPool's numbers come from ``looppool bench`` itself (its ``looppool-ray``
and ``ray-call`` rows, see :mod:`looppool._bench._ray`); this module is a
shortcut for the comparison the README's Ray section shows — W1 to W4 on the
limits (``def`` and ``async def`` handlers), Pool on the README path and
tuned as RayPool is driven (asyncio and uvloop workers, ``def`` handlers,
``on_result``), RayPool and a bare Ray actor call (an ``async def`` method,
so compared with ``limit-async``)::

    python -m looppool._bench_ray [looppool bench options]

is ``looppool bench --workloads W1,W2,W3,W4 --systems limit,limit-async,looppool,
looppool-tuned-asyncio,looppool-tuned-uvloop,looppool-ray,ray-call [options]``;
options given here come last, so ``--systems``, ``--workloads`` or
``--ray-address`` override these.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Final

__all__ = ["DEFAULTS", "main"]

#: What this shortcut asks of ``looppool bench`` before the caller's own options.
DEFAULTS: Final = (
    "--workloads",
    "W1,W2,W3,W4",
    "--systems",
    ",".join(
        [
            "limit",
            "limit-async",
            "looppool",
            "looppool-tuned-asyncio",
            "looppool-tuned-uvloop",
            "looppool-ray",
            "ray-call",
        ]
    ),
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``looppool bench`` with :data:`DEFAULTS`, then ``argv``; return its exit status."""
    from ._bench import main as bench

    return bench([*DEFAULTS, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
