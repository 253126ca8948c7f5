"""What the stages wrote, read back and summarised: trainer metrics, retro.eval tables, training FLOPs."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from retro.model.flops import FlopModel


def read_metrics(run_dir: Path) -> list[dict]:
    """The per-step records of a retro.train run: its out_dir's metrics.jsonl, one dict a line."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def eval_results(out: Path) -> dict[str, dict]:
    """{model label: {"static", "runs": {r or 1: {"metrics", "seconds", "n"}}}} from a retro.eval results.json."""
    results = json.loads((out / "results.json").read_text())
    table = {}
    for m in results["models"]:
        runs = {
            (run["recurrences"] or 1): {k: run[k] for k in ("metrics", "seconds", "n", "mean_passes")}
            for run in m["runs"]
        }
        table[m["label"]] = {"static": m["static"], "runs": runs}
    return table


def flop_model(model_dir: Path, seq_len: int) -> FlopModel:
    """The loop-aware FlopModel of a converted or exported model directory at this sequence length."""
    from retro.model.config import RetroConfig
    from retro.model.flops import FlopModel

    return FlopModel.from_config(RetroConfig.from_pretrained(model_dir), seq_len)


def run_flops(records: list[dict], fm: FlopModel, tokens_per_step: int) -> float:
    """Training FLOPs of a run: its logged (n, k) per step through FlopModel, every recurrence counted."""
    return sum(fm.per_token(r["n"], r["k"]) for r in records) * tokens_per_step


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and half the range (max - min) / 2 over seeds."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


def smoothed_loss(records: list[dict], upto: int, window: int) -> float:
    """Mean training loss over steps (upto - window, upto]: the same data batches for every run."""
    sel = [r["loss"] for r in records if upto - window < r["step"] <= upto]
    return statistics.fmean(sel)


def train_summary(records: list[dict], stage: dict, tokens_per_step: int, flops: float) -> dict:
    """One training run in numbers: steps, tokens, FLOPs, time, throughput, peak RSS, losses, mean r and k.

    `records` from read_metrics, `stage` the Stages record of its train stage, `flops` from run_flops.
    """
    steps = len(records)
    return {
        "steps": steps,
        "tokens": steps * tokens_per_step,
        "train_flops": flops,
        "wall_s": stage["seconds"],
        "train_s": round(sum(r["step_time_s"] for r in records), 1),
        "tokens_per_s": round(steps * tokens_per_step / sum(r["step_time_s"] for r in records), 1),
        "median_step_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in records), 1),
        "peak_rss_mib": round(stage["peak_rss_mib"]),
        "final_train_loss": records[-1]["loss"],
        "mean_r": statistics.fmean(r["r"] for r in records),
        "mean_k": statistics.fmean(r["k"] for r in records),
        "first_loss": records[0]["loss"],
    }
