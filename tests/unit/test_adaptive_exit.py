"""Adaptive exit that saves compute: the three exit tests, the compacted step held to the masked reference
(tests/masked_adaptive.py, retro's earlier implementation), the K/V cache of exited rows, FLOPs counted with
FlopCounterMode against FlopModel, and teacher-forced scoring."""

from __future__ import annotations

import copy

import pytest
import torch
from masked_adaptive import masked_adaptive_step
from tiny import sharpened_retro
from torch.utils.flop_counter import FlopCounterMode

import retro  # noqa: F401  (registers the Auto classes)
from retro.inference import generate as generate_module
from retro.inference.adaptive import ExitRule, adaptive_step, parse_exit_rule
from retro.inference.generate import (
    GenerationSettings,
    StaticKVCache,
    _fixed_step,
    generate,
    positions_from_mask,
    teacher_forced,
)
from retro.model.flops import FlopModel
from retro.model.modeling import RetroForCausalLM

PROMPTS = [[5, 17, 33, 8, 61, 12, 40], [9, 70], [44, 3, 81, 27]]
# Thresholds at which the sharpened model's rows exit at a mix of depths (probed; asserted below).
RULES = [ExitRule("kl", 0.1), ExitRule("state", 0.25), ExitRule("entropy", 1.0), ExitRule("entropy", 1.0, 3)]
R_MAX, STEPS = 8, 7


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> RetroForCausalLM:
    return sharpened_retro(tmp_path_factory.mktemp("adaptive"))


def left_pad(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    return ids, ids.ne(0)  # no prompt holds token 0


def settings(rule, **kw) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=STEPS, num_recurrences=R_MAX, adaptive_exit=rule, **kw)


def test_parse_exit_rule():
    assert parse_exit_rule("1e-3") == ExitRule("kl", 1e-3)  # a bare number is a KL threshold, as before
    assert parse_exit_rule("state:0.02", 3) == ExitRule("state", 0.02, 3)
    assert parse_exit_rule(" Entropy:1.5") == ExitRule("entropy", 1.5)
    assert str(ExitRule("state", 0.02, 3)) == "state:0.02:min3"
    for bad, message in [
        ("nan", "finite KL threshold >= 0, got nan"),
        ("state:-1", "finite state threshold >= 0, got -1.0"),
        ("entropy:inf", "finite entropy threshold"),
        ("depth:1", "must be {kl,state,entropy}:THRESHOLD"),
        ("kl:abc", "threshold must be a number"),
    ]:
        with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
            parse_exit_rule(bad)
    with pytest.raises(ValueError, match="min-r"):
        parse_exit_rule("kl:1", 0)
    with pytest.raises(ValueError, match="min_passes"):
        generate(None, torch.tensor([[1]]), None, settings(ExitRule("kl", 1.0, 0)))


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_compacted_equals_masked_and_batched_equals_single(model, monkeypatch, rule):
    """The step that computes only the rows still iterating gives the masked implementation's greedy tokens and
    exit depths, batched and one by one; the rows really exit at a mix of depths, never before min r."""
    ids, mask = left_pad(PROMPTS)
    compact = generate(model, ids, mask, settings(rule))
    decoded = compact.passes[:, 1:]
    assert decoded.unique().numel() >= 3 and decoded.float().mean() < R_MAX
    assert decoded.min() >= max(rule.min_passes, 1 if rule.criterion == "entropy" else 2)
    for b, prompt in enumerate(PROMPTS):
        single = generate(model, torch.tensor([prompt]), None, settings(rule))
        assert single.tokens[0].tolist() == compact.tokens[b].tolist()
        assert single.passes[0].tolist() == compact.passes[b].tolist()
    monkeypatch.setattr(generate_module, "adaptive_step", masked_adaptive_step)
    masked = generate(model, ids, mask, settings(rule))
    assert masked.tokens.tolist() == compact.tokens.tolist()
    assert masked.passes.tolist() == compact.passes.tolist()


@pytest.mark.parametrize("share", [False, True])
def test_exited_rows_cache_reads_as_the_masked_one(model, share):
    """After one adaptive step, every K/V slot (prelude, each block pass, coda) holds what the masked step wrote,
    and the block passes a row skipped hold its exit pass's K/V for the new position (a copy, not a recompute)."""
    ids, mask = left_pad(PROMPTS)
    rule = ExitRule("kl", 0.1) if not share else ExitRule("state", 0.25)
    cache = StaticKVCache(model, len(PROMPTS), ids.size(1) + 4, R_MAX, share)
    with torch.no_grad():
        logits = _fixed_step(model, ids, mask, positions_from_mask(mask), cache, R_MAX, None)
        cache.advance(ids.size(1))
        token = logits.argmax(-1)[:, None]
        mask2 = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = positions_from_mask(mask2)[:, -1:]
        caches = {}
        for name, step in (("compact", adaptive_step), ("masked", masked_adaptive_step)):
            caches[name] = copy.deepcopy(cache)
            out_logits, passes = step(model, token, mask2, pos, caches[name], R_MAX, rule, None)
            caches[name].outputs = (out_logits, passes)
    (a_logits, a_passes), (m_logits, m_passes) = caches["compact"].outputs, caches["masked"].outputs
    assert a_passes.tolist() == m_passes.tolist() and a_passes.min() < R_MAX
    torch.testing.assert_close(a_logits, m_logits, rtol=1e-5, atol=1e-5)
    t = ids.size(1)
    if share:  # one buffer per block layer: the exit pass's K/V is what the masked step left only for the
        # batch's deepest row (it kept recomputing exited rows), so compare that row and the other stages
        deepest = int(a_passes.argmax())
        keys = [k for k in caches["compact"]._slots if k[0] != "block"]
        for key in keys:
            torch.testing.assert_close(caches["compact"].slot(key).k, caches["masked"].slot(key).k)
        block = caches["compact"].slot(("block", 0, 0)).k[deepest, :, t]
        torch.testing.assert_close(block, caches["masked"].slot(("block", 0, 0)).k[deepest, :, t])
        return
    for key in caches["compact"]._slots:
        for kv in ("k", "v"):
            got, want = getattr(caches["compact"].slot(key), kv), getattr(caches["masked"].slot(key), kv)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"slot {key} {kv}")
    for b, used in enumerate(a_passes.tolist()):
        for p in range(used, R_MAX):
            for i in range(model.config.n_recurrent):
                exit_kv = caches["compact"].slot(("block", used - 1, i))
                later = caches["compact"].slot(("block", p, i))
                assert torch.equal(later.k[b, :, t], exit_kv.k[b, :, t])
                assert torch.equal(later.v[b, :, t], exit_kv.v[b, :, t])


def _cpu_sdpa_flops(query_shape, key_shape, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode has no formula for CPU's fused SDPA: QK^T and AV, 2 FLOPs per multiply-add each."""
    b, h, sq, d = query_shape
    return 4 * b * h * sq * key_shape[2] * d


@pytest.mark.parametrize("rule", [ExitRule("state", 0.25), ExitRule("kl", 0.1), None], ids=str)
def test_counted_flops_fall_with_mean_passes(model, monkeypatch, rule):
    """Every decode step's FLOPs counted by FlopCounterMode equal FlopModel.decode_token summed over the rows at
    the passes each used (coda + head once per token for state and fixed r, once per pass for kl): the rows
    that exited cost nothing more, so decode FLOPs fall in proportion to the passes used."""
    ids, mask = left_pad(PROMPTS)
    steps: list[tuple[float, list[int], int]] = []
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    real_adaptive, real_fixed = generate_module.adaptive_step, generate_module._fixed_step

    def counted(fn, fixed):
        def run(model_, ids_, mask_, pos_, cache, r, *rest):
            context = cache.past_length + 1
            with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
                out = fn(model_, ids_, mask_, pos_, cache, r, *rest)
            if ids_.size(1) == 1:  # decode steps only (the prompt is not adaptive)
                passes = [r] * ids_.size(0) if fixed else out[1].tolist()
                steps.append((counter.get_total_flops(), passes, context))
            return out

        return run

    monkeypatch.setattr(generate_module, "adaptive_step", counted(real_adaptive, False))
    monkeypatch.setattr(generate_module, "_fixed_step", counted(real_fixed, True))
    out = generate(model, ids, mask, settings(rule))
    assert len(steps) == STEPS - 1
    config = model.config
    for flops, passes, context in steps:
        fm = FlopModel.from_config(config, context)
        readouts = passes if rule is not None and rule.needs_readout else [1] * len(passes)
        predicted = sum(fm.decode_token(p, n) for p, n in zip(passes, readouts))
        assert flops == pytest.approx(predicted, rel=1e-9)
    if rule is not None:
        total = sum(f for f, _, _ in steps)
        fixed = sum(
            len(p) * FlopModel.from_config(config, c).decode_token(R_MAX, R_MAX if rule.needs_readout else 1)
            for _, p, c in steps
        )
        assert out.passes[:, 1:].float().mean() < R_MAX and total < fixed


def test_teacher_forced_matches_forward_and_generation(model):
    """Fixed r: the per-token loss equals one uncached forward's. Adaptive: scoring the greedy continuation
    reproduces generate's exit depths, and every scored prediction is the token generate chose."""
    prompt = PROMPTS[0]
    ids = torch.tensor([prompt + [11, 23, 7, 50]])
    labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    fixed = teacher_forced(model, ids, labels, GenerationSettings(num_recurrences=3))
    with torch.no_grad():
        logits = model(ids, num_recurrences=3).logits
    want = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    torch.testing.assert_close(fixed.nll[0, :-1], want, rtol=1e-4, atol=1e-5)
    assert fixed.nll[0, -1] == 0 and fixed.passes.eq(3).all()
    rule = ExitRule("entropy", 1.0)
    gen = generate(model, torch.tensor([prompt]), None, settings(rule))
    sequence = torch.cat([torch.tensor([prompt]), gen.tokens], 1)
    labels = torch.nn.functional.pad(sequence[:, 1:], (0, 1), value=-100)
    labels[:, : len(prompt) - 1] = -100
    scored = teacher_forced(model, sequence, labels, settings(rule), prefix=len(prompt))
    n = gen.tokens.size(1)
    assert scored.correct[0, len(prompt) - 1 : len(prompt) - 1 + n].all()
    assert scored.passes[0, len(prompt) - 1 : len(prompt) - 1 + n].tolist() == gen.passes[0].tolist()
