"""The pytest plugin of looppool.testing, run on test files of its own through pytester."""

from __future__ import annotations

import importlib.metadata
import multiprocessing
import re
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

import looppool

pytest_plugins = ["pytester"]

SRC = str(Path(looppool.__file__).resolve().parent.parent)


def _plugin_args() -> list[str]:
    """Load the plugin with -p only while looppool is not installed (its entry point loads it)."""
    installed = any(
        ep.value == "looppool.testing" for ep in importlib.metadata.entry_points(group="pytest11")
    )
    return [] if installed else ["-p", "looppool.testing"]


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester whose runs see looppool (installed or not) and turn warnings into errors."""
    monkeypatch.setenv("PYTHONPATH", SRC)  # for runpytest_subprocess and spawned workers
    return pytester


def write_ini(pytester: pytest.Pytester, mode: str, **options: str) -> None:
    lines = [
        "[pytest]",
        f"asyncio_mode = {mode}",
        "asyncio_default_fixture_loop_scope = function",
        "filterwarnings = error",
        *(f"{key} = {value}" for key, value in options.items()),
    ]
    pytester.makeini("\n".join(lines))


def write_tests(pytester: pytest.Pytester, mode: str, body: str) -> None:
    """Write a test module; in strict mode every async test is marked, in auto mode none."""
    mark = "@pytest.mark.asyncio" if mode == "strict" else ""
    header = textwrap.dedent(
        """
        import asyncio
        import multiprocessing
        from pathlib import Path

        import pytest

        import looppool


        class Echo(looppool.SafeWorker):
            def process_message(self, message):
                return (self.number, message)


        class Hangs(looppool.SafeWorker):
            async def process_message(self, message):
                await asyncio.Event().wait()


        pools = []
        """
    )
    pytester.makepyfile(test_inner=header + textwrap.dedent(body).replace("@MARK", mark))


MODES = ["strict", "auto"]


# -- pool_factory (and its first name, looppool_factory) ------------------------------


@pytest.mark.parametrize("fixture", ["pool_factory", "looppool_factory"])
@pytest.mark.parametrize("mode", MODES)
def test_pool_factory_gives_started_pools_stopped_at_teardown(
    inner: pytest.Pytester, mode: str, fixture: str
) -> None:
    """The fixture (either name) returns a started looppool.Pool; teardown stops every pool."""
    write_ini(inner, mode)
    write_tests(
        inner,
        mode,
        f"""
        @MARK
        async def test_factory({fixture}):
            pool = await {fixture}(Echo, size=2)
            other = await {fixture}(Echo, size=1)
            pools.extend([pool, other])
            assert isinstance(pool, looppool.Pool)
            assert [await pool.submit(m) for m in "ab"] == [(0, "a"), (1, "b")]
            assert await other.submit("c") == (0, "c")
            assert all(pool.pids) and all(other.pids)

        def test_the_pools_were_stopped_at_teardown():
            for pool in pools:
                assert "stopped" in repr(pool)
                assert not any(pool.pids)
                with pytest.raises(looppool.PoolClosed):
                    pool.put_nowait(1)
        """,
    )
    result = inner.runpytest(*_plugin_args())
    result.assert_outcomes(passed=2)


def test_both_names_in_one_test_are_separate_fixtures(inner: pytest.Pytester) -> None:
    """pool_factory and looppool_factory in one test each make and stop their own pools."""
    write_ini(inner, "auto")
    write_tests(
        inner,
        "auto",
        """
        async def test_both(pool_factory, looppool_factory):
            pools.append(await pool_factory(Echo, size=1))
            pools.append(await looppool_factory(Echo, size=1))
            assert [await pool.submit("x") for pool in pools] == [(0, "x"), (0, "x")]

        def test_both_were_stopped():
            assert all("stopped" in repr(pool) for pool in pools)
        """,
    )
    result = inner.runpytest(*_plugin_args())
    result.assert_outcomes(passed=2)


def test_a_project_fixture_named_pool_factory_wins(inner: pytest.Pytester) -> None:
    """A project's own pool_factory (a database pool, say) overrides the plugin's."""
    write_ini(inner, "auto")
    inner.makeconftest(
        """
        import pytest

        @pytest.fixture
        def pool_factory():
            return "the project's own"
        """
    )
    write_tests(
        inner,
        "auto",
        """
        def test_own(pool_factory):
            assert pool_factory == "the project's own"

        async def test_plugin_name_still_there(looppool_factory):
            assert isinstance(await looppool_factory(Echo, size=1), looppool.Pool)
        """,
    )
    result = inner.runpytest(*_plugin_args())
    result.assert_outcomes(passed=2)


DEFAULT = multiprocessing.get_start_method()


@pytest.mark.parametrize(
    ("args", "ini", "expected"),
    [
        ([], {}, ("uvloop", DEFAULT)),
        (
            ["--looppool-loop=asyncio", "--looppool-start-method=spawn"],
            {},
            ("asyncio", "spawn"),
        ),
        (
            [],
            {"looppool_loop": "asyncio", "looppool_start_method": "forkserver"},
            ("asyncio", "forkserver"),
        ),
        (["--looppool-start-method=fork"], {"looppool_start_method": "spawn"}, ("uvloop", "fork")),
    ],
    ids=["defaults", "command-line", "ini", "command-line-wins"],
)
def test_options_are_the_factory_defaults(
    inner: pytest.Pytester, args: list[str], ini: dict[str, str], expected: tuple[str, str]
) -> None:
    """--looppool-loop/--looppool-start-method (or ini) are defaults; explicit keywords win."""
    write_ini(inner, "strict", **ini)
    write_tests(
        inner,
        "strict",
        f"""
        @MARK
        async def test_options(pool_factory):
            pool = await pool_factory(Echo, size=1)
            assert (pool.loop_kind, pool.start_method) == {expected!r}
            assert await pool.submit("x") == (0, "x")
            explicit = await pool_factory(Echo, size=1, loop="asyncio", start_method="fork")
            assert (explicit.loop_kind, explicit.start_method) == ("asyncio", "fork")
        """,
    )
    result = inner.runpytest(*_plugin_args(), *args)
    result.assert_outcomes(passed=1)


def test_report_header_shows_the_options(inner: pytest.Pytester) -> None:
    """With an option set, the run's header names the loop, start method and stop timeout."""
    write_ini(inner, "strict", looppool_stop_timeout="2.5")
    write_tests(inner, "strict", "")
    result = inner.runpytest(*_plugin_args(), "--looppool-start-method=spawn")
    result.stdout.fnmatch_lines(["looppool: loop=auto, start_method=spawn, stop_timeout=2.5s"])


@pytest.mark.parametrize(
    ("args", "ini", "header"),
    [
        ([], {}, None),
        ([], {"looppool_loop": "asyncio"}, "looppool: loop=asyncio, start_method=platform*"),
        (["--looppool-stop-timeout=3"], {}, "looppool: loop=auto, *stop_timeout=3s"),
    ],
    ids=["no-option", "ini", "command-line"],
)
def test_report_header_only_when_an_option_is_set(
    inner: pytest.Pytester, args: list[str], ini: dict[str, str], header: str | None
) -> None:
    """Runs that set no looppool option (most runs, in any project) get no looppool line."""
    write_ini(inner, "strict", **ini)
    write_tests(inner, "strict", "def test_nothing():\n    pass\n")
    result = inner.runpytest(*_plugin_args(), *args)
    result.assert_outcomes(passed=1)
    if header is None:
        result.stdout.no_fnmatch_line("looppool*")
    else:
        result.stdout.fnmatch_lines([header])


@pytest.mark.parametrize(
    ("args", "ini", "message"),
    [
        (["--looppool-loop=trio"], {}, "'trio' is not a valid looppool_loop*"),
        ([], {"looppool_start_method": "thread"}, "'thread' is not a valid looppool_start_method*"),
        (["--looppool-stop-timeout=soon"], {}, "'soon' is not a valid looppool_stop_timeout*"),
        ([], {"looppool_stop_timeout": "-1"}, "'-1' is not a valid looppool_stop_timeout*"),
    ],
    ids=["loop", "start-method", "timeout-text", "timeout-negative"],
)
def test_bad_option_values_are_usage_errors(
    inner: pytest.Pytester, args: list[str], ini: dict[str, str], message: str
) -> None:
    """A bad option value stops the run at once with a usage error naming it."""
    write_ini(inner, "strict", **ini)
    write_tests(inner, "strict", "")
    result = inner.runpytest(*_plugin_args(), *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}"])


def test_help_lists_the_option_group_and_ini_names(inner: pytest.Pytester) -> None:
    """pytest --help shows the looppool group, its flags and their ini names."""
    write_ini(inner, "strict")
    result = inner.runpytest(*_plugin_args(), "--help")
    result.stdout.fnmatch_lines(
        [
            "looppool worker pools*",
            "*--looppool-loop=VALUE*",
            "*--looppool-start-method=VALUE*",
            "*--looppool-stop-timeout=VALUE*",
        ]
    )
    result.stdout.fnmatch_lines(["*looppool_loop (string)*"])
    result.stdout.fnmatch_lines(["*looppool_start_method (string)*"])


def test_stop_timeout_kills_a_hanging_worker_at_teardown(inner: pytest.Pytester) -> None:
    """With looppool_stop_timeout, a worker that never finishes is killed and not reported."""
    write_ini(inner, "strict", looppool_stop_timeout="0.5")
    write_tests(
        inner,
        "strict",
        """
        @MARK
        async def test_hang(pool_factory):
            pool = await pool_factory(Hangs, size=1)
            pools.append(pool)
            await pool.put("forever")

        def test_after():
            assert pools[0].stats().lost == 1
        """,
    )
    result = inner.runpytest(*_plugin_args())
    result.assert_outcomes(passed=2)


def test_worker_outliving_its_pool_fails_the_teardown_naming_its_pid(
    inner: pytest.Pytester,
) -> None:
    """If a worker process is alive after stop(), teardown fails naming it, and kills it."""
    write_ini(inner, "strict")
    write_tests(
        inner,
        "strict",
        """
        @MARK
        async def test_leak(looppool_factory):
            pool = await looppool_factory(Echo, size=2)
            Path("pids.txt").write_text(" ".join(str(pid) for pid in pool.pids))

            async def stop_that_stops_nothing(timeout=None):
                pass

            pool.stop = stop_that_stops_nothing
        """,
    )
    # In a subprocess: the pool left running there must not outlive that run.
    result = inner.runpytest_subprocess(*_plugin_args())
    result.assert_outcomes(passed=1, errors=1)
    pids = [int(pid) for pid in (inner.path / "pids.txt").read_text().split()]
    result.stdout.fnmatch_lines(
        [f"*worker processes outlived <looppool.Pool 'Echo' running*: pids {pids[0]}, {pids[1]}*"]
    )
    assert not any(psutil.pid_exists(pid) for pid in pids)


# -- inline_pool_factory -----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_inline_pool_factory_gives_started_inline_pools_stopped_at_teardown(
    inner: pytest.Pytester, mode: str
) -> None:
    """The fixture returns a started InlinePool (process options ignored), stopped at teardown."""
    write_ini(inner, mode)
    write_tests(
        inner,
        mode,
        """
        from looppool.testing import InlinePool

        @MARK
        async def test_inline(inline_pool_factory):
            pool = await inline_pool_factory(Echo, size=2, start_method="spawn", loop="uvloop")
            pools.append(pool)
            assert isinstance(pool, InlinePool)
            assert [await pool.submit(m) for m in "ab"] == [(0, "a"), (1, "b")]

        def test_it_was_stopped_at_teardown():
            with pytest.raises(looppool.PoolClosed):
                pools[0].put_nowait(1)
        """,
    )
    result = inner.runpytest(*_plugin_args())
    result.assert_outcomes(passed=2)


def test_inline_stop_timeout_cancels_a_hanging_handler(inner: pytest.Pytester) -> None:
    """looppool_stop_timeout also bounds the teardown of inline pools."""
    write_ini(inner, "auto", looppool_stop_timeout="0.01")
    write_tests(
        inner,
        "auto",
        """
        async def test_hang(inline_pool_factory):
            pool = await inline_pool_factory(Hangs)
            pools.append(pool)
            await pool.put("forever")

        def test_after():
            assert pools[0].stats().lost == 1
        """,
    )
    result = inner.runpytest(*_plugin_args())
    result.assert_outcomes(passed=2)


@pytest.mark.parametrize("fixture", ["pool_factory", "looppool_factory", "inline_pool_factory"])
def test_a_test_on_another_loop_than_the_fixture_fails_clearly(
    inner: pytest.Pytester, fixture: str
) -> None:
    """A test on a module-scoped loop calling a function-scoped factory fails clearly."""
    write_ini(inner, "strict")
    write_tests(
        inner,
        "strict",
        f"""
        @pytest.mark.asyncio(loop_scope="module")
        async def test_module_loop({fixture}):
            await {fixture}(Echo, size=1)
        """,
    )
    result = inner.runpytest(*_plugin_args())
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*{fixture} runs on another event loop than this test*"])


# -- importing the plugin --------------------------------------------------------------------


def test_importing_the_plugin_starts_nothing_and_needs_no_pytest(inner: pytest.Pytester) -> None:
    """Importing looppool.testing starts no thread or process, imports no psutil nor pytest."""
    code = textwrap.dedent(
        """
        import asyncio, multiprocessing, sys, threading
        sys.modules["pytest"] = None  # as if pytest were not installed
        import looppool, looppool.testing
        assert "psutil" not in sys.modules, "psutil imported"
        assert threading.active_count() == 1, threading.enumerate()
        assert multiprocessing.active_children() == []
        assert not hasattr(looppool.testing, "pool_factory")
        assert not hasattr(looppool.testing, "looppool_factory")

        class AddOne(looppool.Worker):
            def process_message(self, message):
                return message + 1

        async def main():
            async with looppool.testing.InlinePool(AddOne) as pool:
                return await pool.submit(1)

        print("reply", asyncio.run(main()))
        """
    )
    result = inner.run(sys.executable, "-c", code)
    assert result.ret == 0, result.stderr.str()
    assert re.search(r"^reply 2$", result.stdout.str(), re.MULTILINE)
