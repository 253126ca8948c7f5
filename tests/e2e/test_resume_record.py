"""A resume is explicit about what changed (issue 24, item 4): each checkpoint records the job config it
was written with (`job_config.json`); a resume that changes what the checkpoint means is refused with one
line before anything in the run directory is written, an allowed change is printed as a note."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from train_helpers import base_overrides, make_assets, read_metrics

from retro.convert import convert
from retro.train import main as train_main
from retro.training.checkpoint import MARKER, RECORD, complete_checkpoints

STEPS = {"train.steps": 4, "checkpoint.every": 2}


def snapshot(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def train(model, data, out, capsys, **extra) -> tuple[int, str, str]:
    code = train_main([str(a) for a in base_overrides(model, data, out, **{**STEPS, **extra})])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Assets and a finished 4-step run (checkpoints at steps 2 and 4), copied by each test."""
    root = tmp_path_factory.mktemp("resume_record")
    model, data = make_assets(root, docs=200)
    code = train_main([str(a) for a in base_overrides(model, data, root / "run", **STEPS)])
    assert code == 0
    return root, model, data


@pytest.fixture
def run(trained, tmp_path):
    root, model, data = trained
    shutil.copytree(root / "run", tmp_path / "run")
    return model, data, tmp_path / "run"


def refusal(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("retro.train: error: resume: "), err
    return lines[0]


def test_each_checkpoint_records_its_job_config_in_its_verified_files(run):
    _, _, out = run
    for path in complete_checkpoints(out):
        record = json.loads((path / RECORD).read_text())
        assert record["job"]["data"]["seq_len"] == 16 and record["model"]["shape"] == [1, 2, 1]
        assert RECORD in json.loads((path / MARKER).read_text())["files"]


def test_a_changed_seq_len_is_refused_before_anything_is_written(run, capsys):
    """Before: config.json rewritten, then the run resumed with windows of another length."""
    model, data, out = run
    before = snapshot(out)
    code, _, err = train(model, data, out, capsys, **{"data.seq_len": 32, "train.steps": 6})
    line = refusal(code, err)
    assert "data.seq_len changed from 16 (checkpoint step_00000004) to 32" in line
    assert snapshot(out) == before  # config.json, model_config/, metrics.jsonl, checkpoints byte-identical


def test_a_changed_model_shape_is_one_line_not_a_traceback(run, capsys, tmp_path):
    """Before: `Missing key in checkpoint state_dict` traceback."""
    model, data, out = run
    other = tmp_path / "model_2_1_1"
    convert(model.parent / "src", other, shape=(2, 1, 1), adapter_init="default")
    before = snapshot(out)
    code, _, err = train(model, data, out, capsys, **{"model.path": other, "train.steps": 6})
    line = refusal(code, err)
    assert "model.shape changed from [1, 2, 1] (checkpoint step_00000004) to [2, 1, 1]" in line
    assert snapshot(out) == before


def test_training_lora_from_a_full_training_checkpoint_is_refused(run, capsys):
    """Before: DCP's `Missing key in checkpoint state_dict` traceback for the LoRA matrices."""
    model, data, out = run
    before = snapshot(out)
    code, _, err = train(model, data, out, capsys, **{"train.trainable": "lora", "train.steps": 6})
    assert 'train.trainable changed from "all" (checkpoint step_00000004) to "lora"' in refusal(code, err)
    assert snapshot(out) == before


def test_a_changed_max_mean_resumes_with_a_note(run, capsys):
    model, data, out = run
    code, stdout, err = train(model, data, out, capsys, **{"recurrence.max_mean": 4, "train.steps": 6})
    assert code == 0, err
    assert "note: resume: recurrence.max_mean changed from 3 (checkpoint step_00000004) to 4" in stdout
    assert [m["step"] for m in read_metrics(out)] == list(range(1, 7))


def test_a_changed_global_batch_resumes_with_a_note_and_the_tokens_continue(run, capsys):
    """Before: no note, and `tokens` jumped to step x the new batch x seq_len."""
    model, data, out = run
    code, stdout, err = train(model, data, out, capsys, **{"train.global_batch": 16, "train.steps": 6})
    assert code == 0, err
    assert "train.global_batch changed from 8 (checkpoint step_00000004) to 16" in stdout
    tokens = {m["step"]: m["tokens"] for m in read_metrics(out)}
    assert tokens[4] == 4 * 8 * 16 and tokens[5] == tokens[4] + 16 * 16 and tokens[6] == tokens[5] + 16 * 16


def drop_record(checkpoint) -> None:
    """As a checkpoint written before the record existed."""
    (checkpoint / RECORD).unlink()
    marker = json.loads((checkpoint / MARKER).read_text())
    del marker["files"][RECORD]
    (checkpoint / MARKER).write_text(json.dumps(marker))


def test_a_checkpoint_without_the_record_is_compared_with_the_run_config(run, capsys):
    model, data, out = run
    for path in complete_checkpoints(out):
        drop_record(path)
    before = snapshot(out)
    code, _, err = train(model, data, out, capsys, **{"data.seq_len": 32, "train.steps": 6})
    assert f"data.seq_len changed from 16 (checkpoint step_00000004, per {out / 'config.json'}) to 32" in refusal(
        code, err
    )
    assert snapshot(out) == before


def test_a_checkpoint_without_any_record_still_resumes_with_a_note(run, capsys):
    model, data, out = run
    for path in complete_checkpoints(out):
        drop_record(path)
    (out / "config.json").unlink()
    code, stdout, err = train(model, data, out, capsys, **{"train.steps": 6})
    assert code == 0, err
    assert "are not compared with the checkpoint's" in stdout and "resuming from" in stdout
    assert [m["step"] for m in read_metrics(out)] == list(range(1, 7))
