"""The main job, ``nulls demo``: the whole system on the embedded real Wikipedia sample, on one machine.

Stages (each reuses its finished output on a rerun; ``--fresh`` redoes them all):
1. prep (done by the CLI): the 206-page dump the ``gensim`` wheel ships -> shards, manifest, tokenizer;
2. train the NULLs model with ``nulls train`` on ``nproc`` CPU processes (data parallel), holding out
   a seeded draw of articles that no model sees (the holdout text);
3. train the oracle: the same config, seed and schedule without the articles to forget;
4. ``nulls unlearn`` those articles (a new checkpoint version, a receipt) and ``verify-unlearned``;
5. ``nulls eval`` against the oracle (losses in every mode, memorisation removed, VerbMem, ...);
6. ``nulls export`` the unlearned model (vanilla Llama, ``expected`` mode) and reload it with transformers.
Everything is tracked in one MLflow store, ``<output>/mlflow.db``, unless ``MLFLOW_TRACKING_URI`` is set.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from .checkpoint.atomic import atomic_file, checkpoint_version, read_latest, version_name
from .config import Config


@dataclass
class DemoOptions:
    epochs: int = 8
    max_doc_tokens: int = 512  # documents are cut to this: many short sources, several epochs (METHOD.md 6)
    batch_rows: int = 8
    lr: float = 3e-3
    warmup: int = 20
    forget: int = 3
    holdout: int = 16  # articles no model trains on: the holdout text of the evaluation
    nproc: int = 2
    verbmem_tokens: int = 64
    seed: int = 0


def documents_from_prep(prep_dir: Path) -> tuple[list[tuple[int, np.ndarray]], dict[int, str]]:
    """Every document of a `nulls prep` output, in source order, with the titles."""
    from .eval.documents import prep_documents

    docs = prep_documents(prep_dir)
    return [(d.source, d.tokens) for d in docs], {d.source: d.title for d in docs}


def demo_train_config(cfg: Config, prep_dir: Path, documents: list[tuple[int, np.ndarray]], options: DemoOptions,
                      out_dir: Path, exclude: list[int]) -> Config:
    """``cfg`` with a ``train`` section for the demo: ``options.epochs`` passes over the cut documents."""
    tokens = sum(min(len(t), options.max_doc_tokens) for s, t in documents if s not in set(exclude))
    steps = options.epochs * math.ceil(math.ceil(tokens / cfg.model.seq_length) / options.batch_rows)
    return dataclasses.replace(
        cfg,
        optimizer=dataclasses.replace(cfg.optimizer, lr=options.lr, min_lr=0.0, warmup_steps=options.warmup),
        train=dataclasses.replace(
            cfg.train, data=str(prep_dir), run_dir=str(out_dir / "train"), steps=steps,
            micro_batch_rows=options.batch_rows // options.nproc, global_batch_rows=options.batch_rows,
            max_document_tokens=options.max_doc_tokens, save_every=0, log_every=max(1, steps // 20),
            exclude_sources=sorted(exclude),
        ),
        tracking=dataclasses.replace(cfg.tracking, experiment="nulls-demo", run_name="nulls"),
        seed=options.seed,
    )


def _train(config_path: Path, nproc: int, what: str) -> None:
    print(f"demo: training {what} on {nproc} processes (`nulls train --config {config_path} --nproc {nproc}`)",
          flush=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "nulls_megatron.cli", "train", "--config", str(config_path),
                           "--nproc", str(nproc)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"demo: training {what} failed (exit {done.returncode}); config {config_path}")
    print(f"demo: {what} trained in {time.perf_counter() - start:.0f}s", flush=True)


def _draw(sources: list[int], n: int, seed: int, avoid: set[int]) -> list[int]:
    pool = [s for s in sources if s not in avoid]
    order = np.random.default_rng(seed).permutation(len(pool))
    return sorted(pool[i] for i in order[:n])


def run_demo(cfg: Config, prep_dir: Path, titles: dict[int, str], options: DemoOptions, out_dir: Path,
             config_path: str | None = None) -> dict:
    """Stages 2-6 of the module doc; returns (and writes) ``demo_report.json``."""
    from .eval.evaluate import EvalOptions
    from .eval.oracle import train_oracle
    from .eval.service import EvalRequest, run_eval
    from .export.service import export_checkpoint
    from .unlearn.requests import Request
    from .unlearn.service import run_unlearn, run_verify
    from .unlearn.verify import format_verification

    start = time.perf_counter()
    out_dir = out_dir.resolve()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out_dir / 'mlflow.db'}")
    tracking_uri = os.environ["MLFLOW_TRACKING_URI"]
    documents, _ = documents_from_prep(prep_dir)
    sources = sorted({s for s, _ in documents})
    lengths = {s: len(t) for s, t in documents}
    holdout = _draw(sources, options.holdout, options.seed + 2, set())
    # Articles to forget: long enough to have something to memorise and to continue (VerbMem).
    long_enough = {s for s in sources if lengths[s] >= 2 * options.verbmem_tokens}
    forget = _draw(sorted(long_enough), options.forget, options.seed + 1, set(holdout))
    cfg = demo_train_config(cfg, prep_dir, documents, options, out_dir, holdout)
    train_yaml = out_dir / "train_config.yaml"
    train_yaml.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    print(f"demo: {len(documents)} documents as {len(sources)} sources (each cut to {options.max_doc_tokens} tokens); "
          f"{len(holdout)} held out, {len(forget)} to forget: {', '.join(repr(titles[s]) for s in forget)}; "
          f"{options.epochs} epochs = {cfg.train.steps} steps of {options.batch_rows} rows x {cfg.model.seq_length} tokens",
          flush=True)

    _train(train_yaml, options.nproc, "the NULLs model")
    final = read_latest(out_dir / "train" / "checkpoints")
    step, _ = checkpoint_version(final.name)
    trained = final.parent / version_name(step, 0)  # `latest` may already name the unlearned version
    oracle = train_oracle(trained, forget, out_dir, options.nproc)

    requests = [Request("index", str(s), "demo") for s in forget]
    outcome = run_unlearn(final, requests, say=lambda line: print(f"unlearn: {line}"))  # a rerun: already forgotten
    unlearned = outcome.written.path if outcome.written else final
    last = json.loads((unlearned / "sinks" / "manifest.json").read_text())["receipts"][-1]
    receipt, receipt_sha256 = unlearned / last["name"], last["sha256"]
    verification = run_verify(unlearned, requests=requests)
    print(f"unlearn: {format_verification(verification)}", flush=True)

    holdout_jsonl = out_dir / "holdout.jsonl"
    from .routing.build import read_tokenizer

    tokenizer = read_tokenizer(prep_dir)
    with atomic_file(holdout_jsonl) as tmp:
        tmp.write_text("".join(json.dumps({"title": titles[s], "text": tokenizer.decode(t.tolist())}) + "\n"
                               for s, t in documents if s in set(holdout)))
    eval_options = EvalOptions(max_tokens=options.max_doc_tokens, retain_docs=100, holdout_docs=options.holdout,
                               verbmem_tokens=options.verbmem_tokens, seed=options.seed)
    stamp = json.dumps({"after": str(unlearned), "before": str(trained), "oracle": str(oracle), "forget": forget,
                        "holdout": holdout, "options": dataclasses.asdict(eval_options)}, sort_keys=True)
    stamp_path = out_dir / "eval" / ".demo_eval.json"
    if stamp_path.is_file() and stamp_path.read_text() == stamp and (out_dir / "eval" / "eval.json").is_file():
        print(f"demo: reusing the finished evaluation in {out_dir / 'eval'}")
        result = json.loads((out_dir / "eval" / "eval.json").read_text())
    else:
        result = run_eval(EvalRequest(model=str(unlearned), forget=requests, holdout=str(holdout_jsonl),
                                      out=out_dir / "eval", oracle=str(oracle), before=str(trained),
                                      tracking_uri=tracking_uri, experiment="nulls-demo"), eval_options)
        stamp_path.write_text(stamp)

    exported = out_dir / "hf_expected"
    info = exported / "nulls_export.json"
    if info.is_file() and json.loads(info.read_text())["checkpoint"] == str(unlearned):
        print(f"demo: reusing the export in {exported}")
    else:
        export_checkpoint(unlearned, exported, mode="expected", overwrite=True)
    retained = next(s for s in sources if s not in set(forget) | set(holdout))
    reloaded = _reload_with_transformers(exported, f"{titles[retained]} is")

    losses = result["losses"]
    report = {
        "sources": len(sources), "holdout_sources": holdout, "steps": cfg.train.steps, "epochs": options.epochs,
        "forgotten": [{"source": s, "title": titles[s]} for s in forget],
        "losses": {role: losses[role][mode] for role, mode in (("before", "own"), ("after", "nearest"),
                                                               ("oracle", "nearest"))},
        "after_backbone": losses["after"]["backbone"],
        "memorisation_removed": result["summary"]["nearest"].get("memorisation_removed"),
        "verbmem": result["verbmem"],
        "trained_checkpoint": str(trained), "unlearned_checkpoint": str(unlearned), "oracle_checkpoint": str(oracle),
        "receipt": str(receipt), "receipt_sha256": receipt_sha256,
        "verified": verification.ok, "eval_report": str(out_dir / "eval" / "eval.md"),
        "exported": str(exported), "transformers_continuation": reloaded,
        "mlflow_tracking_uri": tracking_uri, "eval_mlflow_run_id": result["mlflow_run_id"],
        "seconds": time.perf_counter() - start,
    }
    with atomic_file(out_dir / "demo_report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    print(summary_table(report))
    return report


def _reload_with_transformers(folder: Path, prompt: str) -> str:
    """Load the export as anyone would (no code of ours) and continue a prompt greedily."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.unk_token_id)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
    print(f"demo: reloaded {folder} with transformers ({type(model).__name__}); {prompt!r} -> {text!r}", flush=True)
    return text


def summary_table(report: dict) -> str:
    """What a newcomer reads at the end: the losses before, after and for the oracle, and where things are."""
    L = report["losses"]
    rows = [("forgotten articles", "forget"), ("retained articles", "retain"), ("held-out articles", "holdout")]
    lines = ["", f"Forgot {len(report['forgotten'])} articles: " + "; ".join(f['title'] for f in report["forgotten"]), "",
             "loss (nats/token)      before   after   oracle (retrained without them)",
             "--------------------   ------   -----   ------"]
    for label, key in rows:
        lines.append(f"{label:<22} {L['before'][key]:6.3f}  {L['after'][key]:6.3f}   {L['oracle'][key]:6.3f}")
    vm = report["verbmem"]
    removed = report["memorisation_removed"]
    lines += [
        "",
        f"after = sinks zeroed, prompt routed to the nearest surviving article (the paper's Sink-Off); "
        f"share of memorisation removed: {removed:.2f}" if removed is not None and not math.isnan(removed) else
        "after = sinks zeroed, routed to the nearest surviving article (the paper's Sink-Off)",
        f"VerbMem (ROUGE-L of greedy continuations of the forgotten articles): before {vm['before']:.3f}, "
        f"after {vm['after']:.3f}, oracle {vm['oracle']:.3f}",
        "",
        f"receipt:          {report['receipt']} (verified: {report['verified']})",
        f"unlearned model:  {report['unlearned_checkpoint']}",
        f"Hugging Face:     {report['exported']}  (AutoModelForCausalLM.from_pretrained)",
        f"full evaluation:  {report['eval_report']}",
        f"look further:     mlflow ui --backend-store-uri {report['mlflow_tracking_uri']}",
        f"({report['seconds']:.0f}s)",
    ]
    return "\n".join(lines)
