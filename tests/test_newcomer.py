"""What a newcomer trips over (issue 18): packaging, hook spellings, errors, reprs, imports.

The packaging tests build the sdist and the wheel from this source tree with
hatchling (the build backend, in the ``test`` extra) and look inside them.
"""

from __future__ import annotations

import email.parser
import importlib.metadata
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import looppool

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
