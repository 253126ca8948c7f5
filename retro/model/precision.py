"""The dtype the model computes in under `torch.autocast`.

A single-process run casts through autocast (fp32 master weights, bf16 compute); an FSDP2 run casts
the parameters themselves (MixedPrecisionPolicy(param_dtype=bf16)). The model makes the first
compute what the second does: activations, the recurrent state and the norms' weights in the
autocast dtype from the embedding on, the loss's log-softmax in fp32, fp32 gradients for the weights.
"""

from __future__ import annotations

import torch


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype in force for `device`'s type, or None when autocast is off there."""
    kind = device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def to_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """`x` in the autocast dtype when autocast is on and would cast it (floating, not fp64), else `x`."""
    dtype = autocast_dtype(x.device)
    if dtype is None or not x.is_floating_point() or x.dtype in (dtype, torch.float64):
        return x
    return x.to(dtype)
