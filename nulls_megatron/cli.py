"""The ``nulls`` command line: one subcommand per stage of the pipeline."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import yaml

from .config import ConfigError, load_config
from .demo import DemoOptions


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
    ep = cfg.parallel.expert_parallel
    if ep > 1:
        print(f"# expert-parallel pool: {n.n_pool // ep:,} sink rows per layer on each of {ep} ranks "
              f"({n.pool_shards // ep} pool shards each); {counts['sinks'] // ep:,} sink parameters per rank")
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


def cmd_demo(args: argparse.Namespace) -> int:
    from data_prep.config import load_prep_config
    from data_prep.pipeline import run_prep

    from .demo import DemoOptions, documents_from_prep, run_demo

    import dataclasses
    import json
    import shutil

    cfg = load_config(args.config, args.overrides)
    out = Path(args.output)
    if args.fresh and out.exists():
        print(f"demo: --fresh: removing {out}")
        shutil.rmtree(out)
    prep_dir = out / "prep"
    # The tokenizer is trained to the model's vocabulary size.
    prep_cfg = load_prep_config(args.prep_config, [f"tokenizer.vocab_size={cfg.model.vocab_size}"], output_dir=str(prep_dir))
    # A finished prep of the same config is reused: a rerun of the demo does not redo it.
    stamp, wanted = prep_dir / ".demo_prep.json", json.dumps(dataclasses.asdict(prep_cfg), sort_keys=True, default=str)
    if stamp.is_file() and stamp.read_text() == wanted and (prep_dir / "prep_report.json").is_file():
        summary = json.loads((prep_dir / "prep_report.json").read_text())
        print(f"demo: reusing the finished prep in {prep_dir} (--fresh redoes it)")
    else:
        summary = run_prep(prep_cfg)
        stamp.write_text(wanted)
    print(f"demo: prep: {summary['sources']} sources, {summary['tokens']:,} tokens in {summary['shards']} shards in {prep_dir}")
    _, titles = documents_from_prep(prep_dir)
    options = DemoOptions(epochs=args.epochs, max_doc_tokens=args.max_doc_tokens, batch_rows=args.batch_rows, lr=args.lr,
                          forget=args.forget, holdout=args.holdout, nproc=args.nproc, seed=args.seed)
    run_demo(cfg, prep_dir, titles, options, out, config_path=args.config)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import os

    cfg = load_config(args.config, args.overrides)
    if "WORLD_SIZE" not in os.environ and not args.resume_from:
        # A finished run is told so before any process starts or Megatron is imported (~10 s for two ranks).
        from .checkpoint.train_state import CHECKPOINTS, finished_checkpoint, finished_message

        finished = finished_checkpoint(Path(cfg.train.run_dir) / CHECKPOINTS, cfg.train.steps)
        if finished is not None:
            print(finished_message(*finished, cfg.train.steps), flush=True)
            return 0
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        # One machine, several processes: hand over to torchrun, which calls this command on every rank.
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
                "-m", "nulls_megatron.cli", "train", "--config", args.config]
        for item in args.overrides:
            argv += ["--set", item]
        if args.resume_from:
            argv += ["--resume-from", args.resume_from]
        os.execv(sys.executable, argv)
    from .train.trainer import train

    result = train(cfg, config_path=args.config, resume_from=args.resume_from)
    if result.losses and int(os.environ.get("RANK", "0")) == 0:
        print(f"train: {result.steps_run} steps, final step {result.final_step}, last loss {result.losses[-1]:.4f}, "
              f"checkpoint {result.checkpoint}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nulls", description="Natively unlearnable LMs on Megatron-core.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="validate a config and show derived sizes",
                       description="Load a model config (YAML plus --set overrides), validate it, and print every "
                       "resolved value with the sizes derived from it (parameters, active parameters, sink pool).")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("sinks", help="show the shard and sink neurons a source owns",
                       description="Show which pool shard and which k sink neurons a source owns under a config's "
                       "assignment (a pure function of the source index: no checkpoint needed).")
    _add_config_args(p)
    p.add_argument("--source", type=int, nargs="+", required=True, help="dense source index (from the manifest)")
    p.add_argument("--layer", type=int, default=0, help="layer (matters only with per-layer sinks)")
    p.add_argument("--all-layers", action="store_true", help="with per-layer sinks, print every layer")
    p.set_defaults(func=cmd_sinks)

    from data_prep import cli as prep_cli

    prep_cli.register(sub)
    from .routing import cli as routing_cli; routing_cli.register(sub)  # noqa: E702  (nulls route-index)
    from .inference import cli as inference_cli; inference_cli.register(sub)  # noqa: E702  (nulls generate)

    p = sub.add_parser("train", help="train (or resume) a NULLs GPT on the shards of `nulls prep`",
                       description="Train a NULLs GPT on the shards of `nulls prep` (TP x PP x DP from the config's "
                       "parallel section; --nproc launches the processes on this machine). Rerunning the same "
                       "command resumes from the run directory's latest checkpoint.")
    _add_config_args(p)
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine (launches torchrun); under torchrun/srun leave at 1")
    p.add_argument("--resume-from", metavar="STEP", help="roll back to this checkpoint (a step, or a name like "
                   "step-000000200) and resume from it; newer checkpoints move aside into rolled-back-<time>/")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="the main job: prep the embedded Wikipedia sample, train a NULLs GPT and its "
                       "oracle, forget 3 articles, evaluate, export",
                       description="The main job on the embedded Wikipedia sample: prep, a NULLs GPT and its oracle "
                       "(retrained without 3 articles) on 2 processes, `nulls unlearn` of the 3 articles with a "
                       "receipt, `nulls eval` against the oracle, `nulls export` reloaded by transformers, all in "
                       "one MLflow store. A rerun reuses finished stages (--fresh redoes them).")
    p.add_argument("--config", default="configs/demo_cpu.yaml", help="model config (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="model config override")
    p.add_argument("--prep-config", default="configs/prep_gensim_sample.yaml", help="data config (default: %(default)s)")
    p.add_argument("--output", default="runs/demo", help="run directory (default: %(default)s)")
    defaults = DemoOptions()
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--max-doc-tokens", type=int, default=defaults.max_doc_tokens, help="cut documents to this many tokens")
    p.add_argument("--batch-rows", type=int, default=defaults.batch_rows)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--forget", type=int, default=defaults.forget, help="how many sources to forget")
    p.add_argument("--holdout", type=int, default=defaults.holdout, help="articles held out of all training (holdout text)")
    p.add_argument("--nproc", type=int, default=defaults.nproc, help="training processes (default: %(default)s)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--fresh", action="store_true", help="redo every stage (a rerun reuses finished prep and training)")
    p.set_defaults(func=cmd_demo)

    from .checkpoint import cli as checkpoint_cli
    from .export import cli as export_cli
    from .unlearn import cli as unlearn_cli

    unlearn_cli.register(sub)
    checkpoint_cli.register(sub)
    export_cli.register(sub)
    from .eval import cli as eval_cli; eval_cli.register(sub)  # noqa: E702  (nulls eval)
    from .export import litgpt_cli; litgpt_cli.register(sub)  # noqa: E702  (nulls import-litgpt)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Megatron warns at import that Transformer Engine and Apex are absent; the CPU path does not use
    # them. A warnings filter, not a patch: it stays here so that --help imports no torch.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (is|are) not installed.*")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        print(f"nulls {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
