"""Smoke test of benchmarks.scaling at toy size: it runs the 1-rank and both 2-rank layouts through
benchmarks.run's child entry, and its collective counts show the core unit's bounded gathers.
No timing assertions: times on shared cores are noise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
LAYOUTS = ["1 rank", "2 ranks, core unit", "2 ranks, per-layer units"]


def run_scaling(out: Path, args: str) -> dict:
    """benchmarks.scaling with `args` through benchmarks.run's child entry, one thread per rank; its JSON."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--child", "scaling", str(out), "--", *args.split()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "scaling.json").read_text())


def test_scaling_benchmark_writes_rows(tmp_path):
    args = "--hidden 32 --vocab 128 --seq 16 --batch 4 --recurrences 1,3 --repeats 1 --warmup 1"
    payload = run_scaling(tmp_path, args)
    assert payload["machine"]["torch"] and "benchmarks" in payload["command"]
    rows = {(row["r"], row["layout"]): row for row in payload["rows"]}
    assert sorted(rows) == sorted((r, layout) for r in (1, 3) for layout in LAYOUTS)
    for (r, layout), row in rows.items():
        assert row["k"] == r and row["n"] == 0
        assert row["median_s"] > 0 and row["tokens_per_s"] > 0 and row["cpu_s"] > 0
        assert (row["efficiency"] is None) == (layout == "1 rank")
    core = [rows[r, "2 ranks, core unit"]["all_gathers"] for r in (1, 3)]
    naive = [rows[r, "2 ranks, per-layer units"]["all_gathers"] for r in (1, 3)]
    assert core[0] == core[1] == 7, core  # prelude, core, coda: forward + backward; root: once; any r
    assert naive[1] > naive[0] > core[0], naive  # per-layer block units are re-gathered every pass
    assert rows[3, "2 ranks, per-layer units"]["all_gather_MiB"] > rows[3, "2 ranks, core unit"]["all_gather_MiB"]


def test_planner_all_gather_volume_matches_the_counted_bytes(tmp_path):
    """retro.plan's communication model against FSDP2's real all-gathers on 2 ranks: the counted
    unsharded bytes per step equal (every unit + every unit but the root, regathered for backward)
    x 4 bytes (fp32), the planner's volume before its (g-1)/g ring factor; within 1% (shard padding)."""
    from benchmarks.common import model_config
    from retro.planning.comm import comm_per_step
    from retro.planning.memory import sharding_units

    hidden, vocab, seq = 32, 128, 16
    args = f"--hidden {hidden} --vocab {vocab} --seq {seq} --batch 4 --recurrences 3 --repeats 1 --warmup 0"
    rows = {row["layout"]: row for row in run_scaling(tmp_path, args)["rows"]}
    config = model_config(hidden, "1,2,1", vocab, seq)  # the model the benchmark built (its default shape)
    planned = (
        comm_per_step(sharding_units(config), muon_params=0, gpus=2, shard=2, accum=1, reshard=True, param_bytes=4)[
            "all_gather"
        ]
        / 0.5
    )  # undo the ring factor (g-1)/g
    counted = rows["2 ranks, core unit"]["all_gather_bytes"]
    assert abs(counted - planned) / planned < 0.01, (counted, planned)
