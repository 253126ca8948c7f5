"""Cross-entropy of the LM head without materialising the full [tokens, vocab] logits.

The head matmul, log-softmax and their gradients run in row chunks inside the forward: the
gradients w.r.t. the hidden states and the head weight are produced there and handed back in
backward. Same FLOPs as the plain path, no saved logits, fewer elementwise passes.

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

import torch
import torch.nn.functional as F

from retro.model.precision import autocast_dtype

IGNORE_INDEX = -100


def _chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int,
    dtype: torch.dtype,
    want_hidden: bool,
    want_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mean CE of `hidden @ weight.T` (matmuls in `dtype`) and, if wanted, its gradients w.r.t.
    hidden ([N, h], hidden's dtype) and weight ([V, h], fp32)."""
    valid = targets != IGNORE_INDEX
    count = valid.sum().clamp(min=1)
    w = weight.to(dtype)
    grad_hidden = torch.empty_like(hidden) if want_hidden else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
    total = hidden.new_zeros((), dtype=torch.float32)
    off = autocast_dtype(hidden.device) is not None
    with torch.autocast(hidden.device.type, enabled=False) if off else contextlib.nullcontext():
        for start in range(0, hidden.size(0), chunk_rows):
            h = hidden[start : start + chunk_rows].to(dtype)
            t = targets[start : start + chunk_rows]
            keep = (t != IGNORE_INDEX)[:, None]
            safe_t = t.clamp(min=0)[:, None]
            log_probs = torch.log_softmax((h @ w.mT).float(), dim=-1)
            total -= (log_probs.gather(1, safe_t) * keep).sum()
            if not (want_hidden or want_weight):
                continue
            # d loss / d logits = (softmax - onehot) * keep / count; the row scale is applied to
            # the small [rows, h] operands instead of the [rows, vocab] matrix.
            grad_logits = log_probs.exp_()
            grad_logits.scatter_add_(1, safe_t, torch.full_like(safe_t, -1, dtype=grad_logits.dtype))
            grad_logits = grad_logits.to(dtype)
            row_scale = keep.to(dtype) / count
            if want_hidden:
                grad_hidden[start : start + chunk_rows] = (grad_logits @ w) * row_scale
            if want_weight:
                grad_weight.addmm_(grad_logits.mT.float(), (h * row_scale).float())
    return total / count, grad_hidden, grad_weight


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, dtype: torch.dtype):
        # Only applied with grad mode on, where needs_input_grad is each input's requires_grad
        # (under no_grad it still reads True for a parameter: the caller checks grad mode).
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, grad_hidden, grad_weight = _chunked(hidden, weight, targets, chunk_rows, dtype, want_hidden, want_weight)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_output if ctx.needs_input_grad[0] else None
        gw = (grad_weight * grad_output).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None


LOSS_CHUNK_ROWS = 4096  # rows of [rows, vocab] logits alive at once (the planner counts the same)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int = LOSS_CHUNK_ROWS
) -> torch.Tensor:
    """Mean CE of `hidden @ weight.T` against `targets` (IGNORE_INDEX skipped), chunked over rows."""
    hidden, targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
    dtype = autocast_dtype(hidden.device) or hidden.dtype
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, dtype)
    return _chunked(hidden, weight, targets, chunk_rows, dtype, False, False)[0]


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
