"""OpenTelemetry trace context across the process hop: optional, and free when unused.

::

  parent: put / put_nowait / submit / broadcast     worker: MessageRunner.start
  ─────────────────────────────────────────────     ──────────────────────────────────────────
  capture(): a span is current? ── no ──► None       trace is None ──► runs as it always did
                 │ yes                               trace = (carrier, delivery):
                 ▼                                     extract(carrier) ─► parent context
  propagate.inject(carrier) ─► Msg.trace               CONSUMER span "{Worker} process_message"
      OP_MSG (..., (carrier, Msg.delivery)) ───────►   current while process_message starts
                                                       (its task copies the context), ended
                                                       when the message is done: end()

* The OpenTelemetry API is optional (extra ``otel``). This module never
  imports it first: a span can be current only in a process that imported
  ``opentelemetry.trace``, so :func:`capture` costs one ``sys.modules``
  lookup while nothing did, and ``import looppool`` stays as fast as it was.
* The carrier is what the global propagator writes (W3C ``traceparent``,
  ``tracestate`` and ``baggage`` by default; ``OTEL_PROPAGATORS`` changes
  it) — a small ``dict`` of strings, pickled with the message.
* Worker spans are made with the *worker process's* global tracer provider
  (see docs/monitoring.md for fork, spawn and Ray), and :func:`flush` pushes
  them out when a worker stops: a forked worker ends with ``os._exit``,
  which skips the SDK's own ``atexit`` flush.
* Tracing never fails a message: an error here is logged once per process
  and the message runs untraced.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, Final

from . import _protocol as P

__all__ = ["Carrier", "Trace", "begin", "capture", "detach", "end", "failed", "flush", "wire"]

#: The carrier of one message's trace context: header names to values.
Carrier = dict[str, str]
#: What travels in OP_MSG: the carrier, and which delivery of the message this is.
Trace = tuple[Carrier, int]

#: The instrumentation scope of looppool's spans.
SCOPE: Final = "looppool"
#: ``messaging.system`` of looppool's spans (OpenTelemetry messaging conventions).
SYSTEM: Final = "looppool"
#: Longest wait for the tracer provider's flush when a worker stops.
FLUSH_TIMEOUT: Final = 5.0

logger = logging.getLogger("looppool.tracing")

_modules: Final = sys.modules  # capture() runs for every message: one lookup less
_warned: set[str] = set()  # what failed already in this process: logged once
_tracer: Any = None  # the worker side's tracer, made on first use


def _warn_once(what: str, message: str, *args: object) -> None:
    if what not in _warned:
        _warned.add(what)
        logger.warning(message, *args, exc_info=True)


# -- the parent side ------------------------------------------------------------------


def capture() -> Carrier | None:
    """The caller's trace context as a carrier, or ``None`` when no span is current.

    Called when a pool accepts a message, in the caller's task, so the
    caller's context is the current one.
    """
    trace: Any = _modules.get("opentelemetry.trace")
    if trace is None:
        return None  # nothing imported the OpenTelemetry API: no span can be current
    try:
        if not trace.get_current_span().get_span_context().is_valid:
            return None
        from opentelemetry import propagate

        carrier: Carrier = {}
        propagate.inject(carrier)
    except Exception:
        _warn_once("inject", "cannot carry the trace context with messages; they go untraced")
        return None
    return carrier or None  # a propagator that writes nothing: nothing to carry


def wire(msg: Any) -> Trace | None:
    """What OP_MSG carries for a message record: ``None``, or ``(carrier, delivery)``."""
    carrier: Carrier | None = msg.trace
    return None if carrier is None else (carrier, msg.delivery)


# -- the worker side ------------------------------------------------------------------


def _get_tracer() -> Any:
    global _tracer
    if _tracer is None:
        from importlib import metadata

        from opentelemetry import trace

        try:
            version: str | None = metadata.version("looppool")
        except metadata.PackageNotFoundError:  # run from a source tree
            version = None
        # A ProxyTracer while the process has no provider yet: it follows the
        # provider that initialise() (or a later call) sets.
        _tracer = trace.get_tracer(SCOPE, version)
    return _tracer


def begin(
    trace: Trace, *, worker: object, pool_name: str, number: int, mid: int
) -> tuple[Any, object] | None:
    """Start the CONSUMER span of one message and make it current.

    Returns ``(span, token)``: pass the token to :func:`detach` once
    ``process_message`` has started (a task made meanwhile keeps the span
    as its context), and the span to :func:`end` when the message is done.
    ``None`` when OpenTelemetry is not importable here (or fails): the
    message then runs untraced.
    """
    carrier, delivery = trace
    try:
        from opentelemetry import context, propagate
        from opentelemetry import trace as api

        parent = propagate.extract(carrier)
        span = _get_tracer().start_span(
            f"{type(worker).__qualname__} process_message",
            context=parent,
            kind=api.SpanKind.CONSUMER,
            attributes={
                # OpenTelemetry's messaging conventions, where they fit...
                "messaging.system": SYSTEM,
                "messaging.operation.type": "process",
                "messaging.operation.name": "process_message",
                "messaging.destination.name": pool_name,
                "messaging.message.id": str(mid),
                # ... and looppool's own.
                "looppool.worker": number,
                "looppool.delivery_count": delivery,
            },
        )
        token = context.attach(api.set_span_in_context(span, parent))
    except ImportError:
        _warn_once(
            "import",
            "a message carries a trace context but the OpenTelemetry API is not "
            "importable in worker %d: messages run untraced here",
            number,
        )
        return None
    except Exception:
        _warn_once("begin", "cannot start a span for a message; messages run untraced")
        return None
    return span, token


def detach(token: object) -> None:
    """Restore the context :func:`begin` replaced."""
    from opentelemetry import context

    context.detach(token)  # type: ignore[arg-type]


def failed(span: Any, exc: BaseException) -> None:
    """Record on ``span`` that ``process_message`` raised ``exc``."""
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    try:
        span.record_exception(exc)
        span.set_attribute("error.type", f"{type(exc).__module__}.{type(exc).__qualname__}")
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
    except Exception:
        _warn_once("failed", "cannot record a failure on a span")


_OUTCOMES: Final = {
    P.DONE_OK: "processed",
    P.DONE_FAILED: "failed",
    P.DONE_CANCELLED: "cancelled",
    P.DONE_TIMED_OUT: "timed_out",
}


def end(span: Any, status: int) -> None:
    """End a message's span with its outcome (an EV_DONE status)."""
    try:
        span.set_attribute("looppool.outcome", _OUTCOMES.get(status, str(status)))
        if status == P.DONE_CANCELLED:
            from opentelemetry.trace import Status, StatusCode

            span.set_status(
                Status(StatusCode.ERROR, "cancelled: the pool stopped, or its submit() was")
            )
        span.end()
    except Exception:
        _warn_once("end", "cannot end a span")


async def flush() -> None:
    """Push out the spans the process's tracer provider still buffers; never raises.

    A worker calls this when it stops, after ``finalise()``. The flush runs
    in a thread: an exporter may block on the network, and the loop (the
    parent's own, for an InlinePool) must not wait for it.
    """
    trace: Any = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return
    force_flush = getattr(trace.get_tracer_provider(), "force_flush", None)
    if not callable(force_flush):
        return  # the API's no-op provider: nothing was recorded
    try:
        # The SDK's own timeout bounds the export; ours, the thread's hand-back.
        async with asyncio.timeout(FLUSH_TIMEOUT + 1.0):
            await asyncio.to_thread(force_flush, int(FLUSH_TIMEOUT * 1000))
    except Exception:
        _warn_once("flush", "flushing the tracer provider failed; spans may be lost")
