"""Chat data with the loss on the assistant's tokens, end to end under FSDP2 (gloo): the step's loss is
the mean over every loss token of the step on all ranks, and a resume continues loss for loss."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from train_helpers import base_overrides, make_chat_assets, read_metrics, run_train

from retro.training import checkpoint

STEPS = {"train.steps": 4, "checkpoint.every": 2, "checkpoint.keep_last": 3, "model.state_init": "zeros"}


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """(model, data, run dir) of a 4-step 2-rank run on masked chat data, checkpointed at step 2."""
    root = tmp_path_factory.mktemp("masked_chat")
    model, data = make_chat_assets(root)
    out = root / "two"
    run_train(base_overrides(model, data, out, **STEPS), nproc=2)
    return model, data, out


def test_two_rank_masked_run_resumes_loss_for_loss(two_rank_run, tmp_path):
    model, data, reference_dir = two_rank_run
    reference = {m["step"]: m for m in read_metrics(reference_dir)}
    out = tmp_path / "resumed"
    shutil.copytree(checkpoint.checkpoint_dir(reference_dir, 2), checkpoint.checkpoint_dir(out, 2))
    run_train(base_overrides(model, data, out, **STEPS) + ["--resume", "auto"], nproc=2)
    records = read_metrics(out)
    assert [m["step"] for m in records] == [3, 4]
    for m in records:
        want = reference[m["step"]]
        assert np.isfinite(m["loss"]) and abs(m["loss"] - want["loss"]) <= 1e-6 * want["loss"], (m, want)
    last = records[-1]
    assert abs(last["val_loss_r2"] - reference[4]["val_loss_r2"]) <= 1e-6 * reference[4]["val_loss_r2"]


def test_one_rank_matches_two_ranks_with_other_micro_batches(two_rank_run, tmp_path):
    """2 ranks x micro-batch 2 x accumulation 2 = 1 rank x micro-batch 4 x accumulation 2: the same 8 windows per
    step, grouped into micro-batches differently, so their loss tokens are spread differently. Only a step loss
    normalised by the step's loss tokens on all ranks (not a mean of micro-batch means) agrees."""
    model, data, reference_dir = two_rank_run
    reference = read_metrics(reference_dir)
    run_train(base_overrides(model, data, tmp_path / "one", **STEPS, **{"train.micro_batch": 4}))
    records = read_metrics(tmp_path / "one")
    assert [m["step"] for m in records] == [m["step"] for m in reference] == [1, 2, 3, 4]
    for x, y in zip(records, reference):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * y["loss"], (x, y)
