"""The parent API and a pool's life, shared by ``Pool``, ``RayPool`` and ``InlinePool``.

::

    put / submit / broadcast ──► pickle in the caller ──► Ledger.accept ─┐
    drain() ◄── epochs, room ◄───────────────────────────── the ledger ◄─┤
    results() / on_result ◄── ResultStream ◄──┐                           │
                                              │      _pump: Ledger.take_batches
    transport (a subclass): _launch, _send ───┼──────────────────────────►┘
    _dispatch(events from a worker) ──────────┘ EV_DONE → Ledger.finish → settle the reply
    supervision: a worker ended → Ledger.worker_died → fail the lost, replace the worker

The ledger (``_ledger``) keeps the books and does no I/O; the result stream
(``_results``) hands results out; the distribution (``_distribution``) is fair
rounds or barrier mode. ``PoolCore`` carries out what the ledger decides, in
parts: ``_base`` (the state, the shared plumbing, the transport's contract),
``_lifecycle``, ``_sending``, ``_calls``, ``_receiving`` and ``_supervision``.
What differs between pools — how a worker starts, how a batch reaches it, how
its end is learnt — is the transport: the abstract methods of ``PoolBase``,
each with its contract. Everything runs on the parent's event loop, so
nothing needs a lock.
"""

from __future__ import annotations

from ._base import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_RESULTS,
    Farewell,
    Phase,
    PoolStats,
    ResultCallback,
    S,
    WorkerSlot,
    check_int,
    check_seconds,
    logger,
)
from ._calls import FunctionCalls
from ._lifecycle import LifeCycle
from ._receiving import Receiving
from ._supervision import Supervision
from ._worker import MessageT, ReplyT, ResultT

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_MAX_PENDING",
    "DEFAULT_MAX_RESULTS",
    "Farewell",
    "Phase",
    "PoolCore",
    "PoolStats",
    "ResultCallback",
    "WorkerSlot",
    "check_int",
    "check_seconds",
    "logger",
]


class PoolCore(
    LifeCycle[S, MessageT, ReplyT, ResultT],
    FunctionCalls[S, MessageT, ReplyT, ResultT],
    Receiving[S, MessageT, ReplyT, ResultT],
    Supervision[S, MessageT, ReplyT, ResultT],
):
    """The parent API and its life cycle; a transport subclass starts, feeds and watches workers."""
