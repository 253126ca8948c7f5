"""Forward+backward tokens/s of RetroForCausalLM vs transformers' LlamaForCausalLM, same shape.

Ours is a no-drop conversion of the HF model at r=1 (identity adapter), so both compute the same
function; the table also shows the fraction of this machine's fp32 matmul peak each reaches.

    python -m benchmarks.model_throughput [--hidden 256 --layers 8 --vocab 8192 --batch 4 --seq 256 --repeats 7]
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
    args = parser.parse_args()
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
    targets = torch.roll(ids, -1, 1)

    def run_hf():
        hf(ids, labels=ids).loss.backward()

    def run_ours():
        ours(ids, shift_labels=targets, num_recurrences=1, return_logits=False).loss.backward()

    candidates = {"transformers Llama": run_hf, "retro (r=1)": run_ours}
    if args.compile:
        compiled = retro.RetroForCausalLM(ours.config)
        compiled.load_state_dict(ours.state_dict())
        parallelize(compiled, None, ParallelSettings(activation_checkpointing="none", compile=True), torch.float32)
        candidates["retro (r=1, compiled layers)"] = lambda: compiled(
            ids, shift_labels=targets, num_recurrences=1, return_logits=False
        ).loss.backward()
    n_params = sum(p.numel() for n, p in hf.named_parameters() if "embed" not in n and p.dim() == 2)
    flops = step_flops(n_params, L, h, args.batch, args.seq)
    peak = matmul_peak_flops()
    times = time_interleaved(candidates, args.repeats)
    base = statistics.median(times["transformers Llama"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            {
                "model": name,
                "median_s": round(med, 4),
                "tokens_per_s": round(args.batch * args.seq / med),
                "speedup_vs_hf": round(base / med, 3),
                "fraction_of_matmul_peak": round(flops / med / peak, 3),
            }
        )
    print(
        f"shape: h={h} layers={L} vocab={args.vocab} tokens={args.batch}x{args.seq}; fp32 matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s; step {flops / 1e9:.2f} GFLOP"
    )
    print_table(rows, ["model", "median_s", "tokens_per_s", "speedup_vs_hf", "fraction_of_matmul_peak"])
    path = write_results(
        "model_throughput",
        {"args": vars(args), "matmul_peak_flops": peak, "step_flops": flops, "rows": rows, "times": times},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
