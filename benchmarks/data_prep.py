"""Benchmark: throughput of the Ray prep pipeline on the shared real text against
  (a) a single-process loop doing the same parse + clean + encode + shard writing (the baseline), and
  (b) raw sentencepiece encoding of the same cleaned text with as many threads as Ray workers (the ceiling).

The input is the shared corpus (configs/prep_shared_corpus.yaml) with its 3,899 Wikipedia articles written
``--copies`` times (each copy with its own page ids and titles, so every copy is a source of its own): ~45 M
characters at the default 3, long enough that a second of noise does not move the ratio much. The three
measurements are interleaved, ``--repeats`` times, in an order that rotates every repeat (so drift of a
shared machine hits all three alike); the figures are medians, and the per-repeat ratios give the spread.

All three use one tokenizer, trained first (not timed). The Ray session is started and its workers
warmed (imports done) before timing, as on a running cluster; each pipeline run then includes everything
else: planning, per-chunk tasks, numbering, shard tasks, manifest, report. The pipeline's own phase
clock (``run_prep``'s ``phase_seconds``) and the baseline's split into encode and shard writing show
where the workers lose against 2x.

    python benchmarks/data_prep.py [--copies 3] [--repeats 3] [--workers 2]
    python benchmarks/data_prep.py --quick      # one copy, one repeat: a smoke run

Last line: ``RESULT ray_vs_single=<median docs/s ratio> fraction_of_encode_ceiling=<Ray tokens/s / ceiling>``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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
COPY_ID_STRIDE = 10**9  # page ids of copy c are the originals + c * stride: far above any real id


def _warm() -> int:
    import data_prep.tasks  # noqa: F401  the modules a worker imports for its first task
    import webdataset  # noqa: F401

    return os.getpid()


def write_copies(source: Path, target: Path, copies: int) -> int:
    """The JSONL articles ``copies`` times; copy c > 0 gets new ids, urls and titles (" (copy c)"). Returns lines."""
    lines = source.read_text(encoding="utf-8").splitlines()
    with open(target, "w", encoding="utf-8") as out:
        for c in range(copies):
            for line in lines:
                obj = json.loads(line)
                if c:
                    obj["id"] = str(int(obj["id"]) + c * COPY_ID_STRIDE)
                    obj["title"] = f"{obj['title']} (copy {c})"
                    obj["url"] = f"{obj.get('url', '')}#copy{c}"
                out.write(json.dumps(obj, ensure_ascii=False) + "\n")
    return copies * len(lines)


def single_process(specs: list[InputSpec], chunk_bytes: int, model: bytes, target: int, out: Path) -> dict:
    """The plain loop: read + clean, skip repeated keys, encode each chunk in one call, write shards."""
    started = time.perf_counter()
    sp, dtype = processor(model), token_dtype(processor(model).get_piece_size())
    seen: set[str] = set()
    docs: list[tuple[str, str]] = []
    tokens: list[np.ndarray] = []
    for chunk in plan_chunks(specs, chunk_bytes):
        batch = [d for d in read_chunk(chunk, SkipReport()) if not (d.key in seen or seen.add(d.key))]
        flat, lengths = encode_texts(sp, [d.text for d in batch], dtype)
        tokens += np.split(flat, np.cumsum(lengths)[:-1]) if len(batch) else []
        docs += [(d.title, d.key) for d in batch]
    encoded = time.perf_counter()
    shard = plan_shards(estimate_sample_bytes(np.array([len(t) for t in tokens]), dtype.itemsize), target)
    (out / "shards").mkdir(parents=True)
    bounds = np.searchsorted(shard, np.arange(int(shard[-1]) + 2))
    for s in range(int(shard[-1]) + 1):
        a, b = int(bounds[s]), int(bounds[s + 1])
        write_shard(out / "shards" / shard_name(s), s, ((i, tokens[i], *docs[i]) for i in range(a, b)))
    done = time.perf_counter()
    return {"seconds": done - started, "encode": encoded - started, "shards": done - encoded,
            "documents": len(docs), "tokens": sum(len(t) for t in tokens)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "prep_shared_corpus.yaml"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--copies", type=int, default=3, help="times the JSONL articles are written into the input")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the three measurements")
    p.add_argument("--quick", action="store_true", help="--copies 1 --repeats 1")
    args = p.parse_args()
    if args.quick:
        args.copies, args.repeats = 1, 1
    if args.copies < 1 or args.repeats < 1:
        p.error("--copies and --repeats must be at least 1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    tmp = Path(tempfile.mkdtemp(prefix="bench_prep_"))
    try:
        cfg = load_prep_config(args.config, [f"ray.num_cpus={args.workers}"], output_dir=str(tmp / "ray"))
        jsonl = [s for s in cfg.inputs if s.format == "jsonl"]
        if args.copies > 1 and jsonl:
            n = write_copies(Path(jsonl[0].path), tmp / "articles_copies.jsonl", args.copies)
            jsonl[0].path = str(tmp / "articles_copies.jsonl")
            print(f"input: {Path(args.config).name} with its JSONL articles written {args.copies} times ({n:,} lines)")
        specs = [InputSpec(path=s.path, format=s.format, group=s.group, index_path=s.index_path,
                           max_chars=s.max_chars or cfg.max_chars) for s in cfg.inputs]
        chunks = plan_chunks(specs, cfg.chunk_bytes)
        texts = [d.text for c in chunks for d in read_chunk(c, SkipReport())]
        model = train_tokenizer(list(training_lines(texts, cfg.tokenizer.sample_chars)), cfg.tokenizer)
        (tmp / "tokenizer.model").write_bytes(model)
        cfg.tokenizer.model_path = str(tmp / "tokenizer.model")
        print(f"corpus: {len(cfg.inputs)} inputs, {len(chunks)} chunks, {len(texts):,} documents, "
              f"{sum(map(len, texts)) / 1e6:.1f} M chars; tokenizer vocab {cfg.tokenizer.vocab_size}; "
              f"{args.workers} workers, {args.repeats} interleaved repeats")

        import ray

        from data_prep.pipeline import run_prep

        ray.init(address="local", num_cpus=args.workers, include_dashboard=False)
        warm = ray.remote(_warm)
        pids = set()
        while len(pids) < args.workers:  # every worker process imported what the tasks need
            pids |= set(ray.get([warm.remote() for _ in range(4 * args.workers)]))
        _warm()
        sp = processor(model)

        def run_ray(r: int) -> dict:
            cfg.output_dir = str(tmp / f"ray{r}")
            t = time.perf_counter()
            summary = run_prep(cfg, progress=False)
            return {**summary, "seconds": time.perf_counter() - t}

        def run_single(r: int) -> dict:
            return single_process(specs, cfg.chunk_bytes, model, cfg.shards.target_bytes, tmp / f"single{r}")

        def run_ceiling(r: int) -> dict:
            t = time.perf_counter()
            n = sum(len(ids) for ids in sp.encode(texts, num_threads=args.workers))
            return {"seconds": time.perf_counter() - t, "tokens": n}

        kinds = {"ray": run_ray, "single": run_single, "ceiling": run_ceiling}
        runs: dict[str, list[dict]] = {k: [] for k in kinds}
        order = list(kinds)
        for r in range(args.repeats):
            for kind in order[r % 3:] + order[:r % 3]:
                runs[kind].append(kinds[kind](r))
            ray_r, single_r = runs["ray"][-1], runs["single"][-1]
            assert (single_r["documents"], single_r["tokens"]) == (ray_r["documents"], ray_r["tokens"]), \
                f"single process made {single_r['documents']} docs / {single_r['tokens']} tokens, Ray {ray_r['documents']} / {ray_r['tokens']}"
            same = all((tmp / f"ray{r}" / "shards" / f.name).read_bytes() == f.read_bytes()
                       for f in (tmp / f"single{r}" / "shards").iterdir())
            assert same, "the single-process shards differ from the pipeline's"
            ph = ray_r["phase_seconds"]
            print(f"repeat {r + 1}: Ray {ray_r['seconds']:.2f} s (encode {ph['encode']:.2f}, shards {ph['shards']:.2f}), single {single_r['seconds']:.2f} s, "
                  f"ceiling {runs['ceiling'][-1]['seconds']:.2f} s -> ray_vs_single {single_r['seconds'] / ray_r['seconds']:.2f} "
                  f"(shards byte-identical: {same})", flush=True)
            shutil.rmtree(tmp / f"ray{r}")
            shutil.rmtree(tmp / f"single{r}")
        ray.shutdown()

        docs, toks = runs["ray"][0]["documents"], runs["ray"][0]["tokens"]
        ray_s = statistics.median([x["seconds"] for x in runs["ray"]])
        single_s = statistics.median([x["seconds"] for x in runs["single"]])
        enc_s = statistics.median([x["seconds"] for x in runs["ceiling"]])
        ceiling_tokens = runs["ceiling"][0]["tokens"]
        ratios = [s["seconds"] / r["seconds"] for s, r in zip(runs["single"], runs["ray"])]
        print(f"\nmedians over {args.repeats} repeats ({docs:,} documents, {toks:,} tokens, {runs['ray'][0]['shards']} shards):")
        print(f"  Ray pipeline ({args.workers} workers): {ray_s:6.2f} s  {docs / ray_s:8,.0f} docs/s  {toks / ray_s:11,.0f} tokens/s")
        print(f"  single process:             {single_s:6.2f} s  {docs / single_s:8,.0f} docs/s  {toks / single_s:11,.0f} tokens/s")
        print(f"  raw encode ({args.workers} threads, ceiling): {enc_s:6.2f} s  {len(texts) / enc_s:8,.0f} docs/s  "
              f"{ceiling_tokens / enc_s:11,.0f} tokens/s")
        print(f"  ray_vs_single per repeat: {', '.join(f'{x:.2f}' for x in ratios)} (min {min(ratios):.2f}, max {max(ratios):.2f})")

        phases = {k: statistics.median([x["phase_seconds"][k] for x in runs["ray"]]) for k in runs["ray"][0]["phase_seconds"]}
        single_encode = statistics.median([x["encode"] for x in runs["single"]])
        single_shards = statistics.median([x["shards"] for x in runs["single"]])
        ideal = single_s / args.workers
        print(f"\nwhere the {args.workers} workers lose against {args.workers}x (ideal {ideal:.2f} s = single / {args.workers}):")
        print(f"  encode: {phases['encode']:.2f} s against {single_encode / args.workers:.2f} s ideal "
              f"(parallel efficiency {single_encode / (args.workers * phases['encode']):.2f})")
        print(f"  shards: {phases['shards']:.2f} s against {single_shards / args.workers:.2f} s ideal "
              f"(parallel efficiency {single_shards / (args.workers * phases['shards']):.2f})")
        serial = sum(v for k, v in phases.items() if k not in ("encode", "shards"))
        print(f"  driver's serial phases (the baseline has none of the manifest, title index or report): {serial:.2f} s ("
              + ", ".join(f"{k} {v:.2f}" for k, v in phases.items() if k not in ("encode", "shards")) + ")")
        print(f"RESULT ray_vs_single={single_s / ray_s:.2f} fraction_of_encode_ceiling={(toks / ray_s) / (ceiling_tokens / enc_s):.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
