"""Triton kernels under the CPU interpreter (TRITON_INTERPRET=1) against their torch references.

Every output buffer the kernels allocate is poisoned with NaN first (the wrappers allocate through
one `empty` function per module, patched here), so an element a kernel fails to write shows up.
Sizes are odd on purpose (not multiples of the 16/32 interpreter blocks) so the masks are exercised.
Relative error = max|out - ref| / max|ref|. bf16 is not tested here: the interpreter multiplies
bf16 bit patterns in tl.dot (triton-lang/triton#11584); fp16 covers the low-precision code path
and tests/gpu/test_kernels_gpu.py covers bf16 on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from retro.kernels import dispatch, triton_build
from retro.kernels.adapter import adapter, adapter_injection, adapter_reference
from retro.kernels.newton_schulz import MUON_COEFFICIENTS, newton_schulz, newton_schulz_reference

triton = pytest.importorskip("triton")
from retro.kernels import triton_gemm, triton_newton_schulz  # noqa: E402  (needs triton)


def _poisoned_empty(shape, like):
    return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.delenv(dispatch.TRITON_CONFIG_ENV, raising=False)
    dispatch.set_backend("triton")
    monkeypatch.setattr(triton_gemm, "empty", _poisoned_empty)
    monkeypatch.setattr(triton_newton_schulz, "empty", _poisoned_empty)
    torch.manual_seed(0)
    yield
    dispatch.set_backend(None)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not out.isnan().any(), "kernel left unwritten (NaN-poisoned) elements"
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def test_interpreter_takes_effect(monkeypatch):
    """The lazily decorated kernels follow TRITON_INTERPRET at first use, and run on CPU tensors."""
    from triton.runtime.interpreter import InterpretedFunction

    def innermost(fn):  # through the EVEN_K heuristics (and the autotuner) to the jitted function
        while hasattr(fn, "fn") and not isinstance(fn, (InterpretedFunction, triton.runtime.JITFunction)):
            fn = fn.fn
        return fn

    fn = triton_build.kernel(triton_gemm._gemm_kernel, triton_gemm.GPU_CONFIGS, key=("M",))
    assert isinstance(fn, triton.runtime.Heuristics) and isinstance(innermost(fn), InterpretedFunction)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    compiled = triton_build.kernel(triton_gemm._gemm_kernel, triton_gemm.GPU_CONFIGS, key=("M",))
    assert isinstance(compiled, triton.runtime.Autotuner)
    assert isinstance(innermost(compiled), triton.runtime.JITFunction)
    assert not isinstance(innermost(compiled), InterpretedFunction)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    assert a.device.type == "cpu"
    assert rel_err(triton_gemm.gemm(a, b), a @ b) < 1e-5


# ---- pinned configs (what tests/gpu runs) ------------------------------------------------------


@pytest.fixture
def pinned_launches(monkeypatch):
    """RETRO_TRITON_CONFIG=pinned, recording the block sizes each launch's grid is computed from."""
    monkeypatch.setenv(dispatch.TRITON_CONFIG_ENV, "pinned")
    seen = []

    def recording(fn, grid, *args, **kwargs):
        def spy(meta):
            seen.append((fn.__name__, {k: meta[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK", "BLOCK_K") if k in meta}))
            return grid(meta)

        return triton_build.launch(fn, spy, *args, **kwargs)

    monkeypatch.setattr(triton_gemm, "launch", recording)
    monkeypatch.setattr(triton_newton_schulz, "launch", recording)
    return seen


def test_pinned_mode_gives_bare_kernels_in_both_modes(monkeypatch):
    """Pinned: no autotuner, compiled (TRITON_INTERPRET=0) or interpreted; the pinned configs are GPU configs."""
    monkeypatch.setenv(dispatch.TRITON_CONFIG_ENV, "pinned")
    for interpret in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        fn = triton_build.kernel(triton_gemm._gemm_kernel, triton_gemm.GPU_CONFIGS, key=("M",))
        assert not isinstance(fn, triton.runtime.Autotuner)
    assert triton_gemm.PINNED in triton_gemm.GPU_CONFIGS
    assert triton_newton_schulz.PINNED_SYM in triton_newton_schulz._SYM_GPU_CONFIGS
    assert triton_newton_schulz.PINNED_FINALIZE in triton_newton_schulz._FINALIZE_GPU_CONFIGS


def test_pinned_configs_compute_the_same_results(pinned_launches):
    """Every kernel at its pinned GPU tile under the interpreter: the path tests/gpu compiles once per kernel.

    Sizes cross the 128/256-wide pinned tiles (masks, wrapped rows); K 128 takes the unmasked EVEN_K loads.
    """
    b_, c_ = MUON_COEFFICIENTS[1:]
    for k in (128, 77):
        a, b, d = torch.randn(2, 150, k), torch.randn(2, k, 270), torch.randn(2, 150, 270)
        assert rel_err(triton_gemm.gemm(a, b, d, alpha=0.5), a @ b + 0.5 * d) < 1e-5
    x = torch.randn(2, 140, 200)
    for schedule in ("direct", "stream_k"):
        a = triton_newton_schulz.gram(x, schedule)
        assert rel_err(a, x @ x.mT) < 1e-5 and torch.equal(a, a.mT)
        p = triton_newton_schulz.gram_poly(a, b_, c_, schedule)
        assert rel_err(p, b_ * a + c_ * (a @ a)) < 1e-5 and torch.equal(p, p.mT)
    grad = torch.randn(3, 140, 90)
    assert rel_err(newton_schulz(grad, steps=2), newton_schulz_reference(grad, steps=2)) < 1e-4
    h = 130
    w = (torch.randn(h, 2 * h) / h**0.5).requires_grad_()
    s = torch.randn(5, h, requires_grad=True)
    e = torch.randn(5, h)
    g = torch.randn(5, h)
    y = adapter(s, w[:, :h], adapter_injection(e, w[:, h:]))
    y_ref = adapter_reference(s, w[:, :h], adapter_injection(e, w[:, h:]))
    assert rel_err(y.detach(), y_ref.detach()) < 1e-5
    for got, want in zip(torch.autograd.grad(y, (s, w), g), torch.autograd.grad(y_ref, (s, w), g)):
        assert rel_err(got, want) < 1e-5
    gemm_meta = {k: triton_gemm.PINNED[0][k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
    blocks = {name: [] for name in ("_gemm_kernel", "_sym_kernel")}
    for name, meta in pinned_launches:
        blocks[name].append(meta)
    assert blocks["_gemm_kernel"] and all(m == gemm_meta for m in blocks["_gemm_kernel"])
    pinned_sym = [triton_newton_schulz.PINNED_SYM[0], triton_newton_schulz.PINNED_FINALIZE[0]]
    assert {tuple(sorted(m.items())) for m in blocks["_sym_kernel"]} == {tuple(sorted(c.items())) for c in pinned_sym}


# ---- adapter ---------------------------------------------------------------------------------


@pytest.mark.parametrize("lead,h", [((), 37), ((7,), 64), ((3, 5), 37), ((2, 3, 4), 50)])
def test_adapter_forward_backward_match_reference(lead, h):
    """Slices of one [h, 2h] weight, as the model passes them; grads flow back into W and e."""
    weight = torch.randn(h, 2 * h) / h**0.5
    state0 = torch.randn(*lead, h)
    e0 = torch.randn(*lead, h)
    grad_out = torch.randn(*lead, h)

    def run(fn):
        w = weight.clone().requires_grad_()
        state = state0.clone().requires_grad_()
        e = e0.clone().requires_grad_()
        y = fn(state, w[:, :h], adapter_injection(e, w[:, h:]))
        grads = torch.autograd.grad(y, (state, w, e), grad_out)
        return y.detach(), grads

    y, grads = run(adapter)
    y_ref, grads_ref = run(adapter_reference)
    assert rel_err(y, y_ref) < 1e-5
    for name, g, g_ref in zip(("state", "W", "e"), grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-5, name


def test_adapter_rectangular_and_strided_inputs():
    """h_out != h_in, a transposed (non-contiguous) state and a strided injection."""
    h_in, h_out = 23, 41
    w = torch.randn(h_out, h_in, requires_grad=True)
    state = torch.randn(h_in, 9).mT.requires_grad_()  # [9, h_in], column-major
    injection = torch.randn(9, 2 * h_out)[:, ::2].requires_grad_()  # stride 2 along h_out
    g = torch.randn(9, h_out)
    y = adapter(state, w, injection)
    y_ref = adapter_reference(state, w, injection)
    assert rel_err(y.detach(), y_ref.detach()) < 1e-5
    got = torch.autograd.grad(y, (state, w, injection), g)
    want = torch.autograd.grad(y_ref, (state, w, injection), g)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


def test_adapter_partial_grads_and_no_grad():
    """No-grad recurrence passes build no graph; a frozen state gives W's gradient only."""
    h = 19
    w = torch.randn(h, h, requires_grad=True)
    state, inj = torch.randn(4, h), torch.randn(4, h)
    with torch.no_grad():
        y = adapter(state, w, inj)
    assert y.grad_fn is None
    y = adapter(state, w, inj)
    assert type(y.grad_fn).__name__ == "_FusedAdapterBackward"
    y.square().sum().backward()
    w_ref = w.detach().clone().requires_grad_()
    adapter_reference(state, w_ref, inj).square().sum().backward()
    assert rel_err(w.grad, w_ref.grad) < 1e-5


def test_adapter_fp16():
    h = 33
    w = torch.randn(h, h, dtype=torch.float16) / h**0.5
    state, inj = torch.randn(6, h).half(), torch.randn(6, h).half()
    ref = (state.float() @ w.float().T + inj.float()).half()
    assert rel_err(adapter(state, w, inj), ref) < 1e-2


# ---- Newton-Schulz ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(40, 40), (24, 50), (50, 24), (2, 3, 20, 36), (3, 45, 17)])
def test_newton_schulz_matches_reference(shape):
    """Square, wide, tall and batched stacks, the full 5-step routine in fp32."""
    grad = torch.randn(shape)
    out = newton_schulz(grad)
    ref = newton_schulz_reference(grad)
    assert rel_err(out, ref) < 1e-4


def test_newton_schulz_per_step_coefficients_and_dtype_arg():
    grad = torch.randn(18, 30, dtype=torch.float16)
    coeffs = [MUON_COEFFICIENTS, (3.0, -3.2, 1.2), (2.0, -1.5, 0.5)]
    out = newton_schulz(grad, steps=3, coefficients=coeffs, dtype=torch.float32)
    ref = newton_schulz_reference(grad, steps=3, coefficients=coeffs, dtype=torch.float32)
    assert out.dtype == torch.float16
    assert rel_err(out, ref) < 1e-3  # both round their fp32 result to fp16 at the end


def test_newton_schulz_fp16_iterations():
    grad = torch.randn(20, 37)
    out = newton_schulz(grad, dtype=torch.float16)
    ref = newton_schulz_reference(grad)  # fp32 iterations
    assert rel_err(out, ref) < 2e-2


@pytest.mark.parametrize("schedule,programs", [("direct", None), ("stream_k", 4), ("stream_k", 8), ("stream_k", 64)])
def test_gram_triangle_tiles_cover_the_matrix(schedule, programs):
    """X X^T on a 20x20 grid of 16-row tiles (210 lower-triangle tiles), both schedules.

    K = 32 takes the unmasked EVEN_K loads (the other tests use odd K).
    Stream-K with 4 / 8 / 64 programs (105 / 53 / 7 units each) over 210 tiles x 2 K-blocks: runs that end inside a tile
    (atomics into the workspace) and whole tiles (plain stores). Every element below the diagonal
    is stored twice from one result, so the output is symmetric bit for bit.
    """
    x = torch.randn(1, 313, 32)
    a = triton_newton_schulz.gram(x, schedule, programs)
    assert rel_err(a, x @ x.mT) < 1e-5
    assert torch.equal(a, a.mT)


@pytest.mark.parametrize("schedule,programs", [("direct", None), ("stream_k", 5), ("stream_k", 3)])
def test_each_iteration_kernel_matches_torch(schedule, programs):
    """Batched stacks (the stream-K runs cross matrix boundaries), odd sizes, both schedules."""
    b_, c_ = MUON_COEFFICIENTS[1:]
    x = torch.randn(3, 21, 35)
    a = triton_newton_schulz.gram(x, schedule, programs)
    assert rel_err(a, x @ x.mT) < 1e-5
    assert torch.equal(a, a.mT)
    p = triton_newton_schulz.gram_poly(a, b_, c_, schedule, programs)
    assert rel_err(p, b_ * a + c_ * (a @ a)) < 1e-5
    assert torch.equal(p, p.mT)
    y = triton_newton_schulz.update(p, x, 3.0)
    assert rel_err(y, 3.0 * x + p @ x) < 1e-5


@pytest.mark.parametrize("schedule", ["direct", "stream_k"])
def test_newton_schulz_triton_schedules_match_reference(schedule):
    x = torch.randn(2, 30, 47)
    x = x / x.norm(dim=(-2, -1), keepdim=True)
    steps = [MUON_COEFFICIENTS] * 5
    out = triton_newton_schulz.newton_schulz_triton(x, steps, schedule)
    ref = x
    for a_, b_, c_ in steps:
        g = ref @ ref.mT
        ref = a_ * ref + (b_ * g + c_ * (g @ g)) @ ref
    assert rel_err(out, ref) < 1e-4


def test_schedule_choice_follows_wave_fill():
    """2048 rows in 128-row tiles: 136 triangle tiles on 132 SMs fill 52% of a second wave."""
    assert triton_newton_schulz.choose_schedule(1, 2048, 132) == "stream_k"
    assert triton_newton_schulz.choose_schedule(8, 2048, 132) == "direct"  # 1088 tiles: 92% fill
    assert triton_newton_schulz.choose_schedule(1, 1408, 66) == "direct"  # 66 tiles: one full wave
    with pytest.raises(ValueError, match="schedule"):
        triton_newton_schulz.gram(torch.randn(1, 4, 4), schedule="fast")


def test_batched_gemm_with_scaled_addend():
    """The GEMM Newton-Schulz's update and the adapter share: 2-D and batched, strided operands."""
    a = torch.randn(3, 35, 20).mT  # [3, 20, 35], column-major
    b = torch.randn(3, 35, 41)
    d = torch.randn(3, 20, 82)[..., ::2]
    assert rel_err(triton_gemm.gemm(a, b, d, alpha=-2.5), a @ b - 2.5 * d) < 1e-5
    assert rel_err(triton_gemm.gemm(a[1], b[1]), a[1] @ b[1]) < 1e-5
    a_even, b_even = torch.randn(20, 48), torch.randn(48, 41)  # K a multiple of BLOCK_K: unmasked loads
    assert rel_err(triton_gemm.gemm(a_even, b_even), a_even @ b_even) < 1e-5
    with pytest.raises(ValueError, match="gemm needs"):
        triton_gemm.gemm(a, b[0])


@pytest.mark.parametrize("env,expected", [(None, "auto"), ("direct", "direct"), ("Stream_K", "stream_k")])
def test_ns_schedule_env_reaches_the_kernels(monkeypatch, env, expected):
    """RETRO_NS_SCHEDULE picks the triangle schedule Muon's newton_schulz call uses."""
    seen = []
    launch = triton_newton_schulz._launch_sym

    def recording(*args):
        seen.append(args[7])  # the schedule argument
        return launch(*args)

    monkeypatch.setattr(triton_newton_schulz, "_launch_sym", recording)
    if env is None:
        monkeypatch.delenv(dispatch.NS_SCHEDULE_ENV, raising=False)
    else:
        monkeypatch.setenv(dispatch.NS_SCHEDULE_ENV, env)
    grad = torch.randn(20, 30)
    assert rel_err(newton_schulz(grad, steps=2), newton_schulz_reference(grad, steps=2)) < 1e-4
    assert seen == [expected] * 4  # two steps x (gram, gram_poly)
