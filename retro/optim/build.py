"""Split a model's parameters into Muon matrices and AdamW parameters, and build the optimizer.

Rule (the paper's): every 2-D parameter is a hidden matrix -> Muon (the Linears and the adapter,
which is its own module with a 2-D ``weight``), except ``nn.Embedding`` weights and the output head
(a module named ``lm_head``); the head, embeddings, norms and biases (1-D) -> AdamW. Works on
FSDP2-wrapped models: parameters are DTensors with global shapes, and ``fully_shard`` keeps the
modules' class and their ``split_sizes`` attribute.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from retro.kernels.newton_schulz import MUON_COEFFICIENTS
from retro.optim.muon import Muon

HEAD_NAME = "lm_head"
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


def build_optimizer(
    model: nn.Module,
    *,
    muon_lr: float = 1e-3,
    muon_weight_decay: float = 1e-4,
    adamw_lr: float = 5e-5,
    adamw_betas: tuple[float, float] = (0.9, 0.95),
    adamw_eps: float = 1e-8,
    adamw_weight_decay: float = 1e-4,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_coefficients: Sequence = MUON_COEFFICIENTS,
    ns_dtype: str = "auto",
    scale_rule: str = "original",
    split_fused: bool = True,
    name: str = "muon",
) -> torch.optim.Optimizer:
    """The trainer's optimizer: ``name="muon"`` -> :class:`Muon` (Muon + AdamW groups);
    ``name="adamw"`` -> ``torch.optim.AdamW`` over the same groups (matrices first, then the rest),
    all with ``adamw_lr``, ``adamw_betas``, ``adamw_eps`` and ``adamw_weight_decay``.
    """
    groups = group_parameters(model, split_fused=split_fused)
    if name == "muon":
        return Muon(
            groups, lr=muon_lr, weight_decay=muon_weight_decay, momentum=momentum,
            nesterov=nesterov, ns_steps=ns_steps, ns_coefficients=ns_coefficients,
            ns_dtype=ns_dtype, scale_rule=scale_rule, adamw_lr=adamw_lr, adamw_betas=adamw_betas,
            adamw_eps=adamw_eps, adamw_weight_decay=adamw_weight_decay,
        )
    if name == "adamw":
        matrices = [p for g in groups if g["use_muon"] for p in g["params"]]
        others = [p for g in groups if not g["use_muon"] for p in g["params"]]
        return torch.optim.AdamW(
            [{"params": ps} for ps in (matrices, others) if ps],
            lr=adamw_lr, betas=adamw_betas, eps=adamw_eps, weight_decay=adamw_weight_decay,
        )
    raise ValueError(f"optimizer name must be one of {OPTIMIZERS}, got {name!r}")
