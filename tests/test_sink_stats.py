"""The per-step sink statistics, recounted token by token without the code under test's vectorised path:
a source's shard from its own sink rows (all of a source's sinks lie in one of E equal shards), live
sinks as the union of each counted source's rows, and tokens outside the loss mask not counted."""
from __future__ import annotations

from collections import Counter

import torch

from nulls_megatron.config import NullsConfig
from nulls_megatron.sinks.assignment import assignment_from_config
from nulls_megatron.train.packing import PackedRows
from nulls_megatron.train.sink_stats import sink_statistics


def _batch(sources: torch.Tensor, mask: torch.Tensor) -> PackedRows:
    zeros = torch.zeros_like(sources)
    return PackedRows(tokens=zeros, labels=zeros, source_ids=sources, document_ids=zeros, loss_mask=mask)


def test_sink_statistics_match_a_token_by_token_recount():
    assignment = assignment_from_config(NullsConfig(n_pool=256, sinks_per_source=8, pool_shards=4, seed=3))
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        sources = torch.randint(0, 40, (2, 16), generator=gen)
        mask = (torch.rand(2, 16, generator=gen) > 0.3).long()
        batches.append(_batch(sources, mask))
    # A source that appears only under a zero loss mask (padding) is not in the step's statistics.
    batches.append(_batch(torch.full((1, 16), 999), torch.zeros(1, 16, dtype=torch.long)))

    shard_size = assignment.n_pool // assignment.n_shards
    tokens_per_shard: Counter[int] = Counter()
    counted: set[int] = set()
    for b in batches:
        for source, keep in zip(b.source_ids.reshape(-1).tolist(), b.loss_mask.reshape(-1).tolist()):
            if not keep:
                continue
            rows = assignment.sinks_of(torch.tensor([source]))[0].tolist()
            shard = rows[0] // shard_size
            assert all(r // shard_size == shard for r in rows), "a source's sinks span shards"
            tokens_per_shard[shard] += 1
            counted.add(source)
    live = set()
    for source in counted:
        live.update(assignment.sinks_of(torch.tensor([source]))[0].tolist())

    stats = sink_statistics(batches, assignment)
    assert 999 not in counted
    assert stats["sink/sources"] == len(counted)
    assert stats["sink/live_sinks"] == len(live)
    assert stats["sink/live_fraction"] == len(live) / 256
    assert [stats[f"sink/tokens_shard_{e:03d}"] for e in range(4)] == [float(tokens_per_shard[e]) for e in range(4)]
    assert sum(tokens_per_shard.values()) == sum(int(b.loss_mask.sum()) for b in batches)


def test_an_empty_step_counts_nothing():
    assignment = assignment_from_config(NullsConfig(n_pool=64, sinks_per_source=4, pool_shards=2))
    stats = sink_statistics([_batch(torch.ones(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))], assignment)
    assert stats == {"sink/sources": 0.0, "sink/live_sinks": 0.0, "sink/live_fraction": 0.0,
                     "sink/tokens_shard_000": 0.0, "sink/tokens_shard_001": 0.0}
