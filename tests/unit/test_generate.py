"""Generation: cached decoding vs uncached recomputation, left padding, adaptive exit, sampling."""

from __future__ import annotations

import pytest
import torch
from tiny import save_source

import retro  # noqa: F401  (registers the Auto classes)
from retro.convert import convert
from retro.inference.generate import GenerationSettings, StaticKVCache, generate, positions_from_mask
from retro.model.modeling import RetroForCausalLM

PAD = 0


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> RetroForCausalLM:
    """Tiny Llama (6 layers) -> (1, 2, 1) with a random adapter, so every extra pass changes the output."""
    root = tmp_path_factory.mktemp("gen")
    save_source(root / "src", "llama")
    convert(root / "src", root / "retro", shape=(1, 2, 1), adapter_init="default", state_init="zeros")
    return RetroForCausalLM.from_pretrained(root / "retro").eval()


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


PROMPTS = [[5, 17, 33, 8, 61, 12, 40], [9, 70], [44, 3, 81, 27]]


@torch.no_grad()
def greedy_uncached(model, prompt_ids, prompt_mask, r, steps):
    """Reference: recompute the whole (left-padded) sequence for every new token, no cache."""
    ids, mask = prompt_ids.clone(), prompt_mask.clone()
    out = []
    for _ in range(steps):
        logits = model(ids, attention_mask=mask, position_ids=positions_from_mask(mask), num_recurrences=r).logits
        token = logits[:, -1].argmax(-1)
        out.append(token)
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("r", [1, 3, 8])
def test_cached_equals_uncached_and_batched_equals_single(model, r):
    steps = 6
    ids, mask = left_pad(PROMPTS)
    reference = greedy_uncached(model, ids, mask, r, steps)
    settings = GenerationSettings(max_new_tokens=steps, num_recurrences=r)
    batched = generate(model, ids, mask, settings)  # no EOS: every row runs all steps
    assert batched.tokens.tolist() == reference.tolist()
    assert batched.passes.eq(r).all()
    for b, prompt in enumerate(PROMPTS):
        single = generate(model, torch.tensor([prompt]), None, settings)
        assert single.tokens[0].tolist() == batched.tokens[b].tolist()


def test_recurrence_changes_output(model):
    """Guards the tests above against a model where r has no effect."""
    ids, mask = left_pad(PROMPTS)
    out = {
        r: model(ids, attention_mask=mask, position_ids=positions_from_mask(mask), num_recurrences=r).logits
        for r in (1, 3)
    }
    assert (out[1] - out[3]).abs().max() > 1e-3


def test_eos_stops_row_and_pads_the_rest(model):
    ids, mask = left_pad(PROMPTS)
    free = generate(model, ids, mask, GenerationSettings(max_new_tokens=6, num_recurrences=2))
    row = free.tokens[0].tolist()
    stop_at = next(i for i in range(1, 6) if row[i] not in row[:i])  # a token that first appears late
    out = generate(
        model,
        ids,
        mask,
        GenerationSettings(max_new_tokens=6, num_recurrences=2),
        eos_token_ids=[row[stop_at]],
        pad_token_id=PAD,
    )
    assert out.num_generated[0] == stop_at + 1
    assert out.tokens[0, : stop_at + 1].tolist() == row[: stop_at + 1]
    assert out.tokens[0, stop_at + 1 :].eq(PAD).all() and out.passes[0, stop_at + 1 :].eq(0).all()


def test_shared_block_cache(model):
    """One pass: sharing changes nothing. Several passes: r times less block memory, still runs."""
    ids, mask = left_pad(PROMPTS)
    full = generate(model, ids, mask, GenerationSettings(max_new_tokens=5, num_recurrences=1))
    shared = generate(model, ids, mask, GenerationSettings(max_new_tokens=5, num_recurrences=1, share_block_cache=True))
    assert full.tokens.tolist() == shared.tokens.tolist()
    big = StaticKVCache(model, 2, 16, 8)
    small = StaticKVCache(model, 2, 16, 8, share_block_cache=True)
    c = model.config
    assert big.num_bytes() == (c.n_prelude + c.n_coda + 8 * c.n_recurrent) * small.num_bytes() // (
        c.n_prelude + c.n_coda + c.n_recurrent
    )
    assert big.slot(("block", 3, 1)) is not big.slot(("block", 4, 1))
    assert small.slot(("block", 3, 1)) is small.slot(("block", 4, 1))
    with pytest.raises(KeyError, match="block"):
        big.slot(("block", 8, 0))


def test_adaptive_exit_threshold_zero_equals_fixed_rmax(model):
    ids, mask = left_pad(PROMPTS)
    fixed = generate(model, ids, mask, GenerationSettings(max_new_tokens=6, num_recurrences=6))
    adaptive = generate(model, ids, mask, GenerationSettings(max_new_tokens=6, num_recurrences=6, adaptive_exit=0.0))
    assert adaptive.tokens.tolist() == fixed.tokens.tolist()
    assert adaptive.passes.eq(6).all() and adaptive.mean_passes() == 6.0


def test_adaptive_exit_loose_threshold_uses_fewer_passes_and_batches(model):
    ids, mask = left_pad(PROMPTS)
    r_max = 8
    # Every decoded token exits at the first comparison (2 passes); the first token comes from the prompt (r_max).
    huge = generate(model, ids, mask, GenerationSettings(max_new_tokens=6, num_recurrences=r_max, adaptive_exit=1e9))
    assert huge.passes[:, 0].eq(r_max).all() and huge.passes[:, 1:].eq(2).all()
    # A threshold between observed KLs: a mix of exit depths, fewer passes than r_max on average.
    settings = GenerationSettings(max_new_tokens=8, num_recurrences=r_max, adaptive_exit=1e-3)
    batched = generate(model, ids, mask, settings)
    decoded = batched.passes[:, 1:]
    assert decoded.float().mean() < r_max and decoded.min() >= 2 and decoded.unique().numel() >= 3
    assert batched.mean_passes() < r_max
    for b, prompt in enumerate(PROMPTS):
        single = generate(model, torch.tensor([prompt]), None, settings)
        assert single.tokens[0].tolist() == batched.tokens[b].tolist()
        assert single.passes[0].tolist() == batched.passes[b].tolist()


def test_sampling_is_seeded_and_top_k_one_is_greedy(model):
    ids, mask = left_pad(PROMPTS)
    greedy = generate(model, ids, mask, GenerationSettings(max_new_tokens=5, num_recurrences=2))
    top1 = generate(model, ids, mask, GenerationSettings(max_new_tokens=5, num_recurrences=2, do_sample=True, top_k=1))
    assert top1.tokens.tolist() == greedy.tokens.tolist()
    hot = GenerationSettings(max_new_tokens=5, num_recurrences=2, do_sample=True, temperature=5.0, top_p=0.9, seed=3)
    a, b = generate(model, ids, mask, hot), generate(model, ids, mask, hot)
    assert a.tokens.tolist() == b.tokens.tolist()
    other = generate(model, ids, mask, GenerationSettings(**{**hot.__dict__, "seed": 4}))
    assert other.tokens.tolist() != a.tokens.tolist()


def test_bad_settings(model):
    ids = torch.tensor([[5, 6]])
    with pytest.raises(ValueError, match="num_recurrences"):
        generate(model, ids, None, GenerationSettings(num_recurrences=0))
    with pytest.raises(ValueError, match="adaptive_exit"):
        generate(model, ids, None, GenerationSettings(adaptive_exit=-1.0))
