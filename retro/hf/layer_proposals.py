"""Which layers to keep: candidate (prelude, block, coda) cuts of an L-layer model, scored from layer metrics.

A candidate keeps the first P layers (prelude), the last C (coda) and any contiguous R layers between them
(block); what lies between prelude and block and between block and coda is dropped. The paper's rule is the
candidate whose block ends right before the coda (`retro.hf.surgery.plan_from_shape`).

The score is a proxy for the damage of dropping: the sum over each maximal dropped span [a, a+n) of the
angular distance d(a, n) between the states before and after it. It assumes spans that move the state little
can be skipped, and that separate spans add up; it sees only the dropped layers, so candidates that drop the
same layers with another split tie (and compute the same function at r = 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from retro.hf.surgery import LayerPlan


@dataclass(frozen=True)
class Candidate:
    """Prelude = layers [0, P), block = [block_start, block_start + R), coda = [L - C, L)."""

    num_layers: int
    prelude: int
    block: int
    coda: int
    block_start: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.prelude, self.block, self.coda

    @property
    def plan(self) -> LayerPlan:
        end = self.block_start + self.block
        return LayerPlan(
            list(range(self.prelude)),
            list(range(self.block_start, end)),
            list(range(self.num_layers - self.coda, self.num_layers)),
        )

    @property
    def paper_rule(self) -> bool:
        return self.block_start + self.block == self.num_layers - self.coda

    @property
    def layers_arg(self) -> str:
        """The `--layers` string of `python -m retro.convert` (inclusive ranges)."""
        plan = self.plan
        return ",".join(f"{g[0]}-{g[-1]}" for g in (plan.prelude, plan.block, plan.coda))


@dataclass
class Scored:
    candidate: Candidate
    proxy: float  # sum of d(a, n) over the dropped spans (lower = expected to hurt less)
    bi_dropped: float  # sum of BI of the dropped layers
    block_io: float  # d(block_start, R): how far one pass of the block moves the state
    equivalent: list[str] = field(default_factory=list)  # --layers of other splits that drop the same layers

    def to_json(self) -> dict:
        c = self.candidate
        return {
            "shape": list(c.shape),
            "layers": c.layers_arg,
            "dropped": c.plan.dropped(c.num_layers),
            "paper_rule": c.paper_rule,
            "proxy": self.proxy,
            "bi_dropped": self.bi_dropped,
            "block_io": self.block_io,
            "equivalent": self.equivalent,
        }


def dropped_spans(dropped: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive layers as (start, length)."""
    spans: list[tuple[int, int]] = []
    for i in dropped:
        if spans and spans[-1][0] + spans[-1][1] == i:
            spans[-1] = (spans[-1][0], spans[-1][1] + 1)
        else:
            spans.append((i, 1))
    return spans


def budget_shapes(num_layers: int, budget: int) -> list[tuple[int, int, int]]:
    """Every (P, R, C) with P, R, C >= 1 and P + R + C = budget."""
    if budget < 3:
        raise ValueError(f"--budget must be at least 3 (one layer per stage), got {budget}")
    if budget > num_layers:
        raise ValueError(f"--budget {budget} is larger than the source model's {num_layers} layers")
    return [(p, r, budget - p - r) for p in range(1, budget - 1) for r in range(1, budget - p)]


def enumerate_candidates(num_layers: int, shapes: list[tuple[int, int, int]]) -> list[Candidate]:
    """Every block position inside [P, L - C) for each shape."""
    out = []
    for p, r, c in shapes:
        if min(p, r, c) < 1 or p + r + c > num_layers:
            raise ValueError(f"shape {p},{r},{c} does not fit a {num_layers}-layer model with every stage >= 1")
        out.extend(Candidate(num_layers, p, r, c, start) for start in range(p, num_layers - c - r + 1))
    return out


def score(candidate: Candidate, angular: list[list[float]], block_influence: list[float]) -> Scored:
    """`angular[a][n]` = d(a, n); `block_influence[l]` = BI_l."""
    dropped = candidate.plan.dropped(candidate.num_layers)
    return Scored(
        candidate,
        proxy=sum(angular[a][n] for a, n in dropped_spans(dropped)),
        bi_dropped=sum(block_influence[i] for i in dropped),
        block_io=angular[candidate.block_start][candidate.block],
    )


def rank(candidates: list[Candidate], angular: list[list[float]], block_influence: list[float]) -> list[Scored]:
    """Lowest proxy first, one row per set of dropped layers; ties go to the lower BI sum.

    Other splits that drop the same layers (with --budget) tie exactly and are folded into the `equivalent`
    list of one row, which shows the split the proxy cannot choose by a fixed rule: the paper's rule first,
    then the largest block, then the prelude and coda closest in size.
    """

    def key(s: Scored):
        c = s.candidate
        return s.proxy, s.bi_dropped, not c.paper_rule, -c.block, abs(c.prelude - c.coda), c.shape, c.block_start

    scored = sorted((score(c, angular, block_influence) for c in candidates), key=key)
    rows: dict[tuple[int, ...], Scored] = {}
    for s in scored:
        key = tuple(s.candidate.plan.dropped(s.candidate.num_layers))
        if key in rows:
            rows[key].equivalent.append(s.candidate.layers_arg)
        else:
            rows[key] = s
    return list(rows.values())


def paper_row(rows: list[Scored]) -> int:
    """Index of the best-ranked row that follows the paper's rule (a row folds to one if any of its splits does)."""
    for i, row in enumerate(rows):
        if row.candidate.paper_rule:
            return i
    raise ValueError("no candidate follows the paper's rule")


def three_segment_knees(values: list[float]) -> tuple[int, int]:
    """Boundaries (b1, b2) that split `values` into [0, b1), [b1, b2), [b2, L) of least squared error around
    each segment's mean: where the per-layer curve d(l, 1) changes level (encode / think / decode)."""
    n = len(values)
    if n < 3:
        raise ValueError("a three-segment split needs at least 3 layers")
    prefix, prefix_sq = [0.0], [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
        prefix_sq.append(prefix_sq[-1] + v * v)

    def sse(a: int, b: int) -> float:
        total = prefix[b] - prefix[a]
        return (prefix_sq[b] - prefix_sq[a]) - total * total / (b - a)

    return min(
        ((b1, b2) for b1 in range(1, n - 1) for b2 in range(b1 + 1, n)),
        key=lambda b: sse(0, b[0]) + sse(*b) + sse(b[1], n),
    )
