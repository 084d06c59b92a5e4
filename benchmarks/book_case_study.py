"""Benchmark: the book case study. Unlearn a book series by its group, and check that its text cannot
be pulled back out.

The NULLs paper's case study forgets the Harry Potter books; ours forgets the five Sherlock Holmes
books of ``../shared/data/books`` (public domain; each book one source, the five one group
``sherlock_holmes``) trained among a seeded sample of the 2018 Wikipedia articles (every article
its own source), with the model of the reproduction report (``configs/repro_small.yaml``; books and
articles whole, no token cut):

1. data: the article sample (OUT/data/wiki.jsonl) and ``nulls prep`` of it with the books as one group;
2. train with ``nulls train``: the NULLs model, and the retrained oracle without the five books (same
   config, seed and schedule, ``train.exclude_sources``);
3. evaluate: ``nulls unlearn --group sherlock_holmes`` of the NULLs model; NPO (open-unlearning's
   default: beta 0.1, retain NLL added) post hoc on the NULLs model on book passages; then for the
   model before unlearning (its own sinks), after (Sink-Off: each passage routed to the nearest
   surviving source by its book's title), the oracle (the same routing) and NPO (own sinks):
   - loss on book passages (nats/token);
   - VerbMem: ROUGE-L F1 of greedy 128-token continuations of 32-token prefixes of 50 book passages;
   - greedy extraction of 100 prefixes (32 tokens, 64 greedy tokens): the exact-match length, the
     number of leading tokens equal to the book's own continuation; its distribution is plotted;
   - the relearning attack: fine-tune on the first halves of 40 book passages (the run's
     ``optimizer.min_lr``, constant), measure the second halves after every step; the steps until
     the model is halfway back to its loss before unlearning, and the largest share of that gap closed
   at any step (fine-tuning on first halves ends up overfitting them, so a curve may turn before halfway);
4. summary: OUT/book_study.json, OUT/book_study.md, two plots, and a last line
   ``RESULT verbmem_before=... verbmem_after=... verbmem_oracle=... verbmem_npo=... extract_before=...
   extract_after=... extract_oracle=... extract_npo=... relearn_after=... relearn_oracle=... relearn_npo=...``
   (extract_*: mean exact-match tokens; relearn_*: steps to halfway, ``steps + 1`` when never).

Every stage writes its result atomically into OUT and a rerun reuses what is finished.

    python benchmarks/book_case_study.py [--out runs/book_case_study] [--wiki-articles 800] [--epochs 5]
    python benchmarks/book_case_study.py --quick     # 40 articles, two books cut to 2,048 tokens, minutes
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# The checkout ahead of benchmarks/ itself, whose data_prep.py would shadow the data_prep package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import (DATA, QUICK_MODEL_OVERRIDES, ROOT, Job, ensure_routing_index,  # noqa: E402
                                finished_checkpoint, open_routing_index, read_json, require_data, run_jobs,
                                run_prep_configs, say, train_job, unlearned_version,
                                use_study_store, write_json)

MODEL_CONFIG = ROOT / "configs" / "repro_small.yaml"
BOOKS = DATA / "books" / "sherlock_holmes"
ARTICLES = DATA / "enwiki" / "articles_2018.jsonl"
GROUP = "sherlock_holmes"
MODELS = ("before", "after", "oracle", "npo")
ROUTING = {"before": "own", "after": "nearest", "oracle": "nearest", "npo": "own"}


@dataclass
class Settings:
    """Everything that decides what is trained and evaluated; a rerun into the same OUT must match."""

    quick: bool = False
    books: list[str] = field(default_factory=list)  # file names in BOOKS; empty: all five
    wiki_articles: int = 800
    epochs: int = 5
    vocab_size: int = 2048
    seed: int = 0
    model_overrides: list[str] = field(default_factory=lambda: ["train.max_document_tokens=0"])
    tracking: bool = True
    passage_tokens: int = 256
    extraction_prefixes: int = 100
    prefix_tokens: int = 32
    extraction_tokens: int = 64
    verbmem_passages: int = 50
    verbmem_tokens: int = 128
    relearn_passages: int = 40
    relearn_steps: int = 100
    npo_passages: int = 64
    npo_retain_docs: int = 32
    npo_steps: int = 20

    @classmethod
    def quick_mode(cls) -> "Settings":
        return cls(quick=True, books=["01_a_study_in_scarlet.txt", "02_the_sign_of_the_four.txt"], wiki_articles=40,
                   epochs=1, vocab_size=512, tracking=False,
                   model_overrides=["train.max_document_tokens=2048", *QUICK_MODEL_OVERRIDES],
                   passage_tokens=96, extraction_prefixes=10, prefix_tokens=16, extraction_tokens=8,
                   verbmem_passages=5, verbmem_tokens=16, relearn_passages=6, relearn_steps=3, npo_passages=8,
                   npo_retain_docs=8, npo_steps=2)


# ----------------------------------------------------------------------------------------------------
# Data, prep, plan


def write_data(out: Path, s: Settings) -> Path:
    """The seeded article sample (OUT/data/wiki.jsonl) and the prep config (OUT/prep.yaml)."""
    import yaml

    from nulls_megatron.checkpoint.atomic import atomic_file

    require_data(BOOKS)
    books = BOOKS
    if s.books:  # a subset: copied into OUT, as the books reader takes a folder or one file
        books = out / "data" / "books"
        books.mkdir(parents=True, exist_ok=True)
        for name in s.books:
            shutil.copyfile(require_data(BOOKS / name), books / name)
    wiki = out / "data" / "wiki.jsonl"
    if not wiki.is_file():
        lines = [line for line in require_data(ARTICLES).read_text(encoding="utf-8").splitlines() if line.strip()]
        picked = sorted(np.random.default_rng(s.seed).choice(len(lines), size=min(s.wiki_articles, len(lines)),
                                                             replace=False).tolist())
        with atomic_file(wiki) as tmp:
            tmp.write_text("".join(lines[i] + "\n" for i in picked), encoding="utf-8")
    prep = {"inputs": [{"path": str(wiki), "format": "jsonl"},
                       {"path": str(books), "format": "books", "group": GROUP}],
            "output_dir": str(out / "prep"),
            "tokenizer": {"vocab_size": s.vocab_size, "model_type": "bpe", "sample_chars": 20_000_000,
                          "sample_chunks": 64, "seed": 0, "byte_fallback": True, "num_threads": 2},
            "shards": {"target_bytes": 1_000_000}, "ray": {"num_cpus": 2}, "chunk_bytes": 1_048_576}
    path = out / "prep.yaml"
    path.write_text(yaml.safe_dump(prep, sort_keys=False))
    return path


def make_plan(out: Path, s: Settings) -> dict:
    """The book sources (the group in the manifest), steps, and the two run configs."""
    path = out / "plan.json"
    if path.is_file():
        return read_json(path)
    import yaml

    from nulls_megatron.config import load_config
    from nulls_megatron.eval.documents import prep_documents
    from nulls_megatron.unlearn.requests import Request, SourceResolver

    base = load_config(MODEL_CONFIG, [f"model.vocab_size={s.vocab_size}", *s.model_overrides])
    books = sorted(r.index for r in SourceResolver(out / "prep").resolve_one(Request("group", GROUP, "--group")))
    docs = prep_documents(out / "prep")
    cut = base.train.max_document_tokens or None
    tokens = sum(len(d.tokens[:cut]) for d in docs)
    book_tokens = sum(len(d.tokens[:cut]) for d in docs if d.source in books)
    steps = s.epochs * math.ceil(math.ceil(tokens / base.model.seq_length) / base.train.global_batch_rows)
    runs = {}
    (out / "configs").mkdir(parents=True, exist_ok=True)
    for name, extra in (("nulls", {}), ("oracle", {"exclude_sources": books})):
        cfg = dataclasses.replace(
            base, seed=base.seed + s.seed,
            train=dataclasses.replace(base.train, data=str(out / "prep"), run_dir=str(out / "train" / name),
                                      steps=steps, **extra),
            tracking=dataclasses.replace(base.tracking, enabled=s.tracking, run_name=f"book-study-{name}"))
        cfg = cfg.validate(name)
        cfg_path = out / "configs" / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        runs[name] = {"config": str(cfg_path), "run_dir": cfg.train.run_dir}
    plan = {"documents": len(docs), "tokens": tokens, "book_tokens": book_tokens, "book_sources": books,
            "book_titles": [d.title for d in docs if d.source in books], "steps": steps, "epochs": s.epochs,
            "seq_length": base.model.seq_length, "n_pool": base.nulls.n_pool, "k": base.nulls.sinks_per_source,
            "runs": runs}
    write_json(path, plan)
    return plan


# ----------------------------------------------------------------------------------------------------
# Evaluation (one child process)


def sample_passages(docs, n: int, length: int, rng: np.random.Generator) -> list:
    """``n`` passages of ``length`` tokens at seeded offsets, spread evenly over the books."""
    from nulls_megatron.eval.documents import Document

    books = [d for d in docs if len(d.tokens) > length]
    if not books:
        raise ValueError(f"no book has more than {length} tokens")
    out = []
    for i in range(n):
        book = books[i % len(books)]
        start = int(rng.integers(0, len(book.tokens) - length + 1))
        out.append(Document(book.source, book.title, book.tokens[start:start + length].copy()))
    return out


def exact_match_lengths(model, passages, prefix: int, new_tokens: int, mode: str, routes) -> list[int]:
    """Greedy extraction: for each passage, how many of the greedy tokens after its ``prefix`` equal
    the passage's own continuation before the first difference."""
    from nulls_megatron.eval.scoring import greedy_continuations

    outs = greedy_continuations(model, [p.tokens[:prefix].tolist() for p in passages], new_tokens, mode, routes)
    lengths = []
    for p, o in zip(passages, outs):
        truth = p.tokens[prefix:prefix + new_tokens].tolist()
        n = 0
        while n < min(len(o), len(truth)) and o[n] == truth[n]:
            n += 1
        lengths.append(n)
    return lengths


def stage_eval(out: Path) -> None:
    import torch

    from nulls_megatron.eval.baselines import mean_loss, unlearn_posthoc
    from nulls_megatron.eval.documents import cut, prep_documents, sample_retain
    from nulls_megatron.eval.evaluate import EvalOptions, nearest_routes, verbmem
    from nulls_megatron.eval.relearn import relearn, split_halves
    from nulls_megatron.eval.scoring import CheckpointModel
    from nulls_megatron.unlearn.requests import Request

    path = out / "eval.json"
    if path.is_file():
        return
    s = Settings(**read_json(out / "settings.json"))
    plan = read_json(out / "plan.json")
    began = time.perf_counter()
    torch.manual_seed(s.seed)
    ckpt = {name: finished_checkpoint(run["run_dir"], plan["steps"]) for name, run in plan["runs"].items()}
    ensure_routing_index(ckpt["nulls"])
    index = open_routing_index(ckpt["nulls"])
    books = plan["book_sources"]
    unlearned = unlearned_version(ckpt["nulls"], [Request("group", GROUP, "--group")], out / "unlearned", books)
    models = {"before": CheckpointModel(ckpt["nulls"], name="before"),
              "after": CheckpointModel(unlearned, name="after"),
              "oracle": CheckpointModel(ckpt["oracle"], name="oracle")}
    missing = set(books) - set(models["after"].off_sources)
    if missing:
        raise RuntimeError(f"{unlearned}: sources {sorted(missing)} of group {GROUP} are still live")

    docs = prep_documents(out / "prep")
    book_docs = [d for d in docs if d.source in set(books)]
    rng = np.random.default_rng(s.seed)
    extraction = sample_passages(book_docs, s.extraction_prefixes, s.prefix_tokens + s.extraction_tokens, rng)
    vm_passages = sample_passages(book_docs, s.verbmem_passages, 32 + s.verbmem_tokens, rng)
    relearn_passages = sample_passages(book_docs, s.relearn_passages, s.passage_tokens, rng)
    npo_passages = sample_passages(book_docs, s.npo_passages, s.passage_tokens, rng)
    retain = cut(sample_retain(docs, set(books), s.npo_retain_docs, seed=1), s.passage_tokens)
    say(f"book study: {len(books)} books ({plan['book_tokens']:,} tokens) unlearned as group {GROUP}; "
        f"NPO on the NULLs model ({s.npo_steps} steps, {len(npo_passages)} passages)")
    models["npo"] = unlearn_posthoc(models["before"], npo_passages, "npo", mode="own", retain=retain,
                                    steps=s.npo_steps, seed=s.seed)

    def routes(name: str, passages) -> list[int] | None:
        if ROUTING[name] == "own":
            return [p.source for p in passages]
        return nearest_routes(index, models[name], passages, books)

    def scoring(name: str):
        return models[name].sources_disabled(books) if name == "oracle" else _nothing()

    options = EvalOptions(verbmem_docs=s.verbmem_passages, verbmem_prefix=32, verbmem_tokens=s.verbmem_tokens)
    second = split_halves(relearn_passages)[1]
    target = mean_loss(models["before"], second, "own", [p.source for p in second])
    result = {"models": {}, "routing": ROUTING, "relearn_target_before": target}
    for name in MODELS:
        mode = ROUTING[name]
        with scoring(name):
            say(f"book study: {name} ({mode}): loss, VerbMem, extraction, relearning")
            row = {"mode": mode,
                   "passage_loss": mean_loss(models[name], relearn_passages, mode, routes(name, relearn_passages)),
                   "verbmem": verbmem(models[name], vm_passages, mode, routes(name, vm_passages), options),
                   "exact_match": exact_match_lengths(models[name], extraction, s.prefix_tokens, s.extraction_tokens,
                                                      mode, routes(name, extraction))}
            if name != "before":
                row["relearn"] = relearn(models[name], relearn_passages, target, mode=mode,
                                         routes=routes(name, relearn_passages), steps=s.relearn_steps,
                                         seed=s.seed).to_json()
        em = np.array(row["exact_match"])
        row["exact_match_summary"] = {"mean": float(em.mean()), "median": float(np.median(em)),
                                      "p90": float(np.percentile(em, 90)), "max": int(em.max()),
                                      "at_least_8": float((em >= 8).mean())}
        result["models"][name] = row
    result["seconds"] = time.perf_counter() - began
    write_json(path, result)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------------------------------
# Summary


def relearn_steps(row: dict, limit: int) -> int:
    steps = row["relearn"]["steps_to_halfway"]
    return limit + 1 if steps is None else int(steps)


def summary_lines(result: dict, s: Settings, plan: dict) -> tuple[str, str]:
    from nulls_megatron.eval.relearn import best_recovery

    m = result["models"]
    lines = [f"{len(plan['book_sources'])} books ({plan['book_tokens']:,} tokens) among {plan['documents']:,} sources, "
             f"{plan['epochs']} epochs ({plan['steps']} steps); one seed",
             "", "| model | routing | book-passage loss | VerbMem | exact match mean | median | p90 | max | "
             ">= 8 tokens | relearn steps to halfway | best share undone |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in MODELS:
        r, e = m[name], m[name]["exact_match_summary"]
        steps = "n/a" if name == "before" else (
            f"{relearn_steps(r, s.relearn_steps)}" + (" (never)" if r["relearn"]["steps_to_halfway"] is None else ""))
        undone = "n/a" if name == "before" else f"{best_recovery(r['relearn']['curve'], result['relearn_target_before']):.2f}"
        lines.append(f"| {name} | {r['mode']} | {r['passage_loss']:.3f} | {r['verbmem']:.3f} | {e['mean']:.2f} | "
                     f"{e['median']:.0f} | {e['p90']:.0f} | {e['max']} | {100 * e['at_least_8']:.0f}% | {steps} | {undone} |")
    values = {f"verbmem_{n}": m[n]["verbmem"] for n in MODELS}
    values |= {f"extract_{n}": m[n]["exact_match_summary"]["mean"] for n in MODELS}
    values |= {f"relearn_{n}": relearn_steps(m[n], s.relearn_steps) for n in ("after", "oracle", "npo")}
    result_line = "RESULT " + " ".join(f"{k}={v:.3f}" if k.startswith("verbmem") else
                                       (f"{k}={v:.2f}" if k.startswith("extract") else f"{k}={v}")
                                       for k, v in values.items())
    return "\n".join(lines) + "\n", result_line


def plots(result: dict, s: Settings, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = result["models"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    top = max(max(m[n]["exact_match"]) for n in MODELS)
    bins = np.arange(0, top + 2) - 0.5
    for name in MODELS:
        ax.hist(m[name]["exact_match"], bins=bins, histtype="step", lw=1.5, label=f"{name} ({m[name]['mode']})")
    ax.set_xlabel(f"exact-match length of greedy continuations (tokens, of {s.extraction_tokens})")
    ax.set_ylabel(f"prefixes (of {s.extraction_prefixes})")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [out / "book_extraction.png"]
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name in ("after", "oracle", "npo"):
        ax.plot(m[name]["relearn"]["curve"], marker=".", ms=3, label=f"{name} ({m[name]['mode']})")
    ax.axhline(result["relearn_target_before"], color="k", ls="--", lw=1, label="NULLs before unlearning")
    ax.set_xlabel("relearning steps (fine-tuning on first halves of book passages)")
    ax.set_ylabel("second-half loss (nats/token)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "book_relearn.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


# ----------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default runs/book_case_study, quick: ..._quick)")
    p.add_argument("--quick", action="store_true", help="40 articles, two books cut to 2,048 tokens, a tiny model")
    p.add_argument("--wiki-articles", type=int, default=None, help="2018 articles trained beside the books (800)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (5)")
    p.add_argument("--fresh", action="store_true", help="remove OUT first")
    p.add_argument("--stage", choices=("prep", "eval"), help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out or ("runs/book_case_study_quick" if args.quick else "runs/book_case_study")).resolve()
    if args.stage == "prep":
        return run_prep_configs([out / "prep.yaml"])
    if args.stage == "eval":
        return stage_eval(out)

    s = Settings.quick_mode() if args.quick else Settings()
    for name in ("wiki_articles", "epochs"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    if args.fresh and out.exists():
        shutil.rmtree(out)
    began = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    say(f"MLflow: every run of this study in one store; look with: mlflow ui --backend-store-uri {use_study_store(out)}")
    settings = out / "settings.json"
    if settings.is_file() and read_json(settings) != dataclasses.asdict(s):
        sys.exit(f"{out} holds a study with other settings ({settings}); use another --out or --fresh")
    write_json(settings, dataclasses.asdict(s))
    me = str(Path(__file__).resolve())
    write_data(out, s)
    run_jobs([Job("prep", [sys.executable, me, "--out", str(out), "--stage", "prep"], [],
                  lambda: (out / "prep" / "prep_report.json").is_file())], 1, out)
    plan = make_plan(out, s)
    say(f"plan: {len(plan['book_sources'])} books ({plan['book_tokens']:,} tokens) among {plan['documents']:,} "
        f"sources, {plan['tokens']:,} tokens, {plan['epochs']} epochs = {plan['steps']} steps")
    jobs = [train_job(f"train/{name}", run["config"], run["run_dir"], plan["steps"]) for name, run in plan["runs"].items()]
    jobs.append(Job("eval", [sys.executable, me, "--out", str(out), "--stage", "eval"], [j.name for j in jobs],
                    lambda: (out / "eval.json").is_file()))
    run_jobs(jobs, 2, out)
    result = read_json(out / "eval.json")
    table, line = summary_lines(result, s, plan)
    figures = plots(result, s, out)
    (out / "book_study.md").write_text(table)
    write_json(out / "book_study.json", {"settings": dataclasses.asdict(s), "plan": plan, "result": result})
    print(table)
    say(f"plots: {', '.join(str(f) for f in figures)}")
    say(f"wall time {(time.perf_counter() - began) / 60:.1f} min")
    say(line)


if __name__ == "__main__":
    main()
