"""The distillation teacher under FSDP2 on 2 gloo ranks: gathered whole once per micro-batch (what
retro.plan counts), released after the student's loss, and the same targets as one process."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny import save_source

from retro.distributed.comm_count import count_fsdp_collectives
from retro.distributed.parallelize import ParallelSettings
from retro.model.config import RetroConfig
from retro.training.distill import DistillSettings, build_teacher, release_teacher, teacher_targets

LAYERS = 6  # tests/tiny.py's source: 6 layers -> a static teacher of 6 prelude units + the root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _student() -> RetroConfig:
    return RetroConfig(vocab_size=97, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                       num_key_value_heads=1, n_prelude=1, n_recurrent=1, n_coda=1)  # fmt: skip


def _ids() -> torch.Tensor:
    return torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))


def _worker(rank: int, world: int, port: int, source: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from torch.distributed.tensor import init_device_mesh

        settings = DistillSettings(teacher=source)
        mesh = init_device_mesh("cpu", (world,))
        teacher = build_teacher(settings, _student(), ParallelSettings(), mesh, torch.device("cpu"), torch.float32)
        counts, logits = [], None
        for _ in range(2):  # two micro-batches
            with count_fsdp_collectives() as counted:
                targets = teacher_targets(teacher, settings, _ids(), _ids(), None)
                logits = (targets.teacher.hidden @ targets.teacher.weight.T).tolist()
                release_teacher(teacher)
            counts.append(counted["all_gather"])
        if rank == 0:
            Path(out).write_text(json.dumps({"all_gathers": counts, "logits": logits}))
    finally:
        dist.destroy_process_group()


def test_the_teacher_is_gathered_once_per_micro_batch_and_matches_one_process(tmp_path):
    save_source(tmp_path / "src", "llama")
    out = tmp_path / "result.json"
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path / "src"), str(out)), nprocs=2, join=True,
                       start_method="fork")  # fmt: skip
    result = json.loads(out.read_text())
    # every layer unit and the root, in each micro-batch: released roots are gathered again, none twice
    assert result["all_gathers"] == [LAYERS + 1, LAYERS + 1]
    settings = DistillSettings(teacher=str(tmp_path / "src"))
    single = build_teacher(settings, _student(), ParallelSettings(), None, torch.device("cpu"), torch.float32)
    want = teacher_targets(single, settings, _ids(), _ids(), None).teacher
    torch.testing.assert_close(torch.tensor(result["logits"]), want.hidden @ want.weight.T, rtol=1e-5, atol=1e-5)
