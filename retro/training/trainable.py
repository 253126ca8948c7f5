"""What trains (`train.trainable`): everything, the recurrent core, the adapter alone, or LoRA updates.

Freezing is `requires_grad = False`, set before FSDP2 wraps the model (retro/distributed/parallelize.py):
a frozen parameter then never gets a gradient, so FSDP2 reduce-scatters nothing for it, the optimizer
(retro/optim/build.py groups only parameters that require grad) holds no state for it, and clipping
ignores it. Gradients still flow *through* frozen layers to the trainable ones before them.

| mode        | trains                                                        |
|-------------|---------------------------------------------------------------|
| `all`       | every parameter (the paper)                                   |
| `recurrent` | the recurrent core: the 2h -> h adapter and the block (its norms included) |
| `adapter`   | the adapter alone (the authors' adapter-only OLMo run)        |
| `lora`      | low-rank updates on the block's projections ([lora] section), and the adapter if lora.train_adapter |
"""

from __future__ import annotations

from retro.model.lora import LoraSettings, add_lora, is_lora_parameter
from retro.model.modeling import RetroForCausalLM
from retro.training.errors import ConfigError

MODES = ("all", "recurrent", "adapter", "lora")
CORE = "model.recurrent."
ADAPTER = "model.recurrent.adapter."


def trains(name: str, mode: str, lora: LoraSettings) -> bool:
    """Whether parameter `name` (a RetroForCausalLM name) trains under `mode`."""
    if mode == "all":
        return True
    if mode == "recurrent":
        return name.startswith(CORE)
    if mode == "adapter":
        return name.startswith(ADAPTER)
    if mode == "lora":
        return is_lora_parameter(name) or (lora.train_adapter and name.startswith(ADAPTER))
    raise ValueError(f"train.trainable must be one of {MODES}, got {mode!r}")


def apply_trainable(model: RetroForCausalLM, mode: str, lora: LoraSettings) -> tuple[int, int]:
    """Attach LoRA updates (mode "lora") and freeze what `mode` leaves out; before FSDP2 wraps the model
    (works on the meta device). Returns (trainable, total) parameter counts."""
    if mode != "all" and model.model.recurrent is None:
        raise ConfigError(f"train.trainable = {mode!r} needs a recurrent block; this model has none (static)")
    if mode == "lora":
        add_lora(model.model.recurrent.block, lora)
    trainable = total = 0
    for name, p in model.named_parameters():
        p.requires_grad_(trains(name, mode, lora))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
