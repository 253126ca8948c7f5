"""recurrence.draws_per_step against the real data order, and the recurrence/distillation options under 2-rank FSDP2.

Schedule level (no processes): every rank's MixtureBatchSampler gives the windows of each micro-batch and the
schedule its r, so a run is the list of (window, r) pairs in global data order. With draws_per_step = G that list
is the same on 1, 2 and 4 ranks at one global batch, and a resume (same or another world size) continues it.
One real check trains the tiny model on 2 and on 4 gloo ranks; the others resume 2-rank runs loss for loss.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from train_helpers import base_overrides, make_assets, read_metrics, run_train

from retro.data.mixture import MixtureBatchSampler, reshard_states
from retro.training import checkpoint
from retro.training.recurrence import RecurrenceSchedule

SEED, WINDOWS, GLOBAL, MICRO = 11, 500, 16, 2  # 500 windows: one epoch covers every step below on 1, 2 and 4 ranks


def samplers(world: int, states: list[dict] | None = None) -> list[MixtureBatchSampler]:
    out = [MixtureBatchSampler([WINDOWS], None, MICRO, rank, world, SEED) for rank in range(world)]
    for sampler, state in zip(out, states or []):
        sampler.load_state_dict(state)
    return out


def run(ranks: list[MixtureBatchSampler], schedule: RecurrenceSchedule, steps: range) -> list[tuple[int, int, int]]:
    """(step, global data position, r) of every window the ranks read, in data order.

    Each rank asks its own copy of the schedule (as each process does); at every micro index all ranks must
    hold the same r, or FSDP2's collectives would fall out of step."""
    world = len(ranks)
    accumulation = GLOBAL // (MICRO * world)
    order = np.argsort(ranks[0]._perm(0, 0)(np.arange(WINDOWS)))  # window id -> position in the epoch's order
    pairs = []
    for step in steps:
        per_rank = [RecurrenceSchedule(**vars(schedule)).draws(step, accumulation) for _ in ranks]
        assert all(draws == per_rank[0] for draws in per_rank)
        for micro in range(accumulation):
            for sampler, draws in zip(ranks, per_rank):
                pairs += [(step, int(order[w]), draws[micro].r) for w in sampler.next_batch()]
    return sorted(pairs)


def test_window_r_pairs_are_the_same_on_1_2_and_4_ranks_and_groups_are_data_order_slices():
    schedule = RecurrenceSchedule(max_mean=16, curriculum="none", seed=SEED, draws_per_step=2)
    by_world = {world: run(samplers(world), schedule, range(12)) for world in (1, 2, 4)}
    assert by_world[1] == by_world[2] == by_world[4]
    pairs = by_world[2]
    assert [p[1] for p in pairs] == list(range(12 * GLOBAL))  # each step reads the next 16 positions once
    for step in range(12):  # group g = positions [8g, 8g + 8) of the step, one r each, the draw keyed (step, g)
        for group in range(2):
            rs = {r for s, pos, r in pairs if s == step and (pos - step * GLOBAL) // 8 == group}
            assert rs == {schedule.draw(step, group).r}
    assert len({r for _, _, r in pairs}) > 5
    # the control: one draw per micro-batch column pairs other r with the same windows on 2 and on 4 ranks
    per_micro = RecurrenceSchedule(max_mean=16, curriculum="none", seed=SEED)
    assert run(samplers(2), per_micro, range(12)) != run(samplers(4), per_micro, range(12))


@pytest.mark.parametrize("resume_world", [2, 4])
def test_a_resume_continues_the_same_pairs(resume_world):
    """Stop a 2-rank run after step 5, restore the sampler states (resharded to 4 ranks for the second case)
    and a fresh schedule: steps 5-11 pair the same windows with the same r as the uninterrupted run."""
    schedule = RecurrenceSchedule(max_mean=16, curriculum="linear", ramp_steps=8, seed=SEED, draws_per_step=2)
    whole = run(samplers(2), schedule, range(12))
    first = samplers(2)
    head = run(first, schedule, range(5))
    states = [s.state_dict() for s in first]
    if resume_world != 2:
        plan = reshard_states(states, resume_world)
        assert plan.reread == [0]  # one source, a batch that both world sizes divide: nothing re-read
        states = plan.states
    fresh = RecurrenceSchedule(**vars(schedule))
    tail = run(samplers(resume_world, states), fresh, range(5, 12))
    assert head + tail == whole


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    model, data = make_assets(root)
    return model, data, root / "src"  # src: the unmodified source model, a distillation teacher


def groups(record: dict, draws: int) -> list[int]:
    """The r of each of the step's `draws` groups, after checking that each group's micro-batches share it."""
    r = record["r_micro"]
    size = len(r) // draws
    assert r == [r[g * size] for g in range(draws) for _ in range(size)], r
    return r[::size]


def test_two_and_four_ranks_train_the_same_run(assets, tmp_path):
    """Global batch 8, micro-batch 1: 4 micro-batches per rank on 2 ranks, 2 on 4 ranks. With draws_per_step = 2
    both runs pair the same r with the same windows, so (zero initial state) the losses agree."""
    model, data, _ = assets
    extra = {
        "train.steps": 3,
        "optim.decay_steps": 1,  # tiny-cpu's 2 warmup + 2 decay steps need 4
        "train.micro_batch": 1,
        "recurrence.draws_per_step": 2,
        "recurrence.curriculum": "none",
        "model.state_init": "zeros",  # the s0 noise is keyed by (micro-batch, rank)
        "train.val_recurrences": "[1]",
    }
    run_train(base_overrides(model, data, tmp_path / "two", **extra), nproc=2)
    run_train(base_overrides(model, data, tmp_path / "four", **extra), nproc=4, timeout=400)
    two, four = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "four")
    assert [len(m["r_micro"]) for m in two] == [4] * 3 and [len(m["r_micro"]) for m in four] == [2] * 3
    assert [groups(m, 2) for m in two] == [groups(m, 2) for m in four]
    assert len({r for m in two for r in m["r_micro"]}) > 1  # the draws really varied
    for a, b in zip(two, four):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"], (a, b)


OPTIONS = {
    # two draws per step (4 micro-batches per rank), the curriculum from m = 2, distillation with kd_weight
    "draws-start-kd": {
        "recurrence.draws_per_step": 2,
        "recurrence.start_mean": 2,
        "recurrence.max_mean": 4,
        "distill.kd_weight": 0.3,
        "distill.temperature": 2.0,
    },
    # r = m exactly from m = 2 up the curriculum (the paper's fix_num_steps with mean_recurrence_schedule.start=2)
    "fixed-start": {"recurrence.fixed": "true", "recurrence.start_mean": 2, "recurrence.max_mean": 4},
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_the_options_resume_loss_for_loss_on_two_ranks(assets, tmp_path, name):
    model, data, source = assets
    extra = {
        "train.steps": 4,
        "train.micro_batch": 1,
        "checkpoint.every": 2,
        "checkpoint.keep_last": 3,
        "train.val_recurrences": "[1]",
        **OPTIONS[name],
    }
    if "distill.kd_weight" in extra:
        extra["distill.teacher"] = source
    run_train(base_overrides(model, data, tmp_path / "full", **extra), nproc=2)
    full = read_metrics(tmp_path / "full")
    resumed = tmp_path / "resumed"  # as if killed after the step-2 checkpoint
    shutil.copytree(tmp_path / "full", resumed)
    shutil.rmtree(checkpoint.checkpoint_dir(resumed, 4))
    result = run_train(base_overrides(model, data, resumed, **extra), nproc=2)
    assert "resuming from" in result.stdout
    again = read_metrics(resumed)
    assert [m["step"] for m in again] == [1, 2, 3, 4]
    assert [m["r_micro"] for m in again] == [m["r_micro"] for m in full]
    for a, b in zip(again, full):
        for key in ("loss", "ce", "kd") if "ce" in b else ("loss",):
            assert abs(a[key] - b[key]) <= 1e-6 * abs(b[key]), (key, a, b)
    assert all(m["mean_recurrence"] >= 2 for m in full) and full[0]["mean_recurrence"] == 2  # start_mean
    if name == "fixed-start":
        assert all(m["r_micro"] == [m["mean_recurrence"]] * 4 for m in full)
        assert [m["mean_recurrence"] for m in full][-1] == 4
    else:
        assert all(len(groups(m, 2)) == 2 for m in full) and len({r for m in full for r in m["r_micro"]}) > 1
        for m in full:  # loss = (1 - kd_weight) CE + kd_weight T^2 KD
            assert abs(m["loss"] - (0.7 * m["ce"] + 0.3 * 2.0**2 * m["kd"])) <= 1e-5 * m["loss"], m
