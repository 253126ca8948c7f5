"""Qwen2 (bias on q/k/v only) and Qwen3 (per-head q/k RMSNorm): Llama-shaped pre-norm otherwise."""

from retro.hf.archs.base import Architecture

_PRE_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}

QWEN2 = Architecture(
    model_type="qwen2", norm_position="pre", qk_norm="none", norms=_PRE_NORMS, qkv_bias=True, o_bias=False
)
QWEN3 = Architecture(model_type="qwen3", norm_position="pre", qk_norm="head", norms=_PRE_NORMS)
