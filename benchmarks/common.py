"""Shared helpers for benchmarks: machine info, fp32 matmul peak, timing, the small-model recipe, JSON output,
printed and Markdown tables."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from retro.model.config import RetroConfig

RESULTS = Path(__file__).parent / "results"


def machine_info() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def matmul_peak_flops(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 10) -> float:
    """Best achieved FLOP/s of large fp32 matmuls on this machine now: the 'limit' we compare against.

    The best (not the median) of several warm repeats, so a noisy neighbour lowers it less.
    """
    best = 0.0
    for size in sizes:
        a, b = torch.randn(size, size), torch.randn(size, size)
        for _ in range(2):
            a @ b
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def time_interleaved(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Run each candidate in turn, `repeats` rounds, so machine noise hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def model_config(hidden: int, shape: str, vocab: int, seq: int | None = None) -> RetroConfig:
    """The benchmarks' small recurrent model: hidden size `hidden`, `shape` "P,R,C" (prelude, recurrent block,
    coda layers), vocabulary `vocab`; SwiGLU width 8h/3 rounded down to a multiple of 16, one attention head
    (and one KV head) per 64 of h, at least one; max_position_embeddings `seq` (RetroConfig's default if None)."""
    from retro.model.config import RetroConfig

    p, r, c = (int(v) for v in shape.split(","))
    heads = max(1, hidden // 64)
    fields = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 16 * 16,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        n_prelude=p,
        n_recurrent=r,
        n_coda=c,
    )
    if seq is not None:
        fields["max_position_embeddings"] = seq
    return RetroConfig(**fields)


def write_results(name: str | Path, payload: dict) -> Path:
    """Write ``payload`` with the command and machine: to ``results/<name>.json``, or to ``name`` if it is a Path."""
    path = name if isinstance(name, Path) else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": " ".join([Path(sys.executable).name] + sys.argv), "machine": machine_info(), **payload}
    path.write_text(json.dumps(payload, indent=2))
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns))


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """A Markdown table as lines: the header, the `|---|` rule, one line per row. Cells are written with str(),
    so format numbers (and escape any `|`) before."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
