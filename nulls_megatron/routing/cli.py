"""``nulls route-index``: build the nearest-source routing index of a checkpoint."""
from __future__ import annotations

import argparse
import sys
import time


def cmd_route_index(args: argparse.Namespace) -> int:
    from .build import build_index, resolve_checkpoint

    start = time.perf_counter()
    info = build_index(args.checkpoint, kind=args.kind, manifest=args.manifest, opening_tokens=args.opening_tokens,
                       progress=not args.no_progress, log=lambda line: print(line, file=sys.stderr))
    where = resolve_checkpoint(args.checkpoint) / "routing"
    print(f"route-index: embedded {info['sources']:,} sources by {info['kind']} with {info['model']} "
          f"in {time.perf_counter() - start:.1f}s -> {where}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``nulls route-index`` to the ``nulls`` command line."""
    from .build import OPENING_TOKENS

    p = subparsers.add_parser(
        "route-index", help="embed every source's title (or opening) for nearest-source routing",
        description="Embed every source of a checkpoint's sources manifest with all-MiniLM-L6-v2 (offline) and "
                    "store the index in CKPT/routing/ (embeddings.safetensors + index.json). `nulls generate "
                    "--mode route` without --source routes each prompt to the nearest surviving source by "
                    "cosine similarity, as in the paper. Build once per checkpoint; forgotten sources are "
                    "excluded at query time, so unlearning needs no rebuild.")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory (or a checkpoints root / run dir with `latest`)")
    p.add_argument("--from", dest="kind", choices=("title", "opening"), default="title",
                   help="embed titles (the paper's choice, default) or the first --opening-tokens tokens of "
                        "each document")
    p.add_argument("--opening-tokens", type=int, default=OPENING_TOKENS,
                   help="tokens of each document's opening to embed with --from opening (default: %(default)s)")
    p.add_argument("--manifest", metavar="PREP_DIR", default=None,
                   help="prep folder holding the sources manifest, when it moved since training (digest-checked)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_route_index)
