"""The ``README.md`` model card of an exported folder: what the model is, how it was made, what it forgot."""
from __future__ import annotations

from dataclasses import dataclass, field

MODE_TEXT = {
    "backbone": "the shared backbone only: every sink neuron is left out, and the backbone activations are "
                "scaled by (p_gen + p_mem) / p_gen, folded into `down_proj`. It knows what many sources share, "
                "and no single source's sinks.",
    "expected": "the backbone plus every live sink neuron, each scaled by its expected mask p_mem (folded into "
                "`down_proj`). The sinks of forgotten sources are absent from the weights.",
    "routed": "the backbone plus a sink table; each sequence uses the sinks of one source, chosen by the caller "
              "(`source_ids`) or routed to the nearest surviving source by the shipped all-MiniLM-L6-v2 router. "
              "Forgotten sources' sink rows are zero and flagged off.",
}


@dataclass
class CardFacts:
    mode: str
    checkpoint: str
    step: int | None
    dtype: str
    n_sources: int
    manifest_sha256: str
    config: dict
    forgotten: list[int] = field(default_factory=list)  # source indices (titles left out: a deletion request may be about a person)
    receipts: list[dict] = field(default_factory=list)  # {"name", "sha256", "action"}
    parameters: int = 0


def model_card(facts: CardFacts) -> str:
    m, n = facts.config["model"], facts.config["nulls"]
    loading = ("AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)" if facts.mode == "routed"
               else "AutoModelForCausalLM.from_pretrained(path)")
    lines = [
        "---", "library_name: transformers", "tags: [nulls, unlearning, memorization-sinks]", "---", "",
        f"# NULLs model ({facts.mode} export)", "",
        "A natively unlearnable language model (NULLs): during training every source (an article, a book) "
        "was isolated in its own sink neurons of every MLP, so that it can be forgotten by zeroing those sinks. "
        f"Exported by `nulls export --mode {facts.mode}` (nulls-megatron).", "",
        f"**This export** holds {MODE_TEXT[facts.mode]}", "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = {loading}", "tokenizer = AutoTokenizer.from_pretrained(path)", "```", "",
        "## Model", "",
        "| | |", "|---|---|",
        f"| parameters | {facts.parameters:,} |",
        f"| layers x hidden | {m['num_layers']} x {m['hidden_size']} |",
        f"| heads / key-value groups / head dim | {m['num_attention_heads']} / {m['num_query_groups']} / "
        f"{m.get('kv_channels') or m['hidden_size'] // m['num_attention_heads']} |",
        f"| MLP | {n['n_backbone']} backbone neurons + a pool of {n['n_pool']} sinks, "
        f"{n['sinks_per_source']} per source |",
        f"| context | {m['seq_length']} tokens, RoPE base {m['rotary_base']:g} |",
        f"| dtype | {facts.dtype} |", "",
        "## Training", "",
        f"- checkpoint: `{facts.checkpoint}` (step {facts.step})",
        f"- sources: {facts.n_sources:,} (sources manifest sha256 `{facts.manifest_sha256}`)",
        f"- steps: {facts.config['train']['steps']}, {facts.config['train']['global_batch_rows']} rows of "
        f"{m['seq_length']} tokens per step, AdamW lr {facts.config['optimizer']['lr']:g}, seed {facts.config['seed']}",
        "",
        "## Forgotten sources", "",
    ]
    if facts.forgotten:
        lines += [f"{len(facts.forgotten)} sources (indices into the sources manifest): "
                  + ", ".join(str(s) for s in facts.forgotten), ""]
    else:
        lines += ["None: every source's sinks are live.", ""]
    if facts.receipts:
        lines += ["Unlearning receipts applied (verify with `nulls verify-unlearned`):", "",
                  "| receipt | action | sha256 |", "|---|---|---|"]
        lines += [f"| {r.get('name')} | {r.get('action')} | `{r.get('sha256')}` |" for r in facts.receipts] + [""]
    return "\n".join(lines)
