"""Benchmark: the sources manifest at Wikipedia scale (6.4M synthetic sources).

The parent process writes what the Ray tasks of the pipeline leave in ``work/chunks`` for 6.4M
documents (per-chunk metadata parquet files: key, title, page id, url, token count, title hash), with
one duplicate page id in 1,000 and lognormal lengths (median 364 words ~ 473 tokens, heavy tail, like
Wikipedia). A child process then runs the pipeline's own driver code on them and is measured alone
(wall time and peak RSS): gather the metadata, number the sources, plan the shards, write
manifest.parquet and the title index; then it builds the sink-assignment inputs (dense uint32 source
ids + token counts read back from the manifest, and each source's pool shard from ``SinkAssignment``)
and times title lookups. Title hashing, done inside the Ray tasks, is timed separately on one core.

    python benchmarks/manifest_scale.py [--sources 6407814] [--chunks 320]

Goal: driver < 60 s and < 2 GB at 6.4M sources.
"""
from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from data_prep import tasks  # noqa: E402
from data_prep.documents import Chunk  # noqa: E402
from data_prep.manifest import MANIFEST_NAME, Manifest, read_manifest, title_hashes  # noqa: E402
from data_prep.pipeline import ChunkDocs, gather_documents, plan_sources, write_sources  # noqa: E402

WORDS = ("History Battle River Saint John Church School Station Football Club Album Song Film Party Island Lake "
         "County District Railway University of the in and a List North South New Old Royal National Museum "
         "Mountain Bridge Castle Park Street Airport Cathedral Company Award Festival Season Election Team").split()


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def chunk_list(n_chunks: int) -> list[Chunk]:
    return [Chunk("mediawiki", "synthetic.xml.bz2", 0, i, i, i + 1) for i in range(n_chunks)]


def write_synthetic_chunks(work: Path, n: int, n_chunks: int, seed: int) -> float:
    """Per-chunk metadata files as encode tasks write them; returns the seconds spent hashing titles."""
    rng = np.random.default_rng(seed)
    page_id = np.cumsum(rng.integers(1, 12, n)).astype(np.int64)
    dup = rng.random(n) < 1e-3  # a later dump part repeats a page: the numbering must skip it
    page_id[dup] = page_id[rng.integers(0, n, int(dup.sum()))]
    n_tokens = np.maximum(1, rng.lognormal(mean=np.log(364), sigma=1.0, size=n) * 1.3).astype(np.int64)
    words = pa.array(WORDS)
    (work / "chunks").mkdir(parents=True, exist_ok=True)
    hash_s = 0.0
    bounds = np.linspace(0, n, n_chunks + 1).astype(np.int64)
    for chunk, a, b in zip(chunk_list(n_chunks), bounds[:-1], bounds[1:]):
        ids = pa.array(page_id[a:b])
        title = pc.binary_join_element_wise(*(words.take(pa.array(rng.integers(0, len(WORDS), b - a))) for _ in range(2)),
                                            pc.cast(ids, pa.string()), " ")
        t = time.perf_counter()
        hashes = title_hashes(title.to_pylist())
        hash_s += time.perf_counter() - t
        table = pa.table({
            "key": pc.binary_join_element_wise("wiki:", pc.cast(ids, pa.string()), ""), "title": title, "page_id": ids,
            "url": pc.binary_join_element_wise("https://en.wikipedia.org/wiki/", pc.replace_substring(title, " ", "_"), ""),
            "group": pa.nulls(b - a, pa.string()), "origin": pc.binary_join_element_wise("synthetic.xml.bz2:", pc.cast(ids, pa.string()), ""),
            "n_tokens": n_tokens[a:b], "title_hash": hashes}, schema=tasks.META_SCHEMA)
        pq.write_table(table, tasks.chunk_paths(work, tasks.chunk_name(chunk))[1], compression="zstd")
    return hash_s


def driver(work: Path, n_chunks: int, shard_bytes: int) -> None:
    """The measured part: exactly the pipeline's driver code after the encode phase."""
    from nulls_megatron.sinks.assignment import SinkAssignment

    out = work.parent
    t0 = time.perf_counter()
    chunks = chunk_list(n_chunks)
    docs = gather_documents(chunks, work)
    t1 = time.perf_counter()
    plan = plan_sources(docs, None, shard_bytes, 2)
    t2 = time.perf_counter()
    write_sources(out, docs, ChunkDocs(chunks, work, docs), plan, None)
    t3 = time.perf_counter()
    del docs
    back = read_manifest(out / MANIFEST_NAME, columns=["source_index", "n_tokens"])
    ids, tokens = back["source_index"].to_numpy(), back["n_tokens"].to_numpy()
    pool_shard = SinkAssignment(n_pool=7692, sinks_per_source=100, n_shards=4).shard_of_np(ids)
    per_shard = np.bincount(pool_shard, weights=tokens, minlength=4)
    t4 = time.perf_counter()
    n = plan["n_sources"]
    print(f"gather chunk metadata {t1 - t0:.1f} s; number {n:,} sources ({len(plan['source_index']) - n:,} duplicates "
          f"skipped) + plan {int(plan['shard'][-1]) + 1} shards of {shard_bytes >> 20} MiB {t2 - t1:.1f} s")
    print(f"manifest.parquet ({(out / MANIFEST_NAME).stat().st_size / 2**20:.0f} MiB) + title index {t3 - t2:.1f} s")
    print(f"sink-assignment inputs (ids + token counts read back, pool shard of each) {t4 - t3:.1f} s; "
          f"tokens per pool shard max/min {per_shard.max() / per_shard.min():.4f}")
    m, rng = Manifest(out), np.random.default_rng(1)
    picks = [int(i) for i in rng.integers(0, n, 200)]
    titles = [m.row(i, ["title"])["title"] for i in picks]
    t = time.perf_counter()
    found = sum(i in m.lookup_title(title) for i, title in zip(picks, titles))
    lookup_ms = (time.perf_counter() - t) / len(picks) * 1e3
    assert found == len(picks), f"only {found}/{len(picks)} titles found"
    print(f"title lookup {lookup_ms:.1f} ms per title ({len(picks)} random titles, all found)")
    print(f"DRIVER seconds={t4 - t0:.1f} peak_rss_gb={peak_rss_gb():.2f} lookup_ms={lookup_ms:.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", type=int, default=6_407_814)
    p.add_argument("--chunks", type=int, default=320, help="encode tasks (64 MiB of bz2 each for the real dump)")
    p.add_argument("--shard-bytes", type=int, default=64 << 20)
    p.add_argument("--driver", default=None, help=argparse.SUPPRESS)  # internal: run the measured part
    args = p.parse_args()
    if args.driver:
        driver(Path(args.driver), args.chunks, args.shard_bytes)
        return
    tmp = Path(tempfile.mkdtemp(prefix="manifest_scale_"))
    try:
        t = time.perf_counter()
        hash_s = write_synthetic_chunks(tmp / "work", args.sources, args.chunks, seed=0)
        print(f"wrote {args.chunks} chunk metadata files for {args.sources:,} documents in {time.perf_counter() - t:.1f} s "
              f"(not measured); title hashing {hash_s:.1f} s on one core (in the pipeline: inside the Ray tasks)")
        child = subprocess.run([sys.executable, __file__, "--driver", str(tmp / "work"), "--chunks", str(args.chunks),
                                "--shard-bytes", str(args.shard_bytes)], capture_output=True, text=True)
        print(child.stdout, end="")
        if child.returncode:
            sys.exit(child.stderr)
        result = dict(kv.split("=") for kv in child.stdout.strip().splitlines()[-1].split()[1:])
        print(f"RESULT manifest_6m_seconds={result['seconds']} peak_rss_gb={result['peak_rss_gb']} "
              f"title_lookup_ms={result['lookup_ms']} title_hash_seconds={hash_s:.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
