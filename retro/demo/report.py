"""Stage 6 of the demo: results.json, results.md and accuracy.png, and the answers to the paper's
claims computed from the numbers (never written in advance): does accuracy rise with r, does the
recurrent model match the static one at equal training FLOPs, how far past training does it hold.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

TOLERANCE = 0.02  # accuracy differences below 2 points (of ~100 problems per k) count as "equal"
CHANCE = 0.1  # ten possible digits


def environment() -> dict:
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def _recurrent_means(results: dict) -> tuple[list[int], list[float]]:
    means = results["models"]["recurrent"]["mean"]
    rs = sorted(int(r) for r in means)
    return rs, [means[str(r)] for r in rs]


def claims(results: dict) -> dict:
    """The three questions of the issue, answered from the measured accuracies."""
    rs, accs = _recurrent_means(results)
    static = results["models"]["static"]["mean"]["static"]
    pretrained = results["models"]["pretrained"]["mean"]["static"]
    train_mean = float(results["flops"]["recurrent_final_mean"])
    r_train = max([r for r in rs if r <= train_mean] or [rs[0]])
    acc_train = accs[rs.index(r_train)]
    best = max(range(len(rs)), key=lambda i: accs[i])
    beyond = [(r, a) for r, a in zip(rs, accs) if r > r_train]
    holds = [r for r, a in beyond if a >= acc_train - TOLERANCE]
    largest_holding = r_train
    for r, a in beyond:  # the holding range must be contiguous from r_train
        if a < acc_train - TOLERANCE:
            break
        largest_holding = r
    return {
        "accuracy_by_r": dict(zip(map(str, rs), accs)),
        "rises_with_r": accs[rs.index(r_train)] > accs[0] + TOLERANCE,
        "monotone_up_to_train_mean": all(accs[i + 1] >= accs[i] - TOLERANCE for i in range(rs.index(r_train))),
        "train_mean_recurrence": train_mean,
        "r_at_train_mean": r_train,
        "accuracy_at_train_mean": acc_train,
        "best_r": rs[best],
        "best_accuracy": accs[best],
        "static_accuracy": static,
        "pretrained_accuracy": pretrained,
        "recurrent_minus_static_at_train_mean": acc_train - static,
        "recurrent_minus_static_best": accs[best] - static,
        "matches_or_beats_static": acc_train >= static - TOLERANCE,
        "unique_parameters": {
            "recurrent": results["models"]["recurrent"]["unique_parameters"],
            "static": results["models"]["static"]["unique_parameters"],
        },
        "extrapolation": {str(r): a - acc_train for r, a in beyond},
        "holds_up_to_r": largest_holding,
        "holding_beyond_train": holds,
        "tolerance": TOLERANCE,
        "chance": CHANCE,
        # a comparison means something only when some model is clearly above guessing
        "informative": max(static, pretrained, *accs) > CHANCE + 5 * TOLERANCE,
    }


def markdown(results: dict) -> str:
    models, c = results["models"], results["claims"]
    ks = sorted(int(k) for k in models["static"]["accuracy"]["static"])
    head = ["model", "r", *[f"k={k}" for k in ks], "mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(label: str, r: str, scores: dict) -> str:
        cells = [f"{100 * scores[str(k)]:.0f}" for k in ks]
        return f"| {label} | {r} | " + " | ".join(cells) + f" | {100 * sum(scores.values()) / len(scores):.1f} |"

    lines.append(row("pretrained (static, before post-training)", "-", models["pretrained"]["accuracy"]["static"]))
    lines.append(row("static + equal FLOPs", "-", models["static"]["accuracy"]["static"]))
    for r, scores in sorted(models["recurrent"]["accuracy"].items(), key=lambda x: int(x[0])):
        lines.append(row(f"recurrent {tuple(results['settings']['shape'])}", r, scores))
    f = results["flops"]
    text = [
        "Held-out exact-match accuracy (%) by number of steps k and test recurrence r "
        f"(problems per k: {', '.join(f'{k}: {n}' for k, n in results['eval_counts'].items())}; k >= 2 use "
        "operation sequences never trained on, k = 1 are the memorised lookups).",
        "",
        *lines,
        "",
        f"- Post-training FLOPs: recurrent {f['recurrent_flops']:.3g} ({f['recurrent_steps']} steps, mean r "
        f"{f['recurrent_mean_r']:.2f}, max r {f['recurrent_max_r']}), static {f['static_flops']:.3g} "
        f"({f['static_steps']} steps).",
        f"- Unique parameters: recurrent {c['unique_parameters']['recurrent']:,}, static "
        f"{c['unique_parameters']['static']:,}.",
        f"- {summary_text(results)}",
        f"- Wall time {results['wall_seconds']:.0f} s "
        f"({', '.join(f'{k} {v:.0f}' for k, v in results['stage_seconds'].items())}); "
        f"torch {results['torch']}, {results['machine']}.",
    ]
    return "\n".join(text) + "\n"


def summary_text(results: dict) -> str:
    """The claims in one paragraph; a run that is not informative states its numbers and claims nothing."""
    c = results["claims"]
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    by_r = ", ".join(f"r={r}: {pct(a)}" for r, a in c["accuracy_by_r"].items())
    if not c["informative"]:
        return (
            f"NOT INFORMATIVE: every model is within {100 * 5 * TOLERANCE:.0f} points of chance ({pct(CHANCE)}), "
            "so the task was not learned at this budget and no comparison is drawn. "
            f"Measured mean accuracy: recurrent {by_r}; static at equal FLOPs {pct(c['static_accuracy'])}; "
            f"pretrained {pct(c['pretrained_accuracy'])}."
        )
    rise = "rises" if c["rises_with_r"] else "does not rise"
    match = "matches or beats" if c["matches_or_beats_static"] else "falls short of"
    return (
        f"Recurrent mean accuracy {by_r}; it {rise} with r up to the training mean "
        f"(r={c['r_at_train_mean']}). "
        f"At r={c['r_at_train_mean']} it {match} the static model at equal FLOPs "
        f"({pct(c['accuracy_at_train_mean'])} vs "
        f"{pct(c['static_accuracy'])}; best {pct(c['best_accuracy'])} at r={c['best_r']}; pretrained "
        f"{pct(c['pretrained_accuracy'])}). "
        f"Beyond training it stays within {100 * c['tolerance']:.0f} points up to r={c['holds_up_to_r']}."
    )


def figure(results: dict) -> plt.Figure:
    """accuracy.png's figure: mean accuracy vs r (left), accuracy vs k for every r and the static model (right)."""
    models = results["models"]
    rs, accs = _recurrent_means(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(
        rs, [100 * a for a in accs], marker="o", color="C0", label=f"recurrent {tuple(results['settings']['shape'])}"
    )
    left.axhline(100 * models["static"]["mean"]["static"], color="C1", label="static, equal FLOPs")
    left.axhline(
        100 * models["pretrained"]["mean"]["static"], color="gray", linestyle="--", label="pretrained (static)"
    )
    left.axvline(results["claims"]["train_mean_recurrence"], color="gray", linestyle=":", label="training mean r")
    left.set_xscale("log", base=2)
    left.set_xticks(rs, [str(r) for r in rs])
    left.set(
        xlabel="test recurrence r", ylabel="held-out accuracy (%), mean over k", title="accuracy vs test recurrence"
    )
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    ks = sorted(int(k) for k in models["static"]["accuracy"]["static"])
    for i, r in enumerate(rs):
        scores = models["recurrent"]["accuracy"][str(r)]
        right.plot(
            ks,
            [100 * scores[str(k)] for k in ks],
            marker=".",
            color=plt.cm.viridis(i / max(1, len(rs) - 1)),
            label=f"r={r}",
        )
    right.plot(
        ks, [100 * models["static"]["accuracy"]["static"][str(k)] for k in ks], color="C1", linewidth=2, label="static"
    )
    right.axhline(10, color="gray", linestyle=":", linewidth=1, label="chance")
    right.set(xlabel="steps k", ylabel="accuracy (%)", title="by number of steps")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))  # k counts steps: no 1.5 ticks
    right.legend(fontsize=7, ncol=2)
    right.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot(results: dict, path: Path) -> None:
    """Write accuracy.png (see `figure`)."""
    fig = figure(results)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(results: dict, out: Path) -> dict[str, Path]:
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "accuracy.png"}
    paths["json"].write_text(json.dumps(results, indent=2))
    paths["markdown"].write_text(markdown(results))
    plot(results, paths["plot"])
    return paths
