"""The end-to-end demo on one CPU: train a tiny NULLs GPT on real articles, then
forget a few of them by switching their sinks off, and show what changed.

It runs the real components in one process: the trainer of `nulls train` (Megatron-core
GPT with NULLs MLPs, the shard loader with packed rows and block-diagonal attention, AdamW,
MLflow, checkpoints), then reloads the final checkpoint as a deployment would. The forget-set numbers it
prints are before/after, not against a retrained oracle: that is `nulls eval`.
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
    from .train.trainer import train

    documents, _ = documents_from_prep(prep_dir)
    cfg = demo_train_config(cfg, prep_dir, documents, options, out_dir)
    sources = sorted({s for s, _ in documents})
    print(f"demo: {len(documents)} documents as {len(sources)} sources (each cut to {options.max_doc_tokens} tokens), "
          f"{options.epochs} epochs = {cfg.train.steps} steps of {options.batch_rows} rows x {cfg.model.seq_length} tokens")
    result = train(cfg, config_path=config_path)
    checkpoint = Path(result.checkpoint)
    print(f"demo: trained to loss {result.losses[-1]:.3f}; checkpoint {checkpoint}")

    init_model_parallel(cfg.parallel, cfg.seed)
    model = build_nulls_gpt(cfg)
    load_backbone(checkpoint, model, with_moments=False)
    load_sink_tables(checkpoint, [mlp.sinks for mlp in model.nulls_mlps()])
    documents = [(s, t[: options.max_doc_tokens]) for s, t in documents]
    rows = PackedRows.stack(list(pack_documents(documents, cfg.model.seq_length)))

    # The forget set: a seeded draw among the sources, reproducible from the options.
    forget = sorted(torch.randperm(len(sources), generator=torch.Generator().manual_seed(options.seed + 1))[: options.forget].tolist())
    forget = [sources[i] for i in forget]
    retain = [s for s in sources if s not in set(forget)]
    before = per_source_loss(model, rows, options.batch_rows)
    mlps = model.nulls_mlps()
    forgotten_rows = mlps[0].sinks.assignment.sinks_of(torch.tensor(forget)).reshape(-1).unique()
    for mlp in mlps:
        mlp.sinks.disabled[forgotten_rows] = True
    after = per_source_loss(model, rows, options.batch_rows)
    backbone = per_source_loss(model, rows, options.batch_rows, sink_mode="backbone")
    report = {
        "sources": len(sources),
        "rows": len(rows),
        "steps": cfg.train.steps,
        "epochs": options.epochs,
        "final_train_loss": result.losses[-1],
        "checkpoint": str(checkpoint),
        "mlflow_run_id": result.run_id,
        "forgotten": [{"source": s, "title": titles.get(s, ""), "loss_before": before[s], "loss_after": after[s]} for s in forget],
        "forget_loss_before": mean_over(before, forget),
        "forget_loss_after_own_sinks_off": mean_over(after, forget),
        "forget_loss_backbone_mode": mean_over(backbone, forget),
        "retain_loss_before": mean_over(before, retain),
        "retain_loss_after": mean_over(after, retain),
        "pool_rows_disabled": int(forgotten_rows.numel()),
        "pool_fraction_disabled": forgotten_rows.numel() / cfg.nulls.n_pool,
    }
    with atomic_file(out_dir / "demo_report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))

    print(f"\nforgot {len(forget)} sources by disabling {report['pool_rows_disabled']} sink rows "
          f"({report['pool_fraction_disabled']:.1%} of the pool) in every layer:")
    for item in report["forgotten"]:
        print(f"  {item['title'][:50]:<50} loss {item['loss_before']:.3f} -> {item['loss_after']:.3f} nats/token")
    print(f"forgotten sources: {report['forget_loss_before']:.3f} -> {report['forget_loss_after_own_sinks_off']:.3f} "
          f"(backbone-only mode {report['forget_loss_backbone_mode']:.3f})")
    print(f"retained sources:  {report['retain_loss_before']:.3f} -> {report['retain_loss_after']:.3f}")
    print(f"report: {out_dir / 'demo_report.json'}")
    return report
