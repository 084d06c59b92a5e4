"""Benchmark: `nulls unlearn` at Wikipedia scale (6.4M sources, the paper's pool shape).

Setup (not measured): a sources manifest of N synthetic sources (titles of two words and the page
id, title index as `nulls prep` writes it) and a checkpoint whose sink tables have the paper's
pool shape (n_pool 7692, k 100, 32 layers) at a small width d (default 16) with both AdamW
moments, a backbone directory (hard-linked by the unlearning, so its content does not matter
here), train state and config. Measured in a child process (wall time, peak RSS):
- collateral: the exact report over all N sources; first call builds the per-checkpoint sink
  index (cold), then again (warm);
- unlearn: resolve one title, verify every sink file's digest, write the new version (rows zeroed
  in weights and moments in all 32 layers, receipt, manifest, rename, `latest`);
- verify: `verify-unlearned` with the receipt.
The same at a small N shows that unlearning is flat in the number of sources.

    python benchmarks/unlearn.py [--sources 6407814] [--hidden 16] [--small 100000]

Goals (issue 8): unlearn < 1 s, flat in N; collateral < 30 s; last line
``RESULT unlearn_s=... collateral_s=... verify_s=...``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

WORDS = ("History Battle River Saint John Church School Station Football Club Album Song Film Party Island Lake "
         "County District Railway University North South New Old Royal National Museum Mountain Bridge").split()
N_POOL, K, LAYERS, N_BACKBONE = 7692, 100, 32, 500


def peak_rss_gb() -> float:
    """This process's peak RSS since its exec (VmHWM): getrusage's ru_maxrss would include the peak of
    the forked parent, which built the 6.4M-source manifest."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def write_manifest(prep: Path, n: int) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    from data_prep.manifest import MANIFEST_NAME, table_fetcher, title_hashes, write_manifest, write_title_index

    rng = np.random.default_rng(0)
    page_id = np.cumsum(rng.integers(1, 12, n)).astype(np.int64)
    words = pa.array(WORDS)
    ids = pa.array(page_id)
    titles = pc.binary_join_element_wise(*(words.take(pa.array(rng.integers(0, len(WORDS), n))) for _ in range(2)),
                                         pc.cast(ids, pa.string()), " ")
    docs = pa.table({"key": pc.binary_join_element_wise("wiki:", pc.cast(ids, pa.string()), ""), "title": titles,
                     "page_id": ids, "url": pa.nulls(n, pa.string()), "group": pa.nulls(n, pa.string()),
                     "input_index": pa.array(np.zeros(n, np.int32))})
    prep.mkdir(parents=True)
    write_manifest(prep / MANIFEST_NAME, table_fetcher(docs), np.arange(n), n, None, np.full(n, 500, np.int64),
                   np.zeros(n, np.int64))
    write_title_index(prep, title_hashes(titles.to_pylist()))


def write_checkpoint(ckpt: Path, prep: Path, hidden: int) -> None:
    import torch

    from nulls_megatron.checkpoint.provenance import describe_sources_manifest
    from nulls_megatron.checkpoint.sinks import SourceState, save_sink_tables, table_key
    from nulls_megatron.sinks.assignment import SinkAssignment
    from nulls_megatron.sinks.table import SinkTable

    a = SinkAssignment(n_pool=N_POOL, sinks_per_source=K)
    tables = [SinkTable(a, hidden, N_BACKBONE, layer_number=layer) for layer in range(LAYERS)]
    moments = {table_key(t): {"exp_avg": torch.randn_like(t.weight) * 1e-3, "exp_avg_sq": torch.rand_like(t.weight) * 1e-6}
               for t in tables}
    save_sink_tables(ckpt, tables, moments, state=SourceState(sources_manifest=describe_sources_manifest(prep)))
    (ckpt / "backbone").mkdir()
    (ckpt / "backbone" / "__0_0.distcp").write_bytes(np.random.default_rng(0).bytes(8 << 20))
    (ckpt / "backbone" / ".metadata").write_bytes(b"\0" * 4096)
    (ckpt / "train_state.json").write_text(json.dumps({"step": 100}))
    (ckpt / "config.yaml").write_text("seed: 1\n")
    (ckpt.parent / "latest").write_text(ckpt.name + "\n")


def measured(root: Path, n: int) -> None:
    """The child: every timed step on the checkpoint under ``root``."""
    from nulls_megatron.unlearn.checkpoint_view import open_checkpoint
    from nulls_megatron.unlearn.collateral import compute_collateral
    from nulls_megatron.unlearn.requests import Request
    from nulls_megatron.unlearn.service import run_unlearn, run_verify
    from nulls_megatron.unlearn.sink_index import SinkRows

    from data_prep.manifest import Manifest

    rss = peak_rss_gb
    title = Manifest(root / "prep").row(n // 2, ["title"])["title"]
    view = open_checkpoint(root / "checkpoints")
    times = {}
    for label in ("collateral_cold_s", "collateral_s"):
        t = time.perf_counter()
        rows = SinkRows(view.assignment, n, cache_root=view.root)
        c = compute_collateral(view.assignment, view.layers, n, [n // 2], [], rows)
        times[label] = time.perf_counter() - t
        print(f"  {label}: peak RSS so far {rss():.2f} GB")
    g = c["groups"][0]
    print(f"collateral of one source among {n:,}: {g['rows_to_zero']} rows in each of {len(view.layers)} layers, "
          f"{g['retained_sharing']:,} retained sources share one or more; cold {times['collateral_cold_s']:.2f} s "
          f"(builds the sink index once per run), warm {times['collateral_s']:.2f} s")
    os.sync()  # the index build's 1.3 GB must not be written back while the unlearning is timed
    run_unlearn(root / "checkpoints", [Request("index", "0", "--source-index")], say=lambda line: None,
                show_collateral=False, out=root / "warmup")  # first use: the manifest's digest is noted
    os.sync()
    t = time.perf_counter()
    quiet = lambda line: None  # noqa: E731
    # The deletion itself: resolve, verify digests, write the version (the collateral it shows is timed above).
    outcome = run_unlearn(root / "checkpoints", [Request("title", title, "--title")], say=quiet, show_collateral=False)
    times["unlearn_s"] = time.perf_counter() - t
    print(f"  unlearn: peak RSS so far {rss():.2f} GB")
    t = time.perf_counter()
    result = run_verify(outcome.written.path, receipt=outcome.receipt_path)
    times["verify_s"] = time.perf_counter() - t
    assert result.ok, result.problems
    print(f"unlearn {times['unlearn_s']:.3f} s ({len(outcome.written.files)} files rewritten); verify "
          f"{times['verify_s']:.3f} s ({result.rows_checked} rows in {result.files_checked} files); peak RSS {rss():.2f} GB")
    print("TIMES " + " ".join(f"{k}={v:.3f}" for k, v in times.items()) + f" peak_rss_gb={rss():.2f}")


def run(n: int, hidden: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="unlearn_bench_"))
    try:
        t = time.perf_counter()
        write_manifest(tmp / "prep", n)
        write_checkpoint(tmp / "checkpoints" / "step-000000100", tmp / "prep", hidden)
        print(f"setup for {n:,} sources: {time.perf_counter() - t:.1f} s (not measured)")
        child = subprocess.run([sys.executable, __file__, "--child", str(tmp), "--sources", str(n)],
                               capture_output=True, text=True)
        print(child.stdout, end="")
        if child.returncode:
            sys.exit(child.stderr)
        return {k: float(v) for k, v in (kv.split("=") for kv in child.stdout.strip().splitlines()[-1].split()[1:])}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", type=int, default=6_407_814)
    p.add_argument("--small", type=int, default=100_000, help="a smaller manifest, to show unlearning is flat in N")
    p.add_argument("--hidden", type=int, default=16, help="model width d of the sink tables")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        measured(Path(args.child), args.sources)
        return
    small = run(args.small, args.hidden)
    big = run(args.sources, args.hidden)
    print(f"unlearn at {args.small:,} sources {small['unlearn_s']:.3f} s, at {args.sources:,} {big['unlearn_s']:.3f} s "
          f"(ratio {big['unlearn_s'] / small['unlearn_s']:.2f}: flat in the number of sources)")
    print(f"RESULT unlearn_s={big['unlearn_s']:.2f} collateral_s={big['collateral_s']:.1f} verify_s={big['verify_s']:.2f} "
          f"collateral_cold_s={big['collateral_cold_s']:.1f} peak_rss_gb={big['peak_rss_gb']:.2f}")


if __name__ == "__main__":
    main()
