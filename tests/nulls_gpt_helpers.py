"""Shared pieces of the NULLs GPT tests: a tiny config, packed batches, TP gathers.

Module-level so that spawned ranks can import them.
"""
from __future__ import annotations

import os
import re

import pytest
import torch

from nulls_megatron.config import config_from_dict

VOCAB, SEQ, BATCH = 128, 32, 2


def tiny_config(tensor_parallel: int = 1, per_layer_sinks: bool = False, pipeline_parallel: int = 1, tie_embeddings: bool = True):
    return config_from_dict(
        {
            "model": {
                "vocab_size": VOCAB,
                "hidden_size": 64,
                "num_layers": 2,
                "num_attention_heads": 4,
                "num_query_groups": 2,
                "ffn_hidden_size": 8 + 192,
                "seq_length": SEQ,
                "init_std": 0.1,  # larger than usual so that the sinks matter in a few steps
                "tie_embeddings": tie_embeddings,
            },
            "nulls": {"n_backbone": 8, "n_pool": 192, "sinks_per_source": 12, "pool_shards": 2, "per_layer_sinks": per_layer_sinks},
            "parallel": {"tensor_parallel": tensor_parallel, "pipeline_parallel": pipeline_parallel},
        }
    )


def packed_batch(seed: int = 0):
    """Two packed rows: row 0 holds sources 7 | 3 | 900001, row 1 holds 3 (continued) | 42."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    sources = torch.empty(BATCH, SEQ, dtype=torch.int64)
    sources[0, :10], sources[0, 10:20], sources[0, 20:] = 7, 3, 900_001
    sources[1, :5], sources[1, 5:] = 3, 42
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), sources


def init_single_process_megatron(tensor_parallel: int = 1, seed: int = 1234, pipeline_parallel: int = 1) -> None:
    from nulls_megatron.config import ParallelConfig
    from nulls_megatron.process_groups import init_model_parallel

    init_model_parallel(ParallelConfig(tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel), seed)


@pytest.fixture(scope="module")
def megatron_world():
    """A one-process gloo group with Megatron's model-parallel state, for in-process tests
    (import it into a test module to use it there)."""
    saved = dict(os.environ)
    init_single_process_megatron()
    yield
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
    # init exports RANK/WORLD_SIZE/MASTER_PORT; left behind, they would make later subprocesses
    # (torchrun re-exec, benchmarks) join this dead group's port instead of choosing their own.
    os.environ.clear()
    os.environ.update(saved)


def gather_full(param: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """Reassemble a tensor-parallel shard (weight or grad) into the full TP=1 tensor.

    Megatron splits a master weight along ``partition_dim`` into ``stride * W``
    chunks and gives rank r the chunks r, r + W, ... (``stride=2`` for the gated
    fc1: gate and up chunks).
    """
    from megatron.core import parallel_state

    if not getattr(param, "tensor_model_parallel", False):
        return tensor.detach().clone()
    world = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    shards = [torch.empty_like(tensor) for _ in range(world)]
    torch.distributed.all_gather(shards, tensor.detach().contiguous(), group=group)
    pieces = [shard.chunk(stride, dim=dim) for shard in shards]
    return torch.cat([pieces[r][j] for j in range(stride) for r in range(world)], dim=dim)


def global_param_name(model, name: str) -> str:
    """Parameter name in the PP=1 model: a stage's local layer index -> its global layer number - 1."""
    match = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
    if not match:
        return name
    layer = model.decoder.layers[int(match.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}.{match.group(2)}"


def packed_micro_batches(seed: int = 0) -> list:
    """b0, b1: two packed rows each of SEQ tokens; several sources per row, one document spanning rows."""
    import numpy as np

    from nulls_megatron.train.packing import PackedRows, pack_documents

    rng = np.random.default_rng(seed)
    sizes = [20, 9, 50, 14, 7, 30, 12]
    docs = [(s, rng.integers(0, VOCAB, size=n)) for s, n in zip([5, 77, 3, 900_001, 42, 8, 5150], sizes)]
    rows = list(pack_documents(docs, SEQ))
    assert len(rows) >= 4
    return [PackedRows.stack(rows[i : i + 2]) for i in (0, 2)]


def adjacent_documents_of_one_source(seed: int = 5, split: int = 12) -> tuple:
    """(row, changed, one_document): one packed row holding two documents of source 7 side by side
    (document ids 0 and 1, split at ``split``), the same row with the first document's tokens changed,
    and ``changed`` labelled as one document; the loss mask covers the second document only. With
    document-id attention the second document's losses are equal in ``row`` and ``changed``."""
    from nulls_megatron.train.packing import PackedRows

    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (1, SEQ + 1), generator=gen)
    changed_tokens = tokens.clone()
    changed_tokens[0, :split] = (changed_tokens[0, :split] + 5) % VOCAB
    sources = torch.full((1, SEQ), 7)
    docs = torch.zeros(1, SEQ, dtype=torch.int64)
    docs[0, split:] = 1
    mask = (docs == 1).float()

    def rows(t: torch.Tensor, d: torch.Tensor) -> PackedRows:
        return PackedRows(tokens=t[:, :-1], labels=t[:, 1:], source_ids=sources, document_ids=d, loss_mask=mask)

    return rows(tokens, docs), rows(changed_tokens, docs), rows(changed_tokens, torch.zeros_like(docs))
