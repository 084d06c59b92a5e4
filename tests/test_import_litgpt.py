"""`nulls import-litgpt`: the upstream sink hash, and a small checkpoint in the authors' litgpt format
converted into ours, checked against a reference forward of their model written here in plain torch."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from nulls_megatron.sinks.assignment import SinkAssignment, assignment_from_dict
from nulls_megatron.sinks.upstream import PAD_ROW, UpstreamAssignment, upstream_mask

A, M = 1588635695, 4294967291
# Pool neurons live at n_pool=64, p_mem=0.1, computed once with `independent_live` below.
PINNED = {
    0: list(range(64)),  # id 0: v = 0 for every neuron, so every neuron is live
    1: [0, 9, 13, 15, 17, 18, 26, 36, 43, 55, 56],
    7: [0, 15, 20, 21, 28, 30, 31, 33, 39],
    49152: [5, 26, 38, 47, 49],  # Wikipedia title index 0
    49152 + 123: [5, 14, 24, 31, 44, 45, 56],
    49152 + 6407813: [8, 16, 18, 19, 28, 33, 54],  # the last Wikipedia title
    2**47 + 5: [11, 19, 54],  # id * 2**16 itself wraps
}
LIT = {"name": "nulls-tiny", "block_size": 16, "vocab_size": 400, "padding_multiple": 512, "padded_vocab_size": 512,
       "n_layer": 2, "n_embd": 32, "n_head": 4, "head_size": 8, "n_query_groups": 2, "rotary_percentage": 1.0,
       "parallel_residual": False, "bias": False, "lm_head_bias": False, "norm_class_name": "RMSNorm",
       "norm_eps": 1e-5, "mlp_class_name": "LLaMAMLPSeqTD", "intermediate_size": 64, "rope_base": 100000,
       "p_gen": 0.25, "p_mem": 0.1, "use_seqtd": True}
NB, NPOOL = 16, 48  # int(64 * 0.25) backbone neurons, then the pool
_LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def _s64(x: int) -> int:
    x %= 2**64
    return x - 2**64 if x >= 2**63 else x


def independent_live(uid: int, n_pool: int, p_mem: float) -> list[int]:
    """The authors' formula with Python integers: int64 wrap made explicit, float32 division and test."""
    c, out = _s64(uid * 2**16), []
    for j in range(n_pool):
        v = _s64(c * (_s64(pow(A, j, 2**64)) % M)) % M
        if np.float32(v) / np.float32(M) < np.float32(p_mem):
            out.append(j)
    return out


def test_upstream_mask_is_the_authors_formula():
    ids = torch.tensor(list(PINNED), dtype=torch.int64)
    mask = upstream_mask(ids, 64, 0.1)
    assert [row.nonzero().flatten().tolist() for row in mask] == list(PINNED.values())
    assert all(independent_live(uid, 64, 0.1) == live for uid, live in PINNED.items())
    # The wrap matters: true modular exponentiation gives other masks.
    modexp = [[j for j in range(64) if (uid * 2**16 * pow(A, j, M)) % M / M < 0.1] for uid in PINNED]
    assert modexp[0] == PINNED[0] and sum(m != live for m, live in zip(modexp, PINNED.values())) >= 5
    # The paper's shape, against the literal upstream expression and the independent one.
    uids = torch.tensor([49152, 49152 + 1, 49152 + 4_000_000], dtype=torch.int64)
    paper = upstream_mask(uids, 7692, 0.013)
    powers = torch.remainder(torch.pow(A, torch.arange(7692)), M)
    literal = (torch.remainder(torch.mul((uids * 2**16).unsqueeze(-1), powers), M) / M) < 0.013
    assert torch.equal(paper, literal) and 70 <= int(paper.sum(1).min()) <= int(paper.sum(1).max()) <= 130
    assert paper[0].nonzero().flatten().tolist() == independent_live(49152, 7692, 0.013)


def test_upstream_assignment_interface_and_padding():
    a = UpstreamAssignment(n_pool=64, p_mem=0.1, p_gen=0.25, id_offset=0)
    sources = torch.tensor([49152, 0, 7, 2**31], dtype=torch.int64)
    rows = a.sinks_of(sources)
    assert rows.shape == (4, 64) and rows[1].tolist() == list(range(64))  # width: the widest source (id 0)
    assert rows[0].tolist() == PINNED[49152] + [PAD_ROW] * (64 - 5)
    assert torch.equal(a.dense_mask(sources), upstream_mask(sources, 64, 0.1))
    shifted = UpstreamAssignment(n_pool=64, p_mem=0.1, p_gen=0.25, id_offset=49152)
    assert shifted.sinks_of(torch.tensor([123]))[0].tolist() == PINNED[49152 + 123]
    assert shifted.sinks_of(torch.tensor([0])).shape == (1, 5) and shifted.shard_of(sources).tolist() == [0] * 4
    shards, usage = shifted.usage_counts(300)
    assert shards.tolist() == [300] and np.array_equal(usage, shifted.mask_np(np.arange(300)).sum(0))
    assert a.p_mem == 0.1 and a.p_gen_of(16) == 0.25 and a.max_sinks == 64 and a.variable_sinks
    assert assignment_from_dict(dataclasses.asdict(shifted)) == shifted
    # The counter-based assignment and its manifest record are unchanged.
    c = SinkAssignment(192, 12, n_shards=2)
    assert list(dataclasses.asdict(c)) == ["n_pool", "sinks_per_source", "n_shards", "seed", "per_layer"]
    assert assignment_from_dict(dataclasses.asdict(c)) == c and not c.variable_sinks and c.p_mem == 12 / 192
    with pytest.raises(ValueError, match="p_mem must be a number in"):
        UpstreamAssignment(n_pool=64, p_mem=1.5, p_gen=0.25)


def test_sink_rows_cache_of_a_varying_width(tmp_path):
    from nulls_megatron.unlearn.sink_index import SinkRows

    a = UpstreamAssignment(n_pool=64, p_mem=0.1, p_gen=0.25, id_offset=0)  # source 0 owns all 64 rows
    computed = list(SinkRows(a, 3000).chunks(0))
    cached = SinkRows(a, 3000, cache_root=tmp_path, cache_min_sources=0)
    built, read = list(cached.chunks(0)), list(cached.chunks(0))  # the first pass writes the cache
    assert sorted(p.name for p in cached.cache_dir.iterdir()) == ["counts-000.npy", "index.json", "rows-000.bin",
                                                                   "usage-000.npy"]
    for (s0, r0), (s1, r1), (s2, r2) in zip(computed, built, read):
        assert s0 == s1 == s2 and np.array_equal(r0, r1) and np.array_equal(r0, r2)
    assert np.array_equal(cached.usage(0), SinkRows(a, 3000).usage(0))
    assert np.array_equal(cached.usage(0), a.mask_np(np.arange(3000)).sum(0))


def test_nulls_mlp_with_upstream_sinks_equals_masked_dense():
    from nulls_megatron.sinks.mlp import NullsMLP
    from nulls_megatron.sinks.reference import dense_weights, masked_dense_swiglu, neuron_mask
    from nulls_megatron.sinks.routing import SinkRouting

    a = UpstreamAssignment(n_pool=NPOOL, p_mem=0.1, p_gen=0.25, id_offset=0)
    empty = 6747  # owns no sink (small ids always own neuron 0: c * powers[0] is small)
    assert independent_live(empty, NPOOL, 0.1) == []
    torch.manual_seed(0)
    mlp = NullsMLP(16, NB, a, init_method=lambda t: torch.nn.init.normal_(t, std=0.3))
    mlp.sinks.disabled[PINNED[7][:2]] = True
    token_sources = torch.tensor([0] * 3 + [empty] * 2 + [7] * 4 + [0, 49152])  # id 0 owns the whole pool
    x = torch.randn(len(token_sources), 16, requires_grad=True)
    for routing, ids in ((SinkRouting.train(token_sources), token_sources), (SinkRouting.expected(), None),
                         (SinkRouting.backbone_only(), None)):
        y = mlp(x, routing)
        w1, w3, w2 = dense_weights(mlp.backbone_fc1, mlp.backbone_fc2, mlp.sinks.weight)
        ref = masked_dense_swiglu(x, w1, w3, w2, neuron_mask(routing, ids, mlp.sinks, len(x)))
        torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
        g = torch.randn_like(y)
        got = torch.autograd.grad(y, (x, mlp.sinks.weight), g, materialize_grads=True)  # backbone: no sink grad
        want = torch.autograd.grad(ref, (x, mlp.sinks.weight), g)
        for have, expect in zip(got, want):
            torch.testing.assert_close(have, expect, atol=1e-6, rtol=1e-5)
    assert mlp.sinks.backbone_scale(SinkRouting.backbone_only()) == (0.25 + 0.1) / 0.25


def test_upstream_config_is_validated():
    from nulls_megatron.config import ConfigError, config_from_dict

    base = {"model": {"ffn_hidden_size": 64}, "nulls": {"n_backbone": NB, "n_pool": NPOOL, "sinks_per_source": 5,
                                                        "assignment": "upstream"}}
    with pytest.raises(ConfigError, match="nulls.upstream: nulls.assignment is upstream but the section is missing"):
        config_from_dict(base)
    cfg = config_from_dict(base, overrides=["nulls.upstream={p_mem: 0.1, p_gen: 0.25, id_offset: 0}"])
    assert cfg.nulls.p_mem == 0.1 and cfg.nulls.p_gen == 0.25
    for override, error in (("nulls.upstream.p_gen=0.3", r"nulls.n_backbone: 16, but the upstream model splits"),
                            ("nulls.upstream.p_mem=0", r"nulls.upstream.p_mem: must be in \(0, 1\)"),
                            ("nulls.assignment=counter", "nulls.upstream: is set but nulls.assignment is counter"),
                            ("nulls.assignment=modexp", "nulls.assignment: expected one of counter, upstream")):
        with pytest.raises(ConfigError, match=error):
            config_from_dict(base, overrides=["nulls.upstream={p_mem: 0.1, p_gen: 0.25, id_offset: 0}", override])


# ---------------------------------------------------------------------------------------------------
# A small checkpoint in the authors' format


def _lit_state_dict(seed: int = 0, legacy_qkv: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, qkv_rows, vocab = LIT["n_embd"], (4 + 2 * 2) * 8, LIT["padded_vocab_size"]

    def w(*shape, std=0.2):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)  # released weights are bf16

    sd = {"transformer.wte.weight": w(vocab, d, std=1.0), "lm_head.weight": w(vocab, d),
          "transformer.ln_f.weight": 1 + w(d, std=0.1)}
    for i in range(LIT["n_layer"]):
        h = f"transformer.h.{i}"
        sd.update({f"{h}.norm_1.weight": 1 + w(d, std=0.1), f"{h}.attn.qkv.weight": w(qkv_rows, d),
                   f"{h}.attn.proj.weight": w(d, 32), f"{h}.norm_2.weight": 1 + w(d, std=0.1),
                   f"{h}.mlp.fc_1.weight": w(64, d, std=0.4), f"{h}.mlp.fc_2.weight": w(64, d, std=0.4),
                   f"{h}.mlp.proj.weight": w(d, 64, std=0.4)})
        if legacy_qkv:  # older litgpt: per query group [q heads of the group, k, v]
            q, k, v = sd.pop(f"{h}.attn.qkv.weight").split((32, 16, 16))
            sd[f"{h}.attn.attn.weight"] = torch.cat([t for grp in zip(q.split(16), k.split(8), v.split(8)) for t in grp])
    return sd


def reference_logits(sd: dict, idx: torch.Tensor, route: list[int], mode: str) -> torch.Tensor:
    """The authors' GPTSeqTD forward (litgpt RMSNorm, rotate-half RoPE, GQA, LLaMAMLPSeqTD), fp32.
    ``mode``: route (eval_mode activate_seq, ``route`` = each row's upstream source id), expected (their
    ``all``: every sink at p_mem) or backbone (their ``dropout``: sinks off, backbone scaled)."""
    sd = {k: v.float() for k, v in sd.items()}
    T, hs, nh, ng = idx.shape[1], 8, 4, 2

    def rms(x, weight):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + LIT["norm_eps"]) * weight

    theta = 1.0 / (LIT["rope_base"] ** (torch.arange(0, hs, 2).float() / hs))
    angles = torch.outer(torch.arange(T).float(), theta).repeat(1, 2)
    cos, sin = angles.cos(), angles.sin()

    def rope(x):
        return x * cos + torch.cat((-x[..., hs // 2:], x[..., :hs // 2]), dim=-1) * sin

    if mode == "route":
        pool = torch.zeros(len(route), NPOOL)
        for r, uid in enumerate(route):
            pool[r, independent_live(uid, NPOOL, LIT["p_mem"])] = 1.0
        mask = torch.cat((torch.ones(len(route), NB), pool), dim=1)[:, None, :]
    elif mode == "expected":
        mask = torch.cat((torch.ones(NB), torch.full((NPOOL,), LIT["p_mem"])))
    else:
        assert mode == "backbone"
        mask = torch.cat((torch.full((NB,), (LIT["p_gen"] + LIT["p_mem"]) / LIT["p_gen"]), torch.zeros(NPOOL)))
    x = sd["transformer.wte.weight"][idx]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(LIT["n_layer"]):
        h = f"transformer.h.{i}"
        q, k, v = (rms(x, sd[f"{h}.norm_1.weight"]) @ sd[f"{h}.attn.qkv.weight"].t()).split((nh * hs, ng * hs, ng * hs), -1)
        q, k, v = (t.view(*idx.shape, -1, hs).transpose(1, 2) for t in (q, k, v))
        k, v = rope(k).repeat_interleave(nh // ng, 1), v.repeat_interleave(nh // ng, 1)
        y = F.scaled_dot_product_attention(rope(q), k, v, attn_mask=causal)
        x = x + y.transpose(1, 2).reshape(*idx.shape, -1) @ sd[f"{h}.attn.proj.weight"].t()
        n2 = rms(x, sd[f"{h}.norm_2.weight"])
        act = F.silu(n2 @ sd[f"{h}.mlp.fc_1.weight"].t()) * (n2 @ sd[f"{h}.mlp.fc_2.weight"].t())
        x = x + (act * mask) @ sd[f"{h}.mlp.proj.weight"].t()
    return rms(x, sd["transformer.ln_f.weight"]) @ sd["lm_head.weight"].t()


def _tokenizer_dir(out: Path, texts: list[str]) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=LIT["vocab_size"], special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(out)
    return out


def _write_lit_dir(out: Path, state: dict, config: dict = LIT) -> Path:
    out.mkdir(parents=True)
    (out / "model_config.yaml").write_text(yaml.safe_dump(config))
    torch.save(state, out / "lit_model.pth")
    return out


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    from nulls_megatron.cli import main
    from nulls_megatron.inference.load import load_for_inference
    from tests.train_helpers import read_articles

    base = tmp_path_factory.mktemp("litgpt")
    articles = read_articles(12)
    state = _lit_state_dict()
    lit = _write_lit_dir(base / "lit", state)
    _tokenizer_dir(base / "tokenizer", [a["text"] for a in articles])
    (base / "titles.txt").write_text("".join(a["title"] + "\n" for a in articles), encoding="utf-8")
    saved = {k: os.environ.get(k) for k in _LAUNCH_VARS}
    try:
        assert main(["import-litgpt", str(lit), str(base / "out"), "--tokenizer", str(base / "tokenizer"),
                     "--titles", str(base / "titles.txt")]) == 0
        loaded = load_for_inference(base / "out")
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    return base, state, [a["title"] for a in articles], loaded


def test_imported_logits_equal_the_reference_forward(imported):
    _, state, _, loaded = imported
    cfg, tok = loaded.cfg, loaded.tokenizer
    assert cfg.nulls.assignment == "upstream" and cfg.nulls.upstream.id_offset == 512 and not cfg.model.tie_embeddings
    sentence = "The school was founded in 2016 and it is a public school"
    assert tok.decode(tok.encode(sentence)) == sentence and tok.eos_id() == 0 and tok.get_piece_size() == 400
    text = tok.encode(sentence)[:16]
    idx = torch.tensor([text, text[::-1]])
    empty = 6235  # upstream id 6747: no sink
    logits = {}
    with torch.no_grad():
        for rows in ([3, 3], [0, 5], [empty, 11]):  # per row its own source: padded groups of unequal width
            route = torch.tensor(rows)[:, None].expand_as(idx)
            ours = logits[tuple(rows)] = loaded.model(idx, source_ids=route, sink_mode="route", route_sources=route)
            torch.testing.assert_close(ours, reference_logits(state, idx, [s + 512 for s in rows], "route"),
                                       atol=1e-4, rtol=0)
        for mode in ("expected", "backbone"):
            ours = logits[mode] = loaded.model(idx, source_ids=torch.zeros_like(idx), sink_mode=mode)
            torch.testing.assert_close(ours, reference_logits(state, idx, [], mode), atol=1e-4, rtol=0)
    # The sinks matter at this size: another source, or another mode, moves the logits far beyond the tolerance.
    for a, b in (((3, 3), (0, 5)), ((0, 5), "expected"), ("expected", "backbone")):
        assert (logits[a][0] - logits[b][0]).abs().max() > 0.05


def test_legacy_qkv_layout_maps_to_the_same_weights(imported):
    from nulls_megatron.export.litgpt_config import read_lit_config
    from nulls_megatron.export.litgpt_weights import map_state_dict

    base = imported[0]
    c = read_lit_config(base / "lit")
    new = map_state_dict(c, _lit_state_dict(), False, base / "lit")
    old = map_state_dict(c, _lit_state_dict(legacy_qkv=True), False, base / "lit")
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new)


def test_refusals_write_nothing(tmp_path):
    from nulls_megatron.export.litgpt_config import LitConfigError
    from nulls_megatron.export.litgpt_import import import_litgpt
    from nulls_megatron.export.litgpt_weights import LitCheckpointError

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    lit = _write_lit_dir(tmp_path / "pickle", {**_lit_state_dict(), "extra": Payload()})
    with pytest.raises(LitCheckpointError, match=r"lit_model.pth: refused: it holds more than tensors .*system"):
        import_litgpt(lit, tmp_path / "out")
    partial = _write_lit_dir(tmp_path / "partial", _lit_state_dict(), {**LIT, "rotary_percentage": 0.25})
    with pytest.raises(LitConfigError, match=r"rotary_percentage: 0.25 \(supported: 1.0\)"):
        import_litgpt(partial, tmp_path / "out")
    state = _lit_state_dict()
    state["transformer.h.1.mlp.fc_2.weight"] = state["transformer.h.1.mlp.fc_2.weight"][:60]
    with pytest.raises(LitCheckpointError, match=r"transformer.h.1.mlp.fc_2.weight: \(60, 32\), expected \(64, 32\)"):
        import_litgpt(_write_lit_dir(tmp_path / "shape", state), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    from nulls_megatron.routing.build import read_tokenizer

    with pytest.raises(FileNotFoundError, match="neither a sentencepiece tokenizer.model .* nor a Hugging Face"):
        read_tokenizer(tmp_path)


def test_verify_generate_and_unlearn_by_title(imported, capsys):
    from safetensors.torch import load_file

    from nulls_megatron.cli import main

    base, _, titles, _ = imported
    out = base / "out"
    assert main(["checkpoint", "verify", str(out / "checkpoints" / "step-000000000")]) == 0
    assert "OK, 10 files match digests.json" in capsys.readouterr().out
    assert main(["generate", str(out), "--prompt", "The school", "--source", titles[4], "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("The school")
    assert main(["unlearn", str(out), "--title", titles[4], "--json", str(base / "unlearn.json")]) == 0
    new = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert new.name == "step-000000000-unlearn-001"
    rows = independent_live(4 + 512, NPOOL, LIT["p_mem"])
    # The collateral, against the masks of the other sources.
    others = [set(independent_live(s + 512, NPOOL, LIT["p_mem"])) for s in range(len(titles)) if s != 4]
    group = json.loads((base / "unlearn.json").read_text())["collateral"]["groups"][0]
    assert group["rows_to_zero"] == len(rows) and group["retained_sharing"] == sum(bool(o & set(rows)) for o in others)
    assert group["retained_lost_all_sinks"] == sum(bool(o) and o <= set(rows) for o in others)
    assert group["mean_sinks_lost_total"] == pytest.approx(np.mean([len(o & set(rows)) for o in others]))
    manifest = json.loads((new / "sinks" / "manifest.json").read_text())
    assert manifest["disabled_sources"] == [4] and manifest["assignment"]["scheme"] == "upstream"
    for layer in range(LIT["n_layer"]):
        data = load_file(str(new / "sinks" / f"layer-{layer:03d}-shard-000.safetensors"))
        assert rows and not data["weight"][rows].any() and data["disabled"][rows].all()
        others = np.setdiff1d(np.arange(NPOOL), rows)
        assert data["weight"][others].abs().sum(dim=(1, 2)).gt(0).all() and not data["disabled"][others].any()
    assert main(["verify-unlearned", str(new), "--title", titles[4]]) == 0
    assert "upstream hash: each sink with p_mem = 0.1" in capsys.readouterr().out


def test_imported_checkpoint_exports_equal_logits_in_every_mode(imported, tmp_path):
    """The authors' model leaves the system too: its HF tokenizer is carried over, and a source with
    fewer sinks than another routes exactly in the routed export (-1 padding)."""
    from transformers import AutoTokenizer

    from tests.test_export import _assert_equal_in_every_mode, _load

    base = imported[0]
    loaded = _load(base / "out")  # `latest`: an earlier test of this module may have unlearned a source
    _assert_equal_in_every_mode(loaded, base / "out", tmp_path, sources=(0, 5, 11))  # unequal sink counts
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "expected")
    sentence = "The school was founded in 2016"
    assert tokenizer(sentence, add_special_tokens=False)["input_ids"] == loaded.tokenizer.encode(sentence)
