"""benchmarks/gpu_check.sh without a GPU: its --dry-run end to end (tiny shapes on CPU, every step of the GPU
run), so the script cannot rot between GPU runs; its step limits within one 8-minute device call; and its
refusal to run the real check without a GPU.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
STEPS = {"env", "tests", "kernels", "trainer", "muon"}


def git_status() -> str | None:
    done = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


def test_step_limits_fit_one_eight_minute_run():
    limits = {m[1]: int(m[2]) for m in re.finditer(r"^LIMIT_(\w+)=(\d+)$", SCRIPT.read_text(), re.M)}
    assert {name.lower() for name in limits} == STEPS
    assert sum(limits.values()) <= 480, limits


def test_dry_run_runs_every_step_from_outside_the_repository(tmp_path):
    out, cwd = tmp_path / "results", tmp_path / "elsewhere"
    cwd.mkdir()
    before = git_status()
    done = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", str(out)], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    assert set(summary["steps"]) == STEPS
    assert all(s["outcome"] == "ok" and s["seconds"] <= s["limit_s"] for s in summary["steps"].values()), summary
    assert f"retro from {REPO / 'retro' / '__init__.py'}" in (out / "env.log").read_text()  # this checkout
    assert "test_kernels_gpu.py::test_newton_schulz[bf16-stack]" in (out / "tests.log").read_text()

    trainer = json.loads((out / "trainer.json").read_text())
    assert trainer["dry_run"] and trainer["config"] == "configs/paper/tinyllama-484-math-m32.toml"
    assert set(trainer["runs"]) == {"eager", "compiled"}
    for run in trainer["runs"].values():
        assert run["steps"] == [2] and run["tokens_per_s"] > 0 and 0 < run["mfu"] < 1
        assert run["peak_memory_gb"] is None  # CPU: no CUDA peak
        assert run["mean_r"] > 8  # curriculum none: r around max_mean = 32 from the first step
    # The same model, data and draws: fp32 on CPU, compiled (traced) and eager agree closely.
    assert trainer["compiled_vs_eager"]["max_loss_rel_diff"] < 1e-5
    logs = {name: (out / "trainer" / f"{name}.log").read_text() for name in ("eager", "compiled")}
    assert "'compile': False" in logs["eager"] and "'compile': True" in logs["compiled"]
    assert "runs/paper/" not in logs["eager"] + logs["compiled"]  # out_dir: the scratch folder, not the config's

    kernels = json.loads((out / "kernels.json").read_text())
    assert {r["kernel"] for r in kernels["rows"]} == {"newton_schulz", "adapter"}
    muon = json.loads((out / "muon.json").read_text())
    assert muon["optimizer_rows"] and muon["newton_schulz_rows"]
    if before is not None:
        assert git_status() == before, "the dry run wrote into the repository"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_the_real_check_refuses_to_run_without_a_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    done = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "results")], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert "sees no CUDA GPU" in done.stdout + done.stderr
    assert "FAILED before running anything" in done.stderr
    assert not (tmp_path / "results" / "tests.log").exists()
