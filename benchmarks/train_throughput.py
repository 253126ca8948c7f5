"""Training-step throughput, loop-aware MFU and activation memory at r = 1, 8, 16, 32 (k <= 8), with
per-recurrence activation checkpointing on and off.

Activation memory is counted, not sampled: the bytes of unique storages autograd saves for
backward (saved_tensors_hooks), which is exactly what checkpointing trades for recompute.
On CUDA the table also reports torch.cuda.max_memory_allocated.

    python -m benchmarks.train_throughput [--hidden 128 --shape 1,2,1 --batch 2 --seq 128 --repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import retro
from benchmarks.common import model_config, print_table, write_results
from retro.distributed.hardware import peak_flops
from retro.distributed.parallelize import ParallelSettings, parallelize
from retro.model.flops import FlopModel
from retro.planning.shapes import PRESETS  # the paper's models, here with random weights


class SavedBytes:
    """Sum of unique storage bytes saved for backward while active."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def run_case(model, ids, n: int, k: int, repeats: int, device) -> tuple[float, int, int | None]:
    def step():
        model(ids, shift_labels=ids, num_recurrences=(n, k), return_logits=False).loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    saved = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        model(ids, shift_labels=ids, num_recurrences=(n, k), return_logits=False).loss.backward()
    model.zero_grad(set_to_none=True)
    cuda_peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        cuda_peak = torch.cuda.max_memory_allocated()
    return statistics.median(times), saved.total, cuda_peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--shape", default="1,2,1")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recurrences", default="1,8,16,32")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="a real model shape (random weights), e.g. for the GPU target"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    if args.preset:
        config = retro.RetroConfig(max_position_embeddings=args.seq, **PRESETS[args.preset])
    else:
        config = model_config(args.hidden, args.shape, args.vocab, args.seq)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    flops = FlopModel.from_config(config, args.seq)
    peak = peak_flops(device)
    rows = []
    for ac in ("none", "recurrence"):
        torch.manual_seed(0)
        model = retro.RetroForCausalLM(config).to(device=device, dtype=dtype)
        parallelize(model, None, ParallelSettings(activation_checkpointing=ac, compile=args.compile), dtype)
        for total in (int(v) for v in args.recurrences.split(",")):
            k = min(total, 8)
            n = total - k
            seconds, saved, cuda_peak = run_case(model, ids, n, k, args.repeats, device)
            tokens = args.batch * args.seq
            rows.append(
                {
                    "r": total,
                    "n": n,
                    "k": k,
                    "activation_checkpointing": ac,
                    "median_s": round(seconds, 4),
                    "tokens_per_s": round(tokens / seconds, 1),
                    "mfu": round(flops.per_token(n, k) * tokens / seconds / peak, 4),
                    "saved_activation_MiB": round(saved / 2**20, 2),
                    "cuda_peak_MiB": round(cuda_peak / 2**20, 1) if cuda_peak else None,
                }
            )
            print(rows[-1], flush=True)
    print(
        f"\nmodel {args.preset or f'h={args.hidden} shape={args.shape}'} vocab={config.vocab_size} "
        f"tokens={args.batch}x{args.seq} on {device} ({dtype}); "
        f"peak {peak / 1e9:.1f} GFLOP/s ({'spec sheet' if device.type == 'cuda' else 'measured fp32 matmul'})"
    )
    print_table(
        rows,
        [
            "r",
            "n",
            "k",
            "activation_checkpointing",
            "median_s",
            "tokens_per_s",
            "mfu",
            "saved_activation_MiB",
            "cuda_peak_MiB",
        ],
    )
    path = write_results(
        "train_throughput" + ("_gpu" if device.type == "cuda" else ""),
        {"args": vars(args), "peak_flops": peak, "rows": rows},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
