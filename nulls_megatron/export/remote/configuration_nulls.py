"""Configuration of an exported NULLs model (natively unlearnable LM): a Llama with per-source sinks.

Written by ``nulls export --mode routed`` (nulls-megatron); loads with only torch and transformers.
"""
from transformers import LlamaConfig


class NullsConfig(LlamaConfig):
    """A Llama config plus the sink pool: ``n_backbone`` always-on MLP neurons per layer
    (``intermediate_size``) and ``n_pool`` sink neurons, ``sinks_per_source`` of them per source."""

    model_type = "nulls_llama"

    def __init__(self, n_pool: int = 0, sinks_per_source: int = 0, p_mem: float = 0.0, p_gen: float = 1.0,
                 n_sources: int = 0, per_layer_sinks: bool = False, router_max_length: int = 256, **kwargs):
        self.n_pool = n_pool
        self.sinks_per_source = sinks_per_source
        self.p_mem = p_mem
        self.p_gen = p_gen
        self.n_sources = n_sources
        self.per_layer_sinks = per_layer_sinks
        self.router_max_length = router_max_length
        super().__init__(**kwargs)
