"""The ``looppool`` command line: ``run``, ``bench`` and ``demo``.

``looppool run MODULE:WORKER`` feeds JSON lines to a pool and writes what the
workers send back as JSON lines::

    stdin / -i FILE ──► reader thread: chunks ──► json.loads, line by line
                                                      │
                              pool.put(message)  ◄────┘  (--ordered: pool.submit,
                                    │                      a window of replies)
    stdout / -o FILE ◄── json.dumps ◄── on_result(value)  (--ordered: each reply,
                                                           in input order)

Exit status: 0 when every message was processed; 1 when some message failed
(its exception is logged with the worker's traceback) or was lost with a dead
worker; 2 for a mistake in what was asked (a bad ``MODULE:WORKER``, bad JSON
on a line, a result that is not JSON-serialisable, a worker that failed to
start); 130 after Ctrl-C.
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
import sys
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

from . import __version__
from ._console import REDRAW_INTERVAL, CliError, ProgressBar
from ._console import loop_factory as make_loop_factory
from ._errors import WorkerStartError
from ._pool import Pool, PoolStats
from ._worker import Worker

__all__ = ["CliError", "load_worker", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_PROG = "looppool"
#: Bytes asked of the input stream per read; ``read1`` returns what is there.
_READ_CHUNK = 1 << 16
#: Chunks the reader thread may read ahead of the loop (its backpressure).
_CHUNKS_AHEAD = 4
#: ``--ordered`` keeps at most this many submits in flight per worker.
_ORDERED_WINDOW_PER_WORKER = 256


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
        return obj
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
        return factory
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


def _decode(line: bytes, lineno: int, name: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise CliError(
            f"line {lineno} of {name} is not valid JSON: {exc.msg} (column {exc.colno})"
        ) from None
    except UnicodeDecodeError as exc:
        raise CliError(f"line {lineno} of {name} is not valid UTF-8: {exc.reason}") from None


async def read_messages(stream: Readable, name: str) -> AsyncGenerator[tuple[int, Any], None]:
    """Yield ``(line number, message)`` for each non-blank JSON line of ``stream``."""
    reader = _ChunkReader(stream, name)
    lineno = 0
    pending: list[bytes] = []
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
                    yield lineno, _decode(line, lineno, name)
        last = b"".join(pending)
        if last.strip():
            yield lineno + 1, _decode(last, lineno + 1, name)
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
    """What ``looppool run`` did: counts taken from ``pool.stats()``, and the time."""

    messages: int
    processed: int
    failed: int
    lost: int
    written: int
    elapsed: float

    def line(self) -> str:
        """The summary line written on stderr."""
        rate = self.messages / self.elapsed if self.elapsed > 0 else 0.0
        return (
            f"{_PROG}: {_plural(self.messages, 'message')}: {self.processed:,} processed, "
            f"{self.failed:,} failed, {self.lost:,} lost; {_plural(self.written, 'line')} "
            f"written in {self.elapsed:.2f} s ({rate:,.0f} messages/s)"
        )


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def _counts(stats: PoolStats) -> tuple[int, int, int]:
    """``(processed, failed, lost)`` from a ``pool.stats()`` snapshot."""
    return stats.processed, stats.failed, stats.lost


def _discard(value: Any) -> None:
    """``on_result`` of ``--ordered``: results from ``put_result`` are not written."""


async def _redraw_forever(bar: ProgressBar, pool: Pool) -> None:
    # A display refreshed ten times a second, like any progress bar; nothing
    # waits on it. It only runs when stderr is a terminal.
    while True:
        await asyncio.sleep(REDRAW_INTERVAL)
        bar.update(sum(_counts(pool.stats())))


class _ResultWriter:
    """The pool's ``on_result``: writes each result; the first failure is kept.

    A callback rather than ``async for ... in pool.results()`` beside a feeding
    task: when a result cannot be written, the run ends by raising from the
    body of ``async with pool`` (queued messages are dropped, in-flight ones
    end), not by cancelling a feeding task that may be inside ``pool.stop()``.
    """

    def __init__(self, out: _Output) -> None:
        self.out = out
        #: Done, with the error, once a result could not be written.
        self.failed: asyncio.Future[CliError] = asyncio.get_running_loop().create_future()

    def __call__(self, value: Any) -> None:
        if self.failed.done():
            return
        try:
            self.out.write(value, lambda: f"result {self.out.written + 1}")
        except CliError as exc:
            self.failed.set_result(exc)

    def check(self) -> None:
        """Raise the error of a result that could not be written, if there was one."""
        if self.failed.done():
            raise self.failed.result()


async def _run_unordered(
    pool: Pool, messages: AsyncIterator[tuple[int, Any]], writer: _ResultWriter
) -> int:
    count = 0
    async for _, message in messages:
        writer.check()
        await pool.put(message)
        count += 1
    # drain() before stop(): a plain Worker's stop() cancels what is in flight.
    drain = asyncio.ensure_future(pool.drain())
    waits: list[asyncio.Future[Any]] = [drain, writer.failed]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        drain.cancel()
    writer.check()
    await pool.stop()
    writer.check()
    return count


async def _run_ordered(
    pool: Pool, messages: AsyncIterator[tuple[int, Any]], out: _Output, window: int, err: TextIO
) -> int:
    pending: collections.deque[tuple[int, asyncio.Future[Any]]] = collections.deque()

    def write_head() -> None:
        lineno, future = pending.popleft()
        try:
            reply = future.result()
        except Exception as exc:
            # The pool has logged the worker's traceback; this names the line.
            err.write(f"{_PROG}: line {lineno} failed: {_one_line(exc)}\n")
            return
        out.write(reply, lambda: f"the reply to line {lineno}")

    count = 0
    try:
        async for lineno, message in messages:
            if len(pending) >= window:
                await asyncio.wait([pending[0][1]])
                write_head()
            pending.append((lineno, asyncio.ensure_future(pool.submit(message))))
            count += 1
        while pending:
            await asyncio.wait([pending[0][1]])
            write_head()
    finally:
        for _, future in pending:
            future.cancel()
        if pending:
            await asyncio.gather(*(f for _, f in pending), return_exceptions=True)
    return count


@dataclass(frozen=True)
class _RunOptions:
    factory: Callable[[], Worker]
    size: int | None
    loop: str
    start_method: str | None
    concurrency: int | None
    ordered: bool
    input_name: str
    total: int | None


async def _run(opts: _RunOptions, source: Readable, out: _Output, err: TextIO) -> RunSummary:
    kwargs: dict[str, Any] = {"size": opts.size, "loop": opts.loop}
    if opts.start_method is not None:
        kwargs["start_method"] = opts.start_method
    if opts.concurrency is not None:
        kwargs["concurrency"] = opts.concurrency
    writer = _ResultWriter(out)
    kwargs["on_result"] = _discard if opts.ordered else writer
    bar = ProgressBar(err, total=opts.total)
    messages = read_messages(source, opts.input_name)
    started = time.monotonic()
    redraw: asyncio.Task[None] | None = None
    try:
        pool = Pool(opts.factory, **kwargs)
    except (TypeError, ValueError) as exc:  # e.g. a factory "spawn" cannot pickle
        raise CliError(str(exc)) from exc
    try:
        async with pool:
            if bar.enabled:
                redraw = asyncio.create_task(_redraw_forever(bar, pool))
            if opts.ordered:
                window = _ORDERED_WINDOW_PER_WORKER * pool.size
                count = await _run_ordered(pool, messages, out, window, err)
            else:
                count = await _run_unordered(pool, messages, writer)
    finally:
        if redraw is not None:
            redraw.cancel()
        await messages.aclose()
        bar.update(sum(_counts(pool.stats())))
        bar.close()
    elapsed = time.monotonic() - started
    processed, failed, lost = _counts(pool.stats())
    return RunSummary(count, processed, failed, lost, out.written, elapsed)


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
    factory = load_worker(ns.worker)
    loop_factory = make_loop_factory(ns.loop)
    with contextlib.ExitStack() as stack:
        source, input_name = _open_input(ns.input, stack)
        total = None
        if input_name == ns.input and ProgressBar(err).enabled and os.path.isfile(ns.input):
            total = count_messages(ns.input)  # for the ETA
        out = _Output(_open_output(ns.output, stack))
        opts = _RunOptions(
            factory=factory,
            size=ns.size,
            loop=ns.loop,
            start_method=ns.start_method,
            concurrency=ns.concurrency,
            ordered=ns.ordered,
            input_name=input_name,
            total=total,
        )
        with _stderr_logging(err), asyncio.Runner(loop_factory=loop_factory) as runner:
            try:
                summary = runner.run(_run(opts, source, out, err))
            except WorkerStartError as exc:
                # The reason in one line, then the worker's traceback.
                raise CliError(str(exc)) from exc
    err.write(summary.line() + "\n")
    err.flush()
    return EXIT_FAILED if summary.failed or summary.lost else EXIT_OK


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
            "JSON line. The current directory is importable. Exit status: 0 all "
            "processed, 1 some message failed, 2 a usage error."
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
    failed, 2 a usage error (reported as one line on stderr), 130 Ctrl-C.
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
