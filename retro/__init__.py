"""retro: retrofit depth recurrence into pretrained language models.

Importing retro registers `RetroConfig` / `RetroForCausalLM` with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(converted_dir)` returns a `RetroForCausalLM`.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from retro.model.config import RetroConfig
from retro.model.modeling import RetroForCausalLM, RetroModel

AutoConfig.register("retro", RetroConfig, exist_ok=True)
AutoModelForCausalLM.register(RetroConfig, RetroForCausalLM, exist_ok=True)

__all__ = ["RetroConfig", "RetroForCausalLM", "RetroModel"]
