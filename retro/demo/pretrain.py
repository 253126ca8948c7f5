"""Stage 2 of the demo: pretrain a small static Llama on the task corpus, save it as a HF checkpoint.

This stands in for the "pretrained model" a user would download: a plain `LlamaForCausalLM` that
`retro.convert` can retrofit. It reads the same prepared token shards as `retro.train` (packed rows
of `seq_len` tokens through `retro.data.loader`) and uses AdamW with warmup and cosine decay.

The loss is the mean over the answer tokens (the token after each `=`) plus `lm_weight` times the
plain next-token loss over all tokens. With the plain loss alone the unpredictable rest of a document
(start digits, random operation names) drowned the answer signal and the model stayed at chance
within the CPU budget; with the answer loss alone the other tokens' predictions were never trained,
post-training (retro.train counts every token) started at loss 26 and its first steps erased the
skill (measured: 61% -> 23-27% mean accuracy).
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
    seq_len: int = 32  # short rows of whole-ish documents: 4x faster attention than 128, same tokens per step
    batch: int = 64
    steps: int = 2000
    lr: float = 1e-2
    warmup: int = 50
    weight_decay: float = 0.01
    lm_weight: float = 0.1  # weight of the plain next-token loss over all tokens, added to the answer loss
    seed: int = 0


def llama_config(vocab_size: int, eos_id: int, s: PretrainSettings) -> LlamaConfig:
    """No pad token: HF would give its embedding row padding_idx (zero, never trained). With pad = EOS
    that zero row starts many short-document windows, and after conversion (no padding_idx) the zero
    residual at position 0 blows up through the RMSNorms: infinite gradient norms in retro.train."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        max_position_embeddings=256,
        eos_token_id=eos_id,
        bos_token_id=eos_id,
        pad_token_id=None,
        tie_word_embeddings=False,
    )


def lr_at(step: int, s: PretrainSettings) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def answer_loss(logits: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor, answer_after: int) -> torch.Tensor:
    """Mean cross-entropy over the positions whose input token is `answer_after` (predicting the answer)."""
    mask = input_ids == answer_after
    if not mask.any():
        raise ValueError(f"no token id {answer_after} in the batch: the corpus has no answers to train on")
    return torch.nn.functional.cross_entropy(logits[mask], labels[mask])


def pretrain(
    data_dir: Path,
    out_dir: Path,
    s: PretrainSettings,
    answer_after: int,
    progress: Callable[[int, float], None] | None = None,
) -> dict:
    """Train from random init for `s.steps` steps, mostly on the answers (the token after each
    `answer_after` id); save model (safetensors) to out_dir; return a summary."""
    shards = TokenShards(data_dir, split="train")
    torch.manual_seed(s.seed)
    model = LlamaForCausalLM(llama_config(shards.manifest.vocab_size, shards.manifest.eos_id, s))
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=s.lr,
        betas=(0.9, 0.95),
    )
    loader = iter(build_train_loader([data_dir], None, s.seq_len, s.batch, 0, 1, s.seed, num_workers=0))
    start, losses = time.perf_counter(), []
    for step in range(s.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, s)
        batch = next(loader)
        logits = model(input_ids=batch["input_ids"]).logits
        answers = answer_loss(logits, batch["input_ids"], batch["labels"], answer_after)
        loss = answers
        if s.lm_weight:
            loss = loss + s.lm_weight * torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), batch["labels"].flatten()
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(answers.item())
        if progress is not None:
            progress(step + 1, losses[-1])
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "steps": s.steps,
        "tokens": s.steps * s.batch * s.seq_len,
        "final_answer_loss": sum(tail) / len(tail),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": time.perf_counter() - start,
    }
