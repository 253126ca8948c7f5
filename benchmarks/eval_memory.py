"""Peak memory and time of the evaluation loss (no_grad, chunked CE) before and after the fix that
stopped it from doing gradient work: the old path allocated an fp32 [vocab, hidden] head-gradient
buffer (and an [N, hidden] one) and ran both gradient products per chunk even under no_grad.

Both paths run side by side in one process: "before" is the same chunk loop with its gradient
outputs switched on (what the loss did under no_grad before), "after" is `linear_cross_entropy`.
Peak memory is counted, not sampled: the bytes of storages created inside the call that are alive
at once, tracked op by op (any device; weights and inputs excluded). On CUDA the table also
reports torch.cuda.max_memory_allocated above the starting point.

    python -m benchmarks.eval_memory [--shapes 32000x2048,128256x2048 --tokens 128 --repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
from unittest import mock

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import retro
import retro.model.modeling
from benchmarks.common import model_config, print_table, time_interleaved, write_results
from retro.model.loss import LOSS_CHUNK_ROWS, _chunked, linear_cross_entropy

MIB = 2**20


class PeakBytes(TorchDispatchMode):
    """Peak of the summed bytes of the storages ops create while active that are still alive
    (outputs sharing an input's storage, i.e. views and in-place results, are not new)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                if s.data_ptr() not in inputs:  # a view of a weight or input is no new memory
                    self.live.setdefault(s.data_ptr(), (StorageWeakRef(s), s.nbytes()))
        self.live = {p: v for p, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def old_loss(hidden, weight, targets, chunk_rows=LOSS_CHUNK_ROWS):
    """The loss as it ran under no_grad before: gradient buffers and products included."""
    hidden, targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
    return _chunked(hidden, weight, targets, chunk_rows, hidden.dtype, True, True)[0]


def measure(fn) -> dict:
    """Counted peak bytes of one call, and CUDA's allocator peak above the start on a GPU."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    with torch.no_grad(), PeakBytes() as tracker:
        value = fn()
    value = getattr(value, "total", value)  # the chunked head loss returns a HeadLoss (total, ce, kd)
    out = {"peak_mib": tracker.peak / MIB, "value": float(value)}
    if cuda:
        out["cuda_peak_mib"] = (torch.cuda.max_memory_allocated() - start) / MIB
    return out


def loss_cases(shapes, tokens: int, device) -> dict:
    """Loss alone: random hidden states [tokens, h] and a head weight [V, h] that requires grad."""
    cases = {}
    for vocab, hidden in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        h = torch.randn(tokens, hidden, device=device, generator=g)
        w = (torch.randn(vocab, hidden, device=device, generator=g) / hidden**0.5).requires_grad_()
        t = torch.randint(0, vocab, (tokens,), device=device, generator=g)
        cases[f"loss V={vocab} h={hidden}"] = (
            dict(vocab=vocab, hidden=hidden, tokens=tokens),
            lambda h=h, w=w, t=t: old_loss(h, w, t),
            lambda h=h, w=w, t=t: linear_cross_entropy(h, w, t),
        )
    return cases


def model_case(args, device) -> dict:
    """A whole RetroForCausalLM evaluation call (what retro.eval / validation run)."""
    torch.manual_seed(0)
    h = args.model_hidden
    config = model_config(h, "1,2,1", args.model_vocab)
    model = retro.RetroForCausalLM(config).to(device)
    ids = torch.randint(0, args.model_vocab, (args.model_batch, args.model_seq), device=device)
    targets = torch.roll(ids, -1, 1)

    def run():
        return model(ids, shift_labels=targets, num_recurrences=4, return_logits=False).loss

    def run_old():
        with mock.patch.object(retro.model.modeling, "linear_cross_entropy", old_loss):
            return run()

    info = dict(vocab=args.model_vocab, hidden=h, tokens=args.model_batch * args.model_seq)
    return {f"model eval V={args.model_vocab} h={h} (1,2,1) r=4": (info, run_old, run)}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="32000x2048,128256x2048", help="vocab x hidden of the loss-only rows")
    parser.add_argument("--tokens", type=int, default=128, help="rows of the loss-only cases")
    parser.add_argument("--model-vocab", type=int, default=128256)
    parser.add_argument("--model-hidden", type=int, default=256)
    parser.add_argument("--model-batch", type=int, default=2)
    parser.add_argument("--model-seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = {**loss_cases(parse_shapes(args.shapes), args.tokens, device), **model_case(args, device)}
    rows = []
    for name, (info, before, after) in cases.items():
        mem_before, mem_after = measure(before), measure(after)
        if mem_before["value"] != mem_after["value"]:
            raise AssertionError(f"{name}: loss changed ({mem_before['value']} -> {mem_after['value']})")
        candidates = {"before": lambda f=before: _no_grad(f), "after": lambda f=after: _no_grad(f)}
        times = time_interleaved(candidates, args.repeats, warmup=1)
        t_before, t_after = statistics.median(times["before"]), statistics.median(times["after"])
        row = {
            "case": name,
            **info,
            "head_grad_mib": round(info["vocab"] * info["hidden"] * 4 / MIB, 1),
            "before_peak_mib": round(mem_before["peak_mib"], 1),
            "after_peak_mib": round(mem_after["peak_mib"], 1),
            "peak_ratio": round(mem_after["peak_mib"] / mem_before["peak_mib"], 3),
            "before_s": round(t_before, 4),
            "after_s": round(t_after, 4),
            "speedup": round(t_before / t_after, 2),
        }
        if "cuda_peak_mib" in mem_before:
            row["before_cuda_peak_mib"] = round(mem_before["cuda_peak_mib"], 1)
            row["after_cuda_peak_mib"] = round(mem_after["cuda_peak_mib"], 1)
        rows.append(row)
        print(f"{name}: {row['before_peak_mib']} -> {row['after_peak_mib']} MiB, {t_before:.3f} -> {t_after:.3f} s")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    print_table(rows, columns)
    path = write_results("eval_memory", {"args": vars(args), "device": str(device), "rows": rows})
    print(f"wrote {path}")


def _no_grad(fn) -> None:
    with torch.no_grad():
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
