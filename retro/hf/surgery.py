"""Model surgery: which source layers become prelude / recurrent block / coda, and the new weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from retro.hf.archs import Architecture


@dataclass(frozen=True)
class LayerPlan:
    prelude: list[int]
    block: list[int]
    coda: list[int]

    @property
    def kept(self) -> list[int]:
        return self.prelude + self.block + self.coda

    def dropped(self, num_layers: int) -> list[int]:
        kept = set(self.kept)
        return [i for i in range(num_layers) if i not in kept]


def plan_from_shape(num_layers: int, prelude: int, block: int, coda: int) -> LayerPlan:
    """The paper's choice: first `prelude` layers, last `coda` layers, the `block` layers before the coda."""
    for name, size in (("prelude", prelude), ("recurrent block", block), ("coda", coda)):
        if size <= 0:
            raise ValueError(f"shape: {name} size must be a positive integer, got {size}")
    if prelude + block + coda > num_layers:
        raise ValueError(
            f"shape {prelude},{block},{coda} needs {prelude + block + coda} layers but the source model has "
            f"{num_layers}"
        )
    coda_start = num_layers - coda
    return LayerPlan(
        list(range(prelude)), list(range(coda_start - block, coda_start)), list(range(coda_start, num_layers))
    )


def parse_range(text: str) -> list[int]:
    """'a-b' (inclusive) or 'a' -> list of layer indices."""
    try:
        if "-" in text:
            start, end = (int(v) for v in text.split("-"))
        else:
            start = end = int(text)
    except ValueError:
        raise ValueError(f"--layers: cannot read range {text!r}; use a-b (inclusive), e.g. 0-3") from None
    if end < start:
        raise ValueError(f"--layers: range {text!r} ends before it starts")
    return list(range(start, end + 1))


def plan_from_ranges(num_layers: int, spec: str) -> LayerPlan:
    """'a-b,c-d,e-f' -> prelude, block, coda; checked for range, overlap and order.

    The stages run prelude -> block -> coda, so their source layers must ascend in that order (gaps
    are dropped layers); ranges given out of order would run the source's layers backwards.
    """
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) != 3:
        raise ValueError(f"--layers needs three ranges prelude,block,coda (e.g. 0-3,10-17,18-21), got {spec!r}")
    groups = [parse_range(p) for p in parts]
    names = ("prelude", "block", "coda")
    for name, group in zip(names, groups):
        bad = [i for i in group if i < 0 or i >= num_layers]
        if bad:
            raise ValueError(f"--layers: {name} uses layers {bad} but the source model has layers 0..{num_layers - 1}")
    seen: set[int] = set()
    for name, group in zip(names, groups):
        overlap = seen.intersection(group)
        if overlap:
            raise ValueError(f"--layers: {name} overlaps another range at layers {sorted(overlap)}")
        seen.update(group)
    for i in (1, 2):
        if groups[i][0] < groups[i - 1][-1]:
            raise ValueError(
                f"--layers: the {names[i]} ({parts[i]}) must come after the {names[i - 1]} ({parts[i - 1]}); "
                f"give the ranges in source order prelude,block,coda, e.g. 0-3,10-17,18-21"
            )
    return LayerPlan(*groups)


def static_plan(num_layers: int) -> LayerPlan:
    """All layers, no recurrence: the static baseline in the same model class."""
    return LayerPlan(list(range(num_layers)), [], [])


def build_state_dict(
    read, arch: Architecture, fields: dict, plan: LayerPlan, tie_word_embeddings: bool
) -> dict[str, torch.Tensor]:
    """Our tensors from the source's: layers renumbered per stage, q|k|v and gate|up fused, head untied."""
    sources = arch.layer_sources(fields)
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": read("model.embed_tokens.weight")}
    for stage, layers in (("prelude", plan.prelude), ("recurrent.block", plan.block), ("coda", plan.coda)):
        for new_index, old_index in enumerate(layers):
            for ours, theirs in sources.items():
                parts = [read(f"model.layers.{old_index}.{name}") for name in theirs]
                out[f"model.{stage}.{new_index}.{ours}"] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    out["model.norm.weight"] = read("model.norm.weight")
    head = out["model.embed_tokens.weight"] if tie_word_embeddings else read("lm_head.weight")
    out["lm_head.weight"] = head.clone()  # untied: the head starts as a copy and trains on its own
    return out
