"""Process group, device and mesh: one process, torchrun (FSDP) or a 2-D replicate x shard mesh (HSDP)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


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
            raise ValueError(
                f"parallel.replicate = {replicate} needs a distributed launch with a multiple of {replicate} ranks"
            )
        return None
    if info.world_size % replicate:
        raise ValueError(f"parallel.replicate = {replicate} does not divide the world size {info.world_size}")
    if replicate == 1:
        return init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(
        info.device.type, (replicate, info.world_size // replicate), mesh_dim_names=("replicate", "shard")
    )


DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}  # auto: bf16 on CUDA, fp32 on CPU


def compute_dtype(setting: str, device: torch.device) -> torch.dtype:
    """bf16 compute on GPU, fp32 on CPU unless the config says otherwise."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[setting]


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over ranks in place (gloo has no AVG: sum, then divide); a no-op in one process."""
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.AVG if value.device.type == "cuda" else dist.ReduceOp.SUM)
        if value.device.type != "cuda":
            value /= dist.get_world_size()
    return value


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place; a no-op in one process."""
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value
