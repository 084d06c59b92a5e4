"""Load a checkpoint the way a deployment does: one process, no optimizer, any training layout.

A checkpoint trained at TP x PP is resharded into a TP=1, PP=1 model (Megatron's dist_checkpointing
reads any layout), its sink tables loaded with their ``disabled`` flags (forgotten sources are off
in every mode), and beside it what serving needs: the config, the sources' state, the verified
prep folder whose manifest names the sources, and the prep's tokenizer (sentencepiece, or the Hugging
Face tokenizer of a checkpoint imported from litgpt).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import Config, config_from_dict
from ..routing.build import CheckpointSources, checkpoint_sources, read_tokenizer

CONFIG_NAME = "config.yaml"


@dataclass
class LoadedModel:
    """A model ready for generation with everything needed to interpret its source ids."""

    model: "torch.nn.Module"  # noqa: F821  (NullsGPTModel; imported lazily with Megatron)
    cfg: Config
    sources: CheckpointSources
    tokenizer: "sentencepiece.SentencePieceProcessor | HFTokenizer"  # noqa: F821  (routing.hf_tokenizer)

    @property
    def checkpoint(self) -> Path:
        return self.sources.checkpoint

    @property
    def vocab_size(self) -> int:
        """Logit columns that name real tokens (Megatron may pad the output layer)."""
        return min(self.cfg.model.vocab_size, self.tokenizer.get_piece_size())

    def title(self, source: int) -> str:
        """The manifest title of ``source`` ('' when the manifest has none)."""
        from data_prep.manifest import Manifest

        return Manifest(self.sources.prep_dir).row(int(source), ["title"])["title"] or ""


def checkpoint_config(checkpoint: Path) -> Config:
    """The run config stored in the checkpoint, with model parallelism folded to one process."""
    path = checkpoint / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the checkpoint holds no run config")
    cfg = config_from_dict(yaml.safe_load(path.read_text()), str(path))
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, tensor_parallel=1, pipeline_parallel=1,
                                                                   expert_parallel=1))


def load_for_inference(checkpoint: str | os.PathLike, manifest: str | os.PathLike | None = None,
                       sources: CheckpointSources | None = None) -> LoadedModel:
    """The model of ``checkpoint`` (a checkpoint dir, or a checkpoints root / run dir with ``latest``)
    in this process, in eval mode, with its sources and tokenizer.

    ``manifest``: the prep folder when it moved since training (digest-checked against the one the
    checkpoint recorded); ``sources``: already resolved by :func:`checkpoint_sources` (skips hashing
    the manifest again). Initialises a single-process gloo group when none exists.
    """
    from ..checkpoint.backbone import load_backbone
    from ..checkpoint.sinks import load_sink_tables
    from ..model.gpt import build_nulls_gpt
    from ..process_groups import init_model_parallel

    sources = sources or checkpoint_sources(checkpoint, manifest)
    tokenizer = read_tokenizer(sources.prep_dir)
    cfg = checkpoint_config(sources.checkpoint)
    if tokenizer.get_piece_size() > cfg.model.vocab_size:
        raise ValueError(f"{sources.prep_dir}: its tokenizer has {tokenizer.get_piece_size()} pieces, more than "
                         f"the model's vocab_size {cfg.model.vocab_size}: not the tokenizer it was trained with")
    init_model_parallel(cfg.parallel, cfg.seed)
    model = build_nulls_gpt(cfg)
    load_backbone(sources.checkpoint, model, with_moments=False)
    load_sink_tables(sources.checkpoint, [mlp.sinks for mlp in model.nulls_mlps()])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model, cfg, sources, tokenizer)
