"""`nulls export` to Hugging Face: the exported models equal ours in every mode, from checkpoints trained
at TP=2 (the session fixture), TP=2 x PP=2 and TP=1 (untied, per-layer sinks), before and after
`nulls unlearn`; generation, the tokenizer and lm-evaluation-harness as an outside client."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from nulls_megatron.cli import main
from nulls_megatron.export.hf_llama import ModelShape, llama_state_dict
from nulls_megatron.inference.generate import Routing, SamplingOptions, generate
from nulls_megatron.inference.load import load_for_inference
from tests.conftest import FORGET_GROUP, GROUP_SOURCES, ROOT
from tests.train_helpers import read_articles, train_config

ATOL = 1e-4
_LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def _load(checkpoint):
    # A plain process exports the MASTER_PORT of its gloo group; children must not inherit it.
    saved = {k: os.environ.get(k) for k in _LAUNCH_VARS}
    try:
        return load_for_inference(checkpoint)
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def _hf(out: Path, remote: bool = False):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote).eval()


def heldout_texts(n: int = 3) -> list[str]:
    """Real articles the fixture models never saw (they train on the first 40)."""
    return [a["text"] for a in read_articles(120)[100:100 + n]]


def _ids(loaded, text: str, length: int) -> torch.Tensor:
    return torch.tensor([loaded.tokenizer.encode(text)[:length]])


def _ours(loaded, ids: torch.Tensor, mode: str, source: int | None = None) -> torch.Tensor:
    with torch.no_grad():
        if mode == "route":
            return loaded.model(ids, source_ids=torch.zeros_like(ids), sink_mode="route", route_sources=source).float()
        return loaded.model(ids, source_ids=torch.zeros_like(ids), sink_mode=mode).float()


def _export(checkpoint, out: Path, mode: str, *extra: str) -> Path:
    assert main(["export", str(checkpoint), str(out), "--mode", mode, *extra]) == 0
    return out


def _assert_equal_in_every_mode(loaded, checkpoint, tmp: Path, sources=(3, 17)) -> None:
    ids = _ids(loaded, heldout_texts(1)[0], loaded.cfg.model.seq_length)
    for mode in ("backbone", "expected"):
        hf = _hf(_export(checkpoint, tmp / mode, mode))
        assert type(hf).__name__ == "LlamaForCausalLM"
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, _ours(loaded, ids, mode), atol=ATOL, rtol=0)
    hf = _hf(_export(checkpoint, tmp / "routed", "routed"), remote=True)
    for source in sources:
        with torch.no_grad():
            torch.testing.assert_close(hf(ids, source_ids=source).logits, _ours(loaded, ids, "route", source),
                                       atol=ATOL, rtol=0)
            torch.testing.assert_close(hf(ids, sink_mode="expected").logits, _ours(loaded, ids, "expected"),
                                       atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def loaded(trained_run):
    return _load(trained_run.checkpoint)


def test_tp2_checkpoint_exports_equal_logits_in_every_mode_with_a_complete_config(trained_run, loaded, tmp_path):
    run = trained_run.copy_to(tmp_path)  # the routed export builds the checkpoint's routing index
    _assert_equal_in_every_mode(loaded, run.checkpoint, tmp_path)
    config = json.loads((tmp_path / "expected" / "config.json").read_text())
    m = loaded.cfg.model
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert config["head_dim"] == m.head_dim and config["rms_norm_eps"] == m.norm_epsilon
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": m.rotary_base}
    assert config["num_key_value_heads"] == m.num_query_groups and config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert config["intermediate_size"] == loaded.cfg.nulls.n_backbone + loaded.cfg.nulls.n_pool
    backbone = json.loads((tmp_path / "backbone" / "config.json").read_text())
    assert backbone["intermediate_size"] == loaded.cfg.nulls.n_backbone
    assert sorted(p.name for p in (tmp_path / "expected").iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors", "nulls_export.json",
        "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    card = (tmp_path / "expected" / "README.md").read_text()
    assert "expected export" in card and "None: every source's sinks are live." in card


def test_tokenizer_gives_our_ids_and_text_offline(trained_run, loaded, tmp_path):
    from transformers import AutoTokenizer

    _export(trained_run.checkpoint, tmp_path / "out", "backbone")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    sp = loaded.tokenizer
    samples = heldout_texts(5) + ["  two  spaces\nnew line\ttab 1234 ünïcødé 中文 😀", " leading", "", "end  "]
    for text in samples:
        assert tokenizer(text)["input_ids"] == sp.encode(text), text[:60]
        ids = sp.encode(text)
        assert tokenizer.decode(ids) == sp.decode(ids)
    assert tokenizer.model_max_length == loaded.cfg.model.seq_length


def test_greedy_generation_in_transformers_equals_nulls_generate(trained_run, loaded, tmp_path):
    run = trained_run.copy_to(tmp_path)
    prompt = loaded.tokenizer.encode("The school was founded in 2016 and")
    for mode, source in (("expected", None), ("routed", 3)):
        hf = _hf(_export(run.checkpoint, tmp_path / mode, mode), remote=mode == "routed")
        routing = Routing("route", source) if source is not None else Routing(mode)
        ours = generate(loaded.model, prompt, routing, SamplingOptions(max_new_tokens=12), context=64,
                        vocab_size=loaded.vocab_size).tokens
        kwargs = {"source_ids": source} if source is not None else {}
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=0, **kwargs)[0, len(prompt):].tolist()
        assert theirs == ours, mode


def test_routed_model_routes_a_prompt_to_a_surviving_source_by_itself(trained_run, tmp_path):
    from transformers import AutoTokenizer

    run = trained_run.copy_to(tmp_path)
    assert main(["unlearn", str(run.run_dir), "--group", FORGET_GROUP]) == 0
    titles = [json.loads(line)["title"] for line in map(json.dumps, read_articles(40))]
    out = _export(run.root, tmp_path / "routed", "routed")
    hf, tokenizer = _hf(out, remote=True), AutoTokenizer.from_pretrained(out)
    assert hf.route([titles[11], titles[20]]).tolist() == [11, 20]
    gone = hf.route([titles[s] for s in GROUP_SOURCES]).tolist()
    assert not set(gone) & set(GROUP_SOURCES)
    batch = tokenizer([titles[11]], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(hf(**batch).logits, hf(**batch, source_ids=11).logits)
    with pytest.raises(ValueError, match="forgotten"):
        hf(**batch, source_ids=GROUP_SOURCES[0])
    with safe_open(out / "router" / "title_embeddings.safetensors", "pt") as f:
        assert not f.get_tensor("embeddings")[list(GROUP_SOURCES)].any()


def _holds_any(tensor: torch.Tensor, vectors: torch.Tensor) -> bool:
    """Whether a row of ``tensor`` [n, d] equals one of ``vectors`` [m, d] (or p_mem times one)."""
    return any(bool((tensor == v).all(dim=-1).any()) for v in vectors)


def test_after_unlearn_export_equals_ours_and_holds_no_forgotten_row(trained_run, tmp_path):
    run = trained_run.copy_to(tmp_path)
    before = _load(run.checkpoint)
    assignment = before.model.nulls_mlps()[0].sinks.assignment
    rows = assignment.sinks_of(torch.tensor([*GROUP_SOURCES, 8])).unique()
    p_mem = before.cfg.nulls.p_mem
    # Every vector of the rows as it was before unlearning: gate and up rows, the down column and
    # the down column as the expected fold scales it.
    forgotten = torch.cat([torch.cat([m.sinks.weight[rows].reshape(-1, m.sinks.hidden_size),
                                      m.sinks.weight[rows, 2] * p_mem]) for m in before.model.nulls_mlps()])
    assert main(["unlearn", str(run.run_dir), "--group", FORGET_GROUP]) == 0
    assert main(["unlearn", str(run.run_dir), "--source-index", "8", "--suppress"]) == 0  # weights kept, flagged
    after = _load(run.root)
    assert sorted(after.sources.state.off_sources()) == sorted([*GROUP_SOURCES, 8])
    _assert_equal_in_every_mode(after, run.root, tmp_path, sources=(3, 11))
    config = json.loads((tmp_path / "expected" / "config.json").read_text())
    assert config["intermediate_size"] == after.cfg.nulls.n_backbone + after.cfg.nulls.n_pool - len(rows)
    for mode in ("backbone", "expected", "routed"):
        for path in (tmp_path / mode).glob("*.safetensors"):
            with safe_open(path, "pt") as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    if not tensor.is_floating_point() or tensor.shape[-1] != forgotten.shape[-1] and "down_proj" not in key:
                        continue
                    flat = tensor.t() if "down_proj" in key else tensor.reshape(-1, tensor.shape[-1])
                    assert not _holds_any(flat, forgotten), f"{mode}/{path.name}:{key} holds a forgotten row"
    card = (tmp_path / "expected" / "README.md").read_text()
    assert after.sources.state.receipts[0]["sha256"] in card and "4 sources" in card


def _train(prep: Path, run_dir: Path, nproc: int, **sections) -> Path:
    cfg = train_config(prep, run_dir, model={"vocab_size": 512, "seq_length": 64, **sections.pop("model", {})},
                       train={"steps": 2, "save_every": 2}, tracking={"enabled": False}, **sections)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "nulls_megatron.cli", "train", "--config", str(path), "--nproc",
                          str(nproc)], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return run_dir / "checkpoints"


def test_tp2_pp2_and_tp1_untied_per_layer_checkpoints_export_equal_logits(trained_run, tmp_path):
    tp2pp2 = _train(trained_run.prep_dir, tmp_path / "tp2pp2", 4, parallel={"tensor_parallel": 2, "pipeline_parallel": 2})
    _assert_equal_in_every_mode(_load(tp2pp2), tp2pp2, tmp_path / "a")
    tp1 = _train(trained_run.prep_dir, tmp_path / "tp1", 1, model={"tie_embeddings": False},
                 nulls={"per_layer_sinks": True})
    loaded = _load(tp1)
    _assert_equal_in_every_mode(loaded, tp1, tmp_path / "b")
    assert "lm_head.weight" in safe_open(tmp_path / "b" / "expected" / "model.safetensors", "pt").keys()


def test_per_layer_live_widths_are_padded_with_zero_neurons_and_fold_exactly():
    from nulls_megatron.sinks.assignment import SinkAssignment
    from nulls_megatron.sinks.mlp import NullsMLP
    from nulls_megatron.sinks.routing import SinkRouting

    torch.manual_seed(0)
    d, nb, pool, k = 16, 4, 24, 3
    assignment = SinkAssignment(n_pool=pool, sinks_per_source=k, per_layer=True)
    mlps = [NullsMLP(d, nb, assignment, layer_number=i) for i in range(2)]
    mlps[0].sinks.disabled[assignment.sinks_of(torch.tensor([5]), layer=0)[0]] = True
    mlps[1].sinks.disabled[assignment.sinks_of(torch.tensor([5, 6]), layer=1).reshape(-1)] = True
    state = {}
    for i, mlp in enumerate(mlps):
        state[f"decoder.layers.{i}.mlp.linear_fc1.weight"] = mlp.backbone_fc1.detach()
        state[f"decoder.layers.{i}.mlp.linear_fc2.weight"] = mlp.backbone_fc2.detach()
        state[f"decoder.layers.{i}.mlp.sinks.weight"] = mlp.sinks.weight.detach()
        state[f"decoder.layers.{i}.mlp.sinks.disabled"] = mlp.sinks.disabled
        for name, shape in (("input_layernorm.weight", (d,)), ("pre_mlp_layernorm.weight", (d,)),
                            ("self_attention.linear_qkv.weight", (3 * d, d)), ("self_attention.linear_proj.weight", (d, d))):
            state[f"decoder.layers.{i}.{name}"] = torch.ones(shape)
    state["embedding.word_embeddings.weight"], state["decoder.final_layernorm.weight"] = torch.ones(8, d), torch.ones(d)
    shape = ModelShape(vocab_size=8, hidden_size=d, num_layers=2, num_heads=1, num_query_groups=1, head_dim=d,
                       n_backbone=nb, n_pool=pool, p_mem=k / pool, p_gen=nb / (nb + pool), tie_embeddings=True)
    out, width = llama_state_dict(state, shape, "expected")
    live = [int((~m.sinks.disabled).sum()) for m in mlps]
    assert live[0] > live[1] and width == nb + live[0]
    x = torch.randn(7, d)
    for i, mlp in enumerate(mlps):
        gate, up, down = (out[f"model.layers.{i}.mlp.{p}_proj.weight"] for p in ("gate", "up", "down"))
        assert gate.shape == (width, d) and not gate[nb + live[i]:].any() and not down[:, nb + live[i]:].any()
        folded = (torch.nn.functional.silu(x @ gate.t()) * (x @ up.t())) @ down.t()
        torch.testing.assert_close(folded, mlp(x, SinkRouting.expected()), atol=1e-6, rtol=0)
    state["decoder.layers.1.mlp.linear_fc2.weight"] = torch.ones(d, nb + 1)
    with pytest.raises(ValueError, match=r"decoder.layers.1.mlp.linear_fc2.weight: shape \(16, 5\), expected \(16, 4\)"):
        llama_state_dict(state, shape, "expected")


def test_sharded_bf16_export_and_refusals(trained_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = _export(trained_run.checkpoint, tmp_path / "bf16", "expected", "--dtype", "bf16", "--max-shard-size", "100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16 and not list(out.glob("*.bin"))
    assert main(["export", str(trained_run.checkpoint), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not list(tmp_path.glob(".bf16.partial-*"))


LM_EVAL_TASK = """task: nulls_heldout
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
"""


def _rolling_loglikelihood(loaded, ids: list[int], prefix: int, window: int) -> float:
    """Sum of log p(token | previous) over ``ids`` as lm-eval's rolling windows score it: blocks of
    ``window`` predicted tokens; each input is the ``window`` tokens ending just before its block's
    last token (``prefix`` first), so a full block sees one token of context, the last block more."""
    total, seq = 0.0, [prefix] + ids  # seq[j] is the input that predicts ids[j]
    for start in range(0, len(ids), window):
        end = min(len(ids), start + window)
        inputs = torch.tensor([seq[max(0, end - window):end]])
        logp = torch.log_softmax(_ours(loaded, inputs, "expected")[0, -(end - start):], dim=-1)
        total += float(logp.gather(1, torch.tensor(ids[start:end])[:, None]).sum())
    return total


def test_lm_evaluation_harness_perplexity_agrees_with_ours(trained_run, loaded, tmp_path):
    out = _export(trained_run.checkpoint, tmp_path / "model", "expected")
    texts = [t[:1200] for t in heldout_texts(3)]
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "nulls_heldout.yaml").write_text(LM_EVAL_TASK.format(data=data))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    cmd = [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
           f"pretrained={out},dtype=float32", "--tasks", "nulls_heldout", "--include_path", str(tasks),
           "--device", "cpu", "--batch_size", "1", "--output_path", str(tmp_path / "results")]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(next((tmp_path / "results").rglob("results_*.json")).read_text())
    theirs = results["results"]["nulls_heldout"]["bits_per_byte,none"]
    window = loaded.cfg.model.seq_length
    total = sum(_rolling_loglikelihood(loaded, loaded.tokenizer.encode(t), 1, window) for t in texts)
    ours = -total / sum(len(t.encode("utf-8")) for t in texts) / math.log(2)
    assert theirs == pytest.approx(ours, rel=1e-4), (theirs, ours)
    assert 1.0 < ours < 12.0
