"""Registry of source architectures that `retro.convert` understands.

Each family is one small file describing how its Hugging Face config and per-layer weight names
map onto the shared `DecoderLayer`; adding a family means adding such a file and listing it here.
"""

from __future__ import annotations

from retro.hf.archs.base import Architecture
from retro.hf.archs.llama import LLAMA
from retro.hf.archs.olmo2 import OLMO2
from retro.hf.archs.qwen import QWEN2, QWEN3

ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (LLAMA, OLMO2, QWEN2, QWEN3)}


def architecture_for(model_type: str) -> Architecture:
    """The family for a config's `model_type`, or a clear error listing the supported ones."""
    if model_type not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type]


__all__ = ["ARCHITECTURES", "Architecture", "architecture_for"]
