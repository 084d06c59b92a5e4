"""`nulls unlearn` and `nulls verify-unlearned`: forget sources in the stored weights, and check it."""
from __future__ import annotations

import argparse
import sys

from .requests import Request, RequestError, parse_request_file

_REQUEST_FLAGS = (("--title", "title", "an article title (as in the sources manifest)"),
                  ("--page-id", "page_id", "a Wikipedia page id"),
                  ("--source-index", "index", "a dense source index"),
                  ("--group", "group", "a source group (e.g. a book series): all its sources"))


def _add_request_args(p: argparse.ArgumentParser, with_file: bool = True) -> None:
    for flag, kind, text in _REQUEST_FLAGS:
        p.add_argument(flag, dest=f"req_{kind}", action="append", default=[], metavar=kind.upper(),
                       help=f"{text} (repeatable)")
    if with_file:
        p.add_argument("--from-file", metavar="F", help="one request per line: a title, or index:N, page_id:N, "
                       "group:NAME, title:TEXT; '#' comments. All lines are checked before anything changes")
    p.add_argument("--manifest", metavar="PREP_DIR", help="sources manifest to resolve through (default: the one "
                   "recorded in the checkpoint at training time; its digest is checked)")


def _requests(args: argparse.Namespace) -> list[Request]:
    requests = []
    for flag, kind, _ in _REQUEST_FLAGS:
        requests += [Request(kind, str(v), flag) for v in getattr(args, f"req_{kind}")]
    if getattr(args, "from_file", None):
        requests += parse_request_file(args.from_file)
    return requests


def cmd_unlearn(args: argparse.Namespace) -> int:
    from .service import run_unlearn

    requests = _requests(args)
    if not requests:
        raise ValueError("name what to forget: --title, --page-id, --source-index, --group or --from-file")
    action = "restore" if args.restore else "suppress" if args.suppress else "erase"
    try:
        outcome = run_unlearn(args.checkpoint, requests, action=action, out=args.out, dry_run=args.dry_run,
                              manifest=args.manifest, purge_data=args.purge_data, json_path=args.json,
                              argv=["nulls", "unlearn", *sys.argv[2:]])
    except RequestError as e:
        for line in e.report:
            mark = "ok " if line["ok"] else "ERR"
            what = ", ".join(f"{i} {t!r}" for i, t in zip(line.get("sources", []), line.get("titles", []))) or line.get("error")
            print(f"  {mark} {line['origin']}: {line['request']} -> {what}", file=sys.stderr)
        raise
    return 0 if outcome is not None else 1


def cmd_verify(args: argparse.Namespace) -> int:
    from .service import run_verify
    from .verify import format_verification

    result = run_verify(args.checkpoint, receipt=args.receipt, requests=_requests(args), manifest=args.manifest)
    print(format_verification(result))
    return 0 if result.ok else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "unlearn", help="forget sources: zero their sink rows in a new checkpoint version, with a receipt",
        description="Forget training sources by zeroing their sink rows in the stored weights and optimizer state "
                    "(a new checkpoint version beside the old one; the backbone is hard-linked), after showing what "
                    "the deletion costs the other sources. Prints the receipt's sha256. See docs/unlearning.md.")
    p.add_argument("checkpoint", metavar="CKPT", help="a checkpoint directory, a checkpoint root or a run directory "
                   "(its latest checkpoint)")
    _add_request_args(p)
    p.add_argument("--out", metavar="DIR", help="write the new version here instead of beside CKPT (DIR must not exist)")
    p.add_argument("--dry-run", action="store_true", help="resolve and show the collateral; write nothing")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--suppress", action="store_true", help="mask only: flag the rows off but keep the weights "
                      "(reversible with --restore; the receipt says the weights were not erased)")
    mode.add_argument("--restore", action="store_true", help="lift an earlier --suppress")
    p.add_argument("--purge-data", metavar="PREP_DIR", help="also rewrite this prep output without the sources' "
                   "documents, so that no later run can learn them again")
    p.add_argument("--json", metavar="PATH", help="write the resolution, collateral and outcome as JSON")
    p.set_defaults(func=cmd_unlearn)

    p = sub.add_parser(
        "verify-unlearned", help="check that forgotten sources' rows are zero in every file of a checkpoint",
        description="Check a checkpoint against an unlearning receipt (or sources named by title/index): file "
                    "digests, the disabled set, and every row zero in every layer, shard and optimizer tensor. "
                    "Exit 0 when everything holds, 1 naming the file, layer and row otherwise.")
    p.add_argument("checkpoint", metavar="CKPT", help="a checkpoint directory, root or run directory")
    p.add_argument("--receipt", metavar="R", help="the receipt JSON written by `nulls unlearn`")
    _add_request_args(p, with_file=False)
    p.set_defaults(func=cmd_verify)
