"""Forgetting and layer choice on a real model: SmolLM2-135M-Instruct retrofitted as (6,10,6) on 2 CPU cores.

    python -m benchmarks.distill_and_layers            # ~1 h here; reuses benchmarks.real_retrofit's work dir

Two questions, each against the paper's (6,10,6) recipe of benchmarks.real_retrofit (Muon, 1-sqrt to M = 4,
20 steps x 2,048 GSM8K tokens, 2 gloo ranks), at equal steps, two seeds:
  1. Distillation: the same run with the frozen source model (all 30 layers) as teacher, loss =
     (1 - a) CE + a T^2 KL, a = 0.5, T = 1 (fixed beforehand). Forgetting = WikiText-2 loss after
     post-training (general text, never trained on); the task = held-out GSM8K loss. Step time side by
     side: short runs with and without the teacher, interleaved.
  2. Layers: python -m retro.select_layers on GSM8K train tokens ranks (6,10,6) layer choices by angular
     distance and measures the r = 1 loss of the top rows on held-out train windows; the best measured
     one (the proposal) against the paper's rule (first 6, last 6, the 10 before them): post-surgery loss at
     r = 1, then the same post-training and evaluation.
Writes benchmarks/results/distill_and_layers/: results.json, results.md, losses.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS
from benchmarks.real_retrofit.stages import PY, Settings, Stages, convert_model, eval_losses, find_gguf, prepare_data
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
    p.add_argument("--gguf", help="SmolLM2-135M-Instruct GGUF (default: found as benchmarks.real_retrofit does)")
    p.add_argument("--work", default="runs/real_retrofit", help="scratch dir, shared with benchmarks.real_retrofit")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--eval-batches", type=int, default=16, help="val batches of 4 x 256 tokens per loss")
    p.add_argument("--timing-steps", type=int, default=6, help="steps of each side-by-side timing run")
    p.add_argument("--calibration-tokens", type=int, default=32768, help="retro.select_layers' GSM8K train tokens")
    p.add_argument("--measure", type=int, default=5, help="proposals whose post-surgery loss select_layers measures")
    p.add_argument("--fresh", action="store_true")
    return p.parse_args(argv)


def select_layers(stages: Stages, args, gguf: Path, data: Path) -> dict:
    """retro.select_layers on GSM8K *train* windows (the evaluations use the val split); its JSON."""
    out = stages.work / "select_layers"
    cmd = [
        *PY,
        "-m",
        "retro.select_layers",
        "--model",
        str(gguf),
        "--data",
        str(data),
        "--split",
        "train",
        "--shape",
        SHAPE,
        "--calibration-tokens",
        str(args.calibration_tokens),
        "--seq-len",
        "256",
        "--measure",
        str(args.measure),
        "--out",
        str(out),
        "--force",
    ]
    stages.run("select_layers", cmd, [out / "selection.json"])
    return json.loads((out / "selection.json").read_text())


def loss(table: dict, model: Path, r: int) -> float:
    return table[model.name]["runs"][r]["metrics"]["loss"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    stages = Stages(Path(args.work).resolve(), args.fresh)
    settings = Settings(eval_batches=args.eval_batches)
    seeds = [int(s) for s in args.seeds.split(",")]
    gguf = find_gguf(args.gguf)
    teacher = convert_model(stages, gguf, "static", static=True)  # the unmodified source: every layer kept
    paper = convert_model(stages, gguf, "shape_6106", shape=SHAPE)
    data = prepare_data(stages, teacher)
    kd = [f"--distill.teacher={teacher}", f"--distill.alpha={args.alpha}", f"--distill.temperature={args.temperature}"]

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

    # 2. which layers: proposals on train tokens, the top one converted and post-trained as the paper's
    selection = select_layers(stages, args, gguf, data.gsm8k)
    # the proposal: the lowest measured r = 1 loss (held-out train windows) among the top rows by the proxy
    measured = [c for c in selection["candidates"][: args.measure] if c.get("loss_r1") is not None]
    top = min(measured, key=lambda c: c["loss_r1"]) if measured else selection["candidates"][0]
    proposed = paper if top["paper_rule"] else convert_model(stages, gguf, "proposed_6106", layers=top["layers"])
    surgery = {
        k: eval_losses(stages, settings, f"dl_surgery_{k}", [teacher, paper, proposed], d, "1")
        for k, d in data.shards.items()
    }
    if proposed != paper:
        post_train("layers", "proposed", proposed, RECIPE)
    models = [runs[v][s]["model"] for v in runs for s in seeds]
    after = {
        "gsm8k": eval_losses(stages, settings, "dl_after_gsm8k", models, data.gsm8k, GSM8K_R),
        "wikitext2": eval_losses(stages, settings, "dl_after_wikitext2", models, data.wikitext2, WIKI_R),
    }

    payload = report(args, seeds, selection, top, surgery, after, runs, timing, teacher, paper, proposed)
    payload["wall_s"] = round(time.perf_counter() - started)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / "results.md").write_text(markdown(payload))
    plot(payload, out / "losses.png")
    print(markdown(payload))
    return 0


def report(args, seeds, selection, top, surgery, after, runs, timing, teacher, paper, proposed) -> dict:
    def per_seed(variant: str, table: dict, r: int) -> list[float]:
        return [loss(table, runs[variant][s]["model"], r) for s in seeds]

    post = {}
    for variant in runs:
        post[variant] = {
            "gsm8k_val": {r: per_seed(variant, after["gsm8k"], int(r)) for r in GSM8K_R.split(",")},
            "wikitext2": {r: per_seed(variant, after["wikitext2"], int(r)) for r in WIKI_R.split(",")},
            "final_ce": [
                runs[variant][s]["records"][-1].get("ce", runs[variant][s]["records"][-1]["loss"]) for s in seeds
            ],
            "median_step_s": [
                statistics.median(r["step_time_s"] for r in runs[variant][s]["records"][1:]) for s in seeds
            ],
        }
    return {
        "settings": {
            "shape": SHAPE,
            "steps": args.steps,
            "seeds": seeds,
            "alpha": args.alpha,
            "temperature": args.temperature,
            "eval_tokens": args.eval_batches * 4 * 256,
            "calibration_tokens": args.calibration_tokens,
            "recipe": RECIPE,
        },
        "layers": {
            "paper_rule": next(c for c in selection["candidates"] if c["paper_rule"]),
            "proposed": top,
            "top_candidates": selection["candidates"][: max(5, args.measure)],
            "source_loss": selection.get("source_loss"),
        },
        "surgery_r1": {
            k: {"source": loss(t, teacher, 1), "paper": loss(t, paper, 1), "proposed": loss(t, proposed, 1)}
            for k, t in surgery.items()
        },
        "post_training": post,
        "timing": {v: {"median_step_s": statistics.median(t), "steps": len(t)} for v, t in timing.items()}
        | {"ratio": statistics.median(timing["distill"]) / statistics.median(timing["plain"])},
    }


def _pair(values: list[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def markdown(p: dict) -> str:
    s, post = p["settings"], p["post_training"]
    lines = [
        "# Distillation and layer choice: SmolLM2-135M-Instruct as (6,10,6)",
        "",
        f"Command: `python -m benchmarks.distill_and_layers` ({p.get('wall_s', 0) / 60:.0f} min). {s['steps']} steps "
        f"x 2,048 GSM8K tokens, Muon, 1-sqrt to M = 4, 2 gloo ranks; seeds {s['seeds']} (values seed 0 / seed 1). "
        f"Losses on {s['eval_tokens']:,} held-out tokens each (GSM8K val split; WikiText-2 test articles never "
        "trained on), bf16.",
        "",
        "## After post-training, at equal steps",
        "",
        "| run | GSM8K val r=1 | r=4 | r=32 | WikiText-2 r=1 | r=4 | median step s |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {
        "paper": "paper's layers, CE",
        "distill": f"paper's layers, distilled (a={s['alpha']}, T={s['temperature']})",
        "layers": "proposed layers, CE",
    }
    for variant, v in post.items():
        g, w = v["gsm8k_val"], v["wikitext2"]
        lines.append(
            f"| {names[variant]} | {_pair(g['1'])} | {_pair(g['4'])} | {_pair(g['32'])} | {_pair(w['1'])} | "
            f"{_pair(w['4'])} | {_pair(v['median_step_s'])} |"
        )
    sr = p["surgery_r1"]
    lines += [
        "",
        "## Post-surgery loss at r = 1 (before any training)",
        "",
        "| model | GSM8K val | WikiText-2 |",
        "|---|---|---|",
        f"| source (30 layers) | {sr['gsm8k']['source']:.3f} | {sr['wikitext2']['source']:.3f} |",
        f"| paper's rule {p['layers']['paper_rule']['layers']} | {sr['gsm8k']['paper']:.3f} | "
        f"{sr['wikitext2']['paper']:.3f} |",
        f"| proposed {p['layers']['proposed']['layers']} | {sr['gsm8k']['proposed']:.3f} | "
        f"{sr['wikitext2']['proposed']:.3f} |",
        "",
        "## The teacher's cost",
        "",
        f"Median step time, short runs interleaved on the same cores: {p['timing']['plain']['median_step_s']:.2f} s "
        f"without, {p['timing']['distill']['median_step_s']:.2f} s with the teacher "
        f"(x{p['timing']['ratio']:.2f}; {p['timing']['plain']['steps']} steps each).",
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
