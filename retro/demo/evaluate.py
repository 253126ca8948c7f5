"""Stage 5 of the demo: exact-match accuracy on held-out problems, by steps k and test recurrence r.

The answer is a single token, so one forward per (k, r) batch and an argmax at the last position
is exactly greedy decoding of one token. Prompts start with EOS, as documents do inside the packed
training rows. The initial state s0 is drawn from a generator seeded per run, so scores repeat.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from retro.inference.loading import load_model, load_tokenizer


@torch.no_grad()
def accuracy(
    model, tokenizer, rows: list[dict], recurrences: list[int | None], seed: int = 0, batch_size: int = 512
) -> dict[str, dict[str, float]]:
    """{str(r): {str(k): accuracy}} ("static" for r None). Problems of one k have one length."""
    groups: dict[int, list[dict]] = defaultdict(list)
    for row in rows:
        groups[int(row["steps"])].append(row)
    out: dict[str, dict[str, float]] = {}
    for r in recurrences:
        by_k = {}
        for k in sorted(groups):
            ids = [[tokenizer.eos_token_id, *tokenizer(row["prompt"])["input_ids"]] for row in groups[k]]
            if len({len(x) for x in ids}) != 1:
                raise ValueError(
                    f"held-out problems with steps={k} have different token lengths; the eval file is inconsistent"
                )
            answers = torch.tensor([tokenizer.convert_tokens_to_ids(row["answer"]) for row in groups[k]])
            correct = 0
            generator = torch.Generator().manual_seed(seed)
            for start in range(0, len(ids), batch_size):
                batch = torch.tensor(ids[start : start + batch_size])
                logits = model(batch, num_recurrences=r, generator=generator).logits[:, -1]
                correct += int((logits.argmax(-1) == answers[start : start + batch_size]).sum())
            by_k[str(k)] = correct / len(ids)
        out["static" if r is None else str(r)] = by_k
    return out


def evaluate_checkpoint(path: Path, rows: list[dict], recurrences: list[int], seed: int = 0) -> dict:
    """Load a retro checkpoint (with its tokenizer) and score it; a static model runs once."""
    model = load_model(path, None, "cpu", torch.float32)
    tokenizer = load_tokenizer(path, add_bos=False, config=model.config)  # prompts start with EOS, not BOS
    static = not model.config.is_recurrent
    scores = accuracy(model, tokenizer, rows, [None] if static else list(recurrences), seed)
    return {
        "path": str(path),
        "static": static,
        "unique_parameters": sum(p.numel() for p in model.parameters()),
        "accuracy": scores,
        "mean": {r: sum(v.values()) / len(v) for r, v in scores.items()},
    }
