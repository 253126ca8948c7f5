"""The step's metrics record: means of the draws, throughput and loop-aware MFU from the run's StepCost."""

from __future__ import annotations

import math

import pytest
import torch

from retro.training.metrics import StepCost
from retro.training.recurrence import Draw


def test_record_counts_the_mean_passes_and_the_objective_parts():
    draws = [Draw(mean=4, r=6, n=2, k=4, capped=False), Draw(mean=4, r=3, n=0, k=3, capped=True)]
    cost = StepCost(1024, lambda n, k: 10.0 * n + 30.0 * k, 1e6, 2, torch.device("cpu"))
    record = cost.record(7, {"loss": 2.5, "ce": 2.0, "kd": 3.0}, 0.7, [1e-3, 5e-5], draws, elapsed=0.5)
    assert (record["n"], record["k"], record["r"]) == (1.0, 3.5, 4.5)
    assert record["r_micro"] == [6, 3] and record["capped"] == 1 and record["mean_recurrence"] == 4
    assert record["tokens"] == 7 * 1024 and record["tokens_per_s"] == 2048
    assert record["mfu"] == pytest.approx((10.0 * 1.0 + 30.0 * 3.5) * 1024 / 0.5 / 1e6 / 2)
    assert (record["lr"], record["lr_groups"]) == (5e-5, [1e-3, 5e-5])
    assert (record["ce"], record["kd"], record["skipped"]) == (2.0, 3.0, False)
    assert record["peak_memory_bytes"] is None


@pytest.mark.parametrize("loss,norm", [(math.nan, 1.0), (1.0, math.inf)])
def test_a_non_finite_loss_or_norm_marks_the_step_skipped(loss, norm):
    cost = StepCost(8, lambda n, k: 1.0, 1.0, 1, torch.device("cpu"))
    record = cost.record(1, {"loss": loss}, norm, [1.0], [Draw(mean=1, r=1, n=0, k=1, capped=False)], elapsed=1.0)
    assert record["skipped"] and "ce" not in record


def test_resume_drops_a_partial_last_metrics_line_with_a_note(tmp_path, capsys):
    """A crash mid-write leaves a partial last line: the resume drops it (and the re-run steps), naming the file."""
    from retro.training.metrics import truncate_after

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 3, "lo')
    truncate_after(path, 1)
    out = capsys.readouterr().out
    assert "Traceback" not in out
    notes = [line for line in out.splitlines() if "partial" in line]
    assert len(notes) == 1 and notes[0].startswith(f"retro.train: note: {path}:3: ")
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n'
