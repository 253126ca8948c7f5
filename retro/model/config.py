"""`RetroConfig`: the shape of a depth-recurrent decoder (prelude / recurrent block / coda)."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

STATE_INITS = ("trunc_normal", "zeros", "embed")
NORM_POSITIONS = ("pre", "post")
QK_NORMS = ("none", "full", "head")


class RetroConfig(PretrainedConfig):
    """Config of `RetroForCausalLM`.

    The layer stack is embed -> `n_prelude` layers -> adapter -> `n_recurrent` layers run r times
    -> `n_coda` layers -> norm -> head. `n_recurrent = 0` is the static model (no adapter, no loop),
    which is how the paper's baselines are expressed with the same class.
    """

    model_type = "retro"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 2048,
        intermediate_size: int = 5632,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        max_position_embeddings: int = 2048,
        rms_norm_eps: float = 1e-5,
        rope_parameters: dict[str, Any] | None = None,
        norm_position: str = "pre",
        qk_norm: str = "none",
        qkv_bias: bool = False,
        o_bias: bool = False,
        mlp_bias: bool = False,
        n_prelude: int = 2,
        n_recurrent: int = 2,
        n_coda: int = 2,
        default_recurrences: int = 1,
        state_init: str = "trunc_normal",
        state_init_std: float = 0.0087,
        source_model_type: str | None = None,
        source_layers: dict[str, list[int]] | None = None,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_parameters = dict(rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
        self.norm_position = norm_position
        self.qk_norm = qk_norm
        self.qkv_bias = qkv_bias
        self.o_bias = o_bias
        self.mlp_bias = mlp_bias
        self.n_prelude = n_prelude
        self.n_recurrent = n_recurrent
        self.n_coda = n_coda
        self.default_recurrences = default_recurrences
        self.state_init = state_init
        self.state_init_std = state_init_std
        self.source_model_type = source_model_type
        self.source_layers = source_layers
        self.initializer_range = initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.validate_shape()

    def validate_shape(self) -> None:
        """Fail early, naming the offending field."""
        checks = [
            (
                self.norm_position in NORM_POSITIONS,
                f"norm_position must be one of {NORM_POSITIONS}, got {self.norm_position!r}",
            ),
            (self.qk_norm in QK_NORMS, f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}"),
            (self.state_init in STATE_INITS, f"state_init must be one of {STATE_INITS}, got {self.state_init!r}"),
            (
                self.n_prelude >= 0 and self.n_recurrent >= 0 and self.n_coda >= 0,
                f"layer counts must be >= 0, got prelude={self.n_prelude} recurrent={self.n_recurrent} "
                f"coda={self.n_coda}",
            ),
            (self.n_prelude + self.n_recurrent + self.n_coda > 0, "the model needs at least one layer"),
            (
                self.num_attention_heads % self.num_key_value_heads == 0,
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}",
            ),
            (self.default_recurrences >= 1, f"default_recurrences must be >= 1, got {self.default_recurrences}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"RetroConfig: {message}")

    @property
    def is_recurrent(self) -> bool:
        return self.n_recurrent > 0
