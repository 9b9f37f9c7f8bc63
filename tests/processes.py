"""The run's event loop, and the child processes a test leaves (for conftest and tests)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import psutil

#: The event loop the parent (and, by default, the workers) run in this test run:
#: ``LOOPPOOL_TEST_LOOP=uvloop`` runs the whole suite on uvloop.
LOOP_KIND = os.environ.get("LOOPPOOL_TEST_LOOP", "asyncio")

_HELPERS = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """A factory of the run's event loop (LOOP_KIND)."""
    if LOOP_KIND == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop


def descendants() -> dict[int, psutil.Process]:
    """This process's descendants, multiprocessing's session-long helpers excepted."""
    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
            parent = proc.ppid()
        except psutil.Error:
            continue
        # multiprocessing's fork server and resource tracker live for the
        # whole session by design; they are not pool workers. Only our direct
        # children can be those: a worker forked by the fork server shows the
        # server's command line (until setproctitle renames it) yet counts.
        if any(helper in cmdline for helper in _HELPERS) and parent == os.getpid():
            continue
        found[proc.pid] = proc
    return found
