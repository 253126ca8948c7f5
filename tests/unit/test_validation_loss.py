"""Validation loss is a mean per predicted token (training's validation and `retro.eval --task loss` share it).

A mean of batch means weighs a batch with few predicted tokens (ignored labels, a short last batch) as much
as a full one; the token-weighted mean does not. Both equal on full windows of equal-size batches.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_recurrent

from retro.inference.validation_loss import token_weighted_loss
from retro.model.loss import IGNORE_INDEX
from retro.training.recurrence import state_generator
from retro.training.validate import validation_losses

V, R = 61, 2
CPU = torch.device("cpu")


def _batch(rows: int, seq: int, seed: int, ignored: int = 0) -> dict:
    x = torch.randint(0, V, (rows, seq + 1), generator=torch.Generator().manual_seed(seed))
    labels = x[:, 1:].clone()
    if ignored:
        labels[:, -ignored:] = IGNORE_INDEX
    return {"input_ids": x[:, :-1], "labels": labels}


def _by_hand(model, batches: list[dict]) -> tuple[list[float], list[int]]:
    """Each batch's (summed CE over its predicted tokens, number of them), with validation's s0 generators."""
    sums, counts = [], []
    with torch.no_grad():
        for i, batch in enumerate(batches):
            logits = model(
                batch["input_ids"], num_recurrences=R, generator=state_generator(0, 0, i, 0, CPU)
            ).logits.float()
            labels = batch["labels"].flatten()
            ce = F.cross_entropy(logits.flatten(0, 1), labels, ignore_index=IGNORE_INDEX, reduction="sum")
            sums.append(float(ce))
            counts.append(int((labels != IGNORE_INDEX).sum()))
    return sums, counts


def _losses(model, batches: list[dict]) -> tuple[float, float]:
    """(validation_losses' value, token_weighted_loss's value) at r = R."""
    from_training = validation_losses(model, batches, [R], CPU)[f"val_loss_r{R}"]
    model.eval()
    shared = token_weighted_loss(model, batches, R, lambda i: state_generator(0, 0, i, 0, CPU), CPU)
    return from_training, shared.loss


def test_token_weighting_differs_from_batch_averaging_when_batches_predict_unequal_tokens():
    model = tiny_recurrent().eval()  # s0 drawn from trunc_normal: the per-batch generators matter
    batches = [_batch(2, 12, seed=1), _batch(1, 12, seed=2, ignored=9)]  # 24 and 3 predicted tokens
    sums, counts = _by_hand(model, batches)
    assert counts == [24, 3]
    token_weighted = sum(sums) / sum(counts)
    batch_averaged = sum(s / c for s, c in zip(sums, counts)) / len(batches)
    assert abs(token_weighted - batch_averaged) > 1e-3  # the two averages disagree on these batches
    from_training, shared = _losses(model, batches)
    assert shared == pytest.approx(token_weighted, rel=1e-5)
    assert from_training == pytest.approx(token_weighted, rel=1e-5)
    assert shared != pytest.approx(batch_averaged, rel=1e-4)


def test_on_full_equal_batches_it_equals_the_mean_of_batch_means():
    model = tiny_recurrent().eval()
    batches = [_batch(2, 10, seed=s) for s in (3, 4, 5)]
    sums, counts = _by_hand(model, batches)
    batch_averaged = sum(s / c for s, c in zip(sums, counts)) / len(batches)
    for value in _losses(model, batches):
        assert value == pytest.approx(batch_averaged, rel=1e-5)


def test_reduce_sees_the_sums_before_the_division():
    """A sum all-reduce over ranks adds every rank's losses and tokens: stand in for it with a copy of this rank."""
    model = tiny_recurrent().eval()
    batches = [_batch(2, 8, seed=6), _batch(1, 8, seed=7, ignored=3)]
    alone = token_weighted_loss(model, batches, R, lambda i: state_generator(0, 0, i, 0, CPU), CPU)
    seen = []

    def twice(sums: torch.Tensor) -> torch.Tensor:
        seen.append(sums.clone())
        return sums.mul_(2)

    doubled = token_weighted_loss(model, batches, R, lambda i: state_generator(0, 0, i, 0, CPU), CPU, reduce=twice)
    assert alone.tokens == 2 * 8 + 5 and doubled.tokens == 2 * alone.tokens
    assert doubled.loss == pytest.approx(alone.loss, rel=1e-12)
    assert seen[0].dtype == torch.float64 and seen[0][1] == alone.tokens
    assert token_weighted_loss(model, [], R, lambda i: None, CPU) == (0.0, 0)
