"""Smoke tests of the benchmark (``looppool bench``): it runs, prints, cleans up.

Tiny sizes and one run each: these check the harness, never speed (speed
lives in the benchmark itself, see docs/performance.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from looppool._bench import main

pytestmark = [
    pytest.mark.timeout(60),
    # aiomultiprocess calls asyncio.iscoroutinefunction, deprecated in 3.14.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:aiomultiprocess"),
]


def test_quick_run_prints_every_table(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A --quick run of every workload prints each table, the targets, and JSON."""
    out_file = tmp_path / "bench.json"
    status = main(
        [
            "--quick",
            "--repeat",
            "1",
            "--workloads",
            "W1,W2,W3,W4,scaling",
            "--systems",
            "limit,looppool-asyncio,ppe-batch",
            "--json",
            str(out_file),
        ]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    for title in ("W1 tiny", "W2 io", "W3 mixed", "W4 latency", "Scaling: W1"):
        assert title in out
    assert "limit" in out
    assert "looppool-asyncio" in out
    assert "Targets" in out
    report = json.loads(out_file.read_text())
    assert report["failed"] == []
    assert report["leftover_processes"] == []
    measured = {(r["workload"], r["system"]) for r in report["results"] if r["skipped"] is None}
    assert ("W1", "looppool-asyncio") in measured
    assert ("W4", "limit") in measured


def test_peers_run_or_say_why(capsys: pytest.CaptureFixture[str]) -> None:
    """The peers (ProcessPoolExecutor, aiomultiprocess if installed) run W1 and W4."""
    status = main(["--quick", "--repeat", "1", "--workloads", "W1,W4", "--systems", "ppe,aiomp"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "ppe" in out
    assert "aiomp" in out  # measured, or "not run: aiomp — aiomultiprocess is not installed"


def test_unknown_system_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A misspelt system name stops at once with status 2, naming the known ones."""
    with pytest.raises(SystemExit) as info:
        main(["--systems", "limit,nope"])
    assert info.value.code == 2
    assert "nope" in capsys.readouterr().err


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
            "W1,W4",
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
