"""Distillation from a frozen teacher: the run's `[distill]` section, the teacher's model, its targets.

The teacher (the unmodified source model, or any model with the student's tokenizer) runs forward
only, under no_grad, sharded with FSDP2 like the student and in the same compute dtype. It hands the
student its final hidden states and its head weight, and the student's head loss computes both
models' logits chunk by chunk (retro/model/loss.py): loss = (1 - kd_weight) * CE + kd_weight * T^2 *
KL(teacher || student). Forgetting is the reason: post-training on one domain costs general ability, and the
source model's own distribution is the cheapest record of that ability.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.device_mesh import DeviceMesh

from retro.distributed.parallelize import ParallelSettings, parallelize
from retro.distributed.sharded_load import load_rows_into
from retro.hf.conversion import build_conversion, conversion_config, load_source_config
from retro.hf.gguf import open_gguf
from retro.hf.surgery import static_plan
from retro.hf.weights import WeightReader
from retro.model.config import RetroConfig
from retro.model.loss import HeadLoss, Teacher, linear_distillation_loss
from retro.model.modeling import RetroForCausalLM
from retro.model.rope import inverse_frequencies
from retro.training.errors import ConfigError

# keys of [distill] that were replaced, with what to write instead (job_config refuses them with this line)
RETIRED = {
    "alpha": "distill.alpha was renamed distill.kd_weight, the weight of the KD term (CE gets 1 - kd_weight): "
    "retro's alpha = x is kd_weight = x; the paper's alpha weighs CE, so its alpha = a is kd_weight = 1 - a",
}


@dataclass
class DistillSettings:
    """The run's `[distill]` section; an empty `teacher` turns distillation off."""

    teacher: str = ""  # a retro.convert/retro.export directory, a Hugging Face model directory or a .gguf file
    kd_weight: float = 0.5  # weight of the KD term: loss = (1 - kd_weight) * CE + kd_weight * T^2 * KL
    temperature: float = 1.0

    def validate(self) -> None:
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ValueError(f"distill.kd_weight must be in [0, 1], got {self.kd_weight}")
        if not self.temperature > 0:
            raise ValueError(f"distill.temperature must be > 0, got {self.temperature}")

    @property
    def enabled(self) -> bool:
        return bool(self.teacher)


def is_retro_dir(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == RetroConfig.model_type


def teacher_config(settings: DistillSettings) -> RetroConfig:
    """The teacher's RetroConfig, no weight read: what start-up checks and the planner need."""
    path = Path(settings.teacher)
    if not path.exists():
        raise ConfigError(f"distill.teacher = {settings.teacher!r} does not exist")
    if path.is_dir() and is_retro_dir(path):
        return RetroConfig.from_pretrained(path)

    try:
        gguf = open_gguf(path, None)
        hf_config, arch = gguf.config_and_architecture() if gguf else load_source_config(path)
    except (ValueError, FileNotFoundError, KeyError) as error:
        raise ConfigError(f"distill.teacher = {settings.teacher!r}: {error}") from None
    return conversion_config(hf_config, arch, static_plan(hf_config.num_hidden_layers))


def teacher_source(settings: DistillSettings) -> tuple[RetroConfig, object, object]:
    """(config, get_rows, get_shape) of the teacher: read by rows from a retro directory, or converted in
    memory from a Hugging Face directory / GGUF file (every layer kept, no recurrence: the source model)."""
    path = Path(settings.teacher)
    if path.is_dir() and is_retro_dir(path):
        reader = WeightReader(path)
        return teacher_config(settings), reader.get_rows, reader.shape
    try:
        done = build_conversion(path, static=True)
    except (ValueError, FileNotFoundError, KeyError) as error:
        raise ConfigError(f"distill.teacher = {settings.teacher!r}: {error}") from None
    tensors = done.tensors
    return done.config, lambda name, a, b: tensors[name][a:b], lambda name: list(tensors[name].shape)


def check_teacher(settings: DistillSettings, student_config: RetroConfig) -> RetroConfig:
    """The teacher's config, after checking it can teach this student (before any weight is read)."""
    config = teacher_config(settings)
    if config.vocab_size != student_config.vocab_size:
        raise ConfigError(
            f"distill.teacher = {settings.teacher!r} has a vocabulary of {config.vocab_size}, the student "
            f"{student_config.vocab_size}: distillation compares the two distributions token by token, so the "
            "tokenizers must be the same"
        )
    return config


def build_teacher(
    settings: DistillSettings,
    student_config: RetroConfig,
    parallel: ParallelSettings,
    mesh: DeviceMesh | None,
    device: torch.device,
    dtype: torch.dtype,
) -> RetroForCausalLM:
    """The frozen teacher on the meta device, in the compute dtype -> FSDP2 (the student's sharding, no
    activation checkpointing: nothing is saved for backward) -> each rank reads only its rows."""
    check_teacher(settings, student_config)
    config, get_rows, get_shape = teacher_source(settings)
    with torch.device("meta"):
        teacher = RetroForCausalLM(config)
    for param in teacher.parameters():  # frozen: held in the compute dtype, no fp32 master copy (buffers stay)
        param.requires_grad_(False)
        param.data = param.data.to(dtype)
    parallelize(teacher, mesh, ParallelSettings(parallel.replicate, "none", parallel.compile), dtype)
    teacher.to_empty(device=device)
    load_rows_into(teacher, get_rows, get_shape)
    with torch.no_grad():
        teacher.model.inv_freq.copy_(inverse_frequencies(config.head_dim, config.rope_parameters))
    return teacher.eval()


class _Capture:
    """The teacher's head inputs, taken inside its forward (where FSDP2 has its head gathered)."""

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.hidden, self.weight = hidden, weight
        return hidden.new_zeros(())


class DistillationLoss:
    """The student's head loss for one micro-batch; keeps the CE and KD parts for the metrics."""

    def __init__(self, teacher: Teacher) -> None:
        self.teacher = teacher
        self.parts: HeadLoss | None = None

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.parts = linear_distillation_loss(hidden, weight, targets, self.teacher)
        return self.parts.total


@torch.no_grad()
def teacher_targets(
    teacher: RetroForCausalLM, settings: DistillSettings, input_ids: torch.Tensor, labels: torch.Tensor, generator
) -> DistillationLoss:
    """Run the teacher on a micro-batch; the returned loss function is the student's `loss_fn`.

    The teacher's root stays gathered after its forward (parallelize sets reshard_after_forward=False
    on the root), so its head weight stays valid until `release_teacher` after the student's loss.
    """
    capture = _Capture()
    teacher(input_ids, shift_labels=labels, return_logits=False, loss_fn=capture, generator=generator)
    return DistillationLoss(Teacher(capture.hidden, capture.weight, settings.kd_weight, settings.temperature))


def release_teacher(teacher: RetroForCausalLM) -> None:
    """Free the teacher's gathered root (embeddings, norm, head) once the student's loss is computed."""
    if hasattr(teacher, "reshard"):
        teacher.reshard()
