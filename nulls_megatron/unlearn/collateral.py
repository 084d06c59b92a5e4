"""What a deletion costs the other sources, computed exactly before anything is zeroed.

Sources share pool rows (METHOD.md weakness 5): zeroing a forgotten source's rows also takes
sinks from every retained source that drew one of them. For each layer salt (one for all layers
unless ``per_layer_sinks``), over every source of the manifest:
- rows to zero (per pool shard), and rows of the request that were already off;
- the pool fraction off before and after;
- retained sources sharing at least one row to zero, and how many of their ``k`` sinks they lose
  now (a histogram), and how many they have lost in total after this deletion (mean, max, a
  histogram, and how many lost every sink: those run on the backbone alone).
"Retained" means every source of the manifest that is neither off already (erased or
suppressed) nor in this request. One pass over all sources' rows (sink_index.SinkRows).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from ..sinks.assignment import Assignment
from .sink_index import SinkRows


def rows_of(assignment: Assignment, sources: Iterable[int], layer: int) -> np.ndarray:
    """Sorted distinct global pool rows of ``sources`` in ``layer``."""
    ids = np.asarray(sorted(set(int(s) for s in sources)), dtype=np.int64)
    if not len(ids):
        return np.zeros(0, dtype=np.int64)
    rows = np.unique(assignment.sinks_of_np(ids, layer=layer))
    return rows[rows >= 0]  # the upstream assignment pads its rows with -1


def layer_groups(assignment: Assignment, layers: list[int]) -> list[list[int]]:
    """Layers that share their rows: all of them, or each alone with per-layer sinks."""
    return [[layer] for layer in layers] if assignment.per_layer else [list(layers)]


def compute_collateral(assignment: Assignment, layers: list[int], n_sources: int, request: Iterable[int],
                       already_off: Iterable[int], rows: SinkRows) -> dict:
    request = sorted(set(int(s) for s in request))
    off = sorted(set(int(s) for s in already_off) - set(request))
    k, n_pool, size = assignment.max_sinks, assignment.n_pool, assignment.shard_size
    excluded = np.zeros(n_sources, dtype=bool)
    excluded[[s for s in off + request if s < n_sources]] = True
    retained = int(n_sources - excluded.sum())
    groups = []
    for group in layer_groups(assignment, layers):
        layer = group[0]
        new, before = rows_of(assignment, request, layer), rows_of(assignment, off, layer)
        to_zero = np.setdiff1d(new, before)
        after = np.union1d(new, before)
        # bit 0: a row zeroed now; bit 1: a row off after this deletion. One gather per source row.
        # The extra last entry stays 0: it is what padding (row -1, upstream assignment) reads.
        code = np.zeros(n_pool + 1, dtype=np.uint8)
        code[to_zero] |= 1
        code[after] |= 2
        hist_now = np.zeros(k + 1, dtype=np.int64)
        hist_total = np.zeros(k + 1, dtype=np.int64)
        lost_all = 0
        for start, block in rows.chunks(layer):
            g = code[block]
            keep = ~excluded[start:start + len(block)]
            total = (g >> 1).sum(1, dtype=np.int64)
            hist_now += np.bincount((g & 1).sum(1, dtype=np.int64)[keep], minlength=k + 1)
            hist_total += np.bincount(total[keep], minlength=k + 1)
            # A source loses all its sinks when every row it owns is off (it owns k, or a varying number).
            own = (block >= 0).sum(1, dtype=np.int64) if assignment.variable_sinks else k
            lost_all += int(((total == own) & (total > 0))[keep].sum())
        lost = np.arange(k + 1)
        groups.append({
            "layers": group,
            "rows_to_zero": int(len(to_zero)),
            "rows_to_zero_per_shard": np.bincount(to_zero // size, minlength=assignment.n_shards).tolist(),
            "request_rows_already_off": int(len(new) - len(to_zero)),
            "pool_off_before": len(before) / n_pool,
            "pool_off_after": len(after) / n_pool,
            "retained_sharing": int(retained - hist_now[0]),
            "retained_sharing_fraction": (retained - int(hist_now[0])) / retained if retained else 0.0,
            "sinks_lost_now_histogram": {str(i): int(c) for i, c in enumerate(hist_now) if i and c},
            "sinks_lost_total_histogram": {str(i): int(c) for i, c in enumerate(hist_total) if i and c},
            "mean_sinks_lost_total": float((lost * hist_total).sum() / retained) if retained else 0.0,
            "max_sinks_lost_total": int(lost[hist_total > 0].max()) if hist_total.any() else 0,
            "retained_lost_all_sinks": lost_all,
        })
    # With the upstream assignment the number of sinks varies per source: no single k to report.
    per_source = {"k": None, "p_mem": assignment.p_mem} if assignment.variable_sinks else {"k": k}
    return {"n_sources": n_sources, "retained_sources": retained, "sources_requested": request,
            "sources_already_off": off, **per_source, "n_pool": n_pool, "n_shards": assignment.n_shards,
            "per_layer_sinks": assignment.per_layer, "groups": groups}


def format_collateral(c: dict) -> str:
    """The collateral as a terminal table."""
    k = c["k"]
    each = f"k = {k} sinks each" if k is not None else f"upstream hash: each sink with p_mem = {c['p_mem']}"
    lines = [f"collateral: forgetting {len(c['sources_requested'])} source(s) among {c['n_sources']:,} "
             f"({c['retained_sources']:,} retained; {each}, pool {c['n_pool']:,} rows in {c['n_shards']} shard(s))",
             f"  {'layers':<12}{'rows to zero':>13}{'pool off before':>17}{'after':>8}"
             f"{'retained sharing':>18}{'mean lost':>11}{'max lost':>10}{'lost all':>10}"]
    for g in c["groups"]:
        layers = g["layers"]
        name = f"{layers[0]}" if len(layers) == 1 else f"all {len(layers)}"
        lines.append(f"  {name:<12}{g['rows_to_zero']:>13,}{g['pool_off_before']:>16.1%} {g['pool_off_after']:>7.1%}"
                     f"{g['retained_sharing']:>11,} ({g['retained_sharing_fraction']:>4.0%})"
                     f"{g['mean_sinks_lost_total']:>11.2f}{g['max_sinks_lost_total']:>10}{g['retained_lost_all_sinks']:>10,}")
    first = c["groups"][0]
    hist = ", ".join(f"{n} sink{'s' if n != '1' else ''}: {v:,}" for n, v in first["sinks_lost_now_histogram"].items())
    lines.append(f"  retained sources losing sinks now (layers {_layers(first)}): {hist or 'none'}")
    if first["request_rows_already_off"]:
        lines.append(f"  {first['request_rows_already_off']} of the request's rows were already off")
    of = "of k" if k is not None else "of the source's own"
    lines.append(f"  (mean/max/all: sinks lost in total after this deletion, {of}; 'lost all' run on the backbone alone)")
    return "\n".join(lines)


def _layers(group: dict) -> str:
    layers = group["layers"]
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"
