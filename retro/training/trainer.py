"""The Trainer: builds a run from its JobConfig, then `train_step` after `train_step` until done.

One optimizer step: the recurrence (n no-grad + k grad passes) drawn from the step's seed, the same
on every rank; gradient accumulation over micro-batches with gradient sync on the last one only;
clipping; a non-finite step is skipped, not applied; LR schedule; metrics. When to save is the
Checkpointer's decision, what to save is the TrainState's.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from retro.data.loader import build_train_loader, build_val_batches
from retro.data.mixture import Reshard
from retro.data.shards import TokenShards, check_tokenizer_matches
from retro.distributed.setup import all_reduce_mean, build_mesh, compute_dtype, init_distributed
from retro.model.config import RetroConfig
from retro.model.flops import FlopModel
from retro.optim import build_optimizer
from retro.planning.hardware import peak_flops
from retro.training.checkpoint import Checkpointer
from retro.training.errors import ConfigError
from retro.training.job_config import JobConfig, save_config
from retro.training.lr_schedule import scheduler_for
from retro.training.metrics import MetricsLog
from retro.training.model_source import build_model, load_model_config
from retro.training.progress import Progress
from retro.training.recurrence import RecurrenceSchedule, state_generator
from retro.training.signals import REQUEUE_EXIT_CODE, SignalFlag
from retro.training.train_state import TrainState
from retro.training.validate import validation_losses

BAD_STEPS_EXIT_CODE = 3


def check_data(job: JobConfig, model_config: RetroConfig | None, world_size: int) -> None:
    """Data/tokenizer/batch checks that must fail before any training starts."""
    if not job.data.train:
        raise ConfigError("data.train is empty: give prepared shard directories (python -m retro.data.prepare)")
    per_step = job.train.micro_batch * world_size
    if job.train.global_batch % per_step:
        raise ConfigError(
            f"train.global_batch = {job.train.global_batch} is not divisible by train.micro_batch x ranks "
            f"= {job.train.micro_batch} x {world_size}"
        )
    for source in job.data.train:
        check_tokenizer_matches(TokenShards(source, split="train"), model_config.vocab_size)


def reshard_warning(reshard: Reshard, path: Path, step: int, job: JobConfig) -> str:
    """What changes when a checkpoint resumes on another number of ranks (printed by rank 0)."""
    text = (
        f"retro.train: warning: resuming {reshard.old_world_size}-rank checkpoint {path} on {reshard.new_world_size} "
        f"ranks; data order per source: {reshard.describe([str(p) for p in job.data.train])}"
    )
    if len(reshard.reread) > 1:
        text += f"; {sum(reshard.reread)} windows re-read in all"
    if step:  # every step read accumulation x micro_batch windows on each old rank
        state = reshard.states[0]
        saved_global = state["batches"] // step * state["config"]["batch_size"] * reshard.old_world_size
        if saved_global != job.train.global_batch:
            text += (
                f"; the global batch changes from {saved_global} (saved run) to train.global_batch = "
                f"{job.train.global_batch}"
            )
    return text


class Trainer:
    def __init__(self, job: JobConfig) -> None:
        self.job = job
        t = job.train
        self.info = info = init_distributed()
        self.model_config = load_model_config(job.model)
        check_data(job, self.model_config, info.world_size)
        self.out_dir = Path(t.out_dir)
        self.recurrence = RecurrenceSchedule.from_settings(job.recurrence, t.steps, t.seed)
        self.mesh = build_mesh(info, job.parallel.replicate)
        self.dtype = compute_dtype(t.dtype, info.device)
        self.model = build_model(job.model, self.model_config, job.parallel, self.mesh, info.device, self.dtype, t.seed)
        self.optimizer = build_optimizer(self.model, job.optim)
        loader = build_train_loader(
            job.data.train,
            job.data.weights or None,
            job.data.seq_len,
            t.micro_batch,
            info.rank,
            info.world_size,
            t.seed,
            job.data.num_workers,
        )
        self.state = TrainState(scheduler_for(self.optimizer, job.optim, t.steps), loader)
        self.val_batches = list(
            build_val_batches(
                job.data.val or job.data.train[0],
                job.data.seq_len,
                t.micro_batch,
                info.rank,
                info.world_size,
                max(1, t.val_batches // info.world_size),
            )
        )
        self.accumulation = t.global_batch // (t.micro_batch * info.world_size)
        self.checkpointer = Checkpointer(job.checkpoint, self.out_dir, info.rank, info.world_size)
        self.resumed_from = self.checkpointer.resume_path()
        if self.resumed_from is not None:
            self.checkpointer.load(self.resumed_from, self.model, self.optimizer, self.state)
            if self.state.reshard is not None and info.is_main:
                print(
                    reshard_warning(self.state.reshard, self.resumed_from, self.state.step, job),
                    file=sys.stderr,
                    flush=True,
                )
        if info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(job, self.out_dir / "config.json")
            self.model_config.save_pretrained(self.out_dir / "model_config")
            start = f"resuming from {self.resumed_from}" if self.resumed_from else "fresh start"
            print(
                f"retro.train: {info.world_size} rank(s) on {info.device}, {self.dtype}, accumulation "
                f"{self.accumulation}, {start}",
                flush=True,
            )
        self.log = (
            MetricsLog(self.out_dir / "metrics.jsonl", self.out_dir / "tensorboard" if t.tensorboard else None)
            if info.is_main
            else None
        )
        self.flops = FlopModel.from_config(self.model_config, job.data.seq_len)
        self.peak = peak_flops(info.device)
        self.tokens_per_step = t.global_batch * job.data.seq_len
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.batches = iter(loader)

    def forward_backward(self, batch: dict, step: int, micro: int, n: int, k: int) -> torch.Tensor:
        """One micro-batch: loss / accumulation backpropagated through the last k of n + k passes."""
        device = self.info.device
        autocast = self.dtype != torch.float32 and self.mesh is None  # FSDP2 casts through its mixed precision
        with torch.autocast(device.type, dtype=self.dtype, enabled=autocast):
            loss = self.model(
                batch["input_ids"].to(device),
                shift_labels=batch["labels"].to(device),
                num_recurrences=(n, k),
                return_logits=False,
                generator=state_generator(self.job.train.seed, step, micro, self.info.rank, device),
            ).loss
        (loss / self.accumulation).backward()
        return loss.detach().float() / self.accumulation

    def train_step(self, step: int) -> dict:
        """Optimizer step `step` (0-based); returns its metrics record ("skipped" if not finite)."""
        started = time.perf_counter()
        device = self.info.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        draw = self.recurrence.sample_info(step)
        n, k = draw["n"], draw["k"]
        loss_sum = torch.zeros((), device=device)
        for micro in range(self.accumulation):
            if hasattr(self.model, "set_requires_gradient_sync"):
                self.model.set_requires_gradient_sync(micro == self.accumulation - 1)
            loss_sum += self.forward_backward(next(self.batches), step, micro, n, k)
        loss = all_reduce_mean(loss_sum).item()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.job.train.grad_clip)
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        scheduler = self.state.scheduler
        scheduler.step()
        self.state.step = step + 1
        elapsed = time.perf_counter() - started
        return {
            "step": step + 1,
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": scheduler.get_last_lr()[-1],
            "lr_groups": scheduler.get_last_lr(),
            "n": n,
            "k": k,
            "r": n + k,
            "mean_recurrence": draw["mean"],
            "capped": draw["capped"],
            "tokens": (step + 1) * self.tokens_per_step,
            "tokens_per_s": self.tokens_per_step / elapsed,
            "step_time_s": elapsed,
            "skipped": not finite,
            "mfu": self.flops.per_token(n, k) * self.tokens_per_step / elapsed / self.peak / self.info.world_size,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        }

    def validate(self) -> dict[str, float]:
        return validation_losses(self.model, self.val_batches, self.job.train.val_recurrences, self.info.device)

    def save(self) -> None:
        self.checkpointer.save(self.state.step, self.model, self.optimizer, self.state)

    def fit(self) -> int:
        """Train to train.steps; returns the exit code (0, REQUEUE_EXIT_CODE after a signal, BAD_STEPS_EXIT_CODE)."""
        t = self.job.train
        progress = Progress(t.steps, self.state.step, enabled=self.info.is_main)
        signals = SignalFlag()
        bad_in_a_row, exit_code = 0, 0
        self.model.train()
        while self.state.step < t.steps:
            record = self.train_step(self.state.step)
            step, finite = record["step"], not record["skipped"]
            bad_in_a_row = 0 if finite else bad_in_a_row + 1
            if t.val_every and step % t.val_every == 0 or step == t.steps:
                record.update(self.validate())
            if self.log is not None and (step % t.log_every == 0 or not finite or step == t.steps):
                self.log.write(record)
            progress.update(loss=f"{record['loss']:.4f}", r=record["r"], m=record["mean_recurrence"])
            if not finite:
                print(
                    f"retro.train: step {step}: non-finite loss {record['loss']} or grad norm {record['grad_norm']}; "
                    f"update skipped ({bad_in_a_row} in a row)",
                    file=sys.stderr,
                    flush=True,
                )
                if bad_in_a_row > t.max_bad_steps:
                    exit_code = BAD_STEPS_EXIT_CODE
                    print(
                        f"retro.train: stopping: {bad_in_a_row} non-finite steps in a row exceeds "
                        "train.max_bad_steps = "
                        f"{t.max_bad_steps}; the last good checkpoint is kept unchanged",
                        file=sys.stderr,
                        flush=True,
                    )
                    break
                continue
            if signals.agreed(self.info.device):
                self.save()
                exit_code = REQUEUE_EXIT_CODE
                if self.info.is_main:
                    print(
                        f"retro.train: signal received; checkpoint at step {step} written; exiting for requeue",
                        flush=True,
                    )
                break
            if self.checkpointer.due(step, t.steps):
                self.save()
        progress.close()
        return exit_code

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if dist.is_initialized():
            dist.destroy_process_group()
