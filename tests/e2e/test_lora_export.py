"""A LoRA run end to end: its checkpoint holds A and B, only they (and the adapter) moved, and retro.export
merges them into a plain model with the LoRA model's logits."""

from __future__ import annotations

import subprocess
import sys

import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from train_helpers import base_overrides, make_assets, run_train

import retro
from retro.model.lora import LoraSettings, add_lora, is_lora_parameter
from retro.training import checkpoint

LORA = {"train.trainable": "lora", "lora.rank": 4, "lora.alpha": 8, "lora.targets": "[q_proj,v_proj,down_proj]"}


def test_lora_run_exports_merged_weights_with_the_same_logits(tmp_path):
    model_dir, data = make_assets(tmp_path / "assets", docs=200)
    out = tmp_path / "run"
    extra = {**LORA, "train.steps": 3, "optim.lr": 1e-2, "optim.muon_lr": 1e-2, "optim.warmup_steps": 0}
    run_train(base_overrides(model_dir, data, out, **extra))
    ckpt = checkpoint.complete_checkpoints(out)[-1]
    saved = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    assert any(k.startswith("model.") and k.endswith(".lora.updates.q_proj.A") for k in saved)
    assert any(k.startswith("model.") and k.endswith(".lora.updates.down_proj.B") for k in saved)

    hf_dir = tmp_path / "hf"
    result = subprocess.run(
        [sys.executable, "-m", "retro.export", str(out), "--out", str(hf_dir)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    exported_weights = load_file(hf_dir / "model.safetensors")
    assert not any(is_lora_parameter(name) for name in exported_weights)

    # The LoRA model as trained: base + updates loaded from the checkpoint, not merged.
    config = retro.RetroConfig.from_pretrained(out / "model_config")
    lora_model = retro.RetroForCausalLM(config)
    add_lora(lora_model.model.recurrent.block, LoraSettings(rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]))
    checkpoint.load_model_only(ckpt, lora_model)
    assert any(p.abs().sum() > 0 for n, p in lora_model.named_parameters() if n.endswith(".B"))  # it trained
    exported = retro.RetroForCausalLM.from_pretrained(hf_dir)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    for r in (1, 3):
        s0 = torch.zeros(2, 12, config.hidden_size)
        want = lora_model(ids, num_recurrences=r, initial_state=s0).logits
        got = exported(ids, num_recurrences=r, initial_state=s0).logits
        # fp32: (W + s·BA) x against W x + s·B(A x), rounding only
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())

    # Frozen means frozen: every weight but the adapter and the targeted projections is the converted one.
    base = load_file(model_dir / "model.safetensors")
    moved = {n for n in base if not torch.equal(base[n], exported_weights[n])}
    assert "model.recurrent.adapter.weight" in moved
    assert {n for n in moved if n != "model.recurrent.adapter.weight"} == {
        f"model.recurrent.block.{i}.{p}.weight" for i in range(2) for p in ("attn.qkv_proj", "mlp.down_proj")
    }
    q, kv = 32, 16  # the tiny source: 4 heads and 2 KV heads of 8; k_proj is no target
    qkv = "model.recurrent.block.0.attn.qkv_proj.weight"
    assert torch.equal(base[qkv][q : q + kv], exported_weights[qkv][q : q + kv])
