"""Testing support: :class:`InlinePool`, and looppool's pytest plugin.

:class:`InlinePool` has the API of :class:`looppool.Pool` but runs its workers
as tasks on the caller's event loop, in the caller's process: fast unit tests
of a :class:`~looppool.Worker` subclass, with coverage and a debugger that
simply work. Messages, results and replies still make a pickle round trip, so
a value that a real pool could not send fails here too.

The pytest plugin (entry point ``pytest11``, name ``looppool``) adds two
fixtures for pytest-asyncio users, named after the classes they make::

    async def test_fetch(pool_factory):
        pool = await pool_factory(Fetch, size=2)       # a started looppool.Pool
        assert await pool.submit("http://127.0.0.1:8000/") > 0

    async def test_fetch_inline(inline_pool_factory):
        pool = await inline_pool_factory(Fetch)        # a started InlinePool

Both stop their pools at teardown; ``pool_factory`` also fails the test if a
worker process outlives its pool. ``looppool_factory`` is the same fixture as
``pool_factory`` under its first name, kept for the tests that use it. A
project's own fixture of either name wins over the plugin's, as pytest's
fixtures do. Options (group ``looppool``, each with an ini equivalent; the
command line wins) give the defaults that ``pool_factory`` passes to ``Pool``:

* ``--looppool-loop`` / ``looppool_loop``: ``auto``, ``asyncio`` or ``uvloop``;
* ``--looppool-start-method`` / ``looppool_start_method``: ``fork``,
  ``spawn`` or ``forkserver``;
* ``--looppool-stop-timeout`` / ``looppool_stop_timeout``: the ``timeout`` of
  the teardown's ``stop()`` (default: none).

pytest imports this module at start-up in every project that has looppool
installed, so importing it only defines names: psutil is imported, and
processes are started, only when a fixture is used; and the run's header
shows a ``looppool:`` line only when one of these options is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import functools
import inspect
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from . import _protocol as P
from . import _tracing
from ._core import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_RESULTS,
    Farewell,
    Phase,
    PoolCore,
    PoolStats,
    WorkerSlot,
    check_int,
    check_seconds,
)
from ._errors import WorkerLost
from ._ledger import Msg, SlotState
from ._monitor import monitor_options
from ._pool import Pool
from ._runner import MessageRunner
from ._worker import MessageT, ReplyT, ResultT, Worker

if TYPE_CHECKING:
    import psutil

__all__ = ["InlinePool", "InlinePoolFactory", "PoolFactory", "PoolStats"]

#: The values ``Pool`` accepts for the options that InlinePool ignores; they
#: are checked all the same, so that a typo fails here as it would in Pool.
LOOP_KINDS: Final = ("auto", "asyncio", "uvloop")
START_METHODS: Final = ("fork", "spawn", "forkserver")
DISTRIBUTIONS: Final = ("rounds", "barrier")

worker_logger: Final = logging.getLogger("looppool.worker")


def _check_choice(option: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(map(repr, choices))}, not {value!r}")


@functools.cache
def _process_options() -> frozenset[str]:
    """The options of ``Pool`` that InlinePool takes and ignores: the rest of Pool's."""
    own = inspect.signature(InlinePool.__init__).parameters
    return frozenset(
        name
        for name, parameter in inspect.signature(Pool.__init__).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name not in own
    )


def _all_options() -> list[str]:
    """Every keyword option InlinePool takes: its own and those it ignores."""
    own = inspect.signature(InlinePool.__init__).parameters
    return [
        *(n for n, p in own.items() if p.kind is inspect.Parameter.KEYWORD_ONLY),
        *_process_options(),
    ]


def _as_is(value: Any) -> Any:
    return value


def _drop(item: tuple[Any, ...]) -> None:
    pass


class _TaggedLog(logging.LoggerAdapter[logging.Logger]):
    """Tags a worker's own log records as Pool's parent does for forwarded ones."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        number = self.extra["worker"] if self.extra else -1
        kwargs["extra"] = {**kwargs.get("extra", {}), "worker": number}
        return f"[worker {number}] {msg}", kwargs


class _InlineSlot(WorkerSlot):
    """A slot served by a worker object running as a task on the caller's loop."""

    def __init__(self, number: int) -> None:
        super().__init__(number)
        self.runner: MessageRunner | None = None
        self.task: asyncio.Task[None] | None = None
        self.stop_requested: asyncio.Future[bool] | None = None


class InlinePool(PoolCore[_InlineSlot, MessageT, ReplyT, ResultT]):
    """A stand-in for :class:`looppool.Pool` that runs its workers in this process.

    ``InlinePool(worker, size=1, *, concurrency=..., max_pending=...,
    on_result=None, name=None, pickle=True, **process_options)`` takes what
    ``Pool`` takes. Its ``size`` workers are objects made by ``worker`` and run
    as tasks on the event loop that calls :meth:`start`; each has its number,
    its own ``concurrency`` limit and its own queue. What needs no process
    behaves as in ``Pool``: fair rounds (message *i* of a round goes to worker
    *i*), directed messages, broadcasts, ``max_pending`` and
    :exc:`~looppool.QueueFull`, ``submit()`` re-raising the worker's exception
    with a :exc:`~looppool.RemoteTraceback` as ``__cause__``, failures of
    ``put`` messages logged on ``looppool.worker`` and counted, a
    ``SafeWorker`` stop that processes everything, a ``Worker`` stop that
    cancels what is in flight, :exc:`~looppool.PoolClosed` after the stop and
    :exc:`~looppool.WorkerStartError` when ``initialise()`` raises. It is
    built on the same ledger as ``Pool`` (dealing, windows, ``drain()``,
    results), so these behave as in ``Pool`` by construction.

    With ``pickle=True`` (the default) every message, result and reply makes a
    pickle round trip where ``Pool`` would pickle it, so the worker gets a
    copy, and a value that cannot be pickled fails at the same call as in a
    real pool. ``pickle=False`` hands objects over as they are. The worker
    factory itself is never pickled, so a worker class defined inside a test
    works.

    Not emulated, because they need processes: worker crashes, respawns and
    :exc:`~looppool.WorkerLost`, signals, start methods, the loop kind
    (uvloop), the ``"barrier"`` distribution's mechanism (its guarantees
    hold), blocking detection, metrics, process titles, the tagging of worker
    log records, killing at ``stop(timeout=...)`` (what outlives the timeout
    is cancelled instead), hung workers (``hang_timeout``), recycling by
    memory (``max_memory_per_worker``) and results back-pressure (results
    reach the parent at once). The options for them (``loop``,
    ``start_method``, ``distribution``, ``hang_timeout``, ...) are accepted,
    checked as ``Pool`` checks them, and ignored. All workers share one
    loop: a handler that blocks it blocks them all. Message deadlines
    (``message_timeout``, ``timeout=``), cancelling a ``submit()``,
    recycling after ``max_messages_per_worker`` (a fresh worker object,
    ``initialise()`` again) and ``start_timeout`` (an ``initialise()`` that
    awaits past it is cancelled) behave as in ``Pool``.
    """

    def __init__(
        self,
        worker: type[Worker[MessageT, ReplyT, ResultT]]
        | Callable[[], Worker[MessageT, ReplyT, ResultT]],
        size: int | None = 1,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        max_pending: int = DEFAULT_MAX_PENDING,
        on_result: Callable[[Any], Awaitable[None] | None] | None = None,
        name: str | None = None,
        pickle: bool = True,
        message_timeout: float | None = None,
        max_messages_per_worker: int | None = None,
        max_results: int | None = DEFAULT_MAX_RESULTS,
        start_timeout: float | None = None,
        **process_options: Any,
    ) -> None:
        super().__init__(
            worker,
            size if size is not None else (os.cpu_count() or 1),
            concurrency=concurrency,
            max_pending=max_pending,
            on_result=on_result,
            name=name,
            message_timeout=message_timeout,
            max_messages_per_worker=max_messages_per_worker,
            max_results=max_results,
            start_timeout=start_timeout,
        )
        # Checked as Pool checks them, then ignored: no process to watch.
        unknown = sorted(set(process_options) - _process_options())
        if unknown:
            # Pool() raises this for a misspelt option (Python's own
            # TypeError); so must the pool that stands in for it in tests.
            close = difflib.get_close_matches(unknown[0], _all_options(), n=1)
            hint = f". Did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"InlinePool() got an unexpected keyword argument {unknown[0]!r}{hint}")
        check_seconds("hang_timeout", process_options.get("hang_timeout"))
        if process_options.get("max_memory_per_worker") is not None:
            check_int("max_memory_per_worker", process_options["max_memory_per_worker"])
        _check_choice("loop", process_options.get("loop", "auto"), LOOP_KINDS)
        if process_options.get("start_method") is not None:
            _check_choice("start_method", process_options["start_method"], START_METHODS)
        _check_choice("distribution", process_options.get("distribution", "rounds"), DISTRIBUTIONS)
        monitor_options(
            process_options.get("statsd"),
            process_options.get("statsd_prefix"),
            process_options.get("metrics_interval", 10.0),
            process_options.get("blocking_threshold"),
            process_options.get("worker_metrics", False),
        )
        self._use_pickle = pickle
        if not pickle:
            self._loads = _as_is

    def _new_slot(self, number: int) -> _InlineSlot:
        return _InlineSlot(number)

    @property
    def pids(self) -> tuple[None, ...]:
        """No worker has a process of its own: ``None`` for each."""
        return (None,) * self._size

    def __repr__(self) -> str:
        return f"<looppool.testing.InlinePool {self._describe()}>"

    def _transport_info(self) -> str:
        return " (inline)"

    def _pickle(self, message: Any) -> Any:
        if self._use_pickle:
            return super()._pickle(message)
        if self._phase is not Phase.RUNNING:
            self._raise_closed()
        return message

    # -- workers as tasks -----------------------------------------------------

    def _launch(self, slot: _InlineSlot) -> None:
        assert self._loop is not None
        slot.state = SlotState.STARTING
        slot.start_error = None
        slot.farewell = Farewell.NONE
        slot.exited = self._loop.create_future()
        slot.stop_requested = self._loop.create_future()
        codec: dict[str, Any] = {} if self._use_pickle else {"dumps": _as_is, "loads": _as_is}
        slot.runner = MessageRunner(
            self._factory,
            slot.number,
            functools.partial(self._emit, slot),
            log=_TaggedLog(worker_logger, {"worker": slot.number}),
            pool_name=self.name,
            **codec,
        )
        slot.task = self._loop.create_task(
            self._serve(slot, slot.runner), name=f"{self.name}-worker-{slot.number}"
        )
        # A done-callback, not a finally clause: a task cancelled before it
        # first ran never enters its coroutine, yet its end must be reported.
        slot.task.add_done_callback(functools.partial(self._ended, slot, slot.runner))

    def _emit(self, slot: _InlineSlot, item: tuple[Any, ...]) -> None:
        self._dispatch(slot, [item])

    async def _serve(self, slot: _InlineSlot, runner: MessageRunner) -> None:
        """The life of one worker, as its process would live it."""
        assert slot.stop_requested is not None
        try:
            worker = await runner.initialise()
            if worker is None:
                return
            self._emit(slot, (P.EV_READY, None, worker.safe))
            cancel = await slot.stop_requested
            await runner.finish_in_flight(cancel)
            await runner.finalise()
            self._emit(slot, (P.EV_BYE,))
        except asyncio.CancelledError:
            # Killed (stop's timeout, or a cancelled stop): what runs in this
            # worker is cancelled, as a process pool would kill it. The task
            # ends here; the pool that cancelled it waits for slot.exited.
            for task in runner.tasks.values():
                task.cancel()
            await asyncio.gather(*runner.tasks.values(), return_exceptions=True)
            # Unlike a killed process, this worker shares the test's process:
            # release what initialise() opened, so nothing leaks into the next
            # test. What it sends now is dropped, as a killed process's would be.
            runner.emit = _drop
            await runner.finalise()

    def _ended(self, slot: _InlineSlot, runner: MessageRunner, task: asyncio.Task[None]) -> None:
        if runner.worker is not None:
            # put_result() after the stop raises, as on a worker no pool runs.
            del runner.worker._looppool_sink
        said_bye = slot.farewell is Farewell.BYE
        cause = "it was cancelled" if task.cancelled() or not said_bye else "it stopped"
        self._on_worker_end(slot, cause, WorkerLost(slot.number, None, None))

    def _send(self, slot: _InlineSlot, batch: list[Msg]) -> None:
        runner = slot.runner
        assert runner is not None
        assert slot.stop_requested is not None
        for msg in batch:
            if slot.stop_requested.done():
                runner.refuse(msg.id)
            else:
                runner.start(
                    msg.id, msg.reply is not None, msg.payload, msg.timeout, _tracing.wire(msg)
                )

    def _send_stop(self, slot: _InlineSlot, cancel: bool) -> None:
        if slot.stop_requested is not None and not slot.stop_requested.done():
            slot.stop_requested.set_result(cancel)

    def _send_cancel(self, slot: _InlineSlot, mid: int) -> None:
        if slot.runner is not None:
            slot.runner.cancel(mid)

    def _kill(self, slot: _InlineSlot) -> None:
        if slot.task is not None and not slot.task.done():
            slot.task.cancel()


# -- the pytest plugin --------------------------------------------------------------


class PoolFactory(Protocol):
    """The type of the ``pool_factory`` (or ``looppool_factory``) fixture, for annotations."""

    def __call__(
        self,
        worker: type[Worker[MessageT, ReplyT, ResultT]]
        | Callable[[], Worker[MessageT, ReplyT, ResultT]],
        /,
        size: int | None = None,
        **options: Any,
    ) -> Awaitable[Pool[MessageT, ReplyT, ResultT]]:
        """Make and start a ``looppool.Pool``; the fixture stops it at teardown."""
        ...


class InlinePoolFactory(Protocol):
    """The type of the ``inline_pool_factory`` fixture, for annotations."""

    def __call__(
        self,
        worker: type[Worker[MessageT, ReplyT, ResultT]]
        | Callable[[], Worker[MessageT, ReplyT, ResultT]],
        /,
        size: int | None = 1,
        **options: Any,
    ) -> Awaitable[InlinePool[MessageT, ReplyT, ResultT]]:
        """Make and start an :class:`InlinePool`; the fixture stops it at teardown."""
        ...


# (dest and ini name, command-line flag, help)
_OPTIONS: Final = (
    (
        "looppool_loop",
        "--looppool-loop",
        f"default event loop of pool_factory's pools: {', '.join(LOOP_KINDS)}",
    ),
    (
        "looppool_start_method",
        "--looppool-start-method",
        f"default start method of pool_factory's pools: {', '.join(START_METHODS)}",
    ),
    (
        "looppool_stop_timeout",
        "--looppool-stop-timeout",
        "seconds the fixtures' teardown stop() waits before it kills the workers "
        "(default: no limit)",
    ),
)


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add the ``looppool`` option group and its ini equivalents."""
    group = parser.getgroup("looppool", "looppool worker pools (pool_factory fixture)")
    for dest, flag, text in _OPTIONS:
        group.addoption(flag, dest=dest, default=None, metavar="VALUE", help=text)
        parser.addini(dest, help=f"default for {flag}", type="string", default=None)


@dataclass(frozen=True)
class _Settings:
    """The plugin's options, read and checked once per session."""

    loop: str | None
    start_method: str | None
    stop_timeout: float | None

    def pool_defaults(self) -> dict[str, Any]:
        """The keywords pool_factory passes to Pool unless the test gives them."""
        defaults: dict[str, Any] = {}
        if self.loop is not None:
            defaults["loop"] = self.loop
        if self.start_method is not None:
            defaults["start_method"] = self.start_method
        return defaults


def _option(config: pytest.Config, dest: str) -> str | None:
    # The command line wins over the ini file, as in pytest-asyncio.
    value = config.getoption(dest)
    if value is None:
        value = config.getini(dest)
    return str(value) if value else None


def _read_settings(config: pytest.Config) -> _Settings:
    loop = _option(config, "looppool_loop")
    if loop is not None and loop not in LOOP_KINDS:
        raise pytest.UsageError(
            f"{loop!r} is not a valid looppool_loop. Valid kinds: {', '.join(LOOP_KINDS)}."
        )
    start_method = _option(config, "looppool_start_method")
    if start_method is not None and start_method not in START_METHODS:
        raise pytest.UsageError(
            f"{start_method!r} is not a valid looppool_start_method. "
            f"Valid methods: {', '.join(START_METHODS)}."
        )
    text = _option(config, "looppool_stop_timeout")
    stop_timeout = None
    if text is not None:
        try:
            stop_timeout = float(text)
        except ValueError:
            stop_timeout = float("nan")
        if not stop_timeout > 0:  # also false for nan
            raise pytest.UsageError(
                f"{text!r} is not a valid looppool_stop_timeout: give a positive number of seconds."
            )
    return _Settings(loop, start_method, stop_timeout)


def pytest_configure(config: pytest.Config) -> None:
    """Check the options at start-up, so that a typo is a usage error, not failing tests."""
    config.stash[_SETTINGS] = _read_settings(config)


def pytest_report_header(config: pytest.Config) -> str | None:
    """Show the defaults in effect in the header of a run, if any option is set.

    The plugin is loaded in every run of every project where looppool is
    installed: without options, it has nothing to say there.
    """
    settings = config.stash[_SETTINGS]
    if settings == _Settings(None, None, None):
        return None
    timeout = "none" if settings.stop_timeout is None else f"{settings.stop_timeout:g}s"
    return (
        f"looppool: loop={settings.loop or 'auto'}, "
        f"start_method={settings.start_method or 'platform default'}, stop_timeout={timeout}"
    )


def _check_same_loop(fixture_loop: asyncio.AbstractEventLoop, what: str) -> None:
    # The teardown stops the pools on the fixture's loop: a pool started on
    # the test's other loop could not be stopped there. Refuse before starting.
    if asyncio.get_running_loop() is not fixture_loop:
        pytest.fail(
            f"{what} runs on another event loop than this test: the test and the "
            "fixture must share a loop scope (give the test the default "
            "loop_scope='function', or set asyncio_default_fixture_loop_scope to the "
            "test's loop scope)",
            pytrace=False,
        )


def _processes(pids: Iterable[int | None]) -> list[psutil.Process]:
    import psutil

    found = []
    for pid in pids:
        if pid is None:
            continue
        with contextlib.suppress(psutil.NoSuchProcess):
            # A Process remembers its creation time: is_running() later cannot
            # mistake a new process that reused the pid for this one.
            found.append(psutil.Process(pid))
    return found


def _survivors(processes: Iterable[psutil.Process]) -> list[psutil.Process]:
    import psutil

    alive = []
    for process in processes:
        try:
            # A zombie has exited; only its parent has yet to reap it.
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def _kill(processes: Iterable[psutil.Process]) -> None:
    import psutil

    processes = list(processes)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(processes, timeout=5)


async def _pool_factory(request: pytest.FixtureRequest) -> AsyncIterator[PoolFactory]:
    """Make started ``looppool.Pool`` objects; stop them and check for survivors at teardown.

    ``pool = await pool_factory(MyWorker, size=2, **pool_options)``. The
    ``looppool_loop`` and ``looppool_start_method`` options are defaults for
    ``loop=`` and ``start_method=``. At teardown every pool is stopped (with
    ``looppool_stop_timeout``), and the test fails, naming the pids, if a
    worker process is still alive after its pool's ``stop()`` returned.
    """
    settings = request.config.stash[_SETTINGS]
    fixture_name = request.fixturename or "pool_factory"  # or looppool_factory
    loop = asyncio.get_running_loop()
    made: list[tuple[Pool, list[psutil.Process]]] = []

    async def factory(
        worker: type[Worker] | Callable[[], Worker], /, size: int | None = None, **options: Any
    ) -> Pool:
        _check_same_loop(loop, fixture_name)
        for key, value in settings.pool_defaults().items():
            options.setdefault(key, value)
        pool = Pool(worker, size, **options)
        await pool.start()
        made.append((pool, _processes(pool.pids)))
        return pool

    yield factory

    problems: list[str] = []
    for pool, processes in reversed(made):
        # Replacements of workers that died during the test are in pids now.
        known = {p.pid for p in processes}
        processes += _processes(pid for pid in pool.pids if pid not in known)
        try:
            await pool.stop(timeout=settings.stop_timeout)
        except Exception as exc:
            problems.append(f"stopping {pool!r} raised {exc!r}")
        # A process started during the stop (a respawn racing it) shows only now.
        known = {p.pid for p in processes}
        processes += _processes(pid for pid in pool.pids if pid not in known)
        survivors = _survivors(processes)
        if survivors:
            pids = ", ".join(str(p.pid) for p in survivors)
            problems.append(f"worker processes outlived {pool!r}: pids {pids}")
            _kill(survivors)  # or they would outlive the test session too
    if problems:
        pytest.fail(f"{fixture_name} teardown: " + "; ".join(problems), pytrace=False)


async def _inline_pool_factory(
    request: pytest.FixtureRequest,
) -> AsyncIterator[InlinePoolFactory]:
    """Make started :class:`InlinePool` objects; stop them at teardown.

    ``pool = await inline_pool_factory(MyWorker, size=2, **pool_options)``;
    process options (``loop=``, ``start_method=``...) are accepted and
    ignored. Teardown stops every pool with ``looppool_stop_timeout``.
    """
    settings = request.config.stash[_SETTINGS]
    loop = asyncio.get_running_loop()
    made: list[InlinePool] = []

    async def factory(
        worker: type[Worker] | Callable[[], Worker], /, size: int | None = 1, **options: Any
    ) -> InlinePool:
        _check_same_loop(loop, "inline_pool_factory")
        pool = InlinePool(worker, size, **options)
        await pool.start()
        made.append(pool)
        return pool

    yield factory

    for pool in reversed(made):
        await pool.stop(timeout=settings.stop_timeout)


try:
    import pytest
except ImportError:  # InlinePool needs no pytest; the fixtures do.
    pass
else:
    _SETTINGS: Final = pytest.StashKey[_Settings]()

    try:
        from pytest_asyncio import fixture as _async_fixture
    except ImportError:
        # Without pytest-asyncio, plain async fixtures: another async plugin
        # (anyio's) may run them, or pytest says clearly that none does.
        _async_fixture = pytest.fixture  # type: ignore[assignment]

    pool_factory = _async_fixture(_pool_factory, name="pool_factory")
    # The first name of pool_factory: public since the first release, so it
    # stays, as the same fixture (no deprecation warning: many suites run
    # with warnings as errors).
    looppool_factory = _async_fixture(_pool_factory, name="looppool_factory")
    inline_pool_factory = _async_fixture(_inline_pool_factory, name="inline_pool_factory")
