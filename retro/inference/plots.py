"""Accuracy (or loss) vs test-time recurrence, one line per model and metric (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_results(results: dict, path: str | Path) -> None:
    """Draw every model of a `retro.eval` results dict; static models (no recurrence) are flat lines.

    With adaptive exit the x value is the mean number of passes actually used.
    """
    loss = results["task"] == "loss"
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = ["-", "--", ":", "-."]
    for i, model in enumerate(results["models"]):
        color = f"C{i}"
        for j, metric in enumerate(results["metrics"]):
            label = model["label"] if len(results["metrics"]) == 1 else f"{model['label']} ({metric})"
            scale = 1.0 if loss else 100.0
            runs = model["runs"]
            if model["static"]:
                ax.axhline(
                    runs[0]["metrics"][metric] * scale, color=color, linestyle=styles[j % 4], label=f"{label}, static"
                )
                continue
            xs = [run["mean_passes"] for run in runs]
            ys = [run["metrics"][metric] * scale for run in runs]
            ax.plot(xs, ys, marker="o", color=color, linestyle=styles[j % 4], label=label)
    if not all(model["static"] for model in results["models"]):
        ax.set_xscale("log", base=2)
    ax.set_xlabel(
        "test recurrence r"
        + (" (mean passes used, adaptive exit)" if results["settings"].get("adaptive_exit") is not None else "")
    )
    ax.set_ylabel("validation loss" if loss else f"{results['task']} accuracy (%)")
    ax.set_title(f"{results['task']}: {results['data']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
