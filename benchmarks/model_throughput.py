"""Forward+backward tokens/s of RetroForCausalLM vs transformers' LlamaForCausalLM, same shape.

Ours is a no-drop conversion of the HF model at r=1 (identity adapter), so both compute the same
function; the table also shows the fraction of this machine's fp32 matmul peak each reaches.
Both call styles of ours are timed against the HF call `model(ids, labels=ids)` (logits + loss):
the same call (logits returned, loss from them: one head pass), and `return_logits=False` (loss
only, chunked CE: what training uses). "before" re-runs the logits + loss call as it was before
it computed the loss from the logits (chunked CE plus a second head pass for the logits), side by
side. All candidates interleaved, medians of the repeats, ratios to HF.

    python -m benchmarks.model_throughput [--hidden 256 --layers 8 --vocab 8192 --batch 4 --seq 256 --repeats 7]
                                          [--threads 1: steadier on a shared machine] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import retro
from benchmarks.common import matmul_peak_flops, print_table, time_interleaved, write_results
from retro.convert import convert
from retro.distributed.parallelize import ParallelSettings, parallelize
from retro.model.loss import linear_cross_entropy


def step_flops(n_matmul_params: int, layers: int, attn_dim: int, batch: int, seq: int) -> float:
    """6 N per token for the weights, plus 12 L T d per token for QK^T and AV (fwd + bwd)."""
    tokens = batch * seq
    return 6 * n_matmul_params * tokens + 12 * layers * seq * attn_dim * tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compile", action="store_true", help="also time ours with each layer compiled")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    h, L = args.hidden, args.layers
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=h,
            intermediate_size=int(h * 8 / 3) // 16 * 16,
            num_hidden_layers=L,
            num_attention_heads=h // 64,
            num_key_value_heads=h // 64,
            max_position_embeddings=args.seq,
            tie_word_embeddings=False,
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(Path(tmp) / "hf")
        third = L // 3
        convert(
            Path(tmp) / "hf", Path(tmp) / "retro", layers=f"0-{third - 1},{third}-{L - third - 1},{L - third}-{L - 1}"
        )
        ours = retro.RetroForCausalLM.from_pretrained(Path(tmp) / "retro")
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    shifted = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)  # what labels=ids means

    def run_hf():
        hf(ids, labels=ids).loss.backward()

    def logits_and_loss(model):
        out = model(ids, labels=ids, num_recurrences=1)
        assert out.logits is not None
        out.loss.backward()

    def loss_only(model):
        model(ids, labels=ids, num_recurrences=1, return_logits=False).loss.backward()

    def logits_and_loss_before(model):
        hidden = model.model(ids, num_recurrences=1)
        loss = linear_cross_entropy(hidden, model.lm_head.weight, shifted)
        model.lm_head(hidden)  # the logits, returned but unused by the loss
        loss.backward()

    candidates = {
        ("transformers Llama", "logits + loss"): run_hf,
        ("retro (r=1)", "logits + loss"): lambda: logits_and_loss(ours),
        ("retro (r=1)", "loss only"): lambda: loss_only(ours),
        ("retro (r=1), before: two head passes", "logits + loss"): lambda: logits_and_loss_before(ours),
    }
    if args.compile:
        compiled = retro.RetroForCausalLM(ours.config)
        compiled.load_state_dict(ours.state_dict())
        parallelize(compiled, None, ParallelSettings(activation_checkpointing="none", compile=True), torch.float32)
        candidates[("retro (r=1, compiled layers)", "logits + loss")] = lambda: logits_and_loss(compiled)
        candidates[("retro (r=1, compiled layers)", "loss only")] = lambda: loss_only(compiled)
    n_params = sum(p.numel() for n, p in hf.named_parameters() if "embed" not in n and p.dim() == 2)
    flops = step_flops(n_params, L, h, args.batch, args.seq)
    peak = matmul_peak_flops()
    names = {key: f"{key[0]} | {key[1]}" for key in candidates}
    times = time_interleaved({names[key]: fn for key, fn in candidates.items()}, args.repeats)
    hf_times = times[names[("transformers Llama", "logits + loss")]]
    base = statistics.median(hf_times)
    rows = []
    for (model, call), name in names.items():
        med = statistics.median(times[name])
        rows.append(
            {
                "model": model,
                "call": call,
                "median_s": round(med, 4),
                "tokens_per_s": round(args.batch * args.seq / med),
                "speedup_vs_hf": round(base / med, 3),
                # per-round ratios (each round runs every candidate back to back), then their median:
                # steadier than the ratio of medians when the machine's load drifts between rounds
                "paired_speedup_vs_hf": round(statistics.median(h / t for h, t in zip(hf_times, times[name])), 3),
                "fraction_of_matmul_peak": round(flops / med / peak, 3),
            }
        )
    print(
        f"shape: h={h} layers={L} vocab={args.vocab} tokens={args.batch}x{args.seq}; fp32 matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s; step {flops / 1e9:.2f} GFLOP"
    )
    columns = ["model", "call", "median_s", "tokens_per_s", "speedup_vs_hf", "paired_speedup_vs_hf"]
    print_table(rows, [*columns, "fraction_of_matmul_peak"])
    path = write_results(
        "model_throughput",
        {"args": vars(args), "matmul_peak_flops": peak, "step_flops": flops, "rows": rows, "times": times},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
