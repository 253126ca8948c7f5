"""The Trainer: builds a run from its JobConfig, then `fit` resumes and steps until done.

`__init__` only builds (model, optimizer, objective, schedules); it reads no shard and writes no file.
`fit` loads the checkpoint first (as torchtitan's `train()` does), prepares the run directory, then
repeats step -> decide -> act. One optimizer step: the recurrence of each micro-batch (n no-grad + k
grad passes) from the schedule, the same on every rank; gradient accumulation with gradient sync on
the last micro-batch only, the loss a mean over the step's loss tokens on all ranks; clipping; a
non-finite step is skipped, not applied; LR schedule; metrics. When to save is the Checkpointer's
decision, what to save is the TrainState's.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from retro.distributed.hardware import peak_flops
from retro.distributed.setup import DistInfo, all_reduce_mean, all_reduce_sum, build_mesh, compute_dtype
from retro.model.config import RetroConfig
from retro.model.flops import FlopModel
from retro.model.loss import IGNORE_INDEX
from retro.optim import build_optimizer
from retro.optim.build import rebase_learning_rates, scheduler_for
from retro.training.checkpoint import Checkpointer, complete_checkpoints
from retro.training.distill import build_teacher
from retro.training.errors import TrainingError
from retro.training.job_config import JobConfig
from retro.training.metrics import MetricsLog, StepCost
from retro.training.model_source import build_model
from retro.training.objective import CrossEntropy, Distillation, Objective
from retro.training.preflight import reshard_warning
from retro.training.progress import Progress
from retro.training.recurrence import Draw, RecurrenceSchedule, state_generator
from retro.training.resume_check import recorded_tokens_per_step, run_record
from retro.training.run_dir import prepare_run_dir
from retro.training.signals import REQUEUE_EXIT_CODE, SignalFlag
from retro.training.train_state import TrainState
from retro.training.validate import validation_losses

BAD_STEPS_EXIT_CODE = 3
LOST_EXIT_CODE = 2  # the run directory was taken over by another run (as when it is held at start-up)


class Trainer:
    def __init__(
        self,
        job: JobConfig,
        info: DistInfo,
        model_config: RetroConfig,
        owns_run_dir: Callable[[], bool] | None = None,
    ) -> None:
        """Build the run: nothing here reads data or writes a file (`fit` does, in that order).

        `owns_run_dir` (rank 0, from its run-directory lock): asked once per step whether the directory is
        still this run's; when not, every rank stops before writing anything more."""
        self.job, self.info, self.model_config = job, info, model_config
        self.owns_run_dir = owns_run_dir
        t = job.train
        self.out_dir = Path(t.out_dir)
        self.recurrence = RecurrenceSchedule.from_settings(job.recurrence, t.steps, t.seed)
        self.mesh = build_mesh(info, job.parallel.replicate)
        self.dtype = compute_dtype(t.dtype, info.device)
        self.model = build_model(
            job.model, model_config, job.parallel, self.mesh, info.device, self.dtype, t.seed, t.trainable, job.lora
        )
        self.optimizer = build_optimizer(self.model, job.optim)
        self.scheduler = scheduler_for(self.optimizer, job.optim, t.steps)
        self.objective: Objective = CrossEntropy()
        if job.distill.enabled:
            teacher = build_teacher(job.distill, model_config, job.parallel, self.mesh, info.device, self.dtype)
            self.objective = Distillation(teacher, job.distill, job.data.seq_len)
        self.accumulation = t.global_batch // (t.micro_batch * info.world_size)
        record = run_record(job, model_config)
        self.checkpointer = Checkpointer(job.checkpoint, self.out_dir, info.rank, info.world_size, record)
        self.flops = FlopModel.from_config(model_config, job.data.seq_len)
        tokens, peak = t.global_batch * job.data.seq_len, peak_flops(info.device)
        self.cost = StepCost(tokens, self._flops_per_token, peak, info.world_size, info.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.state: TrainState | None = None  # the data position and step: set by `start`
        self.log: MetricsLog | None = None
        self.resumed_from: Path | None = None
        self.finished = False  # the resumed checkpoint is already at train.steps

    def start(self) -> None:
        """Open the data, resume from the newest complete checkpoint if any, prepare the run directory."""
        t, info = self.job.train, self.info
        loader = self.job.data.train_loader(t.micro_batch, info.rank, info.world_size, t.seed)
        self.state = TrainState(self.scheduler, loader, tokens=0)
        self.val_batches = self.job.data.val_batches(t.micro_batch, info.rank, info.world_size, t.val_batches)
        self.resumed_from = self.checkpointer.resume_path()
        if self.resumed_from is not None:
            self._resume(self.resumed_from)
        self.finished = self.state.step >= t.steps
        if self.finished:  # a re-run of a finished run: nothing to train, so nothing in out_dir is rewritten
            self._say(
                f"nothing to do: {self.resumed_from} is at step {self.state.step}, train.steps = {t.steps}; "
                "out_dir is left as it was (raise train.steps to train on)"
            )
            return
        if info.is_main:
            resumed_step = self.state.step if self.resumed_from is not None else None
            run_id = self.checkpointer.record.get("run_id")
            self.log = prepare_run_dir(self.out_dir, self.job, self.model_config, resumed_step, run_id)
            start = f"resuming from {self.resumed_from}" if self.resumed_from else "fresh start"
            self._say(
                f"{info.world_size} rank(s) on {info.device}, {self.dtype}, accumulation {self.accumulation}, {start}"
            )
            self._say(self._what_trains())
        self.batches = iter(loader)

    def _what_trains(self) -> str:
        trained = sum(p.numel() for p in self.params)
        total = sum(p.numel() for p in self.model.parameters())
        frozen = f", {total - trained:,} frozen" if trained < total else ""
        return f"train.trainable = {self.job.train.trainable}: {trained:,} of {total:,} parameters train{frozen}"

    def _say(self, text: str, error: bool = False) -> None:
        if self.info.is_main:
            print(f"retro.train: {text}", file=sys.stderr if error else sys.stdout, flush=True)

    def _resume(self, path: Path) -> None:
        self.checkpointer.load(path, self.model, self.optimizer, self.state)
        if self.state.tokens is None:  # a checkpoint from before the count: its run's batch x seq_len per step
            per_step = recorded_tokens_per_step(path, self.out_dir) or self.cost.tokens_per_step
            self.state.tokens = self.state.step * per_step
        if self.state.reshard is not None:
            self._say(
                reshard_warning(self.state.reshard, path, self.state.step, self.job).removeprefix("retro.train: "), True
            )
        for name, old, new in rebase_learning_rates(self.optimizer, self.scheduler, self.job.optim):
            self._say(
                f"note: {name} changed from {old:g} (checkpoint) to {new:g} (config); training continues at {new:g}"
            )

    def _any_rank_signalled(self, signals: SignalFlag) -> bool:
        """Whether any rank got a signal (all-reduced, so every rank takes the same exit)."""
        flag = torch.tensor([float(signals.raised)], dtype=torch.float64, device=self.info.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _agree(self, draws: list[Draw], signals: SignalFlag) -> str | None:
        """The step's one agreement all-reduce: every rank drew the same r (a rank that drew another would
        silently train a different model), and what interrupts the run on every rank together: "lost" (rank
        0's run-directory lock is no longer this run's: another run took the directory over while this one
        was stopped or unreachable) over "signal" (any rank got SIGTERM/SIGUSR1, so all save together)."""
        r = torch.tensor([d.r for d in draws], dtype=torch.float64, device=self.info.device)
        lost = self.owns_run_dir is not None and not self.owns_run_dir()
        interrupt = 2.0 if lost else float(signals.raised)
        mine = torch.cat([r, -r, torch.tensor([interrupt], dtype=torch.float64, device=r.device)])
        agreed = mine.clone()
        if dist.is_initialized():
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        if not torch.equal(agreed[:-1], mine[:-1]):
            raise TrainingError(
                f"ranks disagree on the recurrence at this step (rank {self.info.rank} drew {r.tolist()})"
            )
        return {0.0: None, 1.0: "signal", 2.0: "lost"}[agreed[-1].item()]

    def loss_weights(self, batches: list[dict]) -> torch.Tensor:
        """Per micro-batch: its loss tokens x ranks / the step's loss tokens on all ranks (one all-reduce).

        The model's loss is a mean over a micro-batch's loss tokens (labels not IGNORE_INDEX); weighted so,
        and averaged over ranks by the gradient reduction, the step's gradient is that of the mean over every
        loss token of the step, however unevenly a loss mask spreads them over micro-batches and ranks.
        Without masks every weight is 1 / accumulation. A step without any loss token gets weights 0.
        """
        counts = torch.stack([(b["labels"] != IGNORE_INDEX).sum() for b in batches]).to(self.info.device)
        total = all_reduce_sum(counts.sum().double())
        return (counts.double() * self.info.world_size / total.clamp(min=1)).float()

    def forward_backward(self, batch: dict, step: int, micro: int, draw: Draw, weight: torch.Tensor) -> torch.Tensor:
        """One micro-batch: loss x weight (`loss_weights`) backpropagated through the last k of n + k passes.

        Returns [loss, *the objective's parts] x weight, detached.
        """
        device = self.info.device
        autocast = self.dtype != torch.float32 and self.mesh is None  # FSDP2 casts through its mixed precision
        input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        generator = state_generator(self.job.train.seed, step, micro, self.info.rank, device)
        with torch.autocast(device.type, dtype=self.dtype, enabled=autocast):
            head_loss = self.objective.head_loss(input_ids, labels, generator)
            loss = self.model(
                input_ids,
                shift_labels=labels,
                num_recurrences=(draw.n, draw.k),
                return_logits=False,
                generator=generator,
                loss_fn=head_loss,
            ).loss
        self.objective.release()
        (loss * weight).backward()
        loss = loss.detach().float()
        return torch.stack([loss, *self.objective.parts(head_loss, loss)]) * weight

    def train_step(self, step: int, signals: SignalFlag) -> tuple[dict, bool]:
        """Optimizer step `step` (0-based): its metrics record ("skipped" if not finite), and whether any
        rank had a signal by the end of its micro-batches."""
        started = time.perf_counter()
        device = self.info.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        draws = self.recurrence.draws(step, self.accumulation)
        batches = [next(self.batches) for _ in draws]
        weights = self.loss_weights(batches)
        loss_sum = torch.zeros(1 + len(self.objective.part_names), device=device)
        for micro, (draw, batch) in enumerate(zip(draws, batches)):
            if hasattr(self.model, "set_requires_gradient_sync"):
                self.model.set_requires_gradient_sync(micro == self.accumulation - 1)
            loss_sum += self.forward_backward(batch, step, micro, draw, weights[micro])
        interrupt = self._agree(draws, signals)
        losses = dict(zip(("loss", *self.objective.part_names), all_reduce_mean(loss_sum).tolist()))
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.job.train.grad_clip)
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        if math.isfinite(losses["loss"]) and math.isfinite(grad_norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.step = step + 1
        self.state.tokens += self.cost.tokens_per_step
        elapsed = time.perf_counter() - started
        lrs = self.scheduler.get_last_lr()
        return self.cost.record(step + 1, losses, grad_norm, lrs, draws, elapsed, self.state.tokens), interrupt

    def _flops_per_token(self, n: float, k: float) -> float:
        """The step's work per token: the student's n no-grad + k grad passes, and the objective's own."""
        return self.flops.per_token(n, k) + self.objective.flops_per_token

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
            diverged = f"weights are not finite after step {self.state.step} (diverged)"
            self._say(f"error: {diverged}; not saving; {self.what_exists()}", True)
            return False
        self.checkpointer.save(self.state.step, self.model, self.optimizer, self.state)
        return True

    def fit(self, signals: SignalFlag | None = None) -> int:
        """Resume, then train to train.steps; returns the exit code (0, REQUEUE_EXIT_CODE after a signal,
        BAD_STEPS_EXIT_CODE). `signals`: the flag retro.train installed before start-up (else one now); a
        signal raised during start-up exits for requeue before the first step, nothing saved."""
        signals = signals or SignalFlag()
        self.start()
        if self.finished:
            return 0
        if self._any_rank_signalled(signals):
            self._say(f"signal received during start-up, before the first step; nothing saved; {self.what_exists()}")
            return REQUEUE_EXIT_CODE
        t = self.job.train
        progress = Progress(t.steps, self.state.step, enabled=self.info.is_main)
        bad_in_a_row = 0
        self.model.train()
        try:
            while self.state.step < t.steps:
                record, interrupt = self.train_step(self.state.step, signals)
                finite = not record["skipped"]
                bad_in_a_row = 0 if finite else bad_in_a_row + 1
                progress.update(loss=f"{record['loss']:.4f}", r=record["r"], m=record["mean_recurrence"])
                if not finite:
                    loss, norm = record["loss"], record["grad_norm"]
                    why = f"non-finite loss {loss} or grad norm {norm}; update skipped ({bad_in_a_row} in a row)"
                    self._say(f"step {record['step']}: {why}", True)
                decision = self.decide(record["step"], finite, bad_in_a_row, interrupt)
                exit_code = self.act(decision, record, bad_in_a_row)
                if exit_code is not None:
                    return exit_code
        finally:
            progress.close()
        return 0

    def decide(self, step: int, finite: bool, bad_in_a_row: int, interrupt: str | None) -> Decision:
        """What follows step `step`: stop (the directory taken over, too many non-finite steps, or a signal),
        save, validate, log."""
        t = self.job.train
        if interrupt == "lost":  # the directory is another run's now: write nothing more into it
            return Decision(stop="lost", save=False, validate=False, log=False)
        if bad_in_a_row > t.max_bad_steps or (not finite and step == t.steps):
            # never save weights that just gave a non-finite loss: they would poison every resume
            return Decision(stop="non-finite", save=False, validate=False, log=True)
        if interrupt == "signal":  # a non-finite step is not saved: the next job resumes from the last good checkpoint
            return Decision(stop="signal", save=finite, validate=False, log=True)
        return Decision(
            stop=None,
            save=finite and self.checkpointer.due(step, t.steps),
            validate=bool(t.val_every and step % t.val_every == 0 or step == t.steps),
            log=step % t.log_every == 0 or not finite or step == t.steps,
        )

    def act(self, decision: Decision, record: dict, bad_in_a_row: int) -> int | None:
        """Carry out a decision, saving first (a failing validation or log must never cost the checkpoint);
        returns the exit code when the run stops here."""
        t, step = self.job.train, record["step"]
        if decision.save and not self.save():
            self._log(record)
            return BAD_STEPS_EXIT_CODE
        if decision.validate:
            record.update(self.validate())
        if decision.log:
            self._log(record)
        if decision.stop == "non-finite":
            why = (
                f"{bad_in_a_row} non-finite steps in a row exceeds train.max_bad_steps = {t.max_bad_steps}"
                if bad_in_a_row > t.max_bad_steps
                else "the last step was not finite"
            )
            self._say(f"stopping: {why}; these weights are not saved; {self.what_exists()}", True)
            return BAD_STEPS_EXIT_CODE
        if decision.stop == "lost":
            self._say(
                f"error: {self.out_dir / '.retro-lock'} is no longer this run's: another run took {self.out_dir} "
                f"over while this one was stopped or unreachable; stopping after step {step} without saving or "
                "logging it, since the directory is the other run's now",
                True,
            )
            return LOST_EXIT_CODE
        if decision.stop == "signal":
            if decision.save:
                self._say(f"signal received; checkpoint at step {step} written; exiting for requeue")
            else:
                self._say(f"signal received at a non-finite step; not saved; {self.what_exists()}", True)
            return REQUEUE_EXIT_CODE
        return None

    def _log(self, record: dict) -> None:
        if self.log is not None:
            self.log.write(record)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


@dataclass(frozen=True)
class Decision:
    """What the loop does after a step; `stop` ("lost" | "non-finite" | "signal") ends the run after the rest."""

    stop: str | None
    save: bool
    validate: bool
    log: bool
