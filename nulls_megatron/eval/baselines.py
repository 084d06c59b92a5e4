"""Post-hoc unlearning baselines, and the standard transformer of the same active size.

- Gradient ascent (GA) and NPO (Zhang et al. 2024, as open-unlearning implements it, beta 0.1)
  fine-tune a private in-process copy of one of our checkpoints on the forget documents; the result
  is a :class:`~.scoring.CheckpointModel` that ``token_scores`` and the relearning attack take like
  any other. With retain documents the retain NLL is added (weight ``alpha``): GA becomes GradDiff and
  NPO becomes open-unlearning's default NPO (gamma 1, alpha 1).
- :func:`dense_active_config`: a NULLs config whose pool holds exactly ``k`` sinks, so every source
  uses every pool row: a dense SwiGLU of width ``n_backbone + k``, trained by ``nulls train``.

Fine-tuning here (also the relearning attack's) is the run's own AdamW (its betas, eps, weight decay
groups and gradient clipping) at a constant learning rate; the default rate is the run's
``optimizer.min_lr``, the rate its training ended at. Batches are windows of ``seq_length`` tokens of
the documents, drawn in a seeded order (epochs of a permutation), so a run is reproducible.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..config import Config
from .documents import Document
from .scoring import ROUTED, CheckpointModel, EvalModel, token_scores

METHODS = ("ga", "npo")
NPO_BETA = 0.1  # open-unlearning's default
STEPS = 20
BATCH_ROWS = 8
IGNORE = -100  # label of padding


@dataclass(frozen=True)
class Row:
    """One training window: input tokens, next-token labels, and the source whose sinks it uses."""

    tokens: np.ndarray
    labels: np.ndarray
    route: int


def document_routes(docs: Sequence[Document], mode: str, routes: Sequence[int] | None) -> list[int]:
    """The source each document is routed to: given ``routes``, else its own source in ``own`` mode
    (unused, 0, in ``backbone``/``expected``)."""
    if routes is not None:
        if len(routes) != len(docs):
            raise ValueError(f"{len(routes)} routes for {len(docs)} documents")
        return [int(r) for r in routes]
    if mode == "nearest":
        raise ValueError("mode 'nearest' needs routes: the nearest surviving source of each document")
    return [d.source if mode == "own" else 0 for d in docs]


def training_rows(docs: Sequence[Document], context: int, routes: Sequence[int]) -> list[Row]:
    """Each document in consecutive windows of ``context`` predicted tokens, as ``token_scores`` reads it."""
    rows = []
    for doc, route in zip(docs, routes):
        t = doc.tokens
        rows += [Row(t[i:i + context], t[i + 1:i + context + 1], route) for i in range(0, len(t) - 1, context)]
    if not rows:
        raise ValueError("no documents of 2 tokens or more to train on")
    return rows


def mean_loss(model: EvalModel, docs: Sequence[Document], mode: str, routes: Sequence[int] | None = None) -> float:
    """Mean over documents of each document's mean next-token loss (nats), in ``mode``."""
    scores = token_scores(model, docs, mode, document_routes(docs, mode, routes) if mode in ROUTED else None)
    return float(np.mean([s.loss for s in scores]))


def token_nll(model: CheckpointModel, rows: Sequence[Row], mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL [b, s] of ``rows`` through ``model``'s network, with gradients (0 at padding),
    and the mask of real labels. Logits are cut to the tokenizer's vocabulary, as ``token_scores`` does."""
    width = max(len(r.tokens) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.int64)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.int64)
    for i, r in enumerate(rows):
        tokens[i, : len(r.tokens)] = torch.from_numpy(r.tokens)
        labels[i, : len(r.labels)] = torch.from_numpy(r.labels)
    # One document per row: source_ids of 0 make one causal block; the mode picks the sinks.
    zeros = torch.zeros_like(tokens)
    net = model.loaded.model
    if mode in ROUTED:
        route = torch.tensor([r.route for r in rows])[:, None].expand_as(tokens).contiguous()
        logits = net(tokens, source_ids=zeros, sink_mode="route", route_sources=route)
    else:
        logits = net(tokens, source_ids=zeros, sink_mode=mode)
    logits = logits[..., : model.vocab_size].float()
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    return nll, labels != IGNORE


def npo_loss(logp_model: torch.Tensor, logp_ref: torch.Tensor, beta: float = NPO_BETA) -> torch.Tensor:
    """NPO on forget sequences: ``-(2/beta) * logsigmoid(-beta * (logp_model - logp_ref))``, mean over
    the batch; log-probabilities are summed per sequence (open-unlearning's ``compute_dpo_loss`` with
    no preferred answer)."""
    return (-2.0 / beta * F.logsigmoid(-beta * (logp_model - logp_ref))).mean()


def trainable_copy(model: CheckpointModel, name: str) -> CheckpointModel:
    """A private copy of ``model`` whose network trains: the same weights and sink flags (``disabled``
    is a buffer, so a model inside ``sources_disabled`` is copied with those sources off)."""
    from ..model.gpt import build_nulls_gpt

    if not isinstance(model, CheckpointModel):
        raise TypeError(f"{model.name}: fine-tuning needs a checkpoint of ours (CheckpointModel), "
                        f"not {type(model).__name__}")
    with torch.random.fork_rng(devices=[]):  # building draws initial weights; the caller's RNG is untouched
        net = build_nulls_gpt(model.loaded.cfg)
    net.load_state_dict(model.loaded.model.state_dict())
    net.eval()
    tuned = copy.copy(model)
    tuned.loaded = dataclasses.replace(model.loaded, model=net)
    tuned.name = name
    return tuned


class BatchOrder:
    """Seeded epochs of a permutation of ``n`` rows, ``size`` rows per batch."""

    def __init__(self, n: int, size: int, seed: int) -> None:
        self.n, self.size = n, min(size, n)
        self.rng = np.random.default_rng(seed)
        self.queue: list[int] = []

    def next(self) -> list[int]:
        while len(self.queue) < self.size:
            self.queue += self.rng.permutation(self.n).tolist()
        batch, self.queue = self.queue[: self.size], self.queue[self.size:]
        return batch


LossFn = Callable[[CheckpointModel, list[int]], torch.Tensor]


def fine_tune(model: CheckpointModel, n_rows: int, loss_fn: LossFn, *, steps: int, lr: float | None,
              batch_rows: int, seed: int, name: str,
              after_step: Callable[[int, CheckpointModel], None] | None = None) -> CheckpointModel:
    """``steps`` AdamW steps on a copy of ``model``, minimising ``loss_fn(copy, row indices)`` over
    seeded batches; ``after_step(step, copy)`` runs after each (the copy in eval mode)."""
    from ..train.engines.param_groups import adamw_param_groups

    opt = model.loaded.cfg.optimizer
    lr = opt.min_lr if lr is None else lr
    tuned = trainable_copy(model, name)
    net = tuned.loaded.model
    optimizer = torch.optim.AdamW(adamw_param_groups(net, dataclasses.replace(opt, lr=lr)), lr=lr,
                                  betas=(opt.beta1, opt.beta2), eps=opt.eps)
    order = BatchOrder(n_rows, batch_rows, seed)
    for step in range(1, steps + 1):
        net.train()
        loss = loss_fn(tuned, order.next())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if opt.clip_grad:
            torch.nn.utils.clip_grad_norm_(net.parameters(), opt.clip_grad)
        optimizer.step()
        net.eval()
        if after_step is not None:
            after_step(step, tuned)
    return tuned


def unlearn_posthoc(model: CheckpointModel, forget: Sequence[Document], method: str, *, mode: str = "own",
                    routes: Sequence[int] | None = None, retain: Sequence[Document] = (), alpha: float = 1.0,
                    steps: int = STEPS, lr: float | None = None, batch_rows: int = BATCH_ROWS,
                    beta: float = NPO_BETA, seed: int = 0) -> CheckpointModel:
    """``model`` unlearned post hoc by ``method`` (``ga`` or ``npo``) on the ``forget`` documents, in
    ``mode`` (a NULLs model in ``own``, its training routing; the dense model of the active size in
    ``own`` too, where every source has the same rows). ``model`` itself is not changed.

    GA minimises minus the mean token NLL of a forget batch; NPO the :func:`npo_loss` of its
    per-window log-probabilities against ``model`` frozen as the reference. With ``retain``
    documents (routed by their own source in a routed mode), ``alpha`` times the mean token NLL of a
    retain batch is added at each step."""
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; expected one of {', '.join(METHODS)}")
    rows = training_rows(forget, model.context, document_routes(forget, mode, routes))
    # Retained sources are alive: in a routed mode they use their own sinks (their nearest source).
    keep_routes = document_routes(retain, "own" if mode in ROUTED else mode, None)
    keep = training_rows(retain, model.context, keep_routes) if retain else []
    keep_order = BatchOrder(len(keep), batch_rows, seed + 1) if keep else None
    if method == "npo":
        with torch.no_grad():  # the reference: the model before unlearning, scored once
            ref = torch.cat([-token_nll(model, rows[i:i + batch_rows], mode)[0].sum(1)
                             for i in range(0, len(rows), batch_rows)])

    def loss_fn(tuned: CheckpointModel, picked: list[int]) -> torch.Tensor:
        nll, real = token_nll(tuned, [rows[i] for i in picked], mode)
        if method == "ga":
            loss = -nll.sum() / real.sum()
        else:
            loss = npo_loss(-nll.sum(1), ref[picked], beta)
        if keep_order is not None:
            kept, kept_real = token_nll(tuned, [keep[i] for i in keep_order.next()], mode)
            loss = loss + alpha * kept.sum() / kept_real.sum()
        return loss

    return fine_tune(model, len(rows), loss_fn, steps=steps, lr=lr, batch_rows=batch_rows, seed=seed,
                     name=f"{model.name} + {method.upper()}")


def dense_active_config(cfg: Config, run_dir: str | Path | None = None) -> Config:
    """The standard transformer of ``cfg``'s active size, as a NULLs config: a pool of exactly
    ``k = sinks_per_source`` rows in one shard, so every source owns every pool row and each token
    runs a dense SwiGLU of width ``n_backbone + k`` (what a NULLs token runs). Everything else (data,
    excluded sources, seed, schedule, parallel layout but expert parallelism) is ``cfg``'s, so ``nulls train`` trains it
    on the same data in the same order. Evaluate it in ``own`` mode (``expected`` is the same, as
    p_mem = 1; ``backbone`` would drop the k rows). ``run_dir``: default ``<cfg run_dir>-dense-active``."""
    n, k = cfg.nulls, cfg.nulls.sinks_per_source
    if n.assignment != "counter":
        k = round(n.p_mem * n.n_pool)  # the upstream hash's mean sinks per source
    nulls = dataclasses.replace(n, n_pool=k, sinks_per_source=k, pool_shards=1, per_layer_sinks=False,
                                assignment="counter", upstream=None)
    model = dataclasses.replace(cfg.model, ffn_hidden_size=n.n_backbone + k)
    train = dataclasses.replace(cfg.train, run_dir=str(run_dir or f"{cfg.train.run_dir.rstrip('/')}-dense-active"))
    # An unset run name defaults to the run directory's name, which already says what this is.
    tracking = dataclasses.replace(cfg.tracking, run_name=f"{cfg.tracking.run_name}-dense-active" if cfg.tracking.run_name else "")
    # A pool of k rows in one shard is not sharded: no expert parallelism (the replicas stay data-parallel).
    parallel = dataclasses.replace(cfg.parallel, expert_parallel=1)
    return dataclasses.replace(cfg, model=model, nulls=nulls, train=train, tracking=tracking,
                               parallel=parallel).validate("dense_active_config")
