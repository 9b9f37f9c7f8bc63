"""What the command-line tools share: the usage-error type, a progress bar, the loop.

``looppool run`` (``_cli``) and ``looppool demo`` (``_demo``) both draw a
progress bar on stderr and run the parent on the event loop the user chose.
Both live here, so that the demo does not import the command line, which
imports the demo only to dispatch to it (as it does the benchmarks): no
import cycle.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable
from typing import Final, TextIO

__all__ = ["REDRAW_INTERVAL", "CliError", "ProgressBar", "loop_factory"]

#: Seconds between two redraws of the progress bar.
REDRAW_INTERVAL: Final = 0.1


class CliError(Exception):
    """A mistake in what the command was asked to do: one line, exit status 2."""


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressBar:
    """A one-line progress display, drawn only when ``stream`` is a terminal.

    ``update(done)`` redraws at most every 0.1 s; the line shows the count,
    the mean rate and, when ``total`` is known, a bar, the percentage and the
    ETA. ``close()`` draws the final state and ends the line. Not a terminal
    (a pipe, a file, a test's capture): every call does nothing.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        total: int | None = None,
        unit: str = "messages",
        enabled: bool | None = None,
    ) -> None:
        self.stream = stream
        self.total = total
        self.unit = unit
        if enabled is None:
            try:
                enabled = stream.isatty()
            except (AttributeError, ValueError):
                enabled = False
        self.enabled = enabled
        self.done = 0
        self._started = time.monotonic()
        self._drawn_at = -math.inf
        self._closed = False

    def update(self, done: int) -> None:
        """Record that ``done`` units are finished; redraw if it is time to."""
        self.done = done
        if not self.enabled or self._closed:
            return
        now = time.monotonic()
        if now - self._drawn_at >= REDRAW_INTERVAL:
            self._drawn_at = now
            self._draw(now)

    def close(self) -> None:
        """Draw the final state and end the line (once)."""
        if self.enabled and not self._closed:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
        self._closed = True

    def render(self, now: float) -> str:
        """The text of the line at time ``now`` (a ``time.monotonic()`` value)."""
        elapsed = max(now - self._started, 1e-9)
        rate = self.done / elapsed
        if self.total is None or self.total <= 0:
            return f"{self.done:,} {self.unit}  {rate:,.0f} {self.unit}/s  {_clock(elapsed)}"
        fraction = min(self.done / self.total, 1.0)
        eta = (self.total - self.done) / rate if rate > 0 else math.inf
        eta_text = _clock(eta) if math.isfinite(eta) else "?"
        width = 20
        filled = int(fraction * width)
        bar = "#" * filled + "." * (width - filled)
        return (
            f"{self.done:,}/{self.total:,} [{bar}] {fraction:4.0%}  "
            f"{rate:,.0f} {self.unit}/s  ETA {eta_text}"
        )

    def _draw(self, now: float) -> None:
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
        if columns < 20:  # unknown (0) or absurdly narrow: assume the classic width
            columns = 80
        line = self.render(now)[: max(columns - 1, 10)]
        self.stream.write("\r" + line + "\x1b[K")
        self.stream.flush()


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The parent's loop: the same kind as the workers' (uvloop when asked or "auto")."""
    if kind == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if kind == "uvloop":
            raise CliError("--loop uvloop was asked, but uvloop is not installed") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
