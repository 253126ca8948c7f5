"""`python -m retro.demo [--out DIR] [--quick]`: run every stage and write results.{json,md} + accuracy.png."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from retro.demo.pipeline import DemoSettings, TrainingFailed, quick_settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m retro.demo", description=__doc__)
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--quick", action="store_true", help="a few steps of each stage: checks the pipeline, not the claim")
    p.add_argument("--pretrain-steps", type=int, help="steps of static pretraining")
    p.add_argument(
        "--retrofit-steps", type=int, help="steps of recurrent post-training (the static run gets equal FLOPs)"
    )
    p.add_argument("--nproc", type=int, help="ranks per training run (default 2)")
    p.add_argument("--config", help="retro.train TOML for the post-training runs (default configs/demo.toml)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the in-process stages (pretrain, eval); 1 is fastest on a shared 2-core machine",
    )
    p.add_argument("--seed", type=int, help="seed of the task, pretraining and training")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = quick_settings() if args.quick else DemoSettings()
    if args.pretrain_steps is not None:
        settings = replace(settings, pretrain=replace(settings.pretrain, steps=args.pretrain_steps))
    changes = {"retrofit_steps": args.retrofit_steps, "nproc": args.nproc, "config": args.config, "seed": args.seed}
    settings = replace(settings, **{k: v for k, v in changes.items() if v is not None})
    if settings.pretrain.steps < 1 or settings.retrofit_steps < 1 or settings.nproc < 1 or args.threads < 1:
        print(
            "retro.demo: error: --pretrain-steps, --retrofit-steps, --nproc and --threads must be >= 1", file=sys.stderr
        )
        return 2
    import torch
    from transformers.utils import logging as hf_logging

    from retro.demo.pipeline import run_demo

    hf_logging.disable_progress_bar()  # "Loading weights" bars of every small from_pretrained
    torch.set_num_threads(args.threads)
    try:
        run_demo(Path(args.out), settings)
    except (FileNotFoundError, ValueError, TrainingFailed) as error:
        print(f"retro.demo: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
