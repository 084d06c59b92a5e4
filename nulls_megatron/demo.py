"""The end-to-end demo on one CPU: train a tiny NULLs GPT on real articles, then
forget a few of them with `nulls unlearn`, and show what changed.

It runs the real components in one process: the trainer of `nulls train` (Megatron-core
GPT with NULLs MLPs, the shard loader with packed rows and block-diagonal attention, AdamW,
MLflow, checkpoints), `nulls unlearn` (a new checkpoint version with the articles' sink rows
zeroed, a receipt, `verify-unlearned`), then reloads both versions as a deployment would. The
forget-set numbers it prints are before/after, not against a retrained oracle: that is `nulls eval`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .checkpoint.atomic import atomic_file
from .config import Config
from .train.packing import PackedRows, pack_documents


@dataclass
class DemoOptions:
    epochs: int = 8
    max_doc_tokens: int = 512  # documents are cut to this: many short sources, several epochs (METHOD.md 6)
    batch_rows: int = 8
    lr: float = 3e-3
    warmup: int = 20
    forget: int = 4
    seed: int = 0


def documents_from_prep(prep_dir: Path) -> tuple[list[tuple[int, np.ndarray]], dict[int, str]]:
    """Every document of a `nulls prep` output, in source order, with the titles."""
    from data_prep.shards import SHARD_DIR, SHARD_INDEX_NAME, read_shard

    index_path = prep_dir / SHARD_INDEX_NAME
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path}: no shard index; run `nulls prep` into {prep_dir} first")
    index = json.loads(index_path.read_text())
    documents, titles = [], {}
    for shard in index["shards"]:
        for sample in read_shard(prep_dir / SHARD_DIR / shard["name"]):
            source = int(sample["meta"]["source_index"])
            documents.append((source, sample["tokens"].astype(np.int64)))
            titles[source] = sample["meta"]["title"]
    return documents, titles


def per_source_loss(model, rows: PackedRows, batch_rows: int, **forward_kwargs) -> dict[int, float]:
    """Mean next-token loss (nats) of every source over its label tokens."""
    totals: dict[int, list[float]] = {}
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_rows):
            sl = slice(start, start + batch_rows)
            loss = model(
                rows.tokens[sl], labels=rows.labels[sl], source_ids=rows.source_ids[sl],
                document_ids=rows.document_ids[sl], **forward_kwargs,
            )
            mask = rows.loss_mask[sl]
            src = rows.source_ids[sl][mask > 0]
            values = loss[mask > 0]
            for s, v in zip(src.tolist(), values.tolist()):
                acc = totals.setdefault(s, [0.0, 0])
                acc[0] += v
                acc[1] += 1
    model.train()
    return {s: total / count for s, (total, count) in totals.items()}


def mean_over(losses: dict[int, float], sources: Sequence[int]) -> float:
    return float(np.mean([losses[s] for s in sources]))


def demo_train_config(cfg: Config, prep_dir: Path, documents: list[tuple[int, np.ndarray]], options: DemoOptions,
                      out_dir: Path) -> Config:
    """``cfg`` with a ``train`` section for the demo: ``options.epochs`` passes over the cut documents."""
    tokens = sum(min(len(t), options.max_doc_tokens) for _, t in documents)
    steps = options.epochs * math.ceil(math.ceil(tokens / cfg.model.seq_length) / options.batch_rows)
    return dataclasses.replace(
        cfg,
        optimizer=dataclasses.replace(cfg.optimizer, lr=options.lr, min_lr=0.0, warmup_steps=options.warmup),
        train=dataclasses.replace(
            cfg.train, data=str(prep_dir), run_dir=str(out_dir / "train"), steps=steps,
            micro_batch_rows=options.batch_rows, global_batch_rows=options.batch_rows,
            max_document_tokens=options.max_doc_tokens, save_every=0, log_every=max(1, steps // 20),
        ),
        seed=options.seed,
    )


def run_demo(cfg: Config, prep_dir: Path, titles: dict[int, str], options: DemoOptions, out_dir: Path,
             config_path: str | None = None) -> dict:
    """Train with the real trainer (`nulls train`), reload the final checkpoint the way a deployment
    would (backbone + sink tables, no optimizer), forget, and compare losses."""
    from .checkpoint.backbone import load_backbone
    from .checkpoint.sinks import load_sink_tables
    from .model.gpt import build_nulls_gpt
    from .model.parallel import init_model_parallel
    from .checkpoint.atomic import checkpoint_version, version_name
    from .checkpoint.sinks import read_sink_manifest
    from .train.trainer import train
    from .unlearn.requests import Request
    from .unlearn.service import run_unlearn, run_verify
    from .unlearn.verify import format_verification

    documents, _ = documents_from_prep(prep_dir)
    cfg = demo_train_config(cfg, prep_dir, documents, options, out_dir)
    sources = sorted({s for s, _ in documents})
    print(f"demo: {len(documents)} documents as {len(sources)} sources (each cut to {options.max_doc_tokens} tokens), "
          f"{options.epochs} epochs = {cfg.train.steps} steps of {options.batch_rows} rows x {cfg.model.seq_length} tokens")
    result = train(cfg, config_path=config_path)
    final = Path(result.checkpoint)
    # A rerun finds training finished at `latest`, which may be the unlearned version: the trained weights
    # are the step's own version, and the unlearning below is idempotent.
    step, _ = checkpoint_version(final.name)
    checkpoint = final.parent / version_name(step, 0)
    print(f"demo: trained to loss {result.last_loss:.3f}; checkpoint {checkpoint}")

    # The forget set: a seeded draw among the sources, reproducible from the options.
    forget = sorted(torch.randperm(len(sources), generator=torch.Generator().manual_seed(options.seed + 1))[: options.forget].tolist())
    forget = [sources[i] for i in forget]
    retain = [s for s in sources if s not in set(forget)]
    outcome = run_unlearn(final, [Request("index", str(s), "demo") for s in forget],
                          say=lambda line: print(f"unlearn: {line}"))
    unlearned = outcome.written.path if outcome.written else final
    if outcome.written is None:  # already forgotten in an earlier run: its receipt is the newest one
        last = read_sink_manifest(unlearned)["receipts"][-1]
        outcome.receipt_path, outcome.receipt_sha256 = unlearned / last["name"], last["sha256"]
    verification = run_verify(unlearned, requests=[Request("index", str(s), "demo") for s in forget])
    print(f"unlearn: {format_verification(verification)}")

    init_model_parallel(dataclasses.replace(cfg.parallel, tensor_parallel=1, pipeline_parallel=1), cfg.seed)
    model = build_nulls_gpt(dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, tensor_parallel=1,
                                                                                   pipeline_parallel=1)))
    mlps = model.nulls_mlps()
    documents = [(s, t[: options.max_doc_tokens]) for s, t in documents]
    rows = PackedRows.stack(list(pack_documents(documents, cfg.model.seq_length)))
    load_backbone(checkpoint, model, with_moments=False)
    load_sink_tables(checkpoint, [mlp.sinks for mlp in mlps])
    before = per_source_loss(model, rows, options.batch_rows)
    load_backbone(unlearned, model, with_moments=False)  # the shipped model: reloaded from the new version's files
    load_sink_tables(unlearned, [mlp.sinks for mlp in mlps])
    after = per_source_loss(model, rows, options.batch_rows)
    backbone = per_source_loss(model, rows, options.batch_rows, sink_mode="backbone")
    disabled = sum(int(mlp.sinks.disabled.sum()) for mlp in mlps)
    report = {
        "sources": len(sources),
        "rows": len(rows),
        "steps": cfg.train.steps,
        "epochs": options.epochs,
        "final_train_loss": result.last_loss,
        "checkpoint": str(checkpoint),
        "mlflow_run_id": result.run_id,
        "forgotten": [{"source": s, "title": titles.get(s, ""), "loss_before": before[s], "loss_after": after[s]} for s in forget],
        "forget_loss_before": mean_over(before, forget),
        "forget_loss_after_own_sinks_off": mean_over(after, forget),
        "forget_loss_backbone_mode": mean_over(backbone, forget),
        "retain_loss_before": mean_over(before, retain),
        "retain_loss_after": mean_over(after, retain),
        "pool_rows_disabled": disabled // len(mlps),
        "pool_fraction_disabled": disabled / len(mlps) / cfg.nulls.n_pool,
        "unlearned_checkpoint": str(unlearned),
        "receipt": str(outcome.receipt_path) if outcome.receipt_path else None,
        "receipt_sha256": outcome.receipt_sha256,
        "verified": verification.ok,
    }
    with atomic_file(out_dir / "demo_report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))

    print(f"\nforgot {len(forget)} sources by zeroing their sink rows in the stored weights ({report['pool_rows_disabled']} "
          f"rows per layer, {report['pool_fraction_disabled']:.1%} of the pool); receipt {report['receipt']}:")
    for item in report["forgotten"]:
        print(f"  {item['title'][:50]:<50} loss {item['loss_before']:.3f} -> {item['loss_after']:.3f} nats/token")
    print(f"forgotten sources: {report['forget_loss_before']:.3f} -> {report['forget_loss_after_own_sinks_off']:.3f} "
          f"(backbone-only mode {report['forget_loss_backbone_mode']:.3f})")
    print(f"retained sources:  {report['retain_loss_before']:.3f} -> {report['retain_loss_after']:.3f}")
    print(f"report: {out_dir / 'demo_report.json'}")
    return report
