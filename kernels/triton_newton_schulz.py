"""Triton kernels for one Newton-Schulz iteration X <- aX + (bA + cA^2)X, A = X X^T.

X is a stack [B, m, n] with m <= n. A and P = bA + cA^2 are symmetric [m, m], so their kernel
computes only the tiles of the lower triangle (diagonal included) and stores each result twice,
as itself and mirrored: half the products of a full GEMM, and an output symmetric bit for bit.
The update aX + P X is the batched GEMM of :mod:`retro.kernels.triton_gemm` with the axpy in its
epilogue. Products run on tensor cores in bf16/fp16 (IEEE fp32 for fp32 inputs) with fp32
accumulation; results are stored in X's dtype.

Two schedules for the triangle (``schedule=``):

* ``direct``: one program per lower tile, the epilogue fused. The triangle of a 2048-row Gram
  matrix in 128-row tiles is 136 tiles, one more wave than 132 SMs hold for just 4 tiles, so half
  the second wave's time is idle: the symmetry saving is lost to wave quantisation.
* ``stream_k``: a fixed number of programs (one per SM) splits the flat list of (tile, K-block)
  iterations evenly; each accumulates a contiguous run in registers and adds it into an fp32
  workspace (plain stores for tiles it covers whole, atomics for the at most two it shares), then
  a finalize pass applies the epilogue and mirrors. Costs a zeroed m x m fp32 buffer and one pass
  over it; buys an even load on every SM.

``auto`` takes stream-K when the direct grid would fill its last wave less than
:data:`MIN_WAVE_FILL`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import NS_SCHEDULES
from .triton_build import launch
from .triton_gemm import gemm

MIN_WAVE_FILL = 0.8
# Kernel modes (constexpr: a kernel may only read globals declared as such).
_DIRECT, _STREAM_K, _FINALIZE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)

_SYM_GPU_CONFIGS = [
    ({"BLOCK": 128, "BLOCK_K": 64}, 8, 3),
    ({"BLOCK": 128, "BLOCK_K": 64}, 8, 4),
    ({"BLOCK": 128, "BLOCK_K": 32}, 4, 4),
    ({"BLOCK": 64, "BLOCK_K": 64}, 4, 4),
]
_FINALIZE_GPU_CONFIGS = [({"BLOCK": 64, "BLOCK_K": 16}, 4, 1), ({"BLOCK": 128, "BLOCK_K": 16}, 8, 1)]
# What RETRO_TRITON_CONFIG=pinned runs: the 128-row tile the direct schedule's wave estimate assumes.
PINNED_SYM, PINNED_FINALIZE = _SYM_GPU_CONFIGS[0], _FINALIZE_GPU_CONFIGS[0]
_SYM_INTERPRET = {"BLOCK": 16, "BLOCK_K": 16}
# The finalize pass may be tuned to another tile than the stream-K pass (separate autotuners); it
# reads only elements on or below the diagonal, which any tiling has written. The interpreter uses
# a different tile on purpose, so the tests exercise that.
_FINALIZE_INTERPRET = {"BLOCK": 32, "BLOCK_K": 16}
_DIRECT_TILE = 128  # the tile the wave-fill estimate assumes for the direct schedule


def _sym_kernel(
    x_ptr,
    y_ptr,
    ws_ptr,
    out_ptr,
    batch,
    m,
    K,
    coef_y,
    coef_prod,
    stride_xb,
    stride_xr,
    stride_xk,
    stride_yb,
    stride_yk,
    stride_yc,
    stride_wb,
    stride_wr,
    stride_wc,
    stride_ob,
    stride_or,
    stride_oc,
    MODE: tl.constexpr,
    HAS_Y: tl.constexpr,
    IEEE: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out = coef_prod * X @ Y (+ coef_y * Y) for a product known to be symmetric [m, m].

    Used twice: A = X X^T (Y = X^T via strides, no extra term) and P = b*A + c*A A (X = Y = A,
    extra term b*A). MODE _DIRECT: each program one whole tile, epilogue fused. MODE _STREAM_K:
    partial products summed into the fp32 workspace. MODE _FINALIZE: the epilogue, from the
    workspace. The work is a flat list of units (lower tile of one matrix, K-block); each program
    takes a contiguous run of it.
    """
    tiles = (m + BLOCK - 1) // BLOCK
    per_matrix = tiles * (tiles + 1) // 2
    iters = 1 if MODE == _FINALIZE else (K + BLOCK_K - 1) // BLOCK_K
    total = batch * per_matrix * iters
    if MODE == _STREAM_K:
        programs = tl.num_programs(0)
        per_program = (total + programs - 1) // programs
    else:
        per_program = iters
    unit = tl.program_id(0) * per_program
    end = tl.minimum(unit + per_program, total)
    rk = tl.arange(0, BLOCK_K)
    while unit < end:
        tile = unit // iters
        k_lo = unit % iters
        k_hi = tl.minimum(iters, k_lo + end - unit)
        b = (tile // per_matrix).to(tl.int64)
        p = tile % per_matrix
        # Lower-triangle index p -> tile (r, c), c <= r, row-major.
        r = ((tl.sqrt((8 * p + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
        r = tl.where(r * (r + 1) // 2 > p, r - 1, r)  # guard fp32 sqrt rounding
        r = tl.where((r + 1) * (r + 2) // 2 <= p, r + 1, r)
        c = p - r * (r + 1) // 2
        rows = r * BLOCK + tl.arange(0, BLOCK)
        cols = c * BLOCK + tl.arange(0, BLOCK)
        inside = (rows[:, None] < m) & (cols[None, :] < m)
        ws_tile = ws_ptr + b * stride_wb + rows[:, None] * stride_wr + cols[None, :] * stride_wc
        if MODE == _FINALIZE:
            acc = tl.load(ws_tile, mask=inside, other=0.0)
        else:
            # Out-of-range rows/cols read a wrapped-around valid row (discarded at the store).
            x_rows = x_ptr + b * stride_xb + (rows % m)[:, None] * stride_xr
            y_cols = y_ptr + b * stride_yb + (cols % m)[None, :] * stride_yc
            acc = tl.full((BLOCK, BLOCK), 0.0, dtype=tl.float32)
            for ki in range(k_lo, k_hi):
                kk = ki * BLOCK_K + rk
                if EVEN_K:  # K a multiple of BLOCK_K (set by triton_build): no mask
                    xa = tl.load(x_rows + kk[None, :] * stride_xk)
                    yb = tl.load(y_cols + kk[:, None] * stride_yk)
                else:
                    xa = tl.load(x_rows + kk[None, :] * stride_xk, mask=kk[None, :] < K, other=0.0)
                    yb = tl.load(y_cols + kk[:, None] * stride_yk, mask=kk[:, None] < K, other=0.0)
                if IEEE:
                    acc = tl.dot(xa, yb, acc, input_precision="ieee")
                else:
                    acc = tl.dot(xa, yb, acc)
        if MODE == _STREAM_K:
            if k_hi - k_lo == iters:  # the whole tile is this program's: no other writer
                tl.store(ws_tile, acc, mask=inside)
            else:
                tl.atomic_add(ws_tile, acc, mask=inside, sem="relaxed")
        else:
            acc = acc * coef_prod
            if HAS_Y:  # the b*A term: A's (r, c) tile, read from Y = A
                extra = tl.load(
                    y_ptr + b * stride_yb + rows[:, None] * stride_yk + cols[None, :] * stride_yc,
                    mask=inside,
                    other=0.0,
                )
                acc += coef_y * extra.to(tl.float32)
            result = acc.to(out_ptr.dtype.element_ty)
            out_b = out_ptr + b * stride_ob
            # Lower elements where they are; strictly-lower ones also mirrored across the diagonal
            # (this fills the upper half of diagonal tiles too, so every pair matches exactly).
            tl.store(
                out_b + rows[:, None] * stride_or + cols[None, :] * stride_oc,
                result,
                mask=inside & (rows[:, None] >= cols[None, :]),
            )
            tl.store(
                out_b + cols[:, None] * stride_or + rows[None, :] * stride_oc,
                tl.trans(result),
                mask=(cols[:, None] < m) & (rows[None, :] < m) & (rows[None, :] > cols[:, None]),
            )
        unit += k_hi - k_lo


def empty(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Allocate a buffer (one place, so tests can poison every buffer with NaN)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def sm_count(t: torch.Tensor) -> int:
    """Streaming multiprocessors of ``t``'s GPU (the stream-K program count); 4 for CPU tensors."""
    return torch.cuda.get_device_properties(t.device).multi_processor_count if t.is_cuda else 4


def choose_schedule(batch: int, m: int, sm_count: int) -> str:
    """``direct`` when its grid of 128-row lower tiles fills the last wave well, else ``stream_k``."""
    tiles = -(-m // _DIRECT_TILE)
    grid = batch * tiles * (tiles + 1) // 2
    waves = -(-grid // sm_count)
    return "direct" if grid / (waves * sm_count) >= MIN_WAVE_FILL else "stream_k"


def _launch_sym(
    x: torch.Tensor,
    y: torch.Tensor,
    out: torch.Tensor,
    K: int,
    coef_y: float,
    coef_prod: float,
    has_y: bool,
    schedule: str,
    programs: int | None,
) -> None:
    if schedule not in NS_SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {NS_SCHEDULES}")
    batch, m = out.size(0), out.size(1)
    n_programs = programs or sm_count(out)
    if schedule == "auto":
        schedule = choose_schedule(batch, m, n_programs)
    compiled_args = (batch, m, K, float(coef_y), float(coef_prod), *x.stride(), *y.stride())
    flags = {"HAS_Y": has_y, "IEEE": x.dtype == torch.float32}

    def run(mode: tl.constexpr, ws: torch.Tensor, configs: list, reset: tuple[str, ...], grid) -> None:
        finalize = mode == _FINALIZE
        launch(
            _sym_kernel,
            grid,
            (x, y, ws, out, *compiled_args, *ws.stride(), *out.stride()),
            {"MODE": mode.value, **flags},
            gpu_configs=configs,
            pinned=PINNED_FINALIZE if finalize else PINNED_SYM,
            interpret=_FINALIZE_INTERPRET if finalize else _SYM_INTERPRET,
            key=("m", "K", "batch", "MODE"),
            reset_to_zero=reset,
        )

    def tile_grid(meta: dict) -> tuple[int]:
        tiles = triton.cdiv(m, meta["BLOCK"])
        return (batch * tiles * (tiles + 1) // 2,)

    if schedule == "direct":
        run(_DIRECT, out, _SYM_GPU_CONFIGS, (), tile_grid)
        return
    ws = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    run(
        _STREAM_K,
        ws,
        _SYM_GPU_CONFIGS,
        ("ws_ptr",),
        lambda meta: (min(n_programs, tile_grid(meta)[0] * triton.cdiv(K, meta["BLOCK_K"])),),
    )
    run(_FINALIZE, ws, _FINALIZE_GPU_CONFIGS, (), tile_grid)


def gram(x: torch.Tensor, schedule: str = "auto", programs: int | None = None) -> torch.Tensor:
    """A = X X^T for a stack X [B, m, n]; lower-triangle tiles computed, mirrored.

    ``programs``: the stream-K program count (default: the GPU's SM count; 4 on CPU).
    """
    out = empty((x.size(0), x.size(1), x.size(1)), x)
    _launch_sym(x, x.mT, out, x.size(2), 0.0, 1.0, False, schedule, programs)
    return out


def gram_poly(a: torch.Tensor, b: float, c: float, schedule: str = "auto", programs: int | None = None) -> torch.Tensor:
    """P = b*A + c*A A for a stack of symmetric A [B, m, m]; lower-triangle tiles, mirrored."""
    out = empty(tuple(a.shape), a)
    _launch_sym(a, a, out, a.size(2), b, c, True, schedule, programs)
    return out


def update(p: torch.Tensor, x: torch.Tensor, a: float) -> torch.Tensor:
    """a*X + P X for P [B, m, m], X [B, m, n]: the batched GEMM with the axpy in its epilogue."""
    return gemm(p, x, x, alpha=a)


def newton_schulz_triton(
    x: torch.Tensor, steps: list[tuple[float, float, float]], schedule: str = "auto"
) -> torch.Tensor:
    """Run the iterations on a normalised, wide (m <= n) stack X [B, m, n]."""
    if x.dim() != 3 or x.size(1) > x.size(2):
        raise ValueError(f"newton_schulz_triton needs a wide stack [B, m<=n, n], got {tuple(x.shape)}")
    for a, b, c in steps:
        x = update(gram_poly(gram(x, schedule), b, c, schedule), x, a)
    return x
