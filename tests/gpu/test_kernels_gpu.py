"""The Triton kernels compiled on a CUDA GPU, bf16 and fp32, at model shapes; skipped without CUDA.

Run by benchmarks/gpu_check.sh; meant to finish in <= 90 s on an H200 (the script allows 100 s).
Autotuning compiles every config of every kernel for each new shape (about 14 minutes for this
file), so the correctness tests run each kernel with its one pinned config
(``RETRO_TRITON_CONFIG=pinned``, the path tests/kernels/test_kernels_interpret.py also runs under
the CPU interpreter), and exactly one test autotunes. The backend is forced to Triton: ``auto``
keeps single matrices and the adapter on torch (kernels/dispatch_table.py), and these tests are
about the kernels.

Outputs are NaN-poisoned as in the interpreter tests. Tolerances: fp32 max-relative 1e-5 (adapter,
symmetric products) / 1e-4 (Newton-Schulz), IEEE fp32 products on both sides; bf16
Frobenius-relative 1e-2 against the reference run from the same bf16 inputs.
"""

from __future__ import annotations

import os

import pytest
import torch

from retro.kernels import dispatch
from retro.kernels.adapter import adapter, adapter_injection, adapter_reference
from retro.kernels.newton_schulz import MUON_COEFFICIENTS, newton_schulz, newton_schulz_reference

# benchmarks/gpu_check.sh sets RETRO_REQUIRE_GPU=1 so that a missing GPU fails instead of skipping.
_REQUIRED = os.environ.get("RETRO_REQUIRE_GPU") == "1"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and not _REQUIRED, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _compiled_triton(monkeypatch):
    if not torch.cuda.is_available():
        pytest.fail("RETRO_REQUIRE_GPU=1 but torch sees no CUDA device")
    if not dispatch.triton_available():
        pytest.fail("CUDA is available but triton is not installed: the GPU path cannot run")
    from retro.kernels import triton_gemm, triton_newton_schulz

    def poisoned(shape, like):
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setenv(dispatch.TRITON_CONFIG_ENV, "pinned")
    monkeypatch.setattr(triton_gemm, "empty", poisoned)
    monkeypatch.setattr(triton_newton_schulz, "empty", poisoned)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    dispatch.set_backend("triton")
    torch.manual_seed(0)
    yield
    dispatch.set_backend(None)


def max_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "kernel left unwritten (NaN-poisoned) elements"
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def fro_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "kernel left unwritten (NaN-poisoned) elements"
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def close(dtype: torch.dtype, fp32_tol: float = 1e-5):
    return (lambda o, r: max_rel(o, r) < fp32_tol) if dtype == torch.float32 else (lambda o, r: fro_rel(o, r) < 1e-2)


# bf16 at the TinyLlama shape (K a multiple of BLOCK_K: the unmasked loads); fp32 at odd sizes (masks).
@pytest.mark.parametrize(
    "dtype,lead,h", [(torch.bfloat16, (4, 1024), 2048), (torch.float32, (3, 777), 1000)], ids=["bf16", "fp32"]
)
def test_adapter_forward_backward(dtype, lead, h):
    weight = (torch.randn(h, 2 * h, device="cuda") / h**0.5).to(dtype)
    state0 = torch.randn(*lead, h, device="cuda", dtype=dtype)
    e0 = torch.randn(*lead, h, device="cuda", dtype=dtype)
    grad_out = torch.randn(*lead, h, device="cuda", dtype=dtype)

    def run(fn):
        w, s, e = (t.clone().requires_grad_() for t in (weight, state0, e0))
        y = fn(s, w[:, :h], adapter_injection(e, w[:, h:]))
        return y, torch.autograd.grad(y, (s, w, e), grad_out)

    y, grads = run(adapter)
    assert type(y.grad_fn).__name__ == "_FusedAdapterBackward"
    y_ref, grads_ref = run(adapter_reference)
    check = close(dtype)
    assert check(y.detach(), y_ref.detach())
    for name, g, g_ref in zip(("state", "W", "e"), grads, grads_ref):
        assert check(g, g_ref), name


@pytest.mark.parametrize(
    "dtype,shape",
    [
        (torch.bfloat16, (2048, 5632)),  # single, wide (TinyLlama down)
        (torch.bfloat16, (4, 1000, 1500)),  # stacked, odd sizes
        (torch.float32, (1000, 512)),  # single, tall
        (torch.float32, (3, 300, 300)),  # stacked, square
    ],
    ids=["bf16-single", "bf16-stack", "fp32-single", "fp32-stack"],
)
def test_newton_schulz(dtype, shape):
    grad = torch.randn(shape, device="cuda")
    out = newton_schulz(grad, dtype=dtype)
    ref = newton_schulz_reference(grad, dtype=dtype)
    assert out.shape == ref.shape and out.dtype == grad.dtype
    assert close(dtype, fp32_tol=1e-4)(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("schedule", ["direct", "stream_k"])
def test_symmetric_kernels_both_schedules(schedule, dtype):
    """A = X X^T and P = bA + cA^2 on a stack of two 1000x1500 matrices, each triangle schedule.

    References are fp32 products of the same (rounded) inputs; outputs must be exactly symmetric.
    """
    from retro.kernels import triton_newton_schulz as tns

    b_, c_ = MUON_COEFFICIENTS[1:]
    x = (torch.randn(2, 1000, 1500, device="cuda") / 1500**0.5).to(dtype)
    check = close(dtype)
    a = tns.gram(x, schedule)
    assert check(a, x.float() @ x.float().mT)
    assert torch.equal(a, a.mT)
    p = tns.gram_poly(a, b_, c_, schedule)
    a32 = a.float()
    assert check(p, b_ * a32 + c_ * (a32 @ a32))
    assert torch.equal(p, p.mT)


def test_autotuning_picks_a_config_and_stays_right(monkeypatch):
    """The one autotuned test: the direct triangle kernel (4 configs) tunes, keeps a config of its list,
    and its result is right and agrees with the pinned config's."""
    from retro.kernels import triton_build
    from retro.kernels import triton_newton_schulz as tns

    monkeypatch.setenv(dispatch.TRITON_CONFIG_ENV, "autotune")
    x = (torch.randn(3, 768, 1024, device="cuda") / 32).to(torch.bfloat16)
    a = tns.gram(x, "direct")
    assert fro_rel(a, x.float() @ x.float().mT) < 1e-2 and torch.equal(a, a.mT)
    tuner = triton_build.kernel(tns._sym_kernel, tns._SYM_GPU_CONFIGS, key=("m", "K", "batch", "MODE"))
    assert getattr(tuner, "best_config", None) is not None and tuner.cache, "the autotuner never ran"
    chosen = (tuner.best_config.kwargs, tuner.best_config.num_warps, tuner.best_config.num_stages)
    assert chosen in [(dict(c), w, s) for c, w, s in tns._SYM_GPU_CONFIGS], chosen
    monkeypatch.setenv(dispatch.TRITON_CONFIG_ENV, "pinned")
    assert fro_rel(a, tns.gram(x, "direct")) < 1e-2


def test_auto_dispatch_follows_the_table_on_the_gpu():
    """`auto` on real CUDA tensors: bf16 stacks take Triton, single matrices and the adapter stay on torch."""
    dispatch.set_backend("auto")
    stack = torch.randn(4, 64, 96, device="cuda", dtype=torch.bfloat16)
    assert dispatch.use_triton("newton_schulz", stack, batch=4)
    assert not dispatch.use_triton("newton_schulz", stack[0], batch=1)
    assert not dispatch.use_triton("adapter", stack[0])
    out = newton_schulz(stack.float(), dtype=torch.bfloat16)
    assert fro_rel(out, newton_schulz_reference(stack.float(), dtype=torch.bfloat16)) < 1e-2
