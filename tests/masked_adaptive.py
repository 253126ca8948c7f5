"""The reference adaptive-exit step: the masked implementation retro had before exited rows stopped costing.

Every pass runs the block, coda and head on every row; rows that have exited are computed anyway and their
results discarded with torch.where, and each pass's K/V of an exited row is overwritten with the previous
pass's (so skipped passes hold the exit pass's K/V). Extended to the three exit tests and a minimum r with
the same rule as retro/inference/adaptive.py, so the compacted step can be held to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from retro.inference.adaptive import ExitRule


def _copy_pass(cache, src: int, dst: int, rows: torch.Tensor | None, num_tokens: int) -> None:
    if cache.share_block_cache or src == dst:
        return
    start, end = cache.past_length, cache.past_length + num_tokens
    for i in range(cache.n_recurrent):
        a, b = cache.slot(("block", src, i)), cache.slot(("block", dst, i))
        for x, y in ((a.k, b.k), (a.v, b.v)):
            if rows is None:
                y[:, :, start:end] = x[:, :, start:end]
            else:
                keep = rows[:, None, None, None]
                y[:, :, start:end] = torch.where(keep, x[:, :, start:end], y[:, :, start:end])


def masked_adaptive_step(model, ids, mask, pos, cache, r_max: int, rule: ExitRule, generator):
    m = model.model
    e, rope, mask4 = m.embed_and_prelude(ids, mask, pos, cache)
    core = m.recurrent
    injection, state = core.start(e, m.initial_state(e, generator))
    batch = ids.size(0)
    exited = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    passes = torch.full((batch,), r_max, dtype=torch.long, device=ids.device)
    prev_logp = prev_state = logits = None
    for p in range(r_max):
        new_state = core.recurrence_pass(state, injection, rope, mask4, cache, p)
        if p > 0:
            new_state = torch.where(exited[:, None, None], state, new_state)
            _copy_pass(cache, p - 1, p, exited, ids.size(1))
        state = new_state
        logits = model.lm_head(m.coda_and_norm(state, rope, mask4, cache)[:, -1])  # every pass, every row
        logp = F.log_softmax(logits.float(), dim=-1)
        now = state[:, -1].float()
        score = None
        if rule.criterion == "entropy":
            score = -(logp.exp() * logp).sum(-1)
        elif rule.criterion == "kl" and prev_logp is not None:
            score = (prev_logp.exp() * (prev_logp - logp)).sum(-1).clamp_min(0)
        elif rule.criterion == "state" and prev_state is not None:
            score = (now - prev_state).norm(dim=-1) / now.norm(dim=-1)
        prev_logp, prev_state = logp, now
        if score is not None and p + 1 < r_max and p + 1 >= rule.min_passes:
            newly = ~exited & (score < rule.threshold)
            passes = torch.where(newly, p + 1, passes)
            exited |= newly
            if bool(exited.all()):
                for rest in range(p + 1, r_max):
                    _copy_pass(cache, p, rest, None, ids.size(1))
                break
    return logits, passes
