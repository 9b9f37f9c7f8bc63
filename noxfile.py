"""Sessions: ``nox`` runs the default ones (tests on every Python and loop, lint, types, docs).

nox finds ``python3.11``, ``python3.12`` and ``python3.13`` on ``PATH``; it has
no pyenv support of its own, and pyenv's shims answer "command not found"
for every version that pyenv does not have activated. So, at import, each of
those versions that is missing from ``PATH`` or is only a pyenv shim there is
taken from pyenv's own ``versions/`` directory (the newest release of that
minor version), when pyenv has it: ``nox`` then runs the tests on every
Python the machine has, as ``.ci/run`` does.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, MutableMapping
from pathlib import Path

import nox

PYTHONS = ["3.11", "3.12", "3.13"]


def pyenv_root(environ: Mapping[str, str]) -> Path:
    """Where pyenv keeps its interpreters: ``$PYENV_ROOT``, else ``~/.pyenv``."""
    root = environ.get("PYENV_ROOT")
    return Path(root) if root else Path.home() / ".pyenv"


def pyenv_bin(root: Path, minor: str) -> Path | None:
    """The ``bin`` directory of pyenv's newest release of ``minor`` (e.g. 3.12.4 for 3.12).

    Releases only (``3.12.4``, not ``3.12-dev``, ``3.13.0rc1`` or ``3.13.0t``),
    with a ``python3.12`` in their ``bin``; ``None`` if pyenv has none.
    """
    release = re.compile(re.escape(minor) + r"\.([0-9]+)")
    found = []
    for path in (root / "versions").glob(f"{minor}.*"):
        match = release.fullmatch(path.name)
        if match and os.access(path / "bin" / f"python{minor}", os.X_OK):
            found.append((int(match[1]), path / "bin"))
    return max(found)[1] if found else None


def use_pyenv_pythons(environ: MutableMapping[str, str], minors: list[str]) -> list[Path]:
    """Put pyenv's interpreters of ``minors`` first on ``environ["PATH"]`` where needed.

    Only for a minor version whose ``pythonX.Y`` is not on ``PATH``, or is a
    pyenv shim (which fails unless that version is activated). Returns the
    directories added.
    """
    root = pyenv_root(environ)
    added = []
    for minor in minors:
        found = shutil.which(f"python{minor}", path=environ.get("PATH", os.defpath))
        # pyenv's shims, and pyenv-virtualenv's: a "shims" directory under the root.
        if found is not None and not (
            Path(found).parent.name == "shims" and root in Path(found).parents
        ):
            continue
        directory = pyenv_bin(root, minor)
        if directory is not None:
            added.append(directory)
    if added:
        environ["PATH"] = os.pathsep.join([*map(str, added), environ.get("PATH", os.defpath)])
    return added


use_pyenv_pythons(os.environ, PYTHONS)

nox.options.sessions = ["tests", "lint", "types", "docs"]
nox.options.reuse_existing_virtualenvs = True


@nox.session(python=PYTHONS)
@nox.parametrize("loop", ["asyncio", "uvloop"])
def tests(session: nox.Session, loop: str) -> None:
    """The test suite, with the parent and the workers on asyncio or on uvloop."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs, env={"LOOPPOOL_TEST_LOOP": loop})


LINTED = ["src", "tests", "examples", "benchmarks", "noxfile.py"]


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff: lint and format."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", *LINTED)
    session.run("ruff", "format", "--check", *LINTED)


@nox.session(python="3.11")
def types(session: nox.Session) -> None:
    """mypy --strict on the package, a typed user program, and the noxfile."""
    session.install("-e", ".[test]", "mypy>=1.10", "types-psutil", "nox")
    session.run("mypy", "--strict", "src/looppool", "examples/typed_usage.py", "noxfile.py")


@nox.session(python="3.11")
def aiostatsd(session: nox.Session) -> None:
    """The aiostatsd path of looppool.metrics (cystatsd ships no wheels: built here)."""
    session.install("-e", ".[test]")
    session.install("cython", "setuptools", "wheel")
    session.install("--no-build-isolation", "aiostatsd")
    session.run(
        "pytest",
        "tests/test_metrics.py",
        "tests/test_monitor.py",
        "-k",
        "aiostatsd",
        *session.posargs,
    )


@nox.session(python="3.11")
def soak(session: nox.Session) -> None:
    """A long run with random worker kills (not in the default sessions)."""
    session.install("-e", ".")
    session.run("python", "benchmarks/soak.py", *session.posargs)


@nox.session(python="3.11")
def ray(session: nox.Session) -> None:
    """RayPool on a local Ray instance, then on a two-node `ray start` cluster (127.0.0.1 only)."""
    session.install("-e", ".[test,ray]")
    session.run("pytest", "tests/test_ray.py", "tests/test_ray_cluster.py", *session.posargs)


@nox.session(python="3.11")
def properties(session: nox.Session) -> None:
    """The hypothesis state machine: random puts, submits, kills and stops."""
    session.install("-e", ".[test]")
    session.run(
        "pytest", "tests/test_properties.py", *session.posargs, env={"LOOPPOOL_PROPERTIES": "1"}
    )


@nox.session(python="3.11")
def faults(session: nox.Session) -> None:
    """The full fault-injection catalogue (the default run has a sample of it)."""
    session.install("-e", ".[test]")
    session.run("pytest", "tests/test_faults.py", "-m", "slow", *session.posargs)


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """The documentation site: mkdocs build --strict (a broken link or reference fails)."""
    session.install("-e", ".[docs]")
    site = session.create_tmp() + "/site"  # not the source tree's build/site
    # Material's notice about MkDocs 2.0 is not about this build.
    env = {"NO_MKDOCS_2_WARNING": "1"}
    session.run("mkdocs", "build", "--strict", "--site-dir", site, env=env)
