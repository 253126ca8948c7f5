"""The training loop's own resumable state (a DCP Stateful): step, LR scheduler, data position, RNG;
and the scheduler's construction from `[optim]` and its re-basing on resume.

The checkpoint stores it per rank (`rank_<r>.pt`). Restored from a checkpoint written by another
number of ranks, the data position arrives as a resharded sampler state instead of the loader's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from retro.data.mixture import Reshard
from retro.optim.build import OptimSettings
from retro.optim.lr_schedule import build_scheduler


@dataclass
class TrainState:
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: Any  # retro.data.loader.ShardLoader
    step: int = 0
    reshard: Reshard | None = None  # set when restored from a checkpoint written by another world size

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.scheduler.load_state_dict(state["scheduler"])
        if "reshard" in state:
            self.loader.load_sampler_state(state["sampler"])
            self.reshard = state["reshard"]
        else:
            self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"])


def scheduler_for(
    optimizer: torch.optim.Optimizer, settings: OptimSettings, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The scheduler the `[optim]` settings of a run with `total_steps` steps describe."""
    return build_scheduler(
        optimizer,
        total_steps=total_steps,
        warmup_steps=settings.warmup_steps,
        decay_steps=settings.decay_steps_for(total_steps),
        kind=settings.schedule,
        min_ratio=settings.min_lr_ratio,
    )


def rebase_learning_rates(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, settings: OptimSettings
) -> list[tuple[str, float, float]]:
    """After a resume, make the config's base lrs the ones in force (a restored scheduler keeps the
    checkpoint's): returns (key, old, new) for each changed one, so the trainer can say so."""
    changed = {}
    for i, group in enumerate(optimizer.param_groups):
        key = "optim.muon_lr" if group.get("use_muon") else "optim.lr"
        new = settings.muon_lr if group.get("use_muon") else settings.lr
        old = scheduler.base_lrs[i]
        if old != new:
            changed[key] = (old, new)
            scheduler.base_lrs[i] = group["initial_lr"] = new
            group["lr"] = new * scheduler.lr_lambdas[i](scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return [(key, old, new) for key, (old, new) in changed.items()]
