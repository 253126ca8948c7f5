"""`torchrun --nproc_per_node N -m retro.train --config X.toml [--section.key=value ...]`

FSDP2 post-training of a retrofitted recurrent model: per-step recurrence sampling (same on every
rank, keyed by the step), truncated backprop, gradient accumulation, clipping, LR schedule,
metrics, validation at several test recurrences, DCP checkpoints, signal-safe exits.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from retro import checkpoint
from retro.config import Config, ConfigError, load_config, save_config, split_cli_overrides
from retro.data.loader import build_train_loader, build_val_batches
from retro.data.mixture import Reshard
from retro.data.shards import TokenShards, check_tokenizer_matches
from retro.hf_weights import WeightReader
from retro.metrics import FlopModel, MetricsLog, peak_flops
from retro.model import RetroForCausalLM
from retro.model_config import RetroConfig
from retro.optim import build_optimizer
from retro.parallel import DistInfo, build_mesh, compute_dtype, init_distributed, load_rows_into, parallelize
from retro.recurrence import RecurrenceSchedule
from retro.rope import inverse_frequencies
from retro.schedule import build_scheduler

REQUEUE_EXIT_CODE = 85  # checkpoint written after SIGTERM/SIGUSR1: the launcher requeues the job
BAD_STEPS_EXIT_CODE = 3


class TrainingError(RuntimeError):
    pass


def model_config(cfg: Config) -> RetroConfig:
    path = Path(cfg.model.path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path = {cfg.model.path!r}: no config.json there (make one with python -m retro.convert)")
    config = RetroConfig.from_pretrained(path)
    found = [config.n_prelude, config.n_recurrent, config.n_coda]
    if cfg.model.shape and cfg.model.shape != found:
        raise ConfigError(f"model.shape = {cfg.model.shape} (prelude, recurrent, coda) but {path} has {found}")
    if cfg.model.state_init:
        config.state_init = cfg.model.state_init
    return config


def build_model(cfg: Config, config: RetroConfig, info: DistInfo, mesh, dtype: torch.dtype) -> RetroForCausalLM:
    """Meta-device model -> AC/compile/FSDP2 -> each rank reads only its own weight rows."""
    with torch.device("meta"):
        model = RetroForCausalLM(config)
    parallelize(model, mesh, cfg.parallel, dtype)
    model.to_empty(device=info.device)
    if cfg.model.init == "pretrained":
        reader = WeightReader(cfg.model.path)
        load_rows_into(model, reader.get_rows, reader.shape)
    else:  # from-scratch baseline: one seeded init, identical on every rank, then sliced
        torch.manual_seed(cfg.train.seed)
        full = RetroForCausalLM(config).state_dict()
        load_rows_into(model, lambda n, a, b: full[n][a:b], lambda n: list(full[n].shape))
    with torch.no_grad():
        model.model.inv_freq.copy_(inverse_frequencies(config.head_dim, config.rope_parameters))
    return model


def check_data(cfg: Config, config: RetroConfig, world_size: int) -> None:
    """Data/tokenizer/batch checks that must fail before any training starts."""
    if not cfg.data.train:
        raise ConfigError("data.train is empty: give prepared shard directories (python -m retro.data.prepare)")
    per_step = cfg.train.micro_batch * world_size
    if cfg.train.global_batch % per_step:
        raise ConfigError(f"train.global_batch = {cfg.train.global_batch} is not divisible by train.micro_batch x ranks "
                          f"= {cfg.train.micro_batch} x {world_size}")
    for source in cfg.data.train:
        check_tokenizer_matches(TokenShards(source, split="train"), config.vocab_size)


def recurrence_schedule(cfg: Config) -> RecurrenceSchedule:
    r = cfg.recurrence
    schedule = RecurrenceSchedule(max_mean=r.max_mean, curriculum=r.curriculum, ramp_steps=int(r.ramp_fraction * cfg.train.steps),
                                  backprop_depth=r.backprop_depth, sigma=r.sigma, cap=r.cap or None, seed=cfg.train.seed)
    schedule.validate()
    return schedule


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.AVG if value.device.type == "cuda" else dist.ReduceOp.SUM)
        if value.device.type != "cuda":
            value /= dist.get_world_size()
    return value


def state_generator(seed: int, step: int, micro: int, rank: int, device: torch.device) -> torch.Generator:
    """Initial-state noise keyed by (seed, step, micro-batch, rank): a resumed run draws the same."""
    return torch.Generator(device).manual_seed(((seed * 1_000_003 + step) * 1009 + micro) * 257 + rank)


@torch.no_grad()
def validate(model, batches, recurrences: list[int], device) -> dict[str, float]:
    model.eval()
    out = {}
    for r in recurrences:
        total = torch.zeros(2, device=device)
        for i, batch in enumerate(batches):
            loss = model(batch["input_ids"].to(device), shift_labels=batch["labels"].to(device), num_recurrences=r,
                         return_logits=False, generator=state_generator(0, 0, i, 0, device)).loss
            total += torch.stack([loss.float(), torch.ones((), device=device)])
        all_reduce_mean(total)
        out[f"val_loss_r{r}"] = (total[0] / total[1].clamp(min=1)).item()
    model.train()
    return out


def reshard_warning(plan: Reshard, path: Path, step: int, cfg: Config) -> str:
    """What changes when a checkpoint resumes on another number of ranks (printed by rank 0)."""
    text = (f"retro.train: warning: resuming {plan.old_world_size}-rank checkpoint {path} on {plan.new_world_size} "
            f"ranks; data order per source: {plan.describe([str(p) for p in cfg.data.train])}")
    if len(plan.reread) > 1:
        text += f"; {sum(plan.reread)} windows re-read in all"
    if step:  # every step read accumulation x micro_batch windows on each old rank
        state = plan.states[0]
        saved_global = state["batches"] // step * state["config"]["batch_size"] * plan.old_world_size
        if saved_global != cfg.train.global_batch:
            text += (f"; the global batch changes from {saved_global} (saved run) to train.global_batch = "
                     f"{cfg.train.global_batch}")
    return text


class SignalFlag:
    """SIGTERM / SIGUSR1 (SLURM's warning before the time limit) ask for a checkpoint and exit."""

    def __init__(self) -> None:
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def agreed(self, device) -> bool:
        flag = torch.tensor([float(self.raised)], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def train(cfg: Config) -> int:
    info = init_distributed()
    config = model_config(cfg)
    check_data(cfg, config, info.world_size)
    out_dir = Path(cfg.train.out_dir)
    schedule = recurrence_schedule(cfg)
    mesh = build_mesh(info, cfg.parallel.replicate)
    dtype = compute_dtype(cfg.train.dtype, info.device)
    model = build_model(cfg, config, info, mesh, dtype)
    o = cfg.optim
    optimizer = build_optimizer(model, muon_lr=o.muon_lr, muon_weight_decay=o.muon_weight_decay, adamw_lr=o.lr,
                                adamw_betas=tuple(o.betas), adamw_weight_decay=o.weight_decay, scale_rule=o.muon_scale,
                                split_fused=o.muon_split_fused, name=o.name)
    scheduler = build_scheduler(optimizer, total_steps=cfg.train.steps, warmup_steps=o.warmup_steps,
                                decay_steps=o.decay_steps, kind=o.schedule, min_ratio=o.min_lr_ratio)
    loader = build_train_loader(cfg.data.train, cfg.data.weights or None, cfg.data.seq_len, cfg.train.micro_batch,
                                info.rank, info.world_size, cfg.train.seed, cfg.data.num_workers)
    val_batches = list(build_val_batches(cfg.data.val or cfg.data.train[0], cfg.data.seq_len, cfg.train.micro_batch,
                                         info.rank, info.world_size, max(1, cfg.train.val_batches // info.world_size)))
    accum = cfg.train.global_batch // (cfg.train.micro_batch * info.world_size)

    start_step = 0
    resume_from = checkpoint.find_resume(out_dir, cfg.checkpoint.resume)
    if resume_from is not None:
        extra = checkpoint.load(resume_from, model, optimizer, info.rank, info.world_size)
        scheduler.load_state_dict(extra["scheduler"])
        if "reshard" in extra:  # written by another number of ranks
            loader.load_sampler_state(extra["sampler"])
            if info.is_main:
                print(reshard_warning(extra["reshard"], resume_from, extra["step"], cfg), file=sys.stderr, flush=True)
        else:
            loader.load_state_dict(extra["loader"])
        torch.set_rng_state(extra["rng"])
        start_step = extra["step"]
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.json")
        config.save_pretrained(out_dir / "model_config")
        print(f"retro.train: {info.world_size} rank(s) on {info.device}, {dtype}, accumulation {accum}, "
              f"{'resuming from ' + str(resume_from) if resume_from else 'fresh start'}", flush=True)
    log = MetricsLog(out_dir / "metrics.jsonl", out_dir / "tensorboard" if cfg.train.tensorboard else None) if info.is_main else None
    flops = FlopModel.from_config(config, cfg.data.seq_len)
    peak = peak_flops(info.device)
    tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
    signals = SignalFlag()
    params = [p for p in model.parameters() if p.requires_grad]
    batches = iter(loader)
    bad_in_a_row = 0
    exit_code = 0

    def save(step: int) -> None:
        extra = {"step": step, "scheduler": scheduler.state_dict(), "loader": loader.state_dict(), "rng": torch.get_rng_state()}
        checkpoint.save(out_dir, step, model, optimizer, extra, info.rank, cfg.checkpoint.keep_last)

    bar = tqdm(total=cfg.train.steps, initial=start_step, disable=not info.is_main, desc="train", dynamic_ncols=True)
    model.train()
    step = start_step
    while step < cfg.train.steps:
        started = time.perf_counter()
        if info.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        draw = schedule.sample_info(step)
        n, k = draw["n"], draw["k"]
        loss_sum = torch.zeros((), device=info.device)
        for micro in range(accum):
            batch = next(batches)
            if hasattr(model, "set_requires_gradient_sync"):
                model.set_requires_gradient_sync(micro == accum - 1)
            with torch.autocast(info.device.type, dtype=dtype, enabled=dtype != torch.float32 and mesh is None):
                loss = model(batch["input_ids"].to(info.device), shift_labels=batch["labels"].to(info.device),
                             num_recurrences=(n, k), return_logits=False,
                             generator=state_generator(cfg.train.seed, step, micro, info.rank, info.device)).loss
            (loss / accum).backward()
            loss_sum += loss.detach().float() / accum
        loss_value = all_reduce_mean(loss_sum).item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if finite:
            optimizer.step()
            bad_in_a_row = 0
        else:
            bad_in_a_row += 1
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        elapsed = time.perf_counter() - started
        record = {"step": step, "loss": loss_value, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[-1],
                  "lr_groups": scheduler.get_last_lr(), "n": n, "k": k, "r": n + k, "mean_recurrence": draw["mean"],
                  "capped": draw["capped"], "tokens": step * tokens_per_step, "tokens_per_s": tokens_per_step / elapsed,
                  "step_time_s": elapsed, "skipped": not finite,
                  "mfu": flops.per_token(n, k) * tokens_per_step / elapsed / peak / info.world_size,
                  "peak_memory_bytes": torch.cuda.max_memory_allocated() if info.device.type == "cuda" else None}
        if cfg.train.val_every and step % cfg.train.val_every == 0 or step == cfg.train.steps:
            record.update(validate(model, val_batches, cfg.train.val_recurrences, info.device))
        if log is not None and (step % cfg.train.log_every == 0 or not finite or step == cfg.train.steps):
            log.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", r=n + k, m=draw["mean"])
        if not finite:
            print(f"retro.train: step {step}: non-finite loss {loss_value} or grad norm {grad_norm}; update skipped "
                  f"({bad_in_a_row} in a row)", file=sys.stderr, flush=True)
            if bad_in_a_row > cfg.train.max_bad_steps:
                exit_code = BAD_STEPS_EXIT_CODE
                print(f"retro.train: stopping: {bad_in_a_row} non-finite steps in a row exceeds train.max_bad_steps = "
                      f"{cfg.train.max_bad_steps}; the last good checkpoint is kept unchanged", file=sys.stderr, flush=True)
                break
            continue
        if signals.agreed(info.device):
            save(step)
            exit_code = REQUEUE_EXIT_CODE
            if info.is_main:
                print(f"retro.train: signal received; checkpoint at step {step} written; exiting for requeue", flush=True)
            break
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == cfg.train.steps:
            save(step)
    bar.close()
    if log is not None:
        log.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retro.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML config (configs/*.toml)")
    parser.add_argument("--resume", help="auto | none | a checkpoint directory (same as --checkpoint.resume)")
    args, rest = parser.parse_known_args(argv)
    try:
        overrides = split_cli_overrides(rest)
        if args.resume:
            overrides.append(f"checkpoint.resume={args.resume}")
        cfg = load_config(args.config, overrides)
        if int(__import__("os").environ.get("RANK", "0")) == 0:
            print(f"retro.train: resolved config {cfg.to_dict()}", flush=True)
        return train(cfg)
    except (ConfigError, FileNotFoundError, ValueError, TrainingError) as error:
        print(f"retro.train: error: {error}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
