"""Parallelise a model: activation checkpointing -> per-layer compile -> FSDP2 (torchtitan's order).

Sharding units: each prelude/coda layer, the whole recurrent core (adapter + block, all passes in
one module call, so its weights are gathered once per forward and once per backward whatever r
is), and the root (embeddings, final norm, head).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from retro.model.modeling import RetroForCausalLM

AC_MODES = ("none", "recurrence", "full")  # recurrence: each pass; full: each pass + each prelude/coda layer


@dataclass
class ParallelSettings:
    """The run's `[parallel]` section."""

    replicate: int = 1  # HSDP: replicate across this many groups, shard within each (1 = plain FSDP)
    activation_checkpointing: str = field(default="recurrence", metadata={"choices": AC_MODES})
    compile: bool = False  # torch.compile each decoder layer
    reshard_after_forward: bool = True

    def validate(self) -> None:
        if self.replicate < 1:
            raise ValueError(f"parallel.replicate must be >= 1, got {self.replicate}")


def apply_activation_checkpointing(model: RetroForCausalLM, mode: str) -> None:
    """Per-recurrence checkpointing ("recurrence"), plus each prelude/coda layer ("full")."""
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing must be one of {AC_MODES}, got {mode!r}")
    inner = model.model
    if inner.recurrent is not None:
        inner.recurrent.checkpoint_passes = mode in ("recurrence", "full")
    inner.checkpoint_layers = mode == "full"


def parallelize(
    model: RetroForCausalLM, mesh: DeviceMesh | None, settings: ParallelSettings, dtype: torch.dtype
) -> RetroForCausalLM:
    """Activation checkpointing, then per-layer compile, then FSDP2 (torchtitan's order)."""
    inner = model.model
    apply_activation_checkpointing(model, settings.activation_checkpointing)
    if settings.compile:
        for layer in decoder_layers(model):
            layer.compile(dynamic=False)
    if mesh is None:
        return model
    mp = (
        MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        if dtype != torch.float32
        else MixedPrecisionPolicy()
    )
    kwargs = dict(mesh=mesh, mp_policy=mp, reshard_after_forward=settings.reshard_after_forward)
    for layer in list(inner.prelude) + list(inner.coda):
        fully_shard(layer, **kwargs)
    if inner.recurrent is not None:
        fully_shard(inner.recurrent, **kwargs)
    # The root (embeddings, final norm, head) stays gathered from forward into backward, as FSDP2
    # does by default: the backward starts with the head, so resharding it would only buy one more
    # all-gather of the largest unit (the root is gathered for the whole forward anyway).
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})
    return model


def decoder_layers(model: RetroForCausalLM) -> list[torch.nn.Module]:
    inner = model.model
    block = list(inner.recurrent.block) if inner.recurrent is not None else []
    return list(inner.prelude) + block + list(inner.coda)
