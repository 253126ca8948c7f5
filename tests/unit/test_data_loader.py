"""retro.data.loader / mixture / permutation: packing, rank coverage, exact resume, mixtures."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from data_helpers import prepare_dir, random_docs, word_tokenizer, write_jsonl  # noqa: E402

from retro.data.loader import build_train_loader, build_val_batches  # noqa: E402
from retro.data.mixture import MixtureBatchSampler  # noqa: E402
from retro.data.permutation import FeistelPermutation  # noqa: E402
from retro.data.shards import TokenShards  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
T = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Two sources with disjoint word ranges (so a row's source is readable from its tokens)."""
    d = tmp_path_factory.mktemp("loader")
    tok = word_tokenizer(d / "tok", 100)
    out = {"tok": tok}
    for name, lo, hi, seed in (("low", 0, 50, 1), ("high", 50, 100, 2)):
        docs = [t for t in random_docs(300, hi, seed=seed, low=lo)]
        out[name] = prepare_dir(
            d / name, [write_jsonl(d / f"{name}.jsonl", docs)], tok, "--val-fraction", "0.1", "--shard-tokens", "700"
        )
    return out


def source_of(row: torch.Tensor) -> int:
    """0 for the 'low' words (ids 2..51), 1 for 'high' (ids 52..101); EOS (1) belongs to both."""
    words = row[row > 1]
    assert (words < 52).all() or (words >= 52).all(), "a window mixes two sources"
    return int(words[0] >= 52)


def windows_of(path: Path) -> dict[tuple[int, ...], int]:
    """{window's T input ids: its start offset} for every stride-T window of a source."""
    shards = TokenShards(path)
    stream = shards.read(0, shards.num_tokens).astype(np.int64)
    return {tuple(stream[j * T : j * T + T].tolist()): j * T for j in range(shards.num_windows(T))}


def test_feistel_is_a_permutation():
    for n in (1, 2, 3, 17, 1000, 4099):
        for key in ((0, 0), (0, 1), (7, 3)):
            assert sorted(FeistelPermutation(n, key)(np.arange(n)).tolist()) == list(range(n))
    a, b = FeistelPermutation(1000, (0, 0))(np.arange(1000)), FeistelPermutation(1000, (0, 1))(np.arange(1000))
    assert (a != b).mean() > 0.9 and (a != np.arange(1000)).mean() > 0.9


def test_windows_labels_and_doc_positions(data):
    shards = TokenShards(data["low"])
    loader = build_train_loader([data["low"]], None, T, 4, 0, 1, seed=0, doc_positions=True)
    it = iter(loader)
    eos = shards.eos_id
    stream = torch.from_numpy(shards.read(0, shards.num_tokens).astype(np.int64))
    starts = windows_of(data["low"])
    for _ in range(3):
        batch = next(it)
        x, y, p = batch["input_ids"], batch["labels"], batch["position_ids"]
        assert x.shape == y.shape == p.shape == (4, T) and x.dtype == torch.long
        for r in range(4):
            s = starts[tuple(x[r].tolist())]  # KeyError: the row is not a stride-T window of the stream
            assert torch.equal(y[r], stream[s + 1 : s + T + 1])
            # reference positions: count up, restart after every EOS
            ref, pos = [], 0
            for t in range(T):
                ref.append(pos)
                pos = 0 if x[r, t] == eos else pos + 1
            assert p[r].tolist() == ref


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_cover_an_epoch_exactly_once(data, world):
    n = TokenShards(data["low"]).num_windows(T)
    per_rank, b = n // world, 5
    seen = []
    for rank in range(world):
        loader = build_train_loader([data["low"]], None, T, b, rank, world, seed=11)
        ids = []
        for batch in loader.batch_sampler:  # the ids; contents are checked in the resume test
            ids += batch
            if len(ids) >= 2 * per_rank:
                break
        seen.append(ids)
        assert len(set(ids[:per_rank])) == per_rank  # no repeat within a rank's epoch
        assert ids[per_rank : 2 * per_rank] != ids[:per_rank]  # epoch 1 has a new order
    epoch0 = [i for ids in seen for i in ids[:per_rank]]
    assert len(epoch0) == len(set(epoch0)) == world * per_rank  # disjoint across ranks
    assert set(epoch0) <= set(range(n)) and n - len(epoch0) == n % world  # only the remainder unread
    epoch1 = {i for ids in seen for i in ids[per_rank : 2 * per_rank]}
    assert len(epoch1) == world * per_rank
    s = MixtureBatchSampler([n], None, b, 0, world, seed=11, names=["low"])
    for _ in range((per_rank + b - 1) // b):
        s.next_batch()
    assert s.epoch == [1] and s.unused_windows() == {"low": n % world}


RESUME_SCRIPT = textwrap.dedent("""
    import sys, torch
    from retro.data.loader import build_train_loader
    sources, weights, workers, state_path, out_path, k = sys.argv[1:3] + sys.argv[3:]
    results = []
    for nw in workers.split(","):
        loader = build_train_loader(sources.split(","), [float(w) for w in weights.split(",")], 16, 4, 1, 2,
                                    seed=3, num_workers=int(nw), doc_positions=True)
        loader.load_state_dict(torch.load(state_path))
        it = iter(loader)
        results.append([next(it) for _ in range(int(k))])
    torch.save(results, out_path)
""")


def run_resume(tmp_path: Path, sources: list[Path], weights: list[float], workers: str, state: dict, k: int):
    torch.save(state, tmp_path / "state.pt")
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    r = subprocess.run(
        [
            sys.executable,
            str(script),
            ",".join(map(str, sources)),
            ",".join(map(str, weights)),
            str(workers),
            str(tmp_path / "state.pt"),
            str(tmp_path / "out.pt"),
            str(k),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


def assert_batches_equal(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[key], y[key]) for key in x)


def test_resume_in_fresh_process_with_workers(data, tmp_path):
    """k batches, save, continue in a new process (2 workers, and 1 worker): same next batches.

    The run crosses epoch boundaries of both sources (about 90 windows per rank per epoch).
    """
    sources, weights = [data["low"], data["high"]], [0.5, 0.5]
    loader = build_train_loader(sources, weights, T, 4, 1, 2, seed=3, num_workers=2, doc_positions=True)
    it = iter(loader)
    first = [next(it) for _ in range(40)]
    state = loader.state_dict()
    reference = [next(it) for _ in range(12)]
    with_two, with_one = run_resume(tmp_path, sources, weights, "2,1", state, 12)
    assert_batches_equal(with_two, reference)
    assert_batches_equal(with_one, reference)  # a different number of workers resumes too
    known = {**windows_of(data["low"]), **windows_of(data["high"])}
    assert all(tuple(r.tolist()) in known for b in first + reference for r in b["input_ids"])


def test_second_iter_continues_without_skipping(data):
    kw = dict(sources=[data["low"]], weights=None, seq_len=T, batch_size=2, rank=0, world_size=1, seed=5)
    ref = build_train_loader(**kw)
    ref_it = iter(ref)
    want = [next(ref_it) for _ in range(5)]
    loader = build_train_loader(**kw, num_workers=2)
    got = [next(iter(loader)) for _ in range(1)]
    it = iter(loader)  # a new iterator while the first had batches in flight
    got += [next(it) for _ in range(4)]
    assert_batches_equal(got, want)


def test_mixture_proportions_within_2_percent_and_resumable(data):
    weights = [0.25, 0.75]
    loader = build_train_loader([data["low"], data["high"]], weights, T, 8, 0, 1, seed=9, num_workers=2)
    it = iter(loader)
    counts = np.zeros(2)
    for _ in range(200):
        for row in next(it)["input_ids"]:
            counts[source_of(row)] += 1
    realised = loader.realised_proportions()
    assert list(realised.values()) == pytest.approx(list(counts / counts.sum()), abs=1e-12)  # reports what it yielded
    assert np.abs(counts / counts.sum() - weights).max() < 0.02
    state = loader.state_dict()
    want = [next(it) for _ in range(5)]
    again = build_train_loader([data["low"], data["high"]], weights, T, 8, 0, 1, seed=9, num_workers=0)
    again.load_state_dict(state)
    it2 = iter(again)
    assert_batches_equal([next(it2) for _ in range(5)], want)
    # a larger sample at the sampler level: the paper's 1/3 mix
    s = MixtureBatchSampler([1000, 1000, 1000], [1, 1, 1], 32, 0, 1, seed=0)
    for _ in range(500):
        s.next_batch()
    assert max(abs(p - 1 / 3) for p in s.realised_proportions().values()) < 0.02


def test_state_from_another_configuration_is_rejected(data):
    a = build_train_loader([data["low"]], None, T, 4, 0, 2, seed=1)
    next(iter(a))
    b = build_train_loader([data["low"]], None, T, 4, 0, 4, seed=1)
    with pytest.raises(ValueError, match=r"world_size=2 vs 4"):
        b.load_state_dict(a.state_dict())
        next(iter(b))


def test_val_batches_disjoint_and_deterministic(data):
    val = TokenShards(data["low"], split="val")
    n = val.num_windows(T)
    world, b = 2, 3
    rows = {}
    for rank in range(world):
        batches = build_val_batches(data["low"], T, b, rank, world, max_batches=None)
        assert len(batches) == (n // world) // b
        first = [x["input_ids"] for x in batches]
        assert all(torch.equal(u, v["input_ids"]) for u, v in zip(first, batches))  # re-iterable, same data
        rows[rank] = [tuple(r.tolist()) for x in first for r in x]
    assert not set(rows[0]) & set(rows[1])
    stream = val.read(0, val.num_tokens).astype(np.int64)
    assert list(rows[0][0]) == stream[:T].tolist() and list(rows[1][0]) == stream[T : 2 * T].tolist()
    assert len(build_val_batches(data["low"], T, b, 0, world, max_batches=1)) == 1
    with pytest.raises(ValueError, match=r"low: split 'val' has \d+ windows .* too few"):
        build_val_batches(data["low"], T, 1000, 0, world, max_batches=None)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_same_size_corruption_named_while_reading(data, tmp_path, num_workers):
    """An id beyond the vocabulary (a flipped high bit: the file keeps its size, so the cheap check passes)
    stops the loader with the shard file and offset, not an IndexError in the embedding mid-run."""
    import shutil

    from retro.data.manifest import ShardFormatError

    d = tmp_path / "low"
    shutil.copytree(data["low"], d)
    shards = TokenShards(d)
    bad_shard, offset = shards.shards[1], 37  # any token of the second shard
    raw = np.fromfile(d / bad_shard.file, dtype=shards.dtype)
    raw[offset] = shards.vocab_size + 1000
    raw.tofile(d / bad_shard.file)
    before = (d / bad_shard.file).read_bytes()
    pattern = rf"{bad_shard.file}: token id {shards.vocab_size + 1000} at token offset {offset} .*vocabulary size"
    loader = build_train_loader([d], None, T, 4, 0, 1, seed=0, num_workers=num_workers)
    epoch = shards.num_windows(T) // 4 + 1
    with pytest.raises(ShardFormatError, match=pattern):
        for _ in itertools.islice(loader, epoch):  # some batch of the first epoch covers the bad token
            pass
    with pytest.raises(ShardFormatError, match=pattern):
        for _ in build_val_batches(d, T, 2, 0, 1, split="train"):
            pass
    assert (d / bad_shard.file).read_bytes() == before  # read only


def _set_vital_warnings(caught) -> list:
    return [w for w in caught if issubclass(w.category, UserWarning) and "'set_vital' is deprecated" in str(w.message)]


def test_building_the_loader_emits_no_set_vital_warning(data):
    """torchdata's deprecated torch.set_vital call is silenced around our loader only, not process-wide."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = build_train_loader([data["low"]], None, T, 4, 0, 1, seed=0)
        next(iter(loader))
        assert _set_vital_warnings(caught) == []
        StatefulDataLoader(list(range(3)))  # a bare torchdata loader, built after ours: still warns if torch does
        bare = _set_vital_warnings(caught)
    with warnings.catch_warnings(record=True) as direct:
        warnings.simplefilter("always")
        getattr(torch, "set_vital", lambda *a: None)("Dataloader", "enabled", "True")
    assert len(bare) == len(_set_vital_warnings(direct))  # the filter did not outlive the constructor
