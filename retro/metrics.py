"""Loop-aware FLOP counting, MFU, and the per-step JSONL (and optional TensorBoard) log."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retro.model_config import RetroConfig

# Dense bf16 peak FLOP/s of common accelerators (vendor spec sheets), by substring of the device name.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


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

    @classmethod
    def from_config(cls, config: RetroConfig, seq_len: int) -> "FlopModel":
        h, d = config.hidden_size, config.head_dim
        q, kv, i = config.num_attention_heads * d, config.num_key_value_heads * d, config.intermediate_size
        layer = h * (q + 2 * kv) + q * h + 3 * h * i
        return cls(
            stage_params=layer * (config.n_prelude + config.n_coda),
            pass_params=layer * config.n_recurrent + (h * h if config.is_recurrent else 0),
            inject_params=h * h if config.is_recurrent else 0,
            head_params=config.vocab_size * h,
            attn_dim=q, n_stage_layers=config.n_prelude + config.n_coda, n_block_layers=config.n_recurrent, seq_len=seq_len,
        )

    def per_token(self, n: int, k: int) -> float:
        attn = self.seq_len * self.attn_dim
        grad = 6 * (self.stage_params + self.head_params + self.inject_params + k * self.pass_params)
        grad += 12 * attn * (self.n_stage_layers + k * self.n_block_layers)
        no_grad = n * (2 * self.pass_params + 4 * attn * self.n_block_layers)
        return float(grad + no_grad)

    def forward_per_token(self, r: int) -> float:
        """Inference cost (no backward) at r passes."""
        attn = self.seq_len * self.attn_dim
        weights = self.stage_params + self.head_params + self.inject_params + r * self.pass_params
        return float(2 * weights + 4 * attn * (self.n_stage_layers + r * self.n_block_layers))


def peak_flops(device: torch.device) -> float:
    """Peak FLOP/s for MFU: the spec sheet on known GPUs, a measured fp32 matmul on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value
        return 989e12
    import time
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = 0.0
    for _ in range(5):  # the best of a few warm repeats: a noisy neighbour lowers it less
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * 2048**3 / (time.perf_counter() - start))
    return best


class MetricsLog:
    """Rank 0 appends one JSON object per line; TensorBoard scalars mirror it when enabled."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a")
        self.writer = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(tensorboard_dir))

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
