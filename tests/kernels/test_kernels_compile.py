"""The Triton kernels compile for a Hopper GPU (sm_90) on this CPU-only machine, as the GPU would run them.

The interpreter tests check the arithmetic but never run Triton's compiler, so a kernel that only
fails to compile (a non-constexpr global, a loop-carried type change, an op the backend lacks)
would first show up on a GPU. Here each kernel is compiled ahead of time for sm_90 with the
specialisations Triton's JIT would pick at model shapes (an integer argument equal to 1 becomes a
constant, multiples of 16 and pointers get 16-byte divisibility), and the generated code is checked
for what the speed depends on: tensor-core ``warp_group_dot`` (wgmma) for bf16, a software pipeline
of ``cp.async`` copies (more than one stage in flight), and atomics only where stream-K needs them.
Needs only the ptxas that ships with the triton wheel; no GPU, no CUDA driver.
"""

from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from retro.kernels import triton_gemm, triton_newton_schulz  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)


def compile_for_hopper(fn, values: dict, constants: dict, pointer_types: dict, num_warps: int, num_stages: int):
    """Compile plain kernel function ``fn`` for sm_90 with the JIT's specialisation of ``values``."""
    code = fn.__code__
    signature, constexprs, attrs = {}, dict(constants), {}
    for i, name in enumerate(code.co_varnames[: code.co_argcount]):
        if name in constants:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = pointer_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(values[name], float):
            signature[name] = "fp32"
        elif values[name] == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if values[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=triton.jit(fn), signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=HOPPER, options={"num_warps": num_warps, "num_stages": num_stages})


@pytest.fixture(autouse=True)
def _compiled_mode(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas) and not os.environ.get("TRITON_PTXAS_PATH"):
        pytest.skip("this triton install has no ptxas to compile for a GPU")


def counts(kernel) -> dict[str, int]:
    ir = kernel.asm["ttgir"]
    return {
        "wgmma": ir.count("warp_group_dot "),
        "async_copy": ir.count("async_copy_global_to_local"),
        "atomic": ir.count("tt.atomic_rmw"),
    }


BF16 = {"a_ptr": "*bf16", "b_ptr": "*bf16", "d_ptr": "*bf16", "c_ptr": "*bf16"}


@pytest.mark.parametrize(
    "config",
    # PINNED (what tests/gpu compiles), then others of the tuner's list
    [triton_gemm.PINNED]
    + [c for c in triton_gemm.GPU_CONFIGS[:3] + triton_gemm.GPU_CONFIGS[-1:] if c != triton_gemm.PINNED],
    ids=lambda c: "x".join(str(c[0][k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + f"s{c[2]}",
)
def test_adapter_gemm_compiles_pipelined_on_tensor_cores(config):
    """The adapter forward at TinyLlama size: state [8192, 2048] @ W[:, :2048]^T (a strided slice) + e."""
    meta, warps, stages = config
    T, h = 8192, 2048
    values = dict(
        M=T,
        N=h,
        K=h,
        alpha=1.0,
        stride_ab=T * h,
        stride_am=h,
        stride_ak=1,
        stride_bb=2 * h * h,
        stride_bk=1,
        stride_bn=2 * h,
        stride_db=T * h,
        stride_dm=h,
        stride_dn=1,
        stride_cb=T * h,
        stride_cm=h,
        stride_cn=1,
    )
    kernel = compile_for_hopper(
        triton_gemm._gemm_kernel, values, {"HAS_D": True, "IEEE": False, "EVEN_K": True, **meta}, BF16, warps, stages
    )
    c = counts(kernel)
    assert c["wgmma"] >= 1, c
    assert c["async_copy"] >= 2 * (stages - 1), c  # A and B tiles prefetched stages - 1 iterations ahead
    assert c["atomic"] == 0, c
    assert kernel.metadata.shared > (stages - 1) * 2 * (meta["BLOCK_M"] + meta["BLOCK_N"]) * meta["BLOCK_K"]


@pytest.mark.parametrize("mode", [0, 1, 2], ids=["direct", "stream_k", "finalize"])
def test_symmetric_kernel_modes_compile(mode):
    """X X^T for a 2048 x 5632 bf16 matrix under each mode of the triangle kernel."""
    m, n = 2048, 5632
    values = dict(
        batch=1,
        m=m,
        K=n,
        coef_y=0.0,
        coef_prod=1.0,
        stride_xb=m * n,
        stride_xr=n,
        stride_xk=1,
        stride_yb=m * n,
        stride_yk=1,
        stride_yc=n,
        stride_wb=m * m,
        stride_wr=m,
        stride_wc=1,
        stride_ob=m * m,
        stride_or=m,
        stride_oc=1,
    )
    # The pinned configs: what tests/gpu compiles (RETRO_TRITON_CONFIG=pinned).
    meta, warps, stages = triton_newton_schulz.PINNED_SYM
    if mode == 2:
        meta, warps, stages = triton_newton_schulz.PINNED_FINALIZE
    pointers = {"x_ptr": "*bf16", "y_ptr": "*bf16", "ws_ptr": "*fp32", "out_ptr": "*bf16"}
    kernel = compile_for_hopper(
        triton_newton_schulz._sym_kernel,
        values,
        {"MODE": mode, "HAS_Y": True, "IEEE": False, "EVEN_K": True, **meta},
        pointers,
        warps,
        stages,
    )
    c = counts(kernel)
    if mode == 2:  # the epilogue only: no products
        assert c["wgmma"] == 0 and c["async_copy"] == 0 and c["atomic"] == 0, c
    else:
        assert c["wgmma"] >= 1 and c["async_copy"] >= 2 * (stages - 1), c
        assert c["atomic"] == (1 if mode == 1 else 0), c  # stream-K's shared tiles, nothing else


def test_fp32_products_stay_ieee():
    """fp32 inputs must not silently take TF32 tensor cores (IEEE products, as torch's default)."""
    M = N = K = 1024
    values = dict(
        M=M,
        N=N,
        K=K,
        alpha=1.0,
        stride_ab=M * K,
        stride_am=K,
        stride_ak=1,
        stride_bb=K * N,
        stride_bk=N,
        stride_bn=1,
        stride_db=M * N,
        stride_dm=N,
        stride_dn=1,
        stride_cb=M * N,
        stride_cm=N,
        stride_cn=1,
    )
    meta, warps, stages = triton_gemm.GPU_CONFIGS[-1]
    kernel = compile_for_hopper(
        triton_gemm._gemm_kernel,
        values,
        {"HAS_D": False, "IEEE": True, "EVEN_K": True, **meta},
        {k: "*fp32" for k in BF16},
        warps,
        stages,
    )
    ptx = kernel.asm["ptx"]
    assert "tf32" not in ptx and counts(kernel)["wgmma"] == 0


@pytest.mark.parametrize("product", ["grad_state", "grad_weight"])
def test_adapter_backward_layouts_stay_pipelined(product):
    """The backward reads transposed views (g^T, W[:, :h] by rows): still wgmma and cp.async."""
    T, h = 8192, 2048
    if product == "grad_state":  # g [T, h] @ W[:, :h] (row stride 2h)
        values = dict(
            M=T, N=h, K=h, stride_ab=T * h, stride_am=h, stride_ak=1, stride_bb=2 * h * h, stride_bk=2 * h, stride_bn=1
        )
    else:  # g^T [h, T] (column-major view) @ state rows [T, h]
        values = dict(
            M=h, N=h, K=T, stride_ab=T * h, stride_am=1, stride_ak=h, stride_bb=T * h, stride_bk=h, stride_bn=1
        )
    values.update(
        alpha=1.0,
        stride_db=values["M"] * h,
        stride_dm=h,
        stride_dn=1,
        stride_cb=values["M"] * h,
        stride_cm=h,
        stride_cn=1,
    )
    meta, warps, stages = triton_gemm.GPU_CONFIGS[0]
    kernel = compile_for_hopper(
        triton_gemm._gemm_kernel, values, {"HAS_D": False, "IEEE": False, "EVEN_K": True, **meta}, BF16, warps, stages
    )
    c = counts(kernel)
    assert c["wgmma"] >= 1 and c["async_copy"] >= 2 * (stages - 1), c
