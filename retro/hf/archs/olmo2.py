"""OLMo-2: post-norm blocks (x + norm(f(x))) and RMSNorm over the whole q and k projections."""

from retro.hf.archs.base import Architecture

OLMO2 = Architecture(
    model_type="olmo2",
    norm_position="post",
    qk_norm="full",
    norms={"attn_norm": "post_attention_layernorm", "mlp_norm": "post_feedforward_layernorm"},
)
