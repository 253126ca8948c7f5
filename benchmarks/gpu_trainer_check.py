"""The real trainer end to end on one GPU, eager and compiled: the trainer step of gpu_check.sh.

    python -m benchmarks.gpu_trainer_check --work DIR --out trainer.json [--budget SECONDS] [--dry-run]

What it runs, from inside DIR (never from the repository root):

1. a random-weight TinyLlama-shaped Llama (transformers ``LlamaConfig``: h 2048, I 5632, 22 layers,
   32/4 heads, vocab 32000), saved as a Hugging Face directory with a word-level tokenizer of the
   corpus below;
2. ``retro.convert --shape 4,8,4 --adapter-init default``, and
3. ``retro.data.prepare`` on ``benchmarks/data/trainer_corpus.txt`` (0.9 MB of generated
   English-like text carried in the repository), both through their ``main`` in this process (two
   interpreter start-ups fewer);
4. as separate processes, ``torchrun --nproc_per_node 1 -m retro.train --config
   configs/paper/tinyllama-484-math-m32.toml`` with ``--train.global_batch=8 --train.micro_batch=8
   --recurrence.curriculum=none`` (every micro-batch draws r around 32, k <= 8), 10 steps, once with
   ``--parallel.compile=false`` and once with ``true``. Also overridden, because a 10-step run needs
   it: warmup and decay of 1 step (the config's 125 and 30,000 exceed the run), and one validation
   batch at r = 1 (every run validates and saves after its last step; neither is timed).

It reports the medians of tokens/s, loop-aware MFU and peak memory (``max_memory_allocated``, in
1e9 bytes) over steps 3-10 of each run's metrics.jsonl, the compiled/eager ratio and the largest
relative loss difference between the runs, next to the H200 figures of 2026-12-04 (issue 26), as
JSON and a printed table. Exit 1 if a stage fails or the budget runs out (the JSON says which).

``--dry-run``: the same stages on CPU (gloo), with a tiny model of the same 22 layers (so
``--shape 4,8,4`` applies), sequences of 64 tokens, batch 2, 2 steps (the median of step 2), fp32.
The compiled run traces every layer through Dynamo and AOTAutograd but skips Inductor's code
generation (``TORCH_COMPILE_OVERRIDE_BACKENDS=>=0:aot_eager``, torch >= 2.13; older versions
ignore it and run Inductor, ~1 minute more on 2 cores). It keeps the step from rotting between GPU
runs; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "benchmarks" / "data" / "trainer_corpus.txt"
CONFIG = REPO / "configs" / "paper" / "tinyllama-484-math-m32.toml"
# Measured on one H200, 2026-12-04 (torch 2.11, triton 3.6; issue 26): medians of steps 3-10.
H200_2026_12_04 = {
    "eager": {"tokens_per_s": 11.8e3, "mfu": 0.408, "peak_memory_gb": 57.3},
    "compiled": {"tokens_per_s": 14.3e3, "mfu": 0.489, "peak_memory_gb": 50.6},
}


@dataclass(frozen=True)
class Setup:
    """The model shape and the run's size; `vocab` None = the tokenizer's size."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int | None
    steps: int
    skip: int  # steps left out of the medians (start-up, compilation)
    global_batch: int
    micro_batch: int
    overrides: tuple[str, ...] = ()


GPU = Setup(2048, 5632, 22, 32, 4, 32000, steps=10, skip=2, global_batch=8, micro_batch=8)
DRY_RUN = Setup(
    64,
    176,
    22,
    8,
    1,
    None,
    steps=2,
    skip=1,
    global_batch=2,
    micro_batch=2,
    overrides=("data.seq_len=64", "train.dtype=fp32", "data.num_workers=0"),
)


class StageFailed(RuntimeError):
    pass


class Runner:
    """Runs each stage in the work directory, timed; a subprocess gets what is left of the budget."""

    def __init__(self, work: Path, budget: float) -> None:
        self.work, self.deadline = work, time.monotonic() + budget
        self.seconds: dict[str, float] = {}
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        self.env = {**os.environ, "PYTHONPATH": path}  # this checkout's retro and benchmarks, from any directory

    def inline(self, name: str, fn, *args) -> None:
        """A stage in this process (``fn`` returns an exit code, or None)."""
        started = time.monotonic()
        try:
            code = fn(*args)
        except (Exception, SystemExit) as error:  # argparse exits; any error fails the stage, not the check
            raise StageFailed(f"{name}: {type(error).__name__}: {error}") from None
        self.seconds[name] = round(time.monotonic() - started, 1)
        if code not in (0, None):
            raise StageFailed(f"{name}: exited {code}")

    def __call__(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        left = self.deadline - time.monotonic()
        if left < 1:
            raise StageFailed(f"{name}: no time left in the budget")
        started = time.monotonic()
        log = self.work / f"{name}.log"
        with log.open("w") as out:
            # Its own session, so a timeout ends torchrun's workers too, not only torchrun.
            proc = subprocess.Popen(
                [sys.executable, *args], cwd=self.work, env={**self.env, **(env or {})}, stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            try:
                returncode = proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise StageFailed(f"{name}: ran out of the budget after {left:.0f} s (log: {log})") from None
        self.seconds[name] = round(time.monotonic() - started, 1)
        if returncode != 0:
            tail = log.read_text()[-3000:]
            raise StageFailed(f"{name}: exited {returncode} (log: {log})\n{tail}")


def build_source(directory: Path, setup: Setup, device: str) -> None:
    """A word-level tokenizer of the corpus and a random Llama of `setup`'s shape, saved together."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted(set(w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(CORPUS.read_text())))
    vocab = {"[UNK]": 0, "[EOS]": 1} | {w: i + 2 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=setup.vocab or len(vocab),
        hidden_size=setup.hidden,
        intermediate_size=setup.intermediate,
        num_hidden_layers=setup.layers,
        num_attention_heads=setup.heads,
        num_key_value_heads=setup.kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16 if device == "cuda" else torch.float32).save_pretrained(directory)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the runs below are other processes: leave them the GPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(setup: Setup, model: Path, data: Path, out: Path, compiled: bool) -> list[str]:
    overrides = [
        f"model.path={model}",
        f"data.train={data}",
        f"train.out_dir={out}",
        f"train.steps={setup.steps}",
        f"train.global_batch={setup.global_batch}",
        f"train.micro_batch={setup.micro_batch}",
        "recurrence.curriculum=none",
        "recurrence.draws_per_step=0",  # one micro-batch per step: the config's 2 groups would not divide it
        "train.val_batches=1",
        "train.val_recurrences=[1]",
        "checkpoint.keep_last=1",
        "optim.warmup_steps=1",  # the config's 125 and 30,000 exceed a 10-step run
        "optim.decay_steps=1",
        f"parallel.compile={str(compiled).lower()}",
        *setup.overrides,
    ]
    return [
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=1",
        f"--master_port={free_port()}",
        "-m",
        "retro.train",
        "--config",
        str(CONFIG),
        *(f"--{o}" for o in overrides),
    ]


def summarise(metrics: Path, skip: int) -> dict:
    """Medians over the steps after the first `skip`, and every step's loss."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    kept = [r for r in records if r["step"] > skip]
    if not kept:
        raise StageFailed(f"{metrics}: no step after step {skip}")
    peaks = [r["peak_memory_bytes"] for r in kept if r.get("peak_memory_bytes") is not None]
    return {
        "steps": [r["step"] for r in kept],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in kept),
        "mfu": statistics.median(r["mfu"] for r in kept),
        "peak_memory_gb": statistics.median(peaks) / 1e9 if peaks else None,
        "mean_r": statistics.mean(r["r"] for r in kept),
        "losses": {r["step"]: r["loss"] for r in records},
    }


def compare(runs: dict) -> dict:
    eager, compiled = runs["eager"], runs["compiled"]
    shared = sorted(set(eager["losses"]) & set(compiled["losses"]))
    diffs = [abs(compiled["losses"][s] - eager["losses"][s]) / abs(eager["losses"][s]) for s in shared]
    return {
        "tokens_per_s_ratio": compiled["tokens_per_s"] / eager["tokens_per_s"],
        "max_loss_rel_diff": max(diffs) if diffs else None,
        "losses_agree_to_4_digits": bool(diffs) and max(diffs) < 5e-4,
    }


def table(result: dict) -> str:
    def cell(value, fmt):
        return format(value, fmt) if value is not None else "n/a"

    lines = [
        f"{'variant':<10} {'tokens/s':>10} {'MFU':>7} {'peak GB':>8}   | H200 2026-12-04: {'tokens/s':>9} {'MFU':>6} "
        f"{'peak GB':>8}"
    ]
    for name, run in result["runs"].items():
        ref = H200_2026_12_04[name]
        lines.append(
            f"{name:<10} {run['tokens_per_s']:>10,.0f} {run['mfu']:>7.1%} {cell(run['peak_memory_gb'], '8.1f'):>8}   | "
            f"{'':16} {ref['tokens_per_s']:>9,.0f} {ref['mfu']:>6.1%} {ref['peak_memory_gb']:>8.1f}"
        )
    c = result.get("compiled_vs_eager")
    if c:
        lines.append(
            f"compiled / eager tokens/s: {c['tokens_per_s_ratio']:.2f}x (H200 2026-12-04: 1.21x); largest relative "
            f"loss difference {cell(c['max_loss_rel_diff'], '.1e')}"
        )
    return "\n".join(lines)


def prepare_stages(run: Runner, setup: Setup, device: str, dry_run: bool) -> tuple[Path, Path]:
    """Stages 1-3: the source model, its conversion and the shards; returns (model dir, data dir)."""
    from retro.convert import main as convert
    from retro.data.prepare import main as prepare

    source, model, data = run.work / "source", run.work / "model", run.work / "data"
    run.inline("build", build_source, source, setup, device)
    convert_args = ["--model", str(source), "--out", str(model), "--shape", "4,8,4", "--adapter-init", "default"]
    run.inline("convert", convert, [*convert_args, "--force"])
    corpus = CORPUS
    if dry_run:  # a few windows are enough: the first 100 paragraphs
        corpus = run.work / "corpus.txt"
        corpus.write_text("\n\n".join(CORPUS.read_text().split("\n\n")[:100]))
    prepare_args = ["--input", str(corpus), "--tokenizer", str(source), "--out", str(data), "--quiet", "--overwrite"]
    run.inline("prepare", prepare, [*prepare_args, "--txt-sample-by", "paragraph", "--val-fraction", "0.1"])
    return model, data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch directory (model, data, runs, logs)")
    parser.add_argument("--out", type=Path, required=True, help="JSON result path")
    parser.add_argument("--budget", type=float, default=210, help="seconds for all stages together (default 210)")
    parser.add_argument("--dry-run", action="store_true", help="tiny, on CPU: checks that the step runs")
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("gpu_trainer_check: no CUDA GPU (use --dry-run on CPU)", file=sys.stderr)
        return 2
    setup = DRY_RUN if args.dry_run else GPU
    run = Runner(args.work.resolve(), args.budget)
    run.work.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "command": " ".join(["python -m benchmarks.gpu_trainer_check", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "config": str(CONFIG.relative_to(REPO)),
        "setup": asdict(setup),
        "reference_h200_2026_12_04": H200_2026_12_04,
        "runs": {},
    }
    try:
        model, data = prepare_stages(run, setup, "cuda" if cuda else "cpu", args.dry_run)
        for name, compiled in (("eager", False), ("compiled", True)):
            out = run.work / "runs" / name
            env = {"TORCH_COMPILE_OVERRIDE_BACKENDS": ">=0:aot_eager"} if compiled and args.dry_run else None
            run(name, train_command(setup, model, data, out, compiled), env)
            result["runs"][name] = summarise(out / "metrics.jsonl", setup.skip)
        result["compiled_vs_eager"] = compare(result["runs"])
        status = 0
    except StageFailed as error:
        result["error"] = str(error)
        print(f"gpu_trainer_check: FAILED: {error}", file=sys.stderr)
        status = 1
    result["stage_seconds"] = run.seconds
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if result["runs"]:
        print(table(result))
    print(f"stages (s): {run.seconds}; wrote {args.out}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
