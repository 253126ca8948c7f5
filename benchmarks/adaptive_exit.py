"""Adaptive exit against fixed r: quality, agreement, FLOPs and tokens/s, on the demo's task model or a real retrofit.

    python -m retro.demo --out demo_out                      # the model (or any earlier demo run)
    python -m benchmarks.adaptive_exit --demo demo_out        # -> benchmarks/results/adaptive_exit/
    python -m benchmarks.adaptive_exit --model RUN_EXPORT --data GSM8K_SHARDS --out DIR   # a real retrofit

For fixed r in --fixed and each exit rule in --rules (r_max = --r-max):
- quality, every token decoded as generation decodes it (retro.inference.generate.teacher_forced: the first
  token is the prompt, every later token one decode step, so the exit rule decides each token's depth).
  --demo: accuracy of the answer digit after `=` on the demo's held-out problems, the loss of every predicted
  token and of the answer alone. --model: the validation loss of the first --val-batches x --val-rows windows
  of --seq-len tokens of the shards' val split (retro.eval --task loss's batches); mean passes over the
  predictions;
- agreement: greedy continuations of --gen-tokens tokens, identical tokens vs fixed r_max (%), from the demo's
  problems or the first --prompt-len tokens of the val windows;
- FLOPs per decoded token (FlopModel.decode_token at the mean passes, context 16) relative to fixed r_max;
- tokens/s of `generate` at batch 1 and batch 16 (--gen-tokens new tokens, no early stop; all configurations
  timed in turn, round after round, best of --repeats rounds), over --speed-prompts prompts (batch after batch);
- the same with depth batching (retro.inference.depth_batching.generate_stream, --readout-share: the prompts as
  one queue through 1 or 16 slots, each row at its own depth), and the share of slot-ticks that did work at
  16 slots (the rest is the queue's tail, when fewer than 16 requests are left);
- at equal quality: each row against the fastest fixed r (plain batches of 16) whose quality is at least as
  good (accuracy >= the row's with --demo, loss <= the row's with --model).
Writes results.json, results.md and quality.png (quality against mean passes, fixed r beside the rules).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.common import RESULTS, machine_info, markdown_table, time_interleaved
from retro.inference.adaptive import ExitRule, parse_exit_rule
from retro.inference.depth_batching import DepthStats, generate_stream
from retro.inference.generate import GenerationSettings, generate, left_pad, teacher_forced
from retro.inference.loading import load_model, load_tokenizer
from retro.inference.plots import plot_results
from retro.model.flops import FlopModel


def load_problems(demo: Path, tokenizer) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{k: (ids [n, L] = EOS, prompt tokens, answer; answer ids [n])}: the demo's held-out problems by steps."""
    groups: dict[int, list[list[int]]] = defaultdict(list)
    for line in (demo / "eval.jsonl").read_text().splitlines():
        row = json.loads(line)
        ids = [tokenizer.eos_token_id, *tokenizer(row["prompt"])["input_ids"]]
        groups[int(row["steps"])].append([*ids, tokenizer.convert_tokens_to_ids(row["answer"])])
    return {k: (torch.tensor(rows), torch.tensor([r[-1] for r in rows])) for k, rows in sorted(groups.items())}


def quality(model, problems, settings: GenerationSettings) -> dict:
    """Accuracy of the answer and losses, each token decoded as generation would."""
    nll = answer_nll = passes = tokens = correct = count = 0.0
    for ids, _ in problems.values():
        labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
        scored = teacher_forced(model, ids, labels, settings, prefix=1)
        counted = labels != -100
        nll += float(scored.nll.sum())
        tokens += float(counted.sum())
        passes += float(scored.passes[counted].double().sum())
        answer_nll += float(scored.nll[:, -2].sum())
        correct += float(scored.correct[:, -2].sum())
        count += ids.size(0)
    return {
        "accuracy": correct / count,
        "loss": nll / tokens,
        "answer_loss": answer_nll / count,
        "mean_passes": passes / tokens,
    }


def prompts(problems, n: int) -> list[list[int]]:
    """The first n problems' prompts (EOS + problem, no answer), spread over all k."""
    rows = [row[:-1].tolist() for ids, _ in problems.values() for row in ids]
    step = max(1, len(rows) // n)
    return rows[::step][:n]


def speeds(model, rows: list[list[int]], configs: dict[str, GenerationSettings], batch: int, repeats: int):
    """{config: generated tokens per second}, `batch` prompts at a time; the configs are timed in turn, round
    after round (time_interleaved), so the shared machine's noise hits them alike; the best round counts."""
    batches = [left_pad(rows[i : i + batch], 0) for i in range(0, len(rows), batch)]

    def run(settings):
        return lambda: [generate(model, ids, mask, settings) for ids, mask in batches]

    times = time_interleaved({name: run(s) for name, s in configs.items()}, repeats, warmup=1)
    tokens = len(rows) * next(iter(configs.values())).max_new_tokens  # no EOS given: every row runs to the end
    return {name: tokens / min(t) for name, t in times.items()}


def depth_speeds(
    model, rows: list[list[int]], configs: dict[str, GenerationSettings], batch: int, repeats: int, share: float
):
    """({config: tokens/s}, {config: share of slot-ticks that ran a pass}) with depth batching: all rows as one
    queue through `batch` slots; timed in turn as `speeds` times the plain batches."""

    def run(settings):
        return lambda: list(generate_stream(model, rows, settings, batch, readout_share=share))

    times = time_interleaved({name: run(s) for name, s in configs.items()}, repeats, warmup=1)
    tokens = len(rows) * next(iter(configs.values())).max_new_tokens
    use = {}
    for name, settings in configs.items():
        stats = DepthStats()
        for _ in generate_stream(model, rows, settings, batch, stats=stats, readout_share=share):
            pass
        use[name] = stats.work / (stats.ticks * batch)
    return {name: tokens / min(t) for name, t in times.items()}, use


def val_quality(model, batches: list[dict], settings: GenerationSettings) -> dict:
    """Validation loss and mean passes, each token decoded as generation would (as `retro.eval --task loss`
    with --adaptive-exit)."""
    nll = tokens = passes = 0.0
    for batch in batches:
        scored = teacher_forced(model, batch["input_ids"], batch["labels"], settings, prefix=1)
        counted = batch["labels"] != -100
        nll += float(scored.nll[counted].double().sum())
        tokens += float(counted.sum())
        passes += float(scored.passes[counted].double().sum())
    return {"loss": nll / tokens, "mean_passes": passes / tokens}


def load_source(args: argparse.Namespace):
    """(model, quality(settings) -> dict, agreement prompts, speed prompts, what the quality is measured on)."""
    dtype = getattr(torch, args.dtype)
    if args.demo:
        demo = Path(args.demo)
        model = load_model(demo / "recurrent", None, "cpu", dtype)
        tokenizer = load_tokenizer(demo / "recurrent", add_bos=False, config=model.config)
        problems = load_problems(demo, tokenizer)
        what = {"problems": {k: int(ids.size(0)) for k, (ids, _) in problems.items()}}
        return (
            model,
            lambda s: quality(model, problems, s),
            prompts(problems, args.agree_prompts),
            prompts(problems, args.speed_prompts),
            what,
        )
    from retro.data.loader import build_val_batches

    model = load_model(args.model, None, "cpu", dtype)
    batches = list(build_val_batches(args.data, args.seq_len, args.val_rows, 0, 1, args.val_batches))
    windows = [row[: args.prompt_len].tolist() for batch in batches for row in batch["input_ids"]]
    if len(windows) < max(args.agree_prompts, args.speed_prompts):
        raise SystemExit(f"{len(windows)} val windows; raise --val-batches or --val-rows for the prompts asked for")
    what = {"val_tokens": sum(int((b["labels"] != -100).sum()) for b in batches)}
    return (
        model,
        lambda s: val_quality(model, batches, s),
        windows[: args.agree_prompts],
        windows[: args.speed_prompts],
        what,
    )


def equal_quality_speedup(rows: list[dict], row: dict) -> tuple[str | None, float | None]:
    """The fastest fixed r (plain batches of 16) whose quality is at least the row's, and the row's speed
    against it (its best of plain and depth-batched)."""
    better = [
        f
        for f in rows
        if f["exit"] is None and (f["accuracy"] >= row["accuracy"] if "accuracy" in row else f["loss"] <= row["loss"])
    ]
    if not better:
        return None, None
    best = max(better, key=lambda f: f["tok_s_b16"])
    return best["config"], max(row["tok_s_b16"], row["tok_s_b16_depth"]) / best["tok_s_b16"]


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model, measure, agree_rows, speed_rows, what = load_source(args)
    configs: list[tuple[int, ExitRule | None]] = [(r, None) for r in args.fixed]
    configs += [(args.r_max, parse_exit_rule(rule, args.min_r)) for rule in args.rules]
    rows, reference, generation = [], None, {}
    for r, rule in configs:
        settings = GenerationSettings(max_new_tokens=args.gen_tokens, num_recurrences=r, adaptive_exit=rule)
        began = time.perf_counter()
        row = {"config": f"fixed r={r}" if rule is None else f"{rule} (r<={r})", "r": r, "exit": rule and str(rule)}
        row.update(measure(settings))
        ids, mask = left_pad(agree_rows, 0)
        tokens = generate(model, ids, mask, settings).tokens
        if rule is None and r == args.r_max:
            reference = tokens
        row["tokens"] = tokens
        fm = FlopModel.from_config(model.config, 16)
        readouts = row["mean_passes"] if rule is not None and rule.needs_readout else 1
        row["flops_per_token"] = fm.decode_token(row["mean_passes"], readouts)
        row["seconds"] = round(time.perf_counter() - began, 1)
        generation[row["config"]] = settings
        rows.append(row)
        shown = f"acc {row['accuracy']:.3f} " if "accuracy" in row else ""
        print(f"{row['config']}: {shown}loss {row['loss']:.4f} passes {row['mean_passes']:.2f} ({row['seconds']} s)")
    if reference is None:
        raise ValueError(f"--fixed must include --r-max {args.r_max}: agreement is measured against it")
    b1 = speeds(model, speed_rows[:4], generation, 1, args.repeats)
    b16 = speeds(model, speed_rows, generation, 16, args.repeats)
    d1, _ = depth_speeds(model, speed_rows[:4], generation, 1, args.repeats, args.readout_share)
    d16, use = depth_speeds(model, speed_rows, generation, 16, args.repeats, args.readout_share)
    for row in rows:
        name = row["config"]
        row["tok_s_b1"], row["tok_s_b16"] = b1[name], b16[name]
        row["tok_s_b1_depth"], row["tok_s_b16_depth"], row["slot_use_b16"] = d1[name], d16[name], use[name]
    sweep = share_sweep(model, speed_rows, generation, args) if args.share_sweep else None
    base = next(r for r in rows if r["exit"] is None and r["r"] == args.r_max)
    for row in rows:
        row["agreement"] = float((row.pop("tokens") == reference).float().mean())
        row["flops_vs_rmax"] = row["flops_per_token"] / base["flops_per_token"]
        row["speedup_b16"] = row["tok_s_b16"] / base["tok_s_b16"]
        row["speedup_b1"] = row["tok_s_b1"] / base["tok_s_b1"]
        row["depth_speedup_b16"] = row["tok_s_b16_depth"] / base["tok_s_b16"]
        row["depth_speedup_b16_vs_depth"] = row["tok_s_b16_depth"] / base["tok_s_b16_depth"]
    for row in rows:
        row["equal_quality_fixed"], row["speedup_vs_equal_quality"] = equal_quality_speedup(rows, row)
    return {
        "command": "python -m benchmarks.adaptive_exit " + " ".join(args.argv),
        "machine": machine_info(),
        "source": str(args.demo or args.model),
        **what,
        "settings": {k: v for k, v in vars(args).items() if k != "argv"},
        "rows": rows,
        **({"share_sweep": sweep} if sweep else {}),
    }


def share_sweep(model, rows: list[list[int]], generation: dict[str, GenerationSettings], args) -> dict:
    """Depth-batched tokens/s and read-outs at 16 slots for one configuration at each --sweep-shares value,
    timed in turn (the configuration is a --fixed r or a --rules rule, named as in the tables)."""
    name = next((n for n in generation if n.startswith(args.share_sweep)), None)
    if name is None:
        raise SystemExit(f"--share-sweep {args.share_sweep!r} is none of the configurations: {', '.join(generation)}")
    settings, tokens = generation[name], len(rows) * generation[name].max_new_tokens

    def run(share):
        return lambda: list(generate_stream(model, rows, settings, 16, readout_share=share))

    times = time_interleaved({share: run(share) for share in args.sweep_shares}, args.repeats, warmup=1)
    out = {"config": name, "shares": []}
    for share in args.sweep_shares:
        stats = DepthStats()
        list(generate_stream(model, rows, settings, 16, stats=stats, readout_share=share))
        speed = tokens / min(times[share])
        out["shares"].append({"share": share, "tok_s_b16_depth": speed, "readouts": stats.readouts})
    return out


def table(results: dict) -> list[str]:
    demo = "accuracy" in results["rows"][0]
    columns = ["config", "mean passes"] + (["accuracy (%)"] if demo else []) + ["loss"]
    columns += (["answer loss"] if demo else []) + ["agree (%)", "FLOPs/tok vs r_max", "tok/s b1", "b1 speed-up"]
    columns += ["tok/s b16", "b16 speed-up", "fastest fixed r as good", "speed-up vs it"]
    lines = []
    for r in results["rows"]:
        cells = [r["config"], f"{r['mean_passes']:.2f}"] + ([f"{100 * r['accuracy']:.1f}"] if demo else [])
        cells += [f"{r['loss']:.4f}"] + ([f"{r['answer_loss']:.4f}"] if demo else [])
        cells += [f"{100 * r['agreement']:.1f}", f"{r['flops_vs_rmax']:.2f}", f"{r['tok_s_b1']:.1f}"]
        cells += [f"{r['speedup_b1']:.2f}x", f"{r['tok_s_b16']:.1f}", f"{r['speedup_b16']:.2f}x"]
        equal = r.get("equal_quality_fixed")
        cells += [equal or "none", "-" if equal is None else f"{r['speedup_vs_equal_quality']:.2f}x"]
        lines.append(cells)
    return markdown_table(columns, lines)


def depth_table(results: dict) -> list[str]:
    """Depth batching beside plain batches: tokens/s, slot use, speed-up against fixed r_max (plain and depth)."""
    return markdown_table(
        DEPTH_COLUMNS,
        [
            [
                r["config"],
                f"{r['mean_passes']:.2f}",
                f"{100 * r['agreement']:.1f}",
                f"{r['tok_s_b1']:.1f}",
                f"{r['tok_s_b1_depth']:.1f}",
                f"{r['tok_s_b16']:.1f}",
                f"{r['tok_s_b16_depth']:.1f}",
                f"{100 * r['slot_use_b16']:.0f}%",
                f"{r['depth_speedup_b16']:.2f}x",
                f"{r['depth_speedup_b16_vs_depth']:.2f}x",
            ]
            for r in results["rows"]
        ],
    )


DEPTH_COLUMNS = ["config", "mean passes", "agree (%)", "tok/s b1", "tok/s b1 depth", "tok/s b16", "tok/s b16 depth"]
DEPTH_COLUMNS += ["slot use b16", "depth b16 vs fixed r_max b16", "vs fixed r_max depth-batched"]


def markdown(results: dict) -> str:
    """results.md: the command, the table, then depth batching against plain batches."""
    settings = results["settings"]
    n, share = settings["speed_prompts"], settings.get("readout_share", 0.0)
    return (
        f"`{results['command']}`\n\n"
        + "\n".join(table(results))
        + f"\n\nDepth batching ({n} prompts as one queue through 1 or 16 slots, readout share {share}) against plain"
        + " batches of the same prompts:\n\n"
        + "\n".join(depth_table(results))
        + "\n"
        + sweep_text(results)
    )


def sweep_text(results: dict) -> str:
    sweep = results.get("share_sweep")
    if not sweep:
        return ""
    rows = [[f"{s['share']:g}", f"{s['tok_s_b16_depth']:.1f}", s["readouts"]] for s in sweep["shares"]]
    table = markdown_table(["readout share", "tok/s b16 depth", "read-outs"], rows)
    title = f"Read-out share, {sweep['config']} depth-batched through 16 slots, timed in turn:"
    return f"\n{title}\n\n" + "\n".join(table) + "\n"


def plot(results: dict, path: Path) -> None:
    """retro.eval's plot: quality (accuracy with --demo, loss with --model) against mean passes, fixed r as one
    series, each criterion as another."""
    metric = "accuracy" if "accuracy" in results["rows"][0] else "loss"
    runs = [
        {
            "exit": r["exit"] and r["exit"].split(":")[0],
            "mean_passes": r["mean_passes"],
            "metrics": {metric: r[metric]},
        }
        for r in results["rows"]
    ]
    runs.sort(key=lambda run: (run["exit"] or "", run["mean_passes"]))
    if metric == "accuracy":
        data = {"task": "demo", "data": "held-out problems, teacher-forced adaptive decoding"}
    else:
        data = {"task": "loss", "data": f"val split of {results['settings']['data']}, teacher-forced adaptive decoding"}
    label = "demo recurrent" if metric == "accuracy" else Path(results["source"]).name
    model = {"label": label, "static": False, "runs": runs}
    plot_results({**data, "metrics": [metric], "models": [model], "settings": {}}, path)


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--demo", help="a retro.demo output directory (recurrent/, eval.jsonl)")
    source.add_argument("--model", help="a recurrent retro model (a retro.export output); needs --data")
    p.add_argument("--data", help="with --model: a retro.data.prepare shard dir whose val split gives loss and prompts")
    p.add_argument("--seq-len", type=int, default=128, help="with --model: tokens per val window")
    p.add_argument("--val-rows", type=int, default=8, help="with --model: windows per val batch")
    p.add_argument("--val-batches", type=int, default=4, help="with --model: val batches")
    p.add_argument("--prompt-len", type=int, default=32, help="with --model: prompt tokens (a val window's start)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--r-max", type=int, default=8)
    p.add_argument("--fixed", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    p.add_argument("--rules", type=lambda s: s.split(","), default=["state:0.01", "state:0.03", "kl:1e-3", "kl:1e-2"])
    p.add_argument("--min-r", type=int, default=1)
    p.add_argument("--gen-tokens", type=int, default=16)
    p.add_argument("--agree-prompts", type=int, default=64)
    p.add_argument("--speed-prompts", type=int, default=64, help="prompts timed at batch 16 (the first 4 at batch 1)")
    p.add_argument("--readout-share", type=float, default=0.0, help="depth batching's readout_share")
    p.add_argument("--share-sweep", help="a configuration (e.g. state:0.05) to time depth-batched at each share")
    p.add_argument("--sweep-shares", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.25, 0.5, 1.0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "adaptive_exit"))
    args = p.parse_args(argv)
    if args.model and not args.data:
        p.error("--model needs --data (a shard dir with a val split)")
    args.argv = list(argv)
    results = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "quality.png")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
