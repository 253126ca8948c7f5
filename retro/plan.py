"""`python -m retro.plan --config X.toml --gpus N`: what a run will cost before it is launched.

Per step and per run: loop-aware FLOPs over the recurrence curriculum (retro.metrics.FlopModel,
retro.recurrence.RecurrenceSchedule), tokens/s and wall time at an assumed MFU, memory per GPU
(parameters, gradients, optimizer state, activations with and without per-recurrence
checkpointing at the tail of the sampled r distribution), and the communication volume of one
step for FSDP vs HSDP at 8, 64 and 512 GPUs. `--check` compares the memory and FLOP model with
what a small CPU model actually allocates and computes (retro/plan_check.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from retro.config import Config, ConfigError, load_config, split_cli_overrides
from retro.metrics import FlopModel
from retro.model_config import RetroConfig
from retro.recurrence import RecurrenceSchedule, r_pmf


@dataclass(frozen=True)
class GpuSpec:
    peak_flops: float  # dense bf16 FLOP/s (spec sheet)
    memory_bytes: float
    intra_node_bw: float  # bytes/s per GPU, one direction (NVLink)
    inter_node_bw: float  # bytes/s per GPU, one direction (one NIC per GPU)


GPUS = {
    "h200": GpuSpec(989e12, 141e9, 450e9, 50e9),
    "h100": GpuSpec(989e12, 80e9, 450e9, 50e9),
    "a100": GpuSpec(312e12, 80e9, 300e9, 25e9),
}

# Shapes of the paper's three models after surgery (public HF configs; embeddings untied by convert).
PRESETS = {
    "tinyllama-484": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                          num_key_value_heads=4, n_prelude=4, n_recurrent=8, n_coda=4),
    "llama32-464": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                        num_key_value_heads=8, n_prelude=4, n_recurrent=6, n_coda=4),
    "olmo2-464": dict(vocab_size=100352, hidden_size=2048, intermediate_size=8192, num_attention_heads=16,
                      num_key_value_heads=16, n_prelude=4, n_recurrent=6, n_coda=4, norm_position="post", qk_norm="full"),
}

SCALES = (8, 64, 512)
GPUS_PER_NODE = 8
LOSS_CHUNK_ROWS = 4096  # retro.loss.linear_cross_entropy's default
TAIL = 0.99


def model_shape(cfg: Config, model_config: str | None = None, preset: str | None = None) -> RetroConfig:
    """The model's shape: a preset, a config.json given directly, or the one under model.path."""
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
        return RetroConfig(**PRESETS[preset])
    path = Path(model_config) if model_config else Path(cfg.model.path) / "config.json"
    if not path.is_file():
        raise ConfigError(f"no model config at {path}: set model.path to a retro.convert directory, or pass "
                          f"--model-config FILE.json or --preset {{{','.join(PRESETS)}}}")
    return RetroConfig(**{k: v for k, v in json.loads(path.read_text()).items() if k not in ("architectures", "model_type")})


# ---------------------------------------------------------------- parameters and sharding units


def meta_model(config: RetroConfig) -> torch.nn.Module:
    from retro.model import RetroForCausalLM
    with torch.device("meta"):
        return RetroForCausalLM(config)


def sharding_units(config: RetroConfig) -> dict[str, int]:
    """Parameters per FSDP2 unit (retro/parallel.py): each prelude/coda layer, the core, the root."""
    model = meta_model(config).model
    units = {f"prelude.{i}": sum(p.numel() for p in layer.parameters()) for i, layer in enumerate(model.prelude)}
    units["core"] = sum(p.numel() for p in model.recurrent.parameters()) if model.recurrent is not None else 0
    units.update({f"coda.{i}": sum(p.numel() for p in layer.parameters()) for i, layer in enumerate(model.coda)})
    total = sum(p.numel() for p in meta_model(config).parameters())
    units["root"] = total - sum(units.values())
    return units


def optimizer_split(config: RetroConfig, name: str) -> tuple[int, int]:
    """(Muon parameters, AdamW parameters) under the trainer's grouping rule (retro.optim.build)."""
    from retro.optim.build import group_parameters
    groups = group_parameters(meta_model(config))
    muon = sum(p.numel() for g in groups if g["use_muon"] for p in g["params"])
    adamw = sum(p.numel() for g in groups if not g["use_muon"] for p in g["params"])
    return (muon, adamw) if name == "muon" else (0, muon + adamw)


# ---------------------------------------------------------------- memory


def layer_activation_bytes(config: RetroConfig, dtype_bytes: int, fused_norm: bool) -> float:
    """Bytes one decoder layer keeps for backward, per token.

    Counted from what autograd saves in retro/layers.py: every RMSNorm keeps its input, fp32 rstd
    and (unfused, as on CPU) the normalised tensor; the fused QKV output stays alive through the
    V view SDPA keeps; SDPA keeps rotated q, k, its output and an fp32 log-sum-exp per head; the
    o_proj input is a reshaped copy; SwiGLU keeps gate|up, silu(gate) and their product.
    """
    h, q = config.hidden_size, config.num_attention_heads * config.head_dim
    kv, i = config.num_key_value_heads * config.head_dim, config.intermediate_size

    def norm(width: int) -> float:  # input (+ normalised copy when unfused) in compute dtype, rstd fp32
        return (width + (0 if fused_norm else width)) * dtype_bytes + 4

    attention = (q + 2 * kv + q + kv + q + q) * dtype_bytes + 4 * config.num_attention_heads
    mlp = 4 * i * dtype_bytes
    if config.norm_position == "pre":  # norm(x) -> linear: the norm's output is the linear's saved input
        return 2 * norm(h) + 2 * h * dtype_bytes + attention + mlp
    qk = norm(q) + norm(kv) if config.qk_norm != "none" else 0
    return 2 * h * dtype_bytes + qk + attention + mlp + 2 * norm(h)  # x, x' as linear inputs; norms after


def activation_bytes(config: RetroConfig, tokens: int, k: int, checkpointing: str, dtype_bytes: int,
                     fused_norm: bool) -> dict[str, float]:
    """Bytes kept for backward by one micro-batch of `tokens` with k grad passes, and the transient
    peak on top of it (one pass or layer recomputed during backward; one loss chunk's logits)."""
    h, b = config.hidden_size, dtype_bytes
    layer = layer_activation_bytes(config, b, fused_norm) * tokens
    one_pass = h * b * tokens + config.n_recurrent * layer  # adapter input + the block's layers
    stage_layers = config.n_prelude + config.n_coda
    held = 8 * tokens + config.head_dim * b * tokens  # token ids (int64), rope cos + sin (shared)
    held += h * b * tokens if config.is_recurrent else 0  # e, input of the once-per-forward injection
    if checkpointing == "full":
        held += stage_layers * h * b * tokens  # each prelude/coda layer keeps only its input
    else:
        held += stage_layers * layer
    if checkpointing in ("recurrence", "full"):
        held += (k * h * b * tokens + h * b * tokens) if config.is_recurrent else 0  # pass inputs + shared injection
        recompute = max(one_pass if config.is_recurrent else 0, layer if checkpointing == "full" else 0)
    else:
        held += k * one_pass if config.is_recurrent else 0
        recompute = 0
    held += (h + (0 if fused_norm else h)) * b * tokens + 4 * tokens  # final norm
    loss_saved = h * b * tokens + 4 * config.vocab_size * h  # grad wrt hidden, fp32 grad wrt head weight
    loss_chunk = min(tokens, LOSS_CHUNK_ROWS) * config.vocab_size * (4 + b)  # fp32 log-probs + grad logits
    return {"held": held + loss_saved, "transient": recompute + loss_chunk}


def memory_per_gpu(config: RetroConfig, cfg: Config, shard: int, micro_batch: int, k: int, on_gpu: bool = True,
                   accum: int = 1) -> dict[str, float]:
    """Bytes per GPU; parameters, gradients and optimizer state sharded over `shard` ranks (fp32)."""
    units = sharding_units(config)
    total = sum(units.values())
    muon, adamw = optimizer_split(config, cfg.optim.name)
    b = 2 if on_gpu and cfg.train.dtype != "fp32" else 4
    tokens = micro_batch * cfg.data.seq_len
    out = {
        "params (fp32, sharded)": 4 * total / shard,
        "grads (fp32, sharded)": 4 * total / shard,
        "optimizer state": (4 * muon + 8 * adamw) / shard,  # Muon: momentum; AdamW: exp_avg + exp_avg_sq
        "gathered units (current + prefetch)": 2 * max(units.values()) * b if shard > 1 else 0,
        "unsharded grads kept across micro-batches": total * 4 if accum > 1 and shard > 1 else 0,
    }
    for mode in ("none", "recurrence"):
        acts = activation_bytes(config, tokens, k, mode, b, fused_norm=on_gpu)
        out[f"activations, checkpointing={mode}"] = acts["held"]
        out[f"activation transient, checkpointing={mode}"] = acts["transient"]
    return out


# ---------------------------------------------------------------- FLOPs over the run


def schedule_of(cfg: Config) -> RecurrenceSchedule:
    r = cfg.recurrence
    return RecurrenceSchedule(max_mean=r.max_mean, curriculum=r.curriculum, ramp_steps=int(r.ramp_fraction * cfg.train.steps),
                              backprop_depth=r.backprop_depth, sigma=r.sigma, cap=r.cap or None, seed=cfg.train.seed)


def r_quantile(mean: float, sigma: float, q: float, cap: int | None) -> int:
    """Smallest r with P(r' <= r) >= q under the sampler (by quadrature, no sampling)."""
    upto = int(mean * 8 + 64)
    cdf = np.cumsum(r_pmf(mean, sigma, upto))
    r = int(np.searchsorted(cdf, q) + 1)
    return min(r, cap) if cap else r


def run_flops(cfg: Config, flops: FlopModel) -> dict:
    """Expected training FLOPs of every step of the curriculum, grouped by the mean m in force.

    per_token(n, k) is linear in n and k, so E[FLOPs] = per_token(E[n], E[k]) exactly.
    """
    schedule = schedule_of(cfg)
    tokens = cfg.train.global_batch * cfg.data.seq_len
    phases: dict[int, dict] = {}
    for step in range(cfg.train.steps):
        m = schedule.mean_at(step)
        if m not in phases:
            er, ek = schedule.expected_r(step), schedule.expected_k(step)
            tail_r = r_quantile(m, schedule.sigma, TAIL, schedule.cap)
            tail_n, tail_k = max(tail_r - schedule.depth_at(step), 0), min(tail_r, schedule.depth_at(step))
            phases[m] = {"mean": m, "first_step": step, "steps": 0, "E[r]": er, "E[k]": ek,
                         "flops_per_step": flops.per_token(er - ek, ek) * tokens, "p99_r": tail_r, "p99_k": tail_k,
                         "p99_flops_per_step": flops.per_token(tail_n, tail_k) * tokens}
        phases[m]["steps"] += 1
    total = sum(p["steps"] * p["flops_per_step"] for p in phases.values())
    return {"phases": list(phases.values()), "total_flops": total, "tokens": tokens * cfg.train.steps,
            "tokens_per_step": tokens}


# ---------------------------------------------------------------- communication


def feasible_micro_batch(cfg: Config, gpus: int) -> tuple[int, int] | None:
    """(micro-batch, accumulation steps) for this GPU count: the config's micro-batch, shrunk if the
    global batch has fewer sequences than micro_batch x GPUs; None if no split works."""
    for micro in range(min(cfg.train.micro_batch, cfg.train.global_batch // gpus), 0, -1):
        if cfg.train.global_batch % (micro * gpus) == 0:
            return micro, cfg.train.global_batch // (micro * gpus)
    return None


def comm_per_step(units: dict[str, int], muon_params: int, gpus: int, shard: int, accum: int, reshard: bool,
                  param_bytes: int = 2, reduce_bytes: int = 4) -> dict[str, float]:
    """Bytes each GPU receives per optimizer step (ring collectives: (g-1)/g of the full size).

    Every micro-batch all-gathers every unit for the forward, and again for the backward for
    units resharded after forward (FSDP2 keeps the root gathered). Gradients are reduce-scattered
    once per step (the trainer disables gradient sync on all but the last micro-batch); under HSDP
    the fp32 gradient shards are then all-reduced across the replicas. Muon moves each matrix
    shard to one owner rank and the update back (two all-to-alls inside the shard group).
    """
    replicas = gpus // shard
    total = sum(units.values())
    frac = (shard - 1) / shard
    regathered = sum(v for name, v in units.items() if name != "root") if reshard else 0
    gather = accum * frac * (total + regathered) * param_bytes
    scatter = frac * total * reduce_bytes
    allreduce = 2 * (replicas - 1) / replicas * total / shard * reduce_bytes
    muon = 2 * frac * muon_params / shard * reduce_bytes
    within_node = shard <= GPUS_PER_NODE
    return {"all_gather": gather, "reduce_scatter": scatter, "all_reduce": allreduce, "muon_all_to_all": muon,
            "intra_node": (gather + scatter + muon) if within_node else 0.0,
            "inter_node": allreduce + (0.0 if within_node else gather + scatter + muon)}


# ---------------------------------------------------------------- report


def gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def plan(cfg: Config, config: RetroConfig, gpus: int, gpu: GpuSpec, mfu: float) -> dict:
    """Everything the report prints, as numbers (also what --json writes)."""
    flops = FlopModel.from_config(config, cfg.data.seq_len)
    run = run_flops(cfg, flops)
    units = sharding_units(config)
    muon, adamw = optimizer_split(config, cfg.optim.name)
    rate = mfu * gpu.peak_flops * gpus
    for p in run["phases"]:
        p["step_s"] = p["flops_per_step"] / rate
        p["p99_step_s"] = p["p99_flops_per_step"] / rate
        p["tokens_per_s"] = run["tokens_per_step"] / p["step_s"]
    run_seconds = run["total_flops"] / rate
    split = feasible_micro_batch(cfg, gpus)
    last = run["phases"][-1]
    shard = gpus // cfg.parallel.replicate
    memory = memory_per_gpu(config, cfg, shard, split[0] if split else cfg.train.micro_batch, last["p99_k"],
                            accum=split[1] if split else 1) if shard >= 1 else {}
    comm = []
    for n in SCALES:
        s = feasible_micro_batch(cfg, n)
        for mode, group in (("FSDP", n), ("HSDP", min(GPUS_PER_NODE, n))):
            if s is None:
                comm.append({"gpus": n, "mode": mode, "note": f"global_batch {cfg.train.global_batch} < {n} GPUs"})
                continue
            c = comm_per_step(units, muon, n, group, s[1], cfg.parallel.reshard_after_forward)
            seconds = c["intra_node"] / gpu.intra_node_bw + c["inter_node"] / gpu.inter_node_bw
            compute = last["flops_per_step"] / (mfu * gpu.peak_flops * n)
            comm.append({"gpus": n, "mode": mode, "shard_group": group, "micro_batch": s[0], "accumulation": s[1], **c,
                         "comm_s": seconds, "compute_s": compute})
    return {"model": {"parameters": sum(units.values()), "units": units, "muon_params": muon, "adamw_params": adamw,
                      "shape": [config.n_prelude, config.n_recurrent, config.n_coda], "hidden": config.hidden_size,
                      "vocab": config.vocab_size},
            "gpus": gpus, "mfu": mfu, "peak_flops": gpu.peak_flops, "gpu_memory": gpu.memory_bytes,
            "run": {**run, "seconds": run_seconds, "gpu_hours": run_seconds * gpus / 3600,
                    "tokens_per_s": run["tokens"] / run_seconds},
            "micro_batch": split, "memory": memory, "comm": comm}


def format_plan(p: dict, cfg: Config) -> str:
    m, run = p["model"], p["run"]
    lines = [f"model: {m['parameters'] / 1e6:.1f}M parameters, shape {tuple(m['shape'])}, h={m['hidden']}, "
             f"vocab {m['vocab']}; units: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in m["units"].items() if v),
             f"run: {cfg.train.steps} steps x {run['tokens_per_step']:,} tokens; {p['gpus']} GPUs at MFU {p['mfu']:.0%} "
             f"of {p['peak_flops'] / 1e12:.0f} TFLOP/s; recurrence M={cfg.recurrence.max_mean:g} "
             f"({cfg.recurrence.curriculum}, ramp {cfg.recurrence.ramp_fraction:.0%}), s={cfg.recurrence.backprop_depth}",
             "", "per step (expected over the sampled r; p99 = the r distribution's 99th percentile):",
             f"{'m':>4} {'from step':>9} {'steps':>7} {'E[r]':>6} {'E[k]':>5} {'PFLOP/step':>11} {'step s':>8} "
             f"{'tokens/s':>11} {'p99 r':>6} {'p99 step s':>10}"]
    phases = run["phases"]
    shown = phases if len(phases) <= 12 else phases[:4] + phases[len(phases) // 2 - 1:len(phases) // 2 + 1] + phases[-4:]
    for ph in shown:
        lines.append(f"{ph['mean']:>4} {ph['first_step']:>9} {ph['steps']:>7} {ph['E[r]']:>6.2f} {ph['E[k]']:>5.2f} "
                     f"{ph['flops_per_step'] / 1e15:>11.2f} {ph['step_s']:>8.2f} {ph['tokens_per_s']:>11,.0f} "
                     f"{ph['p99_r']:>6} {ph['p99_step_s']:>10.2f}")
    lines += ["", f"per run: {run['total_flops']:.3e} FLOPs, {run['tokens'] / 1e9:.2f}B tokens, "
              f"{run['seconds'] / 3600:.1f} h wall, {run['gpu_hours']:,.0f} GPU-hours, mean {run['tokens_per_s']:,.0f} tokens/s"]
    if p["memory"]:
        mb = p["micro_batch"]
        lines += ["", f"memory per GPU ({p['gpus']} GPUs, shard group {p['gpus'] // cfg.parallel.replicate}, "
                  f"micro-batch {mb[0] if mb else '?'} x {cfg.data.seq_len}, k = {phases[-1]['p99_k']} grad passes "
                  f"at p99 r = {phases[-1]['p99_r']}; activation memory depends on k <= s, not on n):"]
        mem = p["memory"]
        for key, value in mem.items():
            lines.append(f"  {key:<48} {gib(value):>12}")
        states = sum(v for k, v in mem.items() if not k.startswith("activation"))
        for mode in ("none", "recurrence"):
            peak = states + mem[f"activations, checkpointing={mode}"] + mem[f"activation transient, checkpointing={mode}"]
            fits = "fits" if peak < 0.9 * p["gpu_memory"] else "DOES NOT FIT"
            lines.append(f"  {'peak estimate, checkpointing=' + mode:<48} {gib(peak):>12}  ({fits} in {gib(p['gpu_memory'])})")
    lines += ["", "communication per GPU per optimizer step (bf16 all-gathers, fp32 reductions; at the final m):",
              f"{'GPUs':>5} {'mode':>5} {'group':>5} {'mb x acc':>8} {'all-gather':>11} {'red-scatter':>11} "
              f"{'all-reduce':>11} {'muon a2a':>10} {'intra-node':>11} {'inter-node':>11} {'comm s':>7} {'compute s':>9}"]
    for c in p["comm"]:
        if "note" in c:
            lines.append(f"{c['gpus']:>5} {c['mode']:>5}  n/a: {c['note']}")
            continue
        lines.append(f"{c['gpus']:>5} {c['mode']:>5} {c['shard_group']:>5} {c['micro_batch']:>3} x {c['accumulation']:<3}"
                     + "".join(f" {gib(c[k]):>11}" for k in ("all_gather", "reduce_scatter", "all_reduce"))
                     + f" {gib(c['muon_all_to_all']):>10} {gib(c['intra_node']):>11} {gib(c['inter_node']):>11}"
                     f" {c['comm_s']:>7.2f} {c['compute_s']:>9.2f}")
    lines.append("comm s: bytes / bandwidth (NVLink within a node, one NIC per GPU across nodes), no overlap; "
                 "compute s: the step's FLOPs at the given MFU")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retro.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="training TOML (configs/*.toml); defaults of retro.config when omitted")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu", default="h200", choices=sorted(GPUS))
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed loop-aware MFU (0-1)")
    parser.add_argument("--model-config", help="a config.json with the model shape (instead of model.path)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a built-in shape of the paper's models")
    parser.add_argument("--json", type=Path, help="also write the numbers as JSON here")
    parser.add_argument("--check", action="store_true", help="compare the model with measurements on a small CPU model")
    args, rest = parser.parse_known_args(argv)
    if args.check:
        from retro.plan_check import main as check_main
        return check_main()
    try:
        cfg = load_config(args.config, split_cli_overrides(rest))
        if args.gpus < 1 or args.gpus % cfg.parallel.replicate:
            raise ConfigError(f"--gpus {args.gpus} must be a positive multiple of parallel.replicate = {cfg.parallel.replicate}")
        if not 0 < args.mfu <= 1:
            raise ConfigError(f"--mfu must be in (0, 1], got {args.mfu}")
        config = model_shape(cfg, args.model_config, args.preset)
    except (ConfigError, ValueError) as error:
        print(f"retro.plan: error: {error}", file=sys.stderr)
        return 2
    result = plan(cfg, config, args.gpus, GPUS[args.gpu], args.mfu)
    print(format_plan(result, cfg))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
