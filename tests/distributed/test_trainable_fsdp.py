"""What trains under 2-rank FSDP2 (gloo): frozen parameters get no gradient, no reduce-scatter and no
optimizer state; and each train.trainable mode runs through retro.train and resumes loss for loss."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.distributed.fsdp._fully_shard._fsdp_param_group as fsdp_param_group
import torch.multiprocessing as mp
from train_helpers import base_overrides, free_port, make_assets, read_metrics, run_train

import retro
from retro.distributed.parallelize import ParallelSettings
from retro.model.lora import LoraSettings
from retro.optim import build_optimizer
from retro.optim.build import OptimSettings
from retro.training import checkpoint
from retro.training.model_source import ModelSettings, build_model

LORA = LoraSettings(rank=4, alpha=8.0, targets=["q_proj", "o_proj", "up_proj", "down_proj"])
CONFIG = dict(
    vocab_size=61, hidden_size=32, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2, n_prelude=1
)


MODES = ("all", "recurrent", "adapter", "lora")


def _step_worker(rank, world, port, results):
    """Every mode in one process group (one spawn: the start-up dominates a 2-step run)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    for mode in MODES:
        results[(rank, mode)] = _two_steps(mesh, rank, mode)
    dist.destroy_process_group()


def _two_steps(mesh, rank: int, mode: str) -> dict:
    config = retro.RetroConfig(**CONFIG, n_recurrent=2, n_coda=1, state_init="zeros")
    cpu, fp32 = torch.device("cpu"), torch.float32
    model = build_model(ModelSettings(init="random"), config, ParallelSettings(), mesh, cpu, fp32, 0, mode, LORA)
    optimizer = build_optimizer(model, OptimSettings(name="muon", lr=1e-2, muon_lr=1e-2))
    names = {id(p): n for n, p in model.named_parameters()}
    before = {n: p.detach().to_local().clone() for n, p in model.named_parameters()}
    reduced: set[str] = set()
    real_reduce = fsdp_param_group.foreach_reduce

    def recording_reduce(fsdp_params, *args, **kwargs):
        reduced.update(names[id(p.sharded_param)] for p in fsdp_params)
        return real_reduce(fsdp_params, *args, **kwargs)

    fsdp_param_group.foreach_reduce = recording_reduce
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(rank))
    for _ in range(2):  # two steps: LoRA's A gets a gradient once B is no longer zero
        model(ids, shift_labels=ids, num_recurrences=(1, 2), return_logits=False).loss.backward()
        frozen_grads = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    fsdp_param_group.foreach_reduce = real_reduce
    state = {names[id(p)] for p in optimizer.state}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach().to_local(), before[n])}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    return dict(
        trained=trained,
        all={n for n, _ in model.named_parameters()},
        reduced=reduced,
        state=state,
        changed=changed,
        frozen_grads=frozen_grads,
    )


@pytest.fixture(scope="module")
def stepped() -> dict:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_step_worker, args=(2, free_port(), results), nprocs=2)
        return dict(results)


@pytest.mark.parametrize("mode", MODES)
def test_frozen_parameters_get_no_gradient_reduction_or_optimizer_state(stepped, mode):
    for rank in (0, 1):
        r = stepped[(rank, mode)]
        assert r["frozen_grads"] == [], r["frozen_grads"]
        assert r["reduced"] == r["trained"], r["reduced"] ^ r["trained"]  # reduce-scattered: what trains only
        assert r["state"] == r["trained"]
        # every rank's shards of what trains moved (a rank may hold an empty shard of a tiny matrix)
        assert r["changed"] <= r["trained"]
    first = stepped[(0, mode)]
    assert first["changed"] | stepped[(1, mode)]["changed"] == first["trained"]
    if mode == "all":
        assert first["trained"] == first["all"]
    else:
        assert first["trained"] < first["all"] and "model.recurrent.adapter.weight" in first["trained"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"), shape=(1, 2, 1))


@pytest.mark.parametrize(
    "mode,optim", [("recurrent", "muon"), ("adapter", "adamw"), ("lora", "muon")]
)  # LoRA under AdamW steps the same A/B as under Muon: its update rule is AdamW's, tested wherever AdamW resumes
def test_each_mode_resumes_loss_for_loss_on_two_ranks(assets, tmp_path, mode, optim):
    """4 steps with a checkpoint at 2; the checkpoint copied into a fresh run directory and resumed there
    gives steps 3 and 4 the uninterrupted run's losses within 1e-6."""
    model, data = assets
    extra = {
        "train.steps": 4,
        "checkpoint.every": 2,
        "checkpoint.keep_last": 3,
        "train.trainable": mode,
        "optim.name": optim,
        "lora.rank": 4,
    }
    result = run_train(base_overrides(model, data, tmp_path / "ref", **extra), nproc=2)
    assert f"train.trainable = {mode}: " in result.stdout
    reference = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "ref")}
    out = tmp_path / "resumed"
    shutil.copytree(checkpoint.checkpoint_dir(tmp_path / "ref", 2), checkpoint.checkpoint_dir(out, 2))
    run_train(base_overrides(model, data, out, **extra) + ["--resume", "auto"], nproc=2)
    records = read_metrics(out)
    assert [m["step"] for m in records] == [3, 4]
    for m in records:
        assert abs(m["loss"] - reference[m["step"]]) <= 1e-6 * reference[m["step"]], (m, reference)
    assert reference[4] != reference[1]
