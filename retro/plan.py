"""`python -m retro.plan --config X.toml --gpus N`: what a run will cost before it is launched.

Per step and per run: loop-aware FLOPs over the recurrence curriculum (retro.model.flops.FlopModel,
retro.training.recurrence.RecurrenceSchedule), tokens/s and wall time at an assumed MFU, memory per GPU
(parameters, gradients, optimizer state, activations with and without per-recurrence
checkpointing at the tail of the sampled r distribution), and the communication volume of one
step for FSDP vs HSDP at 8, 64 and 512 GPUs. With `distill.teacher` set, the teacher's forward FLOPs and
memory are included (its config is read, no weight). `--check` compares the memory and FLOP model with
what a small CPU model actually allocates and computes (retro/planning/check.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from retro.distributed.hardware import GPUS
from retro.planning.report import format_plan, plan
from retro.planning.shapes import PRESETS, model_shape
from retro.training.distill import check_teacher
from retro.training.job_config import ConfigError, load_config, split_cli_overrides
from retro.training.preflight import check_draw_groups


def build_parser() -> argparse.ArgumentParser:
    """The CLI's options; unknown `--section.key=value` arguments are config overrides (parse_known_args)."""
    parser = argparse.ArgumentParser(
        prog="python -m retro.plan",
        description=__doc__.split("\n\n")[0],
        epilog="Any other --section.key=value argument overrides that field of the TOML, as in retro.train.",
    )
    parser.add_argument("--config", help="training TOML (configs/*.toml); the defaults when omitted")
    parser.add_argument(
        "--gpus",
        type=int,
        default=8,
        help="GPUs of the run, a multiple of parallel.replicate: sets tokens/s, wall time, GPU-hours, the micro-batch "
        "split and memory per GPU (default: 8); communication is always shown at 8, 64 and 512",
    )
    parser.add_argument(
        "--gpu",
        default="h200",
        choices=sorted(GPUS),
        help="GPU model whose spec sheet is assumed: peak bf16 FLOP/s, memory, NVLink and NIC bandwidth "
        "(default: h200)",
    )
    parser.add_argument(
        "--mfu",
        type=float,
        default=0.4,
        help="assumed loop-aware MFU in (0, 1], for tokens/s and wall time (default: 0.4)",
    )
    parser.add_argument("--model-config", help="a config.json with the model shape (instead of model.path)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a built-in shape of the paper's models")
    parser.add_argument("--json", type=Path, help="also write the numbers as JSON here")
    parser.add_argument("--check", action="store_true", help="compare the model with measurements on a small CPU model")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.check:
        from retro.planning.check import main as check_main

        return check_main()
    try:
        job = load_config(args.config, split_cli_overrides(rest))
        if args.gpus < 1 or args.gpus % job.parallel.replicate:
            raise ConfigError(
                f"--gpus {args.gpus} must be a positive multiple of parallel.replicate = {job.parallel.replicate}"
            )
        per_step = job.train.micro_batch * args.gpus
        if job.train.global_batch % per_step:
            raise ConfigError(
                f"train.global_batch = {job.train.global_batch} is not divisible by train.micro_batch x --gpus = "
                f"{job.train.micro_batch} x {args.gpus}: retro.train would refuse this split; change one of them"
            )
        check_draw_groups(job, args.gpus, "GPUs")
        if not 0 < args.mfu <= 1:
            raise ConfigError(f"--mfu must be in (0, 1], got {args.mfu}")
        model_config = model_shape(job, args.model_config, args.preset)
        teacher = check_teacher(job.distill, model_config) if job.distill.enabled else None
    except (ConfigError, ValueError) as error:
        print(f"retro.plan: error: {error}", file=sys.stderr)
        return 2
    result = plan(job, model_config, args.gpus, GPUS[args.gpu], args.mfu, teacher)
    print(format_plan(result, job))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
