"""What ``auto`` dispatch runs, per shape class, from committed GPU measurements.

``auto`` takes Triton only for a shape class whose measurements below show it faster than torch:
the median speedup (torch time / Triton time) of the class's rows must exceed 1. A class with no
row (fp32 or fp16 iterations, stacks smaller than any measured one) stays on torch. Re-measure with
``benchmarks/gpu_check.sh`` (it runs both commands) and edit the rows; ``auto`` follows, and
``tests/kernels/test_kernels_dispatch.py`` holds it to this table.

Shape classes: ``(kernel, dtype, form)``. ``form`` is ``single`` for one matrix (batch 1; the
adapter is always ``single``) and ``stack`` for a batch of same-shape matrices at least as large as
the smallest measured stack (:func:`stack_min`); batches in between have no class.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

MEASURED = {
    "date": "2026-12-04",
    "gpu": "one NVIDIA H200",
    "versions": "torch 2.11, triton 3.6, transformers 5.17",
    "commands": ("python benchmarks/kernels.py", "python benchmarks/muon.py"),
    "settings": "kernels.py at its GPU defaults; muon.py at TinyLlama size as gpu_check.sh runs it "
    "(--hidden 2048 --layers 22 --intermediate 5632 --vocab 32000: 1.27B parameters, multi-head attention)",
    "source": "issue 26, one run of each",
}
KERNELS_PY, MUON_PY = MEASURED["commands"]


@dataclass(frozen=True)
class Measurement:
    """One measured case: torch time / Triton time (> 1: Triton faster), and where it came from."""

    kernel: str  # "newton_schulz" | "adapter"
    dtype: str  # the iterations' / operands' dtype
    batch: int  # same-shape matrices per call (1: a single matrix)
    case: str
    speedup: float
    command: str
    note: str = ""


MEASUREMENTS: tuple[Measurement, ...] = (
    # Newton-Schulz, 5 iterations in bf16, ms torch / Triton (auto schedule, what Muon called).
    Measurement("newton_schulz", "bfloat16", 1, "TinyLlama down 2048x5632", 1.68 / 4.63, KERNELS_PY),
    Measurement("newton_schulz", "bfloat16", 1, "TinyLlama gate/up 5632x2048", 1.24 / 2.89, KERNELS_PY),
    Measurement("newton_schulz", "bfloat16", 1, "Llama-3.2-1B gate/up 8192x2048", 2.09 / 2.84, KERNELS_PY),
    Measurement("newton_schulz", "bfloat16", 1, "Llama-3.2-1B down 2048x8192", 1.55 / 2.83, KERNELS_PY),
    Measurement(
        "newton_schulz",
        "bfloat16",
        1,
        "TinyLlama shapes, one matrix through the dispatcher",
        1 / 2.5,
        MUON_PY,
        "reported as 2.5-3x slower than torch bf16; the better end",
    ),
    Measurement(
        "newton_schulz",
        "bfloat16",
        4,
        "attention q/o stack 4x2048x2048",
        2.26 / 3.36,
        KERNELS_PY,
        "the one like-for-like stack of 4 (torch batched vs Triton batched): torch faster",
    ),
    Measurement(
        "newton_schulz",
        "bfloat16",
        4,
        "4x2048x2048, ms per matrix",
        1.36 / 0.54,
        MUON_PY,
        "the baseline is torch bf16 on one matrix at a time (the benchmark had no batched bf16 torch row)",
    ),
    Measurement(
        "newton_schulz",
        "bfloat16",
        22,
        "whole Muon step, 1.27B parameters: stacks of 22 (one per layer) + the adapter",
        0.129 / 0.115,
        MUON_PY,
        "RETRO_KERNELS=torch 0.129 s vs auto (all Triton then) 0.115 s",
    ),
    # The adapter forward and forward+backward vs cuBLAS addmm with the injection as its bias.
    Measurement("adapter", "bfloat16", 1, "slowest of T 8192 / 32768, forward and forward+backward", 0.45, KERNELS_PY),
    Measurement("adapter", "bfloat16", 1, "fastest of T 8192 / 32768, forward and forward+backward", 0.82, KERNELS_PY),
)


def stack_min(kernel: str, dtype: str) -> int | None:
    """The smallest measured stack (batch > 1) for ``kernel`` in ``dtype``; None if none was measured."""
    batches = [m.batch for m in MEASUREMENTS if m.kernel == kernel and m.dtype == dtype and m.batch > 1]
    return min(batches, default=None)


def shape_class(kernel: str, dtype: str, batch: int) -> tuple[str, str, str] | None:
    """The class a call belongs to, or None when no measurement covers it (``auto`` then runs torch)."""
    if batch == 1:
        return (kernel, dtype, "single")
    smallest = stack_min(kernel, dtype)
    return (kernel, dtype, "stack") if smallest is not None and batch >= smallest else None


def decisions() -> dict[tuple[str, str, str], str]:
    """Every measured class and the backend ``auto`` runs for it: Triton iff the median speedup > 1."""
    rows: dict[tuple[str, str, str], list[float]] = {}
    for m in MEASUREMENTS:
        key = shape_class(m.kernel, m.dtype, m.batch)
        assert key is not None  # a measured batch always has its class
        rows.setdefault(key, []).append(m.speedup)
    return {key: "triton" if statistics.median(s) > 1 else "torch" for key, s in rows.items()}


def auto_backend(kernel: str, dtype: str, batch: int) -> str:
    """``triton`` or ``torch``: what ``auto`` runs for this call on a GPU."""
    key = shape_class(kernel, dtype, batch)
    return decisions().get(key, "torch") if key is not None else "torch"


def markdown() -> list[str]:
    """The measurements and ``auto``'s decision per class as Markdown lines (docs/kernels.md shows them)."""
    lines = [
        "| kernel | dtype | batch | case | torch / Triton | command | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in MEASUREMENTS:
        lines.append(f"| {m.kernel} | {m.dtype} | {m.batch} | {m.case} | {m.speedup:.2f}x | `{m.command}` | {m.note} |")
    lines += ["", "| shape class | rows | median torch / Triton | `auto` runs |", "|---|---|---|---|"]
    for (kernel, dtype, form), backend in decisions().items():
        speedups = [m.speedup for m in MEASUREMENTS if shape_class(m.kernel, m.dtype, m.batch) == (kernel, dtype, form)]
        size = f"stack of >= {stack_min(kernel, dtype)}" if form == "stack" else form
        lines.append(
            f"| {kernel}, {dtype}, {size} | {len(speedups)} | {statistics.median(speedups):.2f}x | {backend} |"
        )
    return lines
