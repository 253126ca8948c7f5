"""The chunked distillation loss against a plain reference with materialised logits and autograd (fp32:
the loss accumulates in fp32 as in training; tolerances 1e-5 relative)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from retro.model.loss import IGNORE_INDEX, Teacher, linear_cross_entropy, linear_distillation_loss


def reference(hidden, weight, targets, teacher_hidden, teacher_weight, kd_weight, temperature):
    """(1 - a) CE + a T^2 KL(teacher || student) from whole [N, V] logits; F.kl_div is the KL oracle."""
    logits = hidden @ weight.T
    valid = targets != IGNORE_INDEX
    count = valid.sum().clamp(min=1)
    ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum") / count
    student = F.log_softmax(logits / temperature, dim=-1)
    teacher = F.log_softmax((teacher_hidden @ teacher_weight.T) / temperature, dim=-1)
    kl_rows = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
    kd = (kl_rows * valid).sum() / count
    return (1 - kd_weight) * ce + kd_weight * temperature**2 * kd, ce, kd


def inputs(n=37, h=8, h_teacher=12, v=29, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float32)
    weight = torch.randn(v, h, generator=g, dtype=torch.float32)
    teacher_hidden = torch.randn(n, h_teacher, generator=g, dtype=torch.float32)
    teacher_weight = torch.randn(v, h_teacher, generator=g, dtype=torch.float32)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = IGNORE_INDEX  # ignored rows count in neither term
    return hidden, weight, targets, teacher_hidden, teacher_weight


@pytest.mark.parametrize("kd_weight,temperature,chunk", [(0.5, 1.0, 8), (0.3, 2.0, 5), (1.0, 0.5, 64), (0.0, 1.0, 7)])
def test_chunked_loss_and_gradients_equal_the_plain_reference(kd_weight, temperature, chunk):
    hidden, weight, targets, th, tw = inputs()
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got = linear_distillation_loss(h1, w1, targets, Teacher(th, tw, kd_weight, temperature), chunk_rows=chunk)
    got.total.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want_total, want_ce, want_kd = reference(h2, w2, targets, th, tw, kd_weight, temperature)
    want_total.backward()
    torch.testing.assert_close(got.total, want_total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.ce, want_ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.kd, want_kd.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)
    assert got.kd > 0  # two random models disagree


def test_kd_weight_zero_is_the_cross_entropy_loss_and_gradients():
    hidden, weight, targets, th, tw = inputs(seed=1)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    linear_distillation_loss(h1, w1, targets, Teacher(th, tw, 0.0, 3.0), chunk_rows=6).total.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    linear_cross_entropy(h2, w2, targets, chunk_rows=6).backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-6, atol=1e-7)


def test_a_student_equal_to_its_teacher_has_zero_kd():
    hidden, weight, targets, _, _ = inputs(seed=2)
    got = linear_distillation_loss(hidden, weight, targets, Teacher(hidden, weight, 0.5, 2.0), chunk_rows=4)
    assert abs(got.kd.item()) < 1e-6


def test_without_grad_the_loss_is_the_same_and_nothing_is_kept():
    hidden, weight, targets, th, tw = inputs(seed=3)
    with torch.no_grad():
        got = linear_distillation_loss(hidden, weight, targets, Teacher(th, tw, 0.4, 1.5), chunk_rows=9)
    want = reference(hidden, weight, targets, th, tw, 0.4, 1.5)[0]
    torch.testing.assert_close(got.total, want, rtol=1e-5, atol=1e-6)
    assert not got.total.requires_grad


def test_batched_shapes():
    hidden, weight, targets, th, tw = inputs(n=24, seed=4)
    hb = hidden.reshape(2, 12, -1).requires_grad_()
    got = linear_distillation_loss(hb, weight, targets.reshape(2, 12), Teacher(th.reshape(2, 12, -1), tw, 0.5, 1.0))
    want = reference(hidden, weight, targets, th, tw, 0.5, 1.0)[0]
    torch.testing.assert_close(got.total, want, rtol=1e-5, atol=1e-6)
    got.total.backward()
    assert hb.grad.shape == hb.shape


def test_a_teacher_with_another_vocabulary_is_refused():
    hidden, weight, targets, th, tw = inputs(seed=5)
    with pytest.raises(ValueError, match="same tokens and vocabulary"):
        linear_distillation_loss(hidden, weight, targets, Teacher(th, tw[:-1], 0.5, 1.0))
