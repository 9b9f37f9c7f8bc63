"""``looppool bench``: the standard workloads, side by side with the peers.

This package is also imported by child processes, which unpickle the
workload handlers of :mod:`looppool._bench._handlers` by reference; so its
``__init__`` imports nothing heavy, and :func:`main` loads the harness only
when called.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (``looppool bench [options]``); return the exit status.

    ``looppool bench --help`` lists the options. The exit status is 0 when
    every measurement ran (targets met or not), 1 when one failed or a child
    process was left behind, 2 for a usage error.
    """
    from ._main import main as run

    return run(argv)
