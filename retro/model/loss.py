"""Cross-entropy of the LM head without materialising the full [tokens, vocab] logits.

The head matmul, log-softmax and their gradients run in row chunks inside the forward: the
gradients w.r.t. the hidden states and the head weight are produced there and handed back in
backward. Same FLOPs as the plain path, no saved logits, fewer elementwise passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int):
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp(min=1)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.size(0), chunk_rows):
            h = hidden[start : start + chunk_rows]
            t = targets[start : start + chunk_rows]
            keep = (t != IGNORE_INDEX)[:, None]
            safe_t = t.clamp(min=0)[:, None]
            log_probs = torch.log_softmax((h @ weight.mT).float(), dim=-1)
            total -= (log_probs.gather(1, safe_t) * keep).sum()
            if needs_grad:
                # d loss / d logits = (softmax - onehot) * keep / count; the row scale is applied to
                # the small [rows, h] operands instead of the [rows, vocab] matrix.
                grad_logits = log_probs.exp_()
                grad_logits.scatter_add_(1, safe_t, torch.full_like(safe_t, -1, dtype=grad_logits.dtype))
                grad_logits = grad_logits.to(hidden.dtype)
                row_scale = keep.to(hidden.dtype) / count
                grad_hidden[start : start + chunk_rows] = (grad_logits @ weight) * row_scale
                grad_weight.addmm_(grad_logits.mT.float(), (h * row_scale).float())
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_output if ctx.needs_input_grad[0] else None
        gw = (grad_weight * grad_output).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None


LOSS_CHUNK_ROWS = 4096  # rows of [rows, vocab] logits alive at once (the planner counts the same)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int = LOSS_CHUNK_ROWS
) -> torch.Tensor:
    """Mean CE of `hidden @ weight.T` against `targets` (IGNORE_INDEX skipped), chunked over rows."""
    return _ChunkedLinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.size(-1)), weight, targets.reshape(-1), chunk_rows
    )


def plain_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE over non-ignored targets from materialised logits (the reference path)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX)
