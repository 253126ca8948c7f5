"""Bytes each GPU moves per optimizer step under FSDP2 / HSDP, and the batch split a GPU count allows."""

from __future__ import annotations

from retro.training.job_config import JobConfig

GPUS_PER_NODE = 8


def feasible_micro_batch(job: JobConfig, gpus: int) -> tuple[int, int] | None:
    """(micro-batch, accumulation steps) for this GPU count: the config's micro-batch, shrunk if the
    global batch has fewer sequences than micro_batch x GPUs; None if no split works."""
    for micro in range(min(job.train.micro_batch, job.train.global_batch // gpus), 0, -1):
        if job.train.global_batch % (micro * gpus) == 0:
            return micro, job.train.global_batch // (micro * gpus)
    return None


def comm_per_step(
    units: dict[str, int],
    muon_params: int,
    gpus: int,
    shard: int,
    accum: int,
    reshard: bool,
    param_bytes: int = 2,
    reduce_bytes: int = 4,
    teacher_params: int = 0,
) -> dict[str, float]:
    """Bytes each GPU receives per optimizer step (ring collectives: (g-1)/g of the full size).

    Every micro-batch all-gathers every unit for the forward, and again for the backward for
    units resharded after forward (FSDP2 keeps the root gathered). Gradients are reduce-scattered
    once per step (the trainer disables gradient sync on all but the last micro-batch); under HSDP
    the fp32 gradient shards are then all-reduced across the replicas. Muon moves each matrix
    shard to one owner rank and the update back (two all-to-alls inside the shard group). A
    distillation teacher (`teacher_params`) is gathered whole once per micro-batch (forward only).
    """
    replicas = gpus // shard
    total = sum(units.values())
    frac = (shard - 1) / shard
    regathered = sum(v for name, v in units.items() if name != "root") if reshard else 0
    gather = accum * frac * (total + regathered + teacher_params) * param_bytes
    scatter = frac * total * reduce_bytes
    allreduce = 2 * (replicas - 1) / replicas * total / shard * reduce_bytes
    muon = 2 * frac * muon_params / shard * reduce_bytes
    within_node = shard <= GPUS_PER_NODE
    return {
        "all_gather": gather,
        "reduce_scatter": scatter,
        "all_reduce": allreduce,
        "muon_all_to_all": muon,
        "intra_node": (gather + scatter + muon) if within_node else 0.0,
        "inter_node": allreduce + (0.0 if within_node else gather + scatter + muon),
    }
