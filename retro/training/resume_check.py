"""What a resume changes: the settings that give a checkpoint its meaning, compared with its record.

Every checkpoint carries `job_config.json` (written by rank 0 before `COMPLETE`, so its size is
verified like the other files): the job config it was written with and the model's shape. Before
anything in the run directory is written or any weight is read, rank 0 compares the resuming run
with that record (for older checkpoints: with OUT/config.json and OUT/model_config/). A change of a
key that would make the checkpoint mean something else (its shape, data, sequence length, seed, what
trains and its LoRA settings) is refused with one line naming the key and both values; a change the
run can continue through (the recurrence curriculum and draws, the distillation weights, the global
batch) is printed as a note.
docs/training.md has the table.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from retro.data.manifest import MANIFEST_NAME
from retro.model.config import RetroConfig
from retro.training.checkpoint import RECORD, find_resume
from retro.training.errors import ConfigError
from retro.training.job_config import JobConfig

# key -> why a change is refused (these change what the checkpoint's weights and data position mean)
REFUSED = {
    "model.shape": "the checkpoint's weights have another layer layout",
    "model.hidden_size": "the checkpoint's weights have another width",
    "model.vocab_size": "the checkpoint's embeddings have another vocabulary",
    "data.train": "the checkpoint's data position is in other sources",
    "data.weights": "the checkpoint's data position follows another mixture",
    "data.seq_len": "the checkpoint's data position counts windows of another length",
    "train.seed": "the seed keys the data order and the recurrence draws the checkpoint continues",
    "train.micro_batch": "each rank's saved data position counts batches of the checkpoint's micro_batch",
    "optim.name": "the checkpoint's optimizer state belongs to the other optimizer",
    "optim.muon_split_fused": "the checkpoint's Muon state was kept for another grouping of the fused matrices",
    "data.content": "the data sources were re-prepared since the checkpoint (their manifest.json changed), so "
    "its data position would point into other documents",
    "train.trainable": "the checkpoint's optimizer state and updates belong to another set of trained parameters",
    "lora.rank": "the checkpoint's LoRA matrices have another rank",
    "lora.alpha": "the checkpoint's LoRA updates were trained at another scale (alpha / rank)",
    "lora.targets": "the checkpoint's LoRA updates sit on other projections",
    "lora.train_adapter": "the checkpoint's optimizer state covers another set of trained parameters",
}
LORA_KEYS = ("rank", "alpha", "targets", "train_adapter")  # compared when both runs train LoRA
# key -> what happens when it changes (the run continues)
NOTED = {
    "train.steps": "the LR schedule and the curriculum's ramp (ramp_fraction x train.steps) follow the new length "
    "from the checkpoint's step on",
    "train.global_batch": "steps after the checkpoint take the new batch; the tokens count continues from the "
    "tokens already trained on",
    "recurrence.curriculum": "the curriculum's mean m(step) follows the new setting from the checkpoint's step on",
    "recurrence.max_mean": "the curriculum's mean m(step) follows the new setting from the checkpoint's step on",
    "recurrence.ramp_fraction": "the curriculum's mean m(step) follows the new setting from the checkpoint's step on",
    "recurrence.start_mean": "the curriculum's mean m(step) follows the new setting from the checkpoint's step on",
    "recurrence.draws_per_step": "the draws from the checkpoint's step on are grouped by the new setting (another "
    "number of distinct r per step, and other r than an uninterrupted run's)",
    "recurrence.fixed": "from the checkpoint's step on r is drawn, or fixed at m, by the new setting",
    "distill.kd_weight": "the loss weighs CE and KD by the new setting from the checkpoint's step on",
    "distill.temperature": "the KD term uses the new temperature from the checkpoint's step on",
}
# what the draws of a record written before recurrence.draws_per_step replaced recurrence.sample_every were
_SAMPLE_EVERY = {"micro_batch": 0, "step": 1}


def model_record(config: RetroConfig | dict) -> dict[str, Any]:
    get = config.get if isinstance(config, dict) else (lambda key: getattr(config, key, None))
    shape = [get("n_prelude"), get("n_recurrent"), get("n_coda")]
    return {
        "shape": shape if None not in shape else None,
        "hidden_size": get("hidden_size"),
        "vocab_size": get("vocab_size"),
    }


def data_content(sources: list[str]) -> list[str]:
    """A fingerprint of each source's prepared shards: the SHA-256 of its manifest.json (which lists every
    shard's size and hash), so a source re-prepared in place under the same path is told apart."""
    out = []
    for source in sources:
        try:
            out.append(hashlib.sha256((Path(source) / MANIFEST_NAME).read_bytes()).hexdigest()[:16])
        except OSError:
            out.append("unreadable")
    return out


def run_record(job: JobConfig, model_config: RetroConfig) -> dict[str, Any]:
    """What a checkpoint records about the run that wrote it."""
    return {
        "job": job.to_dict(),
        "model": model_record(model_config),
        "cwd": str(Path.cwd()),
        "data_content": data_content(job.data.train),
    }


def _resolved(paths: list[str], cwd: str | None) -> list[str]:
    base = Path(cwd) if cwd else Path.cwd()
    return [str((base / p).resolve()) for p in paths]


def _mixture(weights: list[float], sources: int) -> list[float]:
    weights = list(weights) or [1.0] * sources
    total = sum(weights) or 1.0
    return [round(w / total, 9) for w in weights]


def meaning(record: dict[str, Any]) -> dict[str, Any]:
    """The compared values of a record (keys it lacks are left out: an old record compares what it has)."""
    job, model, cwd = record.get("job", {}), record.get("model") or {}, record.get("cwd")
    data, train, recurrence = job.get("data", {}), job.get("train", {}), job.get("recurrence", {})
    if recurrence:  # a record from before a key existed ran with what that key's default now means
        old_draws = _SAMPLE_EVERY.get(recurrence.get("sample_every"), 0)
        recurrence = {"draws_per_step": old_draws, "fixed": False, "start_mean": 1, **recurrence}
    distill = job.get("distill", {}) if job.get("distill", {}).get("teacher") else {}  # weights matter with a teacher
    if "alpha" in distill:  # kd_weight's name before it was renamed (same meaning: the weight of the KD term)
        distill = {"kd_weight": distill["alpha"], **distill}
    out: dict[str, Any] = {}
    for key in ("shape", "hidden_size", "vocab_size"):
        if model.get(key) is not None:
            out[f"model.{key}"] = list(model[key]) if key == "shape" else model[key]
    if "train" in data:
        out["data.train"] = _resolved(data["train"], cwd)
        if "weights" in data:
            out["data.weights"] = _mixture(data["weights"], len(data["train"]))
    for section, values, key in (
        ("data", data, "seq_len"),
        ("train", train, "seed"),
        ("train", train, "global_batch"),
        ("train", train, "micro_batch"),
        ("train", train, "steps"),
        ("optim", job.get("optim", {}), "name"),
        ("optim", job.get("optim", {}), "muon_split_fused"),
        ("recurrence", recurrence, "curriculum"),
        ("recurrence", recurrence, "max_mean"),
        ("recurrence", recurrence, "ramp_fraction"),
        ("recurrence", recurrence, "start_mean"),
        ("recurrence", recurrence, "draws_per_step"),
        ("recurrence", recurrence, "fixed"),
        ("distill", distill, "kd_weight"),
        ("distill", distill, "temperature"),
    ):
        if key in values:
            out[f"{section}.{key}"] = values[key]
    if record.get("data_content"):
        out["data.content"] = record["data_content"]
    if "train" in job:  # a record from before train.trainable trained everything
        out["train.trainable"] = train.get("trainable", "all")
    if out.get("train.trainable") == "lora":
        lora = job.get("lora", {})
        for key in LORA_KEYS:
            if key in lora:
                out[f"lora.{key}"] = sorted(lora[key]) if key == "targets" else lora[key]
    return out


def read_record(checkpoint: Path, out_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """The checkpoint's record, else one rebuilt from OUT/config.json (+ OUT/model_config/), else None;
    and where it came from."""
    own = checkpoint / RECORD
    if own.is_file():
        return json.loads(own.read_text()), f"checkpoint {checkpoint.name}"
    config = out_dir / "config.json"
    if not config.is_file():
        return None, ""
    try:
        job = json.loads(config.read_text())
        model_file = out_dir / "model_config" / "config.json"
        model = model_record(json.loads(model_file.read_text())) if model_file.is_file() else None
    except (OSError, ValueError):
        return None, ""
    if not isinstance(job, dict):
        return None, ""
    return {"job": job, "model": model}, f"checkpoint {checkpoint.name}, per {config}"


def _show(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 1e15 else repr(value)
    return json.dumps(value) if isinstance(value, (list, str, bool)) else str(value)


def compare(old: dict[str, Any], new: dict[str, Any], where: str) -> tuple[list[str], list[str]]:
    """(refusals, notes) for every compared key present in both."""
    refusals, notes = [], []
    for key in list(REFUSED) + list(NOTED):
        if key not in old or key not in new or old[key] == new[key]:
            continue
        change = f"{key} changed from {_show(old[key])} ({where}) to {_show(new[key])}"
        if key in REFUSED:
            refusals.append(f"{change} ({REFUSED[key]})")
        else:
            notes.append(f"note: resume: {change}; {NOTED[key]}")
    return refusals, notes


def check_resume(out_dir: Path, job: JobConfig, model_config: RetroConfig, say: Callable[[str], None] = print) -> None:
    """Rank 0, before anything in out_dir is written or any weight read: refuse (ConfigError, one line) a
    resume whose checkpoint means something else under this config; print a note for each allowed change."""
    try:
        path = find_resume(out_dir, job.checkpoint.resume, warn=lambda text: None)  # the Trainer warns later
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from None
    if path is None:
        return
    record, where = read_record(path, out_dir)
    if record is None:
        say(
            f"retro.train: note: resume: {path} has no {RECORD} and {out_dir / 'config.json'} is missing; "
            "the resumed settings are not compared with the checkpoint's"
        )
        return
    new = meaning(run_record(job, model_config))
    refusals, notes = compare(meaning(record), new, where)
    if refusals:
        raise ConfigError(
            "resume: "
            + "; ".join(refusals)
            + ": set it back to resume, or train into another train.out_dir (or --resume none --force to start over)"
        )
    for note in notes:
        say(f"retro.train: {note}")


def recorded_tokens_per_step(checkpoint: Path, out_dir: Path) -> int | None:
    """global_batch x seq_len of the run that wrote `checkpoint`, when its record says (for checkpoints
    that predate the saved tokens count)."""
    record, _ = read_record(checkpoint, out_dir)
    values = meaning(record) if record else {}
    if "train.global_batch" in values and "data.seq_len" in values:
        return int(values["train.global_batch"]) * int(values["data.seq_len"])
    return None
