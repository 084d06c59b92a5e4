"""Per-step sink statistics for tracking: how the batch spreads over the pool.

- ``tokens_per_shard``: training tokens (loss-mask) routed to each pool shard; with
  expert-style sharding (METHOD.md section 5) this is the load each shard's device takes.
- ``sources``: distinct sources in the global batch.
- ``live_sinks``: distinct pool rows that get gradient this step (layer 0's assignment;
  with per-layer sinks every layer has the same count distribution). Under AdamW the
  other rows see no gradient at all.

Counts are summed (tokens) and united (sources) over data-parallel replicas, so rank 0
logs the global batch's numbers.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..sinks.assignment import Assignment
from .packing import PackedRows


def sink_statistics(batches: list[PackedRows], assignment: Assignment,
                    dp_group: dist.ProcessGroup | None = None) -> dict[str, float]:
    sources = torch.cat([b.source_ids.reshape(-1) for b in batches])
    mask = torch.cat([b.loss_mask.reshape(-1) for b in batches]) > 0
    # Hash each distinct source once, not every token.
    ids, counts = torch.unique(sources[mask], return_counts=True)
    shards = assignment.shard_of(ids) if ids.numel() else torch.zeros(0, dtype=torch.int64)
    per_shard = torch.bincount(shards, weights=counts.to(torch.float64), minlength=assignment.n_shards)
    local_sources = ids.tolist()
    if dp_group is not None and dist.is_initialized() and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(per_shard, group=dp_group)
        gathered: list[list[int] | None] = [None] * dist.get_world_size(dp_group)
        dist.all_gather_object(gathered, local_sources, group=dp_group)
        unique = sorted({s for part in gathered for s in part})
    else:
        unique = local_sources
    ids = torch.tensor(unique, dtype=torch.int64)
    rows = torch.unique(assignment.sinks_of(ids)) if unique else torch.zeros(0, dtype=torch.int64)
    live = int((rows >= 0).sum())  # the upstream assignment pads rows with -1
    stats = {"sink/sources": float(len(unique)), "sink/live_sinks": float(live),
             "sink/live_fraction": live / assignment.n_pool}
    stats.update({f"sink/tokens_shard_{e:03d}": float(v) for e, v in enumerate(per_shard.tolist())})
    return stats
