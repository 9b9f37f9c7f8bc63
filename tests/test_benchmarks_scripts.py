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


SHM_VS_PIPE_TINY = ("--rounds", "1", "--sizes", "1", "--mib", "2")


def test_shm_vs_pipe_echoes_every_way_and_reports_each() -> None:
    """A tiny run: 1 MiB echoed twice each way; a row per way, the pipe as the 1.00x baseline."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "shm_vs_pipe.py"), *SHM_VS_PIPE_TINY],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[3:] if line}
    assert set(rows) == {"way", "pipe", "memfd-copy", "memfd-punch", "memfd-adopt", "posix-shm"}
    assert "1.00x" in rows["pipe"]


def test_w5_steady_streams_every_payload_type_on_one_pool() -> None:
    """A tiny run (payloads scaled down): a line with a rate for each payload type and size."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "w5_steady.py"), "--passes", "1", "--scale", "0.01"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if "MiB/s" in line]
    assert [line.split()[0] for line in lines[:4]] == ["bytes", "bytes", "bytearray", "bytearray"]
    assert all(line.split(": ")[1].split()[0].replace(",", "").isdigit() for line in lines)


def test_paired_measures_two_trees_alternately() -> None:
    """A tiny paired run (this interpreter twice): a median and a ratio for every mode and key."""
    done = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "paired.py"),
            *("--python", f"a={sys.executable}", "--python", f"b={sys.executable}"),
            *("--rounds", "1", "-n", "500", "--submits", "20"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[1:]]
    assert [(row[0], row[1]) for row in rows] == [
        (mode, key) for mode in ("stream", "submit") for key in ("rate", "parent_us", "workers_us")
    ]
    assert all(float(row[3]) > 0 and float(row[5]) > 0 for row in rows if row[1] == "rate")
