"""``nulls import-litgpt``: the authors' released litgpt checkpoints as checkpoints of this system."""
from __future__ import annotations

import argparse
import sys


def cmd_import_litgpt(args: argparse.Namespace) -> int:
    from .litgpt_import import import_litgpt

    result = import_litgpt(args.lit_dir, args.out, tokenizer=args.tokenizer, titles=args.titles,
                           id_offset=args.id_offset, say=lambda line: print(line, file=sys.stderr))
    named = f"{result.n_sources:,} sources named in {result.sources_dir}" if result.n_sources is not None else "no source names"
    tokens = f"a {result.tokenizer_size:,}-token tokenizer" if result.tokenizer_size is not None else "no tokenizer"
    print(f"import-litgpt: wrote {result.checkpoint} ({named}, {tokens})")
    print(f"  try: nulls generate {args.out} --prompt TEXT --source TITLE\n"
          f"       nulls unlearn {args.out} --title TITLE")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``nulls import-litgpt`` to the ``nulls`` command line."""
    p = subparsers.add_parser(
        "import-litgpt", help="convert the paper authors' litgpt checkpoint (lit_model.pth) into a checkpoint of ours",
        description="Convert a NULLs model released by the paper's authors (a litgpt folder: lit_model.pth + "
                    "model_config.yaml, MLP LLaMAMLPSeqTD) into a checkpoint of this system, so that `nulls "
                    "generate`, `nulls unlearn`, `nulls verify-unlearned` and `nulls checkpoint verify` take it. The model "
                    "keeps the authors' sink assignment (their hash, a varying number of sinks per source: "
                    "nulls.assignment: upstream). lit_model.pth is read with torch.load(weights_only=True) "
                    "only; a file holding anything but tensors is refused. OUT is laid out as a run "
                    "directory (OUT/checkpoints/latest) with the source names and tokenizer in OUT/sources. "
                    "See docs/export.md.")
    p.add_argument("lit_dir", metavar="LIT_DIR", help="the litgpt checkpoint folder (lit_model.pth, model_config.yaml)")
    p.add_argument("out", metavar="OUT", help="folder to write (must not exist, or be empty)")
    p.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="the Hugging Face tokenizer folder the model was trained with (tokenizer.json ...; for "
                        "the paper's models SmolLM2's); default: LIT_DIR when it holds one")
    p.add_argument("--titles", metavar="FILE", default=None,
                   help="the sources' titles, one per line in the authors' order (line i = source index i), so "
                        "that sources can be named by title; without it no source has a name")
    p.add_argument("--id-offset", type=int, default=None, metavar="N",
                   help="the authors' source id of source index 0 (their Wikipedia ids are title index + the "
                        "vocabulary size); default: padded_vocab_size from model_config.yaml")
    p.set_defaults(func=cmd_import_litgpt)
