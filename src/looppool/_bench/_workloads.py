"""The standard workloads: what each message does, how many, and what is reported.

* W1 tiny (``x * 2``, no await): msgs/s and CPU per message.
* W2 io (``await asyncio.sleep(0.05)``): wall time.
* W3 mixed (2 ms of CPU, then ``await asyncio.sleep(0.02)``): wall time,
  against the CPU bound.
* W4 latency (sequential round trips of ``x * 2``): p50 and p99.
* W5 large payloads (1 MiB and 16 MiB ``bytes``, ``bytearray`` and numpy
  arrays, echoed back): MiB/s both ways, and the parent's peak RSS.
* W6 scaling: W1 and W3 on one looppool system at 1, 2, 4 and 8 workers.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from typing import Any, Final, Literal

from . import _handlers

__all__ = [
    "MIB",
    "PAYLOADS",
    "SCALING",
    "SCALING_SIZES",
    "QUICK_SCALING_SIZES",
    "WORKLOADS",
    "Kind",
    "Payload",
    "Workload",
    "w3_bound",
]

#: How a workload is timed: a stream's rate, a stream's wall time, round
#: trips, or a stream of large payloads (MiB/s).
Kind = Literal["rate", "wall", "latency", "bytes"]
MIB: Final = 1 << 20


@functools.cache
def _random(size: int) -> bytes:
    # Made once per size and run: 16 MiB of urandom takes tens of milliseconds.
    return os.urandom(size)


@dataclasses.dataclass(frozen=True)
class Payload:
    """One W5 message: its type and size, and how many are streamed."""

    type: Literal["bytes", "bytearray", "numpy"]
    size: int
    count: int
    quick_count: int

    @property
    def label(self) -> str:
        """``"bytes 1 MiB"``."""
        return f"{self.type} {self.size // MIB} MiB"

    def available(self) -> str | None:
        """Why this payload cannot be made here, or ``None``."""
        if self.type == "numpy":
            try:
                importlib.import_module("numpy")
            except ImportError:
                return "numpy is not installed (it is in the bench extra: pip install '.[bench]')"
        return None

    def make(self, size: int | None = None) -> Any:
        """The message, or one like it of ``size`` bytes.

        Random bytes, not zeros: a zero page copies as if it were cached.
        """
        data = _random(self.size if size is None else size)
        if self.type == "bytes":
            return data
        if self.type == "bytearray":
            return bytearray(data)
        numpy = importlib.import_module("numpy")
        return numpy.frombuffer(data, dtype=numpy.uint8).copy()

    def expect(self, value: Any) -> str | None:
        """Why ``value`` is not an echo of this payload (its type and size), or ``None``."""
        wanted = {"bytes": bytes, "bytearray": bytearray}.get(self.type)
        if wanted is None:
            wanted = importlib.import_module("numpy").ndarray
        if type(value) is not wanted:
            return f"a {type(value).__name__}, not a {wanted.__name__}"
        size = value.nbytes if self.type == "numpy" else len(value)
        if size != self.size:
            return f"{size} bytes, not {self.size}"
        return None


@dataclasses.dataclass(frozen=True)
class Workload:
    """One standard workload."""

    key: str
    title: str
    handler: str
    count: int
    quick_count: int
    kind: Kind
    warmup: int
    #: W5: the payloads, one timed stream each per start of a system.
    payloads: tuple[Payload, ...] = ()


#: W5's payloads: 16 MiB, then 32 MiB, each way per timed run (--quick: 4 and 16).
PAYLOADS: Final = tuple(
    Payload(kind, size, count, quick)
    for kind in ("bytes", "bytearray", "numpy")
    for size, count, quick in ((MIB, 16, 4), (16 * MIB, 2, 1))
)

WORKLOADS: Final = {
    "W1": Workload("W1", "tiny: x * 2, no await", "tiny", 20_000, 400, "rate", 2_000),
    "W2": Workload("W2", "io: await asyncio.sleep(0.05)", "io", 2_000, 100, "wall", 200),
    "W3": Workload("W3", "mixed: 2 ms CPU, then sleep 20 ms", "mixed", 400, 40, "wall", 40),
    "W4": Workload(
        "W4", "latency: sequential round trips of x * 2", "tiny", 200, 30, "latency", 20
    ),
    "W5": Workload(
        "W5",
        "large payloads: each message echoed back",
        "echo",
        0,
        0,
        "bytes",
        1,
        PAYLOADS,
    ),
}
#: W6: W1 and W3 on one looppool system at several sizes.
SCALING: Final = "W6"
SCALING_SIZES: Final = (1, 2, 4, 8)
QUICK_SCALING_SIZES: Final = (1, 2)


def w3_bound(count: int, size: int) -> float:
    """W3's lower bound in seconds: its CPU spread over the workers, or the cores if fewer."""
    return count * _handlers.MIXED_CPU / min(size, os.cpu_count() or 1)
