"""Training and validation batches from prepared token shards.

`build_train_loader` returns a torchdata StatefulDataLoader over a map-style dataset of packed
windows (seq_len + 1 tokens, stride seq_len, across document boundaries as in the paper). The
order lives entirely in `MixtureBatchSampler`, which runs in the main process; workers only copy
tokens. Hence the loader's state is the sampler's few integers, and it resumes exactly, with any
number of workers (also a different number than the run that saved it).

Loss masks: a source prepared with a loss mask (`retro.data.prepare --chat`) sets the label of
position t to IGNORE_INDEX (-100) where token t + 1, the token it predicts, is not a loss token, so
every loss (the trainer's, validation's, distillation's) skips it without knowing about masks. The
mask is read by window id like the ids, so it is packed, resumed and mixed exactly as they are;
sources without a mask count every label.

Every batch's ids are checked against the vocabulary as it is read (one max() over the batch):
an id beyond it, from a shard corrupted without changing its size, raises ShardFormatError naming
the shard file and offset instead of an IndexError in the embedding mid-run. Checksums are not
checked while reading; for long runs open the data with `verify="full"` (`retro.data.shards.Verify`),
which checks every shard's SHA-256 and id range once before the first step.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from retro.data.manifest import ShardFormatError
from retro.data.mixture import MixtureBatchSampler
from retro.data.shards import TokenShards, Verify
from retro.model.loss import IGNORE_INDEX

log = logging.getLogger("retro.data.loader")

Batch = dict[str, torch.Tensor]


@dataclass
class DataSettings:
    """The run's `[data]` section."""

    train: list[str] = field(default_factory=list)  # prepared shard directories (`retro.data.prepare`)
    weights: list[float] = field(default_factory=list)  # mixture weights; empty = equal
    val: str = ""  # shard directory whose "val" split is used; empty = the first train source
    seq_len: int = 1024
    num_workers: int = 2
    allow_tokenizer_mismatch: bool = False  # train even if the data's tokenizer hash differs from the model's

    def validate(self) -> None:
        if self.seq_len < 1:
            raise ValueError(f"data.seq_len must be >= 1, got {self.seq_len}")

    def train_loader(self, micro_batch: int, rank: int, world_size: int, seed: int) -> ShardLoader:
        """This rank's endless, resumable loader of the `train` sources (see build_train_loader)."""
        return build_train_loader(
            self.train, self.weights or None, self.seq_len, micro_batch, rank, world_size, seed, self.num_workers
        )

    def val_batches(self, micro_batch: int, rank: int, world_size: int, total_batches: int) -> list[Batch]:
        """This rank's share of `total_batches` validation micro-batches from `val` (or the first train source)."""
        per_rank = max(1, total_batches // world_size)
        return list(build_val_batches(self.val or self.train[0], self.seq_len, micro_batch, rank, world_size, per_rank))


def _positions(starts: np.ndarray, window_start: int, seq_len: int) -> np.ndarray:
    """Position ids over a window of seq_len inputs, restarting at 0 at each document start."""
    reset = np.zeros(seq_len, dtype=np.int64)
    rel = starts - window_start
    rel = rel[(rel > 0) & (rel < seq_len)]
    idx = np.arange(seq_len, dtype=np.int64)
    reset[rel] = rel
    return idx - np.maximum.accumulate(reset)


class PackedWindows(torch.utils.data.Dataset):
    """Window j of source s = tokens [j*T, j*T + T + 1) of its split; global id = offsets[s] + j."""

    def __init__(self, sources: Sequence[TokenShards], seq_len: int, doc_positions: bool = False) -> None:
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.sources = list(sources)
        self.seq_len = seq_len
        self.doc_positions = doc_positions
        self.num_windows = [s.num_windows(seq_len) for s in self.sources]
        self.offsets = np.concatenate([[0], np.cumsum(self.num_windows)]).astype(np.int64)
        self.vocab_size = min(s.vocab_size for s in self.sources)  # every id read must stay below it
        self.masked = any(s.masked for s in self.sources)
        self.sampler: MixtureBatchSampler | None = None  # set by build_train_loader, for reporting

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitems__(self, ids: Sequence[int]) -> Batch:
        """A whole batch at once: one preallocated array, one memmap slice per row."""
        t = self.seq_len
        rows = np.empty((len(ids), t + 1), dtype=np.int64)
        pos = np.empty((len(ids), t), dtype=np.int64) if self.doc_positions else None
        masks = np.empty((len(ids), t), dtype=np.uint8) if self.masked else None
        for r, gid in enumerate(ids):
            s = int(np.searchsorted(self.offsets, gid, side="right")) - 1
            start = (int(gid) - int(self.offsets[s])) * t
            self.sources[s].read(start, t + 1, out=rows[r])
            if masks is not None:  # the mask of the label side: tokens start + 1 .. start + t
                self.sources[s].read_mask(start + 1, t, out=masks[r])
            if pos is not None:
                pos[r] = _positions(self.sources[s].doc_starts(start + 1, start + t), start, t)
        if rows.size and int(rows.max()) >= self.vocab_size:  # one vectorised pass per batch
            raise self._out_of_vocabulary(rows, ids)
        x = torch.from_numpy(rows)
        labels = x[:, 1:]
        if masks is not None:
            labels = labels.masked_fill(torch.from_numpy(masks) == 0, IGNORE_INDEX)
        batch = {"input_ids": x[:, :-1], "labels": labels}
        if pos is not None:
            batch["position_ids"] = torch.from_numpy(pos)
        return batch

    def _out_of_vocabulary(self, rows: np.ndarray, ids: Sequence[int]) -> ShardFormatError:
        """The error naming the shard file and offset of the first id beyond the vocabulary in `rows`."""
        r, j = (int(v) for v in np.argwhere(rows >= self.vocab_size)[0])
        s = int(np.searchsorted(self.offsets, ids[r], side="right")) - 1
        start = (int(ids[r]) - int(self.offsets[s])) * self.seq_len
        return self.sources[s].out_of_vocabulary(start + j, int(rows[r, j]), self.vocab_size)

    def __getitem__(self, gid: int) -> Batch:
        return {k: v[0] for k, v in self.__getitems__([gid]).items()}

    def realised_proportions(self) -> dict[str, float]:
        """Share of each source among samples the sampler has produced (main process only)."""
        if self.sampler is None:
            raise RuntimeError("no sampler attached; build the loader with build_train_loader")
        return self.sampler.realised_proportions()


def _keep_batch(batch: Batch) -> Batch:
    """collate_fn: __getitems__ already returns a collated batch."""
    return batch


def sampler_state_of(state: dict[str, Any]) -> dict[str, Any]:
    """The sampler's state inside a StatefulDataLoader state dict (0 or N workers)."""
    main = state["_snapshot"]["_main_snapshot"] if "_snapshot" in state else state
    if "_snapshot" in state and state.get("_steps_since_snapshot", 0) != 0:
        raise ValueError("loader state was not snapshotted at the last step; use snapshot_every_n_steps=1")
    return main["_index_sampler_state"]


# torchdata's StatefulDataLoader.__init__ calls torch.set_vital, which recent torch deprecates with a
# UserWarning (a no-op otherwise); harmless, but it lands mid-way through the trainer's and demo's output.
_SET_VITAL_DEPRECATED = r"'set_vital' is deprecated"


class ShardLoader(StatefulDataLoader):
    """StatefulDataLoader whose state is its sampler's: resumes across a change of num_workers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with warnings.catch_warnings():  # only around torchdata's constructor, not process-wide
            warnings.filterwarnings("ignore", message=_SET_VITAL_DEPRECATED, category=UserWarning)
            super().__init__(*args, **kwargs)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_workers = state_dict.get("_snapshot", {}).get("_main_snapshot", {}).get("_num_workers", 0)
        if not state_dict or saved_workers == self.num_workers:
            super().load_state_dict(state_dict)
            return
        self.batch_sampler.load_state_dict(sampler_state_of(state_dict))
        super().load_state_dict({})  # drop any live iterator; the next iter() starts at the sampler

    def load_sampler_state(self, state: dict[str, Any]) -> None:
        """Continue from a bare sampler state, e.g. one resharded for another world size."""
        self.batch_sampler.load_state_dict(state)
        super().load_state_dict({})

    def __iter__(self) -> Iterator[Batch]:
        # A second iter() must not skip the batches the previous iterator had prefetched.
        if self._iterator is not None and not self._initial_iter_for_state_dict:
            self.load_state_dict(self.state_dict())
        return super().__iter__()

    def sampler_state(self) -> dict[str, Any]:
        """Sampler state as of the last batch yielded (not the prefetch position)."""
        return sampler_state_of(self.state_dict())

    def realised_proportions(self) -> dict[str, float]:
        """Realised source proportions over all batches yielded so far (for logging)."""
        counts = self.sampler_state()["counts"]
        total = max(sum(counts), 1)
        return {name: c / total for name, c in zip(self.batch_sampler.names, counts)}


def open_sources(sources: Sequence[str | Path], split: str, verify: Verify = "size") -> list[TokenShards]:
    """Open each prepared directory; all must share one tokenizer (same vocabulary hash)."""
    shards = [TokenShards(p, split=split, verify=verify) for p in sources]
    first = shards[0]
    for s in shards[1:]:
        if s.vocab_hash != first.vocab_hash or s.dtype != first.dtype:
            raise ShardFormatError(
                f"{s.manifest.path}: tokenizer {s.tokenizer_name!r} (hash {s.vocab_hash[:12]}) differs from "
                f"{first.manifest.path} ({first.tokenizer_name!r}, hash {first.vocab_hash[:12]}); a mixture "
                f"needs one tokenizer"
            )
    return shards


def build_train_loader(
    sources: Sequence[str | Path],
    weights: Sequence[float] | None,
    seq_len: int,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    num_workers: int = 0,
    doc_positions: bool = False,
    split: str = "train",
    verify: Verify = "size",
    prefetch_factor: int | None = None,
    pin_memory: bool = False,
) -> ShardLoader:
    """Endless, deterministic, resumable loader of {"input_ids", "labels"[, "position_ids"]} [B, T].

    Labels are IGNORE_INDEX where a source's loss mask excludes the predicted token. batch_size is per
    rank. weights=None weighs sources equally. Every rank must pass the same sources, weights,
    seq_len, batch_size and seed.
    """
    if not sources:
        raise ValueError("build_train_loader: no sources given")
    shards = open_sources(sources, split, verify)
    dataset = PackedWindows(shards, seq_len, doc_positions)
    names = [str(p) for p in sources]
    sampler = MixtureBatchSampler(dataset.num_windows, weights, batch_size, rank, world_size, seed, names)
    dataset.sampler = sampler
    for name, n, s in zip(names, dataset.num_windows, shards):
        if s.masked:
            share = s.num_loss_tokens / max(s.num_tokens, 1)
            log.info("%s: loss on the %s tokens only (%.1f%% of its tokens)", name, s.manifest.loss_on, 100 * share)
        tail = s.num_tokens - 1 - n * seq_len
        log.info(
            "%s: %d tokens -> %d windows of %d+1 (tail of %d tokens unused); %d windows per rank per epoch",
            name,
            s.num_tokens,
            n,
            seq_len,
            tail,
            n // world_size,
        )
    return ShardLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=_keep_batch,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        pin_memory=pin_memory,
        snapshot_every_n_steps=1,
        persistent_workers=False,
    )


class ValBatches:
    """Fixed validation batches: windows in file order, rank r takes r, r+W, ...; re-iterable."""

    def __init__(
        self,
        source: str | Path,
        seq_len: int,
        batch_size: int,
        rank: int,
        world_size: int,
        max_batches: int | None = None,
        doc_positions: bool = False,
        split: str = "val",
        verify: Verify = "size",
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.dataset = PackedWindows(open_sources([source], split, verify), seq_len, doc_positions)
        per_rank = len(self.dataset) // world_size
        n = per_rank // batch_size
        if max_batches is not None:
            n = min(n, max_batches)
        if n == 0:
            raise ValueError(
                f"{source}: split {split!r} has {len(self.dataset)} windows of {seq_len}+1 tokens, too few for "
                f"one batch of {batch_size} on each of {world_size} ranks"
            )
        self.num_batches, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        b, w, r = self.batch_size, self.world_size, self.rank
        for i in range(self.num_batches):
            yield self.dataset.__getitems__([(i * b + j) * w + r for j in range(b)])


def build_val_batches(
    source: str | Path,
    seq_len: int,
    batch_size: int,
    rank: int,
    world_size: int,
    max_batches: int | None = None,
    **kwargs: Any,
) -> ValBatches:
    """Deterministic validation batches over the "val" split, disjoint across ranks, equal count per rank."""
    return ValBatches(source, seq_len, batch_size, rank, world_size, max_batches, **kwargs)
