"""Newton-Schulz orthogonalisation used by Muon.

:func:`newton_schulz_reference` is plain torch (the CPU path and the test oracle);
:func:`newton_schulz` is what Muon calls: the same routine, with the iterations in Triton
(symmetric kernels, see :mod:`retro.kernels.triton_newton_schulz`) where dispatch says so: under
``auto``, stacks of same-shape bf16 matrices on CUDA, the class measured faster than torch
(:mod:`retro.kernels.dispatch_table`); single matrices stay on torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .dispatch import ns_schedule, use_triton

# (a, b, c) of the quintic X <- aX + (bA + cA^2)X, A = X X^T; Keller Jordan's Muon coefficients.
MUON_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)


def per_step_coefficients(coefficients: Sequence, steps: int) -> tuple[tuple[float, float, float], ...]:
    """Validated, hashable (a, b, c) per step from one triple for every step or one triple per step."""
    if len(coefficients) == 3 and all(isinstance(x, (int, float)) for x in coefficients):
        return (tuple(float(x) for x in coefficients),) * steps  # type: ignore[return-value]
    triples = tuple(tuple(float(x) for x in c) for c in coefficients)
    if len(triples) != steps or any(len(t) != 3 for t in triples):
        raise ValueError(
            f"ns_coefficients must be one (a, b, c) triple or ns_steps={steps} of them, got {coefficients!r}"
        )
    return triples  # type: ignore[return-value]


def newton_schulz_reference(
    grad: torch.Tensor,
    steps: int = 5,
    coefficients: Sequence = MUON_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Approximately orthogonalise each matrix in ``grad`` (shape [..., rows, cols]).

    Tall matrices are transposed so the Gram matrix is the small one, the input is normalised by
    its Frobenius norm so the spectral norm is <= 1, then ``steps`` quintic iterations run in
    ``dtype`` (default: the input's). Returns a tensor of the input's shape and dtype.
    """
    if grad.dim() < 2:
        raise ValueError(f"Newton-Schulz needs matrices, got shape {tuple(grad.shape)}")
    work = grad.to(dtype or grad.dtype)
    tall = work.size(-2) > work.size(-1)
    if tall:
        work = work.mT
    work = work / work.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for a, b, c in per_step_coefficients(coefficients, steps):
        gram = work @ work.mT
        poly = b * gram + c * (gram @ gram)
        work = a * work + poly @ work
    if tall:
        work = work.mT
    return work.to(grad.dtype)


def newton_schulz(
    grad: torch.Tensor,
    steps: int = 5,
    coefficients: Sequence = MUON_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """:func:`newton_schulz_reference` with the iterations in Triton when dispatch says so.

    Same arguments, shapes and result; any leading dims form a batch of same-shape matrices.
    Normalisation and the tall/wide transpose stay in torch (cheap, memory-bound); the
    iterations run as three kernels each (X X^T and bA + cA^2 on one triangle, aX + PX), the
    triangle scheduled as ``$RETRO_NS_SCHEDULE`` says (default ``auto``).
    """
    if grad.dim() < 2:
        raise ValueError(f"Newton-Schulz needs matrices, got shape {tuple(grad.shape)}")
    work = grad.to(dtype or grad.dtype)
    batch = math.prod(work.shape[:-2])  # same-shape matrices in the call
    if not use_triton("newton_schulz", work, batch=batch):
        return newton_schulz_reference(grad, steps, coefficients, eps, dtype)
    from .triton_newton_schulz import newton_schulz_triton

    tall = work.size(-2) > work.size(-1)
    if tall:
        work = work.mT
    wide_shape = work.shape
    work = work / work.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    stack = work.reshape(-1, *wide_shape[-2:]).contiguous()
    out = newton_schulz_triton(stack, per_step_coefficients(coefficients, steps), ns_schedule()).view(wide_shape)
    if tall:
        out = out.mT
    return out.to(grad.dtype)
