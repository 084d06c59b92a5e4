"""``nulls eval`` end to end: resolve the models and the forget set, read the documents, evaluate,
write the report (OUT and MLflow)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..checkpoint.atomic import atomic_file, checkpoint_version, version_name
from ..routing.build import CheckpointSources, build_index, checkpoint_sources
from ..routing.source_index import RoutingIndexMissing, SourceIndex
from ..unlearn.requests import Request, SourceResolver
from .documents import EvalSets, cut, holdout_documents, prep_documents, sample_retain
from .evaluate import EvalModels, EvalOptions, evaluate
from .oracle import train_oracle
from .report import log_to_mlflow, write_report
from .scoring import CheckpointModel, ExportedModel, open_model


@dataclass
class EvalRequest:
    model: str
    forget: list[Request]
    holdout: str
    out: Path
    oracle: str | None = None
    train_oracle: bool = False
    before: str | None = None
    manifest: str | None = None
    tracking_uri: str | None = None
    experiment: str = "nulls-eval"
    oracle_nproc: int | None = None


def _sources_of(model) -> CheckpointSources:
    if isinstance(model, ExportedModel):
        return checkpoint_sources(model.info["checkpoint"])
    return model.loaded.sources


def _routing_index(sources: CheckpointSources, say: Callable[[str], None]) -> SourceIndex:
    try:
        return SourceIndex.open(sources.checkpoint, sources.manifest_sha256)
    except RoutingIndexMissing:
        say(f"eval: building the routing index of {sources.checkpoint} (titles, MiniLM)")
        build_index(sources.checkpoint, progress=False)
        return SourceIndex.open(sources.checkpoint, sources.manifest_sha256)


def _before_of(checkpoint: Path) -> Path | None:
    """The version an unlearned checkpoint was made from: the same step's version 0 beside it."""
    parsed = checkpoint_version(checkpoint.name)
    if parsed is None or parsed[1] == 0:
        return None
    original = checkpoint.parent / version_name(parsed[0], 0)
    return original if original.is_dir() else None


def resolve_models(req: EvalRequest, say: Callable[[str], None]) -> tuple[EvalModels, CheckpointSources]:
    after = open_model(req.model, req.manifest, name="after")
    sources = _sources_of(after)
    resolved, _ = SourceResolver(sources.prep_dir).resolve(req.forget)
    forget = sorted({s.index for s in resolved})
    before_path = req.before
    if isinstance(after, CheckpointModel) and not set(forget) <= set(after.off_sources):
        from ..unlearn.service import run_unlearn

        say(f"eval: forgetting {len(forget)} sources with `nulls unlearn` into {req.out / 'unlearned'}")
        outcome = run_unlearn(after.loaded.checkpoint, req.forget, out=req.out / "unlearned",
                              say=lambda line: say(f"unlearn: {line}"))
        before_path = before_path or str(after.loaded.checkpoint)
        after = CheckpointModel(outcome.written.path, req.manifest, name="after")
    elif before_path is None and isinstance(after, CheckpointModel):
        found = _before_of(after.loaded.checkpoint)
        before_path = str(found) if found else None
    before = open_model(before_path, req.manifest, name="before") if before_path else None
    oracle_path = req.oracle
    if oracle_path is None and req.train_oracle:
        oracle_path = str(train_oracle(sources.checkpoint, forget, req.out, req.oracle_nproc))
    oracle = open_model(oracle_path, req.manifest, name="oracle") if oracle_path else None
    return EvalModels(after=after, before=before, oracle=oracle, forget=forget), sources


def read_sets(models: EvalModels, sources: CheckpointSources, holdout: str, options: EvalOptions) -> EvalSets:
    forget = set(models.forget)
    training_cut = 0
    if isinstance(models.after, CheckpointModel):
        training_cut = models.after.loaded.cfg.train.max_document_tokens
    max_tokens = training_cut or options.max_tokens
    docs = cut(prep_documents(sources.prep_dir), max_tokens)
    tokenizer_card = sources.prep_dir / "tokenizer.json"
    tokenizer_sha = json.loads(tokenizer_card.read_text()).get("sha256") if tokenizer_card.is_file() else None
    held = cut(holdout_documents(holdout, models.after.encode, tokenizer_sha, options.holdout_docs), max_tokens)
    return EvalSets(forget=[d for d in docs if d.source in forget],
                    retain=sample_retain(docs, forget, options.retain_docs, options.seed), holdout=held)


def run_eval(req: EvalRequest, options: EvalOptions, say: Callable[[str], None] = print,
             extras: Sequence[Callable[[SourceIndex], Callable[[EvalModels, EvalSets, dict], list[Path]]]] = ()
             ) -> dict:
    """Evaluate and write ``eval.json``, ``eval.md`` and plots into ``req.out``; log them to MLflow.

    ``extras``: further studies (eval/studies.py), each made from the routing index, that add to the
    result and return the plots they wrote."""
    req.out.mkdir(parents=True, exist_ok=True)
    models, sources = resolve_models(req, say)
    if not models.forget:
        raise ValueError("the forget set is empty")
    sets = read_sets(models, sources, req.holdout, options)
    if not sets.forget:
        raise ValueError(f"no document of the forget sources {models.forget[:10]} in {sources.prep_dir}")
    say(f"eval: {sets.describe()}")
    index = _routing_index(sources, say)
    extras = [make(index) for make in extras]
    result = evaluate(models, sets, index, options, texts=lambda docs: [models.after.decode(d.tokens) for d in docs],
                      say=say)
    result["models"] = {role: str(m.loaded.checkpoint) if isinstance(m, CheckpointModel) else m.name
                        for role, m in (("after", models.after), ("before", models.before), ("oracle", models.oracle))
                        if m is not None}
    result["out"] = str(req.out)
    plots = []
    for extra in extras:
        plots += extra(models, sets, result)
    files = write_report(result, req.out, plots)
    params = {"model": req.model, "holdout": req.holdout, "oracle": result["models"].get("oracle"),
              "forget_sources": len(models.forget), **{f"option.{k}": v for k, v in result["options"].items()}}
    result["mlflow_run_id"] = log_to_mlflow(result, files, params, req.experiment, req.tracking_uri,
                                            run_name=f"eval-{req.out.name}")
    with atomic_file(req.out / "eval.json") as tmp:  # the copy in MLflow cannot name its own run
        tmp.write_text(json.dumps(result, indent=1, default=str))
    say(f"eval: report {req.out / 'eval.md'}; MLflow run {result['mlflow_run_id']}")
    return result
