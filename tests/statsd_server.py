"""A statsd server for the tests: a UDP socket on 127.0.0.1 (never another interface)."""

from __future__ import annotations

import asyncio
import select
import socket

DEADLINE = 10.0  # seconds receive() waits for a datagram


def lines(datagram: bytes) -> list[str]:
    """The statsd lines of a datagram."""
    return datagram.decode().split("\n")


def metrics(datagram: bytes) -> dict[str, tuple[float, str]]:
    """Parse a datagram of gauges and counters (``name:value|g``, ``name:value|c``)."""
    result = {}
    for line in lines(datagram):
        name, _, rest = line.partition(":")
        value, _, kind = rest.partition("|")
        assert kind in ("g", "c"), line
        result[name] = (float(value), kind)
    return result


def gauges(datagram: bytes) -> dict[str, float]:
    """Parse a datagram of gauges and counters into a dict: each counter's value is its increase."""
    return {name: value for name, (value, _) in metrics(datagram).items()}


class StatsdServer:
    """A UDP socket on 127.0.0.1 that receives and parses statsd datagrams."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"

    def receive(self) -> bytes:
        """The next datagram; fails the test after DEADLINE."""
        readable, _, _ = select.select([self.sock], [], [], DEADLINE)
        assert readable, f"no datagram within {DEADLINE} s"
        return self.sock.recv(65535)

    async def akinds(self) -> dict[str, tuple[float, str]]:
        """The values and kinds (``"g"``, ``"c"``) of the next datagram, by name."""
        return metrics(await self.areceive())

    async def areceive(self) -> bytes:
        """The next datagram, awaited on the running loop."""
        return await asyncio.get_running_loop().sock_recv(self.sock, 65535)

    async def areport(self) -> dict[str, float]:
        """The values of the next datagram, by name (a counter's: its increase)."""
        return gauges(await self.areceive())

    def pending(self) -> bool:
        """Whether a datagram is waiting (without waiting for one)."""
        return bool(select.select([self.sock], [], [], 0)[0])

    def close(self) -> None:
        self.sock.close()
