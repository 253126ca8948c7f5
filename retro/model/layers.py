"""One decoder layer: RMSNorm, attention (fused QKV, SDPA, optional QK-norm) and SwiGLU MLP.

Pre-norm (Llama, Qwen): x + attn(norm(x)), x + mlp(norm(x)).
Post-norm (OLMo-2):     x + norm(attn(x)), x + norm(mlp(x)).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from retro.model.config import RetroConfig
from retro.model.rope import apply_rope


class KVSlot(Protocol):
    """What attention needs from a KV cache: append this step's K/V, get all K/V so far back."""

    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The weight in the activations' dtype (a no-op unless autocast made them bf16 while the
        # weight stays fp32): the fused kernel needs one dtype, and FSDP2's bf16 path computes the same.
        return F.rms_norm(x, (x.size(-1),), self.weight.to(x.dtype), self.eps)


class Linear(nn.Linear):
    """nn.Linear that may carry low-rank updates (`lora`, attached by retro/model/lora.py; None otherwise)."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.register_module("lora", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out if self.lora is None else self.lora(x, out)


class FusedLinear(Linear):
    """A Linear whose output rows concatenate several logical matrices (q|k|v or gate|up).

    `split_sizes` lets Muon orthogonalise each logical matrix on its own.
    """

    def __init__(self, in_features: int, split_sizes: tuple[int, ...], bias: bool) -> None:
        super().__init__(in_features, sum(split_sizes), bias=bias)
        self.split_sizes = tuple(split_sizes)


class Attention(nn.Module):
    def __init__(self, config: RetroConfig) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        q_size, kv_size = self.n_heads * d, self.n_kv_heads * d
        self.qkv_proj = FusedLinear(h, (q_size, kv_size, kv_size), bias=config.qkv_bias)
        self.o_proj = Linear(q_size, h, bias=config.o_bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm == "full":  # OLMo-2: RMSNorm over the whole q and k projections
            self.q_norm, self.k_norm = RMSNorm(q_size, config.rms_norm_eps), RMSNorm(kv_size, config.rms_norm_eps)
        elif config.qk_norm == "head":  # Qwen3: RMSNorm over each head
            self.q_norm, self.k_norm = RMSNorm(d, config.rms_norm_eps), RMSNorm(d, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        kv_slot: KVSlot | None = None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.split_sizes, dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_slot is not None:
            k, v = kv_slot.update(k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_heads != self.n_kv_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class SwiGLU(nn.Module):
    def __init__(self, config: RetroConfig) -> None:
        super().__init__()
        i = config.intermediate_size
        self.gate_up_proj = FusedLinear(config.hidden_size, (i, i), bias=config.mlp_bias)
        self.down_proj = Linear(i, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: RetroConfig) -> None:
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None = None,
        kv_slot: KVSlot | None = None,
    ) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.attn_norm(x), rope, mask, kv_slot)
            return x + self.mlp(self.mlp_norm(x))
        x = x + self.attn_norm(self.attn(x, rope, mask, kv_slot))
        return x + self.mlp_norm(self.mlp(x))
