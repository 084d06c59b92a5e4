"""``nulls prep``: run (or resume) the data preparation job.

    nulls prep --config configs/prep_gensim_sample.yaml [--ray-address ADDR] [--output DIR] [key=value ...]

``register(subparsers)`` adds the subcommand to the main ``nulls`` parser; ``python -m data_prep.cli``
runs it standalone (same arguments, without the ``prep`` word).
"""
from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = """\
Prepare training data: read the inputs of a prep config (Wikipedia dumps, JSONL, WikiText, books),
train or reuse the tokenizer, number every source in the sources manifest, and write tokenized
webdataset shards, on a local Ray or a Ray cluster. A killed run resumes where it stopped; a rerun
with more inputs keeps every earlier source index. Skipped records are counted in prep_report.json.

  nulls prep --config configs/prep_gensim_sample.yaml
  nulls prep --config configs/prep_enwiki_full.yaml --ray-address auto tokenizer.vocab_size=32000
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="prep YAML config, e.g. configs/prep_gensim_sample.yaml")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster to run on (host:6379, ray://host:10001, auto); default: a local Ray")
    parser.add_argument("--output", default=None, help="output folder (overrides output_dir; relative to the current dir)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by its dotted name (repeatable)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="overrides as dotted.key=value, e.g. tokenizer.vocab_size=8000 shards.target_bytes=100000000")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "prep", help="turn Wikipedia dumps / books into tokenizer, sources manifest and webdataset shards (Ray)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    """Run the job; config and input errors propagate as ValueError subclasses naming the field/file."""
    from data_prep.config import load_prep_config
    from data_prep.pipeline import run_prep

    cfg = load_prep_config(args.config, [*args.set_overrides, *args.overrides], output_dir=args.output,
                           ray_address=args.ray_address)
    summary = run_prep(cfg, progress=not args.no_progress)
    print(f"prep: {summary['documents']:,} documents, {summary['tokens']:,} tokens, {summary['shards']} shards "
          f"-> {cfg.output_dir}")
    print(json.dumps(summary))
    return 0


def _standalone(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.cli", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return main(args)
    except (ValueError, FileNotFoundError) as err:  # ConfigError and InputError are ValueErrors
        print(f"nulls prep: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_standalone())
