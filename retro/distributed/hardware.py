"""Accelerator specs the planner and the MFU metric share: one table, from vendor spec sheets."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# Dense bf16 peak FLOP/s, by substring of the CUDA device name.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}
DEFAULT_GPU = "H200"


@dataclass(frozen=True)
class GpuSpec:
    peak_flops: float  # dense bf16 FLOP/s (spec sheet)
    memory_bytes: float
    intra_node_bw: float  # bytes/s per GPU, one direction (NVLink)
    inter_node_bw: float  # bytes/s per GPU, one direction (one NIC per GPU)


GPUS = {
    "h200": GpuSpec(PEAK_BF16_FLOPS["H200"], 141e9, 450e9, 50e9),
    "h100": GpuSpec(PEAK_BF16_FLOPS["H100"], 80e9, 450e9, 50e9),
    "a100": GpuSpec(PEAK_BF16_FLOPS["A100"], 80e9, 300e9, 25e9),
}


def peak_flops(device: torch.device) -> float:
    """Peak FLOP/s for MFU: the spec sheet on known GPUs, a measured fp32 matmul on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for key, v in PEAK_BF16_FLOPS.items() if key in name), PEAK_BF16_FLOPS[DEFAULT_GPU])
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = 0.0
    for _ in range(5):  # the best of a few warm repeats: a noisy neighbour lowers it less
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * 2048**3 / (time.perf_counter() - start))
    return best
