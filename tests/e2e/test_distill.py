"""Distillation in retro.train: kd_weight 0 is today's run, FSDP2 = one process, resume is exact, a missing teacher."""

from __future__ import annotations

import shutil

import pytest
from train_helpers import base_overrides, make_assets, read_metrics, run_train

from retro.training import checkpoint

KD = {"distill.kd_weight": 0.5, "distill.temperature": 2.0, "model.state_init": "zeros"}  # zeros: s0 noise is per rank


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    model, data = make_assets(root)
    return model, data, root / "src"  # src: the unmodified Hugging Face source model, with its tokenizer


def test_kd_weight_zero_is_the_plain_run(assets, tmp_path):
    model, data, source = assets
    run_train(base_overrides(model, data, tmp_path / "plain"))
    run_train(base_overrides(model, data, tmp_path / "kd0", **{"distill.teacher": source, "distill.kd_weight": 0.0}))
    plain, kd0 = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "kd0")
    assert len(plain) == len(kd0) == 6
    for a, b in zip(plain, kd0):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * a["loss"], (a, b)
        assert abs(b["ce"] - b["loss"]) <= 1e-6 * b["loss"] and b["kd"] > 0  # measured, not trained on
    assert abs(plain[-1]["val_loss_r2"] - kd0[-1]["val_loss_r2"]) <= 1e-6 * plain[-1]["val_loss_r2"]


def test_two_rank_fsdp_matches_single_process_and_resume_is_exact(assets, tmp_path):
    model, data, source = assets
    extra = {**KD, "distill.teacher": source, "checkpoint.every": 3}
    run_train(base_overrides(model, data, tmp_path / "one", **extra))
    run_train(base_overrides(model, data, tmp_path / "two", **extra), nproc=2)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len({m["r"] for m in one}) > 1  # the recurrence really varied
    for a, b in zip(one, two):
        assert abs(a["loss"] - (0.5 * a["ce"] + 0.5 * 2.0**2 * a["kd"])) <= 1e-5 * a["loss"], a
        for key in ("loss", "ce", "kd"):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (key, a, b)
    # Resume: drop the final checkpoint, continue the 2-rank run from step 3; steps 4-6 repeat exactly.
    shutil.rmtree(checkpoint.checkpoint_dir(tmp_path / "two", 6))
    run_train(base_overrides(model, data, tmp_path / "two", **extra) + ["--resume", "auto"], nproc=2)
    resumed = read_metrics(tmp_path / "two")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(two, resumed):
        for key in ("loss", "ce", "kd"):
            assert abs(a[key] - b[key]) <= 1e-6 * abs(a[key]), (key, a, b)


def test_a_missing_teacher_stops_the_run_before_training(assets, tmp_path):
    model, data, _ = assets
    nope = {"distill.teacher": tmp_path / "nope"}
    missing = run_train(base_overrides(model, data, tmp_path / "a", **nope), check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert not (tmp_path / "a" / "checkpoints").exists()
