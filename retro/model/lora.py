"""Low-rank adapters (LoRA) on the recurrent block's projections, and their merge into plain weights.

A targeted projection y = W x gains (alpha / rank) · B (A x), with A [rank, in] random and B
[out, rank] zero, so at step 0 the model is the base model exactly. Our layers fuse q|k|v and
gate|up into one matrix each (retro/model/layers.py); a target names a logical projection
(`q_proj`, `up_proj`, ...), which gets its own A and B and changes only its own rows of the fused
matrix, as it would on an unfused model. The base weights keep their names (a converted model loads
as before); the adapters add `<projection>.lora.<target>.A` / `.B`, which checkpoints save with the
rest. `merge_lora` folds W += (alpha / rank) · B A into the base rows and removes the adapters:
what `retro.export` writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from retro.model.layers import DecoderLayer, Linear

# logical projection -> (the Linear in a DecoderLayer that holds it, its part in that Linear's split_sizes)
TARGETS: dict[str, tuple[str, int]] = {
    "q_proj": ("attn.qkv_proj", 0),
    "k_proj": ("attn.qkv_proj", 1),
    "v_proj": ("attn.qkv_proj", 2),
    "o_proj": ("attn.o_proj", 0),
    "gate_proj": ("mlp.gate_up_proj", 0),
    "up_proj": ("mlp.gate_up_proj", 1),
    "down_proj": ("mlp.down_proj", 0),
}


@dataclass
class LoraSettings:
    """The run's `[lora]` section, read when train.trainable = "lora"."""

    rank: int = 16
    alpha: float = 32.0  # the update is scaled by alpha / rank
    targets: list[str] = field(default_factory=lambda: list(TARGETS))  # the block's projections that get A, B
    train_adapter: bool = True  # the 2h -> h adapter trains in full beside the low-rank updates

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not self.targets:
            raise ValueError(f"lora.targets must name at least one of {', '.join(TARGETS)}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise ValueError(f"lora.targets: unknown {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"lora.targets names a projection twice: {self.targets}")


class LowRank(nn.Module):
    """One low-rank update (alpha / rank) · B A of an [out, in] matrix."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = alpha / rank
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """A as nn.Linear's default init (uniform, bound 1/sqrt(in)), B = 0: the update starts at zero."""
        if self.A.is_meta:
            return
        self.A.copy_(init_A(tuple(self.A.shape), generator).to(self.A))
        self.B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B) * self.scale

    def delta(self) -> torch.Tensor:
        """The update as a dense [out, in] matrix, in fp32."""
        return self.scale * (self.B.float() @ self.A.float())


def init_A(shape: tuple[int, int], generator: torch.Generator | None = None) -> torch.Tensor:
    """A's starting values: U(-1/sqrt(in), 1/sqrt(in)), nn.Linear's default (and PEFT's) for that shape."""
    bound = 1.0 / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class LoRA(nn.Module):
    """The low-rank updates of one (possibly fused) Linear: one `LowRank` per targeted logical part."""

    def __init__(self, linear: Linear, parts: dict[str, int], rank: int, alpha: float) -> None:
        super().__init__()
        sizes = getattr(linear, "split_sizes", (linear.out_features,))  # FusedLinear: q|k|v or gate|up
        self.sizes = tuple(sizes)
        self.part_of = dict(parts)  # target name -> part index
        self.updates = nn.ModuleDict(
            {name: LowRank(linear.in_features, sizes[i], rank, alpha) for name, i in parts.items()}
        )

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` (the base projection of x) with each targeted part's update added to its rows."""
        if len(self.sizes) == 1:
            (update,) = self.updates.values()
            return out + update(x)
        pieces = list(out.split(self.sizes, dim=-1))
        for name, update in self.updates.items():
            i = self.part_of[name]
            pieces[i] = pieces[i] + update(x)
        return torch.cat(pieces, dim=-1)

    def rows(self, name: str) -> tuple[int, int]:
        """[start, stop) of target `name`'s rows in the base weight."""
        i = self.part_of[name]
        start = sum(self.sizes[:i])
        return start, start + self.sizes[i]


def add_lora(block: nn.ModuleList, settings: LoraSettings) -> int:
    """Attach low-rank updates to the targeted projections of every layer of `block`; returns how many.

    Works on the meta device (the trainer attaches them before FSDP2 wraps the model)."""
    count = 0
    for layer in block:
        if not isinstance(layer, DecoderLayer):
            raise TypeError(f"LoRA goes on DecoderLayers, got {type(layer).__name__}")
        by_linear: dict[str, dict[str, int]] = {}
        for target in settings.targets:
            path, part = TARGETS[target]
            by_linear.setdefault(path, {})[target] = part
        for path, parts in by_linear.items():
            linear = layer.get_submodule(path)
            if linear.lora is not None:
                raise ValueError(f"{path} already carries LoRA updates")
            linear.lora = LoRA(linear, parts, settings.rank, settings.alpha)
            count += len(parts)
    return count


def lora_linears(model: nn.Module) -> list[Linear]:
    return [m for m in model.modules() if isinstance(m, Linear) and m.lora is not None]


def is_lora_parameter(name: str) -> bool:
    """Whether a parameter name (as named_parameters / state_dict give it) is a LoRA A or B."""
    return ".lora.updates." in name


def lora_start_values(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """{name: full tensor} of every LoRA parameter's starting value, from one generator seeded by `seed`
    in parameter order: the same on every rank, so a sharded model can load its rows of them."""
    generator = torch.Generator().manual_seed(seed)
    values = {}
    for name, p in model.named_parameters():
        if is_lora_parameter(name):
            shape = tuple(p.shape)
            values[name] = init_A(shape, generator) if name.endswith(".A") else torch.zeros(shape)
    return values


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every low-rank update into its base rows (fp32 sum, cast back) and remove the adapters:
    the result is a plain model with the same function. Returns how many updates were merged."""
    merged = 0
    for linear in lora_linears(model):
        for name, update in linear.lora.updates.items():
            start, stop = linear.lora.rows(name)
            rows = linear.weight[start:stop]
            rows.copy_((rows.float() + update.delta()).to(rows.dtype))
            merged += 1
        linear.lora = None
    return merged
