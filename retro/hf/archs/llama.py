"""Llama family (Llama-2, TinyLlama, Llama-3.x): pre-norm RMSNorm, RoPE (incl. llama3 scaling), GQA, SwiGLU."""

from retro.hf.archs.base import Architecture

LLAMA = Architecture(
    model_type="llama",
    norm_position="pre",
    qk_norm="none",
    norms={"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
)
