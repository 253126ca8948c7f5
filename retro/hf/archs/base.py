"""What a source architecture must describe: config fields and per-layer weight names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Architecture:
    model_type: str
    norm_position: str  # "pre" (x + f(norm(x))) or "post" (x + norm(f(x)))
    qk_norm: str  # "none", "full" (over the whole q/k projection) or "head" (per head)
    norms: dict[str, str]  # our norm name -> the source layer's module name
    qkv_bias: bool | None = None  # None: read `attention_bias` from the source config
    o_bias: bool | None = None
    extra_config: dict[str, Any] = field(default_factory=dict)

    def config_fields(self, hf_config: Any) -> dict[str, Any]:
        """RetroConfig keyword arguments taken from a Hugging Face config object."""
        if getattr(hf_config, "hidden_act", "silu") != "silu":
            raise ValueError(
                f"{self.model_type}: hidden_act {hf_config.hidden_act!r} is not supported (only silu/SwiGLU)"
            )
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        rope = getattr(hf_config, "rope_parameters", None)
        if not rope:  # transformers 4.x style attributes
            rope = dict(getattr(hf_config, "rope_scaling", None) or {"rope_type": "default"})
            rope["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
        heads = hf_config.num_attention_heads
        return dict(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
            max_position_embeddings=hf_config.max_position_embeddings,
            rms_norm_eps=hf_config.rms_norm_eps,
            rope_parameters=dict(rope),
            norm_position=self.norm_position,
            qk_norm=self.qk_norm,
            qkv_bias=attention_bias if self.qkv_bias is None else self.qkv_bias,
            o_bias=attention_bias if self.o_bias is None else self.o_bias,
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            bos_token_id=getattr(hf_config, "bos_token_id", None),
            eos_token_id=getattr(hf_config, "eos_token_id", None),
            pad_token_id=getattr(hf_config, "pad_token_id", None),
            source_model_type=self.model_type,
            **self.extra_config,
        )

    def layer_sources(self, fields: dict[str, Any]) -> dict[str, list[str]]:
        """Our per-layer parameter name -> the source names whose rows are concatenated into it."""
        sources = {f"{ours}.weight": [f"{theirs}.weight"] for ours, theirs in self.norms.items()}
        sources["attn.qkv_proj.weight"] = [f"self_attn.{p}_proj.weight" for p in "qkv"]
        sources["attn.o_proj.weight"] = ["self_attn.o_proj.weight"]
        sources["mlp.gate_up_proj.weight"] = ["mlp.gate_proj.weight", "mlp.up_proj.weight"]
        sources["mlp.down_proj.weight"] = ["mlp.down_proj.weight"]
        if fields["qkv_bias"]:
            sources["attn.qkv_proj.bias"] = [f"self_attn.{p}_proj.bias" for p in "qkv"]
        if fields["o_bias"]:
            sources["attn.o_proj.bias"] = ["self_attn.o_proj.bias"]
        if fields["mlp_bias"]:
            sources["mlp.gate_up_proj.bias"] = ["mlp.gate_proj.bias", "mlp.up_proj.bias"]
            sources["mlp.down_proj.bias"] = ["mlp.down_proj.bias"]
        if self.qk_norm != "none":
            sources["attn.q_norm.weight"] = ["self_attn.q_norm.weight"]
            sources["attn.k_norm.weight"] = ["self_attn.k_norm.weight"]
        return sources
