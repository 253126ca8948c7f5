"""Split a model's parameters into Muon matrices and AdamW parameters, and build the optimizer.

Rule (the paper's): every 2-D parameter is a hidden matrix -> Muon (the Linears and the adapter,
which is its own module with a 2-D ``weight``), except ``nn.Embedding`` weights and the output head
(a module named ``lm_head``); the head, embeddings, norms and biases (1-D) -> AdamW. Works on
FSDP2-wrapped models: parameters are DTensors with global shapes, and ``fully_shard`` keeps the
modules' class and their ``split_sizes`` attribute.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from retro.kernels.newton_schulz import MUON_COEFFICIENTS
from retro.optim.lr_schedule import KINDS, build_scheduler, check_schedule
from retro.optim.muon import NS_DTYPES, SCALE_RULES, Muon

HEAD_NAME = "lm_head"
PAPER_DECAY_FRACTION = 0.6
OPTIMIZERS = ("muon", "adamw")


def group_parameters(model: nn.Module, *, split_fused: bool = True) -> list[dict[str, Any]]:
    """Param groups: Muon matrices (one group per distinct ``split_sizes``) then one AdamW group.

    A Linear with ``split_sizes`` (fused QKV / gate-up) gets its blocks orthogonalised separately
    when ``split_fused``; otherwise the fused matrix is orthogonalised whole, as the paper's code did.
    Shared (tied) parameters are counted once; frozen ones are left out.
    """
    seen: set[int] = set()
    muon: dict[tuple[int, ...] | None, list[nn.Parameter]] = {}
    adamw: list[nn.Parameter] = []
    for module_name, module in model.named_modules():
        hidden = not isinstance(module, nn.Embedding) and module_name.split(".")[-1] != HEAD_NAME
        for p in module.parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if hidden and p.dim() == 2:
                split = getattr(module, "split_sizes", None) if split_fused else None
                if split is not None:
                    split = tuple(int(s) for s in split)
                    if sum(split) != p.shape[0]:
                        raise ValueError(
                            f"{module_name}.split_sizes={split} sums to {sum(split)}, but its weight "
                            f"has {p.shape[0]} rows"
                        )
                muon.setdefault(split, []).append(p)
            else:
                adamw.append(p)
    groups: list[dict[str, Any]] = [
        {"params": params, "use_muon": True, "split_sizes": split} for split, params in muon.items()
    ]
    if adamw:
        groups.append({"params": adamw, "use_muon": False})
    return groups


@dataclass
class OptimSettings:
    """The run's `[optim]` section: which optimizer, its hyper-parameters and the LR schedule."""

    name: str = field(default="muon", metadata={"choices": OPTIMIZERS})
    lr: float = 5e-5  # AdamW: embeddings, head, norms (and everything when name = adamw)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-10  # the paper's Muon recipe (its auxiliary AdamW)
    weight_decay: float = 1e-4
    muon_lr: float = 1e-3
    muon_weight_decay: float = 1e-4
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    ns_coefficients: list[float] = field(default_factory=lambda: list(MUON_COEFFICIENTS))  # (a, b, c) every step
    ns_dtype: str = field(default="auto", metadata={"choices": tuple(NS_DTYPES)})  # auto: bf16 on CUDA
    muon_scale: str = field(default="original", metadata={"choices": SCALE_RULES})  # original: sqrt(max(1, rows/cols))
    muon_split_fused: bool = False  # False (the paper): fused Wqkv / gate-up orthogonalised whole; True: q, k, v apart
    schedule: str = field(default="wsd", metadata={"choices": KINDS})  # wsd: warmup, constant, cosine decay
    warmup_steps: int = 125
    # wsd: length of the final cosine decay; -1: the last 60% of train.steps (30k of 50k), 0: none
    decay_steps: int = -1
    min_lr_ratio: float = 0.001

    def decay_steps_for(self, total_steps: int) -> int:
        """decay_steps with -1 resolved to the paper's share (its 30k-of-50k cosine cooldown)."""
        return round(PAPER_DECAY_FRACTION * total_steps) if self.decay_steps == -1 else self.decay_steps

    def validate(self) -> None:
        if self.decay_steps < -1:
            raise ValueError(f"optim.decay_steps must be >= 0 or -1 (the paper's 60%), got {self.decay_steps}")
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas needs two values, got {self.betas}")

    def check_schedule(self, total_steps: int) -> None:
        """The LR schedule's own checks for a run of `total_steps` (before any work: warmup + decay must fit)."""
        try:
            check_schedule(
                total_steps, self.warmup_steps, self.decay_steps_for(total_steps), self.schedule, self.min_lr_ratio
            )
        except ValueError as error:
            raise ValueError(f"optim: {error} (total_steps = train.steps)") from None


def build_optimizer(model: nn.Module, settings: OptimSettings | None = None, **overrides: Any) -> torch.optim.Optimizer:
    """The trainer's optimizer from `[optim]` settings (fields may be overridden by keyword).

    ``name="muon"`` -> :class:`Muon` (Muon on the matrices, AdamW on the rest); ``name="adamw"`` ->
    ``torch.optim.AdamW`` over the same groups (matrices first, then the rest) with lr, betas, eps
    and weight_decay.
    """
    s = dataclasses.replace(settings or OptimSettings(), **overrides)
    groups = group_parameters(model, split_fused=s.muon_split_fused)
    if s.name == "muon":
        return Muon(
            groups,
            lr=s.muon_lr,
            weight_decay=s.muon_weight_decay,
            momentum=s.momentum,
            nesterov=s.nesterov,
            ns_steps=s.ns_steps,
            ns_coefficients=s.ns_coefficients,
            ns_dtype=s.ns_dtype,
            scale_rule=s.muon_scale,
            adamw_lr=s.lr,
            adamw_betas=tuple(s.betas),
            adamw_eps=s.eps,
            adamw_weight_decay=s.weight_decay,
        )
    if s.name == "adamw":
        matrices = [p for g in groups if g["use_muon"] for p in g["params"]]
        others = [p for g in groups if not g["use_muon"] for p in g["params"]]
        return torch.optim.AdamW(
            [{"params": ps} for ps in (matrices, others) if ps],
            lr=s.lr,
            betas=tuple(s.betas),
            eps=s.eps,
            weight_decay=s.weight_decay,
        )
    raise ValueError(f"optimizer name must be one of {OPTIMIZERS}, got {s.name!r}")


def scheduler_for(
    optimizer: torch.optim.Optimizer, settings: OptimSettings, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The scheduler the `[optim]` settings of a run with `total_steps` steps describe."""
    return build_scheduler(
        optimizer,
        total_steps=total_steps,
        warmup_steps=settings.warmup_steps,
        decay_steps=settings.decay_steps_for(total_steps),
        kind=settings.schedule,
        min_ratio=settings.min_lr_ratio,
    )


def rebase_learning_rates(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, settings: OptimSettings
) -> list[tuple[str, float, float]]:
    """After a resume, make the config's base lrs the ones in force (a restored scheduler keeps the
    checkpoint's): returns (key, old, new) for each changed one, so the trainer can say so."""
    changed = {}
    for i, group in enumerate(optimizer.param_groups):
        key = "optim.muon_lr" if group.get("use_muon") else "optim.lr"
        new = settings.muon_lr if group.get("use_muon") else settings.lr
        old = scheduler.base_lrs[i]
        if old != new:
            changed[key] = (old, new)
            scheduler.base_lrs[i] = group["initial_lr"] = new
            group["lr"] = new * scheduler.lr_lambdas[i](scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return [(key, old, new) for key, (old, new) in changed.items()]
