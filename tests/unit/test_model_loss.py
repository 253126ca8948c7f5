"""The LM head's loss paths: no gradient work under no_grad, and one head pass when logits are returned."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_recurrent
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

import retro
from retro.model.loss import linear_cross_entropy, plain_cross_entropy
from retro.planning.check import EXTRA_FORMULAS

V, H = 61, 32


class Allocations(TorchDispatchMode):
    """(op, shape, dtype) of every tensor an op returns in a storage none of its inputs own."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[str, tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.records.append((str(func), tuple(t.shape), t.dtype))
        return out

    def shaped(self, *shapes) -> list:
        return [r for r in self.records if r[1] in {tuple(s) for s in shapes}]


def _operands(rows=37, vocab=50, hidden=16, hidden_grad=True, weight_grad=True):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(rows, hidden, generator=g).requires_grad_(hidden_grad)
    w = torch.randn(vocab, hidden, generator=g).requires_grad_(weight_grad)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[[3, 9]] = -100
    return h, w, targets


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "nothing_requires_grad"])
def test_loss_without_grad_allocates_no_gradient_buffers(mode):
    trainable = mode != "nothing_requires_grad"
    hidden, weight, targets = _operands(hidden_grad=trainable, weight_grad=trainable)
    with_grad = linear_cross_entropy(hidden, weight, targets, chunk_rows=8).detach()
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode, torch.enable_grad)
    with context(), Allocations() as allocations:
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=8)
    assert torch.equal(loss, with_grad)  # same value, bit for bit
    assert loss.grad_fn is None
    assert allocations.shaped(weight.shape, hidden.shape) == []  # no [V, h] / [N, h] gradient buffers


def test_loss_allocates_only_the_gradients_it_returns():
    """Frozen hidden states (only the head trains): no [N, h] buffer, same head gradient."""
    hidden, weight, targets = _operands(hidden_grad=False)
    with Allocations() as allocations:
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=8)
    assert allocations.shaped(hidden.shape) == []
    loss.backward()
    ref_w = weight.detach().clone().requires_grad_()
    plain_cross_entropy(hidden @ ref_w.T, targets).backward()
    assert torch.allclose(weight.grad, ref_w.grad, atol=1e-6)


def _model() -> retro.RetroForCausalLM:
    return tiny_recurrent(state_init="zeros")  # vocab V, hidden H


def _ids(batch=2, seq=9):
    return torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(2))


def test_model_eval_loss_allocates_no_head_gradient():
    """The evaluation call (no_grad, return_logits=False): no fp32 vocab x hidden buffer anywhere."""
    model = _model()
    ids = _ids()
    targets = torch.roll(ids, -1, 1)
    with_grad = model(ids, shift_labels=targets, num_recurrences=3, return_logits=False).loss.detach()
    with torch.no_grad(), Allocations() as allocations:
        loss = model(ids, shift_labels=targets, num_recurrences=3, return_logits=False).loss
    assert torch.equal(loss, with_grad)
    assert [r for r in allocations.shaped((V, H)) if r[2] == torch.float32] == []


def _old_style(model, ids, num_recurrences):
    """The computation before one head pass: chunked CE from the hidden states, logits separately."""
    hidden = model.model(ids, num_recurrences=num_recurrences)
    shift = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    return linear_cross_entropy(hidden, model.lm_head.weight, shift), model.lm_head(hidden)


def test_logits_and_loss_equal_the_chunked_computation():
    model = _model()
    ids = _ids()
    out = model(ids, labels=ids, num_recurrences=(1, 2))
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    loss, logits = _old_style(model, ids, (1, 2))
    loss.backward()
    assert abs(out.loss.item() - loss.item()) < 1e-6
    assert torch.allclose(out.logits, logits, atol=1e-6)
    for name, p in model.named_parameters():
        assert torch.allclose(grads[name], p.grad, rtol=1e-5, atol=1e-7), name
    model.zero_grad()
    chunked = model(ids, labels=ids, num_recurrences=(1, 2), return_logits=False)
    assert chunked.logits is None
    assert abs(chunked.loss.item() - loss.item()) < 1e-6


def _flops(fn) -> int:
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS) as counter:
        fn()
    return counter.get_total_flops()


def test_head_matmul_runs_once_with_logits():
    model = _model()
    ids = _ids()
    batch, seq = ids.shape
    head = 2 * batch * seq * H * V  # one [tokens, h] x [h, V] product

    body_fwd = _flops(lambda: model.model(ids, num_recurrences=2))
    body_step = _flops(lambda: model.model(ids, num_recurrences=2).sum().backward())
    with_logits_fwd = _flops(lambda: model(ids, labels=ids, num_recurrences=2))
    assert with_logits_fwd - body_fwd == head
    with_logits_step = _flops(lambda: model(ids, labels=ids, num_recurrences=2).loss.backward())
    assert with_logits_step - body_step == 3 * head  # forward, d hidden, d head weight
    loss_only_step = _flops(lambda: model(ids, labels=ids, num_recurrences=2, return_logits=False).loss.backward())
    assert loss_only_step - body_step == 3 * head
    with torch.no_grad():
        loss_only_eval = _flops(lambda: model(ids, labels=ids, num_recurrences=2, return_logits=False))
    assert loss_only_eval - body_fwd == head  # no gradient products under no_grad
