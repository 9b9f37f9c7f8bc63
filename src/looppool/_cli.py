"""The ``looppool`` command line: ``run``, ``bench`` and ``demo``.

``looppool run MODULE:WORKER`` feeds JSON lines to a pool and writes what the
workers send back as JSON lines::

    stdin / -i FILE ──► reader thread: chunks ──► json.loads, line by line
                                                      │
                              pool.put(message)  ◄────┘  (--ordered: pool.submit,
                                    │                      a window of replies)
    stdout / -o FILE ◄── json.dumps ◄── on_result(value)  (--ordered: each reply,
                                                           in input order)

A line that is not JSON is named on stderr (the first 20 of them), skipped,
and counted; the run goes on. Every run that started its pool ends with one
summary line on stderr, written after the output is flushed: messages sent
to the pool, processed, failed and lost, bad lines skipped, lines written;
after an early stop, what stopped it and the last input line read.

The first Ctrl-C or SIGTERM stops reading, starts no queued message, lets the
messages in flight finish (``SafeWorker``; a ``Worker`` cancels them) and
writes what they return; a second one kills the workers. With ``--ordered``,
replies are then written in input order up to the first message that was not
processed.

Exit status: 0 when every message was processed; 1 when some message failed
(its exception is logged with the worker's traceback), was lost with a dead
worker, or some line was skipped; 2 for a mistake in what was asked (a bad
``MODULE:WORKER``, a result that is not JSON-serialisable, a worker that
failed to start); 130 after Ctrl-C, 143 after SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, TextIO

from . import __version__
from ._console import REDRAW_INTERVAL, CliError, ProgressBar
from ._console import loop_factory as make_loop_factory
from ._errors import LooppoolError, PoolClosed, WorkerLost, WorkerStartError
from ._pool import Pool, PoolStats
from ._worker import Worker

__all__ = ["CliError", "load_worker", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM

_PROG = "looppool"
#: Bytes asked of the input stream per read; ``read1`` returns what is there.
_READ_CHUNK = 1 << 16
#: Chunks the reader thread may read ahead of the loop (its backpressure).
_CHUNKS_AHEAD = 4
#: ``--ordered`` keeps at most this many submits in flight per worker.
_ORDERED_WINDOW_PER_WORKER = 256
#: Bad input lines named one by one on stderr; the others are only counted.
_BAD_LINES_SHOWN = 20


# ---------------------------------------------------------------------------
# MODULE:WORKER


def _put_cwd_on_path() -> None:
    """Make modules in the current directory importable, as ``python -m`` does.

    The ``looppool`` console script has its own directory as ``sys.path[0]``.
    Workers started with "spawn" or "forkserver" receive the parent's
    ``sys.path`` (``multiprocessing`` sends it along), so this is enough for
    them to import the module too — as long as it runs before the pool starts.
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_worker(spec: str) -> Callable[[], Worker]:
    """Return the worker factory that ``MODULE:WORKER`` names, or raise :class:`CliError`.

    ``WORKER`` is a :class:`~looppool.Worker` subclass (a dotted path such as
    ``Outer.Inner`` is followed), or a zero-argument callable returning a
    ``Worker`` (such as a ``functools.partial``), which is called once here to
    check it. The current directory is importable.
    """
    return _load_worker(spec)[0]


def _load_worker(spec: str) -> tuple[Callable[[], Worker], bool]:
    """:func:`load_worker`, and whether its workers are ``SafeWorker`` ones."""
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise CliError(f"{spec!r} is not MODULE:WORKER (for example mymodule:MyWorker)")
    _put_cwd_on_path()
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        hint = ""
        if module_name.endswith(".py") or os.sep in module_name:
            hint = " (give a module name, not a file name: run from its directory, without '.py')"
        raise CliError(f"cannot import module {module_name!r}: {_one_line(exc)}{hint}") from exc
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CliError(f"module {module_name!r} has no attribute {attr_path!r}") from None
    if isinstance(obj, type):
        if not issubclass(obj, Worker):
            raise CliError(
                f"{spec} is the class {obj.__module__}.{obj.__qualname__}, "
                "not a subclass of looppool.Worker"
            )
        if obj.process_message is Worker.process_message:
            raise CliError(f"{spec} does not override process_message(self, message)")
        return obj, obj.safe
    if callable(obj):
        try:
            worker = obj()
        except Exception as exc:
            raise CliError(f"{spec}() raised {_one_line(exc)}") from exc
        if not isinstance(worker, Worker):
            raise CliError(
                f"{spec} is a callable that returned {type(worker).__qualname__}, "
                "not a looppool.Worker"
            )
        factory: Callable[[], Worker] = obj
        return factory, worker.safe
    raise CliError(f"{spec} is {type(obj).__name__} {obj!r:.60}, not a looppool.Worker subclass")


# ---------------------------------------------------------------------------
# JSON lines in


class Readable(Protocol):
    """A binary stream that can return what it has at once (``read1``)."""

    def read1(self, size: int, /) -> bytes:
        """Up to ``size`` bytes, after at most one read of the source; ``b""`` at the end."""
        ...


class _FdReader:
    """Reads a file descriptor with ``os.read``: no lock of Python's io layer held.

    Used for stdin. A thread blocked in ``sys.stdin.buffer.read1()`` holds the
    buffer's lock, and the interpreter, closing stdin at exit, would abort
    ("could not acquire lock ... at interpreter shutdown").
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read1(self, size: int, /) -> bytes:
        """Up to ``size`` bytes, as soon as some are there."""
        return os.read(self.fd, size)


class _ChunkReader:
    """Reads a binary stream in a daemon thread and hands its chunks to the loop.

    A daemon thread of its own rather than ``asyncio.to_thread``: a read
    blocked on a terminal or an idle pipe cannot be interrupted, and
    ``asyncio.run`` joins the default executor's threads on the way out, so
    an error or Ctrl-C would wait for the user's next line. ``read1`` returns
    what the stream has at once, so lines typed one by one are not held back.
    The thread reads at most ``_CHUNKS_AHEAD`` chunks ahead of the loop.
    """

    def __init__(self, stream: Readable, name: str) -> None:
        self._stream = stream
        self._name = name
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[bytes | BaseException] = asyncio.Queue()
        self._room = threading.Semaphore(_CHUNKS_AHEAD)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="looppool-cli-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        read = self._stream.read1
        while True:
            self._room.acquire()
            if self._closed:
                return
            item: bytes | BaseException
            try:
                item = read(_READ_CHUNK)
            except Exception as exc:
                item = exc
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody will read any more
                return
            if not isinstance(item, bytes) or not item:
                return

    async def read(self) -> bytes:
        """The next chunk; ``b""`` at the end of the stream."""
        item = await self._queue.get()
        self._room.release()
        if isinstance(item, BaseException):
            raise CliError(f"cannot read {self._name}: {_one_line(item)}") from item
        return item

    def close(self) -> None:
        """Let the thread end if it waits for room (a blocked read stays blocked)."""
        self._closed = True
        self._room.release()


def _decode(line: bytes) -> Any:
    """The message on ``line``; ``ValueError`` saying why if it is not one."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc.msg} (column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8: {exc.reason}") from None


async def read_messages(
    stream: Readable, name: str, on_bad_line: Callable[[int, str], None] | None = None
) -> AsyncGenerator[tuple[int, Any], None]:
    """Yield ``(line number, message)`` for each non-blank JSON line of ``stream``.

    A line that is not JSON is passed to ``on_bad_line(line number, why)`` and
    skipped; without ``on_bad_line`` it raises :class:`CliError`.
    """
    reader = _ChunkReader(stream, name)
    lineno = 0
    pending: list[bytes] = []

    def bad(lineno: int, why: str) -> None:
        if on_bad_line is None:
            raise CliError(f"line {lineno} of {name} is {why}")
        on_bad_line(lineno, why)

    try:
        while chunk := await reader.read():
            if b"\n" not in chunk:
                pending.append(chunk)
                continue
            pending.append(chunk)
            lines = b"".join(pending).split(b"\n")
            pending = [lines.pop()]
            for line in lines:
                lineno += 1
                if line.strip():
                    try:
                        message = _decode(line)
                    except ValueError as exc:
                        bad(lineno, str(exc))
                    else:
                        yield lineno, message
        last = b"".join(pending)
        if last.strip():
            try:
                message = _decode(last)
            except ValueError as exc:
                bad(lineno + 1, str(exc))
            else:
                yield lineno + 1, message
    finally:
        reader.close()


def count_messages(path: str) -> int:
    """Count the non-blank lines of the file at ``path`` (for the progress bar)."""
    with open(path, "rb") as file:
        return sum(1 for line in file if line.strip())


# ---------------------------------------------------------------------------
# JSON lines out


class _Output:
    """Writes values as JSON lines; flushes once per loop iteration that wrote."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.written = 0
        self._flush_scheduled = False

    def write(self, value: Any, what: Callable[[], str]) -> None:
        try:
            text = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise CliError(f"{what()} is not JSON-serialisable: {_one_line(exc)}") from None
        self.stream.write(text + "\n")
        self.written += 1
        # Flushing after every line costs a system call per result; never
        # flushing holds results back from a pipeline until the end. A flush
        # scheduled with call_soon runs once the burst of ready callbacks is
        # over, i.e. when the results stop arriving for a moment.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        with contextlib.suppress(OSError, ValueError):
            self.stream.flush()


# ---------------------------------------------------------------------------
# looppool run


@dataclass(frozen=True)
class RunSummary:
    """What ``looppool run`` did: counts taken from ``pool.stats()``, and the time.

    ``messages`` were sent to the pool, ``processed + failed + lost`` of them
    ended (all of them, once the pool has stopped); ``skipped`` input lines
    were not valid JSON; ``written`` output lines. ``stopped_by`` says what
    stopped the run early (``None``: it read its whole input), and
    ``last_line`` is the last input line it sent to the pool or skipped.
    """

    messages: int
    processed: int
    failed: int
    lost: int
    skipped: int
    written: int
    elapsed: float
    input_name: str = "<stdin>"
    last_line: int = 0
    stopped_by: str | None = None

    def line(self) -> str:
        """The summary line written on stderr."""
        rate = self.messages / self.elapsed if self.elapsed > 0 else 0.0
        head = f"{_PROG}: "
        if self.stopped_by is not None and self.last_line == 0:
            head += f"stopped by {self.stopped_by} before reading any input: "
        elif self.stopped_by is not None:
            head += (
                f"stopped by {self.stopped_by}, input read to line {self.last_line:,} "
                f"of {self.input_name}: "
            )
        return (
            f"{head}{_plural(self.messages, 'message')}: {self.processed:,} processed, "
            f"{self.failed:,} failed, {self.lost:,} lost; "
            f"{_plural(self.skipped, 'bad line')} skipped; {_plural(self.written, 'line')} "
            f"written in {self.elapsed:.2f} s ({rate:,.0f} messages/s)"
        )


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def _discard(value: Any) -> None:
    """``on_result`` of ``--ordered``: results from ``put_result`` are not written."""


class _ResultWriter:
    """The pool's ``on_result``: writes each result as a JSON line.

    A value that cannot be written is reported to ``on_error`` (which stops
    the run) and left out; the values after it are still written, so that
    what the workers finished reaches the output.
    """

    def __init__(self, out: _Output, on_error: Callable[[CliError], None]) -> None:
        self.out = out
        self.on_error = on_error

    def __call__(self, value: Any) -> None:
        try:
            self.out.write(value, lambda: f"result {self.out.written + 1}")
        except CliError as exc:
            self.on_error(exc)


class _OrderedReplies:
    """``--ordered``: each line's reply, written in input order as soon as it can be.

    Each submit's future is kept in input order; whenever the oldest is done,
    its reply is written (a failed message is named on stderr instead), and
    so on while the next one is done too. After a stop, a message that was
    not processed (dropped, or lost with a killed worker) is a gap: nothing
    after it is written, so that the output keeps the input order; the run
    names that line and counts the replies left out.
    """

    def __init__(
        self, out: _Output, err: TextIO, on_error: Callable[[CliError], None], window: int
    ) -> None:
        self.out = out
        self.err = err
        self.on_error = on_error
        self.window = window
        self.pending: collections.deque[tuple[int, asyncio.Future[Any]]] = collections.deque()
        #: Set once the run stops early: from then on an unprocessed message is a gap.
        self.stopping = False
        #: The line of the first message that was not processed, after a stop.
        self.gap: int | None = None

    def add(self, lineno: int, future: asyncio.Future[Any]) -> None:
        """Keep the submit of line ``lineno``; its reply is written in its turn."""
        self.pending.append((lineno, future))
        future.add_done_callback(self._advance)

    async def wait_for_room(self) -> None:
        """Wait while ``window`` submits are pending (the oldest one holds the others)."""
        while len(self.pending) >= self.window:
            # _advance, added as a callback before this wait's, runs first.
            await asyncio.wait([self.pending[0][1]])

    def _advance(self, _: object = None) -> None:
        pending = self.pending
        while self.gap is None and pending and pending[0][1].done():
            lineno, future = pending.popleft()
            self._write(lineno, future)

    def _write(self, lineno: int, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            error: BaseException | None = asyncio.CancelledError()
        else:
            error = future.exception()
        if error is None:
            try:
                self.out.write(future.result(), lambda: f"the reply to line {lineno}")
            except CliError as exc:
                self.on_error(exc)
            return
        if self.stopping and isinstance(error, (PoolClosed, WorkerLost, asyncio.CancelledError)):
            self.gap = lineno
            return
        # The pool has logged the worker's traceback; this names the line.
        self.err.write(f"{_PROG}: line {lineno} failed: {_one_line(error)}\n")

    def left_out(self) -> int:
        """Replies computed after the gap, so not written (call once every submit is done)."""
        return sum(1 for _, f in self.pending if not f.cancelled() and f.exception() is None)


class _Interrupted(Exception):
    """Raised out of ``async with pool`` to stop it without starting queued messages."""


@dataclass(frozen=True)
class _RunOptions:
    factory: Callable[[], Worker]
    safe: bool
    size: int | None
    loop: str
    start_method: str | None
    concurrency: int | None
    ordered: bool
    input_name: str
    total: int | None


_SIGNAL_NAMES: Final = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
_SIGNAL_EXIT: Final = {"Ctrl-C": EXIT_INTERRUPTED, "SIGTERM": EXIT_TERMINATED}


class _Run:
    """One ``looppool run``: feeds the pool, writes what comes back, stops as asked.

    Stopping, whatever asks for it, happens in at most two steps::

        running ── 1st Ctrl-C or SIGTERM, or a result ──► stopping: no more input, no
                   that cannot be written                 queued message starts; those
                                                          in flight finish (SafeWorker)
                                                          or are cancelled (Worker);
                                                          results keep being written
        stopping ── 2nd Ctrl-C or SIGTERM ──────────────► killing: the workers are
                                                          killed, their messages lost

    Either way the output is flushed and the summary line written.
    """

    def __init__(self, opts: _RunOptions, source: Readable, out: _Output, err: TextIO) -> None:
        self.opts = opts
        self.source = source
        self.out = out
        self.err = err
        self.skipped = 0
        self.last_line = 0  # the last line sent to the pool or skipped
        self.signals: list[str] = []
        #: 0 running, 1 stopping, 2 killing (see the class docstring).
        self.stage = 0
        #: The first result that could not be written: the run stops, exit status 2.
        self.error: CliError | None = None
        self.pool: Pool | None = None
        self.started = False  # the pool has started
        self.stopping = False  # the life task is in the pool's stop, or about to be
        self.body: asyncio.Task[None] | None = None
        self.life: asyncio.Task[None] | None = None
        self.stop_task: asyncio.Task[None] | None = None
        self.replies: _OrderedReplies | None = None
        self.writer = _ResultWriter(out, self._fail)
        self._stopped_by: str | None = None

    async def run(self) -> RunSummary:
        """Run until the input ends and every message is done, or a stop; then summarise."""
        opts = self.opts
        kwargs: dict[str, Any] = {"size": opts.size, "loop": opts.loop}
        if opts.start_method is not None:
            kwargs["start_method"] = opts.start_method
        if opts.concurrency is not None:
            kwargs["concurrency"] = opts.concurrency
        kwargs["on_result"] = _discard if opts.ordered else self.writer
        try:
            pool = self.pool = Pool(opts.factory, **kwargs)
        except (TypeError, ValueError) as exc:  # e.g. a factory "spawn" cannot pickle
            raise CliError(str(exc)) from exc
        if opts.ordered:
            window = _ORDERED_WINDOW_PER_WORKER * pool.size
            self.replies = _OrderedReplies(self.out, self.err, self._fail, window)
        bar = ProgressBar(self.err, total=opts.total)
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        self.life = asyncio.create_task(self._life(bar))
        handled = self._handle_signals(loop)
        try:
            await self.life
        except _Interrupted:
            pass
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this run itself was cancelled, not its life by a signal
        except LooppoolError as exc:
            if not self.started:
                raise  # WorkerStartError: main() reports it
            self._fail(CliError(str(exc)))  # PoolBroken: workers kept dying
        except CliError as exc:  # the input could not be read
            self._fail(exc)
        finally:
            for signum in handled:
                loop.remove_signal_handler(signum)
            if self.stop_task is not None:
                # Done once the life is (the pool is stopped); a kill cancelled it.
                await asyncio.gather(self.stop_task, return_exceptions=True)
            bar.update(self._done(pool.stats()))
            bar.close()
        if self.replies is not None and self.replies.pending:
            # After a stop, submits still settle (PoolClosed for the dropped
            # ones): let the replies' callbacks see every one of them.
            await asyncio.wait([future for _, future in self.replies.pending])
        if self.replies is not None and self.replies.gap is not None:
            self.err.write(
                f"{_PROG}: --ordered: line {self.replies.gap} was not processed: replies "
                f"are written up to the line before it; {self.replies.left_out():,} later "
                "replies are left out, to keep the input order\n"
            )
        stats = pool.stats()
        return RunSummary(
            messages=stats.put,
            processed=stats.processed,
            failed=stats.failed,
            lost=stats.lost,
            skipped=self.skipped,
            written=self.out.written,
            elapsed=time.monotonic() - started,
            input_name=opts.input_name,
            last_line=self.last_line,
            stopped_by=self._stopped_by,
        )

    def exit_status(self, summary: RunSummary) -> int:
        """2 after an error, 130 (Ctrl-C) or 143 (SIGTERM) after a signal, else 1 or 0."""
        if self.error is not None:
            return EXIT_USAGE
        if self.signals:
            return _SIGNAL_EXIT[self.signals[0]]
        return EXIT_FAILED if summary.failed or summary.lost or summary.skipped else EXIT_OK

    @staticmethod
    def _done(stats: PoolStats) -> int:
        return stats.processed + stats.failed + stats.lost

    async def _life(self, bar: ProgressBar) -> None:
        pool = self.pool
        assert pool is not None
        redraw: asyncio.Task[None] | None = None
        try:
            # A signal while the pool starts cancels this task: start() ends
            # the workers it started.
            async with pool:
                self.started = True
                if bar.enabled:
                    redraw = asyncio.create_task(self._redraw_forever(bar, pool))
                cut_short = await self._serve(pool)
                # Nothing awaits from here into the pool's stop (in __aexit__):
                # a kill that comes from now on finds this task inside the
                # stop, where cancelling it kills the workers.
                self.stopping = True
                if self.stage >= 2 and self.stop_task is None:
                    # A kill came while the feeding was being cancelled, too
                    # early to cancel the stop: cancel it now. The request is
                    # delivered at the stop's first wait.
                    task = asyncio.current_task()
                    assert task is not None
                    task.cancel()
                if cut_short:
                    # Stop without starting queued messages: those in flight
                    # finish (SafeWorker) or are cancelled (Worker).
                    raise _Interrupted
        finally:
            if redraw is not None:
                redraw.cancel()

    async def _serve(self, pool: Pool) -> bool:
        """Feed the pool until the input ends and all is done; ``True`` if a stop cut it short."""
        self.body = asyncio.create_task(self._feed(pool))
        try:
            await self.body
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the run itself was cancelled
            return True  # a signal, or a result that cannot be written, cancelled the feeding
        return self.error is not None

    async def _feed(self, pool: Pool) -> None:
        messages = read_messages(self.source, self.opts.input_name, self._skip)
        try:
            if self.replies is not None:
                replies = self.replies
                async for lineno, message in messages:
                    await replies.wait_for_room()
                    replies.add(lineno, asyncio.ensure_future(pool.submit(message)))
                    self.last_line = lineno
                if replies.pending:
                    await asyncio.wait([future for _, future in replies.pending])
            else:
                async for lineno, message in messages:
                    await pool.put(message)
                    self.last_line = lineno
                # Before the stop: a plain Worker's stop() cancels what is in flight.
                await pool.drain()
        finally:
            await messages.aclose()

    def _skip(self, lineno: int, reason: str) -> None:
        """A line that is not a message: name it (the first few), count it, go on."""
        self.skipped += 1
        self.last_line = lineno
        if self.skipped <= _BAD_LINES_SHOWN:
            self.err.write(f"{_PROG}: line {lineno} of {self.opts.input_name} skipped: {reason}\n")
        if self.skipped == _BAD_LINES_SHOWN:
            self.err.write(f"{_PROG}: more bad lines are counted in the summary, not named\n")

    def _fail(self, error: CliError) -> None:
        """A result or reply that cannot be written: report it, and stop the run (once)."""
        self.err.write(f"{_PROG}: error: {error}\n")
        if self.error is None:
            self.error = error
            if self.stage == 0:
                self._stopped_by = "an error"
                self._step(None)

    def _handle_signals(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        # Signal handlers can only be set from the main thread; main() called
        # from another thread leaves SIGINT and SIGTERM as they are.
        if threading.current_thread() is not threading.main_thread():
            return []
        handled: list[int] = []
        for signum in _SIGNAL_NAMES:
            loop.add_signal_handler(signum, self._signalled, signum)
            handled.append(signum)
        return handled

    def _signalled(self, signum: int) -> None:
        assert self.life is not None
        if self.life.done():
            return  # the run is over: nothing left to stop
        name = _SIGNAL_NAMES[signal.Signals(signum)]
        self.signals.append(name)
        if self.stage == 0:
            self._stopped_by = name
        self._step(name)

    def _step(self, cause: str | None) -> None:
        """Move the run one step on: running → stopping → killing (see the class)."""
        assert self.life is not None
        if self.stage >= 2 or self.life.done():
            return
        self.stage += 1
        prefix = f"{_PROG}: {cause}: " if cause else f"{_PROG}: "
        if self.stage == 2:
            self.err.write(f"{prefix}killing the workers\n")
            self.err.flush()
            # Cancelling the task that is inside the pool's stop (or start)
            # kills the workers. The stop task began its stop before this
            # signal could be handled (see below); a life task that has not
            # begun its stop yet cancels itself when it does (_life).
            if self.stop_task is not None:
                self.stop_task.cancel()
            elif not self.started or self.stopping:
                self.life.cancel()
            return
        if cause is None:
            again = "Ctrl-C to kill"
        elif cause == "Ctrl-C":
            again = "Ctrl-C again to kill"
        else:
            again = f"{cause} or Ctrl-C again to kill"
        if self.replies is not None:
            self.replies.stopping = True
        if not self.started or self.pool is None:
            self.err.write(f"{prefix}stopping\n")
            self.err.flush()
            self.life.cancel()  # start() ends the workers it started
            return
        in_flight = sum(self.pool.stats().in_flight)
        if in_flight == 0:
            if cause is not None:
                self.err.write(f"{prefix}stopping: no message in flight\n")
        else:
            verb = "waiting for" if self.opts.safe else "cancelling"
            self.err.write(f"{prefix}stopping: {verb} {_plural(in_flight, 'message')}; {again}\n")
        self.err.flush()
        if self.stopping or self.body is None or self.body.done():
            return  # the input is all in: the pool's stop is under way, or about to be
        self.body.cancel()
        # The stop starts in the next loop turn, before the I/O of that turn
        # is handled: no reply that comes now can free a worker for a queued
        # message first (the feeding task, being cancelled, could take a few
        # turns). A second signal, also I/O, comes after this task's first
        # step, which goes into the pool's stop without waiting.
        self.stop_task = asyncio.create_task(self._stop_now(self.pool))

    @staticmethod
    async def _stop_now(pool: Pool) -> None:
        """Stop ``pool`` as an exception out of ``async with pool`` does: no queued
        message starts; those in flight finish (SafeWorker) or are cancelled (Worker)."""
        await pool.__aexit__(_Interrupted, _Interrupted(), None)

    @staticmethod
    async def _redraw_forever(bar: ProgressBar, pool: Pool) -> None:
        # A display refreshed ten times a second, like any progress bar;
        # nothing waits on it. It only runs when stderr is a terminal.
        while True:
            await asyncio.sleep(REDRAW_INTERVAL)
            bar.update(_Run._done(pool.stats()))


@contextlib.contextmanager
def _stderr_logging(err: TextIO) -> Iterator[None]:
    """Show warnings and errors (worker tracebacks included) on ``err``.

    Only when the program has not configured logging itself (``main()`` may
    be called from one that has); the handler is removed afterwards.
    """
    root = logging.getLogger()
    if root.handlers:
        yield
        return
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter(f"{_PROG}: %(levelname)s: %(name)s: %(message)s"))
    handler.setLevel(logging.WARNING)
    root.addHandler(handler)
    old_level = root.level
    if root.level > logging.WARNING or root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def _open_input(path: str | None, stack: contextlib.ExitStack) -> tuple[Readable, str]:
    if path is None or path == "-":
        try:
            return _FdReader(sys.stdin.fileno()), "<stdin>"
        except (AttributeError, OSError, ValueError):  # replaced by a program or a test
            stdin: Any = sys.stdin
            if stdin is None:
                raise CliError("there is no standard input: give -i FILE") from None
            stream: Readable = getattr(stdin, "buffer", stdin)
            return stream, "<stdin>"
    try:
        return stack.enter_context(open(path, "rb")), path
    except OSError as exc:
        raise CliError(f"cannot open input file {path!r}: {exc.strerror or exc}") from None


def _open_output(path: str | None, stack: contextlib.ExitStack) -> TextIO:
    if path is None or path == "-":
        stream = sys.stdout
    else:
        try:
            stream = stack.enter_context(open(path, "w", encoding="utf-8"))  # noqa: SIM115
        except OSError as exc:
            raise CliError(f"cannot open output file {path!r}: {exc.strerror or exc}") from None

    def flush() -> None:
        with contextlib.suppress(OSError, ValueError):
            stream.flush()

    stack.callback(flush)
    return stream


def _command_run(ns: argparse.Namespace) -> int:
    err = sys.stderr
    factory, safe = _load_worker(ns.worker)
    loop_factory = make_loop_factory(ns.loop)
    with contextlib.ExitStack() as stack:
        source, input_name = _open_input(ns.input, stack)
        total = None
        if input_name == ns.input and ProgressBar(err).enabled and os.path.isfile(ns.input):
            total = count_messages(ns.input)  # for the ETA
        out = _Output(_open_output(ns.output, stack))
        opts = _RunOptions(
            factory=factory,
            safe=safe,
            size=ns.size,
            loop=ns.loop,
            start_method=ns.start_method,
            concurrency=ns.concurrency,
            ordered=ns.ordered,
            input_name=input_name,
            total=total,
        )
        with _stderr_logging(err), asyncio.Runner(loop_factory=loop_factory) as runner:
            run = _Run(opts, source, out, err)
            try:
                summary = runner.run(run.run())
            except WorkerStartError as exc:
                # The reason in one line, then the worker's traceback.
                raise CliError(str(exc)) from exc
    # After the output's flush (the ExitStack), so that it is all there.
    err.write(summary.line() + "\n")
    err.flush()
    return run.exit_status(summary)


# ---------------------------------------------------------------------------
# looppool bench, looppool demo


def _command_bench(args: list[str]) -> int:
    # Imported here: the benchmarks pull in more than the rest of the CLI needs.
    try:
        bench = importlib.import_module("looppool._bench")
    except ModuleNotFoundError as exc:
        if exc.name not in ("looppool._bench",):
            raise
        raise CliError("the benchmarks (looppool._bench) are not part of this install") from exc
    status = bench.main(args)
    return int(status) if status is not None else EXIT_OK


def _command_demo(ns: argparse.Namespace) -> int:
    from . import _demo

    return _demo.run_demo(pages=ns.pages, size=ns.size, quick=ns.quick, loop=ns.loop)


# ---------------------------------------------------------------------------
# The parser and main()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def make_parser() -> argparse.ArgumentParser:
    """The ``looppool`` argument parser (its sub-commands: run, bench, demo)."""
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Run a pool of worker processes, each with its own asyncio event loop.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="feed JSON lines to a pool of workers; write their results as JSON lines",
        description=(
            "Read JSON lines (one message each) and feed them to a pool of WORKER "
            "processes; write every result the workers send with put_result() as a "
            "JSON line. The current directory is importable. A line that is not JSON "
            "is named on stderr and skipped. The first Ctrl-C or SIGTERM stops reading "
            "and lets the messages in flight finish; a second one kills the workers. "
            "Exit status: 0 all processed, 1 some message failed or was lost or some "
            "line skipped, 2 a usage error, 130 Ctrl-C, 143 SIGTERM."
        ),
    )
    run.add_argument(
        "worker",
        metavar="MODULE:WORKER",
        help="a looppool.Worker subclass (or a factory returning one), e.g. mymod:Fetch",
    )
    run.add_argument(
        "-n",
        "--size",
        type=_positive_int,
        metavar="SIZE",
        help="number of worker processes (default: the number of CPUs)",
    )
    run.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="the workers' event loop (default: auto, uvloop if installed)",
    )
    run.add_argument(
        "-i", "--input", metavar="FILE", help="read messages from FILE (default: stdin)"
    )
    run.add_argument(
        "-o", "--output", metavar="FILE", help="write results to FILE (default: stdout)"
    )
    run.add_argument(
        "--ordered",
        action="store_true",
        help=(
            "submit each message and write its reply (what process_message returns), "
            "in input order; put_result() values are not written"
        ),
    )
    run.add_argument(
        "--start-method",
        choices=("fork", "spawn", "forkserver"),
        help="how worker processes start (default: the platform's)",
    )
    run.add_argument(
        "--concurrency",
        type=_positive_int,
        metavar="N",
        help="most messages in flight at once in one worker",
    )

    commands.add_parser(
        "bench",
        help="run the standard benchmarks (looppool bench --help for their options)",
        add_help=False,
    )

    demo = commands.add_parser(
        "demo",
        help="crawl a local generated site with one process, then with a pool",
        description=(
            "Start a local web site (127.0.0.1, in its own process), crawl it with one "
            "worker inline on one event loop, then with a pool of worker processes, and "
            "compare pages/s. Needs aiohttp (pip install 'looppool[demo]')."
        ),
    )
    demo.add_argument(
        "--pages", type=_positive_int, metavar="N", help="pages on the site (default: 3000)"
    )
    demo.add_argument(
        "--size",
        type=_positive_int,
        metavar="N",
        help="worker processes of the pool (default: the number of CPUs)",
    )
    demo.add_argument(
        "--quick", action="store_true", help="a small site (400 pages) for a quick look"
    )
    demo.add_argument(
        "--loop", choices=("auto", "asyncio", "uvloop"), default="auto", help="event loop kind"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``looppool`` command line with ``argv`` (default: ``sys.argv[1:]``).

    Returns the exit status rather than exiting: 0 success, 1 some message
    failed or was lost or some input line skipped, 2 a usage error (reported
    as one line on stderr), 130 Ctrl-C, 143 SIGTERM.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        # bench parses its own options (its --help included).
        if args[:1] == ["bench"]:
            return _command_bench(args[1:])
        ns = make_parser().parse_args(args)
        if ns.command == "run":
            return _command_run(ns)
        return _command_demo(ns)
    except CliError as exc:
        sys.stderr.write(f"{_PROG}: error: {exc}\n")
        return EXIT_USAGE
    except SystemExit as exc:  # argparse: --help, --version and usage errors
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_USAGE)
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{_PROG}: interrupted\n")
        return EXIT_INTERRUPTED
