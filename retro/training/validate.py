"""Validation loss at several test recurrences, the same windows and initial states at every call."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from retro.distributed.setup import all_reduce_mean
from retro.training.recurrence import state_generator


@torch.no_grad()
def validation_losses(model, batches: Iterable[dict], recurrences: list[int], device: torch.device) -> dict[str, float]:
    """{"val_loss_r<r>": mean loss over every rank's batches} for each test recurrence r."""
    model.eval()
    out = {}
    for r in recurrences:
        total = torch.zeros(2, device=device)
        for i, batch in enumerate(batches):
            loss = model(
                batch["input_ids"].to(device),
                shift_labels=batch["labels"].to(device),
                num_recurrences=r,
                return_logits=False,
                generator=state_generator(0, 0, i, 0, device),
            ).loss
            total += torch.stack([loss.float(), torch.ones((), device=device)])
        all_reduce_mean(total)
        out[f"val_loss_r{r}"] = (total[0] / total[1].clamp(min=1)).item()
    model.train()
    return out
