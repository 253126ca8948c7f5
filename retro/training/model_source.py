"""Where the trained model comes from: the run's `[model]` section, a `retro.convert` directory.

The model is built on the meta device, what does not train is frozen (train.trainable, LoRA updates
attached), it is parallelised (AC -> compile -> FSDP2), then each rank reads only its own rows from the
safetensors files, so an 8B model never sits whole in one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.device_mesh import DeviceMesh

from retro.distributed.parallelize import ParallelSettings, parallelize
from retro.distributed.sharded_load import load_rows_into
from retro.hf.weights import WeightReader
from retro.model.config import STATE_INITS, RetroConfig
from retro.model.lora import LoraSettings, lora_start_values
from retro.model.modeling import RetroForCausalLM
from retro.model.rope import inverse_frequencies
from retro.training.errors import ConfigError
from retro.training.trainable import apply_trainable

INITS = ("pretrained", "random")  # random: keep the shape, re-initialise (the from-scratch baseline)


@dataclass
class ModelSettings:
    """The run's `[model]` section."""

    path: str = ""  # a `retro.convert` directory (config.json + safetensors)
    init: str = field(default="pretrained", metadata={"choices": INITS})
    state_init: str = field(default="", metadata={"choices": ("", *STATE_INITS)})  # "" keeps the checkpoint's rule
    # optional expected prelude,recurrent,coda; checked against the checkpoint
    shape: list[int] = field(default_factory=list)

    def validate(self) -> None:
        if self.shape and (len(self.shape) != 3 or min(self.shape) < 0):
            raise ValueError(
                f"model.shape must be three non-negative integers prelude,recurrent,coda, got {self.shape}"
            )


def load_model_config(settings: ModelSettings) -> RetroConfig:
    """The converted model's RetroConfig, checked against model.shape and with model.state_init applied."""
    path = Path(settings.path)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model.path = {settings.path!r}: no config.json there (make one with python -m retro.convert)"
        )
    model_config = RetroConfig.from_pretrained(path)
    found = [model_config.n_prelude, model_config.n_recurrent, model_config.n_coda]
    if settings.shape and settings.shape != found:
        raise ConfigError(f"model.shape = {settings.shape} (prelude, recurrent, coda) but {path} has {found}")
    if settings.state_init:
        model_config.state_init = settings.state_init
    return model_config


def build_model(
    settings: ModelSettings,
    model_config: RetroConfig,
    parallel: ParallelSettings,
    mesh: DeviceMesh | None,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    trainable: str = "all",
    lora: LoraSettings | None = None,
) -> RetroForCausalLM:
    """Meta-device model -> what trains (train.trainable: frozen parameters and LoRA updates, before
    sharding) -> AC/compile/FSDP2 -> each rank reads only its own weight rows (LoRA's from a seeded start)."""
    with torch.device("meta"):
        model = RetroForCausalLM(model_config)
    apply_trainable(model, trainable, lora or LoraSettings())
    parallelize(model, mesh, parallel, dtype)
    model.to_empty(device=device)
    if settings.init == "pretrained":
        reader = WeightReader(settings.path)
        get_rows, get_shape = reader.get_rows, reader.shape
    else:  # from-scratch baseline: one seeded init, identical on every rank, then sliced
        torch.manual_seed(seed)
        full = RetroForCausalLM(model_config).state_dict()
        get_rows, get_shape = (lambda n, a, b: full[n][a:b]), (lambda n: list(full[n].shape))
    start = lora_start_values(model, seed)  # {} unless LoRA: not in the converted model's files
    load_rows_into(
        model,
        lambda n, a, b: start[n][a:b] if n in start else get_rows(n, a, b),
        lambda n: list(start[n].shape) if n in start else get_shape(n),
    )
    with torch.no_grad():
        model.model.inv_freq.copy_(inverse_frequencies(model_config.head_dim, model_config.rope_parameters))
    return model
