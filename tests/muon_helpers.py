"""Toy models and fp32 comparison rules shared by the single-process and FSDP2/HSDP Muon tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 32


class FusedLinear(nn.Linear):
    """Like the model's fused qkv_proj / gate_up_proj: rows are logical blocks (split_sizes)."""

    def __init__(self, in_features: int, split_sizes: tuple[int, ...]) -> None:
        super().__init__(in_features, sum(split_sizes), bias=False)
        self.split_sizes = tuple(split_sizes)


class ToyLayer(nn.Module):
    """Llama-shaped parameter set (norms, fused QKV and gate-up, a bias) plus a chain of Linears
    with small out_features (7, 3) so FSDP2 shards them unevenly (and leaves a rank empty)."""

    def __init__(self, h: int, kv: int, inter: int, odd: tuple[int, ...]) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(h)
        self.qkv_proj = FusedLinear(h, (h, kv, kv))
        self.o_proj = nn.Linear(h, h, bias=False)
        self.mlp_norm = nn.RMSNorm(h)
        self.gate_up_proj = FusedLinear(h, (inter, inter))
        self.down_proj = nn.Linear(inter, h, bias=True)
        dims = (h, *odd, h)
        self.odd = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(dims[:-1], dims[1:]))
        self.h, self.kv = h, kv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(self.attn_norm(x)).split(self.qkv_proj.split_sizes, -1)
        mixed = q * torch.sigmoid(k.mean(-1, keepdim=True)) + v.repeat(1, 1, -(-self.h // self.kv))[..., : self.h]
        x = x + self.o_proj(mixed)
        gate, up = self.gate_up_proj(self.mlp_norm(x)).chunk(2, -1)
        x = x + self.down_proj(F.silu(gate) * up)
        y = x
        for m in self.odd:
            y = torch.tanh(m(y))
        return x + y


class ToyAdapter(nn.Module):
    """Like the model's adapter: its own module (not nn.Linear) holding a 2-D weight [h, 2h]."""

    def __init__(self, h: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.cat([0.1 * torch.randn(h, h), torch.eye(h)], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.cat([torch.tanh(x), x], dim=-1), self.weight)


class Toy(nn.Module):
    def __init__(self, layers: int = 2, h: int = 16, kv: int = 6, inter: int = 12, odd=(7, 3)) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, h)
        self.adapter = ToyAdapter(h)
        self.layers = nn.ModuleList(ToyLayer(h, kv, inter, odd) for _ in range(layers))
        self.norm = nn.RMSNorm(h)
        self.lm_head = nn.Linear(h, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.adapter(self.embed_tokens(tokens[:, :-1]))
        for layer in self.layers:
            x = layer(x)
        logits = self.lm_head(self.norm(x))
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def batches(steps: int, rows: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (rows, 9), generator=g) for _ in range(steps)]


def rel_displacement_error(a: torch.Tensor, b: torch.Tensor, start: torch.Tensor) -> float:
    """|a - b| relative to how far b moved from start: a test that parameters barely moved can't pass."""
    return ((a - b).norm() / (b - start).norm()).item()


FP32_EPS = torch.finfo(torch.float32).eps


def fp32_close(diff: float, norm: float, displacement: float) -> bool:
    """|a - b| within 1e-6 of |b|, and within 1e-5 of the displacement |b - start| plus 4 fp32 ulps
    of |b| (a norm weight near 1.0 that moves 5e-3 cannot be resolved finer than ~2e-5 of that)."""
    return diff < 1e-6 * norm and diff < 1e-5 * displacement + 4 * FP32_EPS * norm


def assert_fp32_close(a: torch.Tensor, b: torch.Tensor, start: torch.Tensor, name: str) -> None:
    diff, norm, displacement = (a - b).norm().item(), b.norm().item(), (b - start).norm().item()
    assert fp32_close(diff, norm, displacement), (name, diff, norm, displacement)
