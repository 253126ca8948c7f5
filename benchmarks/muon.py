"""Muon's cost on the CPU config: optimizer step vs AdamW, its share of a training step, and
Newton-Schulz time per matrix shape.

    python -m benchmarks.muon [--hidden 256 --layers 8 --intermediate 688 --vocab 8192 --batch 4 --seq 256 --repeats 5]

The model is the project's RetroForCausalLM (fused QKV and gate-up, adapter) at r = 1 with the
given number of layers (~10.7M parameters at the defaults). Optimizer candidates step on the same
fixed gradients, interleaved, medians of --repeats: AdamW (build_optimizer name="adamw"), our Muon
with fused weights split into q/k/v and gate/up (default) and fused (Newton-Schulz in fp32, the CPU
default, and in bf16, torch's choice), and torch.optim.Muon + AdamW
(torch's Newton-Schulz always runs in bf16, slow on CPUs without bf16 matmul units). Newton-Schulz
per shape: the torch reference in fp32 (and bf16, and the Triton dispatcher, on CUDA), one matrix
at a time and as a batch of --batch-ns same-shape matrices (Muon stacks same-shape blocks).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import retro
from benchmarks.common import matmul_peak_flops, print_table, time_interleaved, write_results
from retro.kernels.newton_schulz import newton_schulz, newton_schulz_reference
from retro.model.config import RetroConfig
from retro.optim import build_optimizer, group_parameters
from retro.optim.exchange import newton_schulz_cost


def muon_matrices(model: torch.nn.Module, split_fused: bool) -> list[tuple[int, int]]:
    """Shapes of the matrices Muon orthogonalises (blocks of fused weights when split)."""
    shapes = []
    for g in group_parameters(model, split_fused=split_fused):
        if g["use_muon"]:
            for p in g["params"]:
                shapes += [(rows, p.shape[1]) for rows in (g["split_sizes"] or (p.shape[0],))]
    return shapes


def ns_flops(shapes: list[tuple[int, int]], steps: int = 5) -> float:
    return sum(newton_schulz_cost(r, c, steps) for r, c in shapes)


def torch_muon_pair(model: torch.nn.Module, lr: float, adamw_lr: float) -> list[torch.optim.Optimizer]:
    groups = group_parameters(model, split_fused=False)
    matrices = [p for g in groups if g["use_muon"] for p in g["params"]]
    others = [p for g in groups if not g["use_muon"] for p in g["params"]]
    return [
        torch.optim.Muon(matrices, lr=lr, weight_decay=1e-4),
        torch.optim.AdamW(others, lr=adamw_lr, betas=(0.9, 0.95), eps=1e-10, weight_decay=1e-4),
    ]


def newton_schulz_table(shapes: list[tuple[int, int]], batch: int, repeats: int, device: torch.device) -> list[dict]:
    """Seconds per matrix for each shape: single and batched, fp32 torch (+ bf16 and Triton on CUDA)."""
    rows = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for rows_, cols in shapes:
        x = torch.randn(rows_, cols, device=device)
        xs = torch.randn(batch, rows_, cols, device=device)
        candidates = {
            "torch fp32": lambda: (newton_schulz_reference(x), sync()),
            f"torch fp32 x{batch}": lambda: (newton_schulz_reference(xs), sync()),
        }
        if device.type == "cuda":
            # Batched torch beside batched dispatch: the like-for-like pair auto's stack decision rests on.
            candidates["torch bf16"] = lambda: (newton_schulz_reference(x, dtype=torch.bfloat16), sync())
            candidates[f"torch bf16 x{batch}"] = lambda: (newton_schulz_reference(xs, dtype=torch.bfloat16), sync())
            candidates["dispatch bf16"] = lambda: (newton_schulz(x, dtype=torch.bfloat16), sync())
            candidates[f"dispatch bf16 x{batch}"] = lambda: (newton_schulz(xs, dtype=torch.bfloat16), sync())
        times = time_interleaved(candidates, repeats, warmup=1)
        flops = newton_schulz_cost(rows_, cols, 5)
        for name, ts in times.items():
            per_matrix = statistics.median(ts) / (batch if f"x{batch}" in name else 1)
            rows.append(
                {
                    "shape": f"{rows_}x{cols}",
                    "impl": name,
                    "ms_per_matrix": round(1e3 * per_matrix, 3),
                    "gflop_per_s": round(flops / per_matrix / 1e9, 1),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ns-repeats", type=int, default=3)
    parser.add_argument("--batch-ns", type=int, default=4, help="matrices per batched Newton-Schulz call")
    parser.add_argument("--name", default=None, help="results file stem (default muon / muon_cuda)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/<name>.json)")
    parser.add_argument("--no-torch-muon", action="store_true", help="skip torch.optim.Muon (bf16, slow on CPU)")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    h, L = args.hidden, args.layers
    prelude = L // 3
    config = RetroConfig(
        vocab_size=args.vocab,
        hidden_size=h,
        intermediate_size=args.intermediate,
        num_attention_heads=max(1, h // 64),
        num_key_value_heads=max(1, h // 64),
        max_position_embeddings=args.seq,
        n_prelude=prelude,
        n_recurrent=L - 2 * prelude,
        n_coda=prelude,
    )
    with device:
        model = retro.RetroForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    targets = torch.roll(ids, -1, 1)

    def forward_backward():
        model.zero_grad(set_to_none=False)
        model(ids, shift_labels=targets, num_recurrences=1, return_logits=False).loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    forward_backward()  # fixed gradients for every optimizer below
    optimizers: dict[str, list[torch.optim.Optimizer]] = {
        "AdamW": [build_optimizer(model, name="adamw")],
        "Muon (ours, split q/k/v, gate/up)": [build_optimizer(model, muon_lr=1e-6, lr=1e-9, muon_split_fused=True)],
        "Muon (ours, fused)": [build_optimizer(model, muon_lr=1e-6, lr=1e-9, muon_split_fused=False)],
        "Muon (ours, fused, NS in bf16)": [
            build_optimizer(model, muon_lr=1e-6, lr=1e-9, muon_split_fused=False, ns_dtype="bfloat16")
        ],
    }
    if not args.no_torch_muon:
        optimizers["torch.optim.Muon + AdamW"] = torch_muon_pair(model, 1e-6, 1e-9)

    def stepper(opts):
        def run():
            for o in opts:
                o.step()
            if device.type == "cuda":
                torch.cuda.synchronize()

        return run

    candidates = {name: stepper(opts) for name, opts in optimizers.items()}
    candidates["forward+backward"] = forward_backward
    peak = matmul_peak_flops()  # CPU fp32 GEMM
    times = time_interleaved(candidates, args.repeats, warmup=1)
    fb = statistics.median(times["forward+backward"])
    adamw = statistics.median(times["AdamW"])
    shapes = {
        "Muon (ours, split q/k/v, gate/up)": muon_matrices(model, True),
        "Muon (ours, fused)": muon_matrices(model, False),
        "Muon (ours, fused, NS in bf16)": muon_matrices(model, False),
        "torch.optim.Muon + AdamW": muon_matrices(model, False),
    }
    rows = []
    for name in optimizers:
        med = statistics.median(times[name])
        row = {
            "optimizer": name,
            "step_s": round(med, 4),
            "vs_adamw": round(med / adamw, 1),
            "share_of_train_step": round(med / (fb + med), 3),
        }
        if name in shapes:
            row["ns_gflop"] = round(ns_flops(shapes[name]) / 1e9, 2)
            if device.type == "cpu":  # the peak is measured on the CPU
                row["ns_fraction_of_matmul_peak"] = round(ns_flops(shapes[name]) / med / peak, 3)
        rows.append(row)
    print(
        f"model: {n_params / 1e6:.1f}M params, h={h} layers={L} I={args.intermediate} vocab={args.vocab}; "
        f"train step = forward+backward on {args.batch}x{args.seq} tokens ({fb:.3f} s) + optimizer step; "
        f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s; device {device}"
    )
    print_table(
        rows, ["optimizer", "step_s", "vs_adamw", "share_of_train_step", "ns_gflop", "ns_fraction_of_matmul_peak"]
    )

    unique = sorted(set(shapes["Muon (ours, split q/k/v, gate/up)"]) | set(shapes["Muon (ours, fused)"]))
    ns_rows = newton_schulz_table(unique, args.batch_ns, args.ns_repeats, device)
    print()
    print_table(ns_rows, ["shape", "impl", "ms_per_matrix", "gflop_per_s"])
    stem = args.name or ("muon" if device.type == "cpu" else "muon_cuda")
    path = write_results(
        args.out or stem,
        {
            "args": {**vars(args), "out": str(args.out) if args.out else None},
            "params": n_params,
            "matmul_peak_flops": peak,
            "forward_backward_s": fb,
            "optimizer_rows": rows,
            "newton_schulz_rows": ns_rows,
            "times": times,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
