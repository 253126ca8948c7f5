"""A source decoder -> a RetroForCausalLM config and tensors in memory (no file written).

`retro.convert` writes the result; a distillation teacher (retro/training/distill.py) loads it directly;
`retro.select_layers` and the planner read only the configs. Every request error is raised before any
weight is read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig

from retro.hf.archs import Architecture, architecture_for
from retro.hf.gguf import open_gguf
from retro.hf.output_dir import TOKENIZER_FILES
from retro.hf.surgery import LayerPlan, build_state_dict, plan_from_ranges, plan_from_shape, static_plan
from retro.hf.weights import WeightReader
from retro.model.adapter import Adapter
from retro.model.config import STATE_INITS, RetroConfig


def load_source_config(model_dir: Path):
    """(transformers config, Architecture) of a local Hugging Face checkpoint directory; no weights read."""
    if not model_dir.is_dir():
        raise FileNotFoundError(f"source model directory {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: not a Hugging Face checkpoint directory")
    try:
        model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    except (ValueError, AttributeError) as error:
        raise ValueError(f"{model_dir / 'config.json'}: not a JSON object ({error})") from None
    arch = architecture_for(model_type)
    return AutoConfig.from_pretrained(model_dir), arch


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--shape must be three integers P,R,C (e.g. 4,8,4), got {text!r}") from None
    if len(values) != 3:
        raise ValueError(f"--shape must be three integers P,R,C (e.g. 4,8,4), got {text!r}")
    return values  # type: ignore[return-value]


def conversion_config(
    hf_config, arch: Architecture, plan: LayerPlan, state_init: str = "trunc_normal", default_recurrences: int = 1
) -> RetroConfig:
    """The RetroConfig of a source config cut by `plan` (no weights read; the planner uses it too)."""
    config = RetroConfig(
        **arch.config_fields(hf_config),
        n_prelude=len(plan.prelude),
        n_recurrent=len(plan.block),
        n_coda=len(plan.coda),
        state_init=state_init,
        default_recurrences=default_recurrences,
        source_layers={"prelude": plan.prelude, "block": plan.block, "coda": plan.coda},
        tie_word_embeddings=False,
    )
    config.architectures = ["RetroForCausalLM"]
    return config


@dataclass
class Conversion:
    """A converted model in memory: what `convert` writes, and what a distillation teacher loads."""

    config: RetroConfig
    tensors: dict[str, torch.Tensor]
    summary: dict
    gguf: object | None  # the open GGUF source (its tokenizer is rebuilt from metadata), or None
    tokenizer_files: list[str] = field(default_factory=list)  # copied from the source directory


def build_conversion(
    model_dir: str | Path,
    shape: tuple[int, int, int] | None = None,
    layers: str | None = None,
    static: bool = False,
    adapter_init: str = "identity",
    state_init: str = "trunc_normal",
    default_recurrences: int = 1,
    seed: int = 0,
    gguf_file: str | None = None,
) -> Conversion:
    """The RetroForCausalLM config and tensors for a source model and a layer choice, nothing written."""
    model_dir = Path(model_dir)
    if sum(x is not None and x is not False for x in (shape, layers, static)) != 1:
        raise ValueError("give exactly one of --shape P,R,C, --layers a-b,c-d,e-f or --static")
    if adapter_init not in ("identity", "default"):
        raise ValueError(f"--adapter-init must be identity or default, got {adapter_init!r}")
    if state_init not in STATE_INITS:
        raise ValueError(f"--state-init must be one of {STATE_INITS}, got {state_init!r}")
    gguf = open_gguf(model_dir, gguf_file)  # None: a safetensors checkpoint directory
    hf_config, arch = gguf.config_and_architecture() if gguf else load_source_config(model_dir)
    num_layers = hf_config.num_hidden_layers
    plan: LayerPlan = (
        static_plan(num_layers)
        if static
        else plan_from_ranges(num_layers, layers)
        if layers
        else plan_from_shape(num_layers, *shape)
    )
    reader = gguf.weights() if gguf else WeightReader(model_dir)
    config = conversion_config(hf_config, arch, plan, state_init, default_recurrences)
    fields = arch.config_fields(hf_config)
    tensors = build_state_dict(reader.get, arch, fields, plan, bool(getattr(hf_config, "tie_word_embeddings", False)))
    if config.is_recurrent:
        adapter = Adapter(config.hidden_size)  # [0 | I] on construction
        if adapter_init == "default":
            adapter.reset_default(torch.Generator().manual_seed(seed))
        tensors["model.recurrent.adapter.weight"] = adapter.weight.detach().to(
            tensors["model.embed_tokens.weight"].dtype
        )

    config.dtype = str(tensors["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    copied = [name for name in TOKENIZER_FILES if not gguf and (model_dir / name).is_file()]
    zero_rows = (tensors["model.embed_tokens.weight"].abs().sum(dim=1) == 0).nonzero().flatten().tolist()
    source_params = sum(math.prod(reader.shape(n)) for n in reader.file_of)
    summary = {
        "source": str(model_dir),
        "model_type": arch.model_type,
        "source_layers": num_layers,
        "prelude": plan.prelude,
        "block": plan.block,
        "coda": plan.coda,
        "dropped": plan.dropped(num_layers),
        "source_parameters": source_params,
        "parameters": sum(t.numel() for t in tensors.values()),
        "adapter_init": adapter_init,
        "state_init": state_init,
        "tokenizer_files": copied,
        "zero_embedding_rows": zero_rows,
    }
    return Conversion(config, tensors, summary, gguf, copied)
