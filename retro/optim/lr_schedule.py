"""Learning-rate schedules as multipliers of each parameter group's own base lr (PAPER.md, "LR").

The paper's schedule ("wsd", warmup-stable-decay): linear warmup from min_ratio * lr to lr over
warmup_steps, constant, then cosine decay to min_ratio * lr over the last decay_steps (paper:
warmup 125, decay over the last 30k of 50k steps, min_ratio 0.001). A multiplier rather than an
absolute lr lets one schedule drive Muon's and AdamW's groups, whose base lrs differ 20x.
"""

from __future__ import annotations

import math

import torch

KINDS = ("wsd", "cosine", "constant")


def check_schedule(total_steps: int, warmup_steps: int, decay_steps: int, kind: str, min_ratio: float) -> None:
    """Raise ValueError naming the value when the schedule cannot be built (warmup + decay must fit)."""
    if kind not in KINDS:
        raise ValueError(f"schedule kind must be one of {KINDS}, got {kind!r}")
    for name, value in (("total_steps", total_steps), ("warmup_steps", warmup_steps), ("decay_steps", decay_steps)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not (0.0 <= min_ratio <= 1.0):
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio!r}")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) exceeds total_steps ({total_steps})")
    if kind == "wsd" and warmup_steps + decay_steps > total_steps:
        raise ValueError(
            f"warmup_steps + decay_steps ({warmup_steps} + {decay_steps}) exceeds total_steps ({total_steps})"
        )


def lr_multiplier(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    decay_steps: int,
    kind: str = "wsd",
    min_ratio: float = 0.001,
) -> float:
    """Multiplier of the base lr for the update at optimizer step `step` (0-based).

    Warmup (all kinds): min_ratio + (1 - min_ratio) * step / warmup_steps for step < warmup_steps,
    so step 0 runs at min_ratio and step warmup_steps at 1.
    "wsd": 1 until total_steps - decay_steps, then min_ratio + (1 - min_ratio) * (1 + cos(pi t)) / 2
    with t = (step - (total_steps - decay_steps)) / decay_steps, reaching min_ratio at total_steps.
    "cosine": the same cosine over all of [warmup_steps, total_steps]; decay_steps is ignored.
    "constant": 1 after warmup; decay_steps is ignored.
    Steps past total_steps hold the final value.
    """
    check_schedule(total_steps, warmup_steps, decay_steps, kind, min_ratio)
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if step < warmup_steps:
        return min_ratio + (1.0 - min_ratio) * step / warmup_steps
    if kind == "constant":
        return 1.0
    decay = decay_steps if kind == "wsd" else total_steps - warmup_steps
    decay_start = total_steps - decay
    if step < decay_start or decay == 0:
        return 1.0
    t = min(1.0, (step - decay_start) / decay)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_steps: int,
    decay_steps: int,
    kind: str = "wsd",
    min_ratio: float = 0.001,
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR scaling every param group's own initial lr by lr_multiplier (arguments as there).

    Arguments are checked here, before training starts. The multiplier is a plain closure, so the
    scheduler's state_dict holds the step count and base lrs but not the schedule's arguments:
    those come from the config on resume. Call scheduler.step() once after each optimizer.step().
    """
    check_schedule(total_steps, warmup_steps, decay_steps, kind, min_ratio)

    def multiplier(step: int) -> float:
        return lr_multiplier(
            step,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            decay_steps=decay_steps,
            kind=kind,
            min_ratio=min_ratio,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
