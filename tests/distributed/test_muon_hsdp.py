"""retro.optim.Muon under HSDP (FSDP2 on a 2-D ("replicate", "shard") mesh), 4 gloo ranks as 2 x 2:
equality with the single-process optimizer, bitwise DCP resume, and retro.train end to end
(losses equal to one process; resume from a checkpoint reproduces the uninterrupted losses)."""

from __future__ import annotations

import copy
import json
import multiprocessing
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from muon_helpers import Toy, batches, fp32_close
from test_muon_fsdp import LRS, _free_port, _shard, _train, checkpoint_resume_result
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh
from train_helpers import base_overrides, make_assets, read_metrics, run_train

from retro.optim import Muon, build_optimizer, exchange
from retro.training.job_config import load_config

REPLICATE, SHARD = 2, 2
WORLD = REPLICATE * SHARD


def _hsdp_mesh():
    return init_device_mesh("cpu", (REPLICATE, SHARD), mesh_dim_names=("replicate", "shard"))


def _equal_to_single_process(rank: int, out: Path) -> None:
    torch.manual_seed(0)
    ref = Toy()
    model = _shard(copy.deepcopy(ref), _hsdp_mesh())
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    data = batches(5, rows=2 * WORLD)
    _train(ref, build_optimizer(ref, **LRS), data, 0, 1)
    opt = build_optimizer(model, **LRS)
    placements = {tuple(p.placements) for g in opt.param_groups for p in g["params"]}
    calls = []  # ranks of the group of every all_to_all_single the optimizer makes
    real = dist.all_to_all_single

    def recording(*args, group=None, **kwargs):
        calls.append(dist.get_process_group_ranks(group))
        return real(*args, group=group, **kwargs)

    with mock.patch.object(exchange.dist, "all_to_all_single", recording):
        _train(model, opt, data, rank, WORLD)
    shard_group = dist.get_process_group_ranks(model.lm_head.weight.device_mesh.get_group("shard"))
    rejected = []  # layouts the row exchange cannot handle must be refused up front
    for layout in ([Replicate(), Shard(1)], [Shard(0), Shard(0)]):
        weight = distribute_tensor(torch.zeros(8, 4), model.lm_head.weight.device_mesh, layout)
        with pytest.raises(ValueError, match="sharded Shard\\(0\\) along one mesh dimension") as error:
            Muon([weight])
        rejected.append(str(error.value))
    errors = {}
    for name, p in model.named_parameters():
        full, expected = p.full_tensor(), ref.get_parameter(name)
        errors[name] = [(full - expected).norm().item(), expected.norm().item(), (expected - start[name]).norm().item()]
    # Replicas must hold bitwise-identical shards (each replica group computed the update on its own).
    local = torch.cat([p.to_local().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(local) for _ in range(REPLICATE)]
    dist.all_gather(gathered, local, group=model.lm_head.weight.device_mesh.get_group("replicate"))
    replicas_equal = all(torch.equal(gathered[0], g) for g in gathered[1:])
    replicas_equal = torch.tensor(float(replicas_equal))
    dist.all_reduce(replicas_equal, op=dist.ReduceOp.MIN)
    if rank == 0:
        result = {
            "errors": errors,
            "calls": calls,
            "rejected": rejected,
            "shard_group": shard_group,
            "placements": [str(p) for p in placements],
            "replicas_equal": bool(replicas_equal),
        }
        (out / "result.json").write_text(json.dumps(result))


def _checkpoint_resume(rank: int, out: Path) -> None:
    result, resumed_opt = checkpoint_resume_result(_hsdp_mesh(), rank, WORLD, out)
    momentum = [
        resumed_opt.state[p]["momentum_buffer"] for g in resumed_opt.param_groups if g["use_muon"] for p in g["params"]
    ]
    result["momentum_placements"] = sorted({str(tuple(m.placements)) for m in momentum if isinstance(m, DTensor)})
    (out / f"result{rank}.json").write_text(json.dumps(result))


SCENARIOS = {"equal": _equal_to_single_process, "checkpoint": _checkpoint_resume}


def _worker(rank: int, port: int, scenario: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        SCENARIOS[scenario](rank, Path(out))
    finally:
        dist.destroy_process_group()


def _spawn(scenario: str, out: Path) -> None:
    # As test_muon_fsdp._spawn: fork where allowed, a preloaded forkserver on CUDA machines.
    method = "forkserver" if torch.cuda.is_available() else "fork"
    if method == "forkserver":
        multiprocessing.get_context(method).set_forkserver_preload([__name__])
    mp.start_processes(_worker, args=(_free_port(), scenario, str(out)), nprocs=WORLD, join=True, start_method=method)


def test_hsdp_equals_single_process(tmp_path):
    """4 ranks as 2 replicas x 2 shards, each rank a quarter of the batch, 5 steps. Reference: the
    unsharded Toy with build_optimizer on one process, fed the whole batch. Every parameter matches
    1e-6 relative to the parameter, 1e-5 relative to its displacement (+ 4 fp32 ulps, fp32_close),
    the two replicas of every shard are bitwise equal, every step makes exactly 2
    all_to_all_single calls, both within the rank's shard group, and layouts other than one
    Shard(0) dimension (Shard(1); Shard(0) twice) are refused."""
    _spawn("equal", tmp_path)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["placements"] == [str((Replicate(), Shard(0)))]  # really HSDP, every Muon param
    assert result["replicas_equal"]
    assert len(result["rejected"]) == 2
    # rank 0's shard group is {0, 1}: 2 exchanges per step, none across replicas
    assert result["shard_group"] == [0, 1] and result["calls"] == [[0, 1]] * (2 * 5)
    assert len(result["errors"]) == len(list(Toy().parameters()))
    for name, (diff, norm, displacement) in result["errors"].items():
        assert fp32_close(diff, norm, displacement), (name, diff, norm, displacement)


def test_hsdp_checkpoint_resume_gives_identical_next_steps(tmp_path):
    """DCP save after 3 steps under HSDP, load into a differently initialised model + optimizer,
    2 more steps: parameters and optimizer state bitwise equal to the uninterrupted run, every rank."""
    _spawn("checkpoint", tmp_path)
    for rank in range(WORLD):
        result = json.loads((tmp_path / f"result{rank}.json").read_text())
        assert result["mismatched"] == []
        assert result["state_tensors"] == 15 + 3 * 9  # momentum of 15 matrices + AdamW state of 9
        assert result["momentum_placements"] == [str((Replicate(), Shard(0)))]


def test_config_accepts_muon_with_replicate():
    config = load_config(None, ["optim.name=muon", "parallel.replicate=2"])
    assert (config.optim.name, config.parallel.replicate) == ("muon", 2)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


MUON_HSDP = {"optim.name": "muon", "model.state_init": "zeros"}  # zeros: s0 noise is per rank


def test_train_hsdp_muon_matches_single_process(assets, tmp_path):
    """retro.train, 4 steps: per-step losses of 4 ranks (replicate 2 x shard 2) equal one process's
    within 1e-5 relative; mirrors test_train's HSDP-with-AdamW check."""
    model, data = assets
    extra = {**MUON_HSDP, "train.steps": 4}
    run_train(base_overrides(model, data, tmp_path / "one", **extra))
    run_train(base_overrides(model, data, tmp_path / "hsdp", **extra, **{"parallel.replicate": 2}), nproc=WORLD)
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "hsdp")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4]
    assert a[-1]["loss"] != a[0]["loss"]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]), (x, y)


def test_train_hsdp_muon_resume_reproduces_losses(assets, tmp_path):
    """retro.train under HSDP + Muon, 4 steps with a checkpoint every 2. A second run resumes from
    the step-2 checkpoint (DCP model + Muon state, per-rank loader/RNG state): its steps 3 and 4 have
    the uninterrupted run's losses within 1e-6 relative."""
    model, data = assets
    extra = {**MUON_HSDP, "train.steps": 4, "checkpoint.every": 2, "parallel.replicate": 2}
    run_train(base_overrides(model, data, tmp_path / "ref", **extra), nproc=WORLD)
    reference = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "ref")}
    step2 = tmp_path / "ref" / "checkpoints" / "step_00000002"
    resumed_out = tmp_path / "resumed"
    shutil.copytree(step2, resumed_out / "checkpoints" / step2.name)
    run_train(base_overrides(model, data, resumed_out, **extra) + ["--resume", "auto"], nproc=WORLD)
    after = read_metrics(resumed_out)
    assert [m["step"] for m in after] == [3, 4]
    for m in after:
        assert abs(m["loss"] - reference[m["step"]]) <= 1e-6 * reference[m["step"]], (m, reference[m["step"]])
