"""The model under `torch.autocast` (bf16 compute, fp32 master weights): what a single-process run
of `python -m retro.train` does. It must compute what FSDP2's MixedPrecisionPolicy(param_dtype=bf16)
computes (bf16 parameters and activations, fp32 softmax), and give fp32 gradients to the weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import tiny_recurrent

from retro.kernels import dispatch
from retro.kernels.adapter import adapter, adapter_reference

BF16 = torch.bfloat16


_model = tiny_recurrent


def _ids(batch=2, seq=16):
    return torch.randint(0, 61, (batch, seq), generator=torch.Generator().manual_seed(2))


def _loss_and_grads(model, ids, return_logits, autocast):
    model.zero_grad()
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        out = model(
            ids,
            labels=ids,
            num_recurrences=(2, 2),
            return_logits=return_logits,
            generator=torch.Generator().manual_seed(3),
        )
    out.loss.backward()
    return out, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("return_logits", [True, False])
@pytest.mark.parametrize("state_init", ["trunc_normal", "zeros", "embed"])
def test_autocast_forward_backward_close_to_fp32(return_logits, state_init):
    model = _model(state_init=state_init)
    ids = _ids()
    ref, ref_grads = _loss_and_grads(model, ids, return_logits, autocast=False)
    ref_loss = ref.loss.item()
    out, grads = _loss_and_grads(model, ids, return_logits, autocast=True)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert abs(out.loss.item() - ref_loss) < 2e-3 * ref_loss
    if return_logits:
        assert out.logits.dtype == BF16
    for name, p in model.named_parameters():
        g = grads[name]
        assert g is not None and g.dtype == torch.float32 == p.dtype, name  # fp32 master weights
        assert torch.isfinite(g).all(), name
        cos = torch.nn.functional.cosine_similarity(g.flatten(), ref_grads[name].flatten(), dim=0)
        assert cos > 0.99, (name, cos.item())
    assert grads["model.recurrent.adapter.weight"].abs().sum() > 0  # gradients reach the adapter


def test_autocast_matches_bf16_parameters():
    """Autocast on fp32 weights computes what bf16 weights compute (FSDP2's param_dtype=bf16 path)."""
    model = _model()
    ids = _ids()
    bf16_model = copy.deepcopy(model).to(BF16)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=BF16):
            ours = model(ids, labels=ids, num_recurrences=(2, 2), generator=torch.Generator().manual_seed(3))
        cast = bf16_model(ids, labels=ids, num_recurrences=(2, 2), generator=torch.Generator().manual_seed(3))
        with torch.autocast("cpu", dtype=BF16):
            ours_chunked = model(
                ids, labels=ids, num_recurrences=(2, 2), return_logits=False, generator=torch.Generator().manual_seed(3)
            )
    assert (ours.logits.float() - cast.logits.float()).abs().max() < 2e-2
    assert abs(ours.loss.item() - cast.loss.item()) < 2e-3
    assert abs(ours_chunked.loss.item() - ours.loss.item()) < 2e-3


def test_autocast_generation_cache_and_given_initial_state():
    """An fp32 initial state handed in (as generate may) follows the compute dtype too."""
    model = _model().eval()
    ids = _ids(1, 8)
    state = torch.zeros(1, 8, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        logits = model(ids, num_recurrences=3, initial_state=state).logits
    assert torch.isfinite(logits.float()).all()


def test_adapter_kernel_casts_under_autocast():
    """The adapter op itself: fp32 weight slice with bf16 state/injection under autocast."""
    h = 24
    w = torch.randn(h, h, requires_grad=True)
    state = torch.randn(5, h).to(BF16).requires_grad_()
    injection = torch.randn(5, h, dtype=BF16)
    with torch.autocast("cpu", dtype=BF16):
        y = adapter(state, w, injection)
    assert y.dtype == BF16
    assert torch.equal(y.detach(), adapter(state.detach(), w.detach().to(BF16), injection))  # = bf16 weights
    ref = adapter_reference(state.detach().float(), w.detach(), injection.float())
    assert (y.detach().float() - ref).abs().max() < 2e-2 * ref.abs().max()
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and w.grad.abs().sum() > 0
    # Outside autocast a dtype mismatch is still an error.
    with pytest.raises(TypeError, match="dtypes differ"):
        adapter(state.detach(), w.detach(), injection)


def test_adapter_triton_path_under_autocast(monkeypatch):
    """The fused kernel under the interpreter, fp16 autocast (the interpreter's bf16 dot is broken)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    dispatch.set_backend("triton")
    try:
        h = 19
        w = torch.randn(h, h, requires_grad=True)
        state = torch.randn(6, h, requires_grad=True)
        injection = torch.randn(6, h).half()
        with torch.autocast("cpu", dtype=torch.float16):
            y = adapter(state, w, injection)
        assert y.dtype == torch.float16 and type(y.grad_fn).__name__ == "_FusedAdapterBackward"
        y.float().sum().backward()
    finally:
        dispatch.set_backend(None)
    ref = adapter_reference(state.detach().half(), w.detach().half(), injection)
    assert (y.detach().float() - ref.float()).abs().max() < 1e-2
    assert w.grad.dtype == torch.float32 and state.grad.dtype == torch.float32


def test_autocast_with_activation_checkpointing():
    """Per-pass and per-layer checkpointing recompute under the same autocast state: same gradients."""
    model = _model()
    ids = _ids()
    out, grads = _loss_and_grads(model, ids, False, autocast=True)
    grads = {name: g.clone() for name, g in grads.items()}
    model.model.recurrent.checkpoint_passes = model.model.checkpoint_layers = True
    out_ckpt, grads_ckpt = _loss_and_grads(model, ids, False, autocast=True)
    assert out_ckpt.loss.item() == out.loss.item()
    for name, g in grads.items():
        assert torch.allclose(grads_ckpt[name], g, rtol=1e-5, atol=1e-6), name
