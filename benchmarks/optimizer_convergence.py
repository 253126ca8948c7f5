"""Muon vs AdamW at the same number of steps on the CPU demo config (issue: report whichever wins).

Needs a converted model and prepared shards, e.g. from `python -m retro.demo --out demo_out`:

    python -m benchmarks.optimizer_convergence --model demo_out/recurrent_init --data demo_out/data [--steps 300]

Each optimizer runs `retro.train` with configs/demo.toml on 2 gloo ranks; the table gives the mean
training loss over the last 10% of steps and the final validation losses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import print_table, write_results

CONFIG = Path(__file__).parents[1] / "configs" / "demo.toml"


def run(model: str, data: str, out: Path, steps: int, nproc: int, overrides: list[str]) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "retro.train",
        "--config",
        str(CONFIG),
        f"--model.path={model}",
        f"--data.train={data}",
        f"--train.out_dir={out}",
        f"--train.steps={steps}",
        f"--optim.decay_steps={steps // 5}",
        *overrides,
    ]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    candidates = {
        "muon (muon_lr 1e-2, adamw lr 1e-3)": ["--optim.name=muon"],
        "adamw (lr 1e-3)": ["--optim.name=adamw", "--optim.lr=1e-3"],
        "adamw (lr 3e-3)": ["--optim.name=adamw", "--optim.lr=3e-3"],
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(candidates.items()):
            metrics = run(args.model, args.data, Path(tmp) / str(i), args.steps, args.nproc, overrides)
            tail = metrics[-max(1, len(metrics) // 10) :]
            final = metrics[-1]
            rows.append(
                {
                    "optimizer": name,
                    "steps": len(metrics),
                    "train_loss_last10pct": round(statistics.mean(m["loss"] for m in tail), 4),
                    **{k: round(v, 4) for k, v in final.items() if k.startswith("val_loss")},
                    "skipped_steps": sum(m["skipped"] for m in metrics),
                }
            )
            print(rows[-1], flush=True)
    columns = list(rows[0])
    print_table(rows, columns)
    print(f"wrote {write_results('optimizer_convergence', {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
