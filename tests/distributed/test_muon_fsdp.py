"""Multi-rank (gloo, CPU) tests of retro.optim.Muon on FSDP2-sharded parameters: equality with the
single-process optimizer, a constant number of collectives per step, and DCP checkpoint/resume."""

from __future__ import annotations

import copy
import json
import multiprocessing
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from muon_helpers import Toy, batches, fp32_close
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, init_device_mesh

from retro.optim import build_optimizer

LRS = dict(muon_lr=0.02, lr=1e-3, ns_dtype="float32")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard(model: Toy, mesh) -> Toy:
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _train(model, opt, tokens_per_step: list[torch.Tensor], rank: int, world: int) -> None:
    """Each rank trains on its slice of the global batch (FSDP2 averages the gradients)."""
    for tokens in tokens_per_step:
        opt.zero_grad()
        model(tokens.chunk(world)[rank]).backward()
        opt.step()


def _equal_to_single_process(rank: int, world: int, out: Path) -> None:
    torch.manual_seed(0)
    ref = Toy()
    model = _shard(copy.deepcopy(ref), init_device_mesh("cpu", (world,)))
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    data = batches(5, rows=2 * world)
    _train(ref, build_optimizer(ref, **LRS), data, 0, 1)
    opt = build_optimizer(model, **LRS)
    assert all(isinstance(p, DTensor) for g in opt.param_groups for p in g["params"])
    _train(model, opt, data, rank, world)
    errors = {}
    for name, p in model.named_parameters():
        full, expected = p.full_tensor(), ref.get_parameter(name)
        errors[name] = [(full - expected).norm().item(), expected.norm().item(), (expected - start[name]).norm().item()]
    if rank == 0:
        (out / "result.json").write_text(json.dumps(errors))


def _collectives_per_step(rank: int, world: int, out: Path) -> None:
    from torch.distributed.tensor.debug import CommDebugMode  # imports inductor: only where needed

    counts = {}
    for layers in (1, 4):
        torch.manual_seed(0)
        model = _shard(Toy(layers=layers), init_device_mesh("cpu", (world,)))
        opt = build_optimizer(model, **LRS)
        per_step = []
        for tokens in batches(2, rows=2 * world):
            opt.zero_grad()
            model(tokens.chunk(world)[rank]).backward()
            with CommDebugMode() as comm:
                opt.step()
            per_step.append({str(k): v for k, v in comm.get_comm_counts().items()})
        counts[layers] = {"params": len(list(model.parameters())), "per_step": per_step}
    if rank == 0:
        (out / "result.json").write_text(json.dumps(counts))


def checkpoint_resume_result(mesh, rank: int, world: int, out: Path) -> tuple[dict, torch.optim.Optimizer]:
    """Train 3 steps, DCP-save, train 2 more; load the checkpoint into a differently initialised
    model and train the same 2 steps. Returns the mismatches (parameters, optimizer state) and the
    resumed optimizer. Shared by the FSDP and HSDP tests; ``mesh`` decides the layout."""
    data = batches(5, rows=2 * world)
    torch.manual_seed(0)
    model = _shard(Toy(), mesh)
    opt = build_optimizer(model, **LRS)
    _train(model, opt, data[:3], rank, world)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / "ckpt"))
    _train(model, opt, data[3:], rank, world)

    torch.manual_seed(1)  # a different init: only a working load can bring it back
    resumed = _shard(Toy(), mesh)
    resumed_opt = build_optimizer(resumed, **LRS)
    model_sd, optim_sd = get_state_dict(resumed, resumed_opt)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / "ckpt"))
    set_state_dict(resumed, resumed_opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    n_state = sum(len(s) for s in resumed_opt.state.values())
    _train(resumed, resumed_opt, data[3:], rank, world)

    mismatched = [
        n
        for (n, p), q in zip(model.named_parameters(), resumed.parameters())
        if not torch.equal(p.to_local(), q.to_local())
    ]
    for p, q in zip(model.parameters(), resumed.parameters()):
        for key, value in opt.state[p].items():
            if not torch.equal(_local(value), _local(resumed_opt.state[q][key])):
                mismatched.append(f"state {key}")
    return {"mismatched": mismatched, "state_tensors": n_state}, resumed_opt


def _checkpoint_resume(rank: int, world: int, out: Path) -> None:
    result, _ = checkpoint_resume_result(init_device_mesh("cpu", (world,)), rank, world, out)
    (out / f"result{rank}.json").write_text(json.dumps(result))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


SCENARIOS = {
    "equal": _equal_to_single_process,
    "collectives": _collectives_per_step,
    "checkpoint": _checkpoint_resume,
}


def _worker(rank: int, world: int, port: int, scenario: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        SCENARIOS[scenario](rank, world, Path(out))
    finally:
        dist.destroy_process_group()


def _spawn(scenario: str, world: int, out: Path) -> None:
    # fork: ranks inherit the imported modules (a spawned rank spends seconds importing torch). Fork
    # is refused once autograd has started its per-device threads, which happens on CUDA machines
    # after any backward; there the ranks come from a forkserver that preloaded this module.
    method = "forkserver" if torch.cuda.is_available() else "fork"
    if method == "forkserver":
        multiprocessing.get_context(method).set_forkserver_preload([__name__])
    mp.start_processes(
        _worker, args=(world, _free_port(), scenario, str(out)), nprocs=world, join=True, start_method=method
    )


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_equals_single_process(world, tmp_path):
    """After 5 steps every FSDP2 parameter (uneven 7-, 3- and 28-row shards included; with 4 ranks
    the 3-row matrix leaves rank 3 empty, and q/k/v blocks cross shard edges) equals the
    single-process optimizer's: 1e-6 relative to the parameter, 1e-5 relative to its displacement
    (plus 4 fp32 ulps, see fp32_close)."""
    _spawn("equal", world, tmp_path)
    errors = json.loads((tmp_path / "result.json").read_text())
    assert len(errors) == len(list(Toy().parameters()))
    for name, (diff, norm, displacement) in errors.items():
        assert fp32_close(diff, norm, displacement), (name, diff, norm, displacement)


def test_collectives_per_step_do_not_grow_with_parameters(tmp_path):
    """Two all_to_all_single per step (to owners and back), for 1 layer and for 4 layers."""
    _spawn("collectives", 2, tmp_path)
    counts = json.loads((tmp_path / "result.json").read_text())
    assert counts["4"]["params"] > 3 * counts["1"]["params"] / 2
    for layers in ("1", "4"):
        for step in counts[layers]["per_step"]:
            assert step == {"c10d.alltoall_base_": 2}, (layers, step)


def test_checkpoint_resume_gives_identical_next_steps(tmp_path):
    """DCP save after 3 steps, load into a differently initialised model + optimizer, 2 more steps:
    parameters and optimizer state are bitwise equal to the uninterrupted run on every rank."""
    _spawn("checkpoint", 2, tmp_path)
    for rank in range(2):
        result = json.loads((tmp_path / f"result{rank}.json").read_text())
        assert result["mismatched"] == []
        # momentum for 15 matrices + step/exp_avg/exp_avg_sq for 9 AdamW tensors
        assert result["state_tensors"] == 15 + 3 * 9
