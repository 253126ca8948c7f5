"""Batched decoding for `RetroForCausalLM`: a KV cache across recurrences, left padding, stop strings,
greedy or sampled tokens, and an optional per-token adaptive exit.

The cache (retro/inference/kv_cache.py) keeps one preallocated K/V buffer per (stage, pass, layer).

Adaptive exit (decode steps only; the prompt runs r_max passes) is retro/inference/adaptive.py: an exit rule
(kl, state or entropy, a threshold, a minimum r) per token, and a step that runs each pass on the rows still
iterating only. Exited rows' skipped block passes get a copy of their exit pass's K/V. Batched and one-by-one
decoding agree. `teacher_forced` runs the same steps over given tokens (loss and accuracy under adaptive exit).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from retro.inference.adaptive import ExitRule, adaptive_step, as_exit_rule
from retro.inference.kv_cache import StaticKVCache
from retro.model.modeling import RetroForCausalLM


@dataclass
class GenerationSettings:
    """How to decode. `num_recurrences` is r (the maximum r when `adaptive_exit` is set)."""

    max_new_tokens: int = 256
    num_recurrences: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    share_block_cache: bool = False
    adaptive_exit: ExitRule | float | str | None = None  # a rule, or a bare KL threshold (the older form)
    seed: int = 0

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_recurrences < 1:
            raise ValueError(f"num_recurrences must be >= 1, got {self.num_recurrences}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        rule = self.exit_rule()
        if rule is not None:
            rule.validate()

    def exit_rule(self) -> ExitRule | None:
        return as_exit_rule(self.adaptive_exit)


@dataclass
class GenerationOutput:
    tokens: torch.Tensor  # [B, N] generated ids; positions after a row finished hold pad_token_id
    num_generated: list[int]  # per row, tokens up to and including the stop token
    passes: torch.Tensor  # [B, N] recurrent passes used for each generated token (0 for a static model)

    def mean_passes(self) -> float:
        """Mean passes over the tokens that were really generated (the passes that produced them)."""
        used = [self.passes[b, :n].float() for b, n in enumerate(self.num_generated) if n > 0]
        return float(torch.cat(used).mean()) if used else 0.0


class StopStrings:
    """True when a row's generated text contains one of `strings` (decodes only a short tail)."""

    def __init__(self, tokenizer, strings: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.strings = [s for s in strings if s]
        self.window = max((len(s) for s in self.strings), default=0) + 4

    def __call__(self, tokens: list[int]) -> bool:
        if not self.strings:
            return False
        tail = self.tokenizer.decode(tokens[-self.window :], skip_special_tokens=False)
        return any(s in tail for s in self.strings)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for left-padded rows: the first real token sits at position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _next_token(logits: torch.Tensor, s: GenerationSettings, generator: torch.Generator) -> torch.Tensor:
    """[B, V] logits -> [B] ids: argmax, or a sample after temperature / top-k / top-p."""
    if not s.do_sample:
        return logits.argmax(-1)
    logits = logits.float() / s.temperature
    if s.top_k > 0:
        kth = logits.topk(min(s.top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= s.top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _fixed_step(model, ids, mask, pos, cache, r, generator) -> torch.Tensor:
    hidden = model.model(ids, mask, pos, r if model.config.is_recurrent else None, cache, None, generator)
    return model.lm_head(hidden[:, -1])


@torch.no_grad()
def generate(
    model: RetroForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    settings: GenerationSettings,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    stop: Callable[[list[int]], bool] | None = None,
) -> GenerationOutput:
    """Decode up to `max_new_tokens` for a left-padded batch [B, T]; a row stops at EOS or `stop`."""
    settings.validate()
    if settings.adaptive_exit is not None and not model.config.is_recurrent:
        raise ValueError("adaptive exit needs a recurrent model; this checkpoint is static (n_recurrent = 0)")
    device = model.lm_head.weight.device
    input_ids = input_ids.to(device)
    batch, prompt_len = input_ids.shape
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(device).bool()
    r = settings.num_recurrences
    cache = StaticKVCache(model, batch, prompt_len + settings.max_new_tokens, r, settings.share_block_cache)
    generator = torch.Generator(device).manual_seed(settings.seed)
    rule = settings.exit_rule()
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
    passes_default = r if model.config.is_recurrent else 0

    pos = positions_from_mask(mask)
    logits = _fixed_step(model, input_ids, mask, pos, cache, r, generator)
    cache.advance(prompt_len)
    passes = torch.full((batch,), passes_default, dtype=torch.long, device=device)
    tokens, used = [], []
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    num_generated = [0] * batch
    rows: list[list[int]] = [[] for _ in range(batch)]
    for step in range(settings.max_new_tokens):
        token = _next_token(logits, settings, generator)
        token = torch.where(finished, pad_token_id, token)
        tokens.append(token)
        used.append(torch.where(finished, 0, passes))
        done_now = ~finished & torch.isin(token, eos)
        if stop is not None:
            for b, t in enumerate(token.tolist()):
                if not finished[b]:
                    rows[b].append(t)
                    done_now[b] |= stop(rows[b])
        for b in (~finished).nonzero().flatten().tolist():
            num_generated[b] = step + 1
        finished |= done_now
        if bool(finished.all()) or step + 1 == settings.max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.bool, device=device)], dim=1)
        pos = pos[:, -1:] + 1
        if rule is None:
            logits = _fixed_step(model, token[:, None], mask, pos, cache, r, generator)
        else:
            logits, passes = adaptive_step(model, token[:, None], mask, pos, cache, r, rule, generator)
        cache.advance(1)
    return GenerationOutput(torch.stack(tokens, 1), num_generated, torch.stack(used, 1))


class Scored(NamedTuple):
    nll: torch.Tensor  # [B, T] cross entropy of labels[:, t] given tokens up to t (0 where ignored)
    correct: torch.Tensor  # [B, T] bool: argmax at t == labels[:, t]
    passes: torch.Tensor  # [B, T] recurrent passes that produced the prediction at t


@torch.no_grad()
def teacher_forced(
    model: RetroForCausalLM,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    settings: GenerationSettings,
    prefix: int = 1,
) -> Scored:
    """Predictions at every position of given tokens [B, T] (no padding), decoded as `generate` would: the first
    `prefix` tokens run r passes at once (the prompt), then each later token is one decode step (adaptive with
    `settings.adaptive_exit`, else fixed r). `labels` are aligned with the inputs (-100: not scored)."""
    settings.validate()
    device = model.lm_head.weight.device
    ids, labels = input_ids.to(device), labels.to(device)
    batch, length = ids.shape
    r, rule = settings.num_recurrences, settings.exit_rule()
    if rule is not None and not model.config.is_recurrent:
        raise ValueError("adaptive exit needs a recurrent model; this checkpoint is static (n_recurrent = 0)")
    if not 1 <= prefix <= length:
        raise ValueError(f"prefix must be in [1, {length}], got {prefix}")
    cache = StaticKVCache(model, batch, length, r, settings.share_block_cache)
    generator = torch.Generator(device).manual_seed(settings.seed)
    mask = torch.ones(batch, prefix, dtype=torch.bool, device=device)
    pos = positions_from_mask(mask)
    hidden = model.model(ids[:, :prefix], mask, pos, r if model.config.is_recurrent else None, cache, None, generator)
    logits = [model.lm_head(hidden)]
    passes_default = r if model.config.is_recurrent else 0
    passes = [torch.full((batch, prefix), passes_default, dtype=torch.long, device=device)]
    cache.advance(prefix)
    for t in range(prefix, length):
        mask = torch.ones(batch, t + 1, dtype=torch.bool, device=device)
        pos = torch.full((batch, 1), t, dtype=torch.long, device=device)
        if rule is None:
            step, used = _fixed_step(model, ids[:, t : t + 1], mask, pos, cache, r, generator), None
        else:
            step, used = adaptive_step(model, ids[:, t : t + 1], mask, pos, cache, r, rule, generator)
        logits.append(step[:, None])
        passes.append(torch.full((batch, 1), passes_default, device=device) if used is None else used[:, None])
        cache.advance(1)
    all_logits = torch.cat(logits, 1).float()
    scored = labels != -100
    nll = F.cross_entropy(all_logits.transpose(1, 2), labels.clamp_min(0), reduction="none") * scored
    return Scored(nll, (all_logits.argmax(-1) == labels) & scored, torch.cat(passes, 1))


@dataclass
class Completion:
    text: str
    num_tokens: int
    mean_passes: float
    prompt_tokens: int = 0  # prompt length in tokens after BOS and truncation
    truncated: bool = False  # the prompt lost tokens on the left to fit `max_length`


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """Cut the text at the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=len(text))
    return text[:cut]


def encode_prompts(tokenizer, prompts: Sequence[str], add_bos: bool | None = None) -> list[list[int]]:
    """Token ids of each prompt, unpadded. add_bos None: the tokenizer's own special tokens; True: also make
    sure the row starts with BOS (as lm-eval's add_bos_token=True; a prompt already starting with the BOS
    text is left alone); False: no special tokens."""
    bos_id, bos_text = tokenizer.bos_token_id, tokenizer.bos_token
    rows = []
    for prompt in prompts:
        has_bos_text = bool(bos_text) and prompt.startswith(bos_text)
        ids = tokenizer(prompt, add_special_tokens=add_bos is not False and not has_bos_text)["input_ids"]
        if add_bos and bos_id is not None and not has_bos_text and (not ids or ids[0] != bos_id):
            ids = [bos_id, *ids]
        rows.append(list(ids))
    return rows


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids left-padded with `pad_token_id` and the bool mask of real tokens."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_token_id] * (width - len(r)) + list(r) for r in rows], dtype=torch.long)
    mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows], dtype=torch.bool)
    return ids, mask


def prepare_prompts(
    model: RetroForCausalLM,
    tokenizer,
    prompts: Sequence[str],
    settings: GenerationSettings,
    add_bos: bool | None = None,
    max_length: int | None = None,
) -> tuple[list[list[int]], list[int], list[int], int]:
    """(token rows cut to `max_length - max_new_tokens`, their lengths before the cut, EOS ids, pad id)."""
    rows = encode_prompts(tokenizer, prompts, add_bos)
    lengths = [len(r) for r in rows]
    if max_length is not None:
        budget = max_length - settings.max_new_tokens
        if budget < 1:
            raise ValueError(
                f"max_length {max_length} leaves no room for a prompt next to max_new_tokens {settings.max_new_tokens}"
            )
        rows = [r[-budget:] for r in rows]
    if any(not r for r in rows):
        raise ValueError("an empty prompt (no tokens): give it some text or add BOS")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    pad = tokenizer.pad_token_id
    pad = pad if pad is not None else (eos_ids[0] if eos_ids else 0)
    return rows, lengths, eos_ids, pad


def generate_text(
    model: RetroForCausalLM,
    tokenizer,
    prompts: Sequence[str],
    settings: GenerationSettings,
    stop_strings: Sequence[str] = (),
    add_bos: bool | None = None,
    max_length: int | None = None,
) -> list[Completion]:
    """Tokenize, left-pad, decode, and return completions cut at the first stop string.

    Padding is done here, not by the tokenizer, so tokenizers without a pad token work (the pad id is only a
    filler: the mask hides it). `max_length` bounds prompt + generation as lm-eval does: prompts keep their
    last `max_length - max_new_tokens` tokens. `add_bos` is as in `encode_prompts`.
    """
    rows, lengths, eos_ids, pad = prepare_prompts(model, tokenizer, prompts, settings, add_bos, max_length)
    ids, mask = left_pad(rows, pad)
    out = generate(
        model, ids, mask, settings, eos_ids, pad, StopStrings(tokenizer, stop_strings) if stop_strings else None
    )
    completions = []
    for b, n in enumerate(out.num_generated):
        tokens = out.tokens[b, :n].tolist()
        text = truncate_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stop_strings)
        mean = float(out.passes[b, :n].float().mean()) if n else 0.0
        completions.append(Completion(text, n, mean, len(rows[b]), len(rows[b]) < lengths[b]))
    return completions
