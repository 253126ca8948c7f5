"""Muon for hidden matrices and AdamW for everything else, in one FSDP2-aware optimizer.

One ``torch.optim.Optimizer`` with two kinds of param group (``use_muon``) so that one LR scheduler
drives both learning rates and ``torch.distributed.checkpoint.state_dict`` saves and restores the
whole state (all state tensors are shaped like their parameters: DTensors under FSDP2).

Parameters may be plain tensors (orthogonalised locally) or FSDP2 DTensors sharded Shard(0) along
one mesh dimension (possibly unevenly) and replicated along any others: FSDP (1-D mesh) or HSDP
(``(Replicate(), Shard(0))``). Momentum and weight decay run on the local shards; for Newton-Schulz
each logical matrix is gathered on one owner rank of the shard dimension (owners balance the
Newton-Schulz cost), same-shape matrices are stacked for one batched call, and the results go back,
with two ``all_to_all_single`` per step and dtype in total (see ``exchange.py``). Under HSDP the
gradients are already reduced across replicas, so each replica group runs this exchange inside its
own shard group and computes the same update: no communication across replicas.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.optim.adamw import adamw

from retro.kernels.newton_schulz import MUON_COEFFICIENTS, newton_schulz, per_step_coefficients
from retro.optim.exchange import Block, RowExchange, assign_owners, newton_schulz_cost

SCALE_RULES = ("original", "match_rms_adamw")
NS_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
MUON_KEYS = {
    "params",
    "use_muon",
    "lr",
    "weight_decay",
    "momentum",
    "nesterov",
    "ns_steps",
    "ns_coefficients",
    "ns_eps",
    "ns_dtype",
    "scale_rule",
    "split_sizes",
    "initial_lr",
}
# initial_lr: written by torch.optim.lr_scheduler into the groups it drives.
ADAMW_KEYS = {"params", "use_muon", "lr", "betas", "eps", "weight_decay", "initial_lr"}


def update_scale(rows: int, cols: int, rule: str) -> float:
    """Multiplier of the orthogonalised update of a rows x cols (out x in) matrix.

    "original": sqrt(max(1, rows/cols)), Keller Jordan's Muon as used by the paper;
    "match_rms_adamw": 0.2 * sqrt(max(rows, cols)), Moonshot's rule that matches AdamW's update RMS.
    """
    if rule == "original":
        return math.sqrt(max(1.0, rows / cols))
    if rule == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"scale_rule must be one of {SCALE_RULES}, got {rule!r}")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def shard_mesh_dim(p: DTensor) -> int:
    """The mesh dimension along which ``p`` is row-sharded: the one Shard(0) placement, every other
    placement Replicate() (FSDP2's FSDP and HSDP layouts). Replicas hold identical shards, so Muon
    only needs to exchange rows within this dimension."""
    placements = tuple(p.placements)
    shard = [d for d, pl in enumerate(placements) if pl == Shard(0)]
    if len(shard) != 1 or any(pl != Replicate() for d, pl in enumerate(placements) if d != shard[0]):
        raise ValueError(
            "Muon supports DTensor parameters sharded Shard(0) along one mesh dimension and replicated "
            f"along the others (FSDP2 FSDP or HSDP), got placements {placements} on a "
            f"{p.device_mesh.ndim}-D mesh"
        )
    return shard[0]


class Muon(torch.optim.Optimizer):
    """Muon (momentum + Newton-Schulz orthogonalisation) on ``use_muon`` groups, AdamW on the rest.

    Muon groups: lr, weight_decay, momentum, nesterov, ns_steps, ns_coefficients (one triple or
    one per step), ns_eps, ns_dtype ("auto" = bf16 on CUDA else the parameter's dtype, "float32",
    "bfloat16"), scale_rule ("original" | "match_rms_adamw"), split_sizes (None, or a row split of
    every matrix in the group, e.g. (q, k, v) of a fused QKV weight: each block is orthogonalised
    and scaled as its own matrix). AdamW groups: lr, betas, eps, weight_decay. Missing keys take the
    constructor's values. Momentum follows torch.optim.Muon: buf <- lerp(buf, g, 1 - momentum),
    Nesterov update lerp(g, buf, momentum); weight decay is decoupled: p *= 1 - lr * weight_decay.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_coefficients: Sequence = MUON_COEFFICIENTS,
        ns_eps: float = 1e-7,
        ns_dtype: str = "auto",
        scale_rule: str = "original",
        adamw_lr: float = 5e-5,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 1e-4,
    ) -> None:
        self._muon_defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_coefficients=ns_coefficients,
            ns_eps=ns_eps,
            ns_dtype=ns_dtype,
            scale_rule=scale_rule,
            split_sizes=None,
        )
        self._adamw_defaults = dict(
            lr=adamw_lr, betas=tuple(adamw_betas), eps=adamw_eps, weight_decay=adamw_weight_decay
        )
        super().__init__(params, {})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Fill the group's defaults by kind (Muon or AdamW) and validate it before adding."""
        group = dict(param_group)
        group.setdefault("use_muon", True)
        if isinstance(group["params"], torch.Tensor):
            group["params"] = [group["params"]]
        group["params"] = list(group["params"])
        kind = "Muon" if group["use_muon"] else "AdamW"
        allowed = MUON_KEYS if group["use_muon"] else ADAMW_KEYS
        unknown = sorted(set(group) - allowed)
        if unknown:
            raise ValueError(f"{kind} param group has unknown keys {unknown}; allowed: {sorted(allowed)}")
        for key, value in (self._muon_defaults if group["use_muon"] else self._adamw_defaults).items():
            group.setdefault(key, value)
        if group["use_muon"]:
            self._check_muon_group(group)
        super().add_param_group(group)

    @staticmethod
    def _check_muon_group(group: dict[str, Any]) -> None:
        if group["scale_rule"] not in SCALE_RULES:
            raise ValueError(f"scale_rule must be one of {SCALE_RULES}, got {group['scale_rule']!r}")
        if group["ns_dtype"] not in NS_DTYPES:
            raise ValueError(f"ns_dtype must be one of {sorted(NS_DTYPES)}, got {group['ns_dtype']!r}")
        per_step_coefficients(group["ns_coefficients"], group["ns_steps"])
        split = group["split_sizes"]
        for p in group["params"]:
            if p.dim() != 2:
                raise ValueError(f"Muon needs 2-D parameters, got shape {tuple(p.shape)}")
            if split is not None and sum(split) != p.shape[0]:
                raise ValueError(
                    f"split_sizes {tuple(split)} must sum to the rows of every parameter in the "
                    f"group, got shape {tuple(p.shape)}"
                )
            if isinstance(p, DTensor):
                shard_mesh_dim(p)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every group; all ranks must hold gradients for the same parameters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        muon_work: list[tuple[torch.Tensor, dict, torch.Tensor]] = []
        for group in self.param_groups:
            if group["use_muon"]:
                muon_work += self._momentum(group)
            else:
                self._adamw(group)
        if muon_work:
            self._orthogonalise_and_apply(muon_work)
        return loss

    def _momentum(self, group: dict) -> list[tuple[torch.Tensor, dict, torch.Tensor]]:
        """Momentum and weight decay on local shards; returns (param, group, local update)."""
        out = []
        mu = group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            grad, buf = _local(p.grad), _local(state["momentum_buffer"])
            buf.lerp_(grad, 1 - mu)
            update = grad.lerp(buf, mu) if group["nesterov"] else buf
            _local(p).mul_(1 - group["lr"] * group["weight_decay"])
            out.append((p, group, update))
        return out

    def _adamw(self, group: dict) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adamw(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )

    def _orthogonalise_and_apply(self, work: list[tuple[torch.Tensor, dict, torch.Tensor]]) -> None:
        blocks: list[Block] = []
        for i, (p, group, _) in enumerate(work):
            split = group["split_sizes"] or (p.shape[0],)
            start = 0
            for rows in split:
                blocks.append(Block(i, start, start + rows, p.shape[1]))
                start += rows
        group_of = [work[blk.param][1] for blk in blocks]

        # Plain tensors: every rank holds the whole matrix and orthogonalises it itself.
        local_ids = [b for b, blk in enumerate(blocks) if not isinstance(work[blk.param][0], DTensor)]
        full = {b: work[blocks[b].param][2][blocks[b].start : blocks[b].stop] for b in local_ids}
        # DTensors: one exchange per dtype, so each all_to_all buffer has a single dtype.
        by_dtype: dict[torch.dtype, list[int]] = defaultdict(list)
        for b, blk in enumerate(blocks):
            if isinstance(work[blk.param][0], DTensor):
                by_dtype[work[blk.param][2].dtype].append(b)
        exchanges = []
        for dtype, ids in sorted(by_dtype.items(), key=lambda kv: str(kv[0])):
            ex, group_pg = self._plan(work, [blocks[b] for b in ids], [group_of[b] for b in ids])
            device = work[blocks[ids[0]].param][2].device
            owned = ex.to_owners([u for _, _, u in work], dtype, device, group_pg)
            full.update({ids[k]: m for k, m in owned.items()})
            exchanges.append((ex, ids, dtype, device, group_pg))

        results = self._newton_schulz_batched(full, blocks, group_of)

        for b in local_ids:
            blk, (p, group, _) = blocks[b], work[blocks[b].param]
            alpha = -group["lr"] * update_scale(blk.rows, blk.cols, group["scale_rule"])
            p[blk.start : blk.stop].add_(results[b], alpha=alpha)
        for ex, ids, dtype, device, group_pg in exchanges:
            mine = {k: results[ids[k]] for k in ex.owned_by[ex.rank]}
            for k, rows in ex.from_owners(mine, dtype, device, group_pg):
                blk = blocks[ids[k]]
                p, group, _ = work[blk.param]
                lo, hi = ex.local_rows(k)
                alpha = -group["lr"] * update_scale(blk.rows, blk.cols, group["scale_rule"])
                _local(p)[lo:hi].add_(rows, alpha=alpha)

    @staticmethod
    def _plan(work, blocks: list[Block], groups: list[dict]) -> tuple[RowExchange, Any]:
        """Owners for DTensor blocks (balanced Newton-Schulz cost) and the exchange between the ranks
        of the shard mesh dimension (under HSDP each replica group plans and exchanges on its own)."""
        layouts = {(work[blk.param][0].device_mesh, shard_mesh_dim(work[blk.param][0])) for blk in blocks}
        if len(layouts) != 1:
            raise ValueError(
                f"all DTensor Muon parameters must share one device mesh and shard dimension, got {layouts}"
            )
        mesh, dim = layouts.pop()
        world, rank = mesh.size(dim), mesh.get_local_rank(dim)
        costs = [newton_schulz_cost(b.rows, b.cols, g["ns_steps"]) for b, g in zip(blocks, groups)]
        owners = assign_owners(costs, world)
        param_rows = {blk.param: work[blk.param][0].shape[0] for blk in blocks}
        ex = RowExchange(param_rows, blocks, owners, world, rank)
        for i in param_rows:
            lo, hi = ex.shard[i][rank]
            if work[i][2].shape[0] != hi - lo:
                raise ValueError(
                    f"DTensor of shape {tuple(work[i][0].shape)} holds {work[i][2].shape[0]} rows on "
                    f"rank {rank}; Muon expects torch.chunk's Shard(0) layout ({hi - lo} rows)"
                )
        return ex, mesh.get_group(dim)

    @staticmethod
    def _newton_schulz_batched(
        full: dict[int, torch.Tensor], blocks: list[Block], group_of: list[dict]
    ) -> dict[int, torch.Tensor]:
        """Orthogonalise every gathered matrix; same-shape ones (tall ones transposed) in one batch."""
        batches: dict[tuple, list[int]] = defaultdict(list)
        for b, m in full.items():
            g = group_of[b]
            shape = (min(m.shape), max(m.shape))
            key = (
                shape,
                g["ns_steps"],
                per_step_coefficients(g["ns_coefficients"], g["ns_steps"]),
                g["ns_eps"],
                g["ns_dtype"],
                m.dtype,
                m.device,
            )
            batches[key].append(b)
        results = {}
        for key, ids in batches.items():
            _, steps, coefficients, eps, ns_dtype, _, device = key
            dtype = NS_DTYPES[ns_dtype] or (torch.bfloat16 if device.type == "cuda" else None)
            wide = [full[b] if full[b].shape[0] <= full[b].shape[1] else full[b].mT for b in ids]
            out = newton_schulz(torch.stack(wide), steps=steps, coefficients=coefficients, eps=eps, dtype=dtype)
            for b, o in zip(ids, out):
                results[b] = o if full[b].shape[0] <= full[b].shape[1] else o.mT
        return results
