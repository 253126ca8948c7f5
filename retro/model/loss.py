"""The LM head's loss without materialising the full [tokens, vocab] logits: CE, and CE + distillation.

The head matmul, log-softmax and their gradients run in row chunks inside the forward: the
gradients w.r.t. the hidden states and the head weight are produced there and handed back in
backward. Same FLOPs as the plain path, no saved logits, fewer elementwise passes.

Distillation (`linear_distillation_loss`) adds a frozen teacher's head in the same loop: each chunk's
teacher logits are computed next to the student's, so neither model's [tokens, vocab] logits exist
whole; loss = (1 - a) * CE + a * T^2 * KL(teacher || student) at temperature T.

Without gradients (no_grad / inference_mode, or nothing requires grad: evaluation) only the loss
is computed: no gradient products and no gradient buffers (the head's would be an fp32
[vocab, hidden] tensor, ~1 GiB at Llama-3's vocabulary). A buffer is allocated only for an input
that needs its gradient.

Under `torch.autocast` the matmuls run in the autocast dtype (weights cast once per call, as
autocast would), the log-softmax in fp32, and the head's gradient is accumulated in fp32 and
returned in the weight's own dtype (fp32 master weights get an fp32 gradient).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F

from retro.model.precision import autocast_dtype

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Teacher:
    """A frozen teacher's side of one distillation loss: its final hidden states and head weight."""

    hidden: torch.Tensor  # [N, h_teacher], no grad
    weight: torch.Tensor  # [V, h_teacher]
    kd_weight: float  # weight of the KD term; 1 - kd_weight weighs CE
    temperature: float


class HeadLoss(NamedTuple):
    total: torch.Tensor  # what is backpropagated
    ce: torch.Tensor  # mean CE (detached)
    kd: torch.Tensor  # mean KL(teacher || student) at the temperature, unscaled (detached; 0 without teacher)


def _chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int,
    dtype: torch.dtype,
    want_hidden: bool,
    want_weight: bool,
    teacher: Teacher | None = None,
) -> tuple[HeadLoss, torch.Tensor | None, torch.Tensor | None]:
    """The head's loss over `hidden @ weight.T` (matmuls in `dtype`) and, if wanted, its gradients
    w.r.t. hidden ([N, h], hidden's dtype) and weight ([V, h], fp32)."""
    valid = targets != IGNORE_INDEX
    count = valid.sum().clamp(min=1)
    w = weight.to(dtype)
    grad_hidden = torch.empty_like(hidden) if want_hidden else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
    ce_sum = hidden.new_zeros((), dtype=torch.float32)
    kd_sum = hidden.new_zeros((), dtype=torch.float32)
    if teacher is not None:
        a, temp = teacher.kd_weight, teacher.temperature
        w_teacher = teacher.weight.to(dtype)
    off = autocast_dtype(hidden.device) is not None
    with torch.autocast(hidden.device.type, enabled=False) if off else contextlib.nullcontext():
        for start in range(0, hidden.size(0), chunk_rows):
            h = hidden[start : start + chunk_rows].to(dtype)
            t = targets[start : start + chunk_rows]
            keep = (t != IGNORE_INDEX)[:, None]
            safe_t = t.clamp(min=0)[:, None]
            logits = (h @ w.mT).float()
            log_probs = torch.log_softmax(logits, dim=-1)
            ce_sum -= (log_probs.gather(1, safe_t) * keep).sum()
            if teacher is not None:
                h_teacher = teacher.hidden[start : start + chunk_rows].to(dtype)
                teacher_log_probs = torch.log_softmax((h_teacher @ w_teacher.mT).float() / temp, dim=-1)
                student_log_q = torch.log_softmax(logits / temp, dim=-1)
                teacher_probs = teacher_log_probs.exp()
                kd_rows = (teacher_probs * (teacher_log_probs - student_log_q)).sum(dim=-1, keepdim=True)
                kd_sum += (kd_rows * keep).sum()
            if not (want_hidden or want_weight):
                continue
            # d CE / d logits = (softmax - onehot); d (T^2 KL) / d logits = T (softmax(z / T) - p_teacher);
            # the row scale keep / count is applied to the small [rows, h] operands, not [rows, vocab].
            grad_logits = log_probs.exp_()
            grad_logits.scatter_add_(1, safe_t, torch.full_like(safe_t, -1, dtype=grad_logits.dtype))
            if teacher is not None:
                grad_logits.mul_(1 - a).add_(student_log_q.exp_().sub_(teacher_probs), alpha=a * temp)
            grad_logits = grad_logits.to(dtype)
            row_scale = keep.to(dtype) / count
            if want_hidden:
                grad_hidden[start : start + chunk_rows] = (grad_logits @ w) * row_scale
            if want_weight:
                grad_weight.addmm_(grad_logits.mT.float(), (h * row_scale).float())
    ce, kd = ce_sum / count, kd_sum / count
    total = ce if teacher is None else (1 - a) * ce + a * temp**2 * kd
    return HeadLoss(total, ce.detach(), kd.detach()), grad_hidden, grad_weight


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, dtype: torch.dtype, teacher: Teacher | None):
        # Only applied with grad mode on, where needs_input_grad is each input's requires_grad
        # (under no_grad it still reads True for a parameter: the caller checks grad mode).
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, grad_hidden, grad_weight = _chunked(
            hidden, weight, targets, chunk_rows, dtype, want_hidden, want_weight, teacher
        )
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(loss.ce, loss.kd)
        return loss.total, loss.ce, loss.kd

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor, *_):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_output if ctx.needs_input_grad[0] else None
        gw = (grad_weight * grad_output).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None


LOSS_CHUNK_ROWS = 4096  # rows of [rows, vocab] logits alive at once (the planner counts the same)
# Distillation holds about three more fp32 [rows, vocab] buffers per chunk (teacher log-probs and probs,
# student softmax(z / T)): a quarter of the rows keeps its peak near CE's.
DISTILL_CHUNK_ROWS = LOSS_CHUNK_ROWS // 4


def _head_loss(hidden, weight, targets, chunk_rows: int, teacher: Teacher | None) -> HeadLoss:
    hidden, targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
    if teacher is not None:
        teacher = replace(teacher, hidden=teacher.hidden.reshape(-1, teacher.hidden.size(-1)))
        if teacher.hidden.size(0) != hidden.size(0) or teacher.weight.size(0) != weight.size(0):
            raise ValueError(
                f"teacher gives {teacher.hidden.size(0)} rows x {teacher.weight.size(0)} vocab, the student "
                f"{hidden.size(0)} x {weight.size(0)}: distillation needs the same tokens and vocabulary"
            )
    dtype = autocast_dtype(hidden.device) or hidden.dtype
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return HeadLoss(*_ChunkedHeadLoss.apply(hidden, weight, targets, chunk_rows, dtype, teacher))
    return _chunked(hidden, weight, targets, chunk_rows, dtype, False, False, teacher)[0]


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int = LOSS_CHUNK_ROWS
) -> torch.Tensor:
    """Mean CE of `hidden @ weight.T` against `targets` (IGNORE_INDEX skipped), chunked over rows."""
    return _head_loss(hidden, weight, targets, chunk_rows, None).total


def linear_distillation_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    teacher: Teacher,
    chunk_rows: int = DISTILL_CHUNK_ROWS,
) -> HeadLoss:
    """(1 - a) * CE + a * T^2 * KL(teacher || student) over the non-ignored targets' rows, chunked.

    KL at temperature T: sum_v p_t log(p_t / q_s) with p_t = softmax(z_teacher / T), q_s =
    softmax(z_student / T); T^2 keeps the gradient's scale independent of T (Hinton et al.).
    """
    return _head_loss(hidden, weight, targets, chunk_rows, teacher)


def plain_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE over non-ignored targets from materialised logits (fp32 log-softmax); 0 if none.

    The loss of a call that returns logits (one head pass), and the tests' reference path.
    """
    targets = targets.reshape(-1)
    count = (targets != IGNORE_INDEX).sum().clamp(min=1)
    total = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / count
