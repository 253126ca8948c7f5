"""RetroForCausalLM against transformers' own models, recurrence semantics, adapter, loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import save_source, tiny_recurrent
from transformers import AutoModelForCausalLM

import retro
from retro.convert import convert
from retro.model.adapter import Adapter
from retro.model.loss import linear_cross_entropy, plain_cross_entropy
from retro.model.rope import rope_cos_sin

KINDS = ["llama", "llama-tied", "llama3", "olmo2", "qwen2", "qwen3"]


def _inputs(batch=2, seq=12, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :4] = 0  # left padding on the first row
    return ids, mask


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["static", "no-drop-recurrent"])
def test_no_drop_conversion_reproduces_source(tmp_path, kind, how):
    source = save_source(tmp_path / "src", kind)
    kwargs = {"static": True} if how == "static" else {"layers": "0-1,2-3,4-5"}
    convert(tmp_path / "src", tmp_path / "out", **kwargs)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert isinstance(model, retro.RetroForCausalLM)
    ids, mask = _inputs()
    with torch.no_grad():
        ref = source(ids, labels=ids)
        ours = model(ids, labels=ids, num_recurrences=1)
        assert (ref.logits - ours.logits).abs().max() < 1e-5
        assert abs(ref.loss.item() - ours.loss.item()) < 1e-5
        ref_masked = source(ids, attention_mask=mask).logits
        ours_masked = model(ids, attention_mask=mask, num_recurrences=1).logits
        real = mask.bool()
        assert (ref_masked[real] - ours_masked[real]).abs().max() < 1e-5


def test_dropped_layers_recurrence_changes_output(tmp_path):
    save_source(tmp_path / "src", "llama")
    convert(tmp_path / "src", tmp_path / "out", shape=(1, 2, 1), adapter_init="default")
    model = retro.RetroForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert model.config.source_layers == {"prelude": [0], "block": [3, 4], "coda": [5]}
    ids, _ = _inputs()
    outputs = []
    with torch.no_grad():
        for r in range(1, 17):
            logits = model(ids, num_recurrences=r, generator=torch.Generator().manual_seed(0)).logits
            assert torch.isfinite(logits).all()
            outputs.append(logits)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-4
    assert (outputs[7] - outputs[15]).abs().max() > 0


def test_truncated_backprop_equals_explicit_passes():
    model = tiny_recurrent(state_init="zeros")
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(2))
    n, k = 3, 2
    loss = model(ids, labels=ids, num_recurrences=(n, k)).loss
    loss.backward()
    auto = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    # Explicit: embed + prelude, n passes under no_grad, k passes with grad, coda, head.
    inner = model.model
    x = inner.embed_tokens(ids)
    rope = rope_cos_sin(inner.inv_freq, torch.arange(9).expand(2, -1), x.dtype)
    for layer in inner.prelude:
        x = layer(x, rope)
    core = inner.recurrent
    injection = core.adapter.injection(x)
    state = torch.zeros_like(x)
    with torch.no_grad():
        for p in range(n):
            state = core.recurrence_pass(state, injection, rope, None, None, p)
    assert not state.requires_grad  # nothing before pass n can receive gradient
    for p in range(n, n + k):
        state = core.recurrence_pass(state, injection, rope, None, None, p)
    for layer in inner.coda:
        state = layer(state, rope)
    logits = model.lm_head(inner.norm(state))
    plain_cross_entropy(logits[:, :-1], ids[:, 1:]).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(auto[name], p.grad, rtol=1e-5, atol=1e-7), name


def test_truncation_blocks_gradient_of_early_passes():
    """With k=1 the gradient must not depend on how many no-grad passes ran before, only on the state."""
    model = tiny_recurrent(state_init="zeros")
    ids = torch.randint(0, 61, (1, 7), generator=torch.Generator().manual_seed(3))
    model(ids, labels=ids, num_recurrences=(4, 1)).loss.backward()
    truncated = model.model.recurrent.adapter.weight.grad.clone()
    model.zero_grad()
    model(ids, labels=ids, num_recurrences=5).loss.backward()
    full = model.model.recurrent.adapter.weight.grad
    assert not torch.allclose(truncated, full)  # full backprop sees the 4 extra passes


def test_precomputed_injection_equals_concat_formula():
    adapter = Adapter(16)
    adapter.reset_default(torch.Generator().manual_seed(0))
    state, e = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    reference = F.linear(torch.cat([state, e], dim=-1), adapter.weight)
    assert torch.allclose(adapter(state, adapter.injection(e)), reference, atol=1e-6)
    identity = Adapter(16)
    assert torch.equal(identity(state, identity.injection(e)), e)


def test_initial_state_options():
    model = tiny_recurrent()
    e = torch.randn(4, 50, 32)
    s1 = model.model.initial_state(e, torch.Generator().manual_seed(5))
    s2 = model.model.initial_state(e, torch.Generator().manual_seed(5))
    assert torch.equal(s1, s2)
    assert s1.abs().max() <= 3 * 0.0087 + 1e-7
    assert abs(s1.std().item() - 0.0087) < 0.0087 * 0.15  # truncation at 3 std shrinks std by ~1.3%
    model.config.state_init = "zeros"
    assert torch.equal(model.model.initial_state(e), torch.zeros_like(e))
    model.config.state_init = "embed"
    assert torch.equal(model.model.initial_state(e), e)


def test_chunked_loss_matches_plain_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    targets[[3, 9]] = -100
    ours = linear_cross_entropy(hidden, weight, targets, chunk_rows=8)
    (ours * 2).backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = plain_cross_entropy(hidden @ weight.T, targets)
    (ref * 2).backward()
    assert abs(ours.item() - ref.item()) < 1e-5
    assert torch.allclose(gh, hidden.grad, atol=1e-6) and torch.allclose(gw, weight.grad, atol=1e-6)


def test_left_padded_batch_equals_one_by_one():
    model = tiny_recurrent(state_init="zeros").eval()
    short = torch.randint(3, 61, (1, 5), generator=torch.Generator().manual_seed(4))
    long = torch.randint(3, 61, (1, 8), generator=torch.Generator().manual_seed(5))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(batch, attention_mask=mask, position_ids=positions, num_recurrences=3).logits
        alone = model(short, num_recurrences=3).logits
    assert (batched[0, 3:] - alone[0]).abs().max() < 1e-5


def test_save_load_round_trip(tmp_path):
    model = tiny_recurrent()
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.config.n_recurrent == 2


def test_bad_recurrence_counts():
    model = tiny_recurrent()
    ids = torch.zeros(1, 3, dtype=torch.long)
    for bad in (0, (0, 0), (-1, 2)):
        with pytest.raises(ValueError, match="num_recurrences"):
            model(ids, num_recurrences=bad)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="state_init"):
        retro.RetroConfig(state_init="gaussian")
    with pytest.raises(ValueError, match="num_key_value_heads"):
        retro.RetroConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=4)
