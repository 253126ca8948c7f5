"""Tiny random source models saved locally with `save_pretrained` (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Olmo2Config, Olmo2ForCausalLM, PreTrainedModel

BASE = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def make_source(kind: str = "llama", seed: int = 0, **overrides) -> PreTrainedModel:
    """A random fp32 source model. kind: llama, llama-tied, llama3, olmo2 (and qwen2/qwen3)."""
    torch.manual_seed(seed)
    fields = {**BASE, **overrides}
    if kind == "olmo2":
        model = Olmo2ForCausalLM(Olmo2Config(**fields))
    elif kind in ("qwen2", "qwen3"):
        from transformers import AutoConfig, AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **{"head_dim": 8, **fields}))
    else:
        if kind == "llama-tied":
            fields["tie_word_embeddings"] = True
        if kind == "llama3":
            fields["rope_parameters"] = LLAMA3_ROPE
        model = LlamaForCausalLM(LlamaConfig(**fields))
    # Random norms make a wrong mapping of norm weights visible (they start at 1 otherwise).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model.eval()


def save_source(path: Path, kind: str = "llama", seed: int = 0, **overrides) -> PreTrainedModel:
    model = make_source(kind, seed, **overrides)
    model.save_pretrained(path)
    return model


def tiny_recurrent(**overrides):
    """A (1,2,1) RetroForCausalLM, h 32, vocab 61, with the paper's (default) adapter init: seeded."""
    import retro

    torch.manual_seed(0)
    config = retro.RetroConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=40,
        num_attention_heads=4,
        num_key_value_heads=2,
        n_prelude=1,
        n_recurrent=2,
        n_coda=1,
        **overrides,
    )
    model = retro.RetroForCausalLM(config)
    model.model.recurrent.adapter.reset_default(torch.Generator().manual_seed(1))
    return model


def sharpened_retro(root: Path):
    """Tiny Llama -> retro (1, 2, 1) with zero initial state, head scaled x40 so next-token entropies and
    exit scores spread out (a random head gives a near-uniform distribution at every pass, where no
    adaptive-exit threshold separates tokens). Shared by the adaptive-exit and depth-batching tests."""
    from retro.convert import convert
    from retro.model.modeling import RetroForCausalLM

    save_source(root / "src", "llama")
    convert(root / "src", root / "retro", shape=(1, 2, 1), adapter_init="default", state_init="zeros")
    model = RetroForCausalLM.from_pretrained(root / "retro").eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return model
