#!/usr/bin/env python3
"""A crawler whose trace follows each page into the worker process that fetched it.

The parent crawls a small local site (127.0.0.1) with a pool of processes.
It puts each URL inside its ``crawl`` span; looppool carries that span's
context with the message (W3C trace context), and each worker runs
``process_message`` in a span of its own — a child of ``crawl`` though it
is in another process — under which the worker's ``GET`` and ``parse``
spans nest. At the end the example prints the whole trace as a tree.

Every process exports its spans with an ordinary OpenTelemetry SDK set-up:
a ``BatchSpanProcessor`` and an exporter writing JSON lines, one file per
process (``spans-PID.jsonl``), so that the parent can read what the workers
exported (an in-memory exporter would keep each process's spans to
itself). In production the exporter is OTLP to a collector instead; see
docs/monitoring.md for what fork and spawn mean for it.

    python examples/traced_crawler.py                       # the platform's start method
    python examples/traced_crawler.py --start-method spawn --spans /tmp/spans

Needs aiohttp and the OpenTelemetry SDK (``pip install 'looppool[demo,otel]' opentelemetry-sdk``).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

import looppool

#: The local site: each page's links.
SITE = {
    "/": ["/docs/", "/blog/"],
    "/docs/": ["/docs/api/", "/docs/guide/", "/"],
    "/docs/api/": ["/docs/"],
    "/docs/guide/": ["/docs/", "/blog/"],
    "/blog/": ["/blog/1/", "/blog/2/", "/"],
    "/blog/1/": ["/blog/"],
    "/blog/2/": ["/blog/", "/docs/api/"],
}
LINK = re.compile(r'href="([^"]+)"')

tracer = trace.get_tracer("traced-crawler")


# -- tracing: the same set-up in every process -----------------------------------------


class JsonLinesExporter(SpanExporter):
    """Appends each span as a JSON line to ``DIRECTORY/spans-PID.jsonl``.

    The file is named after the process that exports, at export time: a
    forked worker inherits this exporter and writes a file of its own.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        path = Path(self.directory, f"spans-{os.getpid()}.jsonl")
        with path.open("a") as out:
            for span in spans:
                out.write(json.dumps(span_record(span)) + "\n")
        return SpanExportResult.SUCCESS


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """What the exporter writes of a span."""
    assert span.context is not None
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{span.context.trace_id:032x}",
        "span_id": f"{span.context.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "start": span.start_time,
        "end": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "pid": os.getpid(),
    }


def setup_tracing(directory: str) -> None:
    """Export this process's spans: called by the parent, and by each worker's ``initialise()``.

    A forked worker inherits the parent's provider, whose exporter writes
    per process: it keeps it (``set_tracer_provider`` could not replace it
    anyway). A spawned worker starts without one and sets its own.
    """
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return
    provider = TracerProvider(resource=Resource.create({"service.name": "traced-crawler"}))
    provider.add_span_processor(BatchSpanProcessor(JsonLinesExporter(directory)))
    trace.set_tracer_provider(provider)


# -- the crawler -----------------------------------------------------------------------


class Crawler(looppool.Worker):
    """Fetches a page and puts ``(url, the links it has)``, in spans of its own."""

    def __init__(self, spans: str) -> None:
        self.spans = spans

    async def initialise(self) -> None:
        """Set up tracing in this process, and one HTTP session."""
        setup_tracing(self.spans)
        self.session = aiohttp.ClientSession()

    async def process_message(self, url: str) -> None:
        """Runs inside looppool's span, a child of the parent's ``crawl``."""
        with tracer.start_as_current_span(
            f"GET {urlsplit(url).path}",
            kind=trace.SpanKind.CLIENT,
            attributes={"http.request.method": "GET", "url.full": url},
        ) as span:
            async with self.session.get(url) as response:
                body = await response.text()
            span.set_attribute("http.response.status_code", response.status)
        with tracer.start_as_current_span("parse"):
            links = sorted({urljoin(url, href) for href in LINK.findall(body)})
        self.put_result((url, links))

    async def finalise(self) -> None:
        """Close the HTTP session."""
        await self.session.close()


async def start_site() -> tuple[web.AppRunner, str]:
    """Serve SITE on 127.0.0.1 (a free port); return it and its base URL."""

    async def page(request: web.Request) -> web.Response:
        links = SITE.get(request.path)
        if links is None:
            raise web.HTTPNotFound()
        html = "".join(f'<a href="{link}">{link}</a>\n' for link in links)
        return web.Response(text=html, content_type="text/html")

    app = web.Application()
    app.router.add_get("/{path:.*}", page)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


StartMethod = Literal["fork", "spawn", "forkserver"]


async def crawl(spans: str, size: int, start_method: StartMethod | None) -> int:
    """Crawl the local site from its root; return the number of pages fetched."""
    setup_tracing(spans)
    site, base = await start_site()
    try:
        worker = functools.partial(Crawler, spans)
        async with looppool.Pool(worker, size=size, start_method=start_method) as pool:
            results = pool.results()
            with tracer.start_as_current_span("crawl", attributes={"crawl.start": base + "/"}):
                # Each put() carries the current span, "crawl", to the worker.
                seen = {base + "/"}
                await pool.put(base + "/")
                outstanding = 1
                while outstanding:
                    _, links = await anext(results)
                    outstanding -= 1
                    for link in links:
                        if link not in seen:
                            seen.add(link)
                            await pool.put(link)
                            outstanding += 1
        # The workers flushed their spans as they stopped; now this process's.
        provider = trace.get_tracer_provider()
        assert isinstance(provider, TracerProvider)
        provider.force_flush()
        return len(seen)
    finally:
        await site.cleanup()


# -- printing the trace ----------------------------------------------------------------


def read_spans(directory: str) -> list[dict[str, Any]]:
    """Every span every process exported to ``directory``."""
    return [
        json.loads(line)
        for path in sorted(Path(directory).glob("spans-*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def print_trace(spans: list[dict[str, Any]]) -> None:
    """Print the spans as trees, with each span's process and duration."""
    me = os.getpid()
    children: dict[str | None, list[dict[str, Any]]] = {}
    for span in spans:
        children.setdefault(span["parent_id"], []).append(span)

    def where(span: dict[str, Any]) -> str:
        attributes = span["attributes"]
        if span["pid"] == me:
            return "parent"
        if "looppool.worker" in attributes:
            return (
                f"worker {attributes['looppool.worker']}, pid {span['pid']}, message "
                f"{attributes['messaging.message.id']}, delivery "
                f"{attributes['looppool.delivery_count']}"
            )
        return f"pid {span['pid']}"

    def show(span: dict[str, Any], prefix: str, last: bool, root: bool) -> None:
        ms = (span["end"] - span["start"]) / 1e6
        branch = "" if root else ("└─ " if last else "├─ ")
        print(f"{prefix}{branch}{span['name']}  [{span['kind']}, {where(span)}]  {ms:.1f} ms")
        kids = sorted(children.get(span["span_id"], []), key=lambda s: s["start"])
        for i, kid in enumerate(kids):
            more = "" if root else ("   " if last else "│  ")
            show(kid, prefix + more, i == len(kids) - 1, False)

    for root in sorted(children.get(None, []), key=lambda s: s["start"]):
        processes = len({s["pid"] for s in spans if s["trace_id"] == root["trace_id"]})
        count = sum(1 for s in spans if s["trace_id"] == root["trace_id"])
        print(f"trace {root['trace_id']}: {count} spans from {processes} processes")
        show(root, "", True, True)


def main(argv: Sequence[str] | None = None) -> None:
    """Crawl, then print the trace."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--start-method", choices=["fork", "spawn", "forkserver"], default=None)
    parser.add_argument("--spans", help="directory for the span files (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="looppool-spans-") as scratch:
        spans = args.spans or scratch
        start_method = cast(StartMethod | None, args.start_method)
        pages = asyncio.run(crawl(spans, args.size, start_method))
        print(f"crawled {pages} pages with {args.size} worker processes")
        print_trace(read_spans(spans))


if __name__ == "__main__":
    main()
