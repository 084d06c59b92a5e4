"""Shared pieces of the training tests: real-text shards written by the prep's own writer, and a tiny
training config. Module-level so that spawned ranks can import them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_prep.shards import SHARD_DIR, SHARD_INDEX_NAME, shard_index_json, shard_name, write_shard
from nulls_megatron.config import Config, config_from_dict
from tests.data_required import SHARED_DATA

ARTICLES = SHARED_DATA / "enwiki" / "articles_2018.jsonl"
VOCAB = 256  # tokens are UTF-8 bytes


def read_articles(documents: int) -> list[dict]:
    if not ARTICLES.is_file():
        raise FileNotFoundError(f"{ARTICLES}: the training tests need this real text (../shared/data)")
    with open(ARTICLES, encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(documents), f)]


def write_prep_dir(out: Path, documents: int = 40, shards: int = 3, max_tokens: int = 300, seed: int = 0,
                   tokenizer_vocab: int | None = None, groups: dict[int, str] | None = None) -> Path:
    """``documents`` real Wikipedia articles (lengths 20..max_tokens tokens), one source each, as UTF-8
    byte tokens, or with ``tokenizer_vocab`` as the ids of a sentencepiece model trained on them (saved
    as ``tokenizer.model``). Also the sources manifest and title index, as `nulls prep` writes them
    (``groups``: source index -> group name, e.g. a book series)."""
    articles = read_articles(documents)
    out = Path(out)
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    encode = None
    if tokenizer_vocab is not None:
        from data_prep.config import TokenizerConfig
        from data_prep.tokenizer import processor, train_tokenizer

        model = train_tokenizer([line for a in articles for line in a["text"].splitlines() if line.strip()],
                                TokenizerConfig(vocab_size=tokenizer_vocab, num_threads=1))
        (out / "tokenizer.model").write_bytes(model)
        sp = processor(model)
        encode = lambda text: np.asarray(sp.encode(text), dtype=np.uint16)  # noqa: E731
    docs = []
    for i, a in enumerate(articles):
        data = encode(a["text"]) if encode else np.frombuffer(a["text"].encode("utf-8"), dtype=np.uint8).astype(np.uint16)
        docs.append((i, data[: int(rng.integers(20, max_tokens))], a["title"], f"wiki:{a['id']}"))
    bounds = np.linspace(0, len(docs), shards + 1).astype(int)
    infos = [write_shard(out / SHARD_DIR / shard_name(s), s, docs[bounds[s]:bounds[s + 1]]) for s in range(shards)]
    (out / SHARD_INDEX_NAME).write_bytes(shard_index_json(infos, "uint16", "0" * 64))
    shard_of = np.concatenate([np.full(bounds[s + 1] - bounds[s], s) for s in range(shards)])
    write_sources_manifest(out, articles, [len(d[1]) for d in docs], shard_of, groups or {})
    return out


def write_sources_manifest(out: Path, articles: list[dict], n_tokens: list[int], shard_of: np.ndarray,
                           groups: dict[int, str]) -> None:
    """manifest.parquet and the title index of ``articles`` (source i = article i), by the prep's own writers."""
    import pyarrow as pa

    from data_prep.manifest import MANIFEST_NAME, table_fetcher, title_hashes, write_manifest, write_title_index

    n = len(articles)
    docs = pa.table({
        "key": [f"wiki:{a['id']}" for a in articles], "title": [a["title"] for a in articles],
        "page_id": pa.array([int(a["id"]) for a in articles], pa.int64()), "url": [a.get("url", "") for a in articles],
        "group": [groups.get(i) for i in range(n)], "input_index": pa.array(np.zeros(n, np.int32)),
    })
    write_manifest(out / MANIFEST_NAME, table_fetcher(docs), np.arange(n), n, None, np.asarray(n_tokens, np.int64),
                   np.asarray(shard_of, np.int64))
    write_title_index(out, title_hashes([a["title"] for a in articles]))


def train_config(data: str | Path, run_dir: str | Path, overrides: list[str] = (), **sections) -> Config:
    """A tiny NULLs GPT (d=64, 2 layers, seq 64, pool 192 in 2 shards, k=12) for a few CPU steps."""
    base = {
        "model": {"vocab_size": VOCAB, "hidden_size": 64, "num_layers": 2, "num_attention_heads": 4,
                  "num_query_groups": 2, "ffn_hidden_size": 8 + 192, "seq_length": 64, "init_std": 0.05},
        "nulls": {"n_backbone": 8, "n_pool": 192, "sinks_per_source": 12, "pool_shards": 2},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "clip_grad": 1.0},
        "train": {"data": str(data), "run_dir": str(run_dir), "steps": 6, "micro_batch_rows": 2,
                  "global_batch_rows": 4, "save_every": 3, "keep_last": 2},
        "tracking": {"experiment": "nulls-tests"},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return config_from_dict(base, "train_config", overrides)


def per_source_loss(model, rows, batch_rows: int, **forward_kwargs) -> dict[int, float]:
    """Mean next-token loss (nats) of every source over its label tokens in packed ``rows``; leaves the
    model in train mode."""
    import torch

    totals: dict[int, list[float]] = {}
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_rows):
            sl = slice(start, start + batch_rows)
            loss = model(rows.tokens[sl], labels=rows.labels[sl], source_ids=rows.source_ids[sl],
                         document_ids=rows.document_ids[sl], **forward_kwargs)
            mask = rows.loss_mask[sl] > 0
            for s, v in zip(rows.source_ids[sl][mask].tolist(), loss[mask].tolist()):
                acc = totals.setdefault(s, [0.0, 0])
                acc[0] += v
                acc[1] += 1
    model.train()
    return {s: total / count for s, (total, count) in totals.items()}
