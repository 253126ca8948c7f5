"""Distributed setup and model parallelisation: process group, device mesh, AC -> compile -> FSDP2.

Sharding units: each prelude/coda layer, the whole recurrent core (adapter + block, all passes in
one module call, so its weights are gathered once per forward and once per backward whatever r
is), and the root (embeddings, final norm, head).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from retro.config import ParallelConfig
from retro.model import RetroForCausalLM


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init_distributed() -> DistInfo:
    """Join the torchrun group if launched by torchrun (nccl on CUDA, gloo on CPU); else one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, device)


def build_mesh(info: DistInfo, replicate: int) -> DeviceMesh | None:
    """1-D mesh (FSDP) or 2-D (replicate x shard, HSDP); None when running as a single process."""
    if not info.distributed:
        if replicate != 1:
            raise ValueError(f"parallel.replicate = {replicate} needs a distributed launch with a multiple of {replicate} ranks")
        return None
    if info.world_size % replicate:
        raise ValueError(f"parallel.replicate = {replicate} does not divide the world size {info.world_size}")
    if replicate == 1:
        return init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(info.device.type, (replicate, info.world_size // replicate), mesh_dim_names=("replicate", "shard"))


def compute_dtype(setting: str, device: torch.device) -> torch.dtype:
    """bf16 compute on GPU, fp32 on CPU unless the config says otherwise."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[setting]


def parallelize(model: RetroForCausalLM, mesh: DeviceMesh | None, config: ParallelConfig, dtype: torch.dtype) -> RetroForCausalLM:
    """Activation checkpointing, then per-layer compile, then FSDP2 (torchtitan's order)."""
    inner = model.model
    if inner.recurrent is not None:
        inner.recurrent.checkpoint_passes = config.activation_checkpointing in ("recurrence", "full")
    inner.checkpoint_layers = config.activation_checkpointing == "full"
    if config.compile:
        for layer in decoder_layers(model):
            layer.compile(dynamic=False)
    if mesh is None:
        return model
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else MixedPrecisionPolicy()
    kwargs = dict(mesh=mesh, mp_policy=mp, reshard_after_forward=config.reshard_after_forward)
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


@torch.no_grad()
def load_rows_into(model: torch.nn.Module, get_rows, get_shape) -> None:
    """Fill every parameter (plain or FSDP2-sharded DTensor) with its rows from a tensor source.

    Each rank reads only its own shard's rows, so a large model never sits whole in one process.
    `get_rows(name, start, stop)` and `get_shape(name)` come from a safetensors reader or a dict.
    """
    for name, param in model.named_parameters():
        expected = list(param.shape)
        found = get_shape(name)
        if found != expected:
            raise ValueError(f"checkpoint tensor {name} has shape {found}, the model expects {expected}")
        if isinstance(param, DTensor):
            local_shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
            local = param.to_local()
            if local.numel():
                local.copy_(get_rows(name, offset[0], offset[0] + local_shape[0]).to(local.dtype))
        else:
            param.copy_(get_rows(name, 0, expected[0]).to(param.dtype))
