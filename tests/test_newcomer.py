"""What a newcomer trips over (issue 18): packaging, hook spellings, errors, reprs, imports.

The packaging tests build the sdist and the wheel from this source tree with
hatchling (the build backend, in the ``test`` extra) and look inside them.
"""

from __future__ import annotations

import asyncio
import email.parser
import importlib.metadata
import importlib.util
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import textwrap
import types
import warnings
import zipfile
from pathlib import Path

import pytest

import looppool
from looppool._worker import HookNameWarning
from looppool.testing import InlinePool

ROOT = Path(__file__).resolve().parent.parent
BUILD_DEADLINE = 120  # seconds hatchling may take to build both archives


# -- LICENSE, version, changelog ---------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The sdist and the wheel hatchling builds from this tree."""
    if not (ROOT / "pyproject.toml").is_file():
        pytest.skip("not run from a source tree")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-d", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=BUILD_DEADLINE,
    )
    [sdist] = out.glob("*.tar.gz")
    [wheel] = out.glob("*.whl")
    return sdist, wheel


def test_the_wheel_holds_the_license_and_the_module_version(built: tuple[Path, Path]) -> None:
    """The wheel ships LICENSE, its metadata says MIT, and its version is looppool.__version__."""
    _, wheel = built
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [metadata_name] = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = email.parser.Parser().parsestr(archive.read(metadata_name).decode())
        [license_name] = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        license_text = archive.read(license_name).decode()
    assert metadata["Version"] == looppool.__version__
    assert metadata["License-Expression"] == "MIT"
    # What the install lines name: pip install './dist/looppool-VERSION-py3-none-any.whl[ray]'
    assert {"ray", "demo", "titles", "bench", "test"} <= set(metadata.get_all("Provides-Extra"))
    assert license_text == (ROOT / "LICENSE").read_text()
    assert "MIT License" in license_text
    assert "Copyright (c) 2026 looppool developers" in license_text


def test_the_sdist_holds_license_and_changelog(built: tuple[Path, Path]) -> None:
    """The sdist ships LICENSE and CHANGELOG.md, with looppool.__version__ in its PKG-INFO."""
    sdist, _ = built
    with tarfile.open(sdist) as archive:
        top = archive.getnames()[0].split("/")[0]
        names = set(archive.getnames())
        pkg_info = archive.extractfile(f"{top}/PKG-INFO")
        assert pkg_info is not None
        metadata = email.parser.Parser().parsestr(pkg_info.read().decode())
    assert {f"{top}/LICENSE", f"{top}/CHANGELOG.md"} <= names
    assert metadata["Version"] == looppool.__version__
    assert top == f"looppool-{looppool.__version__}"


def test_installed_metadata_agrees_with_the_module() -> None:
    """The installed distribution's version is looppool.__version__ (one source, read at build)."""
    assert importlib.metadata.version("looppool") == looppool.__version__
    assert "__version__" in looppool.__all__


def test_cli_version_is_the_module_version() -> None:
    """``looppool --version`` prints looppool.__version__."""
    proc = subprocess.run(
        [sys.executable, "-m", "looppool", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert proc.stdout == f"looppool {looppool.__version__}\n"


def test_changelog_has_an_unreleased_section() -> None:
    """CHANGELOG.md follows keep-a-changelog: a title, then an Unreleased section first."""
    text = (ROOT / "CHANGELOG.md").read_text()
    assert text.startswith("# Changelog\n")
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections[0] == "## [Unreleased]"


# -- near misses of the hook names --------------------------------------------------------


def define(name: str) -> type[looppool.Worker]:
    """Define a Worker subclass with a method called ``name`` (and process_message)."""

    def method(self: looppool.Worker, *args: object) -> None:
        """A method with the name under test."""

    def process_message(self: looppool.Worker, message: object) -> object:
        """Echo."""
        return message

    namespace = {"process_message": process_message, name: method}
    if name in NEAR_MISSES_OF_PROCESS_MESSAGE:
        del namespace["process_message"]
    return type("Custom", (looppool.Worker,), namespace)


NEAR_MISSES = {
    "initialize": "initialise",
    "Initialise": "initialise",
    "initalise": "initialise",
    "finalize": "finalise",
    "finalse": "finalise",
}
NEAR_MISSES_OF_PROCESS_MESSAGE = (
    "processMessage",
    "ProcessMessage",
    "process_messages",
    "proccess_message",
    "on_message",
    "handle_message",
    "process_msg",
)


@pytest.mark.parametrize(
    ("name", "hook"),
    [*NEAR_MISSES.items(), *((n, "process_message") for n in NEAR_MISSES_OF_PROCESS_MESSAGE)],
)
def test_a_near_miss_of_a_hook_name_warns_naming_the_hook(name: str, hook: str) -> None:
    """Defining initialize/processMessage/on_message... without the hook warns, naming the hook."""
    with pytest.warns(HookNameWarning, match=rf"^Custom\.{name}\(\) .* hook {hook}\(\)") as record:
        define(name)
    [warning] = record
    assert issubclass(warning.category, UserWarning)
    assert f"Rename it to {hook} " in str(warning.message)


def test_the_warning_points_at_the_misspelt_def() -> None:
    """The warning's file and line are those of the misspelt method, not of looppool."""
    with pytest.warns(HookNameWarning) as record:

        class Fetch(looppool.SafeWorker):
            async def initialize(self) -> None:
                """Never called by the pool."""

            def process_message(self, message: object) -> object:
                """Echo."""
                return message

    [warning] = record
    assert warning.filename == __file__
    assert warning.lineno == Fetch.initialize.__code__.co_firstlineno


@pytest.mark.parametrize("name", ["initialize", "finalize", "on_message", "processMessage"])
def test_no_warning_when_the_hook_is_defined_too(name: str) -> None:
    """A near miss beside the real hook (here or in a base class) is the user's own method."""
    hook = NEAR_MISSES.get(name, "process_message")

    def real(self: looppool.Worker, *args: object) -> None:
        """The real hook."""

    def other(self: looppool.Worker) -> None:
        """The user's own method."""

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        type("Both", (looppool.Worker,), {hook: real, name: other})
        base = type("Base", (looppool.Worker,), {hook: real})
        type("Derived", (base,), {name: other})
    assert record == []


@pytest.mark.parametrize(
    "name",
    [
        "initialise_db",
        "finalise_batch",
        "initial",
        "final",
        "finish",
        "init",
        "setup",
        "start",
        "close",
        "process",
        "process_item",
        "process_result",
        "preprocess_message",
        "message",
        "handle",
        "run",
        "normalise",
        "_initialize",
        "_process_message",
    ],
)
def test_ordinary_method_names_do_not_warn(name: str) -> None:
    """Helpers whose names merely resemble a hook draw no warning."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        type("Plain", (looppool.Worker,), {name: lambda self: None})
    assert record == []


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_spawned_workers_do_not_warn_again(tmp_path: Path, method: str) -> None:
    """The parent warns once; workers that import the module again stay quiet."""
    (tmp_path / "misspelt.py").write_text(
        textwrap.dedent(
            """
            import looppool

            class Greeter(looppool.SafeWorker):
                def initialize(self):
                    self.greeting = "hello"

                def process_message(self, message):
                    return getattr(self, "greeting", "initialise() never ran")
            """
        )
    )
    code = textwrap.dedent(
        """
        import asyncio, looppool, misspelt

        async def main():
            async with looppool.Pool(misspelt.Greeter, size=2, start_method="spawn") as pool:
                return [await pool.submit(i) for i in range(2)]

        if __name__ == "__main__":
            print(asyncio.run(main()))
        """
    )
    (tmp_path / "main.py").write_text(code)
    proc = subprocess.run(
        [sys.executable, "-W", "default", "main.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "['initialise() never ran', 'initialise() never ran']\n"
    assert proc.stderr.count("HookNameWarning") == 1, proc.stderr
    assert "misspelt.py:5: HookNameWarning: Greeter.initialize() looks like" in proc.stderr


# -- errors --------------------------------------------------------------------------------


class Echo(looppool.Worker):
    """Replies with the message."""

    def process_message(self, message: object) -> object:
        """Echo."""
        return message


async def test_queue_full_is_also_asyncio_queue_full() -> None:
    """put_nowait above max_pending raises looppool.QueueFull, which asyncio code catches too."""
    assert issubclass(looppool.QueueFull, looppool.LooppoolError)
    async with InlinePool(Echo, max_pending=1) as pool:
        pool.put_nowait("fills the pool")
        with pytest.raises(asyncio.QueueFull) as caught:
            pool.put_nowait("one too many")
    assert isinstance(caught.value, looppool.QueueFull)
    assert "max_pending=1" in str(caught.value)
    copy = pickle.loads(pickle.dumps(caught.value))
    assert isinstance(copy, asyncio.QueueFull)
    assert str(copy) == str(caught.value)


async def test_results_with_on_result_says_why_and_what_to_do() -> None:
    """results() on a pool made with on_result raises a LooppoolError naming both and the fix."""

    def keep(value: object) -> None:
        """The on_result callback."""

    async with InlinePool(Echo, name="crawler", on_result=keep) as pool:
        with pytest.raises(looppool.LooppoolError) as caught:
            await anext(pool.results())
    assert type(caught.value) is looppool.LooppoolError
    message = str(caught.value)
    assert message.startswith(f"pool 'crawler' was made with on_result={keep!r}")
    assert "results() would never yield one" in message
    assert "made without on_result" in message


# -- reprs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "noun"), [(1, "1 worker "), (2, "2 workers ")])
async def test_pool_repr_counts_workers_in_words(size: int, noun: str) -> None:
    """A Pool's repr says "1 worker", "2 workers"."""
    pool = looppool.Pool(Echo, size, loop="asyncio", start_method="fork")
    assert f"new, {noun}(asyncio, fork)" in repr(pool)


@pytest.mark.parametrize(("size", "noun"), [(1, "1 worker "), (3, "3 workers ")])
async def test_inline_pool_repr_counts_workers_in_words(size: int, noun: str) -> None:
    """An InlinePool's repr says "1 worker (inline)", "3 workers (inline)"."""
    async with InlinePool(Echo, size) as pool:
        assert f"running, {noun}(inline), 0 in flight" in repr(pool)


# -- the noxfile finds pyenv's interpreters --------------------------------------------------


@pytest.fixture
def noxfile(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The repository's noxfile.py, loaded with a stand-in for nox (the tests need no nox)."""
    if not (ROOT / "noxfile.py").is_file():
        pytest.skip("not run from a source tree")
    stand_in = types.ModuleType("nox")
    stand_in.options = types.SimpleNamespace()  # type: ignore[attr-defined]
    stand_in.Session = object  # type: ignore[attr-defined]
    stand_in.session = lambda *args, **kwargs: lambda function: function  # type: ignore[attr-defined]
    stand_in.parametrize = lambda *args, **kwargs: lambda function: function  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nox", stand_in)
    # Its import puts pyenv's interpreters on this process's PATH: undone at teardown.
    monkeypatch.setenv("PATH", os.environ.get("PATH", ""))
    spec = importlib.util.spec_from_file_location("looppool_noxfile", ROOT / "noxfile.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_python(directory: Path, name: str) -> Path:
    """An executable file ``name`` in ``directory`` (made if need be)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_noxfile_takes_pyenv_interpreters_where_path_has_only_shims(
    noxfile: types.ModuleType, tmp_path: Path
) -> None:
    """Shims and missing versions are replaced by pyenv's newest release; real ones stay."""
    root = tmp_path / "pyenv"
    fake_python(root / "shims", "python3.12")
    fake_python(root / "shims", "python3.13")
    for version in ("3.12.1", "3.12.10", "3.12.9", "3.13.0", "3.13.1rc1", "3.13.2t"):
        fake_python(root / "versions" / version / "bin", f"python{version[:4]}")
    (root / "versions" / "3.13.5" / "bin").mkdir(parents=True)  # no interpreter in it
    system = tmp_path / "usr-bin"
    fake_python(system, "python3.11")
    environ = {"PYENV_ROOT": str(root), "PATH": f"{root / 'shims'}{os.pathsep}{system}"}
    added = noxfile.use_pyenv_pythons(environ, ["3.11", "3.12", "3.13", "3.14"])
    assert added == [root / "versions" / "3.12.10" / "bin", root / "versions" / "3.13.0" / "bin"]
    assert environ["PATH"].split(os.pathsep) == [
        *map(str, added),
        str(root / "shims"),
        str(system),
    ]
    path = environ["PATH"]
    assert shutil.which("python3.11", path=path) == str(system / "python3.11")
    assert shutil.which("python3.12", path=path) == str(added[0] / "python3.12")


def test_noxfile_leaves_path_alone_without_pyenv(noxfile: types.ModuleType, tmp_path: Path) -> None:
    """No pyenv root (or nothing in it): PATH is not touched."""
    environ = {"PYENV_ROOT": str(tmp_path / "none"), "PATH": str(tmp_path)}
    assert noxfile.use_pyenv_pythons(environ, ["3.11", "3.12", "3.13"]) == []
    assert environ["PATH"] == str(tmp_path)


def test_noxfile_finds_this_machines_pyenv_pythons(noxfile: types.ModuleType) -> None:
    """Each of 3.11-3.13 that pyenv has here resolves to a working interpreter of that version."""
    root = noxfile.pyenv_root(os.environ)
    minors = [m for m in noxfile.PYTHONS if noxfile.pyenv_bin(root, m) is not None]
    if not minors:
        pytest.skip("pyenv has none of the project's Python versions here")
    for minor in minors:
        found = shutil.which(f"python{minor}")
        assert found is not None
        proc = subprocess.run(
            [found, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert proc.stdout == f"{minor}\n"
