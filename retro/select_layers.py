"""`python -m retro.select_layers`: which source layers to keep as prelude / recurrent block / coda.

Runs the source model (fp32, CPU) over calibration windows of prepared shards, measures Block Influence and
the angular distance between layer inputs with forward hooks, ranks every (prelude, block, coda) cut of a
--shape or --budget by the angular distance across its dropped spans, and optionally measures the loss at
r = 1 of the best cuts on held-out windows. Each row's --layers string goes to `python -m retro.convert`.
See docs/select_layers.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from retro.data.shards import TokenShards, check_tokenizer_matches
from retro.hf.archs import architecture_for
from retro.hf.conversion import load_source_config, parse_shape
from retro.hf.gguf import open_gguf
from retro.hf.layer_metrics import LayerMetrics, collect_layer_metrics, kept_layer_losses
from retro.hf.layer_proposals import (
    Scored,
    budget_shapes,
    dropped_spans,
    enumerate_candidates,
    paper_row,
    rank,
    three_segment_knees,
)
from retro.hf.output_dir import check_output_dir, staged_output
from retro.hf.surgery import plan_from_shape
from retro.training.progress import Progress

PROG = "retro.select_layers"


def progress(label: str, tokens: int):
    """The project's progress rule (a bar on a terminal, else a line every 10 s) as a per-batch callback."""
    return Progress(tokens, prog=PROG, label=label, unit="tokens").update


def load_source(model: str, gguf_file: str | None):
    """(config, where, from_pretrained kwargs) of a checkpoint directory or a GGUF file; no weights read."""
    gguf = open_gguf(model, gguf_file)
    if gguf is None:
        config, _ = load_source_config(Path(model))
        return config, model, {}
    architecture_for(gguf.config.model_type)
    return gguf.config, gguf.path.parent, {"gguf_file": gguf.path.name}


def windows(shards: TokenShards, seq_len: int, first: int, count: int, batch: int, vocab: int) -> list[torch.Tensor]:
    """Batches of windows first..first+count-1: seq_len + 1 tokens (inputs + shifted labels), stride seq_len."""
    out = np.empty((count, seq_len + 1), dtype=np.int64)
    for i in range(count):
        shards.read((first + i) * seq_len, seq_len + 1, out=out[i])
    if count and int(out.max()) >= vocab:  # a shard corrupted without changing its size
        row, col = divmod(int(out.argmax()), seq_len + 1)
        raise shards.out_of_vocabulary((first + row) * seq_len + col, int(out.max()), vocab)
    return list(torch.from_numpy(out).split(batch))


def check_tokenizer(shards: TokenShards, vocab: int, where, load_kwargs: dict, size_only: bool) -> None:
    """The data's ids must fit the embedding; with a tokenizer beside the weights, its vocabulary must match too."""
    check_tokenizer_matches(shards, vocab)
    if size_only:
        return
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **load_kwargs)
    except Exception:  # whatever the cause, there is no tokenizer to compare with
        print(f"{PROG}: note: the model has no tokenizer; checked the vocabulary size only", file=sys.stderr)
        return
    check_tokenizer_matches(shards, tokenizer)


def check_request(args: argparse.Namespace, config, shards: TokenShards) -> tuple[list, int, int]:
    """Shapes, calibration and held-out window counts; every error before any weight is read."""
    if args.budget is not None:
        shapes = budget_shapes(config.num_hidden_layers, args.budget)
    else:
        shapes = [parse_shape(args.shape)]
        plan_from_shape(config.num_hidden_layers, *shapes[0])  # convert's own checks and messages
    for name in ("seq_len", "calibration_tokens", "batch_size", "top"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.measure < 0:
        raise ValueError(f"--measure must be >= 0, got {args.measure}")
    limit = getattr(config, "max_position_embeddings", None)
    if limit and args.seq_len > limit:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings {limit}")
    calib = args.calibration_tokens // args.seq_len
    held = (args.measure_tokens or args.calibration_tokens) // args.seq_len if args.measure else 0
    for name, count in (("calibration", calib), ("measure", held if args.measure else 1)):
        if count == 0:
            raise ValueError(f"--{name}-tokens must be at least --seq-len {args.seq_len}")
    need = (calib + held) * args.seq_len + 1
    if shards.num_tokens < need:
        raise ValueError(
            f"{shards.directory} split {args.split!r} has {shards.num_tokens} tokens; {calib} calibration"
            + (f" + {held} held-out" if held else "")
            + f" windows of {args.seq_len} need {need}: lower --calibration-tokens/--measure-tokens or --seq-len"
        )
    return shapes, calib, held


def format_table(rows: list[Scored], shown: list[int], losses: dict) -> str:
    lines = [f"{'rank':>4}  {'shape':<9} {'--layers':<18} {'dropped':<16} {'proxy':>7} {'BI sum':>7} "]
    lines[0] += f"{'blk io':>7} {'loss r=1':>9}"
    for i in shown:
        s, c = rows[i], rows[i].candidate
        loss = losses.get(c.layers_arg)
        dropped = ",".join(map(str, c.plan.dropped(c.num_layers))) or "none"
        lines.append(
            f"{i + 1:>4}  {','.join(map(str, c.shape)):<9} {c.layers_arg:<18} {dropped:<16} {s.proxy:>7.4f} "
            f"{s.bi_dropped:>7.4f} {s.block_io:>7.4f} {'-' if loss is None else f'{loss:.4f}':>9}"
            + ("  <- paper's rule" if c.paper_rule else "")
            + (f"  (+{len(s.equivalent)} splits with the same drops)" if s.equivalent else "")
        )
    return "\n".join(lines)


def plot(metrics: LayerMetrics, best: Scored, paper: Scored, knees: tuple[int, int] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers, c = metrics.num_layers, best.candidate
    stage = {**{i: "C0" for i in c.plan.prelude}, **{i: "C3" for i in c.plan.block}, **{i: "C2" for i in c.plan.coda}}
    paper_dropped = paper.candidate.plan.dropped(n_layers)
    fig, (ax_bi, ax_d1, ax_map) = plt.subplots(1, 3, figsize=(15, 4.2))
    ax_bi.bar(range(n_layers), metrics.block_influence, color=[stage.get(i, "lightgrey") for i in range(n_layers)])
    top = max(metrics.block_influence + [1e-9])
    ax_bi.plot(paper_dropped, [top * 1.05] * len(paper_dropped), "kx", label="dropped by the paper's rule")
    for color, label in (("C0", "prelude"), ("C3", "block"), ("C2", "coda"), ("lightgrey", "dropped")):
        ax_bi.bar([0], [0], color=color, label=f"{label} (rank 1)")
    ax_bi.set(title=f"Block Influence; rank 1 = {c.layers_arg}", xlabel="layer", ylabel="BI")
    ax_bi.legend(loc="center right", fontsize=7)
    ax_d1.plot(range(n_layers), [metrics.distance(i, 1) for i in range(n_layers)], "o-")
    for b in knees or ():
        ax_d1.axvline(b - 0.5, color="grey", linestyle=":")
    ax_d1.set(title="d(l, 1): one layer's angular distance (dotted: knees)", xlabel="layer l", ylabel="d(l, 1)")
    grid = np.full((n_layers, n_layers + 1), np.nan)
    for a in range(n_layers + 1):
        for n in range(1, n_layers - a + 1):
            grid[n - 1, a] = metrics.distance(a, n)
    image = ax_map.imshow(grid, origin="lower", aspect="auto", extent=(-0.5, n_layers + 0.5, 0.5, n_layers + 0.5))
    fig.colorbar(image, ax=ax_map, label="d(l, n)")
    for row, marker, label in ((best, "o", "rank 1"), (paper, "x", "paper's rule")):
        spans = dropped_spans(row.candidate.plan.dropped(n_layers))
        ax_map.plot([a for a, _ in spans], [n for _, n in spans], marker, color="red", mfc="none", label=label)
    ax_map.set(title="d(l, n): skip layers l..l+n-1 (marks: dropped spans)", xlabel="first layer l", ylabel="n")
    ax_map.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    inputs = {"the source model": Path(args.model), "--data": Path(args.data)}
    own_only = out.is_dir() and {p.name for p in out.iterdir()} <= {"selection.json", "selection.png"}
    check_output_dir(out, args.force or own_only, inputs)  # an earlier selection alone is replaced without --force
    config, where, load_kwargs = load_source(args.model, args.gguf_file)
    num_layers, vocab = config.num_hidden_layers, config.vocab_size
    shards = TokenShards(args.data, split=args.split)
    shapes, calib, held = check_request(args, config, shards)
    check_tokenizer(shards, vocab, where, load_kwargs, args.allow_tokenizer_mismatch)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(where, config=config, dtype=torch.float32, **load_kwargs).eval()
    data = windows(shards, args.seq_len, 0, calib, args.batch_size, vocab)
    metrics = collect_layer_metrics(model, [b[:, :-1] for b in data], progress("calibration", calib * args.seq_len))
    rows = rank(enumerate_candidates(num_layers, shapes), metrics.angular, metrics.block_influence)
    paper = paper_row(rows)
    knees = three_segment_knees([metrics.distance(i, 1) for i in range(num_layers)]) if num_layers >= 3 else None
    todo = sorted(set(range(min(args.measure, len(rows)))) | ({paper} if args.measure else set()))
    losses = {}
    if todo:
        held_out = [(b[:, :-1], b[:, 1:]) for b in windows(shards, args.seq_len, calib, held, args.batch_size, vocab)]
        kept = {
            "source": list(range(num_layers)),
            **{rows[i].candidate.layers_arg: rows[i].candidate.plan.kept for i in todo},
        }
        losses = kept_layer_losses(model, kept, held_out, lambda name: progress(f"loss of {name}", held * args.seq_len))
    shown = sorted(set(range(min(args.top, len(rows)))) | {paper} | set(todo))
    result = {
        "model": str(args.model),
        "num_layers": num_layers,
        "settings": {k: v for k, v in vars(args).items() if k not in ("model",)},
        "calibration": {"split": args.split, "windows": [0, calib], "tokens": metrics.tokens},
        "measure": {"windows": [calib, calib + held], "tokens": held * args.seq_len} if held else None,
        "metrics": metrics.to_json(),
        "knees": list(knees) if knees else None,
        "paper_rank": paper + 1,
        "source_loss": losses.get("source"),
        "candidates": [
            {"rank": i + 1, **r.to_json(), "loss_r1": losses.get(r.candidate.layers_arg)} for i, r in enumerate(rows)
        ],
    }
    result["table"] = format_table(rows, shown, losses)
    with staged_output(out) as tmp:
        (tmp / "selection.json").write_text(json.dumps(result, indent=2, allow_nan=True))
        plot(metrics, rows[0], rows[paper], knees, tmp / "selection.png")
    return result


def summary(result: dict) -> str:
    head = [f"{result['model']}: {result['num_layers']} layers, {result['calibration']['tokens']} calibration tokens"]
    if result["knees"]:
        b1, b2 = result["knees"]
        head.append(f"knees of d(l,1): layers 0-{b1 - 1} | {b1}-{b2 - 1} | {b2}-{result['num_layers'] - 1}")
    if result["source_loss"] is not None:
        head.append(
            f"source loss (no layer dropped): {result['source_loss']:.4f} on {result['measure']['tokens']} "
            "held-out tokens"
        )
    return "\n".join(head + [result["table"]])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m {PROG}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="local Hugging Face checkpoint directory or a .gguf file")
    p.add_argument("--gguf-file", help="read this GGUF file inside the --model directory (needs retro[gguf])")
    p.add_argument("--data", required=True, help="prepared shard directory (python -m retro.data.prepare)")
    p.add_argument("--split", default="val", help="split of --data to read (default val)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--shape", help="P,R,C: rank every position of an R-layer block between prelude and coda")
    group.add_argument("--budget", type=int, help="U kept layers: rank every split P+R+C = U and every position")
    p.add_argument("--calibration-tokens", type=int, default=32768, help="tokens the metrics average over")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward")
    p.add_argument("--measure", type=int, default=0, help="measure the r = 1 loss of the top K rows and the paper's")
    p.add_argument("--measure-tokens", type=int, help="held-out tokens after the calibration ones (default: as many)")
    p.add_argument("--top", type=int, default=10, help="rows printed (the paper's rule row is always printed)")
    p.add_argument("--out", default="select_layers_out", help="directory for selection.json and selection.png")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out that is not a selection output")
    p.add_argument("--allow-tokenizer-mismatch", action="store_true", help="check only that the ids fit the vocab")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(summary(result))
    source = f"--model {args.model}" + (f" --gguf-file {args.gguf_file}" if args.gguf_file else "")
    print(
        f"wrote {Path(args.out) / 'selection.json'} and selection.png; convert a row with: python -m retro.convert "
        f"{source} --layers {result['candidates'][0]['layers']} --out DIR"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
