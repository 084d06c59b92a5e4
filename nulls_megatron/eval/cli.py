"""``nulls eval``: forgetting against a retrained oracle (docs/evaluation.md)."""
from __future__ import annotations

import argparse
from pathlib import Path


def cmd_eval(args: argparse.Namespace) -> int:
    from ..unlearn.requests import Request, parse_request_file
    from .evaluate import EvalOptions
    from .report import markdown
    from .service import EvalRequest, run_eval

    requests = [Request("title", t, "--forget") for t in args.forget]
    requests += [Request("group", g, "--group") for g in args.group]
    requests += [Request("index", str(i), "--source-index") for i in args.source_index]
    if args.forget_file:
        requests += parse_request_file(args.forget_file)
    if not requests:
        raise ValueError("name the forget set: titles, --forget-file, --group or --source-index")
    if args.oracle and args.train_oracle:
        raise ValueError("--oracle and --train-oracle exclude each other")
    options = EvalOptions(modes=tuple(args.modes.split(",")), retain_docs=args.retain_docs,
                          holdout_docs=args.holdout_docs, verbmem_docs=args.verbmem_docs,
                          verbmem_tokens=args.verbmem_tokens, probes=args.probes, seed=args.seed)
    req = EvalRequest(model=args.model, forget=requests, holdout=args.holdout, out=Path(args.out), oracle=args.oracle,
                      train_oracle=args.train_oracle, before=args.before, manifest=args.manifest,
                      tracking_uri=args.tracking_uri, experiment=args.experiment, oracle_nproc=args.oracle_nproc)
    from .studies import baselines_and_relearning, sustainability_study

    extras = []
    methods = [m for m in args.baselines.split(",") if m] if args.baselines else []
    if methods or args.relearn_steps:
        extras.append(lambda index: baselines_and_relearning(methods, args.relearn_steps, index, args.dense,
                                                             args.baseline_steps))
    if args.sustainability:
        sizes = [int(x) for x in args.sustainability.split(",")]
        extras.append(lambda index: sustainability_study(sizes))
    result = run_eval(req, options, extras=extras)
    print(markdown(result))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``nulls eval`` to the ``nulls`` command line."""
    p = subparsers.add_parser(
        "eval", help="measure forgetting against a retrained oracle (losses per mode, VerbMem, PrivLeak, ...)",
        description="Score the model that forgot, the same model before, and a model retrained without the "
                    "forget set on forget, retained and holdout documents in every deployment mode (own sinks, "
                    "nearest surviving source, backbone only, expected), with the share of memorisation removed, "
                    "VerbMem, Truth Ratio on cloze probes, PrivLeak and forget quality. A checkpoint whose forget "
                    "set is still live is unlearned first with `nulls unlearn` (into OUT; your run is untouched). "
                    "Results: OUT/eval.json, eval.md, losses.png, and an MLflow run. See docs/evaluation.md.")
    p.add_argument("--model", required=True, help="checkpoint (dir, checkpoints root or run dir) or a `nulls export` folder")
    p.add_argument("forget", nargs="*", metavar="TITLE", help="titles of the sources to forget")
    p.add_argument("--forget-file", help="requests, one per line (as `nulls unlearn --from-file`)")
    p.add_argument("--group", action="append", default=[], help="a source group (e.g. a book series); repeatable")
    p.add_argument("--source-index", action="append", type=int, default=[], help="a source index; repeatable")
    p.add_argument("--holdout", required=True, help="held-out text never trained on: JSONL {\"text\"} or a prep folder")
    p.add_argument("--oracle", help="a checkpoint trained without the forget set (same config, seed, schedule)")
    p.add_argument("--train-oracle", action="store_true", help="train that oracle now (into OUT/oracle)")
    p.add_argument("--oracle-nproc", type=int, help="processes for --train-oracle (default: TP x PP x EP of the run)")
    p.add_argument("--before", help="the model before unlearning (default: found beside the unlearned checkpoint)")
    p.add_argument("--out", default="eval", help="report folder (default: %(default)s)")
    p.add_argument("--modes", default="own,nearest,backbone,expected", help="modes to score (default: %(default)s)")
    p.add_argument("--retain-docs", type=int, default=100, help="retained documents sampled (default: %(default)s)")
    p.add_argument("--holdout-docs", type=int, default=100, help="holdout documents used (default: %(default)s)")
    p.add_argument("--verbmem-docs", type=int, default=50, help="forget documents for VerbMem (default: %(default)s)")
    p.add_argument("--verbmem-tokens", type=int, default=128, help="continuation length (default: %(default)s)")
    p.add_argument("--probes", help="cloze probes JSONL (default: built from the documents)")
    p.add_argument("--manifest", metavar="PREP_DIR", help="prep folder, when it moved since training")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--experiment", default="nulls-eval", help="MLflow experiment (default: %(default)s)")
    p.add_argument("--baselines", help="post-hoc unlearning baselines applied to the model before unlearning: "
                   "ga, npo or ga,npo")
    p.add_argument("--baseline-steps", type=int, default=20, help="fine-tuning steps of each baseline (default: %(default)s)")
    p.add_argument("--dense", help="a standard transformer of the same active size (a checkpoint; see "
                   "docs/evaluation.md): the baselines are applied to it too")
    p.add_argument("--relearn-steps", type=int, default=0,
                   help="run the relearning attack for this many steps (0: skip; the paper's: 30)")
    p.add_argument("--sustainability", metavar="N,N,...",
                   help="forget this many sources in sequence (e.g. 1,10,100) and plot the retained loss")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_eval)
