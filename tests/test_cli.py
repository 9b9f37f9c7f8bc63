"""The ``looppool`` command line: ``run`` (JSON lines in and out), errors, dispatch.

Most tests run the real command (``python -m looppool``) in a subprocess with
``tests/`` as the working directory and only ``src/`` on ``PYTHONPATH``: the
command must make ``cli_workers`` importable itself, in workers too.
"""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import pty
import select
import signal
import subprocess
import sys
import types
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

import looppool
from cli_workers import leftover_processes
from looppool import _cli, _console

TESTS = Path(__file__).resolve().parent
SRC = Path(looppool.__file__).resolve().parent.parent
DEADLINE = 60  # seconds a command may take before the test fails


def command_env(marker: str | None = None) -> dict[str, str]:
    """The environment of a command: only ``src/`` on the path, and a marker."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(SRC)
    if marker is not None:
        env["LOOPPOOL_TEST_MARK"] = marker
    return env


def looppool_cmd(
    *args: str, stdin: str = "", cwd: Path = TESTS
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m looppool ARGS`` with ``stdin``; check nothing is left running."""
    marker = uuid.uuid4().hex
    proc = subprocess.run(
        [sys.executable, "-m", "looppool", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=command_env(marker),
        timeout=DEADLINE,
    )
    assert leftover_processes(marker) == []
    return proc


def json_lines(text: str) -> list[Any]:
    """The JSON values of ``text``, one a line."""
    return [json.loads(line) for line in text.splitlines()]


def error_line(stderr: str) -> str:
    """The one line a usage error writes; fails if there is more."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("looppool: error: "), stderr
    return lines[0]


MESSAGES = [1, "two", [3, 3], {"four": 4}, None, True, 6.5, {"nested": {"x": [1, None]}}]


def test_run_writes_every_result_as_a_json_line() -> None:
    """Each message's result comes back as one JSON line; the summary goes to stderr."""
    stdin = "".join(json.dumps(m) + "\n" for m in MESSAGES)
    proc = looppool_cmd("run", "cli_workers:Echo", "-n", "2", stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    assert Counter(map(json.dumps, json_lines(proc.stdout))) == Counter(map(json.dumps, MESSAGES))
    assert f"{len(MESSAGES)} messages: {len(MESSAGES)} processed, 0 failed, 0 lost" in proc.stderr
    assert "\r" not in proc.stderr  # no progress bar: stderr is not a terminal


def test_run_ordered_writes_replies_in_input_order() -> None:
    """--ordered writes what process_message returned, one line per input line, in order."""
    stdin = "".join(f"{i}\n" for i in range(300))
    proc = looppool_cmd("run", "cli_workers:Double", "--ordered", "-n", "2", stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    assert json_lines(proc.stdout) == [2 * i for i in range(300)]


def test_run_unordered_writes_put_results_not_replies() -> None:
    """Without --ordered the output is what the workers put, not their replies."""
    proc = looppool_cmd("run", "cli_workers:Double", "-n", "2", stdin="1\n2\n3\n")
    assert proc.returncode == 0, proc.stderr
    results = sorted(json_lines(proc.stdout), key=lambda r: r["in"])
    assert results == [{"in": i, "out": 2 * i} for i in (1, 2, 3)]


def test_run_reads_and_writes_files_and_skips_blank_lines(tmp_path: Path) -> None:
    """-i and -o name the files; blank lines are not messages; a last line needs no newline."""
    source = tmp_path / "in.jsonl"
    source.write_text('{"a": 1}\n\n   \n[2]\r\n"three"')
    target = tmp_path / "out.jsonl"
    proc = looppool_cmd("run", "cli_workers:Echo", "-n", "1", "-i", str(source), "-o", str(target))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert sorted(map(json.dumps, json_lines(target.read_text()))) == sorted(
        map(json.dumps, [{"a": 1}, [2], "three"])
    )
    assert "3 messages: 3 processed" in proc.stderr


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_run_imports_the_module_from_the_current_directory(method: str) -> None:
    """MODULE is found in the working directory, by the parent and by workers, however started."""
    proc = looppool_cmd(
        "run",
        "cli_workers:double_factory",
        "--ordered",
        "-n",
        "2",
        "--start-method",
        method,
        "--loop",
        "asyncio",
        "--concurrency",
        "4",
        stdin="1\n2\n3\n4\n5\n",
    )
    assert proc.returncode == 0, proc.stderr
    assert json_lines(proc.stdout) == [2, 4, 6, 8, 10]


def test_run_exits_1_when_a_message_fails() -> None:
    """A failing message is counted and logged with its traceback; the others go through."""
    stdin = '1\n{"fail": true}\n3\n'
    proc = looppool_cmd("run", "cli_workers:Picky", "-n", "2", stdin=stdin)
    assert proc.returncode == 1
    assert sorted(json_lines(proc.stdout)) == [1, 3]
    assert "ValueError: asked to fail" in proc.stderr  # the worker's traceback, forwarded
    assert "3 messages: 2 processed, 1 failed, 0 lost" in proc.stderr


def test_run_ordered_names_the_line_that_failed() -> None:
    """With --ordered a failed message's line is named; its reply is left out."""
    stdin = '1\n{"fail": true}\n3\n'
    proc = looppool_cmd("run", "cli_workers:Picky", "--ordered", "-n", "2", stdin=stdin)
    assert proc.returncode == 1
    assert json_lines(proc.stdout) == [1, 3]
    assert "looppool: line 2 failed: ValueError: asked to fail" in proc.stderr


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("no_such_module_here:Worker", "cannot import module 'no_such_module_here': "),
        ("cli_workers.py:Echo", "give a module name, not a file name"),
        ("cli_workers:Missing", "module 'cli_workers' has no attribute 'Missing'"),
        ("cli_workers:NotAWorker", "is the class cli_workers.NotAWorker, not a subclass of"),
        ("cli_workers:Idle", "cli_workers:Idle does not override process_message"),
        ("cli_workers:not_callable", "cli_workers:not_callable is int 42, not a looppool.Worker"),
        ("cli_workers", "'cli_workers' is not MODULE:WORKER"),
    ],
)
def test_run_bad_worker_is_one_line_and_exit_2(spec: str, expected: str) -> None:
    """A MODULE:WORKER that cannot be used is reported in one line, before any process starts."""
    proc = looppool_cmd("run", spec, stdin="1\n")
    assert proc.returncode == 2
    assert expected in error_line(proc.stderr)
    assert proc.stdout == ""


def test_run_module_failing_at_import_is_reported(tmp_path: Path) -> None:
    """A module that raises while imported is named, with the exception, in one line."""
    (tmp_path / "broken_module.py").write_text("1 / 0\n")
    proc = looppool_cmd("run", "broken_module:Worker", stdin="1\n", cwd=tmp_path)
    assert proc.returncode == 2
    assert (
        "cannot import module 'broken_module': ZeroDivisionError: division by zero"
        in error_line(proc.stderr)
    )


def test_run_bad_json_line_is_named_skipped_and_counted() -> None:
    """A line that is not JSON is named on stderr and skipped; the others run; exit 1."""
    proc = looppool_cmd("run", "cli_workers:Echo", "-n", "1", stdin='1\n\n{"a": oops}\n4\n')
    assert proc.returncode == 1
    assert sorted(json_lines(proc.stdout)) == [1, 4]
    first, summary = proc.stderr.splitlines()
    assert (
        first == "looppool: line 3 of <stdin> skipped: not valid JSON: Expecting value (column 7)"
    )
    assert summary.startswith(
        "looppool: 2 messages: 2 processed, 0 failed, 0 lost; 1 bad line skipped; 2 lines written"
    )


def test_run_bad_json_in_a_file_names_the_file(tmp_path: Path) -> None:
    """The skipped line is named with the input file; bad UTF-8 is a bad line too."""
    source = tmp_path / "bad.jsonl"
    source.write_bytes(b'1\n2\nnot json\n"\xff"\n')
    proc = looppool_cmd("run", "cli_workers:Echo", "-i", str(source))
    assert proc.returncode == 1
    assert f"looppool: line 3 of {source} skipped: not valid JSON" in proc.stderr
    assert f"looppool: line 4 of {source} skipped: not valid UTF-8" in proc.stderr
    assert "2 messages: 2 processed, 0 failed, 0 lost; 2 bad lines skipped" in proc.stderr


def test_run_bad_line_in_the_middle_loses_none_of_the_rest() -> None:
    """One bad line among 2,000: the 1,999 others are all processed and all written."""
    lines = [f"{i}\n" for i in range(2000)]
    lines[1000] = "{oops\n"
    proc = looppool_cmd("run", "cli_workers:Echo", "-n", "2", stdin="".join(lines))
    assert proc.returncode == 1
    assert sorted(json_lines(proc.stdout)) == [i for i in range(2000) if i != 1000]
    assert "looppool: line 1001 of <stdin> skipped: not valid JSON" in proc.stderr
    assert "1,999 messages: 1,999 processed, 0 failed, 0 lost; 1 bad line skipped" in proc.stderr


def test_run_names_the_first_20_bad_lines_and_counts_the_rest() -> None:
    """Input that is mostly not JSON does not flood stderr: 20 lines named, all counted."""
    stdin = "".join(f"bad {i}\n" for i in range(50)) + "7\n"
    proc = looppool_cmd("run", "cli_workers:Echo", "-n", "1", stdin=stdin)
    assert proc.returncode == 1
    assert json_lines(proc.stdout) == [7]
    named = [line for line in proc.stderr.splitlines() if " skipped: " in line]
    assert len(named) == 20
    assert named[-1].startswith("looppool: line 20 of <stdin> skipped")
    assert "looppool: more bad lines are counted in the summary, not named" in proc.stderr
    assert "1 message: 1 processed, 0 failed, 0 lost; 50 bad lines skipped" in proc.stderr


def test_run_result_not_json_serialisable() -> None:
    """A result JSON cannot write: said at once, the run stops, the rest is written; exit 2."""
    proc = looppool_cmd("run", "cli_workers:Unserialisable", "-n", "1", stdin='"set"\n')
    assert proc.returncode == 2
    first, *stopping, summary = proc.stderr.splitlines()
    # While the message is still in flight, the stop says it waits for it.
    assert stopping in ([], ["looppool: stopping: waiting for 1 message; Ctrl-C to kill"])
    assert first == (
        "looppool: error: result 1 is not JSON-serialisable: "
        "TypeError: Object of type set is not JSON serializable"
    )
    assert summary.startswith(
        "looppool: stopped by an error, input read to line 1 of <stdin>: 1 message: 1 processed"
    )


def test_run_ordered_reply_not_json_serialisable() -> None:
    """With --ordered the error names the input line; the replies before it are written."""
    proc = looppool_cmd(
        "run", "cli_workers:Unserialisable", "--ordered", "-n", "1", stdin='1\n"set"\n'
    )
    assert proc.returncode == 2
    assert json_lines(proc.stdout) == [1]
    first, *_, summary = proc.stderr.splitlines()
    assert first.startswith(
        "looppool: error: the reply to line 2 is not JSON-serialisable: TypeError"
    )
    assert "stopped by an error" in summary


def test_run_worker_that_fails_to_start() -> None:
    """A worker whose initialise() raises: exit 2, the reason, then the worker's traceback."""
    proc = looppool_cmd("run", "cli_workers:NoStart", "-n", "1", stdin="1\n")
    assert proc.returncode == 2
    assert proc.stderr.startswith(
        "looppool: error: worker 0 failed to start: RuntimeError: no database today"
    )
    assert 'raise RuntimeError("no database today")' in proc.stderr


def test_run_missing_input_file(tmp_path: Path) -> None:
    """An input file that does not exist is a one-line error."""
    proc = looppool_cmd("run", "cli_workers:Echo", "-i", str(tmp_path / "nope.jsonl"))
    assert proc.returncode == 2
    assert "cannot open input file" in error_line(proc.stderr)


def test_run_usage_error_from_argparse() -> None:
    """A missing MODULE:WORKER is argparse's usage error, exit 2."""
    proc = looppool_cmd("run")
    assert proc.returncode == 2
    assert "the following arguments are required: MODULE:WORKER" in proc.stderr


def test_progress_bar_is_drawn_when_stderr_is_a_terminal(tmp_path: Path) -> None:
    """On a terminal, stderr shows a bar with the count, the rate and an ETA, then the summary."""
    source = tmp_path / "in.jsonl"
    source.write_text("".join(f"{i}\n" for i in range(50)))
    master, slave = pty.openpty()
    marker = uuid.uuid4().hex
    try:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "looppool", "run", "cli_workers:Echo", "-n", "1"),
                *("-i", str(source), "-o", str(tmp_path / "out.jsonl")),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=slave,
            cwd=TESTS,
            env=command_env(marker),
        )
    finally:
        os.close(slave)
    screen = b""
    try:
        while True:  # until the command exits and the terminal closes
            try:
                data = os.read(master, 4096)
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
                break
            if not data:
                break
            screen += data
    finally:
        os.close(master)
        assert proc.wait(timeout=DEADLINE) == 0
    text = screen.decode()
    assert "50/50 [" in text
    assert "100%" in text
    assert "messages/s" in text
    assert "ETA" in text
    assert "50 messages: 50 processed, 0 failed" in text
    assert leftover_processes(marker) == []


class Lines:
    """Reads a pipe line by line; each wait is bounded by DEADLINE (select), none sleeps."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.fd = stream.fileno()
        self.buffer = b""
        self.seen: list[str] = []

    def next(self) -> str | None:
        """The next line, or None at the end of the stream."""
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.fd], [], [], DEADLINE)
            assert ready, f"no line within {DEADLINE} s; read so far: {self.seen}"
            data = os.read(self.fd, 65536)
            if not data:
                if not self.buffer:
                    return None
                data = b"\n"  # a last line without its newline
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        self.seen.append(line.decode())
        return self.seen[-1]

    def until(self, text: str) -> str:
        """Read up to the first line that contains ``text``, and return that line."""
        while True:
            line = self.next()
            assert line is not None, f"{text!r} never came; read: {self.seen}"
            if text in line:
                return line

    def rest(self) -> list[str]:
        """Every line left, up to the end of the stream."""
        lines = []
        while (line := self.next()) is not None:
            lines.append(line)
        return lines


class Command:
    """``python -m looppool ARGS`` running in the background, with its three pipes."""

    def __init__(self, *args: str) -> None:
        self.marker = uuid.uuid4().hex
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "looppool", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=TESTS,
            env=command_env(self.marker),
        )
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self.out = Lines(self.proc.stdout)
        self.err = Lines(self.proc.stderr)

    def send(self, *messages: Any) -> None:
        """Write ``messages`` as JSON lines on the command's stdin, which stays open."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("".join(json.dumps(m) + "\n" for m in messages).encode())
        self.proc.stdin.flush()

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the command (its workers ignore SIGINT and SIGTERM anyway)."""
        self.proc.send_signal(signum)

    def wait(self) -> int:
        """The exit status; fails the test if the command takes longer than DEADLINE."""
        return self.proc.wait(timeout=DEADLINE)

    def close(self) -> list[int]:
        """Kill the command if it still runs; return the processes it left behind."""
        self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return leftover_processes(self.marker)


@pytest.fixture
def command() -> Iterator[Callable[..., Command]]:
    """Start commands in the background; kill them and check for left-overs at teardown."""
    started: list[Command] = []

    def start(*args: str) -> Command:
        started.append(Command(*args))
        return started[-1]

    yield start
    assert [pid for cmd in started for pid in cmd.close()] == []


def release(fifo: Path) -> None:
    """Let the worker holding a message on ``fifo`` go on (its end is open already)."""
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, b"go\n")
    finally:
        os.close(fd)


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    """A named pipe, for a Held worker to wait on."""
    path = tmp_path / "gate"
    os.mkfifo(path)
    return path


def test_ctrl_c_while_waiting_for_input_stops_the_run_at_once(
    command: Callable[..., Command],
) -> None:
    """SIGINT while the command waits for input: it stops, sums up, exits 130."""
    cmd = command("run", "cli_workers:Echo", "-n", "2")
    cmd.send("first")
    # Its result is written (and flushed) while stdin stays open: the pool runs.
    assert cmd.out.next() == '"first"'
    cmd.signal(signal.SIGINT)
    assert cmd.wait() == 130
    assert cmd.err.next() == "looppool: Ctrl-C: stopping: no message in flight"
    [summary] = cmd.err.rest()
    assert summary.startswith(
        "looppool: stopped by Ctrl-C, input read to line 1 of <stdin>: 1 message: "
        "1 processed, 0 failed, 0 lost; 0 bad lines skipped; 1 line written in "
    )


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_first_ctrl_c_says_what_it_waits_for_and_the_second_kills(
    command: Callable[..., Command], loop: str
) -> None:
    """A stuck SafeWorker handler: Ctrl-C says it waits for 1 message; Ctrl-C again kills it."""
    cmd = command("run", "cli_workers:Held", "-n", "1", "--loop", loop)
    cmd.send(1, 2, {"hold": 3})
    assert sorted([cmd.out.next(), cmd.out.next()]) == ["1", "2"]
    cmd.err.until("holding 3")
    cmd.signal(signal.SIGINT)
    assert cmd.err.next() == (
        "looppool: Ctrl-C: stopping: waiting for 1 message; Ctrl-C again to kill"
    )
    cmd.signal(signal.SIGINT)
    assert cmd.err.next() == "looppool: Ctrl-C: killing the workers"
    assert cmd.wait() == 130
    assert cmd.out.rest() == []
    assert cmd.err.rest()[-1].startswith(
        "looppool: stopped by Ctrl-C, input read to line 3 of <stdin>: 3 messages: "
        "2 processed, 0 failed, 1 lost; 0 bad lines skipped; 2 lines written in "
    )


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_sigterm_stops_like_ctrl_c_flushes_and_exits_143(
    command: Callable[..., Command], fifo: Path, loop: str
) -> None:
    """SIGTERM: said at once; queued messages do not start, the one in flight ends; exit 143."""
    cmd = command("run", "cli_workers:Held", "-n", "1", "--concurrency", "1", "--loop", loop)
    cmd.send(1, {"hold": 2, "fifo": str(fifo)}, 3, 4)
    assert cmd.out.next() == "1"
    cmd.err.until("holding 2")  # 3 and 4 wait in the pool's queue (concurrency 1)
    cmd.signal(signal.SIGTERM)
    assert cmd.err.next() == (
        "looppool: SIGTERM: stopping: waiting for 1 message; SIGTERM or Ctrl-C again to kill"
    )
    release(fifo)
    assert cmd.wait() == 143
    assert cmd.out.rest() == ["2"]
    assert cmd.err.rest()[-1].startswith(
        "looppool: stopped by SIGTERM, input read to line 4 of <stdin>: 4 messages: "
        "2 processed, 0 failed, 2 lost; 0 bad lines skipped; 2 lines written in "
    )


def test_ctrl_c_cancels_what_a_plain_worker_holds(command: Callable[..., Command]) -> None:
    """A plain Worker: the first Ctrl-C cancels the messages in flight and says so."""
    cmd = command("run", "cli_workers:HeldPlain", "-n", "1")
    cmd.send({"hold": 1})
    cmd.err.until("holding 1")
    cmd.signal(signal.SIGINT)
    assert cmd.err.next() == (
        "looppool: Ctrl-C: stopping: cancelling 1 message; Ctrl-C again to kill"
    )
    assert cmd.wait() == 130
    assert cmd.err.rest()[-1].startswith(
        "looppool: stopped by Ctrl-C, input read to line 1 of <stdin>: 1 message: "
        "0 processed, 0 failed, 1 lost;"
    )


def test_ctrl_c_while_the_workers_start(command: Callable[..., Command]) -> None:
    """Ctrl-C before the pool has started: the workers are ended, exit 130."""
    cmd = command("run", "cli_workers:SlowStart", "-n", "2")
    cmd.err.until("initialising")
    cmd.signal(signal.SIGINT)
    assert cmd.err.until("stopping") == "looppool: Ctrl-C: stopping"
    assert cmd.wait() == 130
    assert cmd.err.rest()[-1].startswith(
        "looppool: stopped by Ctrl-C before reading any input: 0 messages: "
    )


def test_ordered_ctrl_c_writes_the_replies_computed_behind_a_slow_line(
    command: Callable[..., Command], fifo: Path
) -> None:
    """--ordered: replies finished behind a held first line are written, in order, after Ctrl-C."""
    cmd = command("run", "cli_workers:Held", "--ordered", "-n", "1")
    cmd.send({"hold": 1, "fifo": str(fifo)}, 2, 3)
    cmd.err.until("holding 1")
    cmd.signal(signal.SIGINT)
    assert cmd.err.next().startswith("looppool: Ctrl-C: stopping: waiting for ")
    release(fifo)
    assert cmd.wait() == 130
    assert cmd.out.rest() == ["1", "2", "3"]
    assert cmd.err.rest()[-1].startswith(
        "looppool: stopped by Ctrl-C, input read to line 3 of <stdin>: 3 messages: "
        "3 processed, 0 failed, 0 lost;"
    )


def test_ordered_kill_writes_replies_up_to_the_first_line_not_processed(
    command: Callable[..., Command],
) -> None:
    """--ordered, killed: replies up to the lost line are written; the gap is named."""
    cmd = command("run", "cli_workers:Held", "--ordered", "-n", "1")
    cmd.send(1, 2, {"hold": 3})
    assert [cmd.out.next(), cmd.out.next()] == ["1", "2"]
    cmd.err.until("holding 3")
    cmd.signal(signal.SIGINT)
    cmd.err.until("stopping: waiting for 1 message")
    cmd.signal(signal.SIGINT)
    assert cmd.wait() == 130
    assert cmd.out.rest() == []
    rest = cmd.err.rest()
    assert (
        "looppool: --ordered: line 3 was not processed: replies are written up to the line "
        "before it; 0 later replies are left out, to keep the input order"
    ) in rest
    assert rest[-1].startswith(
        "looppool: stopped by Ctrl-C, input read to line 3 of <stdin>: 3 messages: "
        "2 processed, 0 failed, 1 lost;"
    )


async def turn() -> None:
    """Return once the callbacks already scheduled on the loop have run."""
    loop = asyncio.get_running_loop()
    turned = loop.create_future()
    loop.call_soon(turned.set_result, None)
    await turned


@pytest.mark.asyncio
async def test_ordered_replies_in_order_failures_named_and_the_gap_after_a_stop() -> None:
    """Replies are written in input order; a failure is named; after a stop, a gap ends it."""
    stream, err, errors = io.StringIO(), io.StringIO(), []
    replies = _cli._OrderedReplies(_cli._Output(stream), err, errors.append, window=10)
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[Any]] = [loop.create_future() for _ in range(6)]
    for lineno, future in enumerate(futures, 1):
        replies.add(lineno, future)
    futures[1].set_result("two")  # behind line 1: waits
    await turn()
    assert stream.getvalue() == ""
    futures[0].set_result("one")
    futures[2].set_exception(ValueError("bad three"))
    await turn()
    assert stream.getvalue() == '"one"\n"two"\n'
    assert err.getvalue() == "looppool: line 3 failed: ValueError: bad three\n"
    replies.stopping = True
    futures[4].set_result("five")
    futures[5].set_exception(looppool.WorkerLost(0, 123, -9))
    futures[3].set_exception(looppool.PoolClosed("dropped by the stop"))
    await turn()
    assert stream.getvalue() == '"one"\n"two"\n'
    assert (replies.gap, replies.left_out(), errors) == (4, 1, [])


# -- main() in this process ------------------------------------------------


@pytest.fixture
def in_tests_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run main() from tests/, and undo the sys.path entry it adds."""
    monkeypatch.chdir(TESTS)
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.mark.usefixtures("in_tests_dir")
def test_main_runs_a_pool_and_returns_the_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """main() runs the command in this process and returns 0."""
    source = tmp_path / "in.jsonl"
    source.write_text("".join(f"{i}\n" for i in range(20)))
    target = tmp_path / "out.jsonl"
    argv = ["run", "cli_workers:Double", "--ordered", "-n", "2", "--start-method", "spawn"]
    status = _cli.main([*argv, "-i", str(source), "-o", str(target)])
    assert status == 0
    assert json_lines(target.read_text()) == [2 * i for i in range(20)]
    assert "20 messages: 20 processed, 0 failed, 0 lost" in capsys.readouterr().err


@pytest.mark.usefixtures("in_tests_dir")
def test_main_returns_1_when_a_message_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """main() returns 1 when a message failed."""
    source = tmp_path / "in.jsonl"
    source.write_text('{"fail": true}\n2\n')
    target = tmp_path / "out.jsonl"
    argv = ["run", "cli_workers:Picky", "-n", "1", "--start-method", "spawn"]
    assert _cli.main([*argv, "-i", str(source), "-o", str(target)]) == 1
    assert json_lines(target.read_text()) == [2]
    assert "1 failed" in capsys.readouterr().err


@pytest.mark.usefixtures("in_tests_dir")
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "cli_workers:NotAWorker"], "not a subclass of looppool.Worker"),
        (["run", "no_such_module_here:W"], "cannot import module 'no_such_module_here'"),
        (["run", "cli_workers:Echo", "-i", "/nonexistent/in.jsonl"], "cannot open input file"),
    ],
)
def test_main_reports_errors_in_one_line(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """main() returns 2 and writes the one-line error."""
    assert _cli.main(argv) == 2
    assert expected in error_line(capsys.readouterr().err)


def test_main_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """--help returns 0 (main() does not exit) and names run, bench and demo."""
    assert _cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("run", "bench", "demo"):
        assert command in out


def test_main_bench_dispatches_to_the_bench_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """``looppool bench ARGS`` calls looppool._bench.main(ARGS), its own --help included."""
    calls: list[list[str]] = []

    def fake_main(args: list[str]) -> int:
        calls.append(args)
        return 3

    fake = types.ModuleType("looppool._bench")
    fake.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "looppool._bench", fake)
    assert _cli.main(["bench", "--help", "-x"]) == 3
    assert calls == [["--help", "-x"]]


def test_python_m_looppool_help() -> None:
    """``python -m looppool --help`` works and calls itself looppool."""
    proc = looppool_cmd("--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: looppool ")


# -- pieces ------------------------------------------------------------------


class Trickle(io.RawIOBase):
    """A stream that hands out a few bytes per read, splitting lines anywhere."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data = data
        self.step = step

    def readable(self) -> bool:
        """Readable."""
        return True

    def read1(self, size: int = -1) -> bytes:
        """At most ``step`` bytes."""
        chunk, self.data = self.data[: self.step], self.data[self.step :]
        return chunk


async def collect(messages: AsyncIterator[tuple[int, Any]]) -> list[tuple[int, Any]]:
    """Every (line number, message) of ``messages``."""
    return [item async for item in messages]


@pytest.mark.asyncio
@pytest.mark.parametrize("step", [1, 3, 7, 1 << 16])
async def test_read_messages_whatever_the_chunks(step: int) -> None:
    """Lines split across reads come out whole, numbered, blank ones skipped."""
    data = b'{"a": "\xc3\xa9"}\n\n[1, 2]\r\n  \n"last"'
    got = await collect(_cli.read_messages(Trickle(data, step), "<test>"))
    assert got == [(1, {"a": "é"}), (3, [1, 2]), (5, "last")]


@pytest.mark.asyncio
async def test_read_messages_bad_line_raises_cli_error() -> None:
    """Bad JSON raises CliError naming the line and the source."""
    stream = io.BytesIO(b"1\n2\n[3,\n")
    with pytest.raises(_cli.CliError, match=r"^line 3 of src\.jsonl is not valid JSON"):
        await collect(_cli.read_messages(stream, "src.jsonl"))


def test_progress_bar_renders_count_rate_and_eta() -> None:
    """The bar's text: done/total, percentage, rate, ETA; without a total: count and rate."""
    bar = _console.ProgressBar(io.StringIO(), total=200, enabled=True)
    bar.done = 50
    text = bar.render(bar._started + 10.0)
    assert text.startswith("50/200 [#####...............]  25%  5 messages/s  ETA 0:30")
    bar = _console.ProgressBar(io.StringIO(), unit="pages", enabled=True)
    bar.done = 1234
    assert bar.render(bar._started + 2.0) == "1,234 pages  617 pages/s  0:02"


def test_progress_bar_is_silent_off_a_terminal() -> None:
    """Not a terminal: update() and close() write nothing."""
    stream = io.StringIO()
    bar = _console.ProgressBar(stream, total=10)
    assert not bar.enabled
    bar.update(5)
    bar.close()
    assert stream.getvalue() == ""
