"""A training step on masked chat data is the mean over every loss token of the step: gradient
accumulation weighs micro-batches by their loss tokens, not equally (one process, in-process Trainer)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from train_helpers import TINY_CONFIG, make_chat_assets

from retro.distributed.setup import init_distributed
from retro.model.loss import IGNORE_INDEX
from retro.training.job_config import load_config
from retro.training.model_source import load_model_config
from retro.training.trainer import Trainer


@pytest.fixture(scope="module")
def trainer_and_batches(tmp_path_factory) -> tuple[Trainer, list[dict]]:
    root = tmp_path_factory.mktemp("masked_step")
    model, data = make_chat_assets(root, chats=120)
    overrides = [f"model.path={model}", f"data.train={data}", f"train.out_dir={root / 'run'}"]
    job = load_config(TINY_CONFIG, overrides + ["model.state_init=zeros"])  # zeros: no s0 noise per micro-batch
    trainer = Trainer(job, init_distributed(), load_model_config(job.model))
    loader = job.data.train_loader(job.train.micro_batch, 0, 1, job.train.seed)
    batches = [b for b, _ in zip(loader, range(trainer.accumulation))]
    return trainer, batches


def test_step_gradient_is_the_mean_over_the_steps_loss_tokens(trainer_and_batches):
    trainer, batches = trainer_and_batches
    model = trainer.model
    counts = [int((b["labels"] != IGNORE_INDEX).sum()) for b in batches]
    assert trainer.accumulation == 4 and len(set(counts)) > 1  # micro-batches hold unequal numbers of loss tokens
    draws = trainer.recurrence.draws(3, trainer.accumulation)  # sample_every = "step": one (n, k) for all
    weights = trainer.loss_weights(batches)
    assert torch.allclose(weights, torch.tensor(counts, dtype=torch.float32) / sum(counts))
    model.zero_grad(set_to_none=True)
    logged = sum(trainer.forward_backward(b, 3, i, d, weights[i]) for i, (b, d) in enumerate(zip(batches, draws)))
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    # reference: every micro-batch's rows in one forward, CE summed over all loss tokens / their count
    model.zero_grad(set_to_none=True)
    ids = torch.cat([b["input_ids"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    logits = model(ids, num_recurrences=(draws[0].n, draws[0].k)).logits
    reference = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    (reference / sum(counts)).backward(retain_graph=True)
    token_mean = reference.item() / sum(counts)
    assert abs(logged[0].item() - token_mean) <= 1e-5 * token_mean
    for name, p in model.named_parameters():
        if name in grads:
            assert torch.allclose(grads[name], p.grad, rtol=1e-4, atol=1e-7), name

    # equal micro-batch weights (the mean of micro-batch means) would give another gradient
    reference_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    rows = logits.size(0) // len(batches)
    micro_logits = logits.split(rows)
    per_micro = [
        F.cross_entropy(x.flatten(0, 1), b["labels"].flatten(), ignore_index=IGNORE_INDEX)
        for x, b in zip(micro_logits, batches)
    ]
    (sum(per_micro) / len(per_micro)).backward()
    assert any(
        not torch.allclose(reference_grads[name], p.grad, rtol=1e-3, atol=1e-6)
        for name, p in model.named_parameters()
        if name in reference_grads
    )


def test_a_step_without_loss_tokens_weighs_zero_not_nan(trainer_and_batches):
    trainer, batches = trainer_and_batches
    empty = [{**b, "labels": torch.full_like(b["labels"], IGNORE_INDEX)} for b in batches]
    assert torch.equal(trainer.loss_weights(empty), torch.zeros(len(empty)))
    weights = trainer.loss_weights([empty[0], *batches[1:]])
    assert weights[0] == 0 and abs(weights.sum().item() - 1) < 1e-6


def test_unmasked_weights_are_one_over_accumulation(trainer_and_batches):
    trainer, batches = trainer_and_batches
    full = [{**b, "labels": b["input_ids"].clone()} for b in batches]
    assert torch.equal(trainer.loss_weights(full), torch.full((len(full),), 1 / trainer.accumulation))
