"""Workers of the tracing tests, whose spans reach files the test reads.

A worker's spans are made in its own process, where the test's in-memory
exporter cannot see them. So each traced worker, in ``initialise()``, adds
a ``BatchSpanProcessor`` to its process's tracer provider, writing every
span as one JSON line to ``DIRECTORY/spans-PID.jsonl`` — one file per
process, so writers never interleave. Under fork the worker inherits the
test's provider and adds the processor to it; under spawn (and in a Ray
actor) it has none, and sets its own. A batch processor, not a simple one:
its spans reach the file only because looppool flushes the provider when a
worker stops (a forked worker ends with ``os._exit``, skipping the SDK's
``atexit`` flush).

Importable by spawned workers and Ray actors (the tests directory is on
their path).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry import baggage, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

import looppool


def _one_line(span: ReadableSpan) -> str:
    return str(span.to_json(indent=None)) + "\n"


def export_spans(directory: str) -> None:
    """In a worker process: send this process's spans to ``DIRECTORY/spans-PID.jsonl``."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        # Spawned (or a Ray actor): nothing inherited; this process's own provider.
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    out = open(os.path.join(directory, f"spans-{os.getpid()}.jsonl"), "a")  # noqa: SIM115 - the exporter's for the process's life
    provider.add_span_processor(
        BatchSpanProcessor(ConsoleSpanExporter(out=out, formatter=_one_line))
    )


def read_spans(directory: str | Path) -> list[dict[str, Any]]:
    """Every span the workers exported to ``directory``, each with the ``pid`` that wrote it."""
    spans = []
    for path in sorted(Path(directory).glob("spans-*.jsonl")):
        pid = int(path.stem.removeprefix("spans-"))
        for line in path.read_text().splitlines():
            spans.append({**json.loads(line), "pid": pid})
    return spans


class Traced(looppool.SafeWorker):
    """Replies with its pid after an inner span of its own; raises on "fail".

    "forever" waits until it is cancelled.
    "baggage" replies with the ``tenant`` baggage entry it sees. "hold-once"
    waits for ever the first time any worker gets it (a marker file says
    so), and runs normally the next time: the test kills the first holder.
    """

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory

    def initialise(self) -> None:
        if self.directory is not None:
            export_spans(self.directory)

    async def process_message(self, message: Any) -> Any:
        if message == "fail":
            raise ValueError("told to fail")
        if message == "baggage":
            return baggage.get_baggage("tenant")
        if message == "forever":  # waits until cancelled (a deadline)
            await asyncio.Event().wait()
        if message == "hold-once":
            assert self.directory is not None
            try:  # the first delivery creates the marker, and holds
                os.close(os.open(os.path.join(self.directory, "held"), os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                self.put_result(("holding", os.getpid()))
                await asyncio.Event().wait()
        with trace.get_tracer("tests").start_as_current_span("inner"):
            await asyncio.sleep(0)
        self.put_result((self.number, os.getpid()))
        return os.getpid()


class PlainTraced(looppool.SafeWorker):
    """A plain ``def`` handler: its span starts and ends inside one call."""

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory

    def initialise(self) -> None:
        if self.directory is not None:
            export_spans(self.directory)

    def process_message(self, message: Any) -> Any:
        if message == "fail":
            raise ValueError("told to fail")
        with trace.get_tracer("tests").start_as_current_span("inner"):
            return os.getpid()


class _NoOpenTelemetry:
    """A meta path finder that makes ``opentelemetry`` unimportable."""

    def find_spec(self, name: str, path: Sequence[str] | None, target: object = None) -> None:
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ImportError(f"{name} is hidden by the test")


class WithoutOpenTelemetry(looppool.SafeWorker):
    """A worker in whose process the OpenTelemetry API cannot be imported (as on a Ray node
    where it is not installed).

    Its process imported it (this module does): ``initialise()`` forgets it
    and hides it. Use it under spawn, where this process has no other use for it.
    """

    def initialise(self) -> None:
        for name in [n for n in sys.modules if n.partition(".")[0] == "opentelemetry"]:
            del sys.modules[name]
        sys.meta_path.insert(0, _NoOpenTelemetry())

    def process_message(self, message: Any) -> Any:
        return ("untraced", message)
