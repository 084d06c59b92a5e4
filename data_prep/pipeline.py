"""The prep job: inputs -> tokenizer -> per-chunk tokens (Ray tasks) -> manifest -> shards (Ray tasks).

Phases (each resumable, see data_prep/tasks.py for the done-markers):
  0. plan: ``plan_chunks`` splits the inputs into chunks (the driver, cheap).
  1. tokenizer: reuse ``tokenizer.model_path``, or read a sample from chunks spread over the corpus
     (one Ray task each) and train sentencepiece on the driver.
  2. encode: one Ray task per chunk: read + clean -> encode -> ``work/chunks/<chunk>.*``.
  3. number: the driver reads the per-chunk metadata in (input, chunk) order, numbers the sources
     (data_prep/manifest.py) and cuts the sources, in index order, into shards of the target size.
  4. shards: one Ray task per shard copies its documents' tokens into a webdataset tar.
  5. finish: shard_index.json, manifest.parquet + title index, prep_report.json; work/ is removed.
An input that yields no document (an empty file, every record skipped) stops the run before phase 4
with an InputError naming it and its skip counts: nothing is written that reads as a finished output.
Every byte written depends only on the inputs and the config, never on the number of workers, the
order in which tasks finish, or where a previous run was killed.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from data_prep import tasks
from data_prep.config import PrepConfig
from data_prep.documents import Chunk, InputError, SkipReport
from data_prep.manifest import (MANIFEST_NAME, duplicate_reason, number_sources, read_manifest, title_hashes,
                                write_manifest, write_title_index)
from data_prep.ray_session import connect_ray
from data_prep.readers import InputSpec, input_bytes, plan_chunks, read_chunk
from data_prep.shards import (SHARD_DIR, SHARD_INDEX_NAME, ShardInfo, estimate_sample_bytes, plan_shards,
                              shard_index_json, shard_name)
from data_prep.tokenizer import card_json, sha256, token_dtype, tokenizer_card, train_tokenizer
from data_prep.tokenizer import processor as load_processor

REPORT_NAME = "prep_report.json"
_TRASH = ".work-deleting"
_EXAMPLES = 3  # skipped records quoted per input in the "yields no document" error

_encode_task = ray.remote(tasks.encode_chunk)
_sample_task = ray.remote(tasks.sample_chunk)
_shard_task = ray.remote(tasks.write_shard_unit)


def _bar(progress: bool, **kw) -> tqdm:
    return tqdm(disable=not progress, dynamic_ncols=True, mininterval=0.5, **kw)


def _wait_all(refs: dict, bar: tqdm, on_done) -> None:
    """Collect task results as they finish (any order: results are placed by key, not by arrival)."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        on_done(refs[ready[0]], ray.get(ready[0]))
        bar.refresh()


def _scan_chunk(chunk: Chunk) -> tuple[int, SkipReport]:
    """Documents and skipped records of one chunk, read without encoding (only to explain an empty
    tokenizer sample: the encode phase, which normally counts them, needs a tokenizer)."""
    report = SkipReport(max_entries=_EXAMPLES)
    return sum(1 for _ in read_chunk(chunk, report)), report


_scan_task = ray.remote(_scan_chunk)


def _count_skips(counts: dict[str, int]) -> str:
    """"bad_json 2, missing_field 1": most frequent reason first, then by name (stable output)."""
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def check_inputs_yield(specs: list[InputSpec], documents: list[int], reports: list[SkipReport]) -> None:
    """Raise an InputError naming every input that yields no document (``documents[i]``: its documents
    kept; ``reports[i]``: its skipped records, duplicates included), with why: no record at all, or
    every record skipped, with the counts per reason and the first skipped records.

    A run that carries on would write no shard for the input (or, with no document at all, a shard
    index naming a shard that does not exist): the mistake (a wrong format, a wrong file, a cut-off
    download) would surface only when training, or never."""
    problems: list[str] = []
    for i, (spec, kept, report) in enumerate(zip(specs, documents, reports)):
        if kept:
            continue
        where = f"inputs[{i}] {spec.path}"
        if report.total() == 0:
            path = Path(spec.path)
            empty = path.is_file() and path.stat().st_size == 0
            why = "it is an empty file" if empty else f"no record was read from it (format {spec.format!r})"
            problems.append(f"{where}: yields no document: {why}")
            continue
        examples = "; ".join(f"{file} {record} ({why})" for file, record, why in report.entries[:_EXAMPLES])
        problems.append(f"{where}: yields no document: all {report.total()} of its records were skipped "
                        f"({_count_skips(report.counts())}); first: {examples}")
    if problems:
        head = "an input yields no document" if len(problems) == 1 else f"{len(problems)} inputs yield no document"
        raise InputError(f"{head} (fix or remove it; nothing was written as a finished output):\n  " + "\n  ".join(problems))


def _explain_empty_sample(specs: list[InputSpec], chunks: list[Chunk], sampled: int) -> None:
    """The tokenizer sample is empty: name the inputs that yield no document (a Ray task per chunk reads
    it once more, counting its skips), or say that the sampled chunks happen to hold none."""
    reports = [SkipReport(max_entries=_EXAMPLES) for _ in specs]
    documents = [0] * len(specs)
    refs = [_scan_task.remote(c) for c in chunks]
    for chunk, ref in zip(chunks, refs):
        n, report = ray.get(ref)
        documents[chunk.input_index] += n
        reports[chunk.input_index].merge(report)
    check_inputs_yield(specs, documents, reports)
    raise ValueError(f"tokenizer: the training sample from {sampled} of {len(chunks)} chunks is empty although the "
                     "inputs hold documents; raise tokenizer.sample_chunks")


def _tokenizer(cfg: PrepConfig, specs: list[InputSpec], chunks: list[Chunk], out: Path, work: Path, progress: bool) -> bytes:
    t = cfg.tokenizer
    if t.model_path is not None:
        model = Path(t.model_path).read_bytes()
        load_processor(model)  # fail here, naming nothing half-written, if it is not a model
        card = tokenizer_card(model, t, None, None)
    else:
        picks = sorted({(i * len(chunks)) // min(t.sample_chunks, len(chunks)) for i in range(min(t.sample_chunks, len(chunks)))})
        settings = {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(t).items()}
        fingerprint = tasks.digest(tasks.FORMAT_VERSION, settings, [asdict(chunks[i]) for i in picks])
        marker = work / "tokenizer.done.json"
        try:
            done = json.loads(marker.read_text())
            model = (out / "tokenizer.model").read_bytes()
            if done["fingerprint"] == fingerprint and done["model_sha256"] == sha256(model):
                return model
        except (OSError, ValueError, KeyError):
            pass
        budget = max(1, t.sample_chars // len(picks))
        parts: dict[int, list[str]] = {}
        with _bar(progress, total=len(picks), desc="tokenizer sample", unit="chunk") as bar:
            refs = {_sample_task.remote(chunks[i], budget): i for i in picks}
            _wait_all(refs, bar, lambda i, lines: (parts.__setitem__(i, lines), bar.update(1)))
        lines = [line for i in picks for line in parts[i]]
        if not lines:
            _explain_empty_sample(specs, chunks, len(picks))
        started = time.perf_counter()
        model = train_tokenizer(lines, t)
        if progress:
            print(f"tokenizer: trained {t.model_type.value} vocab {t.vocab_size} on {sum(map(len, lines)):,} chars "
                  f"in {time.perf_counter() - started:.1f} s", flush=True)
        card = tokenizer_card(model, t, sha256("\n".join(lines).encode("utf-8")), sum(map(len, lines)))
    tasks.replace_bytes(out / "tokenizer.model", model)
    tasks.replace_bytes(out / "tokenizer.json", card_json(card))
    if t.model_path is None:
        work.mkdir(parents=True, exist_ok=True)
        tasks.replace_bytes(marker, json.dumps({"fingerprint": fingerprint, "model_sha256": sha256(model)}).encode())
    return model


def largest_first(chunks: list[Chunk], todo: list[int]) -> list[int]:
    """The chunks to encode in the order they are handed to Ray: largest input first (ties in chunk
    order). Longest-processing-time-first scheduling: the tasks still starting when the others end are
    the short ones, so the workers finish together instead of one finishing a large chunk (a book,
    slow to clean) alone. Results are placed by chunk, so the order changes no byte of the output."""
    sizes = input_bytes([chunks[i] for i in todo])
    return [todo[j] for j in sorted(range(len(todo)), key=lambda j: (-sizes[j], j))]


def _encode(chunks: list[Chunk], model: bytes, dtype: str, work: Path, progress: bool) -> list[tasks.ChunkResult]:
    sha = sha256(model)
    fps = [tasks.chunk_fingerprint(c, sha, dtype) for c in chunks]
    results = [tasks.load_chunk_done(work, tasks.chunk_name(c), fp) for c, fp in zip(chunks, fps)]
    todo = [i for i, r in enumerate(results) if r is None]
    model_ref = ray.put(model)
    started, new_tokens = time.perf_counter(), 0
    with _bar(progress, desc="encode", unit="doc", unit_scale=True,
              initial=sum(r.documents for r in results if r is not None)) as bar:
        def done(i: int, result: tasks.ChunkResult) -> None:
            nonlocal new_tokens
            results[i] = result
            new_tokens += result.tokens
            bar.update(result.documents)
            rate = new_tokens / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix_str(f"chunks {sum(r is not None for r in results)}/{len(chunks)}, {rate:,.0f} tok/s", refresh=False)

        refs = {_encode_task.remote(chunks[i], model_ref, dtype, str(work), fps[i]): i for i in largest_first(chunks, todo)}
        _wait_all(refs, bar, done)
    return results


_NUMBERING_COLUMNS = ["key", "n_tokens", "title_hash"]


def gather_documents(chunks: list[Chunk], work: Path) -> pa.Table:
    """The columns numbering needs, for every document of the run in (input, chunk, position) order,
    with where its tokens are. Titles and urls stay on disk (ChunkDocs): at 6.4M documents they are
    ~0.5 GB the driver does not need to hold."""
    tables = []
    for cid, chunk in enumerate(chunks):
        t = pq.read_table(tasks.chunk_paths(work, tasks.chunk_name(chunk))[1], columns=_NUMBERING_COLUMNS)
        n = t.num_rows
        t = t.append_column("chunk_id", pa.array(np.full(n, cid, np.int32)))
        tables.append(t.append_column("row", pa.array(np.arange(n, dtype=np.int64))))
    if not tables:
        raise ValueError("the inputs produced no chunk of work")
    return pa.concat_tables(tables)


class ChunkDocs:
    """``fetch_docs`` for write_manifest: manifest columns of documents by global row, read from the
    per-chunk files (rows come ascending, so each file is read about once; a few are cached)."""

    def __init__(self, chunks: list[Chunk], work: Path, docs: pa.Table) -> None:
        self.chunks, self.work = chunks, work
        counts = np.bincount(docs["chunk_id"].to_numpy(), minlength=len(chunks))
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.cache: dict[int, pa.Table] = {}

    def _table(self, cid: int) -> pa.Table:
        if cid not in self.cache:
            if len(self.cache) >= 8:
                self.cache.pop(next(iter(self.cache)))
            t = pq.read_table(tasks.chunk_paths(self.work, tasks.chunk_name(self.chunks[cid]))[1],
                              columns=["key", "title", "page_id", "url", "group"])
            self.cache[cid] = t.append_column("input_index", pa.array(np.full(t.num_rows, self.chunks[cid].input_index, np.int32)))
        return self.cache[cid]

    def __call__(self, rows: np.ndarray) -> pa.Table:
        cids = np.searchsorted(self.starts, rows, side="right") - 1
        parts = []
        for cid in np.unique(cids):
            local = rows[cids == cid] - self.starts[cid]
            parts.append(self._table(int(cid)).take(pa.array(local)))
        return pa.concat_tables(parts)


def _report_duplicates(report: SkipReport, docs: pa.Table, source_index: np.ndarray, chunks: list[Chunk], work: Path,
                       per_input: list[SkipReport]) -> None:
    dup = np.flatnonzero(source_index < 0)
    if not len(dup):
        return
    cids, rows, keys = docs["chunk_id"].to_numpy()[dup], docs["row"].to_numpy()[dup], docs["key"].take(pa.array(dup)).to_pylist()
    origins: dict[int, list] = {}
    for cid, row, key in zip(cids.tolist(), rows.tolist(), keys):
        if cid not in origins:  # origins are long strings: read them only for chunks that have duplicates
            origins[cid] = pq.read_table(tasks.chunk_paths(work, tasks.chunk_name(chunks[cid]))[1], columns=["origin"])["origin"].to_pylist()
        path, origin = chunks[cid].path, origins[cid][row]  # origin: "<file>:<record>"
        record = origin[len(path) + 1:] if origin.startswith(path + ":") else origin
        report.skip(path, record, duplicate_reason(key))
        per_input[chunks[cid].input_index].skip(path, record, duplicate_reason(key))


def _write_shards(plan: dict, chunks: list[Chunk], results: list[tasks.ChunkResult], dtype: str, work: Path,
                  shards_dir: Path, progress: bool) -> list[ShardInfo]:
    src, cid, row, shard_of = plan["sources"], plan["chunk_ids"], plan["rows"], plan["shard"]
    n_shards = int(shard_of[-1]) + 1 if len(shard_of) else 0
    bounds = np.searchsorted(shard_of, np.arange(n_shards + 1))
    names = [tasks.chunk_name(c) for c in chunks]
    fps = [r.fingerprint for r in results]
    infos: list[ShardInfo | None] = [None] * n_shards
    refs = {}
    shards_dir.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        a, b = bounds[s], bounds[s + 1]
        fp = tasks.shard_fingerprint(s, src[a:b], cid[a:b], row[a:b], names, fps)
        infos[s] = tasks.load_shard_done(work, shards_dir, s, shard_name(s), fp)
        if infos[s] is None:
            refs[_shard_task.remote(s, shard_name(s), src[a:b], cid[a:b], row[a:b], names, dtype, str(work),
                                    str(shards_dir), fp)] = s
    with _bar(progress, total=n_shards, initial=n_shards - len(refs), desc="shards", unit="shard") as bar:
        _wait_all(refs, bar, lambda s, info: (infos.__setitem__(s, info), bar.update(1)))
    keep = {shard_name(s) for s in range(n_shards)}
    for stale in shards_dir.iterdir():  # shards of an earlier, larger plan, and temp files of killed writers
        if stale.name not in keep:
            stale.unlink()
    return infos


def _remove_work(out: Path) -> None:
    # Rename first: a run killed while deleting must not find half a work folder with valid markers.
    trash = out / _TRASH
    if (out / "work").exists():
        os.replace(out / "work", trash)
    shutil.rmtree(trash, ignore_errors=True)


def plan_sources(docs: pa.Table, base: pa.Table | None, target_bytes: int, itemsize: int) -> dict:
    """Number the run's documents (manifest rule) and cut the present sources, in index order, into shards."""
    source_index, n_sources = number_sources(docs["key"], None if base is None else base["key"])
    rows = np.flatnonzero(source_index >= 0)
    rows = rows[np.argsort(source_index[rows], kind="stable")]
    n_tokens = docs["n_tokens"].to_numpy()
    shard = plan_shards(estimate_sample_bytes(n_tokens[rows], itemsize), target_bytes)
    sources = source_index[rows].astype(np.uint32)
    shard_of_source = np.full(n_sources, -1, np.int64)
    shard_of_source[sources] = shard
    return {"source_index": source_index, "n_sources": n_sources, "doc_rows": rows, "sources": sources,
            "chunk_ids": docs["chunk_id"].to_numpy()[rows], "rows": docs["row"].to_numpy()[rows], "shard": shard,
            "shard_of_source": shard_of_source, "n_tokens": n_tokens}


def write_sources(out: Path, docs: pa.Table, fetch_docs, plan: dict, base: pa.Table | None) -> int:
    """manifest.parquet and the title index; returns the number of base sources absent from this run."""
    hashes = np.zeros(plan["n_sources"], np.uint64)
    hashes[plan["sources"]] = docs["title_hash"].to_numpy()[plan["doc_rows"]]
    present = write_manifest(out / MANIFEST_NAME, fetch_docs, plan["source_index"], plan["n_sources"], base,
                             plan["n_tokens"], plan["shard_of_source"])
    absent = np.flatnonzero(~present)  # base sources this run lacks: hash their base titles
    hashes[absent] = title_hashes(base["title"].take(pa.array(absent)).to_pylist() if len(absent) else [])
    write_title_index(out, hashes)
    return len(absent)


class _PhaseClock:
    """Wall seconds per phase of one run (returned in the summary; not in prep_report.json, which must
    not depend on the machine or on how the run got there)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self._last, 3)
        self._last = now


def run_prep(cfg: PrepConfig, progress: bool = True) -> dict:
    """Run (or resume) the prep job described by a resolved config; returns the run's summary."""
    out = Path(cfg.output_dir)
    work = out / "work"
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / _TRASH, ignore_errors=True)
    for tmp in out.glob("*.tmp"):
        tmp.unlink()
    base_path = Path(cfg.base_manifest) if cfg.base_manifest else out / MANIFEST_NAME
    base = read_manifest(base_path) if base_path.is_file() else None
    specs = [InputSpec(path=s.path, format=s.format, group=s.group, index_path=s.index_path,
                       max_chars=s.max_chars or cfg.max_chars) for s in cfg.inputs]
    clock = _PhaseClock()
    chunks = plan_chunks(specs, cfg.chunk_bytes)
    if not chunks:  # no reader found any work: every input is empty, and no Ray is needed to say so
        check_inputs_yield(specs, [0] * len(specs), [SkipReport() for _ in specs])
    started_ray = connect_ray(cfg.ray)
    try:
        clock.lap("start")
        model = _tokenizer(cfg, specs, chunks, out, work, progress)
        clock.lap("tokenizer")
        dtype = token_dtype(load_processor(model).get_piece_size()).name
        results = _encode(chunks, model, dtype, work, progress)
        clock.lap("encode")
        docs = gather_documents(chunks, work)
        plan = plan_sources(docs, base, cfg.shards.target_bytes, np.dtype(dtype).itemsize)
        report = SkipReport()
        per_input = [SkipReport(max_entries=_EXAMPLES) for _ in specs]
        for c, r in zip(chunks, results):  # chunk order, so the report's entries are in a reproducible order
            report.merge(r.report)
            per_input[c.input_index].merge(r.report)
        _report_duplicates(report, docs, plan["source_index"], chunks, work, per_input)
        input_of_chunk = np.array([c.input_index for c in chunks], np.int64)
        kept = input_of_chunk[docs["chunk_id"].to_numpy()[plan["source_index"] >= 0]]
        # Before any shard is written: a failed run leaves no shard, shard index, manifest or report.
        check_inputs_yield(specs, np.bincount(kept, minlength=len(specs)).tolist(), per_input)
        clock.lap("number")
        infos = _write_shards(plan, chunks, results, dtype, work, out / SHARD_DIR, progress)
        clock.lap("shards")
        tasks.replace_bytes(out / SHARD_INDEX_NAME, shard_index_json(infos, dtype, sha256(model)))
        absent = write_sources(out, docs, ChunkDocs(chunks, work, docs), plan, base)
        summary = {
            "chunks": len(chunks), "documents": len(plan["sources"]), "sources": plan["n_sources"],
            "absent_sources": absent, "tokens": sum(i.tokens for i in infos), "shards": len(infos),
            "token_dtype": dtype, "tokenizer_sha256": sha256(model),
        }
        tasks.replace_bytes(out / REPORT_NAME, (json.dumps({**summary, **report.to_dict()}, indent=1, ensure_ascii=False) + "\n").encode())
        if not cfg.keep_work:
            _remove_work(out)
        # On the console, not only in the report: skipped records are data the model will not see.
        print(f"skipped {report.total():,} records{': ' + _count_skips(report.counts()) if report.total() else ''} "
              f"(details: {out / REPORT_NAME})", flush=True)
        # new_sources depends on what the folder held before (a resumed run may already have written its
        # manifest), so it stays out of prep_report.json, which must be the same for every route to the result.
        clock.lap("finish")
        return {**summary, "new_sources": plan["n_sources"] - (0 if base is None else base.num_rows),
                "skipped": report.counts(), "phase_seconds": clock.seconds}
    finally:
        if started_ray:
            ray.shutdown()
