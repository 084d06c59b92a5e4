"""The ``nulls`` command line: one subcommand per stage of the pipeline."""
from __future__ import annotations

import argparse
import sys
import warnings

import yaml

from .config import ConfigError, load_config


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/demo_cpu.yaml")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value by its dotted name, e.g. --set model.num_layers=4 (repeatable)",
    )


def cmd_config(args: argparse.Namespace) -> int:
    from .model_size import parameter_counts, pool_lost_after

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
    counts = parameter_counts(cfg)
    n = cfg.nulls
    print("\n# derived")
    print(f"# p_gen = n_backbone / I = {n.p_gen:.4f}   p_mem = k / n_pool = {n.p_mem:.4f}")
    print(f"# live MLP width per token: {n.n_backbone + n.sinks_per_source} of {cfg.model.ffn_hidden_size} "
          f"({(n.n_backbone + n.sinks_per_source) / cfg.model.ffn_hidden_size:.1%})")
    for name, value in counts.items():
        print(f"# params {name:>16}: {value:,}")
    lost = ", ".join(f"{k}: {pool_lost_after(cfg, k):.1%}" for k in (1, 10, 100, 1000))
    print(f"# pool shard lost after forgetting N sources of one shard -> {lost}")
    return 0


def cmd_sinks(args: argparse.Namespace) -> int:
    import torch

    from .sinks.assignment import assignment_from_config

    cfg = load_config(args.config, args.overrides)
    assignment = assignment_from_config(cfg.nulls)
    sources = torch.tensor(args.source, dtype=torch.int64)
    layers = range(cfg.model.num_layers) if cfg.nulls.per_layer_sinks and args.all_layers else [args.layer]
    shards = assignment.shard_of(sources)
    for i, source in enumerate(args.source):
        for layer in layers:
            rows = assignment.sinks_of(sources[i : i + 1], layer=layer)[0].tolist()
            where = f" layer {layer}" if cfg.nulls.per_layer_sinks else ""
            print(f"source {source}{where}: shard {int(shards[i])}, sinks {rows}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nulls", description="Natively unlearnable LMs on Megatron-core.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="validate a config and show derived sizes")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("sinks", help="show the shard and sink neurons a source owns")
    _add_config_args(p)
    p.add_argument("--source", type=int, nargs="+", required=True, help="dense source index (from the manifest)")
    p.add_argument("--layer", type=int, default=0, help="layer (matters only with per-layer sinks)")
    p.add_argument("--all-layers", action="store_true", help="with per-layer sinks, print every layer")
    p.set_defaults(func=cmd_sinks)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Megatron warns at import that Transformer Engine and Apex are absent; the CPU path does not use them.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (is|are) not installed.*")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"nulls {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
