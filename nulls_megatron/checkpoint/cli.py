"""`nulls checkpoint verify` and `nulls checkpoint list`: what an operator needs before resuming or rolling back."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .atomic import LATEST, list_checkpoints, read_latest
from .digests import DIGESTS, read_digests, verify_share


def _root(arg: str) -> Path:
    path = Path(arg)
    for root in (path / "checkpoints", path):
        if root.is_dir() and (list_checkpoints(root) or (root / LATEST).exists()):
            return root
    raise FileNotFoundError(f"{path}: no checkpoints here (a run directory or its checkpoints/ folder)")


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def cmd_verify(args: argparse.Namespace) -> int:
    path = Path(args.checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    recorded = read_digests(path)
    problems = verify_share(path)
    if problems:
        print(f"{path}: FAILED")
        for p in problems:
            print(f"  {p}")
        return 1
    print(f"{path}: OK, {len(recorded)} files match {DIGESTS}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    root = _root(args.run_dir)
    try:
        latest = read_latest(root)
    except (OSError, ValueError) as e:
        latest = None
        print(f"warning: {e}")
    rows = []
    for step, path in list_checkpoints(root):
        state = {}
        try:
            state = json.loads((path / "train_state.json").read_text())
        except (OSError, ValueError):
            pass
        status = "unverified" if args.quick else ("verified" if not verify_share(path) else "DAMAGED")
        if read_digests(path) is None:
            status = "no digests"
        rows.append((path.name, step, _size(path), status, state.get("loss"), latest is not None and path == latest))
    print(f"{root}:")
    print(f"  {'checkpoint':<32}{'step':>8}{'size':>12}  {'status':<11}{'loss':>9}")
    for name, step, size, status, loss, is_latest in rows:
        loss_s = f"{loss:.4f}" if isinstance(loss, float) else "-"
        print(f"  {name:<32}{step:>8}{size / 2**20:>10.1f}MB  {status:<11}{loss_s:>9}" + ("  <- latest" if is_latest else ""))
    for aside in sorted(root.glob("rolled-back-*")):
        print(f"  (rolled back: {aside.name}: {', '.join(sorted(p.name for p in aside.iterdir()))})")
    return 0 if all(r[3] != "DAMAGED" for r in rows) else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoint", help="verify or list checkpoints (operating a run)",
                       description="Operate a run's checkpoints: verify one against its digests, list all of them.")
    inner = p.add_subparsers(dest="checkpoint_command", required=True)
    v = inner.add_parser("verify", help="check every file of a checkpoint against the digests written at save time")
    v.add_argument("checkpoint", metavar="DIR", help="a checkpoint directory, e.g. runs/x/checkpoints/step-000000200")
    v.set_defaults(func=cmd_verify)
    ls = inner.add_parser("list", help="the run's checkpoints: step, size, verified or not, which one is latest")
    ls.add_argument("run_dir", metavar="RUN_DIR", help="a run directory or its checkpoints/ folder")
    ls.add_argument("--quick", action="store_true", help="do not hash the files (large checkpoints)")
    ls.set_defaults(func=cmd_list)
