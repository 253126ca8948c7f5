"""The demo's stages, in order: task -> prepare -> pretrain -> convert -> retrofit -> static -> export -> eval.

Each stage calls the project's public entry point (retro.data.prepare, retro.convert, retro.train
under torch.distributed.run, retro.export, retro.inference.loading.load_model), so the demo exercises the same
code a user runs on a real model. Training runs are subprocesses; their logs go to OUT/logs and
their progress is read from the metrics.jsonl each run writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from retro.demo.pretrain import PretrainSettings

REPO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.toml"


@dataclass(frozen=True)
class DemoSettings:
    max_steps: int = 6  # K: problems compose 1..K permutations
    num_ops: int = 3  # fixed random permutations of the digits (operations a, b, c, ...)
    held_out_fraction: float = 0.2  # of the operation sequences at each k >= 2, never trained on
    train_per_step: int = 20000  # training problems per k
    eval_per_step: int = 100  # held-out problems per k >= 2 (k = 1: all 10 x num_ops lookups)
    val_fraction: float = 0.01  # documents held out as the trainer's validation split
    seed: int = 0
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    shape: tuple[int, int, int] = (2, 2, 2)  # prelude, recurrent block, coda of the retrofitted model
    retrofit_steps: int = 300
    nproc: int = 2  # ranks of each retro.train run (gloo on CPU)
    test_recurrences: tuple[int, ...] = (1, 2, 4, 8, 16)
    config: str = str(REPO_CONFIG)  # retro.train TOML for both post-training runs


def quick_settings(**overrides) -> DemoSettings:
    """A few steps of everything: checks the pipeline end to end, says nothing about accuracy."""
    small = DemoSettings(
        max_steps=4,
        train_per_step=1000,
        eval_per_step=8,
        val_fraction=0.1,
        pretrain=replace(PretrainSettings(), steps=20, warmup=5),
        retrofit_steps=6,
    )
    return replace(small, **overrides)


class TrainingFailed(RuntimeError):
    pass


def train_run(
    name: str, out: Path, model_dir: Path, data_dir: Path, steps: int, settings: DemoSettings, extra: dict[str, object]
) -> Path:
    """`retro.train` on `nproc` ranks; a progress bar follows its metrics.jsonl. Returns the run dir."""
    run_dir = out / "runs" / name
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    values = {
        "model.path": model_dir,
        "data.train": data_dir,
        "train.out_dir": run_dir,
        "train.steps": steps,
        "optim.decay_steps": max(1, steps // 5),
        "optim.warmup_steps": min(10, max(1, steps // 10)),
        "train.seed": settings.seed,
        **extra,
    }
    overrides = [f"--{k}={v}" for k, v in values.items()]
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={settings.nproc}"]
        if settings.nproc > 1
        else [sys.executable]
    )
    cmd = [*launcher, "-m", "retro.train", "--config", settings.config, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    metrics = run_dir / "metrics.jsonl"
    show_r = float(values.get("recurrence.max_mean", 2)) > 1  # the static model ignores the sampled r
    log_path = logs / f"{name}.log"
    with (
        log_path.open("w") as log,
        tqdm(total=steps, desc=f"  {name}", unit="step", dynamic_ncols=True, disable=None) as bar,
    ):
        log.write("$ " + " ".join(map(str, cmd)) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            time.sleep(0.5)
            _follow(metrics, bar, show_r)
        _follow(metrics, bar, show_r)
    if proc.returncode != 0:
        text = log_path.read_text()
        errors = [line for line in text.splitlines() if line.startswith("retro.train:")]
        detail = "\n".join(dict.fromkeys(errors)) or text[-3000:]
        raise TrainingFailed(f"retro.train ({name}) exited with {proc.returncode} (full log {log_path}):\n{detail}")
    return run_dir


def _follow(metrics: Path, bar: tqdm, show_r: bool) -> None:
    """Move the bar to the last step logged in metrics.jsonl (only when it changed)."""
    if not metrics.is_file():
        return
    lines = metrics.read_text().splitlines()
    if lines and int(json.loads(lines[-1])["step"]) != bar.n:
        last = json.loads(lines[-1])
        bar.n = int(last["step"])
        bar.set_postfix(loss=f"{last['loss']:.3f}", **({"r": last["r"]} if show_r else {}))
        bar.refresh()


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def matched_static_steps(
    records: list[dict], recurrent_dir: Path, static_dir: Path, seq_len: int, tokens_per_step: int
) -> dict:
    """Static steps whose training FLOPs equal the recurrent run's, counted pass by pass (FlopModel)."""
    from retro.model.config import RetroConfig
    from retro.model.flops import FlopModel

    steps = sorted(int(r["step"]) for r in records)
    if steps != list(range(1, len(steps) + 1)):
        raise ValueError(f"{recurrent_dir}: metrics.jsonl must log every step (train.log_every = 1) to count FLOPs")
    recurrent = FlopModel.from_config(RetroConfig.from_pretrained(recurrent_dir), seq_len)
    static = FlopModel.from_config(RetroConfig.from_pretrained(static_dir), seq_len)
    recurrent_flops = sum(recurrent.per_token(r["n"], r["k"]) for r in records) * tokens_per_step
    static_step = static.per_token(0, 1) * tokens_per_step
    n_static = max(1, round(recurrent_flops / static_step))
    return {
        "recurrent_flops": recurrent_flops,
        "static_flops_per_step": static_step,
        "static_steps": n_static,
        "static_flops": n_static * static_step,
        "recurrent_steps": len(steps),
        "recurrent_mean_r": sum(r["r"] for r in records) / len(records),
        "recurrent_max_r": max(max(r.get("r_micro", [r["r"]])) for r in records),
        "recurrent_final_mean": records[-1]["mean_recurrence"],
    }


def eval_counts(rows: list[dict]) -> dict[str, int]:
    """Evaluation problems per k (k = 1 has only 10 x num_ops; k >= 2 up to eval_per_step)."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[str(row["steps"])] = counts.get(str(row["steps"]), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: int(kv[0])))


class Stages:
    """Numbered stage headers and wall times: the demo's progress display."""

    def __init__(self, total: int, say: Callable[[str], None] = print) -> None:
        self.total, self.index, self.say = total, 0, say
        self.seconds: dict[str, float] = {}

    def run(self, name: str, what: str, fn: Callable[[], object]) -> object:
        self.index += 1
        self.say(f"[{self.index}/{self.total}] {name}: {what}")
        start = time.perf_counter()
        result = fn()
        self.seconds[name] = round(time.perf_counter() - start, 1)
        self.say(f"      done in {self.seconds[name]:.1f} s")
        return result


def run_demo(out: Path, settings: DemoSettings, say: Callable[[str], None] = print) -> dict:
    """Run every stage into `out`; return the results dict also written to out/results.json."""
    import torch

    from retro.convert import convert
    from retro.data.prepare import main as prepare_main
    from retro.demo import report
    from retro.demo.evaluate import evaluate_checkpoint
    from retro.demo.pretrain import pretrain
    from retro.demo.task import build_splits, read_eval, write_corpus, write_eval
    from retro.demo.tokenizer import build_tokenizer
    from retro.export import export

    if not Path(settings.config).is_file():
        raise FileNotFoundError(
            f"training config {settings.config} not found (the demo needs configs/demo.toml from the repository; "
            "pass --config PATH)"
        )
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    stages = Stages(8, say)
    p = settings.pretrain

    def make_task():
        perms, train, held_out = build_splits(
            settings.max_steps,
            settings.train_per_step,
            settings.eval_per_step,
            settings.seed,
            settings.num_ops,
            settings.held_out_fraction,
        )
        (out / "task.json").write_text(json.dumps({"permutations": perms}, indent=1))
        write_corpus(train, out / "corpus.jsonl")
        write_eval(held_out, out / "eval.jsonl")
        return len(train), len(held_out), build_tokenizer(out / "tokenizer").convert_tokens_to_ids("=")

    n_train, n_eval, answer_after = stages.run(
        "task",
        f"compositions of 1..{settings.max_steps} of {settings.num_ops} fixed digit permutations; word-level tokenizer",
        make_task,
    )
    say(f"      {n_train} training problems, {n_eval} evaluation problems (k >= 2: held-out operation sequences)")

    def prepare():
        code = prepare_main(
            [
                "--input",
                str(out / "corpus.jsonl"),
                "--tokenizer",
                str(out / "tokenizer"),
                "--out",
                str(out / "data"),
                "--val-fraction",
                str(settings.val_fraction),
                "--overwrite",
                "--quiet",
            ]
        )
        if code != 0:
            raise RuntimeError(f"retro.data.prepare failed with exit code {code}")

    stages.run("prepare", "python -m retro.data.prepare -> token shards", prepare)

    def run_pretrain():
        bar = tqdm(total=p.steps, desc="  pretrain", unit="step", dynamic_ncols=True, disable=None)  # no bar off a TTY

        def progress(step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")

        summary = pretrain(out / "data", out / "pretrained", p, answer_after, progress)
        bar.close()
        for name in os.listdir(out / "tokenizer"):
            (out / "pretrained" / name).write_bytes((out / "tokenizer" / name).read_bytes())
        return summary

    pre = stages.run(
        "pretrain",
        f"static Llama, {p.layers} layers x hidden {p.hidden}, {p.steps} steps (AdamW, loss on answers)",
        run_pretrain,
    )
    say(f"      final answer loss {pre['final_answer_loss']:.3f}, {pre['parameters']:,} parameters")

    def run_convert():
        rec = convert(out / "pretrained", out / "recurrent_init", shape=settings.shape, force=True)
        sta = convert(out / "pretrained", out / "static_init", static=True, force=True)
        return rec, sta

    rec_conv, sta_conv = stages.run("convert", f"retro.convert shape {settings.shape} (+ the static copy)", run_convert)
    say(
        f"      recurrent: prelude {rec_conv['prelude']} block {rec_conv['block']} coda {rec_conv['coda']} "
        f"dropped {rec_conv['dropped'] or 'none'}"
    )

    from retro.training.job_config import load_config

    cfg = load_config(settings.config)
    tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
    rec_run = stages.run(
        "retrofit",
        f"retro.train, {settings.nproc} ranks, Muon, 1-sqrt curriculum to mean "
        f"{cfg.recurrence.max_mean:g}, {settings.retrofit_steps} steps",
        lambda: train_run(
            "recurrent", out, out / "recurrent_init", out / "data", settings.retrofit_steps, settings, {}
        ),
    )
    flops = matched_static_steps(
        read_metrics(rec_run), out / "recurrent_init", out / "static_init", cfg.data.seq_len, tokens_per_step
    )
    static_extra = {
        "recurrence.max_mean": 1,
        "recurrence.curriculum": "none",
        "recurrence.backprop_depth": 1,
        "train.val_recurrences": "1",
    }
    sta_run = stages.run(
        "static",
        f"retro.train on the static model for the same FLOPs ({flops['recurrent_flops']:.3g}): "
        f"{flops['static_steps']} steps",
        lambda: train_run(
            "static", out, out / "static_init", out / "data", flops["static_steps"], settings, static_extra
        ),
    )

    def run_export():
        export(rec_run, out / "recurrent", force=True)
        export(sta_run, out / "static", force=True)

    stages.run("export", "python -m retro.export -> HF directories", run_export)

    def run_eval():
        rows = read_eval(out / "eval.jsonl")
        torch.manual_seed(settings.seed)
        return {
            name: evaluate_checkpoint(out / directory, rows, list(settings.test_recurrences), settings.seed)
            for name, directory in (("pretrained", "static_init"), ("static", "static"), ("recurrent", "recurrent"))
        }

    evals = stages.run("eval", f"held-out accuracy by k and r in {list(settings.test_recurrences)}", run_eval)
    results = {
        "command": "python -m retro.demo " + " ".join(sys.argv[1:])
        if sys.argv and sys.argv[0].endswith("__main__.py")
        else None,
        "settings": asdict(settings),
        "eval_counts": eval_counts(read_eval(out / "eval.jsonl")),
        "pretrain": pre,
        "conversion": rec_conv,
        "flops": flops,
        "train_config": cfg.to_dict(),
        "models": evals,
        "stage_seconds": stages.seconds,
        "wall_seconds": round(time.perf_counter() - started, 1),
        **report.environment(),
    }
    results["claims"] = report.claims(results)
    paths = report.write(results, out)
    say(report.summary_text(results))
    say("wrote " + ", ".join(str(v) for v in paths.values()))
    return results
