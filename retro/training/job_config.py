"""The run's configuration: TOML sections, overridden from the command line, validated before any work.

Each section's dataclass lives beside the code it configures (choices in its fields' metadata);
this module only assembles them. One source of truth for every number. Unknown sections or keys
and values of the wrong type are errors that name the key; `--section.key=value` overrides parse
by the field's declared type.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retro.data.loader import DataSettings
from retro.distributed.parallelize import ParallelSettings
from retro.model.lora import LoraSettings
from retro.optim.build import OptimSettings
from retro.training.checkpoint import CheckpointSettings
from retro.training.distill import RETIRED as DISTILL_RETIRED
from retro.training.distill import DistillSettings
from retro.training.errors import ConfigError
from retro.training.model_source import ModelSettings
from retro.training.recurrence import RETIRED as RECURRENCE_RETIRED
from retro.training.recurrence import RecurrenceSettings
from retro.training.settings import TrainSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# section -> {retired key: the one line that says what to write instead}; each table lives beside its section
RETIRED = {"recurrence": RECURRENCE_RETIRED, "distill": DISTILL_RETIRED}


@dataclass
class JobConfig:
    """A training run: one section per component, each defined next to the code it configures."""

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    recurrence: RecurrenceSettings = field(default_factory=RecurrenceSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)  # read when train.trainable = "lora"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


def _set(config: JobConfig, section: str, key: str, value: Any) -> None:
    sections = {f.name: f for f in dataclasses.fields(JobConfig)}
    if section not in sections:
        raise ConfigError(f"unknown config section [{section}]; sections: {', '.join(sections)}")
    target = getattr(config, section)
    hints = typing.get_type_hints(type(target))
    if key in RETIRED.get(section, {}):
        raise ConfigError(RETIRED[section][key])
    if key not in hints:
        raise ConfigError(f"unknown config key {section}.{key}; keys of [{section}]: {', '.join(hints)}")
    setattr(target, key, _coerce(f"{section}.{key}", hints[key], value))


def validate(job: JobConfig) -> None:
    """Value checks that need no files: each section's own, its choice lists, then cross-section ones."""
    for section in dataclasses.fields(JobConfig):
        settings = getattr(job, section.name)
        for f in dataclasses.fields(settings):
            allowed = f.metadata.get("choices")
            value = getattr(settings, f.name)
            if allowed is not None and value not in allowed:
                raise ConfigError(
                    f"{section.name}.{f.name} = {value!r}; choose one of {', '.join(repr(a) for a in allowed)}"
                )
        try:
            settings.validate()
        except ValueError as error:
            raise ConfigError(str(error)) from None
    if job.data.weights and len(job.data.weights) != len(job.data.train):
        raise ConfigError(
            f"data.weights has {len(job.data.weights)} entries for {len(job.data.train)} data.train sources"
        )
    try:
        job.optim.check_schedule(job.train.steps)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> JobConfig:
    """TOML file (optional) then `section.key=value` overrides, validated."""
    config = JobConfig()
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
    expand_user_paths(config)
    validate(config)
    return config


def expand_user_paths(job: JobConfig) -> None:
    """`~` in a path key means the home directory, as in a shell (a quoted `'~/runs/x'` reaches us
    unexpanded, and would otherwise become a folder literally named `~`)."""

    def expand(path: str) -> str:
        return os.path.expanduser(path) if path.startswith("~") else path

    job.train.out_dir = expand(job.train.out_dir)
    job.model.path = expand(job.model.path)
    job.data.train = [expand(source) for source in job.data.train]
    job.data.val = expand(job.data.val)
    job.distill.teacher = expand(job.distill.teacher)


def save_config(config: JobConfig, path: Path) -> None:
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
