"""Strided Triton GEMM with a fused addend: C = A @ B (+ D), fp32 accumulation.

Every operand is read through its own strides, so transposed and sliced views (``W[:, :h]`` of the
adapter's [h, 2h] weight, ``W.mT``, ``grad.mT``) need no copy. The adapter uses it for the forward
(D = the precomputed injection term, added in the epilogue instead of a second pass over memory)
and for both backward products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from retro.kernels.triton_build import kernel

# (meta-parameters, num_warps, num_stages); autotuned on the GPU per (M, N, K).
_GPU_CONFIGS = [
    ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 8, 3),
    ({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, 8, 3),
    ({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 8, 3),
    ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, 4, 4),
    ({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 4, 4),
]
# Small fixed blocks for the CPU interpreter (each program is simulated in Python).
_INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}


def _gemm_kernel(
    a_ptr, b_ptr, d_ptr, c_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_dm, stride_dn, stride_cm, stride_cn,
    HAS_D: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row-tiles share column-tiles of B while they sit in L2.
    pid = tl.program_id(0)
    tiles_m = (M + BLOCK_M - 1) // BLOCK_M
    tiles_n = (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=mask_m[:, None] & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(kk[:, None] < K) & mask_n[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_D:
        d = tl.load(d_ptr + rm[:, None] * stride_dm + rn[None, :] * stride_dn, mask=mask, other=0.0)
        acc += d.to(tl.float32)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=mask)


def empty(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Allocate an output buffer (one place, so tests can poison every buffer with NaN)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def gemm(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b (+ d)`` for 2-D ``a`` [M, K], ``b`` [K, N], ``d`` [M, N]; any strides, same dtype.

    fp32 inputs use IEEE fp32 products (matching torch's default of no TF32 for matmul);
    bf16/fp16 inputs use tensor-core products; accumulation is fp32 either way.
    """
    if a.dim() != 2 or b.dim() != 2 or a.size(1) != b.size(0):
        raise ValueError(f"gemm needs [M, K] @ [K, N], got {tuple(a.shape)} @ {tuple(b.shape)}")
    M, K = a.shape
    N = b.size(1)
    if d is not None and tuple(d.shape) != (M, N):
        raise ValueError(f"gemm addend must be {(M, N)}, got {tuple(d.shape)}")
    dtypes = {a.dtype, b.dtype} | ({d.dtype} if d is not None else set())
    if len(dtypes) != 1:
        raise TypeError(f"gemm operands must share one dtype, got {sorted(map(str, dtypes))}")
    c = empty((M, N), a)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.copy_(d) if d is not None else c.zero_()
    fn = kernel(_gemm_kernel, _GPU_CONFIGS, key=("M", "N", "K"))
    dd = d if d is not None else c  # never read when HAS_D is False
    args = (a, b, dd, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            dd.stride(0), dd.stride(1), c.stride(0), c.stride(1))
    flags = {"HAS_D": d is not None, "IEEE": a.dtype == torch.float32}

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    if hasattr(fn, "configs"):  # autotuned (compiled mode)
        fn[grid](*args, **flags)
    else:
        fn[grid](*args, **flags, **_INTERPRET_CONFIG)
    return c

