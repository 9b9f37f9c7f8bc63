"""The local systems under test, registered in :mod:`._registry`.

Each adapter drives its system as its users would; the looppool rows come
in two configurations, the *README path* (``looppool``: the defaults and
the README's pattern) and *tuned* (``looppool-tuned-*``). The choices are
stated in each registration's description and printed with the results.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import importlib
import math
import multiprocessing
from collections.abc import Callable
from typing import Any

from . import _handlers
from ._limit import LimitPool
from ._oob import OobPool
from ._registry import Counter, Skip, System, best_loop, has_module, register

__all__ = [
    "AiompSystem",
    "LimitSystem",
    "LooppoolSystem",
    "PpeSystem",
    "ReadmeSystem",
]


# ------------------------------------------------------------------ looppool


def _looppool() -> Any:
    return importlib.import_module("looppool")


def _check_looppool(loop: str) -> None:
    try:
        _looppool().Pool  # noqa: B018 - the check is the attribute lookup
    except (ImportError, AttributeError) as exc:
        raise Skip(f"looppool.Pool is not importable ({exc})") from exc
    if loop == "uvloop" and not has_module("uvloop"):
        raise Skip("uvloop is not installed")


class ReadmeSystem(System):
    """looppool as the README teaches it: the *README path*.

    ``Pool(W, size=n)`` with every option at its default (``loop="auto"``,
    ``concurrency``, ``max_pending``, no ``on_result``) but the start method
    (the harness's, for every system); an ``async def process_message``.
    Streams: one task awaits ``pool.put(x)`` for every message while another
    runs ``async for r in pool.results()`` (the handler calls
    ``self.put_result``); round trips: ``await pool.submit(x)``.
    ``options``: Pool options set beyond the defaults, for a row that
    measures what they cost (``looppool-deadlines``).
    """

    def __init__(self, name: str, size: int, start_method: str | None, **options: Any) -> None:
        super().__init__(name, size, start_method)
        #: Pool options beyond the defaults (``looppool-deadlines``: the deadline options).
        self.options = options
        self._pool: Any = None
        self._reader: asyncio.Task[None] | None = None

    def check(self, handler: str, count: int, reply: bool) -> None:
        _check_looppool("auto")

    async def start(self, handler: str, reply: bool) -> None:
        stream_cls, reply_cls = _handlers.README_WORKERS[handler]
        self._pool = _looppool().Pool(
            reply_cls if reply else stream_cls,
            size=self.size,
            start_method=self.start_method,
            **self.options,
        )
        await self._pool.start()
        if not reply:
            self._reader = asyncio.create_task(self._read(self._pool))

    async def _read(self, pool: Any) -> None:
        counter = self.counter
        async for result in pool.results():
            counter(result)

    async def stream(self, messages: list[Any]) -> None:
        done = self.counter.arm(len(messages))
        put = self._pool.put
        for message in messages:
            await put(message)
        # The reader ends only when the pool stops: should it fail, say so
        # here instead of waiting for results that will never be counted.
        assert self._reader is not None
        await asyncio.wait({done, self._reader}, return_when=asyncio.FIRST_COMPLETED)
        if not done.done():
            self._reader.result()
            raise RuntimeError("results() ended before every result arrived")

    async def call(self, message: Any) -> Any:
        return await self._pool.submit(message)

    async def stop(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await pool.stop()
            finally:
                if self._reader is not None:
                    reader, self._reader = self._reader, None
                    await reader  # results() ends once the pool has stopped


class LooppoolSystem(System):
    """looppool, tuned: ``put`` with ``on_result`` for streams, ``submit`` for calls.

    A plain ``def`` handler where the workload does not await, and
    ``concurrency`` and ``max_pending`` high enough that neither limits a
    workload (every W2 message can be sleeping at once).
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

    def check(self, handler: str, count: int, reply: bool) -> None:
        _check_looppool(self.loop)

    async def start(self, handler: str, reply: bool) -> None:
        stream_cls, reply_cls = _handlers.WORKERS[handler]
        self._pool = self._new_pool(reply_cls if reply else stream_cls)
        await self._pool.start()

    def _new_pool(self, worker: Any) -> Any:
        """The pool to measure, not started (``looppool-ray`` makes a RayPool)."""
        return _looppool().Pool(
            worker,
            size=self.size,
            loop=self.loop,
            start_method=self.start_method,
            concurrency=self.concurrency,
            max_pending=self.max_pending,
            distribution=self.distribution,
            on_result=self.counter,
            name=f"bench-{self.name}",
        )

    async def stream(self, messages: list[Any]) -> None:
        done = self.counter.arm(len(messages))
        put = self._pool.put
        for message in messages:
            await put(message)
        await done

    async def call(self, message: Any) -> Any:
        return await self._pool.submit(message)

    async def stop(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.stop()


# --------------------------------------------------------------------- limit


class LimitSystem(System):
    """A raw-pipe floor (:mod:`._limit`, or :mod:`._oob` for W5); children always spawned.

    ``kind``: the handler it runs, a plain ``def`` or an ``async def`` (one
    task per message in the child, as a hand-written pool of async workers
    would); for W2 and W3 every handler is an ``async def``.
    """

    def __init__(
        self,
        name: str,
        size: int,
        start_method: str | None,
        *,
        loop: str,
        kind: str = "def",
        oob: bool = False,
    ) -> None:
        super().__init__(name, size, start_method)
        self.loop = loop
        self.kind = kind
        self.oob = oob
        self._pool: LimitPool | OobPool | None = None

    def check(self, handler: str, count: int, reply: bool) -> None:
        if self.loop == "uvloop" and not has_module("uvloop"):
            raise Skip("uvloop is not installed")

    async def start(self, handler: str, reply: bool) -> None:
        plain, coroutine = _handlers.HANDLERS[handler]
        chosen = coroutine if self.kind == "async def" else plain
        pool_cls = OobPool if self.oob else LimitPool
        self._pool = pool_cls(chosen, self.size, loop_kind=self.loop, on_result=self.counter)
        await self._pool.start()

    async def stream(self, messages: list[Any]) -> None:
        assert self._pool is not None
        done = self.counter.arm(len(messages))
        put = self._pool.put
        for message in messages:
            put(message)
        await done

    async def call(self, message: Any) -> Any:
        assert self._pool is not None
        return await self._pool.submit(message)

    async def stop(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.stop()


# ------------------------------------------------------- ProcessPoolExecutor


def _check(counter: Counter, results: list[Any]) -> None:
    """Show ``counter`` every result, when it checks them (W5; only then: it costs)."""
    if counter.expect is not None:
        counter.arm(len(results))
        for result in results:
            counter(result)


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

    async def stream(self, messages: list[Any]) -> None:
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
            results = await asyncio.gather(
                *(loop.run_in_executor(executor, call, handler, m) for m in messages)
            )
            _check(self.counter, results)

    async def call(self, message: Any) -> Any:
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
            if has_module("uvloop"):
                kwargs["loop_initializer"] = importlib.import_module("uvloop").new_event_loop
        # aiomultiprocess uses its own global context (spawn by default);
        # the pool's processes start in the constructor.
        self._pool = aiomp.Pool(processes=self.size, **kwargs)
        # Its children start lazily and are fed from one queue: a few calls
        # make sure both are up before any timing.
        await self._pool.map(_handlers.aio_tiny, list(range(self.size * 4)))

    async def stream(self, messages: list[Any]) -> None:
        _check(self.counter, await self._pool.map(self._handler, messages))

    async def call(self, message: Any) -> Any:
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


# ------------------------------------------------------------ registrations


def _register() -> None:
    loop = best_loop()

    def looppool_tuned(loop: str, distribution: str = "rounds") -> Callable[..., System]:
        def make(name: str, size: int, start_method: str | None) -> System:
            return LooppoolSystem(name, size, start_method, loop=loop, distribution=distribution)

        return make

    def limit(loop: str, kind: str = "def", oob: bool = False) -> Callable[..., System]:
        def make(name: str, size: int, start_method: str | None) -> System:
            return LimitSystem(name, size, start_method, loop=loop, kind=kind, oob=oob)

        return make

    small = frozenset({"W1", "W2", "W3", "W4"})
    register(
        "looppool",
        "looppool as the README teaches: Pool(W, size) with default options (loop='auto': "
        "{loop}), async def process_message, put + results() (W1-W3, W5), submit (W4)",
        ReadmeSystem,
        family="looppool",
        kind="async def",
    )
    register(
        "looppool-deadlines",
        "the looppool row with message_timeout=60, hang_timeout=10 (issue 12's options: "
        "what a deadline per message and the hung-worker watchdog cost; W1 and W4)",
        functools.partial(ReadmeSystem, message_timeout=60, hang_timeout=10),
        family="looppool",
        kind="async def",
        workloads=frozenset({"W1", "W4"}),
    )
    register(
        "limit",
        "raw pipes, batched pickles, {loop} child loops, def handler (the floor for "
        "looppool-tuned-*)",
        limit(loop),
        family="limit",
        kind="def",
        workloads=small,
    )
    register(
        "limit-asyncio",
        "the limit with asyncio child loops (the floor for asyncio workers)",
        limit("asyncio"),
        family="limit",
        kind="def",
        workloads=small,
    )
    register(
        "limit-async",
        "the limit with an async def handler, one task per message in the child, {loop} "
        "child loops (the floor for looppool; W1 and W4 only: W2's and W3's handlers are "
        "async def in every limit)",
        limit(loop, "async def"),
        family="limit",
        kind="async def",
        workloads=frozenset({"W1", "W4"}),
    )
    register(
        "limit-oob",
        "raw pipes, pickle protocol 5, out-of-band buffers written and read with "
        "writev/readv, no copy but the pipe's; async def handler, {loop} child loops "
        "(W5's floor)",
        limit(loop, "async def", oob=True),
        family="limit",
        kind="async def",
        workloads=frozenset({"W5"}),
    )
    register(
        "looppool-tuned-uvloop",
        "looppool tuned: uvloop workers, def handler, on_result, concurrency=4096, "
        "max_pending=2**20",
        looppool_tuned("uvloop"),
        family="looppool",
        kind="def",
        workloads=small,
    )
    register(
        "looppool-tuned-asyncio",
        "looppool tuned, with asyncio workers",
        looppool_tuned("asyncio"),
        family="looppool",
        kind="def",
        workloads=small,
    )
    register(
        "looppool-tuned-barrier",
        "looppool tuned, {loop} workers, distribution='barrier'",
        looppool_tuned(loop, "barrier"),
        family="looppool",
        kind="def",
        workloads=small,
    )
    register(
        "ppe",
        "ProcessPoolExecutor, run_in_executor per message, a {loop} loop per process",
        functools.partial(PpeSystem, batched=False, loop=loop),
        family="peer",
        kind="def",
    )
    register(
        "ppe-batch",
        "ProcessPoolExecutor, n/size messages per call, gathered (a reference, not a peer: "
        "needs every message up front)",
        functools.partial(PpeSystem, batched=True, loop=loop),
        family="reference",
        kind="def",
        workloads=small,
    )
    register(
        "aiomp",
        "aiomultiprocess.Pool, default settings",
        functools.partial(AiompSystem, tuned=False),
        family="peer",
        kind="async def",
    )
    register(
        "aiomp-tuned",
        "aiomultiprocess.Pool, childconcurrency=4096, uvloop",
        functools.partial(AiompSystem, tuned=True),
        family="peer",
        kind="async def",
        workloads=small,
    )


_register()
