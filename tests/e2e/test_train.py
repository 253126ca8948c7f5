"""retro.train end to end on CPU: FSDP2 vs one process, kill + resume, export, config errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_helpers import base_overrides, free_port, make_assets, read_metrics, run_train

import retro
from retro.training import checkpoint
from retro.training.job_config import ConfigError, load_config


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return make_assets(root)


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_two_rank_fsdp_matches_single_process(assets, tmp_path, optim):
    model, data = assets
    extra = {"train.steps": 10, "model.state_init": "zeros", "optim.name": optim}  # zeros: s0 noise is per rank
    run_train(base_overrides(model, data, tmp_path / "one", **extra))
    run_train(base_overrides(model, data, tmp_path / "two", **extra), nproc=2)
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [m["r"] for m in a] == [m["r"] for m in b]
    assert len({m["r"] for m in a}) > 1  # the recurrence really varied
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]), (x, y)
    assert a[-1]["loss"] != a[0]["loss"]
    assert "val_loss_r2" in a[-1] and abs(a[-1]["val_loss_r2"] - b[-1]["val_loss_r2"]) < 1e-5 * a[-1]["val_loss_r2"]


def test_hsdp_four_ranks_matches_single_process(assets, tmp_path):
    model, data = assets
    extra = {"train.steps": 4, "model.state_init": "zeros"}
    run_train(base_overrides(model, data, tmp_path / "one", **extra))
    run_train(base_overrides(model, data, tmp_path / "hsdp", **extra, **{"parallel.replicate": 2}), nproc=4)
    for x, y in zip(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "hsdp")):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]), (x, y)


def test_sigkill_then_resume_continues_the_same_curve(assets, tmp_path):
    model, data = assets
    extra = {"train.steps": 40, "checkpoint.every": 4, "checkpoint.keep_last": 2}
    run_train(base_overrides(model, data, tmp_path / "ref", **extra), nproc=2)
    reference = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "ref")}

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "retro.train",
        *base_overrides(model, data, out, **extra),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        done = checkpoint.complete_checkpoints(out)
        if done and int(done[-1].name.split("_")[1]) >= 8:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(m["step"] for m in read_metrics(out))
    assert killed_at < 40, "the run finished before it could be killed"
    resumed_from = int(checkpoint.complete_checkpoints(out)[-1].name.split("_")[1])

    run_train(base_overrides(model, data, out, **extra) + ["--resume", "auto"], nproc=2)
    records = read_metrics(out)
    after = [m for m in records if m["step"] > resumed_from][-(40 - resumed_from) :]
    assert [m["step"] for m in after] == list(range(resumed_from + 1, 41))
    for m in after:
        assert abs(m["loss"] - reference[m["step"]]) <= 1e-6 * reference[m["step"]], (
            m["step"],
            m["loss"],
            reference[m["step"]],
        )
    assert len(checkpoint.complete_checkpoints(out)) == 2  # keep_last


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    config = retro.RetroConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_attention_heads=2, n_prelude=1, n_recurrent=1, n_coda=1
    )
    model = retro.RetroForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters())
    first = checkpoint.save(tmp_path, 2, model, optimizer, {"step": 2}, rank=0, keep_last=3)
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if str(path).endswith("rank_0.pt"):
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, 4, model, optimizer, {"step": 4}, rank=0, keep_last=3)
    monkeypatch.undo()
    assert (tmp_path / "checkpoints" / "step_00000004").exists()  # the broken attempt is there...
    assert checkpoint.find_resume(tmp_path, "auto") == first  # ...but resume ignores it
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    extra = checkpoint.load(first, model, optimizer, rank=0, world_size=1)
    assert extra["step"] == 2 and any(p.abs().sum() > 0 for p in model.parameters())


def test_export_matches_the_trained_model(assets, tmp_path):
    model, data = assets
    out = tmp_path / "run"
    run_train(base_overrides(model, data, out, **{"train.steps": 4}))
    hf_dir = tmp_path / "hf"
    result = subprocess.run(
        [sys.executable, "-m", "retro.export", str(out), "--out", str(hf_dir)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    exported = retro.RetroForCausalLM.from_pretrained(hf_dir)
    assert (hf_dir / "tokenizer.json").is_file()
    # The trainer logged its final validation loss with the live model; the exported one must agree.
    from retro.data.loader import build_val_batches
    from retro.training.validate import validation_losses

    final = read_metrics(out)[-1]
    batches = list(build_val_batches(data, 16, 2, 0, 1, 2))
    ours = validation_losses(exported, batches, [1, 2], torch.device("cpu"))
    for key in ("val_loss_r1", "val_loss_r2"):
        assert abs(ours[key] - final[key]) < 1e-5, (key, ours[key], final[key])
    assert exported.config.default_recurrences == 3  # the run's max mean recurrence


def test_config_errors(assets, tmp_path):
    model, data = assets
    with pytest.raises(ConfigError, match="unknown config key train.stepz"):
        load_config(None, ["train.stepz=3"])
    with pytest.raises(ConfigError, match="unknown config section"):
        load_config(None, ["trian.steps=3"])
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match="optim.name = 'sgd'"):
        load_config(None, ["optim.name=sgd"])
    toml = tmp_path / "bad.toml"
    toml.write_text("[train]\nsteps = 5\nbogus = 1\n")
    with pytest.raises(ConfigError, match="unknown config key train.bogus"):
        load_config(toml)
    cases = [
        ({"model.shape": "2,2,1"}, "model.shape = \\[2, 2, 1\\]"),
        ({"train.global_batch": 7}, "not divisible by train.micro_batch x ranks"),
    ]
    for extra, message in cases:
        result = run_train(base_overrides(model, data, tmp_path / "x", **extra), check=False)
        assert result.returncode == 2 and __import__("re").search(message, result.stderr), result.stderr[-2000:]


def test_vocab_mismatch_is_caught_before_training(assets, tmp_path):
    model, data = assets
    small = tmp_path / "small_vocab_model"
    config = json.loads((model / "config.json").read_text())
    small.mkdir()
    for f in model.iterdir():
        (small / f.name).write_bytes(f.read_bytes())
    config["vocab_size"] = 50
    (small / "config.json").write_text(json.dumps(config))
    result = run_train(base_overrides(small, data, tmp_path / "x"), check=False)
    assert result.returncode == 2 and "vocab mismatch" in result.stderr
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


def test_single_process_bf16_matches_fp32(assets, tmp_path):
    """`python -m retro.train` as one process in bf16 (autocast, fp32 master weights), the path a
    single GPU without torchrun takes: it used to crash in the adapter's dtype check. On CPU the
    losses track the fp32 run's within bf16 precision."""
    model, data = assets
    extra = {"train.steps": 4, "model.state_init": "zeros"}
    run_train(base_overrides(model, data, tmp_path / "fp32", **extra))
    run_train(base_overrides(model, data, tmp_path / "bf16", **{**extra, "train.dtype": "bf16"}))
    fp32, bf16 = read_metrics(tmp_path / "fp32"), read_metrics(tmp_path / "bf16")
    assert [m["step"] for m in bf16] == [1, 2, 3, 4] and not any(m["skipped"] for m in bf16)
    for a, b in zip(fp32, bf16):
        assert abs(a["loss"] - b["loss"]) <= 0.02 * a["loss"], (a["loss"], b["loss"])
