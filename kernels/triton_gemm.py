"""Strided, batched Triton GEMM with a scaled addend: C = A @ B (+ alpha * D), fp32 accumulation.

Every operand is read through its own strides, so transposed and sliced views (``W[:, :h]`` of the
adapter's [h, 2h] weight, ``W.mT``, ``grad.mT``) need no copy. Two users:

* the adapter: forward with D = the precomputed injection term (alpha = 1), added in the epilogue
  instead of a second pass over memory, and both backward products (no addend);
* Newton-Schulz's update aX + P X: a batch of GEMMs with D = X and alpha = a.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_build import launch

# (meta-parameters, num_warps, num_stages); autotuned on the GPU per (M, N, K). Tile shapes and
# pipeline depths that fit the H100/H200's 228 KiB of shared memory per SM in bf16.
GPU_CONFIGS = [
    ({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, 8, 3),
    ({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, 8, 4),
    ({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 8, 3),
    ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 8, 4),
    ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 4, 4),
    ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, 4, 5),
    ({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, 4, 4),
    ({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 4, 4),
]
# The one config RETRO_TRITON_CONFIG=pinned runs (the GPU correctness tests): the widest tile, which
# every model shape fills.
PINNED = GPU_CONFIGS[0]
# Small fixed blocks for the CPU interpreter (each program is simulated in Python).
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}


def _gemm_kernel(
    a_ptr,
    b_ptr,
    d_ptr,
    c_ptr,
    M,
    N,
    K,
    alpha,
    stride_ab,
    stride_am,
    stride_ak,
    stride_bb,
    stride_bk,
    stride_bn,
    stride_db,
    stride_dm,
    stride_dn,
    stride_cb,
    stride_cm,
    stride_cn,
    HAS_D: tl.constexpr,
    IEEE: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row-tiles share column-tiles of B while they sit in L2.
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
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
    # Rows/columns past the edge load a wrapped-around valid row instead of being masked (the
    # results are discarded at the store), so only the K tail needs a mask in the main loop, and
    # none at all when K is a multiple of BLOCK_K (EVEN_K, set by triton_build).
    a_rows = a_ptr + batch * stride_ab + (rm % M)[:, None] * stride_am
    b_cols = b_ptr + batch * stride_bb + (rn % N)[None, :] * stride_bn
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        if EVEN_K:
            a = tl.load(a_rows + kk[None, :] * stride_ak)
            b = tl.load(b_cols + kk[:, None] * stride_bk)
        else:
            a = tl.load(a_rows + kk[None, :] * stride_ak, mask=kk[None, :] < K, other=0.0)
            b = tl.load(b_cols + kk[:, None] * stride_bk, mask=kk[:, None] < K, other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if HAS_D:
        d = tl.load(d_ptr + batch * stride_db + rm[:, None] * stride_dm + rn[None, :] * stride_dn, mask=mask, other=0.0)
        acc += alpha * d.to(tl.float32)
    tl.store(
        c_ptr + batch * stride_cb + rm[:, None] * stride_cm + rn[None, :] * stride_cn,
        acc.to(c_ptr.dtype.element_ty),
        mask=mask,
    )


def empty(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Allocate an output buffer (one place, so tests can poison every buffer with NaN)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _as_batch(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0) if t.dim() == 2 else t


def gemm(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor | None = None, alpha: float = 1.0) -> torch.Tensor:
    """``a @ b (+ alpha * d)`` for ``a`` [(B,) M, K], ``b`` [(B,) K, N], ``d`` [(B,) M, N].

    Any strides, one dtype for all operands; 2-D inputs give a 2-D result, 3-D a batch of GEMMs.
    fp32 inputs use IEEE fp32 products (matching torch's default of no TF32 for matmul);
    bf16/fp16 inputs use tensor-core products; accumulation is fp32 either way.
    """
    if a.dim() not in (2, 3) or b.dim() != a.dim() or a.size(-1) != b.size(-2) or a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"gemm needs [(B,) M, K] @ [(B,) K, N], got {tuple(a.shape)} @ {tuple(b.shape)}")
    M, K, N = a.size(-2), a.size(-1), b.size(-1)
    out_shape = (*a.shape[:-2], M, N)
    if d is not None and tuple(d.shape) != out_shape:
        raise ValueError(f"gemm addend must be {out_shape}, got {tuple(d.shape)}")
    dtypes = {a.dtype, b.dtype} | ({d.dtype} if d is not None else set())
    if len(dtypes) != 1:
        raise TypeError(f"gemm operands must share one dtype, got {sorted(map(str, dtypes))}")
    c = empty(out_shape, a)
    if c.numel() == 0:
        return c
    if K == 0:
        return c.copy_(alpha * d) if d is not None else c.zero_()
    a3, b3, c3 = _as_batch(a), _as_batch(b), _as_batch(c)
    d3 = _as_batch(d) if d is not None else c3  # never read when HAS_D is False
    args = (a3, b3, d3, c3, M, N, K, float(alpha), *a3.stride(), *b3.stride(), *d3.stride(), *c3.stride())
    flags = {"HAS_D": d is not None, "IEEE": a.dtype == torch.float32}

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), c3.size(0))

    launch(
        _gemm_kernel,
        grid,
        args,
        flags,
        gpu_configs=GPU_CONFIGS,
        pinned=PINNED,
        interpret=INTERPRET_CONFIG,
        key=("M", "N", "K"),
    )
    return c
