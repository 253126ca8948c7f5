"""Start-up checks of a run, before any weight is read or any step is taken: the data, its tokenizer,
the batch arithmetic, the sequence length, the teacher, the run directory apart from all of these; and
what a resume on another number of ranks changes.

Each failure is a ConfigError naming the key or file (exit 2), so a wrong input costs seconds, not hours.
"""

from __future__ import annotations

import json
from pathlib import Path

from retro.data.manifest import ShardFormatError
from retro.data.mixture import Reshard
from retro.data.shards import TokenShards, check_tokenizer_matches, tokenizer_dir
from retro.hf.output_dir import is_run_dir, run_dirs_below
from retro.model.config import RetroConfig
from retro.training.distill import check_teacher
from retro.training.errors import ConfigError
from retro.training.job_config import JobConfig
from retro.training.recurrence import draw_group_size


def check_data(job: JobConfig, model_config: RetroConfig | None, world_size: int) -> None:
    """Data/tokenizer/batch checks that must fail before any training starts (train and val sources)."""
    if not job.data.train:
        raise ConfigError("data.train is empty: give prepared shard directories (python -m retro.data.prepare)")
    check_out_dir(job)
    per_step = job.train.micro_batch * world_size
    if job.train.global_batch % per_step:
        raise ConfigError(
            f"train.global_batch = {job.train.global_batch} is not divisible by train.micro_batch x ranks "
            f"= {job.train.micro_batch} x {world_size}"
        )
    check_draw_groups(job, world_size)
    check_positions(job.data.seq_len, model_config, f"the model's ({job.model.path})")
    if job.distill.enabled:
        teacher = check_teacher(job.distill, model_config)  # exists, same vocabulary: before any weight is read
        check_positions(job.data.seq_len, teacher, f"the teacher's ({job.distill.teacher})")
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


def check_draw_groups(job: JobConfig, ranks: int, ranks_name: str = "ranks") -> None:
    """recurrence.draws_per_step must divide the micro-batches each rank runs per step (after the batch check),
    else two ranks would run different r at one micro index; the error names the split and the ways out."""
    t = job.train
    accumulation = t.global_batch // (t.micro_batch * ranks)
    try:
        draw_group_size(job.recurrence.draws_per_step, accumulation)
    except ValueError as error:
        raise ConfigError(
            f"recurrence.{error} (train.global_batch {t.global_batch} / (train.micro_batch {t.micro_batch} x "
            f"{ranks} {ranks_name})); choose a draws_per_step that divides {accumulation}, or use fewer ranks or "
            "a smaller train.micro_batch"
        ) from None


def check_positions(seq_len: int, config: RetroConfig, whose: str) -> None:
    """data.seq_len must fit the positions the model was built for (`max_position_embeddings` of its config)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit and seq_len > limit:
        raise ConfigError(
            f"data.seq_len = {seq_len} exceeds {whose} max_position_embeddings = {limit}; use a data.seq_len <= {limit}"
        )


def check_out_dir(job: JobConfig) -> None:
    """train.out_dir may not be, contain or sit inside an input: the model, a data source or the teacher.

    A run writes config.json, model_config/, metrics.jsonl and checkpoints/ there, which would replace or
    mix with the input's own files (e.g. the converted model's config.json).
    """
    out = Path(job.train.out_dir).resolve()
    inputs = [("model.path", job.model.path)]
    inputs += [("data.train", source) for source in job.data.train]
    inputs += [("data.val", job.data.val)] if job.data.val else []
    inputs += [("distill.teacher", job.distill.teacher)] if job.distill.enabled else []
    for key, path in inputs:
        if not str(path):
            continue
        other = Path(path).resolve()
        if out == other or out.is_relative_to(other) or other.is_relative_to(out):
            how = "is" if out == other else ("sits inside" if out.is_relative_to(other) else "contains")
            raise ConfigError(
                f"train.out_dir = {job.train.out_dir} ({out}) {how} {key} = {path} ({other}): a run directory "
                "must be apart from its inputs; choose another train.out_dir"
            )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.out_dir = {job.train.out_dir} is a file, not a directory")
    other_run = next((p for p in out.parents if is_run_dir(p)), None) or next(run_dirs_below(out), None)
    if other_run is not None:
        how = "sits inside" if out.is_relative_to(other_run) else "contains"
        raise ConfigError(
            f"train.out_dir = {job.train.out_dir} ({out}) {how} the run directory {other_run}: its checkpoints, "
            "metrics and config would mix with this run's (or be pruned by it); choose another train.out_dir"
        )
    foreign = foreign_contents(out) if out.is_dir() and not is_run_dir(out) else None
    if foreign is not None:
        raise ConfigError(
            f"train.out_dir = {job.train.out_dir} holds {foreign}, so it is a model or data directory, not a run "
            "directory: a run would replace its config.json; choose another train.out_dir"
        )


def foreign_contents(path: Path) -> str | None:
    """What marks `path` as another command's output (a model's weights or config, a shard set), if anything."""
    for pattern, what in (("*.safetensors", "model weights"), ("*.gguf", "a GGUF model"), ("manifest.json", "shards")):
        hit = next(path.glob(pattern), None)
        if hit is not None:
            return f"{what} ({hit.name})"
    config = path / "config.json"
    if config.is_file():
        try:
            is_job = "train" in json.loads(config.read_text())
        except (OSError, ValueError, TypeError):
            is_job = False
        if not is_job:
            return "a config.json that is not a run's job config"
    return None


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
