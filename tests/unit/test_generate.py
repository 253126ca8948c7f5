"""Generation: cached decoding vs uncached recomputation, left padding, adaptive exit, sampling, under both a
deterministic s0 (zeros) and the default random one (the paper's truncated normal), and text generation with
tokenizers that have no pad token."""

from __future__ import annotations

import pytest
import torch
from tiny import save_source
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import retro  # noqa: F401  (registers the Auto classes)
from retro.convert import convert
from retro.inference import generate as generate_module
from retro.inference.generate import (
    GenerationSettings,
    StaticKVCache,
    encode_prompts,
    generate,
    generate_text,
    positions_from_mask,
)
from retro.model.layers import DecoderLayer
from retro.model.modeling import RetroForCausalLM

PAD = 0


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> RetroForCausalLM:
    """Tiny Llama (6 layers) -> (1, 2, 1) with a random adapter, so every extra pass changes the output."""
    root = tmp_path_factory.mktemp("gen")
    save_source(root / "src", "llama")
    convert(root / "src", root / "retro", shape=(1, 2, 1), adapter_init="default", state_init="zeros")
    return RetroForCausalLM.from_pretrained(root / "retro").eval()


@pytest.fixture(scope="module")
def noisy_model(tmp_path_factory) -> RetroForCausalLM:
    """The same kind of model with the default s0: truncated normal, drawn fresh for every position."""
    root = tmp_path_factory.mktemp("gen_noisy")
    save_source(root / "src", "llama")
    convert(root / "src", root / "retro", shape=(1, 2, 1), adapter_init="default")
    model = RetroForCausalLM.from_pretrained(root / "retro").eval()
    assert model.config.state_init == "trunc_normal"
    return model


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


@torch.no_grad()
def greedy_uncached_noisy(model, prompt_ids, prompt_mask, r, steps, seed):
    """Reference for a random s0: full recomputation where every position keeps the s0 drawn for it when it
    first entered, in the order generate() draws them (the prompt [B, T], then [B, 1] per new token)."""
    generator = torch.Generator().manual_seed(seed)
    std, hidden = model.config.state_init_std, model.config.hidden_size

    def draw(batch, length):
        s0 = torch.empty(batch, length, hidden)
        return torch.nn.init.trunc_normal_(s0, 0.0, std, -3 * std, 3 * std, generator=generator)

    ids, mask = prompt_ids.clone(), prompt_mask.clone()
    s0 = draw(*ids.shape)
    out = []
    for _ in range(steps):
        pos = positions_from_mask(mask)
        logits = model(ids, attention_mask=mask, position_ids=pos, num_recurrences=r, initial_state=s0).logits
        token = logits[:, -1].argmax(-1)
        out.append(token)
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        s0 = torch.cat([s0, draw(ids.size(0), 1)], 1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("r", [1, 4])
def test_random_initial_state_cached_equals_uncached(noisy_model, r):
    steps, seed = 6, 11
    ids, mask = left_pad(PROMPTS)
    settings = GenerationSettings(max_new_tokens=steps, num_recurrences=r, seed=seed)
    out = generate(noisy_model, ids, mask, settings)
    assert out.tokens.tolist() == greedy_uncached_noisy(noisy_model, ids, mask, r, steps, seed).tolist()
    assert generate(noisy_model, ids, mask, settings).tokens.tolist() == out.tokens.tolist()  # seeded: repeatable


def test_random_initial_state_is_really_random(noisy_model):
    """Guards the test above: s0 draws differ by seed and change the logits (and zeros differ from both)."""
    ids, mask = left_pad(PROMPTS)
    pos = positions_from_mask(mask)

    def logits(seed):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            return noisy_model(
                ids, attention_mask=mask, position_ids=pos, num_recurrences=4, generator=generator
            ).logits

    a, b = logits(0), logits(1)
    assert torch.equal(a, logits(0)) and (a - b).abs().max() > 1e-5
    with torch.no_grad():
        zeros = torch.zeros(*ids.shape, noisy_model.config.hidden_size)
        z = noisy_model(ids, attention_mask=mask, position_ids=pos, num_recurrences=4, initial_state=zeros).logits
    assert (a - z).abs().max() > 1e-5


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


@pytest.mark.parametrize("which", ["model", "noisy_model"])
def test_adaptive_exit_under_autocast_equals_fixed_rmax(request, monkeypatch, which):
    """Under torch.autocast (bf16) the adaptive decoder computes in the autocast dtype from the embedding on,
    as the model's forward does: at a threshold that never exits, every step's logits equal fixed r = r_max
    decoding bit for bit. (It used to run the stages by hand, its prelude in fp32, so the logits differed.)"""
    model = request.getfixturevalue(which)
    ids, mask = left_pad(PROMPTS)
    r_max, steps = 4, 5
    seen: list[torch.Tensor] = []
    dtypes: set[torch.dtype] = set()
    pick = generate_module._next_token

    def next_token(logits, settings, generator):
        seen.append(logits.clone())
        return pick(logits, settings, generator)

    monkeypatch.setattr(generate_module, "_next_token", next_token)
    layers = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    hooks = [m.register_forward_hook(lambda _m, _args, out: dtypes.add(out.dtype)) for m in layers]
    try:
        runs = {}
        for threshold in (None, 0.0):
            seen.clear()
            settings = GenerationSettings(max_new_tokens=steps, num_recurrences=r_max, adaptive_exit=threshold)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = generate(model, ids, mask, settings)
            runs[threshold] = out, list(seen)
    finally:
        for hook in hooks:
            hook.remove()
    (fixed, fixed_logits), (adaptive, adaptive_logits) = runs[None], runs[0.0]
    assert dtypes == {torch.bfloat16}  # every decoder layer's output, prelude included, in both paths
    assert adaptive.passes.eq(r_max).all()
    assert adaptive.tokens.tolist() == fixed.tokens.tolist()
    assert len(adaptive_logits) == len(fixed_logits) == steps
    for a, f in zip(adaptive_logits, fixed_logits, strict=True):
        assert a.dtype == f.dtype == torch.bfloat16
        assert torch.equal(a, f)


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


def tokenizer_without_pad() -> PreTrainedTokenizerFast:
    """Llama-2/3 style: BOS and EOS but no pad token (one token per character; ids below the tiny vocab)."""
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789 .,:?!\n"))
    vocab = {"<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert tokenizer.pad_token is None and tokenizer.pad_token_id is None
    return tokenizer


TEXT_PROMPTS = ["q: what is 2 plus 2?\na:", "hi", "a longer prompt, with words: one two three."]


@pytest.mark.parametrize("batch", [1, 3])
def test_generate_text_without_a_pad_token(model, batch):
    """Used to raise 'Asking to pad but the tokenizer does not have a padding token' (batch 1 too)."""
    tokenizer = tokenizer_without_pad()
    settings = GenerationSettings(max_new_tokens=5, num_recurrences=2)
    prompts = TEXT_PROMPTS[:batch]
    batched = generate_text(model, tokenizer, prompts, settings, add_bos=True)
    singles = [generate_text(model, tokenizer, [p], settings, add_bos=True)[0] for p in prompts]
    assert [c.text for c in batched] == [c.text for c in singles]
    assert [c.prompt_tokens for c in batched] == [len(p) + 1 for p in prompts]  # one token per char + BOS
    # The same tokens as generate() on hand-made ids: padding and BOS are what they should be.
    rows = [[1, *tokenizer(p, add_special_tokens=False)["input_ids"]] for p in prompts]
    ids, mask = left_pad(rows)
    direct = generate(model, ids, mask, settings, eos_token_ids=[2])
    for b, c in enumerate(batched):
        assert c.num_tokens == direct.num_generated[b]
        expected = tokenizer.decode(direct.tokens[b, : direct.num_generated[b]].tolist(), skip_special_tokens=True)
        assert c.text == expected


def test_encode_prompts_bos_and_truncation(model):
    tokenizer = tokenizer_without_pad()
    plain = tokenizer("ab", add_special_tokens=False)["input_ids"]
    assert encode_prompts(tokenizer, ["ab"], add_bos=True) == [[1, *plain]]
    assert encode_prompts(tokenizer, ["ab"], add_bos=False) == [plain]
    assert encode_prompts(tokenizer, ["<s>ab"], add_bos=True) == [[1, *plain]]  # the text's BOS is not doubled
    settings = GenerationSettings(max_new_tokens=3, num_recurrences=1)
    long = "abcdefghij"
    cut = generate_text(model, tokenizer, [long, "ab"], settings, add_bos=True, max_length=8)
    assert [(c.prompt_tokens, c.truncated) for c in cut] == [(5, True), (3, False)]
    kept = generate_text(model, tokenizer, ["fghij"], settings, add_bos=False)  # the last 5 tokens, no BOS
    assert cut[0].text == kept[0].text
    with pytest.raises(ValueError, match="no room"):
        generate_text(model, tokenizer, ["ab"], settings, max_length=3)
