"""Resuming on another number of ranks: sampler reshard (no window skipped, bounded re-reads), end to end."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pytest
from train_helpers import TINY_CONFIG, base_overrides, make_assets, read_metrics, run_train

from retro.data.mixture import MixtureBatchSampler, reshard_states
from retro.training import checkpoint
from retro.training.job_config import ConfigError, load_config
from retro.training.preflight import check_data

SEED = 5


def read_phase(samplers: list[MixtureBatchSampler], batches: int) -> list[tuple[int, int, int]]:
    """Run every rank for `batches` batches of one window; return each read as (source, epoch, position).

    The position comes from the window id through the inverse of that epoch's permutation, not from
    the sampler's pos arithmetic, so a wrong resharded position shows up as a gap or a duplicate.
    """
    reads = []
    for sampler in samplers:
        assert sampler.batch_size == 1
        for _ in range(batches):
            before = list(sampler.counts)
            epochs = list(sampler.epoch)
            (gid,) = sampler.next_batch()
            (s,) = [i for i in range(len(before)) if sampler.counts[i] != before[i]]
            n = sampler.num_windows[s]
            inverse = np.argsort(sampler._perm(s, epochs[s])(np.arange(n)))
            reads.append((s, epochs[s], int(inverse[gid - sampler.offsets[s]])))
    return reads


def make(num_windows, weights, world: int, states: list[dict] | None = None) -> list[MixtureBatchSampler]:
    samplers = [MixtureBatchSampler(num_windows, weights, 1, r, world, SEED) for r in range(world)]
    for sampler, state in zip(samplers, states or []):
        sampler.load_state_dict(state)
    return samplers


def frontier(samplers: list[MixtureBatchSampler], s: int) -> tuple[int, int]:
    """(epoch, position) below which every position of source s has had its turn on the current ranks."""
    w, n = samplers[0].world_size, samplers[0].num_windows[s]
    steps = min(x.epoch[s] * (n // w) + x.pos[s] for x in samplers)
    e, p = divmod(steps, n // w)
    return e, p * w


def ahead(samplers: list[MixtureBatchSampler], s: int) -> int:
    """Sum over ranks of how many windows of source s each has read past the slowest rank."""
    per_rank = samplers[0].num_windows[s] // samplers[0].world_size
    steps = [x.epoch[s] * per_rank + x.pos[s] for x in samplers]
    return sum(steps) - len(steps) * min(steps)


@pytest.mark.parametrize(
    "num_windows,weights",
    [((60,), None), ((61,), None), ((47, 29), (0.6, 0.4))],
    ids=["one-source-divisible", "one-source-remainder", "two-source-mixture"],
)
def test_reshard_skips_nothing_and_counts_rereads(num_windows, weights):
    worlds = [2, 3, 1, 2, 4]  # 2 -> 3 -> 1 -> 2 -> 4: down and back up
    samplers = make(num_windows, weights, worlds[0])
    reads = read_phase(samplers, 23)
    reported = [0] * len(num_windows)
    for world in worlds[1:]:
        plan = reshard_states([x.state_dict() for x in samplers], world)
        for s in range(len(num_windows)):
            bound = (world - 1) + ahead(samplers, s)
            assert 0 <= plan.reread[s] <= bound, (world, s, plan.reread[s], bound)
            if len(num_windows) == 1:
                assert plan.reread[s] <= world - 1  # one source: all ranks level, only the boundary re-read
            reported[s] += plan.reread[s]
        assert all(state["batches"] == samplers[0].batches for state in plan.states)
        assert [
            MixtureBatchSampler.reshard_state([x.state_dict() for x in samplers], world, r) for r in range(world)
        ] == plan.states
        samplers = make(num_windows, weights, world, plan.states)  # load_state_dict checks rank/world
        reads += read_phase(samplers, 60 // world + 7)
    seen = Counter(reads)
    usable = {s: min(n // w * w for w in worlds) for s, n in enumerate(num_windows)}
    for s in range(len(num_windows)):
        end_epoch, end_pos = frontier(samplers, s)
        assert end_epoch >= 2, "the phases should cross several epochs"
        for e in range(end_epoch + 1):
            for q in range(usable[s] if e < end_epoch else end_pos):
                assert (s, e, q) in seen, f"source {s}, epoch {e}: position {q} was skipped"
        duplicates = sum(c - 1 for (src, _, _), c in seen.items() if src == s and c > 1)
        assert duplicates == reported[s], (s, duplicates, reported[s])
        assert max(seen.values()) <= 2


def test_reshard_rejects_states_of_different_runs():
    a = make((40,), None, 2)
    for x in a:
        x.next_batch()
    states = [x.state_dict() for x in a]
    other = MixtureBatchSampler((40,), None, 1, 1, 2, SEED + 1).state_dict()
    with pytest.raises(ValueError, match="rank 1: data loader seed"):
        reshard_states([states[0], {**other, "batches": states[0]["batches"]}], 3)
    a[0].next_batch()
    with pytest.raises(ValueError, match="rank 1: 1 batches read, rank 0 read 2"):
        reshard_states([a[0].state_dict(), states[1]], 3)
    with pytest.raises(ValueError, match="expected rank 0 of 2"):
        reshard_states([states[1], states[0]], 1)


def test_resume_needs_a_world_size_that_divides_the_global_batch():
    cfg = load_config(TINY_CONFIG, ["data.train=['unused']"])
    with pytest.raises(ConfigError, match="global_batch = 8 is not divisible by train.micro_batch x ranks = 2 x 3"):
        check_data(cfg, None, 3)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


def test_two_rank_checkpoint_resumes_on_one_rank(assets, tmp_path):
    """2 ranks x 2 micro x 2 accumulation = 8 = 1 rank x 2 micro x 4: with one source the resumed
    rank reads exactly the 8 windows the two ranks would have read at each step, and state_init=zeros
    removes the per-rank initial-state noise, so the losses must agree like the 1-vs-2-rank test's."""
    model, data = assets
    extra = {"train.steps": 4, "checkpoint.every": 2, "checkpoint.keep_last": 3, "model.state_init": "zeros"}
    run_train(base_overrides(model, data, tmp_path / "two", **extra), nproc=2)
    reference = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "two")}
    out = tmp_path / "one"
    saved = checkpoint.checkpoint_dir(tmp_path / "two", 2)
    shutil.copytree(saved, checkpoint.checkpoint_dir(out, 2))
    result = run_train(base_overrides(model, data, out, **extra) + ["--resume", "auto"])
    assert "warning: resuming 2-rank checkpoint" in result.stderr and "on 1 ranks" in result.stderr, result.stderr[
        -2000:
    ]
    # 2 steps x 2 accumulation x 2 micro x 2 ranks = 16 windows read; one source keeps ranks level
    assert "epoch 0 continues at global position 16 (16 read before), 0 windows re-read" in result.stderr
    assert "accumulation 4" in result.stdout
    records = read_metrics(out)
    assert [m["step"] for m in records] == [3, 4]
    for m in records:
        assert np.isfinite(m["loss"])
        assert abs(m["loss"] - reference[m["step"]]) <= 1e-5 * reference[m["step"]], (m, reference)


def test_one_rank_checkpoint_resumes_on_two_ranks(assets, tmp_path):
    """The other direction: the optimizer state is resharded up by DCP, the data position split."""
    model, data = assets
    extra = {"train.steps": 4, "checkpoint.every": 2, "checkpoint.keep_last": 3, "model.state_init": "zeros"}
    run_train(base_overrides(model, data, tmp_path / "one", **extra))
    reference = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "one")}
    out = tmp_path / "two"
    shutil.copytree(checkpoint.checkpoint_dir(tmp_path / "one", 2), checkpoint.checkpoint_dir(out, 2))
    # A changed setting is refused on 2 ranks as on one: exit 2, one line (rank 0's, not one per rank), no
    # traceback of ours (torchrun adds its report of a failed child), no rank left hanging, nothing written.
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    refused = run_train(base_overrides(model, data, out, **extra, **{"data.seq_len": 8}), nproc=2, check=False)
    errors = [line for line in refused.stderr.splitlines() if "retro.train: error:" in line]
    assert refused.returncode != 0 and "retro/" not in refused.stderr, refused.stderr[-3000:]
    assert len(errors) == 1 and "resume: data.seq_len changed from 16 (checkpoint step_00000002) to 8" in errors[0]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    result = run_train(base_overrides(model, data, out, **extra) + ["--resume", "auto"], nproc=2)
    assert "warning: resuming 1-rank checkpoint" in result.stderr and "on 2 ranks" in result.stderr
    records = read_metrics(out)
    assert [m["step"] for m in records] == [3, 4]
    for m in records:
        assert abs(m["loss"] - reference[m["step"]]) <= 1e-5 * reference[m["step"]], (m, reference)
