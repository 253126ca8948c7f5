"""Validation loss at several test recurrences, the same windows and initial states at every call."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from retro.distributed.setup import all_reduce_sum
from retro.inference.validation_loss import token_weighted_loss
from retro.training.recurrence import state_generator


@torch.no_grad()
def validation_losses(model, batches: Iterable[dict], recurrences: list[int], device: torch.device) -> dict[str, float]:
    """{"val_loss_r<r>": loss per predicted token over every rank's batches} for each test recurrence r."""
    model.eval()
    out = {}
    for r in recurrences:
        result = token_weighted_loss(
            model, batches, r, lambda i: state_generator(0, 0, i, 0, device), device, reduce=all_reduce_sum
        )
        out[f"val_loss_r{r}"] = result.loss
    model.train()
    return out
