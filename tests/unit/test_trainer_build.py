"""Building a Trainer only builds: it reads the model, and no shard, and writes no file."""

from __future__ import annotations

from pathlib import Path

from tiny import save_source

import retro.data.shards
from retro.convert import convert
from retro.distributed.setup import init_distributed
from retro.training.job_config import load_config
from retro.training.model_source import load_model_config
from retro.training.objective import CrossEntropy
from retro.training.trainer import Trainer

TINY_CONFIG = Path(__file__).parents[2] / "configs" / "tiny-cpu.toml"


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_trainer_builds_without_reading_shards_or_writing_files(tmp_path, monkeypatch):
    save_source(tmp_path / "src", "llama")
    convert(tmp_path / "src", tmp_path / "model", shape=(1, 2, 1), adapter_init="default")
    out = tmp_path / "run"
    job = load_config(
        TINY_CONFIG,
        [f"model.path={tmp_path / 'model'}", f"data.train={tmp_path / 'no-shards-here'}", f"train.out_dir={out}"],
    )

    def no_shard_reads(*args, **kwargs):
        raise AssertionError("Trainer.__init__ read a shard")

    monkeypatch.setattr(retro.data.shards.TokenShards, "__init__", no_shard_reads)
    before = files_under(tmp_path)
    trainer = Trainer(job, init_distributed(), load_model_config(job.model))

    assert files_under(tmp_path) == before and not out.exists()
    assert trainer.state is None and trainer.log is None  # data position, resume and run directory come in fit()
    assert isinstance(trainer.objective, CrossEntropy) and trainer.objective.part_names == ()
    assert trainer.accumulation == job.train.global_batch // job.train.micro_batch
    assert sum(p.numel() for p in trainer.params) > 0
