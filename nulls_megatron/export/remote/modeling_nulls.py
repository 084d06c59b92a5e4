"""An exported NULLs model (natively unlearnable LM) for Hugging Face transformers.

Written by ``nulls export --mode routed`` (nulls-megatron); needs only torch and transformers.
A Llama whose MLP is ``down(silu(gate x) * up x)`` over ``intermediate_size`` always-on backbone
neurons, plus the sinks of one source: ``sinks_per_source`` rows of a per-layer sink table
([n_pool, 3, hidden]: gate row, up row, down column). Which rows a source owns is the table
``sink_rows`` ([n_sources, k], or [layers, n_sources, k] with per-layer sinks; -1 pads a source
with fewer than k sinks). Forgotten sources
have their rows zeroed and flagged in ``disabled``: they are off whatever the request.

Modes (``sink_mode``): ``route`` (the default: each sequence uses the sinks of one source),
``expected`` (every live sink scaled by ``p_mem``) and ``backbone`` (no sinks, the backbone scaled by
``(p_gen + p_mem) / p_gen``). In ``route`` mode pass ``source_ids`` (an int, or one id per sequence);
without it the model routes each prompt itself to its nearest surviving source: the prompt's
all-MiniLM-L6-v2 embedding (shipped in ``router/``) against the title embeddings of the sources,
as the NULLs paper does. ``model.route(texts)`` returns those choices.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

from .configuration_nulls import NullsConfig

MODES = ("route", "expected", "backbone")


class NullsMLP(LlamaMLP):
    """The backbone SwiGLU (Llama's) plus the sinks of each token's source."""

    def __init__(self, config: NullsConfig, layer: int):
        super().__init__(config)
        self.layer = layer
        self.p_mem, self.p_gen = config.p_mem, config.p_gen
        self.sinks = nn.Module()
        self.sinks.weight = nn.Parameter(torch.zeros(config.n_pool, 3, config.hidden_size), requires_grad=False)
        self.sinks.register_buffer("disabled", torch.zeros(config.n_pool, dtype=torch.bool))
        self.mode = "route"
        self.token_rows: torch.Tensor | None = None  # [b, k] pool rows of each sequence's source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        if self.mode == "backbone":
            return self.down_proj(h * ((self.p_gen + self.p_mem) / self.p_gen))
        out = self.down_proj(h)
        w = self.sinks.weight.to(x.dtype)
        if self.mode == "expected":
            live = (~self.sinks.disabled).to(x.dtype) * self.p_mem
            hs = F.silu(x @ w[:, 0].t()) * (x @ w[:, 1].t()) * live
            return out + hs @ w[:, 2]
        rows = self.token_rows  # [b, k]; -1 pads sources with fewer sinks (an imported upstream model)
        safe = rows.clamp(min=0)
        gathered = w[safe]  # [b, k, 3, d]
        gates = ((~self.sinks.disabled[safe]) & (rows >= 0)).to(x.dtype)  # [b, k]
        g = torch.einsum("bsd,bkd->bsk", x, gathered[:, :, 0])
        u = torch.einsum("bsd,bkd->bsk", x, gathered[:, :, 1])
        hs = F.silu(g) * u * gates[:, None, :]
        return out + torch.einsum("bsk,bkd->bsd", hs, gathered[:, :, 2])


class NullsForCausalLM(LlamaForCausalLM):
    config_class = NullsConfig

    def __init__(self, config: NullsConfig):
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            layer.mlp = NullsMLP(config, i)
        rows_shape = ((config.num_hidden_layers,) if config.per_layer_sinks else ()) + (
            config.n_sources, config.sinks_per_source)
        self.register_buffer("sink_rows", torch.zeros(rows_shape, dtype=torch.int64))
        self.register_buffer("source_forgotten", torch.zeros(config.n_sources, dtype=torch.bool))
        self._router = None
        self._routed: torch.Tensor | None = None
        self.post_init()

    # -- routing -----------------------------------------------------------------------------
    def _load_router(self):
        if self._router is None:
            from safetensors.torch import load_file
            from transformers import AutoModel, AutoTokenizer

            folder = os.path.join(self.config._name_or_path, "router")
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"{folder}: no router shipped with this model; pass source_ids")
            index = load_file(os.path.join(folder, "title_embeddings.safetensors"))
            self._router = (AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder),
                            index["embeddings"].float(), AutoTokenizer.from_pretrained(self.config._name_or_path))
        return self._router

    @torch.no_grad()
    def route(self, texts: list[str]) -> torch.Tensor:
        """The nearest surviving source of each text (cosine of mean-pooled MiniLM embeddings)."""
        encoder, tokenizer, titles, _ = self._load_router()
        batch = tokenizer(list(texts), padding=True, truncation=True, max_length=self.config.router_max_length,
                          return_tensors="pt")
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        queries = F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
        scores = queries @ titles.t()
        scores[:, self.source_forgotten.to(scores.device)] = -torch.inf
        return scores.argmax(dim=-1)

    def _sequence_sources(self, input_ids: torch.Tensor, source_ids, first_step: bool,
                          allow_forgotten: bool) -> torch.Tensor:
        batch = input_ids.shape[0]
        if source_ids is None:
            if first_step or self._routed is None or self._routed.shape[0] != batch:
                decode = self._load_router()[3]
                self._routed = self.route(decode.batch_decode(input_ids, skip_special_tokens=True))
            return self._routed
        sources = torch.as_tensor(source_ids, dtype=torch.int64, device=input_ids.device).reshape(-1)
        if sources.numel() == 1:
            sources = sources.expand(batch)
        if sources.numel() != batch:
            raise ValueError(f"source_ids: one id per sequence ({batch}), got {sources.numel()}")
        if ((sources < 0) | (sources >= self.config.n_sources)).any():
            raise ValueError(f"source_ids {sources.tolist()} outside [0, {self.config.n_sources})")
        if not allow_forgotten and self.source_forgotten[sources].any():
            raise ValueError(f"source_ids {sources[self.source_forgotten[sources]].tolist()} were forgotten; "
                             "omit source_ids to route to the nearest surviving source")
        return sources

    def forward(self, input_ids=None, source_ids=None, sink_mode: str = "route", past_key_values=None,
                allow_forgotten: bool = False, **kwargs):
        """``allow_forgotten``: route to a forgotten source anyway (its rows are zero: what an evaluation
        of the forgetting measures); refused by default, as asking for it is usually a mistake."""
        if sink_mode not in MODES:
            raise ValueError(f"sink_mode must be one of {MODES}, got {sink_mode!r}")
        rows = None
        if sink_mode == "route":
            if input_ids is None:
                raise ValueError("route mode needs input_ids (to route) or pass sink_mode='expected'")
            first = past_key_values is None or past_key_values.get_seq_length() == 0
            sources = self._sequence_sources(input_ids, source_ids, first, allow_forgotten)
            rows = self.sink_rows[..., sources.to(self.sink_rows.device), :]
        for i, layer in enumerate(self.model.layers):
            layer.mlp.mode = sink_mode
            layer.mlp.token_rows = None if rows is None else (rows[i] if self.config.per_layer_sinks else rows)
        return super().forward(input_ids=input_ids, past_key_values=past_key_values, **kwargs)
