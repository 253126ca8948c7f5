"""Per-token adaptive depth for decoding: the exit rule and one decode step that only pays for the rows
still iterating.

Exit tests, checked after each recurrent pass of a decode step (the prompt always runs r_max passes):
- `kl`: KL(previous || current) between the next-token distributions of successive passes;
- `state`: the relative change of the recurrent state ||s_p - s_{p-1}|| / ||s_p|| at the new position. It
  needs no coda or head per pass, so those run once per token, after the last pass;
- `entropy`: the entropy (nats) of the current pass's next-token distribution.

A row exits when its score falls below the threshold, after at least `min_passes` passes (kl and state
compare two passes, so they can exit after 2 at the earliest), or at r_max.

Exited rows stop costing: each pass gathers the rows still iterating, runs the block (and for kl/entropy
the coda and head) on them only, and scatters the results back. The block K/V slots of the passes a row
skipped receive a copy of its exit pass's K/V (as the Huginn paper's KV sharing does), so later tokens that
attend through those passes read the exit state, never a recomputation. With `share_block_cache` the one
buffer simply keeps the exit pass's K/V.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from retro.inference.kv_cache import StaticKVCache

EXIT_CRITERIA = ("kl", "state", "entropy")


@dataclass(frozen=True)
class ExitRule:
    """When a token stops iterating: `criterion` score < `threshold`, no earlier than `min_passes` passes."""

    criterion: str = "kl"
    threshold: float = 0.0
    min_passes: int = 1

    def validate(self) -> None:
        if self.criterion not in EXIT_CRITERIA:
            names = ", ".join(EXIT_CRITERIA)
            raise ValueError(f"adaptive_exit criterion must be one of {names}, got {self.criterion!r}")
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(
                f"adaptive_exit {self.criterion} threshold must be a finite number >= 0, got {self.threshold}"
            )
        if self.min_passes < 1:
            raise ValueError(f"adaptive_exit min_passes must be >= 1, got {self.min_passes}")

    @property
    def needs_readout(self) -> bool:
        """Whether every pass needs the coda + head (the next-token distribution)."""
        return self.criterion != "state"

    def __str__(self) -> str:
        text = f"{self.criterion}:{self.threshold:g}"
        return text if self.min_passes == 1 else f"{text}:min{self.min_passes}"


def parse_exit_rule(text: str, min_passes: int = 1) -> ExitRule:
    """'kl:1e-3', 'state:0.02', 'entropy:0.5', or a bare number (a KL threshold, the older syntax)."""
    name, sep, value = str(text).strip().partition(":")
    if not sep:
        name, value = "kl", name
    name = name.strip().lower()
    if name not in EXIT_CRITERIA:
        raise ValueError(
            f"--adaptive-exit must be {{{','.join(EXIT_CRITERIA)}}}:THRESHOLD or a KL threshold, got {text!r}"
        )
    try:
        threshold = float(value)
    except ValueError:
        raise ValueError(f"--adaptive-exit threshold must be a number, got {value!r} in {text!r}") from None
    if not (math.isfinite(threshold) and threshold >= 0):
        label = "KL" if name == "kl" else name
        raise ValueError(f"--adaptive-exit must be a finite {label} threshold >= 0, got {threshold}")
    if min_passes < 1:
        raise ValueError(f"--adaptive-min-r must be >= 1, got {min_passes}")
    return ExitRule(name, threshold, min_passes)


def as_exit_rule(value: ExitRule | float | str | None) -> ExitRule | None:
    """GenerationSettings' `adaptive_exit`: a rule, a bare KL threshold, a 'criterion:threshold' string or None."""
    if value is None or isinstance(value, ExitRule):
        return value
    if isinstance(value, str):
        return parse_exit_rule(value)
    return ExitRule("kl", float(value))


def _score(rule: ExitRule, logits: torch.Tensor | None, prev, new_state: torch.Tensor):
    """(score [n] or None, what the next pass compares against)."""
    if rule.criterion == "state":
        now = new_state[:, -1].float()
        if prev is None:
            return None, now
        change = (now - prev).norm(dim=-1) / now.norm(dim=-1).clamp_min(torch.finfo(now.dtype).tiny)
        return change, now
    logp = F.log_softmax(logits.float(), dim=-1)
    if rule.criterion == "entropy":
        return -(logp.exp() * logp).sum(-1), None
    if prev is None:
        return None, logp
    return (prev.exp() * (prev - logp)).sum(-1).clamp_min(0), logp


def adaptive_step(
    model,
    ids: torch.Tensor,
    mask: torch.Tensor,
    pos: torch.Tensor,
    cache: StaticKVCache,
    r_max: int,
    rule: ExitRule,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step with a per-row exit; returns last-position logits [B, V] and passes used [B].

    The model's own stages (as in its forward, autocast included); the recurrent block runs pass by pass on
    the rows still iterating only.
    """
    m = model.model
    e, rope, mask4 = m.embed_and_prelude(ids, mask, pos, cache)
    core = m.recurrent  # called pass by pass (outside its forward): single-device eval, not FSDP-sharded
    injection, state = core.start(e, m.initial_state(e, generator))
    state = state.clone()  # written row by row below; s0 may be e itself (state_init = embed)
    batch, length = ids.shape
    passes = torch.full((batch,), r_max, dtype=torch.long, device=ids.device)
    active = torch.arange(batch, device=ids.device)
    sub = (state, injection, rope, mask4)  # the active rows' inputs; all rows until the first exit
    logits = prev = None
    for p in range(r_max):
        s, inj, rope_a, mask_a = sub
        cache.rows = None if active.numel() == batch else active
        new_state = core.recurrence_pass(s, inj, rope_a, mask_a, cache, p)
        out = None
        if rule.needs_readout:
            out = model.lm_head(m.coda_and_norm(new_state, rope_a, mask_a, cache)[:, -1])
            if logits is None:
                logits = out if cache.rows is None else out.new_zeros(batch, out.size(-1))
            elif cache.rows is not None:
                logits[active] = out
            else:
                logits = out
        cache.rows = None
        state[active] = new_state
        if p + 1 == r_max:
            break
        score, prev = _score(rule, out, prev, new_state)
        if score is None or p + 1 < rule.min_passes:
            sub = (new_state, inj, rope_a, mask_a)
            continue
        done = score < rule.threshold
        if bool(done.any()):
            rows = active[done]
            passes[rows] = p + 1
            cache.fill_later_passes(rows, p, length)
            keep = ~done
            active = active[keep]
            prev = None if prev is None else prev[keep]
            if active.numel() == 0:
                break
            sub = (new_state[keep], inj[keep], _rows(rope_a, keep), None if mask_a is None else mask_a[keep])
        else:
            sub = (new_state, inj, rope_a, mask_a)
    if not rule.needs_readout:
        logits = model.lm_head(m.coda_and_norm(state, rope, mask4, cache)[:, -1])
    return logits, passes


def _rows(rope: tuple[torch.Tensor, torch.Tensor], keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = rope
    return (cos[keep], sin[keep]) if cos.size(0) == keep.numel() else rope
