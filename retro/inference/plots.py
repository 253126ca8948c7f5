"""Accuracy (or loss) vs test-time recurrence, one line per model and metric (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_results(results: dict, path: str | Path) -> None:
    """Draw every model of a `retro.eval` results dict; static models (no recurrence) are flat lines.

    The x value is the mean number of passes per token actually used: r for fixed-r runs (dots, solid line),
    less for each adaptive exit rule (its own series, crosses, dashed), so an exit rule's quality reads
    against fixed r at the same compute.
    """
    loss = results["task"] == "loss"
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = ["-", "--", ":", "-."]
    scale = 1.0 if loss else 100.0
    adaptive = False
    for i, model in enumerate(results["models"]):
        for j, metric in enumerate(results["metrics"]):
            label = model["label"] if len(results["metrics"]) == 1 else f"{model['label']} ({metric})"
            runs = model["runs"]
            if model["static"]:
                ax.axhline(
                    runs[0]["metrics"][metric] * scale, color=f"C{i}", linestyle=styles[j % 4], label=f"{label}, static"
                )
                continue
            rules = list(dict.fromkeys(run.get("exit") for run in runs))
            for k, rule in enumerate(rules):
                series = [run for run in runs if run.get("exit") == rule]
                xs = [run["mean_passes"] for run in series]
                ys = [run["metrics"][metric] * scale for run in series]
                color = f"C{(i * len(rules) + k) % 10}"
                if rule is None:
                    ax.plot(xs, ys, marker="o", color=color, linestyle=styles[j % 4], label=f"{label}, fixed r")
                else:
                    adaptive = True
                    ax.plot(xs, ys, marker="x", color=color, linestyle="--", label=f"{label}, exit {rule}")
    if not all(model["static"] for model in results["models"]):
        ax.set_xscale("log", base=2)
    ax.set_xlabel("mean recurrent passes per token (fixed r: r)" if adaptive else "test recurrence r")
    ax.set_ylabel("validation loss" if loss else f"{results['task']} accuracy (%)")
    ax.set_title(f"{results['task']}: {results['data']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
