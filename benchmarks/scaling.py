"""What FSDP2 communication costs on CPU: 1 rank x 1 thread vs 2 ranks x 1 thread on the same global
batch, for the trainer's layout (recurrent core as one FSDP2 unit) and the naive one (each block
layer its own unit, re-gathered on every pass).

One training step is the trainer's: the model built by `retro.training.model_source.build_model` (FSDP2 via
`retro.distributed.parallelize`, per-recurrence activation checkpointing), forward + backward, loss
all-reduce, gradient clipping, optimizer step, at fixed r with k = min(r, backprop depth).
All layouts live in the same two gloo processes and are stepped in turn every round (rank 1
waits in a blocking barrier while rank 0 runs the 1-rank step), so machine noise hits all alike.
Scaling efficiency = t(1 rank) / (2 * t(2 ranks)): 1.0 is perfect, 0.5 is no gain from the second rank.
On shared cores wall time also measures the neighbours, so each row also reports CPU seconds per
step (summed over ranks; a rank blocked in a gloo collective uses none) and cpu_efficiency =
cpu(1 rank) / cpu(2 ranks): FSDP2's extra work, without the waiting.

    python -m benchmarks.scaling [--hidden 128 --shape 1,2,1 --vocab 2048 --seq 128 --batch 8 --recurrences 1,8 \
        --repeats 9]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import time
from collections.abc import Iterator
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard

import retro
import retro.training.model_source
from benchmarks.common import model_config, print_table, write_results
from retro.distributed.comm_count import count_fsdp_collectives
from retro.distributed.parallelize import ParallelSettings, decoder_layers, parallelize
from retro.distributed.setup import DistInfo, all_reduce_mean, build_mesh
from retro.optim import build_optimizer
from retro.training.job_config import JobConfig
from retro.training.model_source import build_model
from retro.training.recurrence import state_generator

LAYOUTS = ("1 rank", "2 ranks, core unit", "2 ranks, per-layer units")


def per_layer_parallelize(model: retro.RetroForCausalLM, mesh, settings: ParallelSettings, dtype: torch.dtype):
    """The naive layout of tests/distributed/test_parallel.py: every decoder layer (block layers included) its own
    unit, with parallelize's settings (fp32, reshard_after_forward except for the root) so only the
    unit boundaries differ from the trainer's layout."""
    if dtype != torch.float32:
        raise ValueError(f"per-layer baseline is fp32 only, got {dtype}")
    parallelize(model, None, settings, dtype)  # activation checkpointing flags only
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=settings.reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)  # as parallelize: the root stays gathered
    return model


def build(job: JobConfig, model_config: retro.RetroConfig, info: DistInfo, mesh, layout: str) -> retro.RetroForCausalLM:
    """The trainer's build_model (meta init, sharding, seeded weights sliced per rank), layout swapped in."""
    args = (job.model, model_config, job.parallel)
    if layout == "2 ranks, per-layer units":
        with mock.patch.object(retro.training.model_source, "parallelize", per_layer_parallelize):
            return build_model(*args, mesh, info.device, torch.float32, job.train.seed)
    return build_model(*args, mesh if layout != "1 rank" else None, info.device, torch.float32, job.train.seed)


@contextlib.contextmanager
def count_bytes() -> Iterator[dict]:
    """Bytes of the unsharded buffers FSDP2's all-gathers produce and its reduce-scatters consume, per rank."""
    sizes = {"all_gather": 0, "reduce_scatter": 0}
    gather, reduce = dist.all_gather_single, dist.reduce_scatter_single

    def counted_gather(output, input, *args, **kwargs):
        sizes["all_gather"] += output.numel() * output.element_size()
        return gather(output, input, *args, **kwargs)

    def counted_reduce(output, input, *args, **kwargs):
        sizes["reduce_scatter"] += input.numel() * input.element_size()
        return reduce(output, input, *args, **kwargs)

    dist.all_gather_single, dist.reduce_scatter_single = counted_gather, counted_reduce
    try:
        yield sizes
    finally:
        dist.all_gather_single, dist.reduce_scatter_single = gather, reduce


class LayoutStep:
    """One layout's model, optimizer and batch slice; `step` is the trainer's step with one micro-batch."""

    def __init__(self, cfg: JobConfig, config: retro.RetroConfig, info: DistInfo, mesh, layout: str, ids: torch.Tensor):
        self.sharded = layout != "1 rank"
        self.model = build(cfg, config, info, mesh, layout)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        per_rank = ids.shape[0] // info.world_size if self.sharded else ids.shape[0]
        start = info.rank * per_rank if self.sharded else 0
        self.ids = ids[start : start + per_rank]
        self.rank, self.seed, self.clip = info.rank, cfg.train.seed, cfg.train.grad_clip
        self.steps = 0

    def step(self, n: int, k: int) -> None:
        loss = self.model(
            self.ids,
            shift_labels=self.ids,
            num_recurrences=(n, k),
            return_logits=False,
            generator=state_generator(self.seed, self.steps, 0, self.rank, self.ids.device),
        ).loss
        loss.backward()
        if self.sharded:  # the 1-rank trainer has no process group to reduce over
            all_reduce_mean(loss.detach().float())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1


def worker(rank: int, world: int, port: int, args: argparse.Namespace, results: dict) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    info = DistInfo(rank, world, rank, torch.device("cpu"))
    mesh = build_mesh(info, 1)
    cfg = JobConfig()
    cfg.model.init = "random"
    cfg.optim.name = args.optim
    cfg.parallel.activation_checkpointing = "recurrence"
    config = model_config(args.hidden, args.shape, args.vocab, args.seq)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    trainers = {layout: LayoutStep(cfg, config, info, mesh, layout, ids) for layout in LAYOUTS}
    out = {}
    for total in (int(v) for v in args.recurrences.split(",")):
        k = min(total, cfg.recurrence.backprop_depth)
        n = total - k
        times = {layout: [] for layout in LAYOUTS}
        cpu = {layout: [] for layout in LAYOUTS}
        for _ in range(args.warmup):
            for trainer in trainers.values():
                if trainer.sharded or rank == 0:
                    trainer.step(n, k)
                dist.barrier()
        for round_ in range(args.repeats):
            order = LAYOUTS[round_ % len(LAYOUTS) :] + LAYOUTS[: round_ % len(LAYOUTS)]
            for layout in order:
                trainer = trainers[layout]
                dist.barrier()
                if trainer.sharded or rank == 0:
                    start, cpu_start = time.perf_counter(), time.process_time()
                    trainer.step(n, k)
                    times[layout].append(time.perf_counter() - start)
                    cpu[layout].append(time.process_time() - cpu_start)
        comm = {}
        for layout, trainer in trainers.items():
            if trainer.sharded:
                with count_fsdp_collectives() as counts, count_bytes() as sizes:
                    trainer.step(n, k)
                comm[layout] = {**counts, **{f"{name}_bytes": b for name, b in sizes.items()}}
        gathered = [None] * world
        dist.all_gather_object(gathered, (times, cpu))
        # a 2-rank step lasts until its slower rank is done and costs both ranks' CPU time
        step_times = {
            layout: [max(t) for t in zip(*(g[0][layout] for g in gathered if g[0][layout]))] for layout in LAYOUTS
        }
        cpu_times = {
            layout: [sum(t) for t in zip(*(g[1][layout] for g in gathered if g[1][layout]))] for layout in LAYOUTS
        }
        out[total] = {"n": n, "k": k, "times": step_times, "cpu": cpu_times, "comm": comm}
    if rank == 0:
        results.update(out)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows_from(measured: dict, args: argparse.Namespace) -> list[dict]:
    rows = []
    tokens = args.batch * args.seq
    for total, m in measured.items():
        one = statistics.median(m["times"]["1 rank"])
        core = statistics.median(m["times"]["2 ranks, core unit"])
        one_cpu = statistics.median(m["cpu"]["1 rank"])
        for layout in LAYOUTS:
            t, cpu = statistics.median(m["times"][layout]), statistics.median(m["cpu"][layout])
            comm = m["comm"].get(layout, {})
            rows.append(
                {
                    "r": total,
                    "n": m["n"],
                    "k": m["k"],
                    "layout": layout,
                    "median_s": round(t, 4),
                    "min_s": round(min(m["times"][layout]), 4),
                    "tokens_per_s": round(tokens / t, 1),
                    "efficiency": round(one / (2 * t), 3) if layout != "1 rank" else None,
                    "vs_core_unit": round(t / core, 3) if layout != "1 rank" else None,
                    "cpu_s": round(cpu, 4),
                    "cpu_efficiency": round(one_cpu / cpu, 3) if layout != "1 rank" else None,
                    "all_gathers": comm.get("all_gather"),
                    "reduce_scatters": comm.get("reduce_scatter"),
                    "all_gather_MiB": round(comm["all_gather_bytes"] / 2**20, 2) if comm else None,
                    "all_gather_bytes": comm.get("all_gather_bytes"),
                    "reduce_scatter_MiB": round(comm["reduce_scatter_bytes"] / 2**20, 2) if comm else None,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--shape", default="1,2,1", help="prelude,recurrent,coda layers")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences); each of 2 ranks takes half")
    parser.add_argument("--recurrences", default="1,8", help="fixed r per row group; k = min(r, backprop depth 8)")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (each steps every layout once)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--optim", default="adamw", choices=["adamw", "muon"], help="the trainer's optim.name")
    args = parser.parse_args()
    if args.batch % 2:
        parser.error(f"--batch {args.batch} must be even: 2 ranks take half each")
    load_before = os.getloadavg()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(2, free_port(), args, results), nprocs=2)
        measured = dict(results)
    rows = rows_from(measured, args)
    print(
        f"\nh={args.hidden} shape={args.shape} vocab={args.vocab} global batch {args.batch}x{args.seq} tokens, fp32, "
        f"gloo, 1 thread per rank, {args.optim}, activation checkpointing per recurrence; medians of "
        f"{args.repeats} rounds"
    )
    load = {"before": [round(v, 2) for v in load_before], "after": [round(v, 2) for v in os.getloadavg()]}
    print(
        f"load average (1, 5, 15 min) before {load['before']}, after {load['after']} on {os.cpu_count()} CPUs: "
        "other processes share these cores"
    )
    print_table(
        rows,
        [
            "r",
            "n",
            "k",
            "layout",
            "median_s",
            "tokens_per_s",
            "efficiency",
            "vs_core_unit",
            "cpu_s",
            "cpu_efficiency",
            "all_gathers",
            "reduce_scatters",
            "all_gather_MiB",
            "reduce_scatter_MiB",
        ],
    )
    raw = {str(total): {"wall": m["times"], "cpu": m["cpu"]} for total, m in measured.items()}
    path = write_results(
        "scaling",
        {
            "args": vars(args),
            "ranks": 2,
            "threads_per_rank": 1,
            "load_average": load,
            "rows": rows,
            "step_times_s": raw,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
