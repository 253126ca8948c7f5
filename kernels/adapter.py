"""The recurrence adapter y = W_state·s + W_inject·e without materialising concat(s, e).

The model keeps one weight W [h, 2h] = [W_state | W_inject] and passes the slices ``W[:, :h]`` and
``W[:, h:]``. The injection term W_inject·e is fixed for a forward, so it is computed once
(:func:`adapter_injection`) and each recurrence pass costs one h×h product plus an add
(:func:`adapter`). On the Triton path that add is fused into the product's epilogue, and the
slices are read through their strides (no copies); gradients flow back into W through the views.

Under ``torch.autocast`` :func:`adapter` casts its three operands to the autocast dtype first (as
autocast does for ``addmm``), on both paths: the weight slice stays an fp32 master weight and gets
an fp32 gradient through the cast, while the state and injection are already bf16. Outside
autocast, mixed dtypes are an error.

What is not fused, and why: the injection product is a plain GEMM that cuBLAS already runs at
peak; an optional noise term and the block's first RMSNorm were left out because no GPU
measurement has shown that fusing them pays (see docs/kernels.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import use_triton


def _check(state: torch.Tensor, w_state: torch.Tensor, injection: torch.Tensor) -> None:
    if w_state.dim() != 2 or state.size(-1) != w_state.size(1):
        raise ValueError(f"adapter: state [..., {state.size(-1)}] does not fit w_state {tuple(w_state.shape)}")
    expected = (*state.shape[:-1], w_state.size(0))
    if tuple(injection.shape) != expected:
        raise ValueError(f"adapter: injection must have shape {expected}, got {tuple(injection.shape)}")
    if not (state.dtype == w_state.dtype == injection.dtype):
        raise TypeError(
            f"adapter: dtypes differ (state {state.dtype}, w_state {w_state.dtype}, injection {injection.dtype})"
        )


def _autocast_operands(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The operands in the autocast dtype when autocast is on for their device (floating, not fp64)."""
    kind = tensors[0].device.type
    if not (torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)):
        return tensors
    dtype = torch.get_autocast_dtype(kind)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors)


def adapter_injection(e: torch.Tensor, w_inject: torch.Tensor) -> torch.Tensor:
    """``e @ w_inject.T`` ([..., h] -> [..., h]), computed once per forward.

    A plain GEMM on both paths: there is nothing to fuse, and cuBLAS/oneDNN are the fastest
    option for it.
    """
    return F.linear(e, w_inject)


def adapter_reference(state: torch.Tensor, w_state: torch.Tensor, injection: torch.Tensor) -> torch.Tensor:
    """Plain-torch ``state @ w_state.T + injection``: the CPU path and the test oracle."""
    _check(state, w_state, injection)
    return F.linear(state, w_state) + injection


class _FusedAdapter(torch.autograd.Function):
    """Triton forward (GEMM + fused add) and backward (two strided GEMMs)."""

    @staticmethod
    def forward(ctx, state: torch.Tensor, w_state: torch.Tensor, injection: torch.Tensor) -> torch.Tensor:
        from .triton_gemm import gemm

        lead = state.shape[:-1]
        rows = state.reshape(-1, state.size(-1))  # [T, h_in]
        out = gemm(rows, w_state.mT, injection.reshape(-1, w_state.size(0)))
        ctx.save_for_backward(rows, w_state)
        return out.view(*lead, w_state.size(0))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from .triton_gemm import gemm

        rows, w_state = ctx.saved_tensors
        g = grad.reshape(-1, w_state.size(0))  # [T, h_out]
        grad_state = grad_w = grad_injection = None
        if ctx.needs_input_grad[0]:
            grad_state = gemm(g, w_state).view(*grad.shape[:-1], w_state.size(1))
        if ctx.needs_input_grad[1]:
            grad_w = gemm(g.mT, rows)  # [h_out, T] @ [T, h_in]
        if ctx.needs_input_grad[2]:
            grad_injection = grad
        return grad_state, grad_w, grad_injection


def adapter(state: torch.Tensor, w_state: torch.Tensor, injection: torch.Tensor) -> torch.Tensor:
    """``state @ w_state.T + injection`` for state [..., h_in], w_state [h_out, h_in].

    ``injection`` is :func:`adapter_injection`'s output ([..., h_out]). Differentiable in all
    three inputs. Measured on an H200 (:mod:`retro.kernels.dispatch_table`), cuBLAS ``addmm`` with
    the injection as its bias beats the Triton kernel (0.45-0.82x), so ``auto`` keeps torch and only
    ``RETRO_KERNELS=triton`` (or ``set_backend("triton")``) runs the fused kernel. Under autocast
    all three are cast to the autocast dtype first.
    """
    state, w_state, injection = _autocast_operands(state, w_state, injection)
    _check(state, w_state, injection)
    if use_triton("adapter", state, w_state, injection):
        return _FusedAdapter.apply(state, w_state, injection)
    h_in, h_out = w_state.shape[1], w_state.shape[0]
    out = torch.addmm(injection.reshape(-1, h_out), state.reshape(-1, h_in), w_state.mT)
    return out.view(*state.shape[:-1], h_out)
