"""The Ray rows of ``looppool bench``: RayPool, and a bare Ray actor call (its floor).

* ``looppool-ray`` — :class:`looppool.ray.RayPool` with ``size`` actors, driven
  exactly as the ``looppool-*`` systems (``put`` + ``on_result`` for streams,
  ``submit`` for round trips), with the same worker classes.
* ``ray-call`` — one bare async Ray actor whose method returns ``x * 2``,
  called and awaited once per round trip: Ray's own latency, the floor under
  RayPool's W4. Round trips only.

Both run in a phase of their own, after the other systems, inside one
:class:`RaySession`: Ray's daemons (a local instance is about ten processes)
then exist only while the Ray rows are measured, so their background CPU
neither slows the other systems nor counts in their CPU per message.

This module imports nothing heavy at import time: Ray's actors import it to
build :class:`RayCallFloor`, and ``ray`` is imported when a session opens.
It registers its two systems in :mod:`._registry` (``on_ray``: measured in
the Ray phase).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import Any, Final

from ._registry import Skip, System, best_loop, register
from ._systems import LooppoolSystem

__all__ = ["RayCallFloor", "RayCallSystem", "RayPoolSystem", "RaySession"]

#: Object store of a Ray instance started here: the workloads move small values.
OBJECT_STORE_BYTES: Final = 100 * 1024 * 1024
#: Seconds Ray's processes get to end after ``ray.shutdown()`` before they are killed.
EXIT_DEADLINE: Final = 10.0


class RaySession:
    """Ray for the Ray phase of one run.

    ``address=None`` starts a local instance (``num_cpus=size``, no
    dashboard, bound to 127.0.0.1) and :meth:`close` shuts it down and waits
    for its processes to end; any other address is passed to ``ray.init``.
    A process already connected to Ray keeps its connection, and
    :meth:`close` leaves it alone.
    """

    def __init__(self, size: int, address: str | None) -> None:
        self.size = size
        self.address = address
        self.started = False
        #: Where the Ray rows ran, for the table's footnote.
        self.where = ""
        self._before: set[int] = set()

    def open(self) -> str | None:
        """Connect to Ray; return why the Ray rows cannot run (Ray is not installed), or None.

        Any other failure (Ray installed, but it cannot start or connect) raises.
        """
        # With this setting a local instance binds to 127.0.0.1 only; Ray
        # reads it when it is imported, so it must be set before.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        try:
            ray = importlib.import_module("ray")
            importlib.import_module("looppool.ray")
        except ImportError as exc:
            return f"Ray is not installed (pip install 'looppool[ray]'): {exc}"
        if ray.is_initialized():
            self.where = "the Ray instance this process was already connected to"
            return None
        if self.address is not None:
            ray.init(address=self.address)
            self.where = f"the Ray cluster at {self.address} (CPU: this process's only)"
            return None
        self._before = _descendants()
        ray.init(
            address="local",  # a new instance, even if `ray start` ran on this machine
            num_cpus=self.size,
            include_dashboard=False,
            object_store_memory=OBJECT_STORE_BYTES,
            _node_ip_address="127.0.0.1",
        )
        self.started = True
        self.where = (
            f"a local Ray instance started for them ({self.size} CPUs; its daemons' CPU "
            "counts in theirs)"
        )
        return None

    def close(self) -> None:
        """Shut down the instance started by :meth:`open`, and wait for its processes to end."""
        if not self.started:
            return
        self.started = False
        ray = importlib.import_module("ray")
        ray.shutdown()
        psutil = importlib.import_module("psutil")
        left = []
        for pid in _descendants() - self._before:
            with contextlib.suppress(psutil.Error):
                left.append(psutil.Process(pid))
        # Blocks on the processes' exits (no polling loop of ours): the
        # harness then finds no child left behind.
        _, alive = psutil.wait_procs(left, timeout=EXIT_DEADLINE)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=EXIT_DEADLINE)


def _descendants() -> set[int]:
    psutil = importlib.import_module("psutil")
    return {p.pid for p in psutil.Process().children(recursive=True)}


class RayPoolSystem(LooppoolSystem):
    """looppool's RayPool: the same driving and worker classes as the ``looppool-*`` rows."""

    def __init__(self, name: str, size: int, start_method: str | None) -> None:
        # Ray chooses the actors' loop (uvloop when importable); this only names it.
        super().__init__(name, size, start_method, loop=best_loop())

    def check(self, handler: str, count: int, reply: bool) -> None:
        try:
            importlib.import_module("looppool.ray")
        except ImportError as exc:
            raise Skip(f"Ray is not installed (pip install 'looppool[ray]'): {exc}") from exc

    def _new_pool(self, worker: Any) -> Any:
        ray_pool = importlib.import_module("looppool.ray").RayPool
        return ray_pool(
            worker,
            self.size,
            concurrency=self.concurrency,
            max_pending=self.max_pending,
            on_result=self.counter,
            name=f"bench-{self.name}",
        )


class RayCallFloor:
    """A bare async Ray actor: Ray's own round trip, without RayPool."""

    async def call(self, x: int) -> int:
        """Return ``x * 2``."""
        return x * 2


class RayCallSystem(System):
    """``ray-call``: one bare async actor, one awaited ``actor.call.remote(x)`` per round trip."""

    def __init__(self, name: str, size: int, start_method: str | None) -> None:
        super().__init__(name, size, start_method)
        self._actor: Any = None

    def check(self, handler: str, count: int, reply: bool) -> None:
        if not reply or handler != "tiny":
            raise Skip("a bare actor call: round trips of x * 2 (W4) only")
        try:
            importlib.import_module("ray")
        except ImportError as exc:
            raise Skip(f"Ray is not installed (pip install 'looppool[ray]'): {exc}") from exc

    async def start(self, handler: str, reply: bool) -> None:
        ray = importlib.import_module("ray")
        # No CPU asked: the floor measures a call, and must not wait for room.
        self._actor = ray.remote(RayCallFloor).options(num_cpus=0).remote()
        await self._actor.call.remote(0)  # the actor is up: its start is timed apart

    async def stream(self, messages: list[Any]) -> None:
        raise Skip("a bare actor call: round trips only")

    async def call(self, message: Any) -> Any:
        return await self._actor.call.remote(message)

    async def stop(self) -> None:
        if self._actor is not None:
            actor, self._actor = self._actor, None
            ray = importlib.import_module("ray")
            with contextlib.suppress(Exception):  # already dead, or Ray is shutting down
                ray.kill(actor, no_restart=True)


register(
    "looppool-ray",
    "looppool.ray.RayPool: the tuned workers as Ray async actors, one per worker (on Ray's "
    "loop: uvloop when installed), on_result",
    RayPoolSystem,
    family="looppool",
    kind="def",
    workloads=frozenset({"W1", "W2", "W3", "W4"}),
    on_ray=True,
)
register(
    "ray-call",
    "one bare async Ray actor, an awaited call per round trip: Ray's own latency, the floor "
    "under looppool-ray (W4 only; a reference, not a peer)",
    RayCallSystem,
    family="reference",
    kind="async def",
    workloads=frozenset({"W4"}),
    on_ray=True,
)
