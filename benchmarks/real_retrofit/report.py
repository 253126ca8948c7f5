"""The experiment's report: every measurement in one JSON-able dict, its Markdown tables and two plots."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.common import machine_info, markdown_table
from benchmarks.real_retrofit.metrics import flop_model, mean_spread, smoothed_loss
from benchmarks.real_retrofit.stages import REPO, Stages


def _label(path: Path) -> str:
    return path.name  # retro.eval labels a model by its directory name


def build_report(
    args: argparse.Namespace,
    *,
    gguf: Path,
    seeds: list[int],
    stages: Stages,
    manifests: dict[str, dict],
    docs: dict[str, int],
    repro_json: Path,
    before: dict[str, dict],
    trained: dict[int, dict[str, dict]],
    after: dict[int, dict],
    gsm8k_acc: dict[str, dict],
    shape: str,
    static_src: Path,
    wall: float,
) -> dict:
    """Everything measured, in one JSON-able dict (the Markdown table and the plots are drawn from it).

    `args` the parsed command line; `before` {"gsm8k", "wikitext2"}: eval_losses tables of the fresh
    conversions; `trained` {seed: {"recurrent", "static", "kept_r1": {"model", "records", "summary"}}};
    `after` {seed: {"gsm8k_val", "wikitext2"}: eval_losses tables}; `gsm8k_acc` {name: gsm8k_accuracy entry}.
    """
    rs = [int(r) for r in args.eval_r.split(",")]
    val: dict[str, dict] = {"recurrent": {}, "static": {}, "kept_r1": {}}
    wiki: dict[str, dict] = {"recurrent": {}, "static": {}, "kept_r1": {}}
    for seed in seeds:
        t, a = trained[seed], after[seed]
        for kind in val:
            label = _label(t[kind]["model"])
            val[kind][seed] = {r: run["metrics"]["loss"] for r, run in a["gsm8k_val"][label]["runs"].items()}
            wiki[kind][seed] = {r: run["metrics"]["loss"] for r, run in a["wikitext2"][label]["runs"].items()}

    def across(table: dict, r) -> dict:
        values = [table[s][r] for s in seeds if r in table[s]]
        if not values:
            return {}
        m, half = mean_spread(values)
        return {"mean": m, "half_range": half, "per_seed": values}

    rec_val = {r: across(val["recurrent"], r) for r in rs}
    m = args.max_mean
    gap = [val["recurrent"][s][1] - val["recurrent"][s][m] for s in seeds if m in val["recurrent"][s]]
    seed_spread = [
        max(val["recurrent"][s][r] for s in seeds) - min(val["recurrent"][s][r] for s in seeds)
        for r in (1, m)
        if all(r in val["recurrent"][s] for s in seeds)
    ]
    equal_tokens = {}
    for seed in seeds:
        t = trained[seed]
        steps = {k: t[k]["summary"]["steps"] for k in t}
        upto = min(steps.values())
        window = max(1, min(20, upto // 5))
        equal_tokens[seed] = {
            "step": upto,
            "window": window,
            "train_loss": {k: smoothed_loss(t[k]["records"], upto, window) for k in t},
            "trainer_val_loss_r1_at_recurrent_steps": {
                k: next(
                    (r.get("val_loss_r1") for r in t[k]["records"] if r["step"] == args.steps and "val_loss_r1" in r),
                    None,
                )
                for k in t
            },
            "recurrent_trainer_val_loss_rM": t["recurrent"]["records"][-1].get(f"val_loss_r{m}"),
        }
    before_layers = {}
    for label in before["gsm8k"]:
        c = json.loads((static_src.parent / label / "conversion.json").read_text())
        before_layers[label] = f"{len(c['prelude']) + len(c['block']) + len(c['coda'])} of {c['source_layers']}"
    return {
        "command": "python -m benchmarks.real_retrofit " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
        "wall_s": round(wall, 1),  # this invocation (stages reused from --work take no time)
        "stages_s": round(sum(st["seconds"] for st in stages.records.values()), 1),  # every stage, when it ran
        "machine": machine_info(),
        "versions": _versions(),
        "gguf": str(gguf),
        "settings": {k: v for k, v in vars(args).items()},
        "shape": shape,
        "data": {
            "documents": docs,
            "manifests": {
                k: {"splits": v["splits"], "bos_id": v.get("bos_id"), "eos_id": v.get("eos_id")}
                for k, v in manifests.items()
            },
            "val_tokens": args.eval_batches * args.eval_batch * args.seq_len,
        },
        "reproduce": json.loads(Path(repro_json).read_text()),
        "before": {k: {lbl: v["runs"][1]["metrics"]["loss"] for lbl, v in tbl.items()} for k, tbl in before.items()},
        "before_layers": before_layers,
        "train": {str(s): {k: v["summary"] for k, v in trained[s].items()} for s in seeds},
        "val_loss": {k: {str(s): {str(r): x for r, x in v.items()} for s, v in tbl.items()} for k, tbl in val.items()},
        "wikitext2_after": {
            k: {str(s): {str(r): x for r, x in v.items()} for s, v in tbl.items()} for k, tbl in wiki.items()
        },
        "recurrent_val_across_seeds": {str(r): v for r, v in rec_val.items()},
        "eval_tokens_per_s": {
            kind: {
                str(r): run["n"] / run["seconds"]
                for r, run in after[seeds[0]]["gsm8k_val"][_label(trained[seeds[0]][kind]["model"])]["runs"].items()
            }
            for kind in val
        },  # fmt: skip
        "gain_r1_minus_rM_per_seed": gap,
        "seed_spread_at_r1_and_rM": seed_spread,
        "equal_tokens": {str(s): v for s, v in equal_tokens.items()},
        "gsm8k_accuracy": {
            name: {
                "runs": {
                    str(r): {"exact_match": run["metrics"], "seconds": run["seconds"], "n": run["n"]}
                    for r, run in res["runs"].items()
                },
                "static": res["static"],
            }
            for name, res in gsm8k_acc.items()
        },
        "stages": list(stages.records.values()),
    }


def _versions() -> dict:
    """Library versions and the repository's git commit."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "gguf", "accelerate", "tokenizers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    try:
        out["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        out["git"] = None
    return out


def _fmt(x, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(p: dict) -> str:
    """results.md: the tables of a build_report payload."""
    s = p["settings"]
    m = s["max_mean"]
    seeds = list(p["train"])
    rs = s["eval_r"].split(",")
    lines = [
        f"# Real retrofit: SmolLM2-135M-Instruct (GGUF Q4_1), shape ({p['shape']}), train M = {m}",
        "",
        f"Command: `{p['command']}`; {p['stages_s'] / 60:.1f} min of stages (wall time, each when it ran) on "
        f"{p['machine']['cpu_count']} CPU cores shared with other jobs; "
        f"git {p['versions'].get('git')}; torch {p['versions']['torch']}, "
        f"transformers {p['versions']['transformers']}.",
        f"Seeds {', '.join(seeds)}; {s['steps']} recurrent steps of {s['global_batch']} x {s['seq_len']} tokens; "
        f"val loss on {p['data']['val_tokens']} tokens of the held-out GSM8K train split (5% of the documents).",
        "",
        "## (a) No-drop conversion vs transformers' GGUF model (r = 1)",
        "",
    ]
    rows = []
    for data, e in p["reproduce"]["data"].items():
        for name in ("static", "nodrop"):
            ours = e[name]
            ref = [data, e["tokens"], f"{e['transformers_loss']:.4f}"]
            rows.append([*ref, name, f"{ours['max_abs_dlogits']:.2e}", f"{ours['loss']:.4f}"])
    lines += markdown_table(["data", "tokens", "transformers loss", "model", "max abs dlogits", "retro loss"], rows)
    lines += ["", "## (b) Loss right after surgery (r = 1; identity adapter, so every r gives the same)", ""]
    lines += markdown_table(
        ["model", "layers kept", "GSM8K val", "WikiText-2"],
        [
            [label, kept, f"{p['before']['gsm8k'][label]:.3f}", f"{p['before']['wikitext2'][label]:.3f}"]
            for label, kept in p["before_layers"].items()
        ],
    )
    lines += ["", "## (c-e) After post-training: GSM8K val loss by test recurrence r", ""]
    rows = []
    for kind in ("recurrent", "static", "kept_r1"):
        for seed in seeds:
            t = p["train"][seed][kind]
            v = p["val_loss"][kind][seed]
            w = p["wikitext2_after"][kind][seed]
            cells = [_fmt(v.get(r)) if kind != "static" else (_fmt(v.get("1")) if r == "1" else "") for r in rs]
            wiki = _fmt(w.get(str(m)) if kind == "recurrent" else w.get("1"))
            wiki_note = f"{wiki} (r={m}; r=1 {_fmt(w.get('1'))})" if kind == "recurrent" else wiki
            train = [kind, seed, t["steps"], t["tokens"], f"{t['train_flops'] / 1e15:.3f}"]
            rows.append(train + cells + [wiki_note, f"{t['tokens_per_s']:.0f}", t["peak_rss_mib"]])
    for kind in ("recurrent", "static", "kept_r1"):
        cells = []
        for r in rs:
            values = [p["val_loss"][kind][seed][r] for seed in seeds if r in p["val_loss"][kind][seed]]
            cells.append(f"{statistics.fmean(values):.3f} ± {(max(values) - min(values)) / 2:.3f}" if values else "")
        rows.append([f"{kind}: mean ± half-range over seeds", "", "", "", "", *cells, "", "", ""])
    columns = ["model", "seed", "steps", "tokens", "train PFLOP", *(f"r={r}" for r in rs)]
    lines += markdown_table([*columns, "WikiText-2 after", "tok/s", "peak RSS MiB"], rows)
    lines += [
        "",
        f"Gain of r = {m} over r = 1 per seed: "
        + ", ".join(f"{g:+.3f}" for g in p["gain_r1_minus_rM_per_seed"])
        + "; seed-to-seed spread (max - min) at r = 1 and r = "
        f"{m}: " + ", ".join(f"{x:.3f}" for x in p["seed_spread_at_r1_and_rM"]) + ".",
        "",
    ]
    tps = p["eval_tokens_per_s"]
    lines += [
        f"Eval throughput (retro.eval --task loss, {s['eval_dtype']}, tokens/s, seed {seeds[0]}): recurrent "
        + ", ".join(f"r={r} {v:.0f}" for r, v in tps["recurrent"].items())
        + f"; static {tps['static']['1']:.0f}; kept_r1 r=1 {tps['kept_r1']['1']:.0f}.",
        "",
        "## Equal tokens (same batches): training loss over the last steps every run shares",
        "",
    ]
    rows = []
    for seed, e in p["equal_tokens"].items():
        tl, tv = e["train_loss"], e["trainer_val_loss_r1_at_recurrent_steps"]
        losses = [f"{tl['recurrent']:.3f}", f"{tl['static']:.3f}", f"{tl['kept_r1']:.3f}"]
        val = f"{_fmt(tv['recurrent'])} / {_fmt(tv['static'])} / {_fmt(tv['kept_r1'])}"
        rows.append([seed, e["step"], e["window"], *losses, val])
    val_column = "trainer val r=1 at the recurrent run's last step (recurrent / static / kept_r1)"
    lines += markdown_table(["seed", "up to step", "window", "recurrent", "static", "kept_r1", val_column], rows)
    lines += [
        "",
        f"## GSM8K accuracy (greedy, 1-shot, first {s['gsm8k_limit']} test problems, at most "
        f"{s['gsm8k_max_new_tokens']} new tokens)",
        "",
    ]
    rows = []
    for name, res in p["gsm8k_accuracy"].items():
        for r, run in res["runs"].items():
            em = run["exact_match"]
            accuracy = [f"{100 * em['flexible-extract']:.0f}%", f"{100 * em['strict-match']:.0f}%"]
            rows.append([name, "static" if res["static"] else r, *accuracy, f"{run['seconds']:.0f}"])
    lines += markdown_table(["model", "r", "flexible-extract", "strict-match", "seconds"], rows)
    lines += ["", "## Stages", ""]
    lines += markdown_table(
        ["stage", "seconds", "peak RSS MiB"],
        [[st["stage"], f"{st['seconds']:.0f}", f"{st['peak_rss_mib']:.0f}"] for st in p["stages"]],
    )
    return "\n".join(lines) + "\n"


def plot(p: dict, trained: dict, out: Path) -> None:
    """out/val_loss_vs_r.png and out/train_loss.png from a build_report payload and the runs' records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = p["settings"]["max_mean"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (seed, v) in enumerate(p["val_loss"]["recurrent"].items()):
        rs = sorted(int(r) for r in v)
        ax.plot(
            rs, [v[str(r)] for r in rs], marker="o", color="C0", alpha=0.9 - 0.3 * i, label=f"recurrent, seed {seed}"
        )
    for kind, color in (("static", "C1"), ("kept_r1", "C2")):
        for i, (seed, v) in enumerate(p["val_loss"][kind].items()):
            name = "static (30 layers)" if kind == "static" else "kept layers, r = 1 only"
            ax.axhline(v["1"], color=color, linestyle=["--", ":"][i % 2], label=f"{name}, seed {seed}")
    ax.axvline(m, color="grey", linewidth=0.8, alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"test recurrence r (train mean M = {m}, grey)")
    ax.set_ylabel("GSM8K val loss (nats/token)")
    ax.set_title("SmolLM2-135M retrofit: equal training FLOPs", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "val_loss_vs_r.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for seed, kinds in trained.items():
        for kind, color in (("recurrent", "C0"), ("static", "C1"), ("kept_r1", "C2")):
            records = kinds[kind]["records"]
            flops = kinds[kind]["summary"]["train_flops"] / len(records)  # constant per step for the baselines
            if kind == "recurrent":
                from itertools import accumulate

                fm = flop_model(kinds[kind]["model"], p["settings"]["seq_len"])
                tps = p["settings"]["global_batch"] * p["settings"]["seq_len"]
                xs = list(accumulate(fm.per_token(r["n"], r["k"]) * tps for r in records))
            else:
                xs = [flops * (i + 1) for i in range(len(records))]
            w = 10
            ys = [statistics.fmean(r["loss"] for r in records[max(0, i - w + 1) : i + 1]) for i in range(len(records))]
            ax.plot(
                [x / 1e15 for x in xs],
                ys,
                color=color,
                alpha=0.8 if seed == min(trained) else 0.45,
                label=f"{kind}, seed {seed}",
            )
    ax.set_xlabel("training PFLOP (loop-aware FlopModel)")
    ax.set_ylabel("training loss (10-step running mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "train_loss.png", dpi=120)
    plt.close(fig)
