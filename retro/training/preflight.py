"""Start-up checks of a run, before any weight is read or any step is taken: the data, its tokenizer,
the batch arithmetic, the teacher; and what a resume on another number of ranks changes.

Each failure is a ConfigError naming the key or file (exit 2), so a wrong input costs seconds, not hours.
"""

from __future__ import annotations

from pathlib import Path

from retro.data.manifest import ShardFormatError
from retro.data.mixture import Reshard
from retro.data.shards import TokenShards, check_tokenizer_matches
from retro.model.config import RetroConfig
from retro.training.distill import check_teacher
from retro.training.errors import ConfigError
from retro.training.job_config import JobConfig


def check_data(job: JobConfig, model_config: RetroConfig | None, world_size: int) -> None:
    """Data/tokenizer/batch checks that must fail before any training starts (train and val sources)."""
    if not job.data.train:
        raise ConfigError("data.train is empty: give prepared shard directories (python -m retro.data.prepare)")
    per_step = job.train.micro_batch * world_size
    if job.train.global_batch % per_step:
        raise ConfigError(
            f"train.global_batch = {job.train.global_batch} is not divisible by train.micro_batch x ranks "
            f"= {job.train.micro_batch} x {world_size}"
        )
    if job.distill.enabled:
        check_teacher(job.distill, model_config)  # exists, same vocabulary: before any weight is read
    sources = [(source, "train") for source in job.data.train] + ([(job.data.val, "val")] if job.data.val else [])
    named = [(job.model.path, "model")] + ([(job.distill.teacher, "teacher")] if job.distill.enabled else [])
    tokenizer_dirs = [(tokenizer_dir(path), whose) for path, whose in named if tokenizer_dir(path) is not None]
    for source, split in sources:
        shards = TokenShards(source, split=split)
        check_tokenizer_matches(shards, model_config.vocab_size)
        for directory, whose in tokenizer_dirs if not job.data.allow_tokenizer_mismatch else []:
            try:
                check_tokenizer_matches(shards, directory)
            except ShardFormatError as error:
                raise ConfigError(
                    f"{error}. The {whose} directory {directory} holds the tokenizer it was converted with; "
                    "re-run retro.data.prepare with it, or set data.allow_tokenizer_mismatch = true if the two "
                    "tokenizers are known to agree"
                ) from None


def tokenizer_dir(path: str | Path) -> Path | None:
    """A model directory when it carries tokenizer files (retro.convert copies the source's), else None."""
    path = Path(path)
    return path if any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")) else None


def reshard_warning(reshard: Reshard, path: Path, step: int, job: JobConfig) -> str:
    """What changes when a checkpoint resumes on another number of ranks (printed by rank 0)."""
    text = (
        f"retro.train: warning: resuming {reshard.old_world_size}-rank checkpoint {path} on {reshard.new_world_size} "
        f"ranks; data order per source: {reshard.describe([str(p) for p in job.data.train])}"
    )
    if len(reshard.reread) > 1:
        text += f"; {sum(reshard.reread)} windows re-read in all"
    if step:  # every step read accumulation x micro_batch windows on each old rank
        state = reshard.states[0]
        saved_global = state["batches"] // step * state["config"]["batch_size"] * reshard.old_world_size
        if saved_global != job.train.global_batch:
            text += (
                f"; the global batch changes from {saved_global} (saved run) to train.global_batch = "
                f"{job.train.global_batch}"
            )
    return text
