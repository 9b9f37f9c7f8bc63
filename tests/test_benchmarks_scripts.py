"""Smoke runs of the scripts in benchmarks/: each starts, measures and reports, in seconds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_backpressure_rss_measures_before_and_after() -> None:
    """A tiny run: a calibration, then max_results=None and 4096, every result delivered."""
    done = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "backpressure_rss.py"),
            "--results",
            "3000",
            "--per-message",
            "100",
            "--slow-factor",
            "2",
            "--repeat",
            "1",
            "--scenarios",
            "fanout-wait",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("| fanout-wait | - |") for line in lines), done.stdout
    assert any(line.startswith("| fanout-wait | 4096 |") for line in lines), done.stdout
    report = json.loads("\n".join(lines[lines.index("{") :]))
    runs = report["scenarios"]["fanout-wait"]["runs"]
    assert set(runs) == {"-", "4096"}
    for measured in runs.values():
        (run,) = measured
        assert run["results"] == run["expected"] == 3000
        assert run["parent_peak_mib"] > 0
        assert run["worker_peak_mib"] > 0
