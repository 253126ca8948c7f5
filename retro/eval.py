"""`python -m retro.eval`: task accuracy or validation loss of retro checkpoints at several test recurrences.

    python -m retro.eval --model ckpt/recurrent --model ckpt/static --task gsm8k \\
        --data gsm8k/test.jsonl --recurrences 1,2,4,8,16,32 --out eval/gsm8k

writes results.json (per-recurrence metrics and per-example records with the full prompt, like lm-eval's
--log_samples), results.md (a table) and <task>.png (metric vs r, one line per model; a static checkpoint
is a flat line). --data is a local jsonl (GSM8K: question/answer; MATH: problem/solution, MATH-500's
problem/answer too), a directory of them (or of the original MATH release's json files), a hub dataset
`hf:NAME[:CONFIGS]` read through `datasets` (e.g. hf:EleutherAI/hendrycks_math: the 7 subjects, 5,000
problems), or, for --task loss, a directory of prepared token shards.

The defaults are the paper's lm-eval settings (docs/eval.md): 1-shot, BOS added, greedy, at most 256 new
tokens, prompts left-truncated so prompt + generation fit --max-length 1024, GSM8K as lm-eval's
gsm8k_cot_sean and MATH as minerva_math, scored like lm-eval (tests/unit/test_eval_oracle.py).

The initial state s0 is drawn from the checkpoint's `state_init` (the paper's truncated normal by
default) with a generator seeded by --seed, so a run is reproducible; --state-init overrides it
(zeros or embed make the forward deterministic, independent of batch composition).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

import torch

from retro.hf.output_dir import check_apart
from retro.inference.evaluate import EvalSettings, check_loss_data, default_device, evaluate_model, exit_rules
from retro.inference.task_base import LM_EVAL_VERSIONS
from retro.inference.tasks import TASKS
from retro.model.config import STATE_INITS


def parse_recurrences(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; empty, non-integer or non-positive values are errors."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"--recurrences needs at least one positive integer (e.g. 1,2,4,8), got {text!r}")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--recurrences must be comma-separated integers, got {text!r}") from None
    bad = [v for v in values if v < 1]
    if bad:
        raise ValueError(f"--recurrences values must be >= 1, got {bad} in {text!r}")
    return sorted(set(values))


def markdown_table(results: dict) -> str:
    metrics = results["metrics"]
    unit = "" if results["task"] == "loss" else " (%)"
    head = ["model", "r", "exit", "mean passes", *[m + unit for m in metrics], "n", "tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in results["models"]:
        for run in model["runs"]:
            values = [
                f"{run['metrics'][m]:.4f}" if results["task"] == "loss" else f"{100 * run['metrics'][m]:.1f}"
                for m in metrics
            ]
            r = "static" if model["static"] else str(run["recurrences"])
            rule = run.get("exit") or "fixed"
            speed = f"{run['tokens_per_s']:.1f}" if "tokens_per_s" in run else "-"
            lines.append(
                f"| {model['label']} | {r} | {rule} | {run['mean_passes']:.2f} | "
                + " | ".join(values)
                + f" | {run['n']} | {speed} |"
            )
    return "\n".join(lines) + "\n"


def _labels(paths: list[str]) -> list[str]:
    names = [Path(p).name or str(p) for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    return EvalSettings(**{f.name: getattr(args, f.name) for f in fields(EvalSettings)})


def _print_run(entry: dict, run: dict) -> None:
    r = "static" if entry["static"] else run["recurrences"]
    shown = ", ".join(f"{m}={v:.4f}" for m, v in run["metrics"].items())
    rule = f"  exit {run['exit']}" if run.get("exit") else ""
    speed = f"  {run['tokens_per_s']:.1f} tok/s" if "tokens_per_s" in run else ""
    print(f"{entry['label']}  r={r}{rule}  mean passes {run['mean_passes']:.2f}  {shown}{speed}", flush=True)


def run(args: argparse.Namespace) -> dict:
    recurrences = parse_recurrences(args.recurrences)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0 <= args.readout_share <= 1:
        raise ValueError(f"--readout-share must be in [0, 1], got {args.readout_share}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.max_length and args.task != "loss" and args.max_length <= args.max_new_tokens:
        raise ValueError(f"--max-length {args.max_length} must exceed --max-new-tokens {args.max_new_tokens}")
    if args.adaptive_exit is not None:
        exit_rules(settings_from_args(args))  # a bad rule is refused before any model loads
    if args.task == "loss":
        if not Path(args.data).is_dir():
            raise FileNotFoundError(f"--task loss needs a directory of prepared shards; {args.data} is not a directory")
        for path in args.model:
            check_loss_data(path, args.data)  # before any weight is read
        task, metrics = None, ("loss",)
    else:
        task = TASKS[args.task](
            args.data, args.limit, args.fewshot, args.fewshot_data, lm_eval_version=args.lm_eval_version
        )
        metrics = task.metrics
    settings = settings_from_args(args)
    results = {
        "task": args.task,
        "data": str(args.data),
        "metrics": list(metrics),
        "models": [],
        "settings": {k: v for k, v in vars(args).items() if k not in ("model", "out", "force", "argv")},
        "command": "python -m retro.eval " + " ".join(shlex.quote(a) for a in args.argv),
        "torch": torch.__version__,
        "machine": platform.platform(),
    }
    for path, label in zip(args.model, _labels(args.model)):
        results["models"].append(evaluate_model(path, label, task, args.data, recurrences, settings, _print_run))
    return results


def check_out(out_dir: Path, force: bool, inputs: dict[str, Path] | None = None) -> None:
    """--out must be a new or empty directory, or --force must say its results may be replaced; and it
    may not be, hold or lie inside an input (`inputs`: {what: path}, the models and data evaluated)."""
    check_apart(out_dir, inputs or {})
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir} is a file, not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(
            f"--out {out_dir} is not empty; pass --force to replace its results.json, results.md and plot, "
            "or choose another --out"
        )


def write_outputs(results: dict, out_dir: Path) -> dict[str, Path]:
    """results.json, results.md and <task>.png, written whole into a temporary sibling directory first, then
    moved into `out_dir` (the whole directory renamed when `out_dir` is new or empty): a crash while writing
    leaves `out_dir` as it was."""
    from retro.inference.plots import plot_results

    names = {"json": "results.json", "markdown": "results.md", "plot": f"{results['task']}.png"}
    out_dir = Path(os.path.abspath(out_dir))  # "." and "a/.." have a name and a parent to stage beside
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        (staging / names["json"]).write_text(json.dumps(results, indent=2))
        (staging / names["markdown"]).write_text(markdown_table(results))
        plot_results(results, staging / names["plot"])
        staging.chmod(0o777 & ~_umask())  # mkdtemp's 0700 -> what mkdir would have made
        fresh = not os.path.lexists(out_dir) or (
            out_dir.is_dir() and not out_dir.is_symlink() and not any(out_dir.iterdir())
        )
        if fresh:
            os.replace(staging, out_dir)  # one rename: all of the results or none
        else:  # --force onto earlier results: each file replaced by a rename, results.json last
            for name in (names["markdown"], names["plot"], names["json"]):
                os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {key: out_dir / name for key, name in names.items()}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m retro.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", action="append", required=True, help="retro checkpoint directory (repeat for several models)"
    )
    p.add_argument(
        "--task",
        required=True,
        choices=[*TASKS, "loss"],
        help="gsm8k (lm-eval's gsm8k_cot_sean), math (minerva_math), or loss: validation cross entropy on "
        "prepared shards",
    )
    p.add_argument(
        "--data",
        required=True,
        help="jsonl file, directory of jsonl/json files or hf:NAME[:CONFIGS] (gsm8k, math); shard directory (loss)",
    )
    p.add_argument(
        "--recurrences", default="1,2,4,8,16,32", help="comma-separated test recurrences (max r with --adaptive-exit)"
    )
    p.add_argument("--limit", type=int, default=None, help="first N problems (loss: N batches)")
    p.add_argument("--fewshot", type=int, default=1, help="number of exemplars in the prompt (the paper: 1)")
    p.add_argument(
        "--fewshot-data", default=None, help="jsonl to take the first --fewshot exemplars from (default: lm-eval's)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="prompts generated together, left-padded (--task loss: rows of --seq-len tokens per forward) (default: 8)",
    )
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation budget (lm-eval's max_gen_toks)")
    p.add_argument(
        "--max-length",
        type=int,
        default=1024,
        help="prompt + generation budget in tokens: prompts keep their last (max-length - max-new-tokens) tokens, "
        "as lm-eval's max_length (the paper: 1024); 0 = no truncation",
    )
    p.add_argument(
        "--add-bos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start every prompt with BOS (lm-eval's add_bos_token=True, as the paper ran it)",
    )
    p.add_argument(
        "--lm-eval-version",
        choices=LM_EVAL_VERSIONS,
        default=LM_EVAL_VERSIONS[0],
        help="whose minerva_math exemplars and answer normalisation --task math reproduces (the paper's lock file: "
        "0.4.11); GSM8K is the same in both",
    )
    p.add_argument(
        "--adaptive-exit",
        default=None,
        metavar="RULES",
        help="per-token exit, r = each --recurrences value as the maximum: comma-separated rules, each "
        "{kl,state,entropy}:THRESHOLD (a bare number is a KL threshold) or 'fixed' (a fixed-r run beside them), "
        "e.g. state:0.05,kl:1e-3,fixed",
    )
    p.add_argument(
        "--adaptive-min-r",
        type=int,
        default=1,
        metavar="N",
        help="no token exits before N passes",
    )
    p.add_argument(
        "--depth-batching",
        action="store_true",
        help="generation tasks on recurrent models: each row decodes at its own depth (rows that exit go on to their "
        "next token while others iterate) and a queue of all prompts refills freed rows; --batch-size is the number "
        "of rows. Completions equal one-by-one decoding (also with a random s0)",
    )
    p.add_argument(
        "--readout-share",
        type=float,
        default=0.5,
        metavar="F",
        help="with --depth-batching: rows whose token exited wait until this share of the rows waits, then one coda "
        "and head read them all out (0: read out every pass; 1: wait for every row). Each read-out costs the coda "
        "and head weights whatever its rows, so waiting pays where weights set the time; outputs are the same",
    )
    p.add_argument(
        "--share-kv-cache", action="store_true", help="keep only the last pass's block K/V (r x less memory)"
    )
    p.add_argument("--state-init", choices=list(STATE_INITS), default=None, help="override the checkpoint's s0 init")
    p.add_argument("--seed", type=int, default=0, help="seed of s0 draws (and sampling)")
    p.add_argument("--seq-len", type=int, default=1024, help="--task loss: tokens per row")
    p.add_argument(
        "--device",
        default=default_device(),
        help="torch device the models run on (default: cuda when available, else cpu)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype the weights are loaded and run in (default: float32)",
    )
    p.add_argument(
        "--out",
        default="eval_out",
        help="directory for results.json, results.md and <task>.png, created if missing; it must be new or empty "
        "unless --force (default: eval_out)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty --out, replacing its results.json, results.md and <task>.png (other files "
        "there are kept); the results are written whole to a temporary sibling directory first, then moved in",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = list(argv)
    try:
        inputs = {f"--model {path}": Path(path) for path in args.model if Path(path).exists()}
        if args.data and Path(args.data).exists():
            inputs["--data"] = Path(args.data)
        check_out(Path(args.out), args.force, inputs)
        results = run(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as error:
        print(f"retro.eval: error: {error}", file=sys.stderr)
        return 2
    paths = write_outputs(results, Path(args.out))
    print(Path(paths["markdown"]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
