"""Layer selection: hook metrics against a plain reference, proposals on hand-made distances, and the r = 1
shortcut of `--measure` against retro.convert + RetroForCausalLM."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import make_source, save_source

import retro
from retro.convert import convert
from retro.hf.layer_metrics import collect_layer_metrics, keep_only_layers, window_loss
from retro.hf.layer_proposals import (
    Candidate,
    budget_shapes,
    dropped_spans,
    enumerate_candidates,
    paper_row,
    rank,
    three_segment_knees,
)
from retro.hf.surgery import plan_from_ranges, plan_from_shape


def _ids(batch: int, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _reference_states(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """x_0..x_L from output_hidden_states, with x_L (its last entry is after the final norm) read off the norm."""
    seen = []
    handle = model.model.norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    handle.remove()
    assert not torch.allclose(hidden[-1], seen[0])  # the last entry really is normed
    states = list(hidden[:-1]) + [seen[0]]
    return [x.double().reshape(-1, x.shape[-1]) for x in states]


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


@pytest.fixture(scope="module")
def model():
    return make_source("llama")


def test_metrics_match_a_plain_reference(model):
    ids = _ids(3)
    metrics = collect_layer_metrics(model, [ids])
    x = _reference_states(model, ids)
    n_layers = len(x) - 1
    assert metrics.num_layers == n_layers == 6 and metrics.tokens == ids.numel()
    for layer in range(n_layers):
        assert metrics.block_influence[layer] == pytest.approx(1 - _cos(x[layer], x[layer + 1]).mean().item(), abs=1e-5)
    for a in range(n_layers + 1):
        assert len(metrics.angular[a]) == n_layers - a + 1 and metrics.angular[a][0] == 0.0
        for n in range(1, n_layers - a + 1):
            want = (torch.arccos(_cos(x[a], x[a + n]).clamp(-1, 1)) / math.pi).mean().item()
            assert metrics.distance(a, n) == pytest.approx(want, abs=1e-5)
    assert all(0 < d < 1 for row in metrics.angular for d in row[1:])


def test_batches_are_token_weighted(model):
    ids = _ids(4, seed=1)
    whole = collect_layer_metrics(model, [ids])
    seen = []
    parts = collect_layer_metrics(model, [ids[:1], ids[1:]], seen.append)  # 1 window, then 3
    assert seen == [16, 48] and parts.tokens == whole.tokens
    assert parts.block_influence == pytest.approx(whole.block_influence, abs=1e-6)
    for a, b in zip(parts.angular, whole.angular):
        assert a == pytest.approx(b, abs=1e-6)


def _hand_distances(n_layers: int, special: dict[tuple[int, int], float]) -> list[list[float]]:
    """d(a, n) = 0.1 n except the given (a, n) entries."""
    return [[special.get((a, n), 0.1 * n) for n in range(n_layers - a + 1)] for a in range(n_layers + 1)]


def test_ranking_finds_the_cheapest_dropped_spans():
    # 8 layers, shape (2,2,2): the block starts at 2, 3 or 4 (4 = the paper's rule, dropping 2..3)
    angular = _hand_distances(8, {(2, 1): 0.01, (5, 1): 0.02})
    rows = rank(enumerate_candidates(8, [(2, 2, 2)]), angular, [0.5] * 8)
    got = [(r.candidate.layers_arg, r.candidate.paper_rule, round(r.proxy, 6)) for r in rows]
    # start 3 drops [2] and [5]: 0.01 + 0.02; starts 4 and 2 tie at 0.2, the paper's rule first
    assert got == [("0-1,3-4,6-7", False, 0.03), ("0-1,4-5,6-7", True, 0.2), ("0-1,2-3,6-7", False, 0.2)]
    assert rows[0].bi_dropped == pytest.approx(1.0) and rows[0].block_io == pytest.approx(0.2)
    assert paper_row(rows) == 1
    assert rows[1].candidate.plan == plan_from_shape(8, 2, 2, 2)
    # BI breaks a proxy tie
    rows = rank(enumerate_candidates(8, [(2, 2, 2)]), _hand_distances(8, {}), [0, 0, 0.9, 0.9, 0.1, 0.1, 0, 0])
    assert rows[0].candidate.layers_arg == "0-1,2-3,6-7"


def test_paper_rule_rows_equal_plan_from_shape_and_layers_strings_parse():
    n_layers = 7
    for shape in [shape for budget in range(3, n_layers + 1) for shape in budget_shapes(n_layers, budget)]:
        candidates = enumerate_candidates(n_layers, [shape])
        assert len(candidates) == n_layers - sum(shape) + 1
        paper = [c for c in candidates if c.paper_rule]
        assert len(paper) == 1 and paper[0].plan == plan_from_shape(n_layers, *shape)
        for c in candidates:
            assert plan_from_ranges(n_layers, c.layers_arg) == c.plan


def test_budget_folds_splits_that_drop_the_same_layers():
    n_layers = 6
    angular = _hand_distances(n_layers, {})
    assert budget_shapes(n_layers, 4) == [(1, 1, 2), (1, 2, 1), (2, 1, 1)]
    candidates = enumerate_candidates(n_layers, budget_shapes(n_layers, 4))
    rows = rank(candidates, angular, [0.1] * n_layers)
    drops = [tuple(r.candidate.plan.dropped(n_layers)) for r in rows]
    assert len(set(drops)) == len(drops) and sum(1 + len(r.equivalent) for r in rows) == len(candidates)
    assert rows[0].proxy == pytest.approx(0.2)  # one span of 2 beats two spans of 1 (0.2 each)
    for row in rows:
        for other in row.equivalent:
            assert plan_from_ranges(n_layers, other).dropped(n_layers) == row.candidate.plan.dropped(n_layers)
    assert rows[paper_row(rows)].candidate.paper_rule


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: budget_shapes(6, 7), "larger than the source model's 6 layers"),
        (lambda: budget_shapes(6, 2), "at least 3"),
        (lambda: enumerate_candidates(6, [(3, 3, 1)]), "does not fit a 6-layer model"),
        (lambda: enumerate_candidates(6, [(0, 3, 1)]), "does not fit"),
    ],
)
def test_bad_budgets_and_shapes(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_spans_and_knees():
    assert dropped_spans([]) == [] and dropped_spans([2, 3, 5, 7, 8, 9]) == [(2, 2), (5, 1), (7, 3)]
    assert three_segment_knees([0.9, 0.8, 0.9, 0.2, 0.25, 0.2, 0.2, 0.6, 0.65]) == (3, 7)
    assert three_segment_knees([1.0, 2.0, 3.0]) == (1, 2)


@pytest.mark.parametrize("kind", ["llama", "qwen3", "olmo2"])
def test_r1_shortcut_equals_convert_and_retro_model(tmp_path, kind):
    """At r = 1 with the identity adapter a converted model is the source minus its dropped layers."""
    from transformers import AutoModelForCausalLM

    save_source(tmp_path / "src", kind, num_hidden_layers=7)
    candidate = Candidate(7, 1, 2, 2, block_start=2)  # keeps 0, 2-3, 5-6: two dropped spans
    assert candidate.plan.dropped(7) == [1, 4]
    convert(tmp_path / "src", tmp_path / "out", layers=candidate.layers_arg)
    ours = retro.RetroForCausalLM.from_pretrained(tmp_path / "out").eval()
    source = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32).eval()
    ids = _ids(2, 17, seed=2)
    batches = [(ids[:, :-1], ids[:, 1:])]
    full = window_loss(source, batches)
    with keep_only_layers(source, candidate.plan.kept):
        assert len(source.model.layers) == 5
        shortcut = window_loss(source, batches)
    with torch.no_grad():
        want = ours(ids[:, :-1], shift_labels=ids[:, 1:], num_recurrences=1, generator=torch.Generator()).loss
    assert abs(shortcut - want.item()) < 1e-5
    assert abs(shortcut - full) > 1e-3  # dropping layers did change the function
    assert len(source.model.layers) == 7 and window_loss(source, batches) == full  # restored
