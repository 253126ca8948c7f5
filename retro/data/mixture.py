"""Which windows each rank reads, batch by batch: deterministic, disjoint across ranks, resumable.

Each source is an endless stream of epochs. In epoch e the windows of source s are ordered by a
permutation keyed by (seed, s, e); rank r reads positions r, r + W, r + 2W, ... of that order, so
ranks are disjoint and together read every window once per epoch, except the `n mod W` windows at
the end of the order (a different set each epoch), which are counted and logged. A source's epoch
can end in the middle of a batch: the batch is completed from the next epoch, so no partial batch
is dropped.

For a mixture, each slot of a batch picks a source by systematic sampling of the weights (one
uniform per batch, keyed by (seed, rank, batch)), so a batch of B holds floor or ceil of w*B
samples of each source and realised proportions track the weights closely.

The whole state is a handful of integers (`state_dict`), so StatefulDataLoader snapshots it
every step for free, and a restart continues with exactly the next batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from retro.data.permutation import FeistelPermutation

log = logging.getLogger("retro.data.mixture")

STATE_VERSION = 1


class MixtureBatchSampler:
    """Yields lists of global window ids (source offset + window index) for one rank, forever."""

    def __init__(self, num_windows: Sequence[int], weights: Sequence[float] | None, batch_size: int,
                 rank: int, world_size: int, seed: int, names: Sequence[str] | None = None) -> None:
        k = len(num_windows)
        if k == 0:
            raise ValueError("no sources given")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        w = np.ones(k) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (k,) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights {list(w)} must be {k} non-negative numbers with a positive sum")
        self.names = list(names) if names is not None else [f"source{i}" for i in range(k)]
        for name, n in zip(self.names, num_windows):
            if n < world_size:
                raise ValueError(f"{name}: {n} windows cannot feed {world_size} ranks; use more data or a shorter seq_len")
        self.num_windows = [int(n) for n in num_windows]
        self.offsets = np.concatenate([[0], np.cumsum(self.num_windows)]).astype(np.int64)
        self.weights = w / w.sum()
        self._cum = np.cumsum(self.weights)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.per_rank = [n // world_size for n in self.num_windows]
        self._perms: dict[tuple[int, int], FeistelPermutation] = {}
        self.batches = 0
        self.epoch = [0] * k
        self.pos = [0] * k
        self.counts = [0] * k

    # --- the schedule ------------------------------------------------------------------------
    def sources_of_batch(self, b: int) -> np.ndarray:
        """Source of each slot of batch b on this rank (a pure function of seed, rank, b)."""
        if len(self.weights) == 1:
            return np.zeros(self.batch_size, dtype=np.int64)
        rng = np.random.default_rng([self.seed, self.rank, b, 0x6D6978])
        u = (rng.random() + np.arange(self.batch_size)) / self.batch_size
        slots = np.minimum(np.searchsorted(self._cum, u, side="right"), len(self.weights) - 1)
        return rng.permutation(slots)

    def _perm(self, s: int, epoch: int) -> FeistelPermutation:
        key = (s, epoch)
        if key not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k[0] != s}  # keep one epoch per source
            self._perms[key] = FeistelPermutation(self.num_windows[s], (self.seed, s, epoch, 0x70726D))
        return self._perms[key]

    def _take(self, s: int, count: int) -> np.ndarray:
        """Next `count` windows of source s on this rank, rolling into new epochs as needed."""
        out = []
        while count:
            step = min(count, self.per_rank[s] - self.pos[s])
            p = np.arange(self.pos[s], self.pos[s] + step, dtype=np.int64) * self.world_size + self.rank
            out.append(self._perm(s, self.epoch[s])(p))
            self.pos[s] += step
            count -= step
            if self.pos[s] == self.per_rank[s]:
                unused = self.num_windows[s] - self.per_rank[s] * self.world_size
                log.info("%s: epoch %d done on rank %d (%d windows read; %d windows left for the world-size "
                         "remainder this epoch)", self.names[s], self.epoch[s], self.rank, self.per_rank[s], unused)
                self.epoch[s] += 1
                self.pos[s] = 0
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def next_batch(self) -> list[int]:
        src = self.sources_of_batch(self.batches)
        ids = np.empty(self.batch_size, dtype=np.int64)
        for s in np.unique(src):
            slots = np.flatnonzero(src == s)
            ids[slots] = self._take(int(s), len(slots)) + self.offsets[s]
            self.counts[s] += len(slots)
        self.batches += 1
        return ids.tolist()

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()  # state is advanced before the yield: a snapshot means "next batch"

    # --- reporting ---------------------------------------------------------------------------
    def realised_proportions(self) -> dict[str, float]:
        total = max(sum(self.counts), 1)
        return {name: c / total for name, c in zip(self.names, self.counts)}

    def unused_windows(self) -> dict[str, int]:
        """Windows no rank read in completed epochs (the world-size remainder), per source."""
        return {name: (n - pr * self.world_size) * e
                for name, n, pr, e in zip(self.names, self.num_windows, self.per_rank, self.epoch)}

    # --- Stateful protocol (torchdata) -------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        return {"num_windows": self.num_windows, "weights": [float(x) for x in self.weights],
                "batch_size": self.batch_size, "rank": self.rank, "world_size": self.world_size,
                "seed": self.seed}

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "batches": self.batches, "epoch": list(self.epoch),
                "pos": list(self.pos), "counts": list(self.counts), "config": self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')!r} != {STATE_VERSION}")
        mine, saved = self._fingerprint(), state["config"]
        diff = {k: (saved.get(k), v) for k, v in mine.items()
                if (np.round(saved.get(k), 12).tolist() if k == "weights" else saved.get(k)) !=
                (np.round(v, 12).tolist() if k == "weights" else v)}
        if diff:
            raise ValueError("data loader state does not match this loader (saved, now): "
                             + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items()))
        self.batches = int(state["batches"])
        self.epoch = [int(x) for x in state["epoch"]]
        self.pos = [int(x) for x in state["pos"]]
        self.counts = [int(x) for x in state["counts"]]
