"""Triton kernels for one Newton-Schulz iteration X <- aX + (bA + cA^2)X, A = X X^T.

X is a stack [B, m, n] with m <= n. A and P = bA + cA^2 are symmetric [m, m], so their kernels
launch one program per tile of the lower triangle (including the diagonal) and store each
off-diagonal tile twice, as itself and mirrored: half the products of a full GEMM. The update
aX + P X is a full GEMM with the axpy fused into its epilogue. Products run on tensor cores in
bf16/fp16 (IEEE fp32 for fp32 inputs) with fp32 accumulation; results are stored in X's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from retro.kernels.triton_build import kernel

_SYM_GPU_CONFIGS = [
    ({"BLOCK": 128, "BLOCK_K": 64}, 8, 3),
    ({"BLOCK": 128, "BLOCK_K": 32}, 4, 4),
    ({"BLOCK": 64, "BLOCK_K": 64}, 4, 4),
]
_GEMM_GPU_CONFIGS = [
    ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 8, 3),
    ({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, 8, 3),
    ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, 4, 4),
    ({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 4, 4),
]
_SYM_INTERPRET = {"BLOCK": 16, "BLOCK_K": 16}
_GEMM_INTERPRET = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}


def _sym_kernel(
    x_ptr, y_ptr, out_ptr, m, K, coef_y, coef_prod,
    stride_xb, stride_xr, stride_xk, stride_yb, stride_yk, stride_yc, stride_ob, stride_or, stride_oc,
    HAS_Y: tl.constexpr, IEEE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out = coef_prod * X @ Y (+ coef_y * out-shaped Y-term), for a product known to be symmetric.

    Used twice: A = X X^T (Y = X^T via strides, no extra term) and P = b*A + c*A A (X = Y = A,
    extra term b*A). Only lower-triangle tiles are computed; each is mirrored across the diagonal.
    """
    # Program p -> tile (r, c), c <= r, in row-major order of the lower triangle.
    p = tl.program_id(0)
    r = ((tl.sqrt((8 * p + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    r = tl.where(r * (r + 1) // 2 > p, r - 1, r)  # guard fp32 sqrt rounding
    r = tl.where((r + 1) * (r + 2) // 2 <= p, r + 1, r)
    c = p - r * (r + 1) // 2
    batch = tl.program_id(1).to(tl.int64)
    x_ptr += batch * stride_xb
    y_ptr += batch * stride_yb
    out_ptr += batch * stride_ob

    rows = r * BLOCK + tl.arange(0, BLOCK)
    cols = c * BLOCK + tl.arange(0, BLOCK)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.full((BLOCK, BLOCK), 0.0, dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(x_ptr + rows[:, None] * stride_xr + kk[None, :] * stride_xk,
                    mask=(rows[:, None] < m) & (kk[None, :] < K), other=0.0)
        b = tl.load(y_ptr + kk[:, None] * stride_yk + cols[None, :] * stride_yc,
                    mask=(kk[:, None] < K) & (cols[None, :] < m), other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    acc = acc * coef_prod
    if HAS_Y:  # the b*A term: A's (r, c) tile, read from Y = A
        extra = tl.load(y_ptr + rows[:, None] * stride_yk + cols[None, :] * stride_yc,
                        mask=(rows[:, None] < m) & (cols[None, :] < m), other=0.0)
        acc += coef_y * extra.to(tl.float32)
    tile = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * stride_or + cols[None, :] * stride_oc, tile,
             mask=(rows[:, None] < m) & (cols[None, :] < m))
    if r != c:  # mirror: tile^T into (c, r)
        tl.store(out_ptr + cols[:, None] * stride_or + rows[None, :] * stride_oc, tl.trans(tile),
                 mask=(cols[:, None] < m) & (rows[None, :] < m))


def _update_kernel(
    p_ptr, x_ptr, out_ptr, m, n, coef_x,
    stride_pb, stride_pr, stride_pc, stride_xb, stride_xr, stride_xc, stride_ob, stride_or, stride_oc,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out = coef_x * X + P @ X for P [m, m], X [m, n] (one matrix of the stack per grid row)."""
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    p_ptr += batch * stride_pb
    x_ptr += batch * stride_xb
    out_ptr += batch * stride_ob
    tiles_m = (m + BLOCK_M - 1) // BLOCK_M
    tiles_n = (n + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(0, m, BLOCK_K):
        kk = k0 + rk
        a = tl.load(p_ptr + rm[:, None] * stride_pr + kk[None, :] * stride_pc,
                    mask=(rm[:, None] < m) & (kk[None, :] < m), other=0.0)
        b = tl.load(x_ptr + kk[:, None] * stride_xr + rn[None, :] * stride_xc,
                    mask=(kk[:, None] < m) & (rn[None, :] < n), other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    mask = (rm[:, None] < m) & (rn[None, :] < n)
    x = tl.load(x_ptr + rm[:, None] * stride_xr + rn[None, :] * stride_xc, mask=mask, other=0.0)
    acc += coef_x * x.to(tl.float32)
    tl.store(out_ptr + rm[:, None] * stride_or + rn[None, :] * stride_oc,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


def empty(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Allocate a buffer (one place, so tests can poison every buffer with NaN)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _launch_sym(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, K: int,
                coef_y: float, coef_prod: float, has_y: bool) -> None:
    batch, m = out.size(0), out.size(1)
    fn = kernel(_sym_kernel, _SYM_GPU_CONFIGS, key=("m", "K"))
    args = (x, y, out, m, K, coef_y, coef_prod, *x.stride(), *y.stride(), *out.stride())
    flags = {"HAS_Y": has_y, "IEEE": x.dtype == torch.float32}

    def grid(meta: dict) -> tuple[int, int]:
        tiles = triton.cdiv(m, meta["BLOCK"])
        return (tiles * (tiles + 1) // 2, batch)

    if hasattr(fn, "configs"):
        fn[grid](*args, **flags)
    else:
        fn[grid](*args, **flags, **_SYM_INTERPRET)


def gram(x: torch.Tensor) -> torch.Tensor:
    """A = X X^T for a stack X [B, m, n]; lower-triangle tiles computed, mirrored."""
    out = empty((x.size(0), x.size(1), x.size(1)), x)
    _launch_sym(x, x.mT, out, K=x.size(2), coef_y=0.0, coef_prod=1.0, has_y=False)
    return out


def gram_poly(a: torch.Tensor, b: float, c: float) -> torch.Tensor:
    """P = b*A + c*A A for a stack of symmetric A [B, m, m]; lower-triangle tiles, mirrored."""
    out = empty(tuple(a.shape), a)
    _launch_sym(a, a, out, K=a.size(2), coef_y=float(b), coef_prod=float(c), has_y=True)
    return out


def update(p: torch.Tensor, x: torch.Tensor, a: float) -> torch.Tensor:
    """a*X + P X for P [B, m, m], X [B, m, n]: a full GEMM with the axpy in its epilogue."""
    out = empty(tuple(x.shape), x)
    batch, m, n = x.shape
    fn = kernel(_update_kernel, _GEMM_GPU_CONFIGS, key=("m", "n"))
    args = (p, x, out, m, n, float(a), *p.stride(), *x.stride(), *out.stride())
    flags = {"IEEE": x.dtype == torch.float32}

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), batch)

    if hasattr(fn, "configs"):
        fn[grid](*args, **flags)
    else:
        fn[grid](*args, **flags, **_GEMM_INTERPRET)
    return out


def newton_schulz_triton(x: torch.Tensor, steps: list[tuple[float, float, float]]) -> torch.Tensor:
    """Run the iterations on a normalised, wide (m <= n) stack X [B, m, n]."""
    if x.dim() != 3 or x.size(1) > x.size(2):
        raise ValueError(f"newton_schulz_triton needs a wide stack [B, m<=n, n], got {tuple(x.shape)}")
    for a, b, c in steps:
        x = update(gram_poly(gram(x), b, c), x, a)
    return x
