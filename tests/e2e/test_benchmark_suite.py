"""python -m benchmarks.run end to end, cheaply: its command line, and a suite row whose benchmark rejects a flag
the suite passes (a real child process, stopped by its argparse before any work): the row fails, names the flag,
and is not rerun without it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import benchmarks.run as suite

ROOT = Path(__file__).parents[2]


def test_suite_help_and_list():
    for flag in ("--help", "--list"):
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.run", flag], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert "muon" in proc.stdout and "--no-torch-muon" in proc.stdout and "(missing)" not in proc.stdout


def test_a_rejected_flag_fails_the_suite_and_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(suite.CPU_SETTINGS, "data_throughput", "--docs 10 --bogus-flag 3")
    stem = tmp_path / "suite"
    assert suite.main(["--only", "data_throughput", "--out", str(stem)]) == 1
    report = json.loads(stem.with_suffix(".json").read_text())
    (record,) = report["benchmarks"]
    assert record["status"] == "failed" and record["returncode"] == 2
    assert record["args"] == ["--docs", "10", "--bogus-flag", "3"]
    assert "unrecognized arguments: --bogus-flag 3" in record["stderr"]
    assert "rejects --bogus-flag" in record["note"]
    assert "rejects --bogus-flag" in stem.with_suffix(".md").read_text()
