"""The ``nulls prep`` configuration: inputs, output folder, tokenizer, shards, Ray.

Loaded from YAML with ``load_prep_config(path, overrides)``. Relative paths in the file (inputs,
``output_dir``, ``tokenizer.model_path``, ``base_manifest``) resolve against the *project root of the
config file*: the nearest ancestor folder of the YAML file that holds ``setup.cfg``, ``pyproject.toml``
or ``.git`` (the config's own folder when there is none). So ``configs/prep_shared_corpus.yaml`` names
``../shared/data/...`` and works from any current directory. An input path ``gensim:enwiki-sample`` is
the real 206-page dump that the gensim wheel ships.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from data_prep.readers import FORMATS, gensim_sample_dump
from data_prep.readers.common import DEFAULT_MAX_CHARS
from yaml_config import ConfigError, load_yaml_dataclass

GENSIM_SAMPLE = "gensim:enwiki-sample"
_ROOT_MARKERS = ("setup.cfg", "pyproject.toml", ".git")


class ModelType(str, enum.Enum):
    BPE = "bpe"
    UNIGRAM = "unigram"


@dataclass
class InputConfig:
    """One input: a dump, a JSONL/parquet file, a WikiExtractor folder, WikiText or a folder of books."""

    path: str = ""
    format: str = "auto"  # one of data_prep.readers.FORMATS
    group: str | None = None  # sources of this input share a group (a book series), forgettable as one
    index_path: str | None = None  # multistream dump index; found next to the dump when unset
    max_chars: int | None = None  # longer documents are skipped ("too_long"); unset: PrepConfig.max_chars


@dataclass
class TokenizerConfig:
    model_path: str | None = None  # reuse this sentencepiece model instead of training one
    vocab_size: int = 32000
    model_type: ModelType = ModelType.BPE
    # The training sample: up to sample_chars characters of cleaned text, taken in equal shares from
    # at most sample_chunks chunks spread evenly over the chunk list (deterministic, no RNG).
    sample_chars: int = 20_000_000
    sample_chunks: int = 32
    seed: int = 0  # sentencepiece's random generator seed
    byte_fallback: bool = True  # unknown characters become byte tokens instead of <unk>
    character_coverage: float = 0.9995
    split_digits: bool = True
    # sentencepiece's result depends on its thread count (fixed per config, so runs are reproducible).
    num_threads: int = 2


@dataclass
class ShardConfig:
    target_bytes: int = 256 << 20  # a shard is closed once its estimated tar size reaches this


@dataclass
class RayConfig:
    address: str | None = None  # None: a local Ray (or $RAY_ADDRESS when set, as inside a Ray job)
    num_cpus: int | None = None  # local Ray only; None: every core


@dataclass
class PrepConfig:
    inputs: list[InputConfig] = field(default_factory=list)
    output_dir: str = "out/prep"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    chunk_bytes: int = 64 << 20  # target input bytes per Ray task (compressed bytes for .bz2)
    max_chars: int = DEFAULT_MAX_CHARS
    # Numbering is extended from this manifest (its keys keep their indices). None: the output
    # folder's own manifest.parquet when it exists (re-runs and appended inputs), else a fresh one.
    base_manifest: str | None = None
    keep_work: bool = False  # keep work/ (per-chunk tokens) after a finished run

    def validate(self, origin: str = "config") -> "PrepConfig":
        def fail(path: str, message: str) -> None:
            raise ConfigError(f"{origin}: {path}: {message}")

        if not self.inputs:
            fail("inputs", "must list at least one input (path, format, group, index_path)")
        for i, spec in enumerate(self.inputs):
            if not spec.path:
                fail(f"inputs[{i}].path", "must not be empty")
            if spec.format not in FORMATS:
                fail(f"inputs[{i}].format", f"{spec.format!r} is not one of {', '.join(FORMATS)}")
            if spec.max_chars is not None and spec.max_chars <= 0:
                fail(f"inputs[{i}].max_chars", f"must be > 0, got {spec.max_chars}")
        if not self.output_dir:
            fail("output_dir", "must not be empty")
        t = self.tokenizer
        if not 256 + 4 < t.vocab_size <= 2**31:
            fail("tokenizer.vocab_size", f"must be in (260, 2**31] (256 byte pieces + specials), got {t.vocab_size}")
        for name in ("sample_chars", "sample_chunks", "num_threads"):
            if getattr(t, name) <= 0:
                fail(f"tokenizer.{name}", f"must be > 0, got {getattr(t, name)}")
        if not 0 < t.character_coverage <= 1:
            fail("tokenizer.character_coverage", f"must be in (0, 1], got {t.character_coverage}")
        if not 0 <= t.seed < 2**32:
            fail("tokenizer.seed", f"must be in [0, 2**32), got {t.seed}")
        if self.shards.target_bytes <= 0:
            fail("shards.target_bytes", f"must be > 0, got {self.shards.target_bytes}")
        if self.chunk_bytes <= 0:
            fail("chunk_bytes", f"must be > 0, got {self.chunk_bytes}")
        if self.max_chars <= 0:
            fail("max_chars", f"must be > 0, got {self.max_chars}")
        if self.ray.num_cpus is not None and self.ray.num_cpus <= 0:
            fail("ray.num_cpus", f"must be > 0, got {self.ray.num_cpus}")
        return self


def project_root(config_path: str | Path) -> Path:
    """The folder relative config paths resolve against (see the module doc)."""
    start = Path(config_path).resolve().parent
    for folder in (start, *start.parents):
        if any((folder / m).exists() for m in _ROOT_MARKERS):
            return folder
    return start


def _resolve(value: str | None, root: Path) -> str | None:
    if value is None or value == GENSIM_SAMPLE:
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (root / p).resolve())


def resolve_paths(cfg: PrepConfig, root: Path, origin: str = "config") -> PrepConfig:
    """Make every path absolute against ``root``; ``gensim:enwiki-sample`` becomes the gensim dump.
    Missing inputs are reported here, naming the field, before any Ray work starts."""
    for i, spec in enumerate(cfg.inputs):
        if spec.path == GENSIM_SAMPLE:
            spec.path = str(gensim_sample_dump())
        elif spec.path.startswith("gensim:"):
            raise ConfigError(f"{origin}: inputs[{i}].path: unknown sample {spec.path!r}; the only one is {GENSIM_SAMPLE}")
        spec.path = _resolve(spec.path, root)
        spec.index_path = _resolve(spec.index_path, root)
        if not Path(spec.path).exists():
            raise ConfigError(f"{origin}: inputs[{i}].path: {spec.path} does not exist")
    cfg.output_dir = _resolve(cfg.output_dir, root)
    cfg.base_manifest = _resolve(cfg.base_manifest, root)
    cfg.tokenizer.model_path = _resolve(cfg.tokenizer.model_path, root)
    if cfg.tokenizer.model_path is not None and not Path(cfg.tokenizer.model_path).is_file():
        raise ConfigError(f"{origin}: tokenizer.model_path: {cfg.tokenizer.model_path} is not a file")
    if cfg.base_manifest is not None and not Path(cfg.base_manifest).is_file():
        raise ConfigError(f"{origin}: base_manifest: {cfg.base_manifest} is not a file")
    return cfg


def load_prep_config(path: str | Path, overrides: Iterable[str] = (), output_dir: str | None = None,
                     ray_address: str | None = None) -> PrepConfig:
    """Read, override, validate and resolve a prep config. ``output_dir`` (the CLI's ``--output``)
    resolves against the current directory, like any command-line path."""
    cfg = load_yaml_dataclass(PrepConfig, path, overrides)
    if output_dir is not None:
        cfg.output_dir = str(Path(output_dir).expanduser().resolve())
    if ray_address is not None:
        cfg.ray.address = ray_address
    return resolve_paths(cfg, project_root(path), origin=str(path))
