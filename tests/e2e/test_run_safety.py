"""retro.train never loses a run or trains silently wrong (issue: nothing lost, ever).

Each case runs the real CLI on a tiny model: a val set the model cannot read, a diverging run,
a damaged newest checkpoint, a changed learning rate on resume, data from another tokenizer of the
same size, the paper's per-micro-batch recurrence draws across ranks and across a resume, and the
metrics log after a resume.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from data_helpers import prepare_dir, random_docs, reversed_word_tokenizer, word_tokenizer, write_jsonl
from train_helpers import NUM_WORDS, base_overrides, make_assets, read_metrics, run_train

from retro.optim.lr_schedule import lr_multiplier
from retro.training import checkpoint


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


def test_val_set_beyond_the_vocabulary_fails_before_training(assets, tmp_path):
    model, data = assets
    big = word_tokenizer(tmp_path / "big_tok", NUM_WORDS + 50)
    corpus = write_jsonl(tmp_path / "c.jsonl", random_docs(60, NUM_WORDS + 50, seed=3, min_len=5, max_len=30))
    val = prepare_dir(tmp_path / "val", [corpus], big, "--val-fraction", "0.5")
    result = run_train(base_overrides(model, data, tmp_path / "run", **{"data.val": val}), check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert str(val) in result.stderr and "vocab" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before any step


def test_a_diverged_run_saves_nothing_after_it_diverged_and_exits_non_zero(assets, tmp_path):
    """Muon at lr 1e38: step 1's update blows the weights up (finite but huge), every later loss is NaN.
    Before: the periodic saves wrote those weights and the run exited 0. Now: nothing after step 1 is
    saved, the exit code is 3 and the message names the last complete checkpoint."""
    model, data = assets
    out = tmp_path / "run"
    extra = {"optim.name": "muon", "optim.muon_lr": 1e38, "checkpoint.every": 1, "train.steps": 5}
    result = run_train(base_overrides(model, data, out, **extra), check=False)
    assert result.returncode == 3, result.stderr[-2000:]
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == ["step_00000001"]
    assert "these weights are not saved" in result.stderr and "step_00000001" in result.stderr


def test_damaged_newest_checkpoint_falls_back_and_metrics_are_not_repeated(assets, tmp_path):
    model, data = assets
    out = tmp_path / "run"
    extra = {"train.steps": 4, "checkpoint.every": 2, "checkpoint.keep_last": 3}
    run_train(base_overrides(model, data, out, **extra))
    newest = checkpoint.complete_checkpoints(out)[-1]
    shard = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:100])
    result = run_train(base_overrides(model, data, out, **{**extra, "train.steps": 6}))
    assert "damaged" in result.stderr and str(newest) in result.stderr
    assert "resuming from" in result.stdout and "step_00000002" in result.stdout
    steps = [m["step"] for m in read_metrics(out)]
    assert steps == sorted(set(steps)) == list(range(1, 7))  # steps 3, 4 re-run once, logged once


def test_a_changed_learning_rate_applies_on_resume(assets, tmp_path):
    model, data = assets
    out = tmp_path / "run"
    extra = {"train.steps": 4, "checkpoint.every": 2, "optim.lr": 1e-3}
    run_train(base_overrides(model, data, out, **extra))
    result = run_train(base_overrides(model, data, out, **{**extra, "optim.lr": 5e-4, "train.steps": 6}))
    assert "optim.lr changed from 0.001 (checkpoint) to 0.0005 (config)" in result.stdout
    saved = json.loads((out / "config.json").read_text())
    assert saved["optim"]["lr"] == 5e-4  # the recorded value is the one in use
    schedule = dict(total_steps=6, warmup_steps=2, decay_steps=2, kind="wsd", min_ratio=0.001)
    for m in read_metrics(out):
        if m["step"] > 4:
            assert m["lr_groups"] == pytest.approx([5e-4 * lr_multiplier(m["step"], **schedule)] * 2)


def test_data_from_another_tokenizer_of_the_same_size_is_refused(assets, tmp_path):
    model, _ = assets
    other = reversed_word_tokenizer(tmp_path / "other_tok", NUM_WORDS)
    corpus = write_jsonl(tmp_path / "c.jsonl", random_docs(200, NUM_WORDS, seed=4, min_len=5, max_len=40))
    data = prepare_dir(tmp_path / "data", [corpus], other, "--val-fraction", "0.1")
    result = run_train(base_overrides(model, data, tmp_path / "run"), check=False)
    assert result.returncode == 2 and "allow_tokenizer_mismatch" in result.stderr and str(data) in result.stderr
    override = {"data.allow_tokenizer_mismatch": "true", "train.steps": 4}
    run_train(base_overrides(model, data, tmp_path / "forced", **override))  # the explicit override trains


def test_per_micro_batch_draws_agree_across_ranks_and_resume(assets, tmp_path):
    """The paper's draw per micro-batch: 2 ranks x 2 micro-batches per step. The trainer all-reduces
    each step's draws and stops if ranks disagree, so a finished 2-rank run is the agreement check."""
    model, data = assets
    extra = {
        "recurrence.draws_per_step": 0,
        "train.steps": 4,
        "checkpoint.every": 2,
        "checkpoint.keep_last": 3,
    }
    run_train(base_overrides(model, data, tmp_path / "full", **extra), nproc=2)
    full = read_metrics(tmp_path / "full")
    assert all(len(m["r_micro"]) == 2 for m in full)
    assert any(len(set(m["r_micro"])) == 2 for m in full), "micro-batches of a step should draw different r"
    resumed = tmp_path / "resumed"  # as if killed after the step-2 checkpoint
    shutil.copytree(tmp_path / "full", resumed)
    shutil.rmtree(checkpoint.checkpoint_dir(resumed, 4))
    run_train(base_overrides(model, data, resumed, **extra), nproc=2)
    again = read_metrics(resumed)
    assert [m["r_micro"] for m in again] == [m["r_micro"] for m in full]
    for a, b in zip(again, full):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(b["loss"]), (a, b)


def test_bad_values_are_one_clear_line(assets, tmp_path):
    model, data = assets
    result = run_train(base_overrides(model, data, tmp_path / "run", **{"train.grad_clip": 0}), check=False)
    assert result.returncode == 2 and "train.grad_clip must be > 0" in result.stderr
    plan = subprocess.run(
        [sys.executable, "-m", "retro.plan", "--preset", "tinyllama-484", "--gpus", "3"], capture_output=True, text=True
    )
    assert plan.returncode == 2 and "train.global_batch" in plan.stderr and "Traceback" not in plan.stderr


def test_a_run_directory_belongs_to_one_run(assets, tmp_path):
    """Before: a second run into a live run's directory, or `--resume none` into a used one, rewrote
    config.json, appended to metrics.jsonl and pruned checkpoints. Now: both exit 2 with one line and
    leave every byte as it was; a stale lock is taken over with a note; `--force` starts over after
    moving the earlier run, byte for byte, into OUT/superseded/<time>/; the lock is gone after each run."""
    model, data = assets
    out = tmp_path / "run"
    extra = {"train.steps": 4}
    run_train(base_overrides(model, data, out, **extra))
    assert not (out / ".retro-lock").exists()  # released after a normal run

    def snapshot() -> dict[str, bytes]:
        files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != ".retro-lock")
        return {str(p.relative_to(out)): p.read_bytes() for p in files}

    host = socket.gethostname()
    live = {"token": "t", "pid": os.getpid(), "host": host, "started": 1_700_000_000.0}
    (out / ".retro-lock").write_text(json.dumps(live))  # this test's process: a live holder
    before = snapshot()
    result = run_train(base_overrides(model, data, out, **{"train.steps": 6}), check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("retro.train: error:")]
    assert f"pid {os.getpid()} on host {host}, started 2023-11-14 22:13:20 UTC" in line
    assert snapshot() == before

    (out / ".retro-lock").unlink()
    result = run_train(base_overrides(model, data, out, **extra) + ["--resume", "none"], check=False)
    assert result.returncode == 2 and f"{out} holds 1 complete checkpoint(s)" in result.stderr, result.stderr[-3000:]
    assert snapshot() == before and not (out / ".retro-lock").exists()  # released after an error

    gone = subprocess.Popen(["true"])
    gone.wait()
    (out / ".retro-lock").write_text(json.dumps({**live, "pid": gone.pid}))
    result = run_train(base_overrides(model, data, out, **extra) + ["--resume", "none", "--force"])
    assert f"taking over the stale lock {out / '.retro-lock'} of pid {gone.pid}" in result.stdout
    assert "--force: starting over" in result.stdout and "nothing is deleted" in result.stdout
    assert not (out / ".retro-lock").exists()
    # The earlier run is set aside whole, byte for byte; this run's metrics and checkpoints are its own.
    (aside,) = (out / "superseded").iterdir()
    assert f"moved to {aside}" in result.stdout
    assert {str(p.relative_to(aside)): p.read_bytes() for p in aside.rglob("*") if p.is_file()} == before
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == ["step_00000004"]


def test_two_run_dirs_linked_to_one_checkpoints_folder(assets, tmp_path):
    """Probe 29 of issue 24: the second run directory used to resume from and prune the first's checkpoints.
    Now it exits 2 naming the first, and the first's checkpoints are untouched."""
    model, data = assets
    shared = tmp_path / "scratch"
    shared.mkdir()
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    for run in (run_a, run_b):
        run.mkdir()
        (run / "checkpoints").symlink_to(shared)
    run_train(base_overrides(model, data, run_a, **{"train.steps": 4, "checkpoint.every": 2}))
    before = {p.name for p in shared.iterdir()}
    assert "step_00000004" in before
    result = run_train(base_overrides(model, data, run_b, **{"train.steps": 4}), check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"holds the checkpoints of the run directory {run_a.resolve()}" in result.stderr
    assert {p.name for p in shared.iterdir()} == before and not (run_b / "metrics.jsonl").exists()


def test_a_signal_during_start_up_exits_for_requeue(assets, tmp_path):
    """SIGUSR1 right after the config is resolved, while the model is still loading. Before: the handler was
    installed only in fit(), so the default action killed the process (exit -10, no requeue). Now: exit 85,
    one line, no step taken and nothing saved."""
    import signal

    from retro.training.signals import REQUEUE_EXIT_CODE

    model, data = assets
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    cmd = [sys.executable, "-m", "retro.train", *base_overrides(model, data, out)]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=repo)
    first = proc.stdout.readline()
    assert "resolved config" in first, first
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == REQUEUE_EXIT_CODE, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "signal received during start-up, before the first step; nothing saved" in first + stdout
    assert checkpoint.complete_checkpoints(out) == []
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip()


def test_a_run_whose_directory_was_taken_over_stops_without_writing(assets, tmp_path):
    """Probe 10: a run suspended past lock_stale_s on another node is taken over; when it wakes it used to
    keep writing (145 steps twice in metrics.jsonl). Now each step asks whether the lock is still this run's,
    and every rank stops before writing anything more (exit 2, one line)."""
    import time

    model, data = assets
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    overrides = base_overrides(model, data, out, **{"train.steps": 100_000, "train.log_every": 1})
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "-m", "retro.train", *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=repo)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    other = {"token": "other", "pid": 1, "host": "node-b", "started": time.time()}
    (out / ".retro-lock").write_text(json.dumps(other))  # what a takeover leaves: another run's lock
    logged = metrics.read_text().count("\n")
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if "error" in line]
    assert "is no longer this run's" in line and "without saving or logging" in line
    assert metrics.read_text().count("\n") <= logged + 1  # at most the step already past its check
    assert checkpoint.complete_checkpoints(out) == []
    assert json.loads((out / ".retro-lock").read_text())["token"] == "other"  # the new holder's lock is kept
