"""Depth-batched decoding (retro/inference/depth_batching.py): each request's output equals `generate` on it
alone (greedy tokens and exit depths, every exit rule, prompts of different lengths, a queue longer than the
batch, EOS mid-way), rows of a batch really run at different depths, and sampling with a random s0 still matches
one-by-one decoding because each request draws from its own generator."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import save_source, sharpened_retro

import retro  # noqa: F401  (registers the Auto classes)
from retro.convert import convert
from retro.inference.adaptive import ExitRule
from retro.inference.depth_batching import DepthStats, generate_stream
from retro.inference.generate import GenerationSettings, generate
from retro.model.modeling import RetroForCausalLM

PROMPTS = [[5, 17, 33, 8, 61, 12, 40], [9, 70], [44, 3, 81, 27], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 4], [30]]
# The thresholds of tests/unit/test_adaptive_exit.py: on this model rows exit at a mix of depths.
RULES = [ExitRule("kl", 0.1), ExitRule("state", 0.25), ExitRule("entropy", 1.0), ExitRule("entropy", 1.0, 3), None]
R_MAX, STEPS = 8, 7


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> RetroForCausalLM:
    return sharpened_retro(tmp_path_factory.mktemp("depth"))


def settings(rule, **kw) -> GenerationSettings:
    return GenerationSettings(**{"max_new_tokens": STEPS, "num_recurrences": R_MAX, "adaptive_exit": rule, **kw})


def one_by_one(model, s: GenerationSettings, eos=()) -> list[tuple[list[int], list[int]]]:
    """Each prompt decoded alone with `generate` (batch 1): its tokens and passes up to the stop."""
    outs = []
    for prompt in PROMPTS:
        out = generate(model, torch.tensor([prompt]), None, s, eos)
        n = out.num_generated[0]
        outs.append((out.tokens[0, :n].tolist(), out.passes[0, :n].tolist()))
    return outs


def queued(
    model, s: GenerationSettings, max_batch: int, eos=(), stats=None, share: float = 0.0
) -> list[tuple[list[int], list[int]]]:
    finished = list(generate_stream(model, PROMPTS, s, max_batch, eos, stats=stats, readout_share=share))
    assert sorted(f.index for f in finished) == list(range(len(PROMPTS)))
    by_index = {f.index: (f.tokens, f.passes) for f in finished}
    return [by_index[i] for i in range(len(PROMPTS))]


@pytest.mark.parametrize(("rule", "max_batch"), [(r, 2) for r in RULES] + [(RULES[0], 3)], ids=str)
def test_depth_batched_equals_one_by_one(model, rule, max_batch):
    """A queue of 5 prompts of lengths 1-11 through 2 or 3 slots, with an EOS that ends some requests early:
    every request's greedy tokens and per-token exit depths are those of decoding it alone."""
    s = settings(rule)
    eos = [one_by_one(model, s)[0][0][3]]  # the 4th token of the first prompt's continuation: an early stop
    want = one_by_one(model, s, eos)
    assert any(len(t) < STEPS for t, _ in want) and any(len(t) == STEPS for t, _ in want)
    stats = DepthStats()
    got = queued(model, s, max_batch, eos, stats)
    assert got == want
    decoded = [p for _, passes in want for p in passes[1:]]
    if rule is not None:
        assert len(set(decoded)) >= 3 and min(decoded) < R_MAX  # the rows really exit at a mix of depths
    assert stats.work == sum(decoded)  # every tick's row pass did a token's work, none was wasted
    assert len(set(stats.slots_of.values())) == max_batch and stats.prefills > 1  # freed slots were refilled


def test_rows_at_different_depths_share_ticks(model):
    """Two requests in two slots: the block runs max(total decode passes of each) ticks, not the lockstep count
    (per token the deeper row's passes), so a row that exits early goes on while the other iterates."""
    rule = ExitRule("entropy", 1.0)
    s = settings(rule, max_new_tokens=12)
    prompts = [PROMPTS[0], PROMPTS[2]]
    stats = DepthStats()
    got = {f.index: f.passes for f in generate_stream(model, prompts, s, 2, stats=stats, readout_share=0.0)}
    decode = [got[i][1:] for i in range(2)]
    lockstep = sum(max(a, b) for a, b in zip(*decode))
    assert stats.ticks == max(sum(d) for d in decode) < lockstep


def test_sampling_with_random_s0_matches_one_by_one(model):
    """s0 drawn from a truncated normal at every token and sampled tokens: each request draws from its own
    generator in the order a batch of one does, so the queue reproduces one-by-one decoding exactly."""
    noisy = copy.deepcopy(model)
    noisy.config.state_init = "trunc_normal"
    noisy.config.state_init_std = 0.5
    s = settings(ExitRule("kl", 0.1), do_sample=True, temperature=1.5, seed=7)
    want = one_by_one(noisy, s)
    assert want != one_by_one(noisy, settings(ExitRule("kl", 0.1), do_sample=True, temperature=1.5, seed=8))
    assert queued(noisy, s, 2) == want


def test_shared_block_cache(model):
    """With one block K/V buffer per layer the queue still decodes each request as it would alone."""
    s = settings(ExitRule("state", 0.25), share_block_cache=True)
    assert queued(model, s, 3) == one_by_one(model, s)


def test_refuses_bad_settings(model, tmp_path):
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        list(generate_stream(model, PROMPTS, settings(None), 0))
    with pytest.raises(ValueError, match="empty prompt"):
        list(generate_stream(model, [[3], []], settings(None), 2))
    save_source(tmp_path / "src", "llama")
    convert(tmp_path / "src", tmp_path / "static", static=True)
    static = RetroForCausalLM.from_pretrained(tmp_path / "static").eval()
    with pytest.raises(ValueError, match="needs a recurrent model"):
        list(generate_stream(static, PROMPTS, settings(None), 2))


@pytest.mark.parametrize("rule", [ExitRule("state", 0.25), None], ids=str)
@pytest.mark.parametrize("share", [0.5, 1.0])
def test_waiting_for_a_shared_readout_keeps_one_by_one_outputs(model, rule, share):
    """Slots whose token exited wait (out of the block) until `share` of the slots waits, then one coda + head
    reads them all out: fewer read-outs than one per tick, and every request still decodes as it would alone."""
    s = settings(rule)
    eos = [one_by_one(model, s)[0][0][3]]
    want = one_by_one(model, s, eos)
    eager, waiting = DepthStats(), DepthStats()
    assert queued(model, s, 3, eos, eager, share=0.0) == want
    assert queued(model, s, 3, eos, waiting, share=share) == want
    decoded = sum(p for _, passes in want for p in passes[1:])
    assert eager.work == waiting.work == decoded  # the same row passes, none wasted
    if rule is not None:
        assert waiting.readouts < eager.readouts


def test_readout_share_must_be_a_share(model):
    with pytest.raises(ValueError, match=r"readout_share must be in \[0, 1\], got 1.5"):
        list(generate_stream(model, PROMPTS, settings(None), 2, readout_share=1.5))
