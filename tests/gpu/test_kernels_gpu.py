"""The Triton kernels compiled on a CUDA GPU, bf16 and fp32, at model shapes; skipped without CUDA.

Run by benchmarks/gpu_check.sh. Outputs are NaN-poisoned as in the interpreter tests. Tolerances:
fp32 max-relative 1e-5 (adapter) / 1e-4 (Newton-Schulz), IEEE fp32 products on both sides;
bf16 Frobenius-relative 1e-2 against the reference run from the same bf16 inputs.
"""

from __future__ import annotations

import os

import pytest
import torch

from retro.kernels import dispatch
from retro.kernels.adapter import adapter, adapter_injection, adapter_reference
from retro.kernels.newton_schulz import newton_schulz, newton_schulz_reference

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
    monkeypatch.setattr(triton_gemm, "empty", poisoned)
    monkeypatch.setattr(triton_newton_schulz, "empty", poisoned)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    dispatch.set_backend("auto")  # auto must pick Triton for CUDA tensors
    torch.manual_seed(0)
    yield
    dispatch.set_backend(None)


def max_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "kernel left unwritten (NaN-poisoned) elements"
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def fro_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "kernel left unwritten (NaN-poisoned) elements"
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,h", [((4, 1024), 2048), ((3, 777), 1000)])
def test_adapter_gpu(dtype, lead, h):
    weight = (torch.randn(h, 2 * h, device="cuda") / h**0.5).to(dtype)
    state0 = torch.randn(*lead, h, device="cuda", dtype=dtype)
    e0 = torch.randn(*lead, h, device="cuda", dtype=dtype)
    grad_out = torch.randn(*lead, h, device="cuda", dtype=dtype)
    assert dispatch.use_triton(state0, weight)
    dispatch.set_backend("triton")  # auto keeps cuBLAS addmm for the adapter (faster on the H200)

    def run(fn):
        w, s, e = (t.clone().requires_grad_() for t in (weight, state0, e0))
        y = fn(s, w[:, :h], adapter_injection(e, w[:, h:]))
        return y, torch.autograd.grad(y, (s, w, e), grad_out)

    y, grads = run(adapter)
    assert type(y.grad_fn).__name__ == "_FusedAdapterBackward"
    y_ref, grads_ref = run(adapter_reference)
    check = (lambda a, b: max_rel(a, b) < 1e-5) if dtype == torch.float32 else (lambda a, b: fro_rel(a, b) < 1e-2)
    assert check(y.detach(), y_ref.detach())
    for name, g, g_ref in zip(("state", "W", "e"), grads, grads_ref):
        assert check(g, g_ref), name


@pytest.mark.parametrize("shape", [(2048, 5632), (5632, 2048), (4, 1000, 1500), (2048, 2048)])
def test_newton_schulz_gpu_bf16(shape):
    grad = torch.randn(shape, device="cuda")
    out = newton_schulz(grad, dtype=torch.bfloat16)
    ref = newton_schulz_reference(grad, dtype=torch.bfloat16)
    assert out.shape == ref.shape and out.dtype == grad.dtype
    assert fro_rel(out, ref) < 1e-2


@pytest.mark.parametrize("shape", [(512, 1000), (1000, 512), (3, 300, 300)])
def test_newton_schulz_gpu_fp32(shape):
    grad = torch.randn(shape, device="cuda")
    assert max_rel(newton_schulz(grad), newton_schulz_reference(grad)) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("schedule", ["direct", "stream_k"])
def test_symmetric_kernels_gpu_both_schedules(schedule, dtype):
    """A = X X^T and P = bA + cA^2 on a stack of two 1000x1500 matrices, each triangle schedule.

    References are fp32 products of the same (rounded) inputs; outputs must be exactly symmetric.
    """
    from retro.kernels import triton_newton_schulz as tns
    from retro.kernels.newton_schulz import MUON_COEFFICIENTS

    b_, c_ = MUON_COEFFICIENTS[1:]
    x = (torch.randn(2, 1000, 1500, device="cuda") / 1500**0.5).to(dtype)
    check = (lambda o, r: max_rel(o, r) < 1e-5) if dtype == torch.float32 else (lambda o, r: fro_rel(o, r) < 1e-2)
    a = tns.gram(x, schedule)
    assert check(a, x.float() @ x.float().mT)
    assert torch.equal(a, a.mT)
    p = tns.gram_poly(a, b_, c_, schedule)
    a32 = a.float()
    assert check(p, b_ * a32 + c_ * (a32 @ a32))
    assert torch.equal(p, p.mT)
