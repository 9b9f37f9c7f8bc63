"""Sessions: ``nox`` runs the default ones (tests on every Python and loop, lint, types, docs)."""

from __future__ import annotations

import nox

PYTHONS = ["3.11", "3.12", "3.13"]

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
