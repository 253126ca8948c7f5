"""The step's loss, chosen once per run: plain cross-entropy, or distillation from a frozen teacher.

The Trainer calls an objective the same way whichever it is: `head_loss` before the student's
forward (None keeps the model's own chunked cross-entropy), `parts` after it, for the metrics, and
`release` once the micro-batch's loss is computed.
"""

from __future__ import annotations

from typing import Protocol

import torch

from retro.model.flops import FlopModel
from retro.model.modeling import RetroForCausalLM
from retro.training.distill import DistillationLoss, DistillSettings, release_teacher, teacher_targets


class Objective(Protocol):
    part_names: tuple[str, ...]  # logged beside "loss", in the order of `parts`
    flops_per_token: float  # forward work of the objective itself (MFU counts it), beyond the student's

    def head_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> object | None:
        """The student's `loss_fn` for this micro-batch (None: the model's own cross-entropy)."""

    def parts(self, head_loss: object | None, loss: torch.Tensor) -> list[torch.Tensor]:
        """The logged parts of this micro-batch's loss, detached."""

    def release(self) -> None:
        """Free what `head_loss` held once the student's loss is computed."""


class CrossEntropy:
    """The model's own chunked next-token cross-entropy; nothing more to log."""

    part_names: tuple[str, ...] = ()
    flops_per_token = 0.0

    def head_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> None:
        return None

    def parts(self, head_loss: None, loss: torch.Tensor) -> list[torch.Tensor]:
        return []

    def release(self) -> None:
        pass


class Distillation:
    """(1 - w) CE + w T^2 KL(teacher || student), w = distill.kd_weight; logs the CE and KD parts (distill.py)."""

    part_names = ("ce", "kd")

    def __init__(self, teacher: RetroForCausalLM, settings: DistillSettings, seq_len: int) -> None:
        self.teacher, self.settings = teacher, settings
        config = teacher.config
        passes = config.default_recurrences if config.is_recurrent else 1
        self.flops_per_token = FlopModel.from_config(config, seq_len).forward_per_token(passes)

    def head_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> DistillationLoss:
        return teacher_targets(self.teacher, self.settings, input_ids, labels, generator)

    def parts(self, head_loss: DistillationLoss, loss: torch.Tensor) -> list[torch.Tensor]:
        return [head_loss.parts.ce, head_loss.parts.kd]

    def release(self) -> None:
        release_teacher(self.teacher)
