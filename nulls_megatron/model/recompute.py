"""Activation recomputation (``model.recompute``) that keeps every forward's routing and mask.

``full``: each transformer layer's forward runs inside ``torch.utils.checkpoint``
(non-reentrant), so backward keeps only the layer's inputs and runs the layer again.
The layers read two per-forward contexts that ``NullsGPTModel.forward`` sets and clears
(the sink routing of the NULLs MLPs, the packed-document mask of the core attentions).
By the time a layer is recomputed its forward has returned and the contexts are empty,
or, under 1F1B pipelining, hold a later micro-batch's routing. So each layer call
captures the context values of its own forward and re-installs them only while that
call is recomputed (the second context of ``context_fn``), then puts back whatever was
there. This is why Megatron's ``recompute_granularity="full"`` is not used: its
``CheckpointFunction`` re-runs the same closure in backward and cannot tell a
recomputation from a forward, so it would read the live contexts.

The RNG tracker's states are captured with them: dropout inside tensor-parallel regions
draws from the tracker (``get_cuda_rng_tracker().fork()``), which torch's checkpoint
does not restore (it restores the default CPU and CUDA generators), and a recomputed
dropout must draw the same mask as the forward did.

``selective``: Megatron's own core-attention recompute. It passes the mask to the
recomputed function as an argument, so it is correct as it stands, but only on the
``masked`` backend: the packed backends read their mask from the context and keep no
softmax probabilities to save (the config refuses the combination).
"""
from __future__ import annotations

import contextlib
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch.utils.checkpoint import checkpoint

from ..sinks.routing import SinkRouting
from .nulls_mlp import RoutingContext
from .packed_attention import AttentionContext


@dataclass(frozen=True)
class ForwardState:
    """What the layers of one forward read besides their arguments."""

    routing: SinkRouting | None
    attention_mask: Any
    attention_causal: bool
    rng_tracker_states: dict


class ForwardContexts:
    """The per-forward contexts of one model: capture them at a layer call, re-install them for its recompute."""

    def __init__(self, routing: RoutingContext, attention: AttentionContext) -> None:
        self.routing = routing
        self.attention = attention

    def capture(self) -> ForwardState:
        # A copy of the dict: the tracker replaces its entries as it forks, never mutates the states.
        return ForwardState(self.routing.routing, self.attention.mask, self.attention.causal,
                            dict(tensor_parallel.get_cuda_rng_tracker().get_states()))

    def _set(self, state: ForwardState) -> None:
        self.routing.routing = state.routing
        self.attention.mask, self.attention.causal = state.attention_mask, state.attention_causal
        tensor_parallel.get_cuda_rng_tracker().set_states(dict(state.rng_tracker_states))

    @contextlib.contextmanager
    def installed(self, state: ForwardState) -> Iterator[None]:
        """``state`` in place for the duration, then what was there before (also when torch's checkpoint
        stops a recomputation early by raising once every saved tensor is rebuilt)."""
        before = self.capture()
        self._set(state)
        try:
            yield
        finally:
            self._set(before)


class NullsTransformerLayer(TransformerLayer):
    """Megatron's ``TransformerLayer``, recomputed in backward when the model hands it its contexts.

    ``NullsGPTModel`` sets ``forward_contexts`` for ``model.recompute: full``; left None the
    layer is exactly Megatron's.
    """

    forward_contexts: ForwardContexts | None = None

    def forward(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        contexts = self.forward_contexts
        if contexts is None or not torch.is_grad_enabled():
            return super().forward(*args, **kwargs)
        state = contexts.capture()
        return checkpoint(
            super().forward, *args, use_reentrant=False,
            context_fn=lambda: (nullcontext(), contexts.installed(state)), **kwargs,
        )


def check_megatron_recompute(config: TransformerConfig, attention_backend: str) -> None:
    """Refuse the Megatron recompute settings that would re-run a context reader after its forward."""
    if config.recompute_granularity == "full":
        raise ValueError("Megatron's recompute_granularity='full' re-runs the layers after the per-forward "
                         "routing and mask are cleared: set model.recompute: full instead")
    if config.recompute_granularity == "selective":
        if list(config.recompute_modules) != ["core_attn"]:
            raise ValueError(f"selective recompute of {config.recompute_modules}: only ['core_attn'] is supported "
                             "(Megatron's mlp recompute would re-run the NULLs MLP without its routing)")
        if attention_backend != "masked":
            raise ValueError(f"selective recompute of the core attention needs the masked attention backend, "
                             f"not {attention_backend!r}, which reads its mask from the per-forward context")
