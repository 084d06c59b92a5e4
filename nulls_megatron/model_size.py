"""Parameter counts of a NULLs GPT from its config, split into shared weights and sinks.

The split matters for the method: what the shared weights can memorise decides
how much of a forgotten source stays behind (METHOD.md section 6).
"""
from __future__ import annotations

from .config import Config


def parameter_counts(cfg: Config) -> dict[str, int]:
    m, n = cfg.model, cfg.nulls
    d, hd = m.hidden_size, m.head_dim
    attention = d * hd * (m.num_attention_heads + 2 * m.num_query_groups) + m.num_attention_heads * hd * d
    norms = 2 * d
    backbone_mlp = 3 * d * n.n_backbone
    sinks = 3 * d * n.n_pool
    embeddings = m.vocab_size * d * (1 if m.tie_embeddings else 2)
    shared = embeddings + m.num_layers * (attention + norms + backbone_mlp) + d  # + final norm
    return {
        "embeddings": embeddings,
        "attention": m.num_layers * attention,
        "backbone_mlp": m.num_layers * backbone_mlp,
        "norms": m.num_layers * norms + d,
        "shared": shared,
        "sinks": m.num_layers * sinks,
        "total": shared + m.num_layers * sinks,
        "active_per_token": shared + m.num_layers * 3 * d * n.sinks_per_source,
    }


def pool_lost_after(cfg: Config, forgotten_sources: int) -> float:
    """Expected fraction of a shard's sinks zeroed after forgetting ``forgotten_sources``
    sources of that shard: ``1 - (1 - k / P)^n`` (METHOD.md weakness 5)."""
    shard = cfg.nulls.n_pool // cfg.nulls.pool_shards
    return 1.0 - (1.0 - cfg.nulls.sinks_per_source / shard) ** forgotten_sources
