"""Benchmark: throughput of the Ray prep pipeline on the shared real text, in one run, against
  (a) a single-process loop doing the same parse + clean + encode + shard writing, and
  (b) raw sentencepiece encoding of the same cleaned text with as many threads as Ray workers (the ceiling).

All three use one tokenizer, trained first (not timed). The Ray session is started and its workers
warmed (imports done) before timing, as on a running cluster; the pipeline run then includes everything
else: planning, per-chunk tasks, numbering, shard tasks, manifest, report.

    python benchmarks/data_prep.py [--config configs/prep_shared_corpus.yaml] [--workers 2]

Last line: ``RESULT ray_vs_single=<docs/s ratio> fraction_of_encode_ceiling=<ray tokens/s / ceiling tokens/s>``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from data_prep.config import load_prep_config  # noqa: E402
from data_prep.documents import SkipReport  # noqa: E402
from data_prep.readers import InputSpec, plan_chunks, read_chunk  # noqa: E402
from data_prep.shards import estimate_sample_bytes, plan_shards, shard_name, write_shard  # noqa: E402
from data_prep.tokenizer import encode_texts, processor, token_dtype, train_tokenizer, training_lines  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _warm() -> int:
    import data_prep.tasks  # noqa: F401  the modules a worker imports for its first task
    import webdataset  # noqa: F401

    return os.getpid()


def single_process(specs: list[InputSpec], chunk_bytes: int, model: bytes, target: int, out: Path) -> tuple[int, int]:
    """The plain loop: read + clean, skip repeated keys, encode each chunk in one call, write shards."""
    sp, dtype = processor(model), token_dtype(processor(model).get_piece_size())
    seen: set[str] = set()
    docs: list[tuple[str, str]] = []
    tokens: list[np.ndarray] = []
    for chunk in plan_chunks(specs, chunk_bytes):
        batch = [d for d in read_chunk(chunk, SkipReport()) if not (d.key in seen or seen.add(d.key))]
        flat, lengths = encode_texts(sp, [d.text for d in batch], dtype)
        tokens += np.split(flat, np.cumsum(lengths)[:-1]) if len(batch) else []
        docs += [(d.title, d.key) for d in batch]
    shard = plan_shards(estimate_sample_bytes(np.array([len(t) for t in tokens]), dtype.itemsize), target)
    (out / "shards").mkdir(parents=True)
    bounds = np.searchsorted(shard, np.arange(int(shard[-1]) + 2))
    for s in range(int(shard[-1]) + 1):
        a, b = int(bounds[s]), int(bounds[s + 1])
        write_shard(out / "shards" / shard_name(s), s, ((i, tokens[i], *docs[i]) for i in range(a, b)))
    return len(docs), sum(len(t) for t in tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "prep_shared_corpus.yaml"))
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    tmp = Path(tempfile.mkdtemp(prefix="bench_prep_"))
    try:
        cfg = load_prep_config(args.config, [f"ray.num_cpus={args.workers}"], output_dir=str(tmp / "ray"))
        specs = [InputSpec(path=s.path, format=s.format, group=s.group, index_path=s.index_path,
                       max_chars=s.max_chars or cfg.max_chars) for s in cfg.inputs]
        chunks = plan_chunks(specs, cfg.chunk_bytes)
        texts = [d.text for c in chunks for d in read_chunk(c, SkipReport())]
        model = train_tokenizer(list(training_lines(texts, cfg.tokenizer.sample_chars)), cfg.tokenizer)
        (tmp / "tokenizer.model").write_bytes(model)
        cfg.tokenizer.model_path = str(tmp / "tokenizer.model")
        print(f"corpus: {len(cfg.inputs)} inputs, {len(chunks)} chunks, {len(texts):,} documents, "
              f"{sum(map(len, texts)) / 1e6:.1f} M chars; tokenizer vocab {cfg.tokenizer.vocab_size}")

        import ray

        from data_prep.pipeline import run_prep

        ray.init(address="local", num_cpus=args.workers, include_dashboard=False)
        warm = ray.remote(_warm)
        pids = set()
        while len(pids) < args.workers:  # every worker process imported what the tasks need
            pids |= set(ray.get([warm.remote() for _ in range(4 * args.workers)]))
        t = time.perf_counter()
        summary = run_prep(cfg, progress=False)
        ray_s = time.perf_counter() - t
        ray.shutdown()
        docs, toks = summary["documents"], summary["tokens"]
        print(f"ray pipeline ({args.workers} workers): {ray_s:.2f} s, {docs / ray_s:,.0f} docs/s, {toks / ray_s:,.0f} tokens/s "
              f"({summary['shards']} shards)")

        _warm()
        t = time.perf_counter()
        docs1, toks1 = single_process(specs, cfg.chunk_bytes, model, cfg.shards.target_bytes, tmp / "single")
        single_s = time.perf_counter() - t
        assert (docs1, toks1) == (docs, toks), f"single process made {docs1} docs / {toks1} tokens, Ray {docs} / {toks}"
        print(f"single process: {single_s:.2f} s, {docs1 / single_s:,.0f} docs/s, {toks1 / single_s:,.0f} tokens/s")

        sp = processor(model)
        t = time.perf_counter()
        n = sum(len(ids) for ids in sp.encode(texts, num_threads=args.workers))
        enc_s = time.perf_counter() - t
        print(f"raw sentencepiece encode ({args.workers} threads, text in memory): {enc_s:.2f} s, "
              f"{len(texts) / enc_s:,.0f} docs/s, {n / enc_s:,.0f} tokens/s")
        same = all((tmp / "ray" / "shards" / f.name).read_bytes() == f.read_bytes() for f in (tmp / "single" / "shards").iterdir())
        print(f"single-process shards byte-identical to the pipeline's: {same}")
        print(f"RESULT ray_vs_single={single_s / ray_s:.2f} fraction_of_encode_ceiling={(toks / ray_s) / (n / enc_s):.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
