"""A resume is explicit about what changed (issue 24, item 4): each checkpoint records the job config it
was written with (`job_config.json`); a resume that changes what the checkpoint means is refused with one
line before anything in the run directory is written, an allowed change is printed as a note. And what
the record settles after a run: a re-run of a finished run writes nothing, export reads the checkpoint's
own record, damaged checkpoints stop a run instead of restarting it, and an earlier run is set aside."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from train_helpers import base_overrides, make_assets, read_metrics

from retro.convert import convert
from retro.train import main as train_main
from retro.training import checkpoint
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


def test_a_rerun_of_a_finished_run_writes_nothing(run, capsys):
    """Before: a re-run with another recurrence.max_mean did no step, exited 0 and rewrote config.json, so a
    later export stamped default_recurrences from the new value on weights trained with the old one."""
    model, data, out = run
    before = snapshot(out)
    code, stdout, err = train(model, data, out, capsys, **{"recurrence.max_mean": 9})
    assert code == 0, err
    assert "nothing to do" in stdout and "step 4, train.steps = 4" in stdout
    assert snapshot(out) == before


def test_export_takes_the_recurrence_the_checkpoint_was_trained_with(run, tmp_path):
    """Before: export read max_mean from RUN/config.json, which a later run may have rewritten."""
    from retro.export import export

    model, data, out = run
    config = json.loads((out / "config.json").read_text())
    config["recurrence"]["max_mean"] = 9.0  # as a later run with another setting would leave it
    (out / "config.json").write_text(json.dumps(config))
    export(out, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["default_recurrences"] == 3  # the record's M


def test_every_checkpoint_damaged_is_refused_not_a_silent_fresh_start(run, capsys):
    """Before: with its only checkpoints damaged the run started over and repeated steps 1-4 in metrics.jsonl.
    Now: exit 2 naming each damaged file, nothing written; --resume none --force then moves them aside."""
    model, data, out = run
    for path in complete_checkpoints(out):
        (path / "rank_0.pt").write_bytes(b"damaged")
    before = snapshot(out)
    code, _, err = train(model, data, out, capsys, **{"train.steps": 6})
    assert code == 2 and "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if "error" in line]
    assert "every complete checkpoint" in line and "step_00000004: rank_0.pt has 7 bytes" in line
    assert "step_00000002: rank_0.pt" in line and "--resume none --force" in line
    assert snapshot(out) == before
    code = train_main([str(a) for a in base_overrides(model, data, out, **STEPS)] + ["--resume", "none", "--force"])
    assert code == 0
    (aside,) = (out / "superseded").iterdir()
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]


def test_a_fresh_start_sets_an_earlier_runs_leftovers_aside(run, capsys):
    """A run that never saved a checkpoint leaves config.json and metrics.jsonl: the next fresh start used to
    append to that metrics.jsonl. Now they move, byte for byte, into OUT/superseded/<time>/."""
    model, data, out = run
    shutil.rmtree(out / "checkpoints")
    before = snapshot(out)
    code, stdout, err = train(model, data, out, capsys)
    assert code == 0, err
    (aside,) = (out / "superseded").iterdir()
    assert f"moved to {aside}" in stdout
    assert snapshot(aside) == before
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(run, capsys, tmp_path):
    """Rewinding to step 2 with train.steps = 3 left step 4 of the abandoned branch as the newest: export and
    `--resume auto` then picked it while metrics.jsonl described the new branch."""
    from retro.export import export

    model, data, out = run
    older = out / "checkpoints" / "step_00000002"
    extra = {"train.steps": 3, "optim.decay_steps": 1}
    argv = [str(a) for a in base_overrides(model, data, out, **{**STEPS, **extra})]
    code = train_main(argv + ["--resume", str(older)])
    stdout = capsys.readouterr().out
    assert code == 0
    (aside,) = (out / "superseded").iterdir()
    assert "step_00000004" in stdout and f"moved to {aside}" in stdout
    assert [p.name for p in (aside / "checkpoints").iterdir()] == ["step_00000004"]
    assert [p.name for p in complete_checkpoints(out)] == ["step_00000002", "step_00000003"]
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]
    assert export(out, tmp_path / "hf").name == "step_00000003"


def test_resuming_another_runs_checkpoint_sets_this_runs_line_aside(run, capsys, trained, tmp_path):
    """`--resume OTHER/checkpoints/step_2` into a used RUN mixed two run lines' checkpoints and metrics."""
    root, _, _ = trained
    model, data, out = run
    other = tmp_path / "other"
    shutil.copytree(root / "run", other)
    assert all(json.loads((ckpt / RECORD).read_text())["run_id"] for ckpt in complete_checkpoints(other))
    # RUN's checkpoints get another run line's id (as a separate fresh start would have drawn); the record
    # is verified by size and CRC-32, so COMPLETE is rewritten to match.
    for ckpt in complete_checkpoints(out):
        record = json.loads((ckpt / RECORD).read_text())
        record["run_id"] = "this-run"
        (ckpt / RECORD).write_text(json.dumps(record))
        marker = json.loads((ckpt / MARKER).read_text())
        marker["files"][RECORD] = (ckpt / RECORD).stat().st_size
        marker["crc32"][RECORD] = checkpoint.crc32(ckpt / RECORD)
        (ckpt / MARKER).write_text(json.dumps(marker))
    extra = {"train.steps": 3, "optim.decay_steps": 1}
    argv = [str(a) for a in base_overrides(model, data, out, **{**STEPS, **extra})]
    code = train_main(argv + ["--resume", str(other / "checkpoints" / "step_00000002")])
    capsys.readouterr()
    assert code == 0
    (aside,) = (out / "superseded").iterdir()
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert (aside / "metrics.jsonl").is_file()  # the other line's steps left with its checkpoints
    assert [p.name for p in complete_checkpoints(out)] == ["step_00000003"]
    assert [m["step"] for m in read_metrics(out)] == [3]
