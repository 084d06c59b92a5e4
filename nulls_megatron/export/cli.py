"""``nulls export``: a trained or unlearned checkpoint as a Hugging Face model folder."""
from __future__ import annotations

import argparse
import sys


def cmd_export(args: argparse.Namespace) -> int:
    from .service import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.out, mode=args.mode, dtype=args.dtype, manifest=args.manifest,
                               max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                               log=lambda line: print(line, file=sys.stderr))
    off = f", {len(result.forgotten)} forgotten sources left out" if result.forgotten else ""
    remote = ", trust_remote_code=True" if result.mode == "routed" else ""
    print(f"export: {result.mode} model, {result.parameters:,} parameters (MLP width {result.intermediate_size})"
          f"{off}, {len(result.files)} files in {result.seconds:.1f}s -> {result.out}\n"
          f"load it with: AutoModelForCausalLM.from_pretrained({str(result.out)!r}{remote})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``nulls export`` to the ``nulls`` command line."""
    p = subparsers.add_parser(
        "export", help="write a checkpoint as a Hugging Face model (transformers, lm-eval, vLLM load it)",
        description="Write a checkpoint of any training layout as a Hugging Face folder, in one CPU process. "
                    "--mode backbone / expected: a vanilla LlamaForCausalLM (no remote code): the backbone "
                    "alone, or the backbone plus every live sink at its expected weight; forgotten sources' "
                    "sinks are absent. --mode routed: a NullsForCausalLM (trust_remote_code=True) that uses "
                    "one source's sinks per sequence, chosen by `source_ids` or routed to the nearest surviving "
                    "source by the shipped MiniLM router. The tokenizer, a model card (README.md) and "
                    "nulls_export.json go beside the safetensors weights. See docs/export.md.")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory (or a checkpoints root / run dir with `latest`)")
    p.add_argument("out", metavar="OUT", help="folder to write (must not exist, unless --overwrite)")
    p.add_argument("--mode", choices=("backbone", "expected", "routed"), default="expected",
                   help="what the exported MLPs hold (default: %(default)s)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weight dtype (default: %(default)s)")
    p.add_argument("--manifest", metavar="PREP_DIR", default=None,
                   help="prep folder holding the sources manifest and tokenizer, when it moved since training")
    p.add_argument("--max-shard-size", default="2GB",
                   help="split the weights into safetensors shards of at most this size, with an index "
                        "(default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_export)
