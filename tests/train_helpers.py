"""Shared pieces of the training tests: real-text shards written by the prep's own writer, and a tiny
training config. Module-level so that spawned ranks can import them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_prep.shards import SHARD_DIR, SHARD_INDEX_NAME, shard_index_json, shard_name, write_shard
from nulls_megatron.config import Config, config_from_dict

ARTICLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "enwiki" / "articles_2018.jsonl"
VOCAB = 256  # tokens are UTF-8 bytes


def write_prep_dir(out: Path, documents: int = 40, shards: int = 3, max_tokens: int = 300, seed: int = 0) -> Path:
    """``documents`` real Wikipedia articles as byte tokens (lengths 20..max_tokens), one source each."""
    if not ARTICLES.is_file():
        raise FileNotFoundError(f"{ARTICLES}: the training tests need this real text (../shared/data)")
    out = Path(out)
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(ARTICLES, encoding="utf-8") as f:
        articles = [json.loads(line) for _, line in zip(range(documents), f)]
    docs = []
    for i, a in enumerate(articles):
        data = np.frombuffer(a["text"].encode("utf-8"), dtype=np.uint8).astype(np.uint16)
        docs.append((i, data[: int(rng.integers(20, max_tokens))], a["title"], f"wiki:{a['id']}"))
    bounds = np.linspace(0, len(docs), shards + 1).astype(int)
    infos = [write_shard(out / SHARD_DIR / shard_name(s), s, docs[bounds[s]:bounds[s + 1]]) for s in range(shards)]
    (out / SHARD_INDEX_NAME).write_bytes(shard_index_json(infos, "uint16", "0" * 64))
    return out


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
