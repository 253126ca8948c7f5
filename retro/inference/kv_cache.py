"""The decoding KV cache: one preallocated K/V buffer per (stage, pass, layer) of a retro model.

Pass p of the recurrent block attends to the K/V that the same pass produced for earlier tokens, which
is what an uncached recomputation at a fixed r sees. `share_block_cache=True` keeps one buffer per block
layer instead (r times less block memory): earlier tokens then expose only their last pass's K/V. Its
own module so that the decoding loop (generate.py) and the adaptive-exit step (adaptive.py) both use it
without importing each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from retro.model.modeling import RetroForCausalLM


class _Slot:
    """One layer's K/V buffers [B, H_kv, max_len, D]; `update` writes at the cache's past length."""

    __slots__ = ("cache", "k", "v")

    def __init__(self, cache: StaticKVCache, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.cache = cache
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.cache.past_length
        end = start + key.size(2)
        if end > self.k.size(2):
            raise ValueError(f"KV cache overflow: {end} positions needed, cache holds {self.k.size(2)}")
        rows = self.cache.rows
        if rows is None:
            self.k[:, :, start:end] = key
            self.v[:, :, start:end] = value
            return self.k[:, :, :end], self.v[:, :, :end]
        self.k[rows, :, start:end] = key  # only the rows still iterating (adaptive exit)
        self.v[rows, :, start:end] = value
        return self.k[rows, :, :end], self.v[rows, :, :end]


class StaticKVCache:
    """Preallocated K/V for every (stage, pass, layer) of a retro model (see `retro.model.KVCache`).

    `past_length` counts the positions already written; call `advance(T)` once after each forward.
    `rows` (a long tensor of batch rows, or None for all) restricts reads and writes to those rows: the
    adaptive-exit step sets it while it runs a pass on the rows still iterating.
    """

    def __init__(
        self,
        model: RetroForCausalLM,
        batch_size: int,
        max_length: int,
        num_passes: int,
        share_block_cache: bool = False,
    ) -> None:
        config = model.config
        param = model.lm_head.weight
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.past_length = 0
        self.rows: torch.Tensor | None = None
        self.max_length = max_length
        self.num_passes = num_passes if config.is_recurrent else 0
        self.share_block_cache = share_block_cache

        def new() -> _Slot:
            return _Slot(self, shape, param.dtype, param.device)

        self._slots: dict[tuple, _Slot] = {("prelude", i): new() for i in range(config.n_prelude)}
        self._slots.update({("coda", i): new() for i in range(config.n_coda)})
        shared = [new() for _ in range(config.n_recurrent)] if share_block_cache else None
        for p in range(self.num_passes):
            for i in range(config.n_recurrent):
                self._slots[("block", p, i)] = shared[i] if shared is not None else new()
        self.n_recurrent = config.n_recurrent

    def slot(self, key: tuple) -> _Slot:
        try:
            return self._slots[key]
        except KeyError:
            raise KeyError(f"KV cache has no slot {key!r} (built for {self.num_passes} recurrent passes)") from None

    def advance(self, num_tokens: int) -> None:
        self.past_length += num_tokens

    def num_bytes(self) -> int:
        """Memory held by distinct K/V buffers."""
        unique = {id(s): s for s in self._slots.values()}.values()
        return sum(s.k.numel() * s.k.element_size() * 2 for s in unique)

    def fill_later_passes(self, rows: torch.Tensor, exit_pass: int, num_tokens: int) -> None:
        """Rows that exited at `exit_pass`: copy that pass's K/V of the newest `num_tokens` positions into every
        later pass's slot, so later tokens attending through those passes see the exit state (no recompute)."""
        if self.share_block_cache:
            return  # the one buffer already holds the exit pass's K/V
        start, end = self.past_length, self.past_length + num_tokens
        for i in range(self.n_recurrent):
            src = self._slots[("block", exit_pass, i)]
            for dst_pass in range(exit_pass + 1, self.num_passes):
                dst = self._slots[("block", dst_pass, i)]
                dst.k[rows, :, start:end] = src.k[rows, :, start:end]
                dst.v[rows, :, start:end] = src.v[rows, :, start:end]
