"""Validation loss: one token-weighted mean cross entropy, for training's validation and `retro.eval --task loss`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch

from retro.model.loss import IGNORE_INDEX


class TokenLoss(NamedTuple):
    loss: float  # sum of the token losses / tokens (0.0 without tokens)
    tokens: int  # predicted tokens: the labels that are not IGNORE_INDEX


@torch.no_grad()
def token_weighted_loss(
    model,
    batches: Iterable[dict],
    num_recurrences: int | None,
    generator_for: Callable[[int], torch.Generator],
    device: torch.device | str,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> TokenLoss:
    """Mean cross entropy per predicted token over `batches` of {"input_ids", "labels"} (labels already shifted).

    Each batch's loss (the model's mean over its predicted tokens) is weighted by its number of predicted
    tokens, so batches with fewer of them (ignored labels, a shorter last batch) count for less than in a mean
    of batch means. Batch i draws s0 from `generator_for(i)`. `reduce`, if given, is applied in place to the
    float64 tensor [sum of token losses, tokens] before the division (e.g. a sum all-reduce over ranks).
    """
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for i, batch in enumerate(batches):
        labels = batch["labels"].to(device)
        loss = model(
            batch["input_ids"].to(device),
            shift_labels=labels,
            num_recurrences=num_recurrences,
            return_logits=False,
            generator=generator_for(i),
        ).loss
        tokens = (labels != IGNORE_INDEX).sum()
        sums += torch.stack([loss.double() * tokens, tokens.double()])
    if reduce is not None:
        reduce(sums)
    total, tokens = sums.tolist()
    return TokenLoss(total / tokens if tokens else 0.0, int(tokens))
