"""Smoke tests of the benchmark (``looppool bench``): it runs, prints, grades, cleans up.

Tiny sizes and one run each: these check the harness, never speed (speed
lives in the benchmark itself).
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

import looppool._bench
from looppool._bench import main
from looppool._bench._measure import Result
from looppool._bench._oob import OobPool
from looppool._bench._report import targets
from looppool._bench._workloads import PAYLOADS

pytestmark = [
    pytest.mark.timeout(60),
    # aiomultiprocess calls asyncio.iscoroutinefunction, deprecated in 3.14.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:aiomultiprocess"),
]


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def _row(out: str, title: str, *cells: str) -> str:
    """The line of the table titled ``title`` that starts with ``cells``."""
    table = out.split(title, 1)[1].split("\n\n", 1)[0]
    pattern = r"\s+".join(re.escape(c) for c in cells)
    [line] = [x for x in table.splitlines() if re.match(rf"\s+{pattern}\s", x)]
    return line


def test_quick_run_prints_every_table(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A --quick run prints each table, README-path rows beside their limits, no graded targets."""
    out_file = tmp_path / "bench.json"
    status = main(
        [
            "--quick",
            "--repeat",
            "1",
            "--start-method",  # the quickest start: the limits spawn all the same
            "fork",
            "--workloads",
            "W1,W2,W3,W4,W6",
            "--systems",
            "limit,limit-async,looppool,looppool-tuned-asyncio",
            "--json",
            str(out_file),
        ]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    for title in ("W1 tiny", "W2 io", "W3 mixed", "W4 latency", "W6 scaling"):
        assert title in out
    # The README path and the tuned row are each compared with the limit of
    # their handler kind: the async one's own row reads 1.00x, as does limit's.
    for table in ("W1 tiny", "W4 latency"):
        assert re.search(r"\s1\.00x\s", _row(out, table, "limit-async"))
        assert re.search(r"\s1\.00x\s", _row(out, table, "limit"))
    assert "async def rows: limit-async" in out
    assert "Targets: graded only in full runs" in out
    assert "[met]" not in out
    assert "MISSED" not in out
    report = json.loads(out_file.read_text())
    assert report["failed"] == []
    assert report["leftover_processes"] == []
    assert report["targets"] == []
    measured = {(r["workload"], r["system"]) for r in report["results"] if r["skipped"] is None}
    assert ("W1", "looppool") in measured
    assert ("W4", "limit-async") in measured
    # limit-async runs only where handler kinds differ: not W2, W3.
    assert ("W2", "limit-async") not in measured
    sizes = {(key, r["size"]) for key, rows in report["scaling"].items() for r in rows}
    assert sizes == {("W1", 1), ("W1", 2), ("W3", 1), ("W3", 2)}
    w6 = [line for line in out.split("W6 scaling")[1].splitlines() if re.match(r"\s+[12]\s", line)]
    assert len(w6) == 2


def test_w5_moves_each_payload_and_measures_memory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """W5 echoes each payload type and size through the README path and limit-oob, checked."""
    out_file = tmp_path / "bench.json"
    status = main(
        [
            "--quick",
            "--repeat",
            "1",
            "--workloads",
            "W5",
            "--systems",
            "looppool,limit-oob",
            "--json",
            str(out_file),
        ]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    report = json.loads(out_file.read_text())
    assert report["failed"] == []
    assert report["leftover_processes"] == []
    types = {"bytes", "bytearray", *(["numpy"] if _numpy() else [])}
    wanted = {p.label for p in PAYLOADS if p.type in types}
    for system in ("looppool", "limit-oob"):
        rows = {r["part"]: r for r in report["results"] if r["system"] == system}
        assert set(rows) == wanted
        for part, row in rows.items():
            assert row["mib_per_s"][0] > 0, part
            assert row["peak_rss_mib"][0] >= 0, part
            assert re.search(r"\s1\.00x\s", _row(out, "W5 large", *part.split(), "limit-oob")), part
    if _numpy() is None:
        assert "not run: numpy payloads — numpy is not installed" in out


def test_w5_without_numpy_says_so(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without numpy, W5 runs its bytes payloads and one line says why numpy's did not run."""
    monkeypatch.setitem(sys.modules, "numpy", None)  # makes "import numpy" fail
    status = main(["--quick", "--repeat", "1", "--workloads", "W5", "--systems", "limit-oob"])
    out = capsys.readouterr().out
    assert status == 0, out
    [note] = [line for line in out.splitlines() if "numpy payloads" in line]
    assert "bench extra" in note
    assert "numpy 1 MiB" not in out
    assert "bytearray 16 MiB" in out


async def test_limit_oob_returns_each_payload_intact() -> None:
    """limit-oob's protocol-5 framing gives back the same type and bytes, through a child."""
    from looppool._bench import _handlers

    numpy = _numpy()
    payloads: list[Any] = [b"", b"abc" * 100_000, bytearray(b"xyz" * 400_000), (1, [b"in band"])]
    if numpy is not None:
        payloads.append(numpy.arange(300_000, dtype=numpy.int64).reshape(600, 500)[:, ::2])
        payloads.append(numpy.arange(300_000, dtype=numpy.float32))
    pool = OobPool(_handlers.aio_echo, 1)
    await pool.start()
    try:
        replies = await asyncio.gather(*(pool.submit(p) for p in payloads))
    finally:
        await pool.stop()
    for sent, got in zip(payloads, replies, strict=True):
        assert type(got) is type(sent)
        if numpy is not None and isinstance(sent, numpy.ndarray):
            assert numpy.array_equal(got, sent)
        else:
            assert got == sent


def _result(workload: str, system: str, part: str = "", **values: list[float]) -> Result:
    result = Result(workload, system, 2, 100, part, start_seconds=[0.1])
    for name, value in values.items():
        setattr(result, name, value)
    if not result.wall_seconds:
        result.wall_seconds = [1.0]
    return result


def test_targets_grade_the_readme_path_against_the_limit_of_its_handler_kind() -> None:
    """W1/W4 targets compare looppool with limit-async, not the faster def-handler limit."""
    by_workload = {
        "W1": [
            _result("W1", "looppool", rate=[60_000.0], cpu_us_per_message=[15.0]),
            _result("W1", "limit", rate=[1_000_000.0], cpu_us_per_message=[1.0]),
            _result("W1", "limit-async", rate=[100_000.0], cpu_us_per_message=[10.0]),
            _result("W1", "aiomp", rate=[7_000.0]),
        ],
        "W4": [
            _result("W4", "looppool", p50_us=[60.0], p99_us=[200.0]),
            _result("W4", "limit", p50_us=[10.0], p99_us=[10.0]),
            _result("W4", "limit-async", p50_us=[40.0], p99_us=[100.0]),
        ],
    }
    graded, missing = targets(by_workload, {"W3": 400}, {})
    lines = {t.name: (t.met, t.detail) for t in graded}
    assert lines == {
        "W1 CPU/msg ≤ 1.5 x limit-async": (True, "15.0 vs 10.0 µs: 1.50x"),
        "W1 msgs/s ≥ 0.6 x limit-async": (True, "60,000 vs 100,000: 0.60x"),
        "W1 msgs/s ≥ 8 x aiomp": (True, "60,000 vs 7,000: 8.57x"),
        "W4 p50 ≤ 1.5 x limit-async": (True, "60.0 vs 40.0 µs: 1.50x"),
        "W4 p99 ≤ 2 x limit-async": (True, "200 vs 100 µs: 2.00x"),
    }
    assert missing == []


def test_a_target_is_graded_on_the_ratio_it_prints() -> None:
    """A ratio that prints as the bound is met; one that prints past it is missed."""
    by_workload = {
        "W1": [
            _result("W1", "looppool", rate=[1.0], cpu_us_per_message=[15.04]),
            _result("W1", "limit-async", rate=[1.0], cpu_us_per_message=[10.0]),
        ],
        "W2": [
            _result("W2", "looppool", wall_seconds=[1.306]),
            _result("W2", "limit", wall_seconds=[1.0]),
        ],
    }
    graded, missing = targets(by_workload, {"W3": 400}, {})
    lines = {t.name: (t.met, t.detail) for t in graded}
    assert lines["W1 CPU/msg ≤ 1.5 x limit-async"] == (True, "15.0 vs 10.0 µs: 1.50x")
    assert lines["W2 wall ≤ 1.3 x limit"] == (False, "1.306 vs 1.000 s: 1.31x")
    assert missing == ["W1 vs aiomp"]


def test_peers_run_or_say_why(capsys: pytest.CaptureFixture[str]) -> None:
    """The peers (ProcessPoolExecutor, aiomultiprocess if installed) run W1 and W4."""
    status = main(["--quick", "--repeat", "1", "--workloads", "W1,W4", "--systems", "ppe,aiomp"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "ppe" in out
    assert "aiomp" in out  # measured, or "not run: aiomp — aiomultiprocess is not installed"


def test_deadlines_row_runs_w1_and_w4_beside_the_readme_path(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """looppool-deadlines (message_timeout, hang_timeout set) runs W1 and W4 only, with a ratio."""
    from looppool._bench._registry import make_system

    system = make_system("looppool-deadlines", 2, "fork")
    assert getattr(system, "options", None) == {"message_timeout": 60, "hang_timeout": 10}
    out_file = tmp_path / "bench.json"
    argv = ["--quick", "--repeat", "1", "--start-method", "fork", "--workloads", "W1,W2,W4"]
    argv += ["--systems", "looppool,looppool-deadlines", "--json", str(out_file)]
    status = main(argv)
    out = capsys.readouterr().out
    assert status == 0, out
    report = json.loads(out_file.read_text())
    assert report["failed"] == []
    assert report["leftover_processes"] == []
    measured = {(r["workload"], r["system"]) for r in report["results"] if r["skipped"] is None}
    assert measured >= {("W1", "looppool-deadlines"), ("W4", "looppool-deadlines")}
    assert ("W2", "looppool-deadlines") not in measured
    notes = [line for line in out.splitlines() if "looppool-deadlines ÷ looppool" in line]
    assert len(notes) == 2
    assert "msgs/s" in notes[0]
    assert "p50" in notes[1]


def test_unknown_system_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A misspelt system name stops at once with status 2, naming the known ones."""
    with pytest.raises(SystemExit) as info:
        main(["--systems", "limit,nope"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "nope" in err
    assert "limit-oob" in err


def test_ray_rows_without_ray_are_one_note(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without Ray installed, the Ray rows are not run and say so in one line; nothing fails."""
    monkeypatch.setitem(sys.modules, "ray", None)  # makes "import ray" fail: Ray never starts
    monkeypatch.delitem(sys.modules, "looppool.ray", raising=False)
    out_file = tmp_path / "bench.json"
    status = main(
        [
            "--quick",
            "--repeat",
            "1",
            "--workloads",
            "W4",
            "--systems",
            "limit,looppool-ray,ray-call",
            "--json",
            str(out_file),
        ]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    [note] = [line for line in out.splitlines() if "not run —" in line]
    assert note.strip().startswith("looppool-ray, ray-call: not run — Ray is not installed")
    assert "looppool[ray]" in note
    report = json.loads(out_file.read_text())
    assert {r["system"] for r in report["results"]} == {"limit"}
    assert set(report["not_run"]) == {"looppool-ray", "ray-call"}


def _imports(path: Path, package: str) -> set[str]:
    """The modules of ``package`` that the module at ``path`` imports, anywhere in it."""
    name = path.stem
    here = package if name == "__init__" else f"{package}.{name}"
    base = here if name == "__init__" else package
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            parent = base.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (parent, node.module or "") if p)
            # "from .m import x" imports m, and x if it is a module; "from . import x"
            # imports the module x (its package is being imported already).
            found |= {f"{module}.{alias.name}" for alias in node.names}
            if node.module:
                found.add(module)
    return {m for m in found if m.startswith(package + ".") and m != here}


def test_the_bench_package_has_no_import_cycle() -> None:
    """No module of looppool._bench imports, directly or not, a module that imports it."""
    package = "looppool._bench"
    folder = Path(looppool._bench.__file__).parent
    modules = {
        (package if p.stem == "__init__" else f"{package}.{p.stem}"): p for p in folder.glob("*.py")
    }
    graph = {m: _imports(p, package) & set(modules) for m, p in modules.items()}
    # The system modules register in the registry, which imports neither.
    registry, systems, ray = (f"{package}.{m}" for m in ("_registry", "_systems", "_ray"))
    assert registry in graph[systems] & graph[ray]
    assert graph[registry] == set()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph[start] - seen:
            seen.add(nxt)
            if nxt == goal or reaches(nxt, goal, seen):
                return True
        return False

    cycles = sorted(m for m in graph if reaches(m, m, set()))
    assert cycles == []
