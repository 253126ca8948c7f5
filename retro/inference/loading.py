"""A retro checkpoint directory loaded for evaluation: the model (with an optional s0 override) and its tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from retro.model.config import RetroConfig
from retro.model.modeling import RetroForCausalLM


def load_model(path: str | Path, state_init: str | None, device: str, dtype: torch.dtype) -> RetroForCausalLM:
    """A retro checkpoint directory; `state_init` overrides the s0 init stored in its config."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model directory {path} has no config.json (expected a retro.convert / retro.export output)"
        )
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type != "retro":
        raise ValueError(
            f"{path}/config.json has model_type {model_type!r}; convert it first with python -m retro.convert"
        )
    config = RetroConfig.from_pretrained(path)
    if state_init is not None:
        config.state_init = state_init
    return RetroForCausalLM.from_pretrained(path, config=config, dtype=dtype).to(device).eval()


def load_tokenizer(path: str | Path, add_bos: bool = True, config: RetroConfig | None = None):
    """The checkpoint's tokenizer; add_bos loads it with add_bos_token=True, as lm-eval's model arg does.

    Pass the model's `config` (as loaded by `load_model`): without one, AutoTokenizer reads config.json again,
    and wherever AutoConfig cannot resolve model_type "retro" it falls back to the base PreTrainedConfig, which
    logs "You are using a model of type `retro` to instantiate a model of type ``".
    """
    kwargs = {"add_bos_token": True} if add_bos else {}
    if config is not None:
        kwargs["config"] = config
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"no usable tokenizer in {path}: {error}") from None
