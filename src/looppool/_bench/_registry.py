"""The systems under test: their common interface, and the registry that names them.

Every module that defines systems (:data:`MODULES`: :mod:`._systems`,
:mod:`._ray`) imports this one and registers its systems here when it is
imported; this one imports them by name the first time it is asked for a
system (as a plugin registry finds its plugins), and none of them imports
another. So there is no import cycle, and adding a system touches one
module (and :data:`MODULES`, for a new one).

Every system is driven the same way by the harness: ``start()`` (not
timed), then timed ``stream(messages)`` runs — return once a result for
every message has reached the parent — or ``call(message)`` round trips,
then ``stop()``.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import importlib
from collections.abc import Callable
from typing import Any, Final, Literal

__all__ = [
    "ALL_WORKLOADS",
    "MODULES",
    "Counter",
    "Entry",
    "Family",
    "HandlerKind",
    "Skip",
    "System",
    "best_loop",
    "entry",
    "has_module",
    "make_system",
    "names",
    "register",
]

#: Where a row stands in the tables: the pool itself, a floor, a peer, or a reference.
Family = Literal["looppool", "limit", "peer", "reference"]
#: The kind of handler a system runs for the tiny workloads (W1, W4): ``def`` or
#: ``async def``. A row is compared with the limit that runs the same kind.
HandlerKind = Literal["def", "async def"]
#: The workloads a system runs unless it says otherwise (W6 runs one named system).
ALL_WORKLOADS: Final = frozenset({"W1", "W2", "W3", "W4", "W5"})


class Skip(Exception):
    """This system cannot run this workload (or not in reasonable time); why."""


def has_module(name: str) -> bool:
    """Whether ``name`` can be imported."""
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def best_loop() -> str:
    """``"uvloop"`` when it is installed, else ``"asyncio"``."""
    return "uvloop" if has_module("uvloop") else "asyncio"


class Counter:
    """Counts stream results, checks each one, and wakes the harness at the last.

    ``expect``, when set, is told every result and returns why it is wrong
    (or ``None``): a system that answers wrongly fails its row instead of
    being timed.
    """

    def __init__(self) -> None:
        self.left = 0
        self.done: asyncio.Future[None] | None = None
        self.expect: Callable[[Any], str | None] | None = None
        #: The first wrong result's description.
        self.wrong: str | None = None

    def arm(self, count: int) -> asyncio.Future[None]:
        """Expect ``count`` results; the future resolves at the last."""
        self.left = count
        self.done = asyncio.get_running_loop().create_future()
        if count == 0:
            self.done.set_result(None)
        return self.done

    def __call__(self, value: Any) -> None:
        if self.expect is not None and self.wrong is None:
            self.wrong = self.expect(value)
        self.left -= 1
        if self.left == 0 and self.done is not None and not self.done.done():
            self.done.set_result(None)

    def check(self, system: str) -> None:
        """Raise if a result was wrong."""
        if self.wrong is not None:
            raise AssertionError(f"{system} returned a wrong result: {self.wrong}")


class System(abc.ABC):
    """One system under test, started for one workload handler."""

    def __init__(self, name: str, size: int, start_method: str | None) -> None:
        self.name = name
        self.size = size
        self.start_method = start_method
        #: Counts (and checks) the results of stream runs.
        self.counter = Counter()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} size={self.size}>"

    def check(self, handler: str, count: int, reply: bool) -> None:
        """Raise :class:`Skip` if this system should not run the workload."""
        return None

    @abc.abstractmethod
    async def start(self, handler: str, reply: bool) -> None:
        """Start the processes for ``handler``; ``reply``: for ``call()``."""

    @abc.abstractmethod
    async def stream(self, messages: list[Any]) -> None:
        """Send every message; return once all their results have arrived."""

    @abc.abstractmethod
    async def call(self, message: Any) -> Any:
        """One round trip: send, and return the reply."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop every process this system started; idempotent."""


#: Builds a system: ``factory(name, size, start_method)``.
Factory = Callable[[str, int, str | None], System]


@dataclasses.dataclass(frozen=True)
class Entry:
    """A registered system: how to build it, and how to read its rows."""

    name: str
    #: One line for the "Systems" list; ``{loop}`` is the best loop's name.
    description: str
    factory: Factory
    family: Family
    #: The handler kind it runs for W1 and W4 (see :data:`HandlerKind`).
    kind: HandlerKind
    #: The workloads it runs; it is left out of the others' tables.
    workloads: frozenset[str] = ALL_WORKLOADS
    #: Measured in the Ray phase of a run (see :mod:`._ray`).
    on_ray: bool = False


#: The modules that register systems, imported on the first look-up.
MODULES: Final = ("looppool._bench._systems", "looppool._bench._ray")

_REGISTRY: dict[str, Entry] = {}


def _registered() -> dict[str, Entry]:
    # Importing a module registers its systems; an imported one is not run again.
    for module in MODULES:
        importlib.import_module(module)
    return _REGISTRY


def register(
    name: str,
    description: str,
    factory: Factory,
    *,
    family: Family,
    kind: HandlerKind,
    workloads: frozenset[str] = ALL_WORKLOADS,
    on_ray: bool = False,
) -> None:
    """Add a system; its name must be new."""
    if name in _REGISTRY:
        raise ValueError(f"the system {name!r} is registered twice")
    unknown = workloads - ALL_WORKLOADS
    if unknown:
        raise ValueError(f"{name}: unknown workloads {sorted(unknown)}")
    _REGISTRY[name] = Entry(name, description, factory, family, kind, workloads, on_ray)


def names() -> list[str]:
    """Every registered system, in registration order."""
    return list(_registered())


def entry(name: str) -> Entry:
    """The registered system ``name``; ``ValueError`` naming the known ones if none."""
    registry = _registered()
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown system {name!r}; known: {', '.join(registry)}") from None


def make_system(name: str, size: int, start_method: str | None) -> System:
    """Build the registered system ``name`` for ``size`` workers."""
    return entry(name).factory(name, size, start_method)
