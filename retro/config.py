"""Training configuration: dataclasses, loaded from TOML, overridden from the command line.

One source of truth for every number. Unknown sections or keys and values of the wrong type are
errors that name the key; `--section.key=value` overrides parse by the field's declared type.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class ModelConfig:
    path: str = ""  # a `retro.convert` directory (config.json + safetensors)
    init: str = "pretrained"  # "pretrained" loads `path`; "random" keeps its shape but re-initialises (from-scratch baseline)
    state_init: str = ""  # override the checkpoint's initial-state rule: trunc_normal | zeros | embed
    shape: list[int] = field(default_factory=list)  # optional expected prelude,recurrent,coda; checked against the checkpoint


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # prepared shard directories (`retro.data.prepare`)
    weights: list[float] = field(default_factory=list)  # mixture weights; empty = equal
    val: str = ""  # shard directory whose "val" split is used; empty = the first train source
    seq_len: int = 1024
    num_workers: int = 2


@dataclass
class TrainConfig:
    steps: int = 1000
    global_batch: int = 1024  # sequences per optimizer step, all ranks together
    micro_batch: int = 8  # sequences per rank per forward/backward
    seed: int = 0
    out_dir: str = "runs/default"
    log_every: int = 1
    val_every: int = 0  # 0 = only at the end
    val_batches: int = 8  # validation micro-batches, all ranks together (the same windows for any rank count)
    val_recurrences: list[int] = field(default_factory=lambda: [1, 4, 8, 16, 32])
    grad_clip: float = 1.0
    max_bad_steps: int = 5  # consecutive NaN/Inf steps tolerated (each skipped) before stopping
    dtype: str = "auto"  # auto: bf16 compute on CUDA, fp32 on CPU | bf16 | fp32
    tensorboard: bool = False


@dataclass
class RecurrenceConfig:
    max_mean: float = 32.0  # M, the curriculum's final mean recurrence
    curriculum: str = "1-sqrt"  # 1-sqrt | linear | none
    ramp_fraction: float = 0.75  # W = ramp_fraction * steps
    backprop_depth: int = 8  # s: passes with gradient
    sigma: float = 0.5
    cap: int = 0  # 0 = no cap on the sampled r


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | muon
    lr: float = 5e-5  # AdamW: embeddings, head, norms (and everything when name = adamw)
    muon_lr: float = 1e-3
    weight_decay: float = 1e-4
    muon_weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    muon_scale: str = "original"  # original: sqrt(max(1, rows/cols)) | match_rms_adamw: 0.2 sqrt(max(rows, cols))
    muon_split_fused: bool = True  # orthogonalise q, k, v (gate, up) separately
    schedule: str = "wsd"  # wsd (warmup, constant, cosine decay) | cosine | constant
    warmup_steps: int = 125
    decay_steps: int = 0  # wsd: length of the final cosine decay
    min_lr_ratio: float = 0.001


@dataclass
class ParallelConfig:
    replicate: int = 1  # HSDP: replicate across this many groups, shard within each (1 = plain FSDP)
    activation_checkpointing: str = "recurrence"  # none | recurrence (each pass) | full (each pass + prelude/coda layers)
    compile: bool = False  # torch.compile each decoder layer
    reshard_after_forward: bool = True


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0 = only at the end and on signals
    keep_last: int = 2
    resume: str = "auto"  # auto: newest complete checkpoint in out_dir if any | none | a checkpoint path


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recurrence: RecurrenceConfig = field(default_factory=RecurrenceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    ("model", "init"): ("pretrained", "random"),
    ("model", "state_init"): ("", "trunc_normal", "zeros", "embed"),
    ("train", "dtype"): ("auto", "bf16", "fp32"),
    ("recurrence", "curriculum"): ("1-sqrt", "linear", "none"),
    ("optim", "name"): ("adamw", "muon"),
    ("optim", "muon_scale"): ("original", "match_rms_adamw"),
    ("optim", "schedule"): ("wsd", "cosine", "constant"),
    ("parallel", "activation_checkpointing"): ("none", "recurrence", "full"),
}


class ConfigError(ValueError):
    pass


def _coerce(where: str, kind: Any, value: Any) -> Any:
    """Check/convert a TOML value or a command-line string to the declared type."""
    origin = typing.get_origin(kind)
    if origin is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, str):
            value = [v for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(where, item, v) for v in value]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value.strip()
    raise ConfigError(f"{where}: unsupported field type {kind}")


def _set(config: Config, section: str, key: str, value: Any) -> None:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if section not in sections:
        raise ConfigError(f"unknown config section [{section}]; sections: {', '.join(sections)}")
    target = getattr(config, section)
    hints = typing.get_type_hints(type(target))
    if key not in hints:
        raise ConfigError(f"unknown config key {section}.{key}; keys of [{section}]: {', '.join(hints)}")
    setattr(target, key, _coerce(f"{section}.{key}", hints[key], value))


def validate(config: Config) -> None:
    """Value checks that need no files: every message names the key."""
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(config, section), key)
        if value not in allowed:
            raise ConfigError(f"{section}.{key} = {value!r}; choose one of {', '.join(repr(a) for a in allowed)}")
    t, d, o, r = config.train, config.data, config.optim, config.recurrence
    positive = {"train.steps": t.steps, "train.global_batch": t.global_batch, "train.micro_batch": t.micro_batch,
                "data.seq_len": d.seq_len, "train.log_every": t.log_every, "checkpoint.keep_last": config.checkpoint.keep_last,
                "recurrence.backprop_depth": r.backprop_depth, "parallel.replicate": config.parallel.replicate}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if config.model.shape and (len(config.model.shape) != 3 or min(config.model.shape) < 0):
        raise ConfigError(f"model.shape must be three non-negative integers prelude,recurrent,coda, got {config.model.shape}")
    if r.max_mean < 1:
        raise ConfigError(f"recurrence.max_mean must be >= 1, got {r.max_mean}")
    if not 0 <= r.ramp_fraction <= 1:
        raise ConfigError(f"recurrence.ramp_fraction must be in [0, 1], got {r.ramp_fraction}")
    if d.weights and len(d.weights) != len(d.train):
        raise ConfigError(f"data.weights has {len(d.weights)} entries for {len(d.train)} data.train sources")
    if any(v < 1 for v in t.val_recurrences):
        raise ConfigError(f"train.val_recurrences must be positive, got {t.val_recurrences}")
    if len(o.betas) != 2:
        raise ConfigError(f"optim.betas needs two values, got {o.betas}")
    if o.warmup_steps + o.decay_steps > t.steps:
        raise ConfigError(f"optim.warmup_steps + optim.decay_steps = {o.warmup_steps + o.decay_steps} exceeds train.steps = {t.steps}")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """TOML file (optional) then `section.key=value` overrides, validated."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        with path.open("rb") as f:
            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as error:
                raise ConfigError(f"{path}: not valid TOML: {error}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section]")
            for key, value in values.items():
                _set(config, section, key, value)
    for override in overrides:
        if "=" not in override or "." not in override.split("=", 1)[0]:
            raise ConfigError(f"override {override!r} must look like section.key=value")
        name, value = override.split("=", 1)
        section, key = name.split(".", 1)
        _set(config, section, key, value)
    validate(config)
    return config


def save_config(config: Config, path: Path) -> None:
    path.write_text(json.dumps(config.to_dict(), indent=2))


def split_cli_overrides(argv: list[str]) -> list[str]:
    """`--a.b=c` or `--a.b c` arguments -> ['a.b=c', ...]; anything else is an error."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        if "=" in arg:
            out.append(arg[2:])
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"override {arg} has no value")
            out.append(f"{arg[2:]}={argv[i + 1]}")
            i += 2
    return out
