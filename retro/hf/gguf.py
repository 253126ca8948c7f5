"""GGUF sources for `retro.convert`: a llama.cpp file read through transformers' GGUF loader.

transformers rebuilds the config and the tokenizer from the file's metadata and dequantises every
tensor to fp32 (undoing llama.cpp's q/k row permutation), so a GGUF goes through the same surgery as
a safetensors checkpoint: `GGUFSource.weights()` offers `WeightReader`'s interface over that state
dict. The config is read first (metadata only), so a bad request fails before any tensor is
dequantised; the whole fp32 model is then held in memory once, which suits the small models GGUF is
used for here (SmolLM2-135M: 0.5 GB).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from retro.hf.archs import architecture_for

GGUF_MAGIC = b"GGUF"
INSTALL_HINT = "pip install 'retro[gguf]'"


class GGUFSupportMissing(ImportError, ValueError):
    """The optional `gguf` / `accelerate` packages are not installed (a ValueError too, so CLIs print one line)."""


def require_gguf_support() -> None:
    """transformers reads GGUF with the `gguf` package and loads the model through `accelerate`."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise GGUFSupportMissing(f"reading a GGUF file needs the {' and '.join(missing)} package(s): {INSTALL_HINT}")


def is_gguf_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def gguf_path(model: Path, gguf_file: str | None) -> Path | None:
    """The GGUF file that `--model MODEL [--gguf-file NAME]` names, or None for a checkpoint directory."""
    if gguf_file is not None:
        if not model.is_dir():
            raise FileNotFoundError(f"--gguf-file needs --model to be the directory holding it; {model} is not one")
        path = model / gguf_file
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
    elif model.is_file() or model.suffix == ".gguf":
        if not model.is_file():
            raise FileNotFoundError(f"GGUF file {model} does not exist")
        path = model
    else:
        found = sorted(p.name for p in model.glob("*.gguf")) if model.is_dir() else []
        if found and not (model / "config.json").is_file():
            raise FileNotFoundError(
                f"{model} has no config.json but holds GGUF files ({', '.join(found)}); pass --model "
                f"{model / found[0]} or --gguf-file {found[0]}"
            )
        return None
    if not is_gguf_file(path):
        raise ValueError(f"{path} is not a GGUF file (no GGUF magic) nor a Hugging Face checkpoint directory")
    return path


class GGUFWeights:
    """`WeightReader`'s interface (`file_of`, `get`, `shape`, `get_rows`) over a dequantised state dict."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        self.path = path
        self.tensors = tensors
        self.file_of = {name: path for name in tensors}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise KeyError(f"tensor {name!r} is missing from GGUF file {self.path}")
        return self.tensors[name]

    def shape(self, name: str) -> list[int]:
        return list(self.get(name).shape)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.get(name)[start:stop]


class GGUFSource:
    """One GGUF file: its config (read on construction), weights and tokenizer (read on demand)."""

    def __init__(self, path: Path) -> None:
        require_gguf_support()
        self.path = path
        self._kwargs = {"gguf_file": path.name}
        from transformers import AutoConfig

        try:
            self.config = AutoConfig.from_pretrained(path.parent, **self._kwargs)
        except (ValueError, KeyError, OSError, IndexError, NotImplementedError) as error:
            raise ValueError(f"{path}: cannot read its GGUF metadata as a transformers config ({error})") from None

    def config_and_architecture(self):
        """(transformers config, retro Architecture), as `retro.hf.conversion.load_source_config` returns them."""
        return self.config, architecture_for(self.config.model_type)

    def weights(self) -> GGUFWeights:
        """Every tensor dequantised to fp32 under its Hugging Face name; a tied head is not listed twice."""
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(
                self.path.parent, config=self.config, dtype=torch.float32, **self._kwargs
            )
        except (ValueError, KeyError, OSError, IndexError, NotImplementedError) as error:
            raise ValueError(f"{self.path}: cannot read its tensors ({error})") from None
        tensors, seen = {}, set()
        for name, tensor in model.state_dict().items():
            if tensor.data_ptr() in seen:  # lm_head.weight of a tied model is the embedding itself
                continue
            seen.add(tensor.data_ptr())
            tensors[name] = tensor.detach()
        return GGUFWeights(self.path, tensors)

    def save_tokenizer(self, out_dir: Path) -> dict[str, Any]:
        """Write the tokenizer the file's metadata describes into out_dir.

        Returns summary fields: the files written and, when the file holds no usable tokenizer, a note
        saying so (the conversion itself is still valid; data preparation then needs another tokenizer).
        """
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.path.parent, **self._kwargs)
        except Exception as error:  # whatever the cause, this file holds no usable tokenizer
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            return {
                "tokenizer_files": [],
                "tokenizer_note": f"{self.path.name} holds no usable tokenizer ({reason}); no tokenizer was "
                "written: copy one into the output directory before retro.data.prepare or retro.eval",
            }
        before = set(os.listdir(out_dir))
        tokenizer.save_pretrained(out_dir)
        return {"tokenizer_files": sorted(set(os.listdir(out_dir)) - before)}


def open_gguf(model: str | Path, gguf_file: str | None = None) -> GGUFSource | None:
    """The GGUF source `--model [--gguf-file]` names (config read, no tensors yet), or None for a
    safetensors checkpoint directory."""
    path = gguf_path(Path(model), gguf_file)
    return GGUFSource(path) if path is not None else None
