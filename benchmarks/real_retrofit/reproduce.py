"""Stage (a)'s worker, `python -m benchmarks.real_retrofit _reproduce ...` (run by stages.check_reproduction):
retro's no-drop conversions against transformers' own model of the GGUF, logits and loss on real text."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def reproduce(argv: list[str]) -> int:
    """Stage (a): retro's no-drop conversions against transformers' model of the GGUF on real text windows."""
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--data", action="append", required=True)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    from retro.data.loader import build_val_batches
    from retro.model.modeling import RetroForCausalLM

    torch.manual_seed(0)
    gguf = Path(a.gguf)
    started = time.perf_counter()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - started
    models = {Path(m).name: RetroForCausalLM.from_pretrained(m).eval() for m in a.model}
    report: dict = {"transformers_load_s": round(load_s, 1), "data": {}}
    for data in a.data:
        batch = next(iter(build_val_batches(data, a.seq_len, a.rows, 0, 1, 1)))
        ids, labels = batch["input_ids"], batch["labels"]
        entry: dict = {"tokens": int((labels != -100).sum())}
        with torch.no_grad():
            started = time.perf_counter()
            ref_logits = ref(ids).logits
            entry["transformers_s"] = round(time.perf_counter() - started, 2)
            loss = torch.nn.functional.cross_entropy(ref_logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
            entry["transformers_loss"] = loss.item()
            for name, model in models.items():
                started = time.perf_counter()
                out = model(ids, shift_labels=labels, num_recurrences=1)
                entry[name] = {
                    "max_abs_dlogits": (out.logits - ref_logits).abs().max().item(),
                    "loss": out.loss.item(),
                    "seconds": round(time.perf_counter() - started, 2),
                }
        report["data"][Path(data).name] = entry
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0
