"""The systems under test, each behind the same small interface.

Every system is driven the same way by the harness: ``start()`` (not timed),
then timed ``stream(messages)`` runs — return once a result for every message
has reached the parent — or ``call(message)`` round trips, then ``stop()``.
Each adapter uses its system in the best configuration we know of; the
choices are stated in :data:`DESCRIPTIONS` and printed with the results.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import importlib
import math
import multiprocessing
from collections.abc import Callable
from typing import Any

from . import _handlers
from ._limit import LimitPool

__all__ = [
    "ALL_SYSTEMS",
    "DEFAULT_SYSTEMS",
    "DESCRIPTIONS",
    "Skip",
    "System",
    "make_system",
]


class Skip(Exception):
    """This system cannot run this workload (or not in reasonable time); why."""


def _has_uvloop() -> bool:
    try:
        importlib.import_module("uvloop")
    except ImportError:
        return False
    return True


def best_loop() -> str:
    """``"uvloop"`` when it is installed, else ``"asyncio"``."""
    return "uvloop" if _has_uvloop() else "asyncio"


class System(abc.ABC):
    """One system under test, started for one workload handler."""

    def __init__(self, name: str, size: int, start_method: str | None) -> None:
        self.name = name
        self.size = size
        self.start_method = start_method

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} size={self.size}>"

    def check(self, handler: str, count: int, reply: bool) -> None:
        """Raise :class:`Skip` if this system should not run the workload."""
        return None

    @abc.abstractmethod
    async def start(self, handler: str, reply: bool) -> None:
        """Start the processes for ``handler``; ``reply``: for ``call()``."""

    @abc.abstractmethod
    async def stream(self, messages: list[int]) -> None:
        """Send every message; return once all their results have arrived."""

    @abc.abstractmethod
    async def call(self, message: int) -> Any:
        """One round trip: send, and return the reply."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop every process this system started; idempotent."""


class _Counter:
    """Counts stream results and wakes the harness at the last one."""

    def __init__(self) -> None:
        self.left = 0
        self.done: asyncio.Future[None] | None = None

    def arm(self, count: int) -> asyncio.Future[None]:
        self.left = count
        self.done = asyncio.get_running_loop().create_future()
        if count == 0:
            self.done.set_result(None)
        return self.done

    def __call__(self, value: Any) -> None:
        self.left -= 1
        if self.left == 0 and self.done is not None and not self.done.done():
            self.done.set_result(None)


# ------------------------------------------------------------------ looppool


class LooppoolSystem(System):
    """looppool: ``put`` with ``on_result`` for streams, ``submit`` for calls.

    ``concurrency`` and ``max_pending`` are set high enough that neither
    limits a workload (every W2 message can be sleeping at once).
    """

    def __init__(
        self,
        name: str,
        size: int,
        start_method: str | None,
        *,
        loop: str,
        distribution: str = "rounds",
        concurrency: int = 4096,
        max_pending: int = 1 << 20,
    ) -> None:
        super().__init__(name, size, start_method)
        self.loop = loop
        self.distribution = distribution
        self.concurrency = concurrency
        self.max_pending = max_pending
        self._pool: Any = None
        self._counter = _Counter()

    def check(self, handler: str, count: int, reply: bool) -> None:
        try:
            looppool = importlib.import_module("looppool")
            looppool.Pool  # noqa: B018 - the check is the attribute lookup
        except (ImportError, AttributeError) as exc:
            raise Skip(f"looppool.Pool is not importable ({exc})") from exc
        if self.loop == "uvloop" and not _has_uvloop():
            raise Skip("uvloop is not installed")

    async def start(self, handler: str, reply: bool) -> None:
        stream_cls, reply_cls = _handlers.WORKERS[handler]
        self._pool = self._new_pool(reply_cls if reply else stream_cls)
        await self._pool.start()

    def _new_pool(self, worker: Any) -> Any:
        """The pool to measure, not started (``looppool-ray`` makes a RayPool)."""
        looppool = importlib.import_module("looppool")
        return looppool.Pool(
            worker,
            size=self.size,
            loop=self.loop,
            start_method=self.start_method,
            concurrency=self.concurrency,
            max_pending=self.max_pending,
            distribution=self.distribution,
            on_result=self._counter,
            name=f"bench-{self.name}",
        )

    async def stream(self, messages: list[int]) -> None:
        done = self._counter.arm(len(messages))
        put = self._pool.put
        for message in messages:
            await put(message)
        await done

    async def call(self, message: int) -> Any:
        return await self._pool.submit(message)

    async def stop(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.stop()


# --------------------------------------------------------------------- limit


class LimitSystem(System):
    """The raw-pipe floor (:mod:`._limit`); children always spawned."""

    def __init__(self, name: str, size: int, start_method: str | None, *, loop: str) -> None:
        super().__init__(name, size, start_method)
        self.loop = loop
        self._pool: LimitPool | None = None
        self._counter = _Counter()

    async def start(self, handler: str, reply: bool) -> None:
        plain, _ = _handlers.HANDLERS[handler]
        self._pool = LimitPool(plain, self.size, loop_kind=self.loop, on_result=self._counter)
        await self._pool.start()

    async def stream(self, messages: list[int]) -> None:
        assert self._pool is not None
        done = self._counter.arm(len(messages))
        put = self._pool.put
        for message in messages:
            put(message)
        await done

    async def call(self, message: int) -> Any:
        assert self._pool is not None
        return await self._pool.submit(message)

    async def stop(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.stop()


# ------------------------------------------------------- ProcessPoolExecutor


class PpeSystem(System):
    """``concurrent.futures.ProcessPoolExecutor`` through ``loop.run_in_executor``.

    Async handlers run on one event loop per executor process, made by the
    executor's initializer and reused by every call (cheaper than
    ``asyncio.run`` per call). Unbatched, an executor process runs one call
    at a time, so at most ``size`` messages are in flight. Batched
    (``ppe-batch``), the messages are cut into ``size`` equal chunks, one
    call each, and a chunk's messages run concurrently (``asyncio.gather``)
    on the process's loop: the best case for the executor, possible only when
    every message is known up front and costs the same. So ``ppe-batch`` is
    shown as a reference, not counted as a peer.
    """

    #: An unbatched run estimated longer than this is skipped.
    MAX_SECONDS = 30.0

    def __init__(
        self,
        name: str,
        size: int,
        start_method: str | None,
        *,
        batched: bool,
        loop: str,
    ) -> None:
        super().__init__(name, size, start_method)
        self.batched = batched
        self.loop = loop
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._handler: _handlers.Handler = _handlers.tiny

    def check(self, handler: str, count: int, reply: bool) -> None:
        if self.batched and reply:
            raise Skip("round trips are one message per call: the same as ppe")
        if not self.batched:
            per_message = {"io": _handlers.IO_SLEEP, "mixed": _handlers.MIXED_SLEEP}.get(
                handler, 0.0
            )
            bound = count * per_message / self.size
            if bound > self.MAX_SECONDS:
                raise Skip(
                    f"{self.size} messages in flight at most, so "
                    f"≥ {count} x {per_message * 1e3:.0f} ms / {self.size} = {bound:.0f} s"
                )

    async def start(self, handler: str, reply: bool) -> None:
        ctx = multiprocessing.get_context(self.start_method)
        self._handler = _handlers.HANDLERS[handler][0]
        self._executor = concurrent.futures.ProcessPoolExecutor(
            max_workers=self.size,
            mp_context=ctx,
            initializer=_handlers.ppe_init,
            initargs=(self.loop,),
        )
        # The executor starts its processes lazily, on demand: start them all
        # now, outside the timing.
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(
                loop.run_in_executor(self._executor, _handlers.ppe_call, _handlers.tiny, 0)
                for _ in range(self.size * 4)
            )
        )

    async def stream(self, messages: list[int]) -> None:
        loop = asyncio.get_running_loop()
        executor, handler = self._executor, self._handler
        if self.batched:
            chunk = max(1, math.ceil(len(messages) / self.size))
            await asyncio.gather(
                *(
                    loop.run_in_executor(
                        executor, _handlers.ppe_batch, handler, messages[i : i + chunk]
                    )
                    for i in range(0, len(messages), chunk)
                )
            )
        else:
            call = _handlers.ppe_call
            await asyncio.gather(
                *(loop.run_in_executor(executor, call, handler, m) for m in messages)
            )

    async def call(self, message: int) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, _handlers.ppe_call, self._handler, message
        )

    async def stop(self) -> None:
        if self._executor is not None:
            executor, self._executor = self._executor, None
            # shutdown(wait=True) joins the processes: do it off the loop.
            await asyncio.to_thread(executor.shutdown, True)


# ----------------------------------------------------------- aiomultiprocess


class AiompSystem(System):
    """``aiomultiprocess.Pool`` (``map`` for streams, ``apply`` for calls).

    Default settings: ``childconcurrency=16``, one shared queue, ``spawn``,
    the default asyncio loop. Both the parent and the children poll their
    queues every 5 ms. ``aiomp-tuned`` raises ``childconcurrency`` to 4096
    and gives the children uvloop (``loop_initializer``).
    """

    def __init__(self, name: str, size: int, start_method: str | None, *, tuned: bool) -> None:
        super().__init__(name, size, start_method)
        self.tuned = tuned
        self._pool: Any = None
        self._handler: Callable[[Any], Any] = _handlers.aio_tiny

    def check(self, handler: str, count: int, reply: bool) -> None:
        try:
            importlib.import_module("aiomultiprocess")
        except ImportError as exc:
            raise Skip("aiomultiprocess is not installed") from exc

    async def start(self, handler: str, reply: bool) -> None:
        aiomp = importlib.import_module("aiomultiprocess")
        self._handler = _handlers.HANDLERS[handler][1]
        kwargs: dict[str, Any] = {}
        if self.tuned:
            kwargs["childconcurrency"] = 4096
            if _has_uvloop():
                kwargs["loop_initializer"] = importlib.import_module("uvloop").new_event_loop
        # aiomultiprocess uses its own global context (spawn by default);
        # the pool's processes start in the constructor.
        self._pool = aiomp.Pool(processes=self.size, **kwargs)
        # Its children start lazily and are fed from one queue: a few calls
        # make sure both are up before any timing.
        await self._pool.map(_handlers.aio_tiny, list(range(self.size * 4)))

    async def stream(self, messages: list[int]) -> None:
        await self._pool.map(self._handler, messages)

    async def call(self, message: int) -> Any:
        return await self._pool.apply(self._handler, (message,))

    async def stop(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()
            await pool.join()
            _stop_aiomp_manager()


def _stop_aiomp_manager() -> None:
    """Shut down aiomultiprocess's global ``Manager`` process.

    ``aiomultiprocess.core.get_manager()`` starts a ``SyncManager`` server
    process the first time a ``Process`` is made and keeps it for the life of
    the interpreter; the benchmark leaves no process behind, so it ends it.
    """
    core = importlib.import_module("aiomultiprocess.core")
    manager = getattr(core, "_manager", None)
    if manager is not None:
        manager.shutdown()
        core._manager = None  # type: ignore[attr-defined]


# -------------------------------------------------------------------- names

ALL_SYSTEMS = [
    "limit",
    "limit-asyncio",
    "looppool-asyncio",
    "looppool-uvloop",
    "looppool-barrier",
    "ppe",
    "ppe-batch",
    "aiomp",
    "aiomp-tuned",
    # Measured in a phase of their own, after the others (see ._ray).
    "looppool-ray",
    "ray-call",
]
DEFAULT_SYSTEMS = list(ALL_SYSTEMS)

DESCRIPTIONS = {
    "limit": "raw pipes, batched pickles, {loop} child loops (the floor)",
    "limit-asyncio": "the limit with asyncio child loops (the floor for asyncio workers)",
    "looppool-asyncio": "looppool, asyncio workers, fair rounds",
    "looppool-uvloop": "looppool, uvloop workers, fair rounds",
    "looppool-barrier": "looppool, {loop} workers, distribution='barrier'",
    "ppe": "ProcessPoolExecutor, run_in_executor per message, a {loop} loop per process",
    "ppe-batch": "ProcessPoolExecutor, n/size messages per call, gathered (a reference, "
    "not a peer: needs every message up front)",
    "aiomp": "aiomultiprocess.Pool, default settings",
    "aiomp-tuned": "aiomultiprocess.Pool, childconcurrency=4096, uvloop",
    "looppool-ray": "looppool.ray.RayPool: the same workers as Ray async actors, one per "
    "worker (on Ray's loop: uvloop when installed)",
    "ray-call": "one bare async Ray actor, an awaited call per round trip: Ray's own latency, "
    "the floor under looppool-ray (W4 only; a reference, not a peer)",
}


def make_system(name: str, size: int, start_method: str | None) -> System:
    """Build the named system (one of :data:`ALL_SYSTEMS`) for ``size`` workers."""
    loop = best_loop()
    if name == "limit":
        return LimitSystem(name, size, start_method, loop=loop)
    if name == "limit-asyncio":
        return LimitSystem(name, size, start_method, loop="asyncio")
    if name == "looppool-asyncio":
        return LooppoolSystem(name, size, start_method, loop="asyncio")
    if name == "looppool-uvloop":
        return LooppoolSystem(name, size, start_method, loop="uvloop")
    if name == "looppool-barrier":
        return LooppoolSystem(name, size, start_method, loop=loop, distribution="barrier")
    if name == "ppe":
        return PpeSystem(name, size, start_method, batched=False, loop=loop)
    if name == "ppe-batch":
        return PpeSystem(name, size, start_method, batched=True, loop=loop)
    if name == "aiomp":
        return AiompSystem(name, size, start_method, tuned=False)
    if name == "aiomp-tuned":
        return AiompSystem(name, size, start_method, tuned=True)
    if name == "looppool-ray":
        from ._ray import RayPoolSystem

        return RayPoolSystem(name, size, start_method)
    if name == "ray-call":
        from ._ray import RayCallSystem

        return RayCallSystem(name, size, start_method)
    raise ValueError(f"unknown system {name!r}; known: {', '.join(ALL_SYSTEMS)}")
