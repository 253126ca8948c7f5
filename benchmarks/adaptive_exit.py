"""Adaptive exit against fixed r on the demo's task model: quality, agreement, FLOPs and tokens/s.

    python -m retro.demo --out demo_out                      # the model (or any earlier demo run)
    python -m benchmarks.adaptive_exit --demo demo_out        # -> benchmarks/results/adaptive_exit/

For fixed r in --fixed and each exit rule in --rules (r_max = --r-max), on the demo's held-out problems:
- accuracy: the answer digit predicted after `=` when the problem is decoded token by token as generation
  decodes (retro.inference.generate.teacher_forced: EOS is the prompt, every later token one decode step, so
  the exit rule decides each token's depth, the answer's included); loss: mean cross entropy of every predicted
  token, and of the answer alone; mean passes over those predictions;
- agreement: greedy continuations of --gen-tokens tokens from the problems, identical tokens vs fixed r_max (%);
- FLOPs per decoded token (FlopModel.decode_token at the mean passes, context 16) relative to fixed r_max;
- tokens/s of `generate` at batch 1 and batch 16 (--gen-tokens new tokens, no early stop; all configurations
  timed in turn, round after round, best of --repeats rounds), over --speed-prompts prompts (batch after batch);
- the same with depth batching (retro.inference.depth_batching.generate_stream: the prompts as one queue through
  1 or 16 slots, each row at its own depth), and the share of slot-ticks that did work at 16 slots (the rest is
  the queue's tail, when fewer than 16 requests are left).
Writes results.json, results.md and quality.png (accuracy against mean passes, fixed r beside the rules).
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


def depth_speeds(model, rows: list[list[int]], configs: dict[str, GenerationSettings], batch: int, repeats: int):
    """({config: tokens/s}, {config: share of slot-ticks that ran a pass}) with depth batching: all rows as one
    queue through `batch` slots; timed in turn as `speeds` times the plain batches."""

    def run(settings):
        return lambda: list(generate_stream(model, rows, settings, batch))

    times = time_interleaved({name: run(s) for name, s in configs.items()}, repeats, warmup=1)
    tokens = len(rows) * next(iter(configs.values())).max_new_tokens
    use = {}
    for name, settings in configs.items():
        stats = DepthStats()
        for _ in generate_stream(model, rows, settings, batch, stats=stats):
            pass
        use[name] = stats.work / (stats.ticks * batch)
    return {name: tokens / min(t) for name, t in times.items()}, use


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    demo = Path(args.demo)
    model = load_model(demo / "recurrent", None, "cpu", torch.float32)
    tokenizer = load_tokenizer(demo / "recurrent", add_bos=False, config=model.config)
    problems = load_problems(demo, tokenizer)
    configs: list[tuple[int, ExitRule | None]] = [(r, None) for r in args.fixed]
    configs += [(args.r_max, parse_exit_rule(rule, args.min_r)) for rule in args.rules]
    agree_rows, speed_rows = prompts(problems, args.agree_prompts), prompts(problems, args.speed_prompts)
    rows, reference, generation = [], None, {}
    for r, rule in configs:
        settings = GenerationSettings(max_new_tokens=args.gen_tokens, num_recurrences=r, adaptive_exit=rule)
        began = time.perf_counter()
        row = {"config": f"fixed r={r}" if rule is None else f"{rule} (r<={r})", "r": r, "exit": rule and str(rule)}
        row.update(quality(model, problems, settings))
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
        print(f"{row['config']}: acc {row['accuracy']:.3f} passes {row['mean_passes']:.2f} ({row['seconds']} s)")
    b1 = speeds(model, speed_rows[:4], generation, 1, args.repeats)
    b16 = speeds(model, speed_rows, generation, 16, args.repeats)
    d1, _ = depth_speeds(model, speed_rows[:4], generation, 1, args.repeats)
    d16, use = depth_speeds(model, speed_rows, generation, 16, args.repeats)
    for row in rows:
        name = row["config"]
        row["tok_s_b1"], row["tok_s_b16"] = b1[name], b16[name]
        row["tok_s_b1_depth"], row["tok_s_b16_depth"], row["slot_use_b16"] = d1[name], d16[name], use[name]
    if reference is None:
        raise ValueError(f"--fixed must include --r-max {args.r_max}: agreement is measured against it")
    base = next(r for r in rows if r["exit"] is None and r["r"] == args.r_max)
    for row in rows:
        row["agreement"] = float((row.pop("tokens") == reference).float().mean())
        row["flops_vs_rmax"] = row["flops_per_token"] / base["flops_per_token"]
        row["speedup_b16"] = row["tok_s_b16"] / base["tok_s_b16"]
        row["speedup_b1"] = row["tok_s_b1"] / base["tok_s_b1"]
        row["depth_speedup_b16"] = row["tok_s_b16_depth"] / base["tok_s_b16"]
        row["depth_speedup_b16_vs_depth"] = row["tok_s_b16_depth"] / base["tok_s_b16_depth"]
    return {
        "command": "python -m benchmarks.adaptive_exit " + " ".join(args.argv),
        "machine": machine_info(),
        "problems": {k: int(ids.size(0)) for k, (ids, _) in problems.items()},
        "settings": {k: v for k, v in vars(args).items() if k != "argv"},
        "rows": rows,
    }


COLUMNS = ["config", "mean passes", "accuracy (%)", "loss", "answer loss", "agree (%)", "FLOPs/tok vs r_max"]
COLUMNS += ["tok/s b1", "tok/s b16", "b16 speed-up"]
DEPTH_COLUMNS = ["config", "mean passes", "agree (%)", "tok/s b1", "tok/s b1 depth", "tok/s b16", "tok/s b16 depth"]
DEPTH_COLUMNS += ["slot use b16", "depth b16 vs fixed r_max b16", "vs fixed r_max depth-batched"]


def table(results: dict) -> list[str]:
    return markdown_table(
        COLUMNS,
        [
            [
                r["config"],
                f"{r['mean_passes']:.2f}",
                f"{100 * r['accuracy']:.1f}",
                f"{r['loss']:.4f}",
                f"{r['answer_loss']:.4f}",
                f"{100 * r['agreement']:.1f}",
                f"{r['flops_vs_rmax']:.2f}",
                f"{r['tok_s_b1']:.0f}",
                f"{r['tok_s_b16']:.0f}",
                f"{r['speedup_b16']:.2f}x",
            ]
            for r in results["rows"]
        ],
    )


def depth_table(results: dict) -> list[str]:
    """Depth batching beside plain batches: tokens/s, slot use, speed-up against fixed r_max (plain and depth)."""
    return markdown_table(
        DEPTH_COLUMNS,
        [
            [
                r["config"],
                f"{r['mean_passes']:.2f}",
                f"{100 * r['agreement']:.1f}",
                f"{r['tok_s_b1']:.0f}",
                f"{r['tok_s_b1_depth']:.0f}",
                f"{r['tok_s_b16']:.0f}",
                f"{r['tok_s_b16_depth']:.0f}",
                f"{100 * r['slot_use_b16']:.0f}%",
                f"{r['depth_speedup_b16']:.2f}x",
                f"{r['depth_speedup_b16_vs_depth']:.2f}x",
            ]
            for r in results["rows"]
        ],
    )


def markdown(results: dict) -> str:
    """results.md: the command, the table, then depth batching against plain batches."""
    n = results["settings"]["speed_prompts"]
    return (
        f"`{results['command']}`\n\n"
        + "\n".join(table(results))
        + f"\n\nDepth batching ({n} prompts as one queue through 1 or 16 slots) against plain batches of the same"
        + " prompts:\n\n"
        + "\n".join(depth_table(results))
        + "\n"
    )


def plot(results: dict, path: Path) -> None:
    """retro.eval's plot: accuracy against mean passes, fixed r as one series, each criterion as another."""
    runs = [
        {
            "exit": r["exit"] and r["exit"].split(":")[0],
            "mean_passes": r["mean_passes"],
            "metrics": {"accuracy": r["accuracy"]},
        }
        for r in results["rows"]
    ]
    runs.sort(key=lambda run: (run["exit"] or "", run["mean_passes"]))
    data = {"task": "demo", "data": "held-out problems, teacher-forced adaptive decoding", "metrics": ["accuracy"]}
    plot_results({**data, "models": [{"label": "demo recurrent", "static": False, "runs": runs}], "settings": {}}, path)


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", required=True, help="a retro.demo output directory (recurrent/, eval.jsonl)")
    p.add_argument("--r-max", type=int, default=8)
    p.add_argument("--fixed", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    p.add_argument("--rules", type=lambda s: s.split(","), default=["state:0.01", "state:0.03", "kl:1e-3", "kl:1e-2"])
    p.add_argument("--min-r", type=int, default=1)
    p.add_argument("--gen-tokens", type=int, default=16)
    p.add_argument("--agree-prompts", type=int, default=64)
    p.add_argument("--speed-prompts", type=int, default=64, help="prompts timed at batch 16 (the first 4 at batch 1)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "adaptive_exit"))
    args = p.parse_args(argv)
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
