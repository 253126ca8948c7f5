"""Bytes per GPU of a training step: sharded states, gathered units, activations kept for backward."""

from __future__ import annotations

import torch

from retro.model.config import RetroConfig
from retro.model.loss import DISTILL_CHUNK_ROWS, LOSS_CHUNK_ROWS
from retro.training.job_config import JobConfig


def meta_model(model_config: RetroConfig) -> torch.nn.Module:
    from retro.model.modeling import RetroForCausalLM

    with torch.device("meta"):
        return RetroForCausalLM(model_config)


def sharding_units(model_config: RetroConfig) -> dict[str, int]:
    """Parameters per FSDP2 unit (retro/distributed/parallelize.py): each prelude/coda layer, the core, the root."""
    model = meta_model(model_config).model
    units = {f"prelude.{i}": sum(p.numel() for p in layer.parameters()) for i, layer in enumerate(model.prelude)}
    units["core"] = sum(p.numel() for p in model.recurrent.parameters()) if model.recurrent is not None else 0
    units.update({f"coda.{i}": sum(p.numel() for p in layer.parameters()) for i, layer in enumerate(model.coda)})
    total = sum(p.numel() for p in meta_model(model_config).parameters())
    units["root"] = total - sum(units.values())
    return units


def optimizer_split(model_config: RetroConfig, name: str) -> tuple[int, int]:
    """(Muon parameters, AdamW parameters) under the trainer's grouping rule (retro.optim.build)."""
    from retro.optim.build import group_parameters

    groups = group_parameters(meta_model(model_config))
    muon = sum(p.numel() for g in groups if g["use_muon"] for p in g["params"])
    adamw = sum(p.numel() for g in groups if not g["use_muon"] for p in g["params"])
    return (muon, adamw) if name == "muon" else (0, muon + adamw)


# ---------------------------------------------------------------- memory


def layer_activation_bytes(
    model_config: RetroConfig, dtype_bytes: int, fused_norm: bool, compiled: bool = False
) -> float:
    """Bytes one decoder layer keeps for backward, per token.

    Counted from what autograd saves in retro/model/layers.py: every RMSNorm keeps its input, fp32 rstd
    and (unfused, as on CPU) the normalised tensor; the fused QKV output stays alive through the
    V view SDPA keeps; SDPA keeps rotated q, k, its output and an fp32 log-sum-exp per head; the
    o_proj input is a reshaped copy; SwiGLU keeps gate|up, silu(gate) and their product.

    ``compiled`` (``parallel.compile``: each layer through torch.compile), as measured on a compiled
    layer (tests/unit/test_plan.py): the norms are fused; Inductor's partitioner recomputes
    silu(gate) in backward instead of saving it (SwiGLU keeps 3 of the 4 intermediate-wide tensors);
    q/k norms keep only their rstd, their inputs being slices of the QKV output that is kept anyway.
    """
    fused_norm = fused_norm or compiled
    h, q = model_config.hidden_size, model_config.num_attention_heads * model_config.head_dim
    kv, i = model_config.num_key_value_heads * model_config.head_dim, model_config.intermediate_size

    def norm(width: int) -> float:  # input (+ normalised copy when unfused) in compute dtype, rstd fp32
        return (width + (0 if fused_norm else width)) * dtype_bytes + 4

    attention = (q + 2 * kv + q + kv + q + q) * dtype_bytes + 4 * model_config.num_attention_heads
    mlp = (3 if compiled else 4) * i * dtype_bytes
    if model_config.norm_position == "pre":  # norm(x) -> linear: the norm's output is the linear's saved input
        return 2 * norm(h) + 2 * h * dtype_bytes + attention + mlp
    qk = (8 if compiled else norm(q) + norm(kv)) if model_config.qk_norm != "none" else 0
    return 2 * h * dtype_bytes + qk + attention + mlp + 2 * norm(h)  # x, x' as linear inputs; norms after


def activation_bytes(
    model_config: RetroConfig,
    tokens: int,
    k: int,
    checkpointing: str,
    dtype_bytes: int,
    fused_norm: bool,
    compiled: bool = False,
) -> dict[str, float]:
    """Bytes kept for backward by one micro-batch of `tokens` with k grad passes, and the transient
    peak on top of it (one pass or layer recomputed during backward; one loss chunk's logits).
    `compiled`: the decoder layers run through torch.compile (`layer_activation_bytes`)."""
    h, b = model_config.hidden_size, dtype_bytes
    layer = layer_activation_bytes(model_config, b, fused_norm, compiled) * tokens
    one_pass = h * b * tokens + model_config.n_recurrent * layer  # adapter input + the block's layers
    stage_layers = model_config.n_prelude + model_config.n_coda
    held = 8 * tokens + model_config.head_dim * b * tokens  # token ids (int64), rope cos + sin (shared)
    held += h * b * tokens if model_config.is_recurrent else 0  # e, input of the once-per-forward injection
    if checkpointing == "full":
        held += stage_layers * h * b * tokens  # each prelude/coda layer keeps only its input
    else:
        held += stage_layers * layer
    if checkpointing in ("recurrence", "full"):
        held += (
            (k * h * b * tokens + h * b * tokens) if model_config.is_recurrent else 0
        )  # pass inputs + shared injection
        recompute = max(one_pass if model_config.is_recurrent else 0, layer if checkpointing == "full" else 0)
    else:
        held += k * one_pass if model_config.is_recurrent else 0
        recompute = 0
    held += (h + (0 if fused_norm else h)) * b * tokens + 4 * tokens  # final norm
    loss_saved = h * b * tokens + 4 * model_config.vocab_size * h  # grad wrt hidden, fp32 grad wrt head weight
    loss_chunk = min(tokens, LOSS_CHUNK_ROWS) * model_config.vocab_size * (4 + b)  # fp32 log-probs + grad logits
    return {"held": held + loss_saved, "transient": recompute + loss_chunk}


def memory_per_gpu(
    model_config: RetroConfig,
    job: JobConfig,
    shard: int,
    micro_batch: int,
    k: int,
    on_gpu: bool = True,
    accum: int = 1,
    teacher: RetroConfig | None = None,
) -> dict[str, float]:
    """Bytes per GPU; parameters, gradients and optimizer state sharded over `shard` ranks (fp32).

    A distillation teacher adds its parameters (in the compute dtype, sharded), its gathered root
    (embeddings, norm, head: kept until the student's loss) and its loss chunk (DISTILL_CHUNK_ROWS rows of
    five fp32 [rows, vocab] buffers; CE's smaller chunk is counted with the activations).
    """
    units = sharding_units(model_config)
    total = sum(units.values())
    muon, adamw = optimizer_split(model_config, job.optim.name)
    b = 2 if on_gpu and job.train.dtype != "fp32" else 4
    tokens = micro_batch * job.data.seq_len
    out = {
        "params (fp32, sharded)": 4 * total / shard,
        "grads (fp32, sharded)": 4 * total / shard,
        "optimizer state": (4 * muon + 8 * adamw) / shard,  # Muon: momentum; AdamW: exp_avg + exp_avg_sq
        "gathered units (current + prefetch)": 2 * max(units.values()) * b if shard > 1 else 0,
        "unsharded grads kept across micro-batches": total * 4 if accum > 1 and shard > 1 else 0,
    }
    if teacher is not None:
        teacher_units = sharding_units(teacher)
        out["teacher params (compute dtype, sharded)"] = b * sum(teacher_units.values()) / shard
        out["teacher gathered root + layer"] = (teacher_units["root"] + max(teacher_units.values())) * b
        rows = min(tokens, DISTILL_CHUNK_ROWS)  # its [rows, vocab] buffers: CE's two and three more, fp32
        out["distillation loss chunk"] = rows * teacher.vocab_size * 4 * 5
    for mode in ("none", "recurrence"):
        acts = activation_bytes(model_config, tokens, k, mode, b, fused_norm=on_gpu, compiled=job.parallel.compile)
        out[f"activations, checkpointing={mode}"] = acts["held"]
        out[f"activation transient, checkpointing={mode}"] = acts["transient"]
    return out
