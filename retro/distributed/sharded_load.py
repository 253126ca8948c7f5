"""Fill a (possibly FSDP2-sharded) model from a tensor source, each rank reading only its own rows."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


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
            local_shape, offset = compute_local_shape_and_global_offset(
                param.shape, param.device_mesh, param.placements
            )
            local = param.to_local()
            if local.numel():
                local.copy_(get_rows(name, offset[0], offset[0] + local_shape[0]).to(local.dtype))
        else:
            param.copy_(get_rows(name, 0, expected[0]).to(param.dtype))
