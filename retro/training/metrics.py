"""The per-step metrics: the record of one optimizer step, and the log that keeps one JSON object per line
(with optional TensorBoard scalars).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retro.training.recurrence import Draw


@dataclass(frozen=True)
class StepCost:
    """What a step costs, fixed for the run: the basis of its throughput and loop-aware MFU."""

    tokens_per_step: int  # global batch x sequence length
    flops_per_token: Callable[[float, float], float]  # at (mean n, mean k): exact, FLOPs are linear in both
    peak_flops: float  # per device
    world_size: int
    device: torch.device

    def record(
        self,
        step: int,
        losses: dict[str, float],
        grad_norm: float,
        lrs: list[float],
        draws: list[Draw],
        elapsed: float,
        tokens: int | None = None,
    ) -> dict[str, Any]:
        """Optimizer step `step` (1-based) as logged: losses ("loss" and the objective's parts), recurrence,
        throughput, loop-aware MFU, peak memory; "skipped" when the loss or gradient norm is not finite.
        `tokens`: trained on so far (the run's count, right across a changed global batch); default
        step x tokens_per_step."""
        n = sum(d.n for d in draws) / len(draws)
        k = sum(d.k for d in draws) / len(draws)
        loss, parts = losses["loss"], {name: value for name, value in losses.items() if name != "loss"}
        cuda = self.device.type == "cuda"
        return {
            "step": step,
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lrs[-1],
            "lr_groups": lrs,
            "n": n,
            "k": k,
            "r": n + k,
            "r_micro": [d.r for d in draws],
            "mean_recurrence": draws[0].mean,
            "capped": sum(d.capped for d in draws),
            "tokens": step * self.tokens_per_step if tokens is None else tokens,
            "tokens_per_s": self.tokens_per_step / elapsed,
            "step_time_s": elapsed,
            "skipped": not (math.isfinite(loss) and math.isfinite(grad_norm)),
            "mfu": self.flops_per_token(n, k) * self.tokens_per_step / elapsed / self.peak_flops / self.world_size,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            **parts,
        }


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


def truncate_after(path: Path, step: int, say: Callable[[str], None] = print) -> None:
    """Drop the records of steps after `step` (a resumed run re-runs them), so plots show each step once.

    A line that is not a JSON record (a partial last line, from a crash mid-write) is dropped with a
    note naming the file and line; it does not block the resume.
    """
    if not path.is_file():
        return
    kept = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            say(f"retro.train: note: {path}:{number}: dropping a partial line (a crash mid-write?): {line[:60]!r}")
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))
