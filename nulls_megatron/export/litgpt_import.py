"""``nulls import-litgpt``: the authors' released litgpt checkpoints as checkpoints of this system.

``OUT`` is laid out as a run directory, so every tool takes it as it takes a training run::

    OUT/checkpoints/latest                       -> step-000000000
    OUT/checkpoints/step-000000000/backbone/     Megatron dist-checkpoint (checkpoint/backbone.py)
                                   sinks/        sink tables + manifest (checkpoint/sinks.py), assignment: upstream
                                   config.yaml   our run config (nulls.assignment: upstream, TP=1)
                                   imported_from.json   the litgpt files' sha256, the config fields read
                                   digests.json  every file's sha256 (checkpoint/digests.py)
    OUT/sources/manifest.parquet, title_index.*  from --titles (line i = source index i)
    OUT/sources/hf_tokenizer/                    the Hugging Face tokenizer, copied

The model is built in this process as ``inference/load.py`` builds one (TP=1, PP=1), the converted
weights are copied into it with every shape checked (litgpt_weights.py), and it is saved by the
writers the trainer uses. Everything that can be refused (config, weights, tokenizer, titles) is
checked before anything is written, and ``OUT`` appears whole or not at all (written under a temp
name, then renamed).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from ..checkpoint.atomic import atomic_dir, checkpoint_name, update_latest
from ..checkpoint.digests import checkpoint_files, hash_share, sha256_of, write_digests
from ..checkpoint.provenance import MANIFEST_NAME
from ..checkpoint.sinks import SourceState, write_sink_files, write_sink_manifest
from ..config import Config
from ..routing.hf_tokenizer import HF_TOKENIZER_DIR
from .imported_sources import check_tokenizer, find_tokenizer, read_titles, write_sources_folder
from .litgpt_config import LIT_CONFIG, LitConfig, nulls_config, read_lit_config
from .litgpt_weights import LIT_WEIGHTS, load_into, load_lit_state_dict, map_state_dict, tied_head

CHECKPOINTS = "checkpoints"
SOURCES = "sources"
IMPORT_RECORD = "imported_from.json"
RECORD_FORMAT = "nulls-litgpt-import"


@dataclass
class ImportResult:
    checkpoint: Path
    sources_dir: Path
    config: Config
    n_sources: int | None
    tokenizer_size: int | None
    tied_embeddings: bool


def import_litgpt(lit_dir: str | Path, out: str | Path, tokenizer: str | Path | None = None,
                  titles: str | Path | None = None, id_offset: int | None = None,
                  say: Callable[[str], None] = print) -> ImportResult:
    """Convert the litgpt checkpoint in ``lit_dir`` into a checkpoint of ours under ``out`` (module doc).

    ``id_offset``: upstream id of source index 0 (default: the padded vocabulary size, the authors'
    Wikipedia numbering "title index + 49152"). ``tokenizer``: a Hugging Face tokenizer folder
    (default: ``lit_dir`` when it holds one).
    """
    lit_dir, out = Path(lit_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty directory; the import writes a new one")
    lit = read_lit_config(lit_dir)
    state = load_lit_state_dict(lit_dir / LIT_WEIGHTS)
    tied = tied_head(state)
    offset = lit.padded_vocab_size if id_offset is None else int(id_offset)
    cfg = nulls_config(lit, tied, offset)
    mapped = map_state_dict(lit, state, tied, lit_dir / LIT_WEIGHTS)
    del state
    tok_dir = find_tokenizer(lit_dir, tokenizer)
    tok_size = check_tokenizer(tok_dir, lit.padded_vocab_size) if tok_dir is not None else None
    title_list = read_titles(titles) if titles is not None else None
    say(f"import-litgpt: {lit.n_layer} layers, d={lit.n_embd}, {lit.n_head} heads / {lit.n_query_groups} groups, "
        f"MLP {lit.intermediate_size} = {lit.n_backbone} backbone + {lit.n_pool} pool (p_gen {lit.p_gen}, "
        f"p_mem {lit.p_mem}), {'tied' if tied else 'untied'} embeddings, upstream id = source index + {offset}")

    model = _build_model(cfg)
    load_into(model, mapped)
    del mapped
    if out.is_dir():
        out.rmdir()  # empty (checked above): atomic_dir creates it whole
    final_sources = (out / SOURCES).resolve()
    with atomic_dir(out) as tmp:
        write_sources_folder(tmp / SOURCES, title_list, tok_dir)
        if tok_dir is not None:
            check_tokenizer(tmp / SOURCES / HF_TOKENIZER_DIR, lit.padded_vocab_size)  # the copy loads too
        recorded = None
        if title_list is not None:
            digest = sha256_of(tmp / SOURCES / MANIFEST_NAME).sha256
            recorded = {"dir": str(final_sources), "sha256": digest, "sources": len(title_list)}
        record = _import_record(lit, lit_dir, tied, offset, tok_dir, titles)
        root = tmp / CHECKPOINTS
        _write_checkpoint(root / checkpoint_name(0), model, cfg, SourceState(sources_manifest=recorded), record)
        update_latest(root, checkpoint_name(0))
    checkpoint = out / CHECKPOINTS / checkpoint_name(0)
    if title_list is None:
        say("import-litgpt: note: no --titles: the checkpoint names no sources, so `nulls unlearn` and "
            "`nulls generate` cannot resolve any; import again with --titles FILE")
    if tok_dir is None:
        say(f"import-litgpt: note: no tokenizer (none in {lit_dir}, no --tokenizer): text cannot be encoded")
    return ImportResult(checkpoint, out / SOURCES, cfg, len(title_list) if title_list is not None else None,
                        tok_size, tied)


def _build_model(cfg: Config):
    """The model in this process, as inference/load.py builds one; its init is skipped (every tensor is set)."""
    from ..model.gpt import build_nulls_gpt
    from ..process_groups import init_model_parallel

    init_model_parallel(cfg.parallel, cfg.seed)
    model = build_nulls_gpt(cfg, perform_initialization=False)
    model.eval()
    return model


def _write_checkpoint(final: Path, model, cfg: Config, state: SourceState, record: dict) -> None:
    """backbone/, sinks/, config.yaml, the import record and digests.json: what a training save writes,
    from one process, with no optimizer state (an imported model was not trained here)."""
    from ..checkpoint.backbone import save_backbone

    final.mkdir(parents=True)
    save_backbone(final, model, moments=None, common={"optimizer_steps": 0})
    tables = [mlp.sinks for mlp in model.nulls_mlps()]
    write_sink_manifest(final, [write_sink_files(final, tables)], state)
    (final / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (final / IMPORT_RECORD).write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    write_digests(final, hash_share(final, checkpoint_files(final)))


def _import_record(lit: LitConfig, lit_dir: Path, tied: bool, offset: int, tok_dir: Path | None,
                   titles: str | Path | None) -> dict:
    files = {name: sha256_of(lit_dir / name).sha256 for name in (LIT_WEIGHTS, LIT_CONFIG)}
    fields = {k: getattr(lit, k) for k in ("name", "n_embd", "n_layer", "n_head", "n_query_groups", "head_size",
                                           "intermediate_size", "vocab_size", "padded_vocab_size", "block_size",
                                           "rope_base", "norm_eps", "p_gen", "p_mem")}
    return {"format": RECORD_FORMAT, "version": 1, "lit_dir": str(lit_dir.resolve()), "sha256": files,
            "litgpt_config": fields, "tied_embeddings": tied, "id_offset": offset,
            "tokenizer": str(tok_dir.resolve()) if tok_dir is not None else None,
            "titles": ({"file": str(Path(titles).resolve()), "sha256": sha256_of(Path(titles)).sha256}
                       if titles is not None else None)}
