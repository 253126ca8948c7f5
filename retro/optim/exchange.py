"""Move row-sharded matrices to one owner rank each and the results back, in one collective each way.

Newton-Schulz needs the whole matrix, but under FSDP2 each rank holds only a row shard (Shard(0),
torch.chunk layout, possibly uneven). Every rank derives the same plan from global shapes alone, so
split sizes never need to be exchanged: the step costs exactly two ``all_to_all_single`` calls per
dtype, however many matrices there are. ``world_size``, ``rank`` and ``group`` are those of the
mesh dimension the rows are sharded along: the whole world under FSDP, one replica's shard group
under HSDP.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Block:
    """One logical matrix to orthogonalise: rows [start, stop) of step parameter ``param``."""

    param: int
    start: int
    stop: int
    cols: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def shard_rows(rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """Global row range [start, stop) that ``rank`` holds under Shard(0) (torch.chunk layout).

    FSDP2 gives every rank ceil(rows / world) rows except the tail, which may get fewer or none.
    """
    chunk = -(-rows // world_size)
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def newton_schulz_cost(rows: int, cols: int, steps: int) -> float:
    """FLOPs of ``steps`` quintic iterations on a rows x cols matrix, m <= n its sides: per step
    X X^T (2 m^2 n), A^2 (2 m^3) and P X (2 m^2 n); the small side is squared."""
    m, n = min(rows, cols), max(rows, cols)
    return float(steps) * (4 * m * m * n + 2 * m**3)


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Greedy longest-processing-time assignment: biggest job first onto the least loaded rank.

    Deterministic (ties break by index, then by rank), so every rank computes the same owners.
    """
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    loads = [(0.0, rank) for rank in range(world_size)]
    owners = [0] * len(costs)
    for i in order:
        load, rank = heapq.heappop(loads)
        owners[i] = rank
        heapq.heappush(loads, (load + costs[i], rank))
    return owners


class RowExchange:
    """Plan for sending each block's row pieces to its owner and the orthogonalised rows back.

    ``param_rows[i]`` is the global row count of parameter i; ``Block.param`` is such an i, and the
    same i indexes the ``local`` shards given to ``to_owners``.
    """

    def __init__(
        self,
        param_rows: Mapping[int, int],
        blocks: Sequence[Block],
        owners: Sequence[int],
        world_size: int,
        rank: int,
    ) -> None:
        self.blocks = list(blocks)
        self.world_size = world_size
        self.rank = rank
        self.owned_by: list[list[int]] = [[] for _ in range(world_size)]
        for b, owner in enumerate(owners):
            self.owned_by[owner].append(b)
        # piece[b][r]: global rows of block b that rank r holds (empty ranges allowed).
        self.shard = {i: [shard_rows(n, world_size, r) for r in range(world_size)] for i, n in param_rows.items()}
        self.piece = [
            [self._intersect(blk, self.shard[blk.param][r]) for r in range(world_size)] for blk in self.blocks
        ]
        me = rank
        # Forward: I send my rows of every block owned by d; I receive every rank's rows of mine.
        self.send_sizes = [sum(self._numel(b, me) for b in self.owned_by[d]) for d in range(world_size)]
        self.recv_sizes = [sum(self._numel(b, s) for b in self.owned_by[me]) for s in range(world_size)]

    @staticmethod
    def _intersect(blk: Block, shard: tuple[int, int]) -> tuple[int, int]:
        lo, hi = max(blk.start, shard[0]), min(blk.stop, shard[1])
        return (lo, max(lo, hi))

    def _numel(self, b: int, r: int) -> int:
        lo, hi = self.piece[b][r]
        return (hi - lo) * self.blocks[b].cols

    def local_rows(self, b: int) -> tuple[int, int]:
        """Rows of block b in this rank's local shard, as local row indices [lo, hi)."""
        lo, hi = self.piece[b][self.rank]
        offset = self.shard[self.blocks[b].param][self.rank][0]
        return lo - offset, hi - offset

    def _all_to_all(self, send: torch.Tensor, send_sizes: list[int], recv_sizes: list[int], group) -> torch.Tensor:
        if self.world_size == 1:
            return send
        recv = send.new_empty(sum(recv_sizes))
        dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=group)
        return recv

    def to_owners(
        self, local: Sequence[torch.Tensor], dtype: torch.dtype, device: torch.device, group
    ) -> dict[int, torch.Tensor]:
        """Full [rows, cols] matrices of the blocks this rank owns, from every rank's local shards."""
        parts = []
        for d in range(self.world_size):
            for b in self.owned_by[d]:
                lo, hi = self.local_rows(b)
                parts.append(local[self.blocks[b].param][lo:hi].reshape(-1))
        send = torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device)
        recv = self._all_to_all(send, self.send_sizes, self.recv_sizes, group)
        pieces: dict[int, list[torch.Tensor]] = {b: [] for b in self.owned_by[self.rank]}
        offset = 0
        for s in range(self.world_size):
            for b in self.owned_by[self.rank]:
                n = self._numel(b, s)
                pieces[b].append(recv[offset : offset + n].view(-1, self.blocks[b].cols))
                offset += n
        return {b: torch.cat(p) for b, p in pieces.items()}

    def from_owners(
        self, results: dict[int, torch.Tensor], dtype: torch.dtype, device: torch.device, group
    ) -> list[tuple[int, torch.Tensor]]:
        """(block, this rank's rows of its result) for every block, from the owners' results."""
        parts = []
        for d in range(self.world_size):
            for b in self.owned_by[self.rank]:
                lo, hi = self.piece[b][d]
                start = self.blocks[b].start
                parts.append(results[b][lo - start : hi - start].reshape(-1))
        send = torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device)
        recv = self._all_to_all(send, self.recv_sizes, self.send_sizes, group)
        out = []
        offset = 0
        for s in range(self.world_size):
            for b in self.owned_by[s]:
                n = self._numel(b, self.rank)
                out.append((b, recv[offset : offset + n].view(-1, self.blocks[b].cols)))
                offset += n
        return out
