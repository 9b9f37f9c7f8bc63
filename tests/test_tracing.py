"""OpenTelemetry: a span current in the caller of put/submit/broadcast is the parent of the
worker's process_message span, in another process, under fork and spawn.

The test process has a tracer provider with an in-memory exporter (its own
spans); the workers export theirs to files (see ``tracing_workers``). Needs the
``otel`` extra's API and the SDK (both in the ``test`` extra).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "opentelemetry.sdk", reason="the OpenTelemetry SDK is not installed (extra otel)"
)

from opentelemetry import baggage, context, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

import looppool
import tracing_workers as tw
from looppool.testing import InlinePool

SRC = Path(looppool.__file__).resolve().parent.parent
PROCESS_SPAN = "Traced process_message"

_exporter = InMemorySpanExporter()


@pytest.fixture(scope="module")
def tracer() -> trace.Tracer:
    """The test process's tracer: the global provider, exporting to memory.

    The global provider can be set once per process: later modules (or a
    second run of this fixture) add to the one that is there.
    """
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(_exporter))
    return trace.get_tracer("tests")


@pytest.fixture
def parent_spans(tracer: trace.Tracer) -> Iterator[InMemorySpanExporter]:
    """The spans ended in this process during the test."""
    _exporter.clear()
    yield _exporter
    _exporter.clear()


def hex_id(value: int, width: int) -> str:
    """An id as the SDK's JSON writes it."""
    return f"0x{value:0{width}x}"


def ids(span: trace.Span | ReadableSpan) -> tuple[str, str]:
    """``(trace id, span id)`` of a span, as the SDK's JSON writes them."""
    ctx = span.get_span_context()
    assert ctx is not None
    return hex_id(ctx.trace_id, 32), hex_id(ctx.span_id, 16)


def process_spans(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """looppool's spans among ``spans``, by message id."""
    found = [s for s in spans if s["attributes"].get("messaging.system") == "looppool"]
    return sorted(found, key=lambda s: int(s["attributes"]["messaging.message.id"]))


def children_of(spans: list[dict[str, Any]], parent: dict[str, Any]) -> list[dict[str, Any]]:
    """The spans whose parent is ``parent``."""
    return [s for s in spans if s["parent_id"] == parent["context"]["span_id"]]


@pytest.mark.parametrize("worker_class", [tw.Traced, tw.PlainTraced])
async def test_the_worker_span_is_a_child_of_the_callers_span(
    tracer: trace.Tracer,
    parent_spans: InMemorySpanExporter,
    tmp_path: Path,
    start_method: str,
    loop_kind: str,
    worker_class: type[looppool.Worker],
) -> None:
    """put, put_nowait, submit and broadcast carry the caller's span to the worker's span."""
    pool = looppool.Pool(
        functools.partial(worker_class, str(tmp_path)),
        size=2,
        start_method=start_method,
        loop=loop_kind,
        name="crawl",
    )
    async with pool:
        with tracer.start_as_current_span("caller") as caller:
            await pool.put("a")
            pool.put_nowait("b")
            pid = await pool.submit("c", worker=1)
            await pool.broadcast("d")
            await pool.drain()
    trace_id, caller_id = ids(caller)
    spans = tw.read_spans(tmp_path)
    consumers = process_spans(spans)
    assert len(consumers) == 5  # a, b, c, and d on each of the 2 workers
    for span in consumers:
        assert span["name"] == f"{worker_class.__qualname__} process_message"
        assert span["kind"] == "SpanKind.CONSUMER"
        assert span["context"]["trace_id"] == trace_id
        assert span["parent_id"] == caller_id
        assert span["pid"] != os.getpid()
        assert span["status"]["status_code"] == "UNSET"
        attributes = span["attributes"]
        assert attributes["messaging.system"] == "looppool"
        assert attributes["messaging.operation.type"] == "process"
        assert attributes["messaging.destination.name"] == "crawl"
        assert attributes["looppool.delivery_count"] == 1
        assert attributes["looppool.outcome"] == "processed"
        # The handler's own span nests under looppool's, in the same process.
        [inner] = children_of(spans, span)
        assert inner["name"] == "inner"
        assert inner["pid"] == span["pid"]
    # One span per message: ids 0 to 4, and the worker each ran on.
    assert [int(s["attributes"]["messaging.message.id"]) for s in consumers] == [0, 1, 2, 3, 4]
    workers = [s["attributes"]["looppool.worker"] for s in consumers]
    assert workers[2] == 1  # submit(worker=1)
    assert sorted(workers[3:]) == [0, 1]  # the broadcast reached both
    by_worker = {s["attributes"]["looppool.worker"]: s["pid"] for s in consumers}
    assert by_worker[1] == pid
    assert by_worker[0] != pid
    # The caller's span ended in this process, after the workers' (it spans the drain).
    assert [s.name for s in parent_spans.get_finished_spans()] == ["caller"]


async def test_a_message_put_without_a_current_span_is_not_traced(
    tracer: trace.Tracer, tmp_path: Path, start_method: str, loop_kind: str
) -> None:
    """No span current in the caller: no context travels, and the worker makes no span."""
    async with looppool.Pool(
        functools.partial(tw.Traced, str(tmp_path)),
        size=2,
        start_method=start_method,
        loop=loop_kind,
    ) as pool:
        with tracer.start_as_current_span("before"):
            pass  # a span that ended: none is current below
        await pool.submit("a")
        await pool.put("b")
    spans = tw.read_spans(tmp_path)
    assert process_spans(spans) == []
    # The handlers' own spans are roots: no context reached them.
    assert [s["name"] for s in spans] == ["inner", "inner"]
    assert all(s["parent_id"] is None for s in spans)


@pytest.mark.parametrize("worker_class", [tw.Traced, tw.PlainTraced])
async def test_a_failure_is_recorded_on_the_span(
    tracer: trace.Tracer,
    tmp_path: Path,
    start_method: str,
    loop_kind: str,
    worker_class: type[looppool.SafeWorker],
) -> None:
    """process_message raised: the span's status is ERROR, with the exception and its type."""
    async with looppool.Pool(
        functools.partial(worker_class, str(tmp_path)),
        size=1,
        start_method=start_method,
        loop=loop_kind,
    ) as pool:
        with tracer.start_as_current_span("caller"):
            with pytest.raises(ValueError, match="told to fail"):
                await pool.submit("fail")
            await pool.put("fail")  # failures of put messages are logged: caplog keeps them
    for span in process_spans(tw.read_spans(tmp_path)):
        assert span["status"] == {"status_code": "ERROR", "description": "ValueError: told to fail"}
        assert span["attributes"]["error.type"] == "builtins.ValueError"
        assert span["attributes"]["looppool.outcome"] == "failed"
        [event] = span["events"]
        assert event["name"] == "exception"
        assert event["attributes"]["exception.message"] == "told to fail"


async def test_a_message_past_its_deadline_ends_its_span_as_timed_out(
    tracer: trace.Tracer, tmp_path: Path, start_method: str
) -> None:
    """A deadline cancels the handler: the span says timed_out, with MessageTimeout."""
    async with looppool.Pool(
        functools.partial(tw.Traced, str(tmp_path)), size=1, start_method=start_method
    ) as pool:
        with tracer.start_as_current_span("caller"), pytest.raises(looppool.MessageTimeout):
            await pool.submit("forever", timeout=0.05)
    [span] = process_spans(tw.read_spans(tmp_path))
    assert span["attributes"]["looppool.outcome"] == "timed_out"
    assert span["status"]["status_code"] == "ERROR"
    assert span["attributes"]["error.type"].endswith(".MessageTimeout")


async def test_a_redelivered_message_shows_its_delivery_count(
    tracer: trace.Tracer, tmp_path: Path, start_method: str, loop_kind: str
) -> None:
    """A SafeWorker killed holding a traced message: the next delivery's span says 2."""
    async with looppool.Pool(
        functools.partial(tw.Traced, str(tmp_path)),
        size=1,
        start_method=start_method,
        loop=loop_kind,
    ) as pool:
        results = pool.results()
        with tracer.start_as_current_span("caller") as caller:
            # The task copies the context now: submit() runs with "caller" current.
            reply = asyncio.create_task(pool.submit("hold-once"))
        holding, pid = await anext(results)
        assert holding == "holding"
        os.kill(pid, signal.SIGKILL)
        new_pid = await reply
        assert new_pid != pid
        assert pool.stats().redelivered == 1
    # The first delivery's span died unfinished with its process; the second's is there.
    [span] = process_spans(tw.read_spans(tmp_path))
    assert span["pid"] == new_pid
    assert span["attributes"]["looppool.delivery_count"] == 2
    assert span["parent_id"] == ids(caller)[1]


async def test_baggage_travels_with_the_trace_context(
    tracer: trace.Tracer, start_method: str, loop_kind: str
) -> None:
    """The global propagator carries the caller's W3C baggage too."""
    async with looppool.Pool(tw.Traced, size=1, start_method=start_method, loop=loop_kind) as pool:
        token = context.attach(baggage.set_baggage("tenant", "acme"))
        try:
            with tracer.start_as_current_span("caller"):
                assert await pool.submit("baggage") == "acme"
        finally:
            context.detach(token)


async def test_barrier_mode_carries_the_trace_context(
    tracer: trace.Tracer, tmp_path: Path, loop_kind: str
) -> None:
    """Messages that go through barrier mode's shared queue carry it as well."""
    async with looppool.Pool(
        functools.partial(tw.Traced, str(tmp_path)),
        size=2,
        start_method="fork",
        loop=loop_kind,
        distribution="barrier",
    ) as pool:
        with tracer.start_as_current_span("caller") as caller:
            for message in range(4):
                await pool.put(message)
            await pool.drain()
    spans = process_spans(tw.read_spans(tmp_path))
    assert len(spans) == 4
    assert {s["parent_id"] for s in spans} == {ids(caller)[1]}


async def test_a_worker_without_opentelemetry_runs_traced_messages_untraced(
    tracer: trace.Tracer, loop_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that cannot import OpenTelemetry runs traced messages untraced; one warning."""
    caplog.set_level(logging.WARNING, logger="looppool")
    async with looppool.Pool(
        tw.WithoutOpenTelemetry, size=1, start_method="spawn", loop=loop_kind
    ) as pool:
        with tracer.start_as_current_span("caller"):
            assert await pool.submit(1) == ("untraced", 1)
            assert await pool.submit(2) == ("untraced", 2)
    warnings = [r for r in caplog.records if "OpenTelemetry API is not importable" in r.message]
    assert len(warnings) == 1
    assert warnings[0].name == "looppool.tracing"


async def test_inline_pool_traces_in_this_process(
    tracer: trace.Tracer, parent_spans: InMemorySpanExporter
) -> None:
    """InlinePool runs the same runner: its spans are children of the caller's, in memory here."""
    async with InlinePool(tw.Traced, size=2, name="inline") as pool:
        with tracer.start_as_current_span("caller") as caller:
            await pool.submit("a")
            with pytest.raises(ValueError, match="told to fail"):
                await pool.submit("fail")
    finished = {s.name: s for s in parent_spans.get_finished_spans()}
    spans = [s for s in parent_spans.get_finished_spans() if s.name == PROCESS_SPAN]
    assert len(spans) == 2
    for span in spans:
        assert span.kind is trace.SpanKind.CONSUMER
        assert span.parent is not None
        assert span.parent.span_id == caller.get_span_context().span_id
        assert span.attributes is not None
        assert span.attributes["messaging.destination.name"] == "inline"
    assert [span.attributes["looppool.outcome"] for span in spans if span.attributes] == [
        "processed",
        "failed",
    ]
    inner = finished["inner"]
    assert inner.parent is not None
    assert inner.parent.span_id == spans[0].get_span_context().span_id


def test_import_looppool_does_not_import_opentelemetry() -> None:
    """Without OpenTelemetry in use, looppool neither imports it nor needs it installed."""
    script = textwrap.dedent(
        """
        import asyncio, sys

        class Hide:
            def find_spec(self, name, path, target=None):
                if name.partition(".")[0] == "opentelemetry":
                    raise ImportError("hidden")

        sys.meta_path.insert(0, Hide())
        import looppool
        from looppool.testing import InlinePool

        class Echo(looppool.Worker):
            def process_message(self, message):
                return message

        async def main():
            async with looppool.Pool(Echo, size=1, start_method="fork") as pool:
                assert await pool.submit(1) == 1
            async with InlinePool(Echo) as pool:
                assert await pool.submit(2) == 2

        asyncio.run(main())
        print(sorted(n for n in sys.modules if n.startswith("opentelemetry")))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
