"""Load balance of the expert-parallel sink dispatch on real article lengths (docs/scaling.md).

A token goes to the EP rank holding its source's sinks (nulls_megatron/sinks/dispatch.py), so the
tokens a rank computes per micro-batch depend on which sources the micro-batch holds and how long
they are. This reads a real sources manifest (the token count of every source, as `nulls prep`
wrote it), streams the sources in a seeded random order packed into rows of ``--seq`` tokens (as the
loader does), cuts micro-batches of ``--rows`` rows, and reports per EP size P the max / mean tokens
a rank receives when the P ranks of an EP group dispatch one micro-batch each (P micro-batches of the
stream together; 1.0 is perfect balance; the slowest rank sets the layer's pace). Also the
collateral of deletions, the expected share of a layer's pool zeroed after deleting ``n`` sources,
``1 - (1 - k / n_pool)^n``, at several pool sizes.

    python benchmarks/ep_load_balance.py --prep out/prep_shared_corpus [--seq 1024 --rows 8 --pool-shards 64]
    python benchmarks/ep_load_balance.py    # runs `nulls prep` on configs/prep_shared_corpus.yaml first

Last line: ``RESULT max_over_mean_ep8=<x> max_over_mean_ep64=<y>`` (means over micro-batches).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.manifest import MANIFEST_NAME, read_manifest  # noqa: E402
from nulls_megatron.sinks.assignment import SinkAssignment  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def tokens_per_rank(lengths: np.ndarray, rank_of: np.ndarray, window: int, n_ranks: int) -> np.ndarray:
    """[micro-batches, ranks] tokens of each micro-batch (``window`` consecutive tokens of the stream of
    documents ``lengths``, in order) whose source lives on each rank; the last partial window dropped."""
    ends = np.cumsum(lengths)
    starts = ends - lengths
    n_windows = int(ends[-1] // window)
    out = np.zeros((n_windows, n_ranks), dtype=np.int64)
    for start, end, rank in zip(starts.tolist(), ends.tolist(), rank_of.tolist()):
        w = start // window
        while start < end and w < n_windows:  # a document may span windows
            stop = min(end, (w + 1) * window)
            out[w, rank] += stop - start
            start, w = stop, w + 1
    return out


def collateral(k: int, pool: int, deleted: int) -> float:
    return 1.0 - (1.0 - k / pool) ** deleted


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prep", help="a `nulls prep` output folder (default: prep the shared corpus into a temp dir)")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--rows", type=int, default=8, help="rows per micro-batch and data-parallel rank")
    p.add_argument("--pool-shards", type=int, default=64, help="nulls.pool_shards E (EP sizes must divide it)")
    p.add_argument("--n-pool", type=int, default=7692 - 7692 % 64, help="sink pool per layer (a multiple of E)")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--ep", default="2,4,8,16,64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-document-tokens", type=int, default=0,
                   help="cut every source to this many tokens, as train.max_document_tokens does (0: whole)")
    args = p.parse_args()
    tmp = None
    prep = Path(args.prep) if args.prep else None
    if prep is None:
        import os

        from data_prep.config import load_prep_config
        from data_prep.pipeline import run_prep

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        tmp = tempfile.TemporaryDirectory(prefix="ep_balance_")
        prep = Path(tmp.name)
        run_prep(load_prep_config(REPO / "configs" / "prep_shared_corpus.yaml", ["tokenizer.vocab_size=2048"],
                                  output_dir=str(prep)), progress=False)
    manifest = read_manifest(prep / MANIFEST_NAME, columns=["source_index", "n_tokens", "present"])
    present = manifest["present"].to_numpy(zero_copy_only=False)
    sources = manifest["source_index"].to_numpy()[present].astype(np.int64)
    lengths = manifest["n_tokens"].to_numpy()[present].astype(np.int64)
    order = np.random.default_rng(args.seed).permutation(len(sources))
    sources, lengths = sources[order], lengths[order]
    if args.max_document_tokens:
        lengths = np.minimum(lengths, args.max_document_tokens)
    assignment = SinkAssignment(args.n_pool, args.k, n_shards=args.pool_shards)
    shard = assignment.shard_of_np(sources.astype(np.uint32))
    window = args.seq * args.rows
    print(f"{len(sources):,} sources from {prep}, {lengths.sum():,} tokens (median {int(np.median(lengths))}, "
          f"max {lengths.max():,}); micro-batch {args.rows} x {args.seq} = {window:,} tokens; E = {args.pool_shards} pool shards")
    print(f"{'EP':>4} {'dispatches':>14} {'sources/dispatch':>20} {'max/mean tokens':>16} {'p95':>6} {'worst':>6}")
    result = {}
    for ep in [int(e) for e in args.ep.split(",")]:
        if args.pool_shards % ep:
            raise SystemExit(f"EP {ep} does not divide --pool-shards {args.pool_shards}")
        # The EP group's P ranks each dispatch one micro-batch: P windows of the stream together.
        counts = tokens_per_rank(lengths, shard // (args.pool_shards // ep), ep * window, ep)
        if not len(counts):
            raise SystemExit(f"fewer tokens than one dispatch at EP {ep} ({ep * window:,})")
        ratio = counts.max(axis=1) / counts.mean(axis=1)
        per_batch = ep * window / np.mean(lengths)
        result[ep] = float(ratio.mean())
        print(f"{ep:>4} {len(counts):>14,} {per_batch:>20.1f} {ratio.mean():>16.2f} {np.percentile(ratio, 95):>6.2f} "
              f"{ratio.max():>6.2f}")
    print("collateral: expected share of a layer's pool zeroed after deleting n sources, 1 - (1 - k/n_pool)^n:")
    pools = [args.n_pool, 4 * args.n_pool, 16 * args.n_pool]
    print(f"{'n':>8} " + " ".join(f"{f'pool {q:,}':>14}" for q in pools))
    for n in (1, 10, 100, 1000, 10000):
        print(f"{n:>8} " + " ".join(f"{collateral(args.k, q, n):>14.4f}" for q in pools))
    if tmp is not None:
        tmp.cleanup()
    print("RESULT " + " ".join(f"max_over_mean_ep{ep}={result[ep]:.2f}" for ep in (8, 64) if ep in result))


if __name__ == "__main__":
    main()
