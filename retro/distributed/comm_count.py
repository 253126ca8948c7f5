"""Count FSDP2's collectives (all-gathers, reduce-scatters) during a region: the evidence that the
recurrent block is gathered a bounded number of times per step, whatever the recurrence."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch.distributed.fsdp._fully_shard._fsdp_param_group as fsdp_param_group


@contextlib.contextmanager
def count_fsdp_collectives() -> Iterator[Counter]:
    """Yields a Counter with 'all_gather' and 'reduce_scatter' calls made inside the block."""
    counts: Counter = Counter()
    gather, reduce = fsdp_param_group.foreach_all_gather, fsdp_param_group.foreach_reduce

    def counted_gather(*args, **kwargs):
        counts["all_gather"] += 1
        return gather(*args, **kwargs)

    def counted_reduce(*args, **kwargs):
        counts["reduce_scatter"] += 1
        return reduce(*args, **kwargs)

    fsdp_param_group.foreach_all_gather, fsdp_param_group.foreach_reduce = counted_gather, counted_reduce
    try:
        yield counts
    finally:
        fsdp_param_group.foreach_all_gather, fsdp_param_group.foreach_reduce = gather, reduce
