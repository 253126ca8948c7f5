"""`torchrun --nproc_per_node N -m retro.train --config X.toml [--section.key=value ...]`

FSDP2 post-training of a retrofitted recurrent model (retro/training/trainer.py): per-step
recurrence sampling (same on every rank, keyed by the step), truncated backprop, gradient
accumulation, clipping, LR schedule, metrics, validation at several test recurrences, DCP
checkpoints, signal-safe exits. While it runs, train.out_dir is locked (OUT/.retro-lock): a second run
into it exits 2. Exit codes: 0 done, 2 bad config or input (or out_dir held by a live run), 3 too many
non-finite steps, 85 checkpointed after SIGTERM/SIGUSR1 (requeue; also a signal during start-up, before
the first step, when nothing is saved).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch.distributed as dist

from retro.distributed.setup import init_distributed
from retro.training.checkpoint import check_fresh_start
from retro.training.errors import ConfigError, SharedVerdict, TrainingError
from retro.training.job_config import load_config, split_cli_overrides
from retro.training.model_source import load_model_config
from retro.training.preflight import check_data
from retro.training.resume_check import check_resume
from retro.training.run_lock import claim_linked_checkpoints, hold_run_dir
from retro.training.signals import SignalFlag
from retro.training.trainer import Trainer


def build_parser() -> argparse.ArgumentParser:
    """The CLI's own options; every other `--section.key=value` argument overrides the TOML."""
    parser = argparse.ArgumentParser(
        prog="python -m retro.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="TOML config (configs/*.toml)")
    parser.add_argument("--resume", help="auto | none | a checkpoint directory (same as --checkpoint.resume)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="with --resume none: start over in a train.out_dir that holds checkpoints of an earlier run "
        "(refused without it); prints what happens to them",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    signals = SignalFlag()  # before any slow start-up work: a SIGTERM/SIGUSR1 then exits 85 (requeue), not killed
    try:
        overrides = split_cli_overrides(rest)
        if args.resume:
            overrides.append(f"checkpoint.resume={args.resume}")
        job = load_config(args.config, overrides)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"retro.train: resolved config {job.to_dict()}", flush=True)
        info = init_distributed()
        try:
            model_config = load_model_config(job.model)
            check_data(job, model_config, info.world_size)  # before any weight is read
            out_dir, ckpt = Path(job.train.out_dir), job.checkpoint

            def run_dir_checks() -> None:  # rank 0, lock held, nothing in out_dir written yet
                claim_linked_checkpoints(out_dir)  # a checkpoints folder linked from two run dirs is refused
                check_fresh_start(out_dir, ckpt.resume, ckpt.keep_last, args.force)
                check_resume(out_dir, job, model_config)  # what a resume changes: refused or noted

            with hold_run_dir(out_dir, info, ckpt.lock_stale_s, run_dir_checks) as lock:  # before anything is touched
                trainer = Trainer(job, info, model_config, lock.still_mine if lock is not None else None)
                try:
                    code = trainer.fit(signals)
                finally:
                    trainer.close()
            if dist.is_initialized():  # every rank ends here with the same code: tear the group down together
                dist.barrier()
            return code
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except SharedVerdict:
        return 2  # rank 0 printed it
    except (ConfigError, FileNotFoundError, ValueError, TrainingError) as error:
        print(f"retro.train: error: {error}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
