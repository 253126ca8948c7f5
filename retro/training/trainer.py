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

from retro.data.manifest import ShardFormatError
from retro.data.mixture import Reshard
from retro.data.shards import TokenShards, check_tokenizer_matches
from retro.distributed.hardware import peak_flops
from retro.distributed.setup import all_reduce_mean, build_mesh, compute_dtype, init_distributed
from retro.model.config import RetroConfig
from retro.model.flops import FlopModel
from retro.optim import build_optimizer
from retro.training.checkpoint import Checkpointer, complete_checkpoints
from retro.training.distill import build_teacher, check_teacher, release_teacher, teacher_targets
from retro.training.errors import ConfigError, TrainingError
from retro.training.job_config import JobConfig, save_config
from retro.training.metrics import MetricsLog, truncate_after
from retro.training.model_source import build_model, load_model_config
from retro.training.progress import Progress
from retro.training.recurrence import RecurrenceSchedule, state_generator
from retro.training.signals import REQUEUE_EXIT_CODE, SignalFlag
from retro.training.train_state import TrainState, rebase_learning_rates, scheduler_for
from retro.training.validate import validation_losses

BAD_STEPS_EXIT_CODE = 3


def check_data(job: JobConfig, model_config: RetroConfig | None, world_size: int) -> None:
    """Data/tokenizer/batch checks that must fail before any training starts (train and val sources)."""
    if not job.data.train:
        raise ConfigError("data.train is empty: give prepared shard directories (python -m retro.data.prepare)")
    per_step = job.train.micro_batch * world_size
    if job.train.global_batch % per_step:
        raise ConfigError(
            f"train.global_batch = {job.train.global_batch} is not divisible by train.micro_batch x ranks "
            f"= {job.train.micro_batch} x {world_size}"
        )
    if job.distill.enabled:
        check_teacher(job.distill, model_config)  # exists, same vocabulary: before any weight is read
    sources = [(source, "train") for source in job.data.train] + ([(job.data.val, "val")] if job.data.val else [])
    named = [(job.model.path, "model")] + ([(job.distill.teacher, "teacher")] if job.distill.enabled else [])
    tokenizer_dirs = [(tokenizer_dir(path), whose) for path, whose in named if tokenizer_dir(path) is not None]
    for source, split in sources:
        shards = TokenShards(source, split=split)
        check_tokenizer_matches(shards, model_config.vocab_size)
        for directory, whose in tokenizer_dirs if not job.data.allow_tokenizer_mismatch else []:
            try:
                check_tokenizer_matches(shards, directory)
            except ShardFormatError as error:
                raise ConfigError(
                    f"{error}. The {whose} directory {directory} holds the tokenizer it was converted with; "
                    "re-run retro.data.prepare with it, or set data.allow_tokenizer_mismatch = true if the two "
                    "tokenizers are known to agree"
                ) from None


def tokenizer_dir(path: str | Path) -> Path | None:
    """A model directory when it carries tokenizer files (retro.convert copies the source's), else None."""
    path = Path(path)
    return path if any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")) else None


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
        self.teacher = (
            build_teacher(job.distill, self.model_config, job.parallel, self.mesh, info.device, self.dtype)
            if job.distill.enabled
            else None
        )
        loader = job.data.train_loader(t.micro_batch, info.rank, info.world_size, t.seed)
        self.state = TrainState(scheduler_for(self.optimizer, job.optim, t.steps), loader)
        self.val_batches = job.data.val_batches(t.micro_batch, info.rank, info.world_size, t.val_batches)
        self.accumulation = t.global_batch // (t.micro_batch * info.world_size)
        self.checkpointer = Checkpointer(job.checkpoint, self.out_dir, info.rank, info.world_size)
        self.resumed_from = self.checkpointer.resume_path()
        if self.resumed_from is not None:
            self._resume(self.resumed_from)
        if info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(job, self.out_dir / "config.json")
            self.model_config.save_pretrained(self.out_dir / "model_config")
            start = f"resuming from {self.resumed_from}" if self.resumed_from else "fresh start"
            self._say(
                f"{info.world_size} rank(s) on {info.device}, {self.dtype}, accumulation {self.accumulation}, {start}"
            )
        self.log = None
        if info.is_main:
            metrics = self.out_dir / "metrics.jsonl"
            if self.resumed_from is not None:
                truncate_after(metrics, self.state.step)  # the steps after the checkpoint are re-run
            self.log = MetricsLog(metrics, self.out_dir / "tensorboard" if t.tensorboard else None)
        self.flops = FlopModel.from_config(self.model_config, job.data.seq_len)
        self.teacher_flops = 0.0  # per token: the teacher's forward is work the step does, so MFU counts it
        if self.teacher is not None:
            teacher_config = self.teacher.config
            teacher_r = teacher_config.default_recurrences if teacher_config.is_recurrent else 1
            self.teacher_flops = FlopModel.from_config(teacher_config, job.data.seq_len).forward_per_token(teacher_r)
        self.peak = peak_flops(info.device)
        self.tokens_per_step = t.global_batch * job.data.seq_len
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.batches = iter(loader)

    def _say(self, text: str, error: bool = False) -> None:
        if self.info.is_main:
            print(f"retro.train: {text}", file=sys.stderr if error else sys.stdout, flush=True)

    def _resume(self, path: Path) -> None:
        self.checkpointer.load(path, self.model, self.optimizer, self.state)
        if self.state.reshard is not None:
            self._say(
                reshard_warning(self.state.reshard, path, self.state.step, self.job).removeprefix("retro.train: "), True
            )
        for name, old, new in rebase_learning_rates(self.optimizer, self.state.scheduler, self.job.optim):
            self._say(
                f"note: {name} changed from {old:g} (checkpoint) to {new:g} (config); training continues at {new:g}"
            )

    def draws(self, step: int) -> list[dict]:
        """The recurrence of each micro-batch of optimizer step `step`: a pure function of (seed, step, index)."""
        if self.job.recurrence.sample_every == "step":
            return [self.recurrence.sample_info(step)] * self.accumulation
        return [self.recurrence.sample_info(step, micro) for micro in range(self.accumulation)]

    def _check_ranks_agree(self, draws: list[dict]) -> None:
        """One tiny all-reduce: a rank that drew another r would silently train a different model."""
        if not dist.is_initialized():
            return
        r = torch.tensor([d["r"] for d in draws], dtype=torch.float64, device=self.info.device)
        both = torch.cat([r, -r])
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        if not torch.equal(both, torch.cat([r, -r])):
            raise TrainingError(
                f"ranks disagree on the recurrence at this step (rank {self.info.rank} drew {r.tolist()})"
            )

    def forward_backward(self, batch: dict, step: int, micro: int, n: int, k: int) -> torch.Tensor:
        """One micro-batch: loss / accumulation backpropagated through the last k of n + k passes.

        Returns [loss, ce, kd] / accumulation (ce = loss and kd = 0 without a teacher), detached.
        """
        device = self.info.device
        autocast = self.dtype != torch.float32 and self.mesh is None  # FSDP2 casts through its mixed precision
        input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        generator = state_generator(self.job.train.seed, step, micro, self.info.rank, device)
        with torch.autocast(device.type, dtype=self.dtype, enabled=autocast):
            distill = None
            if self.teacher is not None:
                distill = teacher_targets(self.teacher, self.job.distill, input_ids, labels, generator)
            loss = self.model(
                input_ids,
                shift_labels=labels,
                num_recurrences=(n, k),
                return_logits=False,
                generator=generator,
                loss_fn=distill,
            ).loss
        if distill is not None:
            release_teacher(self.teacher)
        (loss / self.accumulation).backward()
        loss = loss.detach().float()
        parts = [loss, loss, torch.zeros_like(loss)] if distill is None else [loss, distill.parts.ce, distill.parts.kd]
        return torch.stack(parts) / self.accumulation

    def train_step(self, step: int) -> dict:
        """Optimizer step `step` (0-based); returns its metrics record ("skipped" if not finite)."""
        started = time.perf_counter()
        device = self.info.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        draws = self.draws(step)
        self._check_ranks_agree(draws)
        loss_sum = torch.zeros(3, device=device)  # loss, ce, kd
        for micro, draw in enumerate(draws):
            if hasattr(self.model, "set_requires_gradient_sync"):
                self.model.set_requires_gradient_sync(micro == self.accumulation - 1)
            loss_sum += self.forward_backward(next(self.batches), step, micro, draw["n"], draw["k"])
        loss, ce, kd = all_reduce_mean(loss_sum).tolist()
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
        n = sum(d["n"] for d in draws) / len(draws)  # FLOPs are linear in (n, k): the means count them exactly
        k = sum(d["k"] for d in draws) / len(draws)
        return {
            "step": step + 1, "loss": loss, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[-1],
            "lr_groups": scheduler.get_last_lr(), "n": n, "k": k, "r": n + k, "r_micro": [d["r"] for d in draws],
            "mean_recurrence": draws[0]["mean"], "capped": sum(d["capped"] for d in draws),
            "tokens": (step + 1) * self.tokens_per_step, "tokens_per_s": self.tokens_per_step / elapsed,
            "step_time_s": elapsed, "skipped": not finite,
            "mfu": (self.flops.per_token(n, k) + self.teacher_flops) * self.tokens_per_step / elapsed / self.peak
                   / self.info.world_size,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
            **({"ce": ce, "kd": kd} if self.teacher is not None else {}),
        }  # fmt: skip

    def validate(self) -> dict[str, float]:
        return validation_losses(self.model, self.val_batches, self.job.train.val_recurrences, self.info.device)

    def weights_finite(self) -> bool:
        """Every rank's shards finite (one all-reduce): a diverged model must never overwrite a good checkpoint."""
        ok = torch.tensor([float(all(torch.isfinite(p.detach()).all() for p in self.params))], device=self.info.device)
        if dist.is_initialized():
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def what_exists(self) -> str:
        done = complete_checkpoints(self.out_dir)
        return f"the last complete checkpoint is {done[-1]}" if done else "no checkpoint of this run exists"

    def save(self) -> bool:
        """Save the current state if its weights are finite; False (and nothing written) if not."""
        if not self.weights_finite():
            self._say(f"error: weights are not finite after step {self.state.step} (diverged); not saving; "
                      f"{self.what_exists()}", True)  # fmt: skip
            return False
        self.checkpointer.save(self.state.step, self.model, self.optimizer, self.state)
        return True

    def fit(self) -> int:
        """Train to train.steps; returns the exit code (0, REQUEUE_EXIT_CODE after a signal, BAD_STEPS_EXIT_CODE)."""
        t = self.job.train
        progress = Progress(t.steps, self.state.step, enabled=self.info.is_main)
        signals = SignalFlag()
        bad_in_a_row = 0
        self.model.train()
        try:
            while self.state.step < t.steps:
                record = self.train_step(self.state.step)
                step, finite = record["step"], not record["skipped"]
                bad_in_a_row = 0 if finite else bad_in_a_row + 1
                progress.update(loss=f"{record['loss']:.4f}", r=record["r"], m=record["mean_recurrence"])
                if not finite:
                    self._say(f"step {step}: non-finite loss {record['loss']} or grad norm {record['grad_norm']}; "
                              f"update skipped ({bad_in_a_row} in a row)", True)  # fmt: skip
                stop = bad_in_a_row > t.max_bad_steps or (not finite and step == t.steps)
                if stop:  # never save weights that just gave a non-finite loss: they would poison every resume
                    self._log(record)
                    why = (
                        f"{bad_in_a_row} non-finite steps in a row exceeds train.max_bad_steps = {t.max_bad_steps}"
                        if bad_in_a_row > t.max_bad_steps
                        else "the last step was not finite"
                    )
                    self._say(f"stopping: {why}; these weights are not saved; {self.what_exists()}", True)
                    return BAD_STEPS_EXIT_CODE
                if signals.agreed(self.info.device):
                    self._log(record)
                    if not finite:  # requeue anyway: the next job resumes from the last good checkpoint
                        self._say(f"signal received at a non-finite step; not saved; {self.what_exists()}", True)
                    elif not self.save():
                        return BAD_STEPS_EXIT_CODE
                    else:
                        self._say(f"signal received; checkpoint at step {step} written; exiting for requeue")
                    return REQUEUE_EXIT_CODE
                # save before validating: a failing validation or log must never cost the checkpoint
                if finite and self.checkpointer.due(step, t.steps) and not self.save():
                    self._log(record)
                    return BAD_STEPS_EXIT_CODE
                if t.val_every and step % t.val_every == 0 or step == t.steps:
                    record.update(self.validate())
                if step % t.log_every == 0 or not finite or step == t.steps:
                    self._log(record)
        finally:
            progress.close()
        return 0

    def _log(self, record: dict) -> None:
        if self.log is not None:
            self.log.write(record)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if dist.is_initialized():
            dist.destroy_process_group()
