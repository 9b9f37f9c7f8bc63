"""Fault injection: a catalogue in the spirit of CPython's test_concurrent_futures/test_deadlock.py.

Each fault — a crash (``os._exit``, SIGKILL of itself, a segfault), an exit (``sys.exit``) or a
raised exception — is injected wherever a pool runs code it does not control: pickling or
unpickling a message, a result (``put_result``), a reply (what ``submit`` returns) or an exception
(raised by ``process_message``), and in ``initialise()``, ``process_message()`` and
``finalise()``; under fork, spawn and forkserver, for ``Worker`` and ``SafeWorker``, with both
distributions.

A case passes when the affected message has its documented outcome, the pool is usable afterwards
(every worker, and the distribution, answer a probe) or cleanly stopped, and no process is left.
Each case has a deadline: a hang fails at once, naming the case, with the parent's threads and
tasks in the message, and the workers' threads and tasks in the captured stderr.

Pools are shared to keep the file fast: one per (start method, worker class, distribution) goes
through its catalogue in turn (see ``catalogue()`` for how deaths are dealt out over the pools),
and a failure names its case. A fault that kills a worker fires once (a token file), so that a
``SafeWorker`` pool's second delivery shows the message's outcome had it survived. Faults that
end the *parent* (an exit or a crash while it unpickles what a worker sent) run in a child
interpreter. Tests marked ``slow`` run the exhaustive product.

The last section pins down bugs found in the core: strict xfails while they are open.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import functools
import io
import itertools
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil
import pytest

import fault_workers as fw
import looppool
import pool_workers

TESTS = Path(__file__).parent
METHODS = ("fork", "spawn", "forkserver")
CLASSES = {"Worker": fw.FaultWorker, "SafeWorker": fw.SafeFaultWorker}
DISTRIBUTIONS = ("rounds", "barrier")
STYLES = ("sync", "async")
SIZE = 2
#: Seconds one case may take. A case takes well under one; past this it is a hang.
CASE_DEADLINE = 30.0
#: Seconds a dead or stopped worker's process may take to disappear.
EXIT_DEADLINE = 5.0
#: The catalogue's pools kill a worker whose loop is stuck this long (the hang case).
HANG_TIMEOUT = 1.0

#: Where a fault fires in a worker: every kind of fault can fire there.
WORKER_SITES = {
    "message-unpickle": "unpickling a message in the worker",
    "process_message": "in process_message",
    "result-pickle": "pickling a result (put_result)",
    "reply-pickle": "pickling a reply",
    "exception-pickle": "pickling the exception process_message raised",
    "exception-unpickle": "unpickling the exception process_message raised (worker-side check)",
}
#: The worker sites that a put() message reaches too (the others exist only for a reply).
PUT_SITES = ("message-unpickle", "process_message", "result-pickle")
#: Where a fault fires in the parent: only raising is survivable there (see the subprocess tests).
PARENT_SITES = {
    "message-pickle": "pickling a message in the caller",
    "result-unpickle": "unpickling a result in the parent",
    "reply-unpickle": "unpickling a reply in the parent",
    "exception-unpickle-in-parent": "unpickling the exception in the parent",
}


def describe_exit(code: int) -> str:
    """The words the pool uses for an exit code in its logs."""
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


@dataclass(frozen=True)
class Case:
    """One fault at one site, reached by one way of sending."""

    site: str
    fault: str  # "raise", "exit", or one of fw.CRASHES
    via: str = "submit"  # "submit", "put", or "every sender" (message-pickle)
    style: str = "sync"  # process_message does the work inline, or in a task ("async")

    @property
    def kills(self) -> bool:
        """Whether the fault ends the worker process."""
        return self.fault in fw.EXIT_CODES and self.site in WORKER_SITES

    def __str__(self) -> str:
        where = WORKER_SITES.get(self.site) or PARENT_SITES[self.site]
        return f"{self.fault} while {where}, via {self.via} ({self.style})"


def catalogue(method: str, worker_class: str, distribution: str, exhaustive: bool) -> list[Case]:
    """Every case one pool goes through.

    Every pool meets every fault that raises. Deaths are dealt out: what a start method changes
    is how a worker starts, dies and is seen to die; what the class and the distribution change
    is what the parent does about it. Under fork, where a respawn is cheap, every pool meets an
    exit and a crash at every site (the crash kind rotating over the pools, so each site meets
    every kind). Under spawn and forkserver a respawn costs a fresh interpreter (a whole
    generation in barrier mode), so each (site, exit or crash) pair is met once over the four
    pools of the method. ``exhaustive`` (slow) gives every pool every death at every site,
    through every way of sending.
    """
    m = METHODS.index(method)
    p = 2 * list(CLASSES).index(worker_class) + DISTRIBUTIONS.index(distribution)
    cases = [
        Case("message-pickle", "raise", "every sender"),
        Case("message-pickle", "exit", "every sender"),
        Case("result-unpickle", "raise", style=STYLES[(m + p) % 2]),
        Case("reply-unpickle", "raise", style=STYLES[(m + p + 1) % 2]),
        Case("exception-unpickle-in-parent", "raise", style=STYLES[(m + p) % 2]),
    ]
    ways = {site: ("submit", "put") if site in PUT_SITES else ("submit",) for site in WORKER_SITES}
    for i, site in enumerate(WORKER_SITES):
        style = STYLES[(m + p + i) % 2]
        cases += [Case(site, "raise", via, style) for via in ways[site]]
    sites = list(WORKER_SITES)
    deaths: list[tuple[int, str]] = []  # (site index, fault)
    for f, i in itertools.product(range(2), range(len(sites))):
        if exhaustive:
            deaths += [(i, fault) for fault in ("exit", *fw.CRASHES)[f::2]]
        elif method == "fork" or (f * len(sites) + i + m) % 4 == p:
            deaths.append((i, ("exit", fw.CRASHES[(i + m + p) % 3])[f]))
    for k, (i, fault) in enumerate(sorted(deaths)):
        site = sites[i]
        style = STYLES[(m + p + i + k) % 2]
        vias = ways[site] if exhaustive else (ways[site][(m + p + k) % len(ways[site])],)
        cases += [Case(site, fault, via, style) for via in vias]
    return cases


def message_for(case: Case, fault: fw.Fault) -> Any:
    """The message that meets ``fault`` at the case's site."""
    site = case.site
    if site == "message-unpickle":
        return fw.Faulty("unpickle", fault, ("echo", fw.SURVIVED))
    if site == "message-pickle":
        return fw.Faulty("pickle", fault)
    if site == "process_message":
        return ("inject", fault, case.style)
    op, at = {
        "result-pickle": ("result", "pickle"),
        "result-unpickle": ("result", "unpickle"),
        "reply-pickle": ("reply", "pickle"),
        "reply-unpickle": ("reply", "unpickle"),
        "exception-pickle": ("raise", "pickle"),
        "exception-unpickle": ("raise", "unpickle"),
        "exception-unpickle-in-parent": ("raise", "unpickle"),
    }[site]
    return (op, at, fault, case.style)


@dataclass
class Expected:
    """The documented outcome of a case for the message that met the fault."""

    reply: Any = fw.SURVIVED  # what submit() returns...
    error: type[BaseException] | None = None  # ...or raises instead
    match: str | None = None
    remote: bool = False  # the error carries the worker's traceback as __cause__
    results: list[Any] = field(default_factory=list)  # what the message put, as tags
    processed: int = 0
    failed: int = 0
    lost: int = 0
    redelivered: int = 0
    exit_code: int | None = None  # the worker died with this code
    log: tuple[str, ...] = ()  # words one line of the parent's logging must show


def after_a_spent_fault(site: str) -> Expected:
    """What the message does when its fault does not fire (a SafeWorker delivers it again)."""
    if site in ("exception-pickle", "exception-unpickle"):
        return Expected(error=fw.FaultyError, remote=True, failed=1)
    if site == "reply-pickle":
        return Expected(processed=1)
    return Expected(results=[fw.SURVIVED], processed=1)


def expect(case: Case, safe: bool) -> Expected:
    """The documented outcome of ``case`` in a pool of ``Worker`` or ``SafeWorker``."""
    if case.kills:
        code = fw.EXIT_CODES[case.fault]
        died = ("died", describe_exit(code))
        if not safe:  # the message is failed
            return Expected(error=looppool.WorkerLost, lost=1, exit_code=code, log=died)
        # delivered once more; its fault is spent, so it now runs as it would have
        return replace(after_a_spent_fault(case.site), redelivered=1, exit_code=code, log=died)
    site = case.site
    if site in PUT_SITES:
        if case.via == "put":  # nobody awaits it: counted and logged
            return Expected(failed=1, log=("process_message raised", "InjectedFault"))
        return Expected(error=fw.InjectedFault, remote=True, failed=1)
    return {
        "reply-pickle": Expected(
            error=TypeError,
            match="reply of process_message could not be pickled",
            remote=True,
            failed=1,
        ),
        "exception-pickle": Expected(
            error=looppool.RemoteError, match="FaultyError", remote=True, failed=1
        ),
        "exception-unpickle": Expected(
            error=looppool.RemoteError, match="FaultyError", remote=True, failed=1
        ),
        "result-unpickle": Expected(processed=1, log=("result could not be unpickled",)),
        "reply-unpickle": Expected(
            error=looppool.RemoteError, match="reply could not be unpickled", processed=1
        ),
        "exception-unpickle-in-parent": Expected(
            error=looppool.RemoteError, match="FaultyError", remote=True, failed=1
        ),
    }[site]


def arm(token: str | Path) -> None:
    """Create a one-shot fault's token: the next process to remove it fires the fault."""
    Path(token).touch()


def fired(token: str | Path) -> bool:
    """Whether a one-shot fault has fired (its token is gone)."""
    return not os.path.exists(token)


# -- hangs, leaks -------------------------------------------------------------------------------


def hang_report(pool: looppool.Pool | None) -> str:
    """Everything that tells where a hang is: the parent's threads and tasks, the pool's state.

    The workers are asked to print their threads' stacks (SIGUSR1) and their tasks' (SIGUSR2) to
    stderr, which pytest captures.
    """
    with tempfile.TemporaryFile("w+") as f:
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.seek(0)
        threads = f.read()
    tasks = io.StringIO()
    for task in asyncio.all_tasks():
        task.print_stack(file=tasks)
    state = ""
    if pool is not None:
        state = f"{pool!r}\n{pool.stats()}\n"
        for pid in pool.pids:
            for signum in (signal.SIGUSR1, signal.SIGUSR2):  # threads, then tasks
                if pid is not None:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signum)
    return (
        f"{state}\nParent threads:\n{threads}\nParent tasks:\n{tasks.getvalue()}\n"
        "(the workers' stacks are in the captured stderr)"
    )


@contextlib.asynccontextmanager
async def deadline(what: object, pool: looppool.Pool | None = None) -> AsyncIterator[None]:
    """Run a case: a failure names it; a hang fails after CASE_DEADLINE, showing every stack.

    An exception that escapes a callback on the parent's loop (the pool's supervision runs in
    callbacks) fails the case at once, rather than through the hang it would cause.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    escaped: list[dict[str, Any]] = []

    def on_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        escaped.append(context)
        if len(escaped) == 1:
            task.cancel()

    previous = loop.get_exception_handler()
    loop.set_exception_handler(on_error)
    try:
        async with asyncio.timeout(CASE_DEADLINE) as scope:
            yield
    except asyncio.CancelledError:
        if not escaped:
            raise
        task.uncancel()
        context = escaped[0]
        error = context.get("exception")
        text = "".join(traceback.format_exception(error)) if error is not None else ""
        pytest.fail(
            f"{what}: an exception escaped to the parent's loop: {context['message']}\n{text}"
        )
    except TimeoutError:
        if not scope.expired():
            raise
        pytest.fail(f"{what}: hung (no outcome in {CASE_DEADLINE} s)\n{hang_report(pool)}")
    except (Exception, pytest.fail.Exception) as exc:
        raise AssertionError(f"fault case '{what}' failed: {type(exc).__name__}: {exc}") from exc
    finally:
        loop.set_exception_handler(previous)


async def shut(pool: looppool.Pool) -> bool:
    """Stop a pool whatever a failed case left behind; return False if stop() hung or raised.

    It never raises: that would hide the failure that brought the test here.
    """
    try:
        async with asyncio.timeout(CASE_DEADLINE):
            await pool.stop(timeout=EXIT_DEADLINE)
    except Exception:
        for pid in pool.pids:
            if pid is not None:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        return False
    return True


def worker_processes() -> dict[int, psutil.Process]:
    """Every descendant process but multiprocessing's helpers; a fork server's children count."""
    me = psutil.Process()
    helpers = set()
    for child in me.children():
        with contextlib.suppress(psutil.Error):
            cmdline = " ".join(child.cmdline())
            if "multiprocessing.forkserver" in cmdline or "multiprocessing.resource_tracker" in (
                cmdline
            ):
                helpers.add(child.pid)
    return {p.pid: p for p in me.children(recursive=True) if p.pid not in helpers}


def assert_gone(processes: list[psutil.Process], what: str) -> None:
    """Wait (with a deadline) for processes to exit; kill the rest and fail.

    A pidfd becomes readable when its process exits, reaped or not: an orphan that init has
    not reaped yet counts as gone.
    """
    fds: dict[int, psutil.Process] = {}
    try:
        for proc in processes:
            try:
                fd = os.pidfd_open(proc.pid)
            except ProcessLookupError:
                continue
            if proc.is_running():  # the pid is still that process's (checked after opening)
                fds[fd] = proc
            else:
                os.close(fd)
        waiting, end = set(fds), time.monotonic() + EXIT_DEADLINE
        while waiting and (left := end - time.monotonic()) > 0:
            ready, _, _ = select.select(list(waiting), [], [], left)
            waiting.difference_update(ready)
        alive = [fds[fd] for fd in waiting]
    finally:
        for fd in fds:
            os.close(fd)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    assert not alive, f"{what}: processes left running: {[p.pid for p in alive]}"


@pytest.fixture(autouse=True)
def no_worker_left() -> Any:
    """Fail a test that leaves a worker behind, fork-server children included.

    (conftest's check skips every process whose command line is the fork server's, which a
    forkserver worker's is.)
    """
    before = set(worker_processes())
    yield
    left = [p for pid, p in worker_processes().items() if pid not in before]
    assert_gone(left, "after the test")


@contextlib.asynccontextmanager
async def open_gate() -> AsyncIterator[pool_workers.Gate]:
    """A crash-safe latch: workers wait at it until the test opens it."""
    directory = tempfile.mkdtemp(prefix="lp-")
    latch = pool_workers.Gate(os.path.join(directory, "gate"))
    await latch.serve()
    try:
        yield latch
    finally:
        await latch.close()
        shutil.rmtree(directory)


@pytest.fixture
async def gate() -> AsyncIterator[pool_workers.Gate]:
    """A crash-safe latch holding "hold" messages until the test opens it."""
    async with open_gate() as latch:
        yield latch


# -- the catalogue ------------------------------------------------------------------------------


class Bench:
    """One pool going through the catalogue, and what the checks need to know about it."""

    def __init__(
        self,
        pool: looppool.Pool,
        safe: bool,
        distribution: str,
        tmp: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        self.pool = pool
        self.safe = safe
        self.distribution = distribution
        self.tmp = tmp
        self.caplog = caplog
        self.results = pool.results()
        self.processes: dict[int, psutil.Process] = {}
        self._tokens = itertools.count()
        self._probes = itertools.count()

    def token(self) -> str:
        """A fresh one-shot token: the fault fires in the first process that removes it."""
        path = self.tmp / f"token-{next(self._tokens)}"
        arm(path)
        return str(path)

    def remember(self) -> None:
        """Note the current worker processes, to check later that they are gone."""
        for pid in self.pool.pids:
            if pid is not None and pid not in self.processes:
                self.processes[pid] = psutil.Process(pid)

    def assert_logged(self, mark: int, *words: str) -> None:
        """Check that one line logged since record number ``mark`` has every word."""
        lines = [r.getMessage() for r in self.caplog.records[mark:]]
        assert any(all(w in line for w in words) for line in lines), (
            f"no log line says {' ... '.join(words)}"
        )

    async def probe(self) -> list[Any]:
        """Every worker, and the distribution, must answer: the pool is usable.

        Returns the tags of the results that came before the probes' (the case's results:
        a case's results are all in before its submit returns or its drain ends).
        """
        n = next(self._probes)
        tags = [f"probe {n} to worker {k}" for k in range(SIZE)] + [f"probe {n}, dealt"]
        sends = [self.pool.submit(("echo", tag), worker=k) for k, tag in enumerate(tags[:SIZE])]
        sends.append(self.pool.submit(("echo", tags[-1])))
        assert await asyncio.gather(*sends) == tags, "the pool is not usable after the fault"
        earlier, waiting = [], set(tags)
        while waiting:
            _, tag = await anext(self.results)
            if tag in waiting:
                waiting.discard(tag)
            else:
                earlier.append(tag)
        self.remember()
        return earlier

    async def send(self, case: Case, message: Any, expected: Expected) -> None:
        """Send the faulty message as the case says; check what submit() gives."""
        pool = self.pool
        if case.via == "put":
            await pool.put(message)
            await pool.drain()
            return
        if expected.error is None:
            assert await pool.submit(message) == expected.reply
            return
        with pytest.raises(expected.error, match=expected.match) as info:
            await pool.submit(message)
        error = info.value
        if expected.remote:
            assert isinstance(error.__cause__, looppool.RemoteTraceback), "no remote traceback"
            if case.site == "reply-pickle":
                assert "InjectedFault" in error.__cause__.tb
        if isinstance(error, looppool.WorkerLost):
            assert error.exitcode == expected.exit_code

    async def run(self, case: Case) -> None:
        """Inject the case's fault; check the message's outcome, then that the pool is whole."""
        pool = self.pool
        if case.site == "message-pickle":
            return await self.run_unpicklable_message(case)
        fault = fw.Fault(
            case.fault,
            token=self.token() if case.kills else None,
            where="parent" if case.site in PARENT_SITES else "anywhere",
        )
        expected = expect(case, self.safe)
        before, pids, mark = pool.stats(), pool.pids, len(self.caplog.records)
        await self.send(case, message_for(case, fault), expected)
        after = pool.stats()
        results = await self.probe()
        respawned = pool.stats().respawns - before.respawns

        assert results == expected.results, "the message's results"
        counts = ("processed", "failed", "lost", "redelivered")
        assert {c: getattr(after, c) - getattr(before, c) for c in counts} == {
            c: getattr(expected, c) for c in counts
        }, "the pool's counts"
        assert after.pending == 0
        if expected.log:
            self.assert_logged(mark, *expected.log)
        if not case.kills:
            assert pool.pids == pids, "a fault that only raises must not end a worker"
            assert respawned == 0
            return
        assert fault.token is not None
        assert fired(fault.token), "the fault never fired"
        self.check_replaced(pids, respawned, deaths=1)

    def check_replaced(self, pids: tuple[int | None, ...], respawned: int, deaths: int) -> None:
        """Check that the deaths replaced one worker each (a whole generation in barrier mode)."""
        now = self.pool.pids
        changed = [k for k in range(SIZE) if now[k] != pids[k]]
        if self.distribution == "barrier":  # a death restarts every worker
            assert changed == list(range(SIZE)), "a barrier pool replaces every worker"
            assert respawned == deaths * SIZE
        else:
            assert len(changed) == 1, f"one worker is replaced, not {changed}"
            assert respawned == deaths
        assert_gone([self.processes[pids[k]] for k in changed if pids[k] is not None], "dead")

    async def run_unpicklable_message(self, case: Case) -> None:
        """A message whose pickling fails, in the caller: it raises there; nothing else moves."""
        pool = self.pool
        message = fw.Faulty("pickle", fw.Fault(case.fault))
        before = pool.stats()
        senders: list[Callable[[], Awaitable[Any]]] = [
            lambda: pool.put(message),
            lambda: pool.submit(message),
            lambda: pool.broadcast(message),
            lambda: pool.put(message, worker=1),
        ]
        for send in senders:
            if case.fault == "raise":
                with pytest.raises(TypeError, match="cannot be pickled") as info:
                    await send()
                assert isinstance(info.value.__cause__, fw.InjectedFault)
            else:
                with pytest.raises(SystemExit) as exiting:
                    await send()
                assert exiting.value.code == fw.EXIT_CODE
        if case.fault == "raise":
            with pytest.raises(TypeError, match="cannot be pickled"):
                pool.put_nowait(message)
        assert pool.stats() == before
        assert await self.probe() == []

    async def run_poison(self, kind: str) -> None:
        """A message that kills every worker it reaches, among neighbours: it alone fails.

        In a ``SafeWorker`` pool its neighbours run again (those that shared a dying worker)
        and succeed; in a ``Worker`` pool those that shared its worker die with it.
        """
        pool = self.pool
        before, mark = pool.stats(), len(self.caplog.records)
        poison = ("inject", fw.Fault(kind), "async")  # no token: it fires in every worker
        tags = [f"neighbour {i}" for i in range(4 * SIZE)]
        middle = 2 * SIZE
        sends = [pool.submit(("echo", tag)) for tag in tags]
        sends.insert(middle, pool.submit(poison))
        outcomes = await asyncio.gather(*sends, return_exceptions=True)
        failed = outcomes.pop(middle)
        assert isinstance(failed, looppool.WorkerLost), f"the poison message gave {failed!r}"
        assert failed.exitcode == fw.EXIT_CODES[kind]
        lost = pool.stats().lost - before.lost
        if self.safe:
            assert outcomes == tags, "a neighbour of the poison message failed"
            assert lost == 1
        else:
            lost_neighbours = [o for o in outcomes if isinstance(o, looppool.WorkerLost)]
            assert all(
                o == t for o, t in zip(outcomes, tags, strict=True) if o not in lost_neighbours
            )
            assert lost == 1 + len(lost_neighbours)
        self.assert_logged(mark, "died", describe_exit(fw.EXIT_CODES[kind]))
        results = await self.probe()
        if self.safe:
            assert set(results) == set(tags), "a neighbour's result is missing"
        else:
            assert set(results) <= set(tags)

    async def run_deadline(self) -> None:
        """A message past its timeout: cancelled in the worker, MessageTimeout; the pool whole."""
        pool = self.pool
        before, pids = pool.stats(), pool.pids
        with pytest.raises(looppool.MessageTimeout):
            await pool.submit(("stall",), timeout=0.1)
        after = pool.stats()
        assert (after.timed_out - before.timed_out, after.failed - before.failed) == (1, 1)
        assert await self.probe() == []
        assert pool.pids == pids, "a deadline ends the message, not its worker"

    async def run_hang(self) -> None:
        """A loop blocked for ever: the worker is killed and replaced as if it had died.

        ``SafeWorker``: the message runs again (its fault, one-shot, is spent);
        ``Worker``: it fails with WorkerLost.
        """
        pool = self.pool
        before, pids, mark = pool.stats(), pool.pids, len(self.caplog.records)
        message = ("inject", fw.Fault("hang", token=self.token()), "sync")
        if self.safe:
            assert await pool.submit(message) == fw.SURVIVED
        else:
            with pytest.raises(looppool.WorkerLost):
                await pool.submit(message)
        assert pool.stats().hung - before.hung == 1
        self.assert_logged(mark, "hang_timeout", "time.sleep")
        results = await self.probe()
        assert results == ([fw.SURVIVED] if self.safe else [])
        self.check_replaced(pids, pool.stats().respawns - before.respawns, deaths=1)

    async def run_replacement_fails_to_start(self, kind: str, token: Path) -> None:
        """A worker dies; its replacement's initialise() fails once; the one after serves."""
        pool = self.pool
        arm(token)  # the next initialise() to remove it fails
        before, pids, mark = pool.stats(), pool.pids, len(self.caplog.records)
        trigger = ("inject", fw.Fault("_exit", token=self.token()), "sync")
        if self.safe:
            assert await pool.submit(trigger) == fw.SURVIVED
        else:
            with pytest.raises(looppool.WorkerLost):
                await pool.submit(trigger)
        results = await self.probe()
        assert results == ([fw.SURVIVED] if self.safe else [])
        assert fired(token), "no replacement met the fault"
        self.assert_logged(mark, "replacement of worker", "failed")
        self.check_replaced(pids, pool.stats().respawns - before.respawns, deaths=2)

    async def stop_with_finalise_faults(self, kinds: tuple[str, ...]) -> None:
        """finalise() faults in every worker: stop() returns, every message was processed."""
        pool = self.pool
        for k, kind in enumerate(kinds):
            assert await pool.submit(("arm-finalise", fw.Fault(kind)), worker=k) == "armed"
        tags = [f"last {i}" for i in range(2 * SIZE)]
        for tag in tags:
            await pool.put(("echo", tag))
        if not self.safe:
            await pool.drain()  # a Worker pool's stop drops what is still queued
        pids, mark = pool.pids, len(self.caplog.records)
        await pool.stop()
        assert sorted([tag async for _, tag in self.results]) == sorted(tags)
        for k, kind in enumerate(kinds):
            if kind == "raise":
                self.assert_logged(mark, f"[worker {k}]", "finalise() raised")
            else:
                code = fw.EXIT_CODES[kind]
                self.assert_logged(mark, f"worker {k} (pid {pids[k]})", "died", describe_exit(code))
        assert pool.pids == (None,) * SIZE


POOLS = [(method, name, dist) for method in METHODS for name in CLASSES for dist in DISTRIBUTIONS]
FINAL_FAULTS = ("raise", "exit", *fw.CRASHES)


def _catalogue_param(pool: tuple[str, str, str], exhaustive: bool) -> Any:
    if exhaustive:
        return pytest.param(*pool, True, id="-".join((*pool, "exhaustive")), marks=pytest.mark.slow)
    return pytest.param(*pool, False, id="-".join(pool))


@pytest.mark.parametrize(
    ("method", "worker_class", "distribution", "exhaustive"),
    [_catalogue_param(pool, exhaustive) for exhaustive in (False, True) for pool in POOLS],
)
async def test_fault_catalogue(
    method: str,
    worker_class: str,
    distribution: str,
    exhaustive: bool,
    loop_kind: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every fault in the catalogue gives its documented outcome and leaves the pool usable."""
    caplog.set_level(logging.INFO)
    index = POOLS.index((method, worker_class, distribution))
    # Rotate the kinds that cannot all meet in one pool, so that every start method meets each.
    replacement_fault = ("raise", "exit", fw.CRASHES[index // 3 % 3])[index % 3]
    final_faults = (FINAL_FAULTS[index % 5], FINAL_FAULTS[(index + 2) % 5])
    respawn_token = tmp_path / "replacement-fails"
    factory = functools.partial(
        CLASSES[worker_class], init_fault=fw.Fault(replacement_fault, token=str(respawn_token))
    )
    pool = looppool.Pool(
        factory,
        size=SIZE,
        start_method=method,
        loop=loop_kind,
        distribution=distribution,
        hang_timeout=HANG_TIMEOUT,
    )
    bench = Bench(pool, worker_class == "SafeWorker", distribution, tmp_path, caplog)
    try:
        async with deadline("start", pool):
            await pool.start()
        bench.remember()
        for case in catalogue(method, worker_class, distribution, exhaustive):
            async with deadline(case, pool):
                await bench.run(case)
        poison = ("exit", *fw.CRASHES)[index % 4]
        async with deadline(f"a poison message ({poison}) among neighbours", pool):
            await bench.run_poison(poison)
        async with deadline("a message past its deadline", pool):
            await bench.run_deadline()
        async with deadline("a loop blocked for ever (hang_timeout)", pool):
            await bench.run_hang()
        # Only the failed start depends on the start method, and the start tests cover it.
        if method == "fork" or exhaustive:
            what = f"{replacement_fault} while initialising a replacement worker"
            async with deadline(what, pool):
                await bench.run_replacement_fails_to_start(replacement_fault, respawn_token)
        async with deadline(f"{' and '.join(final_faults)} in finalise, at stop", pool):
            await bench.stop_with_finalise_faults(final_faults)
    finally:
        stopped = await shut(pool)
    assert stopped, "stop() hung or raised"
    assert_gone(list(bench.processes.values()), "after stop")


def _start_cases() -> list[Any]:
    """Every start method meets a raise, an exit and one kind of crash in initialise(), each with
    another (distribution, class) pair (the class hardly matters at start); the rest is slow."""
    pairs = [(dist, name) for dist in DISTRIBUTIONS for name in CLASSES]
    params = []
    for m, method in enumerate(METHODS):
        chosen = {
            (kind, *pairs[(m + f) % len(pairs)])
            for f, kind in enumerate(("raise", "exit", fw.CRASHES[m]))
        }
        for dist, name in pairs:
            for kind in ("raise", "exit", *fw.CRASHES):
                params.append(
                    pytest.param(
                        method,
                        dist,
                        name,
                        kind,
                        id=f"{method}-{dist}-{name}-{kind}",
                        marks=() if (kind, dist, name) in chosen else pytest.mark.slow,
                    )
                )
    return params


@pytest.mark.parametrize(("method", "distribution", "worker_class", "kind"), _start_cases())
async def test_fault_in_initialise_fails_start_and_leaves_no_process(
    method: str, distribution: str, worker_class: str, kind: str, loop_kind: str
) -> None:
    """A fault in one worker's initialise() makes start() raise WorkerStartError, cleanly."""
    factory = functools.partial(CLASSES[worker_class], init_fault=fw.Fault(kind), init_worker=1)
    pool = looppool.Pool(
        factory, size=SIZE, start_method=method, loop=loop_kind, distribution=distribution
    )
    async with deadline(f"{kind} in initialise", pool):
        with pytest.raises(looppool.WorkerStartError) as info:
            await pool.start()
        error = info.value
        assert error.number == 1
        if kind == "raise":
            assert error.reason.startswith("InjectedFault")
            assert "InjectedFault" in error.remote_traceback
        elif kind == "exit":
            assert error.reason == f"SystemExit: {fw.EXIT_CODE}"
            assert error.exitcode == fw.EXIT_CODE  # the process exits with sys.exit's status
        else:
            assert error.exitcode == fw.EXIT_CODES[kind]
            assert describe_exit(error.exitcode) in error.reason
        assert pool.pids == (None,) * SIZE
        await pool.stop()
        with pytest.raises(looppool.PoolClosed):
            await pool.put(("echo", "after"))


# -- faults that end the parent -----------------------------------------------------------------

PARENT_SCRIPT = """
import asyncio, faulthandler, sys
sys.path.insert(0, {tests!r})
import looppool
import fault_workers as fw
from fault_workers import Fault, Faulty

faulthandler.dump_traceback_later({deadline}, exit=True)  # a hang shows its stacks and ends


async def main():
    async with looppool.Pool(
        fw.SafeFaultWorker, size=2, start_method={method!r}, loop={loop!r}
    ) as pool:
        print(*pool.pids, flush=True)
        await pool.submit({message})
    print("the pool outlived the fault", flush=True)


if __name__ == "__main__":
    if {loop!r} == "uvloop":
        import uvloop
        factory = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
"""

PARENT_FAULTS = [
    pytest.param(
        "fork",
        "('result', 'unpickle', Fault('exit', where='parent'), 'sync')",
        fw.EXIT_CODE,
        id="exit-unpickling-a-result",
    ),
    pytest.param(
        "spawn",
        "('reply', 'unpickle', Fault('exit', where='parent'), 'async')",
        fw.EXIT_CODE,
        id="exit-unpickling-a-reply",
    ),
    pytest.param(
        "forkserver",
        "('raise', 'unpickle', Fault('exit', where='parent'), 'sync')",
        fw.EXIT_CODE,
        id="exit-unpickling-an-exception",
    ),
    pytest.param(
        "fork",
        "('result', 'unpickle', Fault('segv', where='parent'), 'async')",
        -signal.SIGSEGV,
        id="crash-unpickling-a-result",
    ),
    pytest.param(
        "spawn", "Faulty('pickle', Fault('segv'))", -signal.SIGSEGV, id="crash-pickling-a-message"
    ),
]


@pytest.mark.parametrize(("method", "message", "returncode"), PARENT_FAULTS)
def test_fault_that_ends_the_parent_leaves_no_worker(
    method: str, message: str, returncode: int, loop_kind: str
) -> None:
    """An exit or a crash in the parent ends it as asked; its workers end too, none is orphaned."""
    script = PARENT_SCRIPT.format(
        tests=str(TESTS),
        deadline=CASE_DEADLINE,
        method=method,
        loop=loop_kind,
        message=message,
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=2 * CASE_DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the parent hung:\n{err}")
    pids = [int(pid) for pid in out.split("\n")[0].split()]
    assert len(pids) == SIZE, err
    assert proc.returncode == returncode, err
    assert "outlived" not in out
    if returncode == fw.EXIT_CODE:
        # sys.exit unwinds the parent's loop: `async with` stops the pool rather than
        # leaving it to the exit-time killer.
        assert "was not stopped" not in err
    processes = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            processes.append(psutil.Process(pid))
    assert_gone(processes, "orphans")


# -- bugs found in the core: strict xfails while open, regression tests once fixed ---------------


class _OnLog(logging.Handler):
    """Calls ``callback`` with every record whose message contains ``text`` (in the loop thread)."""

    def __init__(self, text: str, callback: Callable[[], None]) -> None:
        super().__init__()
        self.text = text
        self.callback = callback

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.callback()


@contextlib.contextmanager
def on_log(text: str, callback: Callable[[], None]) -> Any:
    """While inside, call ``callback`` when the pool logs a line containing ``text``."""
    handler = _OnLog(text, callback)
    logger = logging.getLogger("looppool")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("worker_class", list(CLASSES))
async def test_exit_in_one_message_does_not_pass_the_others_off_as_stopped(
    worker_class: str, gate: pool_workers.Gate, loop_kind: str, tmp_path: Path
) -> None:
    """sys.exit in one message kills its worker: the others it held are lost or re-delivered."""
    safe = worker_class == "SafeWorker"
    pool = looppool.Pool(CLASSES[worker_class], size=1, start_method="fork", loop=loop_kind)
    try:
        async with deadline("exit beside a held message", pool):
            await pool.start()
            results = pool.results()
            held = asyncio.ensure_future(pool.submit(("hold", gate, "held")))
            assert await anext(results) == (0, "holding")
            token = tmp_path / "exit"
            arm(token)
            dying = asyncio.ensure_future(
                pool.submit(("inject", fw.Fault("exit", token=str(token)), "async"))
            )
            if safe:
                # Neither was alone when the worker died, so neither is
                # charged: each runs again, alone, on the replacement, the
                # older first (see Pool's poison-message rule).
                assert await anext(results) == (0, "holding")  # held runs again
                gate.open()
                assert await held == "held"
                assert await dying == fw.SURVIVED  # delivered again, its fault spent
            else:
                with pytest.raises(looppool.WorkerLost):
                    await dying
                with pytest.raises(looppool.WorkerLost):
                    await held
                assert pool.stats().lost == 2
    finally:
        gate.open()
        stopped = await shut(pool)
    assert stopped, "stop() hung or raised"


@pytest.mark.parametrize("worker_class", list(CLASSES))
async def test_barrier_worker_stopped_while_starting_is_sent_no_message(
    worker_class: str, gate: pool_workers.Gate, loop_kind: str, tmp_path: Path
) -> None:
    """A message for a worker told to stop while starting waits for the next generation.

    (A regression test: _on_ready() used to make such a worker READY again, and the parent sent
    it messages after its OP_STOP, then rescued them as if it had died.)
    """
    safe = worker_class == "SafeWorker"
    fails, dies = tmp_path / "fails", tmp_path / "dies"
    holds_init, holds_final = tmp_path / "holds-init", tmp_path / "holds-final"
    async with open_gate() as final_gate:
        factory = functools.partial(
            CLASSES[worker_class],
            init_fault=fw.Fault("raise", token=str(fails)),
            init_worker=0,
            holds={
                "initialise": (gate, str(holds_init)),
                "finalise": (final_gate, str(holds_final)),
            },
            hold_worker=1,
        )
        pool = looppool.Pool(
            factory, size=SIZE, start_method="fork", loop=loop_kind, distribution="barrier"
        )
        failed = asyncio.Event()
        try:
            async with deadline("a stop while starting", pool):
                await pool.start()
                results = pool.results()
                for token in (fails, dies, holds_init):
                    arm(token)  # for the next generation of workers
                with on_log("replacement of worker 0 failed", failed.set):
                    # A death: a new generation starts...
                    dying = asyncio.ensure_future(
                        pool.submit(
                            ("inject", fw.Fault("_exit", token=str(dies)), "sync"), worker=0
                        )
                    )
                    # ...whose worker 0 fails in initialise(), while worker 1 waits there: it is
                    # told to stop (and the generation restarts again).
                    await failed.wait()
                arm(holds_final)  # worker 1 of this generation will wait in finalise() too
                pool.put_nowait(("echo", "for worker 1"), worker=1)
                gate.open()
                # Worker 1 is ready, told to stop, and waits in finalise(): the parent has seen
                # its EV_READY (which came before this result), and has acted on it.
                assert await anext(results) == (1, "holding in initialise")
                assert await anext(results) == (1, "holding in finalise")
                final_gate.open()
                if safe:
                    assert await dying == fw.SURVIVED
                else:
                    with pytest.raises(looppool.WorkerLost):
                        await dying
                await pool.drain()
                stats = pool.stats()
                assert (stats.lost, stats.redelivered) == ((0, 1) if safe else (1, 0)), (
                    "only the message that killed worker 0 was lost or delivered again"
                )
                got = [await anext(results) for _ in range(1 + safe)]
                assert (1, "for worker 1") in got
        finally:
            gate.open()
            final_gate.open()
            stopped = await shut(pool)
        assert stopped, "stop() hung or raised"


async def test_exit_in_a_worker_loses_no_log_record(
    capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A worker ended by sys.exit still forwards its last log records, and prints no error."""
    # The worker's loop is asyncio's: uvloop reports the task before its loop closes.
    pool = looppool.Pool(fw.SafeFaultWorker, size=1, start_method="spawn", loop="asyncio")
    token = tmp_path / "exit"
    try:
        async with deadline("exit, then a log record", pool):
            await pool.start()
            arm(token)
            exiting = ("inject", fw.Fault("exit", token=str(token)), "async")
            assert await pool.submit(exiting) == fw.SURVIVED  # the second delivery survives
    finally:
        stopped = await shut(pool)
    assert stopped, "stop() hung or raised"
    assert "Logging error" not in capfd.readouterr().err


#: Generation restarts in a row in the test below. The race it guards against was met at about
#: one restart in five: twenty meet it in 99 runs in 100.
RESTARTS = 20


async def test_barrier_generation_restarts_close_the_old_queue_once(loop_kind: str) -> None:
    """Barrier mode: generation restart after generation restart completes; stop() returns.

    (A regression test: the parent closed the old shared queue's reader while the queue's feeder
    thread closed it too; the EBADF escaped _on_exit, abandoning the restart, or stop().)
    """
    pool = looppool.Pool(
        fw.FaultWorker, size=SIZE, start_method="fork", loop=loop_kind, distribution="barrier"
    )
    try:
        async with deadline("start", pool):
            await pool.start()
        for n in range(RESTARTS):
            async with deadline(f"generation restart {n}", pool):
                with pytest.raises(looppool.WorkerLost):
                    await pool.submit(("inject", fw.Fault("_exit"), "sync"))
                assert await pool.submit(("echo", n)) == n
    finally:
        stopped = await shut(pool)
    assert stopped, "stop() hung or raised"
