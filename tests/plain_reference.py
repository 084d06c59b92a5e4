"""An independent reference for the engines: one process, plain torch, written from the method and
torch's documented semantics, importing nothing of the training code under test (not its parameter
groups, loss reduction, clipping or optimizer). Both engine tests compare against it."""
from __future__ import annotations

import math
from typing import Callable

import torch

from nulls_megatron.train.packing import PackedRows


def reference_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings; none on norms and biases (1-D) and none on the sink
    tables (``...mlp.sinks.weight``: decay would shrink the rows of sources a batch never saw)."""
    decay, no_decay, sinks = [], [], []
    for name, p in model.named_parameters():
        if ".sinks." in name:
            sinks.append(p)
        elif p.dim() < 2:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0},
              {"params": sinks, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def masked_mean(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    return (per_token_loss.float() * loss_mask).sum() / loss_mask.sum()


def plain_adamw_steps(model: torch.nn.Module, batches: list[PackedRows], steps: int, lr_at: Callable[[int], float],
                      opt, clip: float) -> dict:
    """``steps`` AdamW steps on the global batch ``batches`` (the loss: the mean over micro-batches of
    each one's mean token loss), gradients clipped to global norm ``clip`` as torch documents it
    (scaled by ``clip / (norm + 1e-6)`` when that is below 1). Returns losses, pre-clip norms, the
    norm of AdamW's first moment after each step, and the final weights by name."""
    optimizer = torch.optim.AdamW(reference_param_groups(model, opt.weight_decay), lr=lr_at(0),
                                  betas=(opt.beta1, opt.beta2), eps=opt.eps, foreach=False)
    losses, norms, exp_avg_norms = [], [], []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        per_batch = [masked_mean(model(b.tokens, labels=b.labels, source_ids=b.source_ids, document_ids=b.document_ids),
                                 b.loss_mask) for b in batches]
        loss = torch.stack(per_batch).mean()
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        coefficient = clip / (norm + 1e-6)
        if coefficient < 1:
            for g in grads:
                g.mul_(coefficient)
        optimizer.step()
        losses.append(float(loss.detach()))
        norms.append(norm)
        exp_avg_norms.append(math.sqrt(sum(float(s["exp_avg"].double().pow(2).sum()) for s in optimizer.state.values())))
    return {"losses": losses, "norms": norms, "exp_avg_norms": exp_avg_norms,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}
