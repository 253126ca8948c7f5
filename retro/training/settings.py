"""The run's `[train]` section: what the training loop itself needs (steps, batches, logging, validation)."""

from __future__ import annotations

from dataclasses import dataclass, field

from retro.distributed.setup import DTYPES
from retro.training.trainable import MODES


@dataclass
class TrainSettings:
    steps: int = 1000
    global_batch: int = 1024  # sequences per optimizer step, all ranks together
    micro_batch: int = 8  # sequences per rank per forward/backward
    seed: int = 0
    out_dir: str = "runs/default"
    log_every: int = 1
    val_every: int = 0  # 0 = only at the end
    val_batches: int = 8  # validation micro-batches, all ranks together (the same windows for any rank count)
    val_recurrences: list[int] = field(default_factory=lambda: [1, 4, 8, 16, 32])
    grad_clip: float = 1.0
    max_bad_steps: int = 5  # consecutive NaN/Inf steps tolerated (each skipped) before stopping
    dtype: str = field(default="auto", metadata={"choices": DTYPES})  # auto: bf16 compute on CUDA, fp32 on CPU
    tensorboard: bool = False
    # what trains: all | recurrent (adapter + block) | adapter | lora ([lora]); the rest is frozen
    trainable: str = field(default="all", metadata={"choices": MODES})

    def validate(self) -> None:
        if not self.out_dir.strip():
            raise ValueError("train.out_dir is empty: name the run directory (an empty one would train into the cwd)")
        for key in ("steps", "global_batch", "micro_batch", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if not self.grad_clip > 0:
            raise ValueError(f"train.grad_clip must be > 0 (the max gradient norm), got {self.grad_clip}")
        if not self.val_recurrences:
            raise ValueError(
                f"train.val_recurrences must list a test recurrence or more (e.g. [1, 4]), got {self.val_recurrences}"
            )
        if any(v < 1 for v in self.val_recurrences):
            raise ValueError(f"train.val_recurrences must be positive, got {self.val_recurrences}")
