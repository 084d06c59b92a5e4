"""The sources folder of an imported checkpoint: what a prep folder holds for a trained one.

Requests (``nulls unlearn --title``), generation and routing resolve source names through the
sources manifest a checkpoint records, and read the tokenizer beside it. For a litgpt import there
was no prep: the folder is written from the ``--titles`` file (line ``i`` = source index ``i``, the
authors' title index; the upstream id is ``i + id_offset``) by the prep's own manifest writers, and
holds a copy of the Hugging Face tokenizer in ``hf_tokenizer/``. No shards: the training data is
not part of a released checkpoint (``n_tokens`` is 0 and ``shard`` null for every source).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ..routing.hf_tokenizer import HF_TOKENIZER_DIR, HFTokenizer, is_hf_tokenizer_dir
from ..unlearn.requests import read_utf8

# The files of a Hugging Face tokenizer folder (a litgpt checkpoint folder holds them beside the weights).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")
KEY_PREFIX = "litgpt-source:"


def read_titles(path: str | Path) -> list[str]:
    """One title per line (UTF-8; a final newline ends the last line, it does not add a source)."""
    path = Path(path)
    text = read_utf8(path, "titles file")
    # Split on newlines only: str.splitlines would also split on U+2028 and friends inside a title.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    titles = [line.removesuffix("\r") for line in lines]
    if not titles:
        raise ValueError(f"{path}: no titles (one title per line; line i names source index i)")
    return titles


def find_tokenizer(lit_dir: Path, given: str | Path | None) -> Path | None:
    """The Hugging Face tokenizer folder to copy: ``--tokenizer``, else the litgpt folder when it holds one."""
    if given is not None:
        path = Path(given)
        if not is_hf_tokenizer_dir(path):
            raise FileNotFoundError(f"{path}: not a Hugging Face tokenizer folder (no tokenizer.json or "
                                    "tokenizer_config.json)")
        return path
    return lit_dir if is_hf_tokenizer_dir(lit_dir) else None


def check_tokenizer(path: Path, vocab_rows: int) -> int:
    """Load the tokenizer offline (as the system will) and check it fits the embedding; returns its size."""
    size = HFTokenizer(path).get_piece_size()
    if size > vocab_rows:
        raise ValueError(f"{path}: the tokenizer has {size} tokens, more than the model's {vocab_rows} embedding "
                         "rows: not the tokenizer this model was trained with")
    return size


def write_sources_folder(out: Path, titles: list[str] | None, tokenizer: Path | None) -> None:
    """Write ``out`` (created): the sources manifest and title index, and the tokenizer copy."""
    out.mkdir(parents=True)
    if tokenizer is not None:
        dest = out / HF_TOKENIZER_DIR
        dest.mkdir()
        for name in TOKENIZER_FILES:
            if (tokenizer / name).is_file():
                shutil.copy2(tokenizer / name, dest / name)
    if titles is not None:
        _write_manifest(out, titles)


def _write_manifest(out: Path, titles: list[str]) -> None:
    import pyarrow as pa

    from data_prep.manifest import MANIFEST_NAME, table_fetcher, title_hashes, write_manifest, write_title_index

    n = len(titles)
    docs = pa.table({
        "key": [f"{KEY_PREFIX}{i}" for i in range(n)], "title": titles,
        "page_id": pa.nulls(n, pa.int64()), "url": pa.nulls(n, pa.string()), "group": pa.nulls(n, pa.string()),
        "input_index": pa.nulls(n, pa.int32()),
    })
    write_manifest(out / MANIFEST_NAME, table_fetcher(docs), np.arange(n), n, None, np.zeros(n, np.int64),
                   np.full(n, -1, np.int64))
    write_title_index(out, title_hashes(titles))
