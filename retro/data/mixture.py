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

A restart on a different number of ranks (`reshard_states`) cannot continue bit for bit, since
rank r's positions r, r + W, ... change with W. Instead, per source, the new ranks continue the
same epoch's order from the longest prefix every old rank has read (rounded down to a multiple of
the new world size), so no window is skipped; the few windows past that prefix that some old rank
had already read are read again, and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from retro.data.permutation import FeistelPermutation

log = logging.getLogger("retro.data.mixture")

STATE_VERSION = 1


class MixtureBatchSampler:
    """Yields lists of global window ids (source offset + window index) for one rank, forever."""

    def __init__(
        self,
        num_windows: Sequence[int],
        weights: Sequence[float] | None,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        names: Sequence[str] | None = None,
    ) -> None:
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
                raise ValueError(
                    f"{name}: {n} windows cannot feed {world_size} ranks; use more data or a shorter seq_len"
                )
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
                log.info(
                    "%s: epoch %d done on rank %d (%d windows read; %d windows left for the world-size "
                    "remainder this epoch)",
                    self.names[s],
                    self.epoch[s],
                    self.rank,
                    self.per_rank[s],
                    unused,
                )
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
        return {
            name: (n - pr * self.world_size) * e
            for name, n, pr, e in zip(self.names, self.num_windows, self.per_rank, self.epoch)
        }

    # --- Stateful protocol (torchdata) -------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        return {
            "num_windows": self.num_windows,
            "weights": [float(x) for x in self.weights],
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "batches": self.batches,
            "epoch": list(self.epoch),
            "pos": list(self.pos),
            "counts": list(self.counts),
            "config": self._fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')!r} != {STATE_VERSION}")
        mine, saved = self._fingerprint(), state["config"]
        diff = {
            k: (saved.get(k), v)
            for k, v in mine.items()
            if (np.round(saved.get(k), 12).tolist() if k == "weights" else saved.get(k))
            != (np.round(v, 12).tolist() if k == "weights" else v)
        }
        if diff:
            raise ValueError(
                "data loader state does not match this loader (saved, now): "
                + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items())
            )
        self.batches = int(state["batches"])
        self.epoch = [int(x) for x in state["epoch"]]
        self.pos = [int(x) for x in state["pos"]]
        self.counts = [int(x) for x in state["counts"]]

    @staticmethod
    def reshard_state(states: Sequence[dict[str, Any]], new_world_size: int, new_rank: int) -> dict[str, Any]:
        """State for rank `new_rank` of `new_world_size` from every old rank's state (see `reshard_states`)."""
        return reshard_states(states, new_world_size).states[new_rank]


@dataclass(frozen=True)
class Reshard:
    """How the data order continues when the states of N ranks resume on M ranks (lists are per source)."""

    old_world_size: int
    new_world_size: int
    states: list[dict[str, Any]]  # one sampler state per new rank
    epoch: list[int]  # the epoch the new ranks continue in
    consumed: list[int]  # positions [0, consumed) of that epoch's order were read by the old ranks
    start: list[int]  # the new ranks read positions start, start + 1, ... of that epoch's order
    reread: list[int]  # windows some old rank read that the new ranks will read again

    def describe(self, names: Sequence[str]) -> str:
        return "; ".join(
            f"{name}: epoch {e} continues at global position {start} ({consumed} read before), {k} windows re-read"
            for name, e, consumed, start, k in zip(names, self.epoch, self.consumed, self.start, self.reread)
        )


def _count_below(first: int, stop: int, rank: int, world: int, limit: int) -> int:
    """How many j in [first, stop) have position rank + j * world < limit."""
    below = max(0, -(-(limit - rank) // world))
    return max(0, min(stop, below) - first)


def reshard_states(states: Sequence[dict[str, Any]], new_world_size: int) -> Reshard:
    """New sampler states for `new_world_size` ranks from the states of all N old ranks (rank order).

    Per source, old rank r has read positions r + j*N for j < per_rank of earlier epochs and for
    j < pos of its current epoch. Measured in per-rank steps, L_r = epoch * per_rank + pos; the
    minimum over ranks, (e, p), means every position below g = p*N of epoch e has been read (and
    all usable ones of earlier epochs). The new ranks continue epoch e at start = floor(g / M) * M
    (rank r' at pos start / M), so nothing is skipped. Re-read: the g - start boundary windows plus
    every window an old rank read past g (at most sum over ranks of L_r - min L) that lies in the
    new world's usable range of its epoch. A single source keeps all ranks level, so at most M - 1
    windows are re-read; in a mixture, ranks drift apart by a few windows per source.
    `batches` carries over (all ranks share it); `counts` (for proportions) is split evenly.
    """
    if not states:
        raise ValueError("reshard_states: no saved sampler states given")
    if new_world_size < 1:
        raise ValueError(f"reshard_states: new world size must be positive, got {new_world_size}")
    old = len(states)
    first = states[0]
    for r, state in enumerate(states):
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"rank {r}: data loader state version {state.get('version')!r} != {STATE_VERSION}")
        config = state["config"]
        if config["rank"] != r or config["world_size"] != old:
            raise ValueError(
                f"rank {r}: state says rank {config['rank']} of {config['world_size']}, expected rank {r} "
                f"of {old} (one state per old rank, in rank order)"
            )
        for key in ("num_windows", "weights", "batch_size", "seed"):
            if config[key] != first["config"][key]:
                raise ValueError(
                    f"rank {r}: data loader {key} = {config[key]!r} differs from rank 0's "
                    f"{first['config'][key]!r}; the saved states do not belong to one run"
                )
        if state["batches"] != first["batches"]:
            raise ValueError(
                f"rank {r}: {state['batches']} batches read, rank 0 read {first['batches']}; "
                "ranks must be saved at the same step"
            )
    num_windows = first["config"]["num_windows"]
    new_states = [
        {
            "version": STATE_VERSION,
            "batches": int(first["batches"]),
            "epoch": [],
            "pos": [],
            "counts": [],
            "config": {**first["config"], "rank": r, "world_size": new_world_size},
        }
        for r in range(new_world_size)
    ]
    epochs, consumed, starts, rereads = [], [], [], []
    for s, n in enumerate(num_windows):
        if n < new_world_size:
            raise ValueError(f"source {s}: {n} windows cannot feed {new_world_size} ranks")
        per_rank, new_per_rank = n // old, n // new_world_size
        steps = [state["epoch"][s] * per_rank + state["pos"][s] for state in states]
        e, p = divmod(min(steps), per_rank)
        g = p * old
        limit = new_per_rank * new_world_size  # the new world reads positions [0, limit) of each epoch
        start = g // new_world_size * new_world_size
        if start < limit:
            new_epoch, reread = e, g - start
        else:  # g lies in the new world's remainder of epoch e: continue with epoch e + 1
            new_epoch, start, reread = e + 1, 0, 0
            g = 0  # no position of epoch e + 1 is known to be read by every old rank
        for r, state in enumerate(states):  # old reads past the prefix that the new ranks reach again
            er, pr = state["epoch"][s], state["pos"][s]
            for epoch in range(e, er + 1):
                lo = p if epoch == e else 0
                hi = pr if epoch == er else per_rank
                reread += _count_below(lo, hi, r, old, limit)
        epochs.append(new_epoch)
        consumed.append(g)
        starts.append(start)
        rereads.append(reread)
        total = sum(state["counts"][s] for state in states)
        for r, state in enumerate(new_states):
            state["epoch"].append(new_epoch)
            state["pos"].append(start // new_world_size)
            state["counts"].append(total // new_world_size + (r < total % new_world_size))
    return Reshard(old, new_world_size, new_states, epochs, consumed, starts, rereads)
