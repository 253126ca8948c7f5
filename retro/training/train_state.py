"""The training loop's own resumable state (a DCP Stateful): step, LR scheduler, data position, RNG.

The checkpoint stores it per rank (`rank_<r>.pt`). Restored from a checkpoint written by another
number of ranks, the data position arrives as a resharded sampler state instead of the loader's.
`tokens` counts the tokens trained on, so the count stays right when train.global_batch changes on resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from retro.data.mixture import Reshard


@dataclass
class TrainState:
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: Any  # retro.data.loader.ShardLoader
    step: int = 0
    reshard: Reshard | None = None  # set when restored from a checkpoint written by another world size
    tokens: int | None = None  # tokens trained on so far; None from a checkpoint that predates the count

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.tokens = state.get("tokens")
        self.scheduler.load_state_dict(state["scheduler"])
        if "reshard" in state:
            self.loader.load_sampler_state(state["sampler"])
            self.reshard = state["reshard"]
        else:
            self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"])
