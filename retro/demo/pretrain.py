"""Stage 2 of the demo: pretrain a small static Llama on the task corpus, save it as a HF checkpoint.

This stands in for the "pretrained model" a user would download: a plain `LlamaForCausalLM` that
`retro.convert` can retrofit. It reads the same prepared token shards as `retro.train` (packed rows
of `seq_len` tokens through `retro.data.loader`) and uses AdamW with warmup and cosine decay.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from retro.data.loader import build_train_loader
from retro.data.shards import TokenShards


@dataclass(frozen=True)
class PretrainSettings:
    layers: int = 8
    hidden: int = 64
    heads: int = 4
    intermediate: int = 256
    seq_len: int = 128
    batch: int = 16
    steps: int = 3000
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    seed: int = 0


def llama_config(vocab_size: int, eos_id: int, s: PretrainSettings) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=s.hidden, intermediate_size=s.intermediate,
                       num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.heads,
                       max_position_embeddings=max(256, 2 * s.seq_len), eos_token_id=eos_id, bos_token_id=eos_id,
                       pad_token_id=eos_id, tie_word_embeddings=False)


def lr_at(step: int, s: PretrainSettings) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(data_dir: Path, out_dir: Path, s: PretrainSettings,
             progress: Callable[[int, float], None] | None = None) -> dict:
    """Train from random init for `s.steps` steps; save model (safetensors) to out_dir; return a summary."""
    shards = TokenShards(data_dir, split="train")
    torch.manual_seed(s.seed)
    model = LlamaForCausalLM(llama_config(shards.manifest.vocab_size, shards.manifest.eos_id, s))
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                                  lr=s.lr, betas=(0.9, 0.95))
    loader = iter(build_train_loader([data_dir], None, s.seq_len, s.batch, 0, 1, s.seed, num_workers=0))
    start, losses = time.perf_counter(), []
    for step in range(s.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, s)
        batch = next(loader)
        logits = model(input_ids=batch["input_ids"]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, losses[-1])
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tail = losses[-max(1, len(losses) // 10):]
    return {"steps": s.steps, "tokens": s.steps * s.batch * s.seq_len, "final_loss": sum(tail) / len(tail),
            "parameters": sum(p.numel() for p in model.parameters()), "seconds": time.perf_counter() - start}
