"""The plan as numbers (`plan`) and as the printed report (`format_plan`)."""

from __future__ import annotations

from retro.distributed.hardware import GpuSpec
from retro.model.config import RetroConfig
from retro.model.flops import FlopModel
from retro.planning.comm import GPUS_PER_NODE, comm_per_step, feasible_micro_batch
from retro.planning.compute import run_flops
from retro.planning.memory import memory_per_gpu, optimizer_split, sharding_units
from retro.training.job_config import JobConfig

SCALES = (8, 64, 512)


def gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def peak_bytes(memory: dict[str, float], checkpointing: str) -> float:
    """Peak bytes per GPU under `checkpointing` ("none" / "recurrence"): every state, the activations held
    for backward and the transient on top of them."""
    states = sum(v for k, v in memory.items() if not k.startswith("activation"))
    return (
        states
        + memory[f"activations, checkpointing={checkpointing}"]
        + memory[f"activation transient, checkpointing={checkpointing}"]
    )


def plan(
    job: JobConfig, model_config: RetroConfig, gpus: int, gpu: GpuSpec, mfu: float, teacher: RetroConfig | None = None
) -> dict:
    """Everything the report prints, as numbers (also what --json writes); `teacher`: distill.teacher's config."""
    flops = FlopModel.from_config(model_config, job.data.seq_len)
    teacher_per_token = 0.0
    if teacher is not None:
        teacher_r = teacher.default_recurrences if teacher.is_recurrent else 1
        teacher_per_token = FlopModel.from_config(teacher, job.data.seq_len).forward_per_token(teacher_r)
    run = run_flops(job, flops, teacher_per_token)
    units = sharding_units(model_config)
    muon, adamw = optimizer_split(model_config, job.optim.name)
    rate = mfu * gpu.peak_flops * gpus
    for p in run["phases"]:
        p["step_s"] = p["flops_per_step"] / rate
        p["p99_step_s"] = p["p99_flops_per_step"] / rate
        p["tokens_per_s"] = run["tokens_per_step"] / p["step_s"]
    run_seconds = run["total_flops"] / rate
    split = feasible_micro_batch(job, gpus)
    last = run["phases"][-1]
    shard = gpus // job.parallel.replicate
    memory = (
        memory_per_gpu(
            model_config,
            job,
            shard,
            split[0] if split else job.train.micro_batch,
            last["p99_k"],
            accum=split[1] if split else 1,
            teacher=teacher,
        )
        if shard >= 1
        else {}
    )
    teacher_comm = {"teacher_params": sum(sharding_units(teacher).values())} if teacher is not None else {}
    comm = []
    for n in SCALES:
        s = feasible_micro_batch(job, n)
        for mode, group in (("FSDP", n), ("HSDP", min(GPUS_PER_NODE, n))):
            if s is None:
                comm.append({"gpus": n, "mode": mode, "note": f"global_batch {job.train.global_batch} < {n} GPUs"})
                continue
            c = comm_per_step(units, muon, n, group, s[1], job.parallel.reshard_after_forward, **teacher_comm)
            seconds = c["intra_node"] / gpu.intra_node_bw + c["inter_node"] / gpu.inter_node_bw
            compute = last["flops_per_step"] / (mfu * gpu.peak_flops * n)
            comm.append(
                {
                    "gpus": n,
                    "mode": mode,
                    "shard_group": group,
                    "micro_batch": s[0],
                    "accumulation": s[1],
                    **c,
                    "comm_s": seconds,
                    "compute_s": compute,
                }
            )
    return {
        "model": {
            "parameters": sum(units.values()),
            "units": units,
            "muon_params": muon,
            "adamw_params": adamw,
            "shape": [model_config.n_prelude, model_config.n_recurrent, model_config.n_coda],
            "hidden": model_config.hidden_size,
            "vocab": model_config.vocab_size,
        },
        "gpus": gpus,
        "mfu": mfu,
        "peak_flops": gpu.peak_flops,
        "gpu_memory": gpu.memory_bytes,
        "run": {
            **run,
            "seconds": run_seconds,
            "gpu_hours": run_seconds * gpus / 3600,
            "tokens_per_s": run["tokens"] / run_seconds,
        },
        "micro_batch": split,
        "memory": memory,
        "comm": comm,
    }


def format_plan(p: dict, job: JobConfig) -> str:
    m, run = p["model"], p["run"]
    lines = [
        f"model: {m['parameters'] / 1e6:.1f}M parameters, shape {tuple(m['shape'])}, h={m['hidden']}, "
        f"vocab {m['vocab']}; units: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in m["units"].items() if v),
        f"run: {job.train.steps} steps x {run['tokens_per_step']:,} tokens; {p['gpus']} GPUs at MFU {p['mfu']:.0%} "
        f"of {p['peak_flops'] / 1e12:.0f} TFLOP/s; recurrence M={job.recurrence.max_mean:g} "
        f"({job.recurrence.curriculum}, ramp {job.recurrence.ramp_fraction:.0%}), s={job.recurrence.backprop_depth}",
        "",
        "per step (expected over the sampled r; p99 = the r distribution's 99th percentile):",
        f"{'m':>4} {'from step':>9} {'steps':>7} {'E[r]':>6} {'E[k]':>5} {'PFLOP/step':>11} {'step s':>8} "
        f"{'tokens/s':>11} {'p99 r':>6} {'p99 step s':>10}",
    ]
    phases = run["phases"]
    shown = (
        phases if len(phases) <= 12 else phases[:4] + phases[len(phases) // 2 - 1 : len(phases) // 2 + 1] + phases[-4:]
    )
    for ph in shown:
        lines.append(
            f"{ph['mean']:>4} {ph['first_step']:>9} {ph['steps']:>7} {ph['E[r]']:>6.2f} {ph['E[k]']:>5.2f} "
            f"{ph['flops_per_step'] / 1e15:>11.2f} {ph['step_s']:>8.2f} {ph['tokens_per_s']:>11,.0f} "
            f"{ph['p99_r']:>6} {ph['p99_step_s']:>10.2f}"
        )
    lines += [
        "",
        f"per run: {run['total_flops']:.3e} FLOPs, {run['tokens'] / 1e9:.2f}B tokens, "
        f"{run['seconds'] / 3600:.1f} h wall, {run['gpu_hours']:,.0f} GPU-hours, mean "
        f"{run['tokens_per_s']:,.0f} tokens/s",
    ]
    if run["teacher_flops_per_step"]:
        share = run["teacher_flops_per_step"] / phases[-1]["flops_per_step"]
        lines.append(
            f"distillation: the teacher's forward adds {run['teacher_flops_per_step'] / 1e15:.2f} PFLOP every step "
            f"({share:.0%} of a final-phase step), included above"
        )
    if p["memory"]:
        mb = p["micro_batch"]
        lines += [
            "",
            f"memory per GPU ({p['gpus']} GPUs, shard group {p['gpus'] // job.parallel.replicate}, "
            f"micro-batch {mb[0] if mb else '?'} x {job.data.seq_len}, k = {phases[-1]['p99_k']} grad passes "
            f"at p99 r = {phases[-1]['p99_r']}; activation memory depends on k <= s, not on n; layers "
            f"{'compiled' if job.parallel.compile else 'eager'} (parallel.compile)):",
        ]
        mem = p["memory"]
        for key, value in mem.items():
            lines.append(f"  {key:<48} {gib(value):>12}")
        for mode in ("none", "recurrence"):
            peak = peak_bytes(mem, mode)
            fits = "fits" if peak < 0.9 * p["gpu_memory"] else "DOES NOT FIT"
            lines.append(
                f"  {'peak estimate, checkpointing=' + mode:<48} {gib(peak):>12}  ({fits} in {gib(p['gpu_memory'])})"
            )
    lines += [
        "",
        "communication per GPU per optimizer step (bf16 all-gathers, fp32 reductions; at the final m):",
        f"{'GPUs':>5} {'mode':>5} {'group':>5} {'mb x acc':>8} {'all-gather':>11} {'red-scatter':>11} "
        f"{'all-reduce':>11} {'muon a2a':>10} {'intra-node':>11} {'inter-node':>11} {'comm s':>7} {'compute s':>9}",
    ]
    for c in p["comm"]:
        if "note" in c:
            lines.append(f"{c['gpus']:>5} {c['mode']:>5}  n/a: {c['note']}")
            continue
        lines.append(
            f"{c['gpus']:>5} {c['mode']:>5} {c['shard_group']:>5} {c['micro_batch']:>3} x {c['accumulation']:<3}"
            + "".join(f" {gib(c[k]):>11}" for k in ("all_gather", "reduce_scatter", "all_reduce"))
            + f" {gib(c['muon_all_to_all']):>10} {gib(c['intra_node']):>11} {gib(c['inter_node']):>11}"
            f" {c['comm_s']:>7.2f} {c['compute_s']:>9.2f}"
        )
    lines.append(
        "comm s: bytes / bandwidth (NVLink within a node, one NIC per GPU across nodes), no overlap; "
        "compute s: the step's FLOPs at the given MFU"
    )
    return "\n".join(lines)
