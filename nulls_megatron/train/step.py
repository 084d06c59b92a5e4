"""One forward-backward pass over a global batch with Megatron's schedules.

Every pipeline stage pulls the same micro-batches from its own iterator: the
first stage uses the tokens, the last the labels and loss mask, and **every**
stage uses the source ids (its NULLs MLPs route by them) and the document ids
(its attention layers mask by them). Only hidden states travel between stages.
"""
from __future__ import annotations

from functools import partial
from typing import Iterator

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from ..compat import pipeline_schedule_compat
from .device import batch_to_device
from .packing import PackedRows


def _masked_mean_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    loss = (per_token_loss.float() * loss_mask).sum() / loss_mask.sum().clamp(min=1)
    # clone: the schedule divides the returned loss by the number of micro-batches *in place*,
    # and a plain detach() shares its storage (the logged loss came out halved with 2 micro-batches).
    return loss, {"lm loss": loss.detach().clone()}


def _forward_step(data_iterator: Iterator[PackedRows], model):
    batch = batch_to_device(next(data_iterator))
    output = model(
        batch.tokens,
        labels=batch.labels,
        source_ids=batch.source_ids,
        document_ids=batch.document_ids,
        routing_plan=batch.routing,
    )
    return output, partial(_masked_mean_loss, batch.loss_mask)


def forward_backward(model, micro_batches: list[PackedRows], forward_only: bool = False) -> float | None:
    """Run the schedule (1F1B with pipeline parallelism, plain otherwise) over
    ``micro_batches``; gradients accumulate in the parameters' ``.grad``.

    Returns the mean loss over the micro-batches on the last pipeline stage, None elsewhere.
    """
    if not micro_batches:
        raise ValueError("forward_backward needs at least one micro-batch")
    rows, seq = micro_batches[0].tokens.shape
    with pipeline_schedule_compat():
        losses = get_forward_backward_func()(
            forward_step_func=_forward_step,
            data_iterator=iter(micro_batches),
            model=[model],
            num_microbatches=len(micro_batches),
            seq_length=seq,
            micro_batch_size=rows,
            forward_only=forward_only,
        )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return float(torch.stack([item["lm loss"] for item in losses]).mean())
