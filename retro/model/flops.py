"""Loop-aware FLOPs per token: every recurrence pass is counted (DESIGN.md, performance protocol)."""

from __future__ import annotations

from dataclasses import dataclass

from retro.model.config import RetroConfig


@dataclass(frozen=True)
class FlopModel:
    """FLOPs per token, split so every recurrence pass is counted.

    A pass with gradient costs 6 FLOPs per weight (forward 2 + backward 4), a no-grad pass 2.
    Attention scores and values add 12·T·d (grad) or 4·T·d (no grad) per layer per token.
    """

    stage_params: int  # prelude + coda matmul weights
    pass_params: int  # one recurrence pass: W_state + block matmul weights
    inject_params: int  # W_inject, once per forward
    head_params: int
    attn_dim: int
    n_stage_layers: int
    n_block_layers: int
    seq_len: int
    coda_params: int = 0  # the coda's share of stage_params (what a per-pass readout repeats)
    n_coda_layers: int = 0

    @classmethod
    def from_config(cls, config: RetroConfig, seq_len: int) -> FlopModel:
        h, d = config.hidden_size, config.head_dim
        q, kv, i = config.num_attention_heads * d, config.num_key_value_heads * d, config.intermediate_size
        layer = h * (q + 2 * kv) + q * h + 3 * h * i
        return cls(
            stage_params=layer * (config.n_prelude + config.n_coda),
            pass_params=layer * config.n_recurrent + (h * h if config.is_recurrent else 0),
            inject_params=h * h if config.is_recurrent else 0,
            head_params=config.vocab_size * h,
            attn_dim=q,
            n_stage_layers=config.n_prelude + config.n_coda,
            n_block_layers=config.n_recurrent,
            seq_len=seq_len,
            coda_params=layer * config.n_coda,
            n_coda_layers=config.n_coda,
        )

    def per_token(self, n: int, k: int) -> float:
        attn = self.seq_len * self.attn_dim
        grad = 6 * (self.stage_params + self.head_params + self.inject_params + k * self.pass_params)
        grad += 12 * attn * (self.n_stage_layers + k * self.n_block_layers)
        no_grad = n * (2 * self.pass_params + 4 * attn * self.n_block_layers)
        return float(grad + no_grad)

    def forward_per_token(self, r: int = 1) -> float:
        """A forward without gradient at r passes, the head included: a distillation teacher's cost."""
        attn = self.seq_len * self.attn_dim
        weights = self.stage_params + self.head_params + self.inject_params + r * self.pass_params
        return float(2 * weights + 4 * attn * (self.n_stage_layers + r * self.n_block_layers))

    def decode_token(self, passes: int, readouts: int = 1) -> float:
        """Forward FLOPs of one decoded token attending to `seq_len` positions: `passes` block passes and
        `readouts` coda + head evaluations (1 at fixed r or with the state exit test; one per pass with the kl
        and entropy tests). Adaptive exit makes `passes` per token vary; this is what each token costs."""
        attn = 4 * self.seq_len * self.attn_dim
        prelude, n_prelude = self.stage_params - self.coda_params, self.n_stage_layers - self.n_coda_layers
        weights = prelude + self.inject_params + passes * self.pass_params
        weights += readouts * (self.coda_params + self.head_params)
        return float(2 * weights + attn * (n_prelude + passes * self.n_block_layers + readouts * self.n_coda_layers))
