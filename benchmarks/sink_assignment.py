"""Benchmark of the deterministic sink assignment over a whole corpus.

Streams source ids 0..N-1 through ``SinkAssignment.usage_counts`` for each shard count,
and reports wall and CPU time, peak RSS, per-shard balance and per-sink usage against
the binomial expectation. As a speed reference it times a plain
``numpy.random.Generator.choice(P, k, replace=False)`` per source on a small sample in
the same run and extrapolates it linearly to N sources.

    python benchmarks/sink_assignment.py [--sources 6407814] [--n-pool 7692] [--k 100] [--shards 1,4,16]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from nulls_megatron.sinks.assignment import SinkAssignment  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def baseline_seconds_per_source(p: int, k: int, sample: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for _ in range(sample):
        rng.choice(p, k, replace=False)
    return (time.perf_counter() - t0) / sample


def sink_stats(a: SinkAssignment, shard_counts: np.ndarray, sink_counts: np.ndarray) -> dict[str, float]:
    # Each sink of shard e is used by each of the N_e sources of that shard independently
    # with probability q = k/P, so its usage is Binomial(N_e, q).
    p, q = a.shard_size, a.sinks_per_source / a.shard_size
    per_shard = sink_counts.reshape(a.n_shards, p).astype(np.float64)
    mean = shard_counts * q
    obs_ss = float(((per_shard - mean[:, None]) ** 2).sum())
    exp_ss = float((p * shard_counts * q * (1 - q)).sum())
    sd = np.sqrt(shard_counts * q * (1 - q))
    z = (per_shard - mean[:, None]) / np.where(sd > 0, sd, 1)[:, None]
    return {
        "var_ratio": obs_ss / exp_ss if exp_ss > 0 else float("nan"),
        "usage_min": float(per_shard.min()),
        "usage_max": float(per_shard.max()),
        "usage_mean": float(mean.mean()),
        "binom_sd": float(sd.mean()),
        "z_min": float(z.min()),
        "z_max": float(z.max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", type=int, default=6_407_814)
    ap.add_argument("--n-pool", type=int, default=7692)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--shards", type=str, default="1,4,16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=1 << 15, help="sources per streamed chunk")
    ap.add_argument("--baseline-sample", type=int, default=20_000)
    ap.add_argument("--progress", action="store_true", help="show a tqdm bar")
    args = ap.parse_args()
    shard_list = [int(x) for x in args.shards.split(",") if x]
    n = args.sources

    print(f"sources={n} n_pool={args.n_pool} k={args.k} shards={shard_list} seed={args.seed} chunk={args.chunk}")
    results = []
    for e in shard_list:
        n_pool = -(-args.n_pool // e) * e  # shards must be equal: round the pool up
        if n_pool != args.n_pool:
            print(f"\nnote: n_pool {args.n_pool} is not divisible by E={e}; using n_pool={n_pool}")
        a = SinkAssignment(n_pool, args.k, n_shards=e, seed=args.seed)
        t0, c0 = time.perf_counter(), time.process_time()
        shard_counts, sink_counts = a.usage_counts(n, chunk=args.chunk, progress=args.progress)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert shard_counts.sum() == n and sink_counts.sum() == n * args.k
        dev = float(np.abs(shard_counts / shard_counts.mean() - 1).max())
        st = sink_stats(a, shard_counts, sink_counts)
        base = baseline_seconds_per_source(a.shard_size, args.k, args.baseline_sample, args.seed)
        rate, base_rate = n / wall, 1 / base
        results.append((e, wall, dev))
        print(
            f"\nE={e:<3d} P={a.shard_size}: {wall:.2f} s wall, {cpu:.2f} s CPU, {rate / 1e6:.3f} M sources/s, "
            f"peak RSS so far {peak_rss_gb():.3f} GB"
        )
        print(
            f"  shards: min {shard_counts.min()} max {shard_counts.max()} "
            f"(spread {shard_counts.max() - shard_counts.min()}), max rel. deviation {dev:.6f}"
        )
        print(
            f"  sink usage: mean {st['usage_mean']:.2f}, min {st['usage_min']:.0f}, max {st['usage_max']:.0f}, "
            f"binomial sd {st['binom_sd']:.2f}, z range [{st['z_min']:.2f}, {st['z_max']:.2f}], "
            f"observed/expected variance {st['var_ratio']:.4f}"
        )
        print(
            f"  baseline Generator.choice(P={a.shard_size}, k={args.k}, replace=False) per source: timed on "
            f"{args.baseline_sample} sources, extrapolated to {n}: {base * n:.2f} s "
            f"({base_rate / 1e6:.4f} M sources/s); speed ratio ours/baseline = {rate / base_rate:.2f}x"
        )
    main_e, main_wall, _ = next((r for r in results if r[0] == 1), results[0])
    max_dev = max(r[2] for r in results)
    print(f"\n(assign seconds from the E={main_e} run; max_shard_dev over E={shard_list}; peak RSS of the process)")
    print(f"RESULT assign_6m_seconds={main_wall:.1f} peak_rss_gb={peak_rss_gb():.1f} max_shard_dev={max_dev:.4f}")


if __name__ == "__main__":
    main()
