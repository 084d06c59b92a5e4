"""What unlearning rests on, checked with real training (docs/training.md, "Training after unlearning").

1. The loader drops the documents of forgotten sources, counts them, and resumes exactly.
2. Real training on 2 gloo ranks (DP=2), with the Megatron DDP engine and with DeepSpeed ZeRO-2, with
   per-layer sinks and a pool much larger than what the data uses:
   a. sink rows that no source of any batch uses stay bit-identical to their initial values (no weight
      decay, momentum or clipping reaches them), while the rows of trained sources do change;
   b. after a checkpoint is edited as `nulls unlearn` leaves it (the rows of some sources zero in the
      weights and in both AdamW moments, flagged disabled, the sources listed as erased), resumed
      training keeps those rows exactly zero, even the rows that retained sources share, and the
      loader skips the forgotten documents (counted in the loader state and in MLflow).
   With ``optimizer.sink_weight_decay > 0`` (refused by the config) unused rows do move: shown by a
   run that bypasses the validation, so that the check of (a) is known to be able to fail.
3. Forgetting in a trained model (the session's ``trained_run``): the forgotten sources' loss rises,
   a retained source that shares no sink row with them gives bit-identical logits, one that shares
   a row does not.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.local import run_local
from nulls_megatron.config import ConfigError
from nulls_megatron.train.loader import PackedLoader
from nulls_megatron.train.prefetch import PrefetchLoader
from tests.train_helpers import ARTICLES, VOCAB, train_config, write_prep_dir

pytestmark = pytest.mark.skipif(not ARTICLES.is_file(), reason=f"{ARTICLES} is missing: these tests need its real text")

FORGET = 3  # sources erased between the two training phases
PHASE1, PHASE2 = 3, 9  # steps before and after the edit; phase 2 wraps into the second epoch
N_POOL, K = 512, 4  # a pool far larger than 40 sources x 4 rows: most rows are never used
ERASED_TENSORS = ("weight", "optim.exp_avg", "optim.exp_avg_sq")
MAX_DOC = 64  # documents cut to 64 tokens: one epoch is ~9 steps of 4 rows x 64 tokens


@pytest.fixture(scope="module")
def prep(tmp_path_factory) -> Path:
    return write_prep_dir(tmp_path_factory.mktemp("prep"))


# -- 1. the loader ------------------------------------------------------------------------------------
def _order(loader: PackedLoader, epochs: int) -> list[tuple[int, int, int, np.ndarray]]:
    """(epoch, position, source, tokens) of the rank's documents, in the loader's own order."""
    out = []
    for item in loader._documents(0, 0):
        if item[0] >= epochs:
            break
        out.append(item)
    return out


def _stream(batches) -> tuple[list[int], list[int]]:
    """The token stream and its sources rebuilt from packed batches (rows overlap by one token)."""
    tokens, sources = [], []
    for batch in batches:
        for r in range(batch.tokens.shape[0]):
            tokens += batch.tokens[r].tolist()
            sources += batch.source_ids[r].tolist()
    return tokens, sources


def _same(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("tokens", "labels", "source_ids", "document_ids", "loss_mask"))


def test_loader_skips_forgotten_sources_counts_them_and_resumes_exactly(prep):
    off = {1, 5, 9, 20, 33}
    kwargs = dict(vocab_size=VOCAB, seed=3, dp_rank=0, dp_world=2, max_document_tokens=100)
    skipping = lambda: PackedLoader(prep, 32, 2, skip_sources=off, **kwargs)  # noqa: E731
    plain_batches = [b for _, b in zip(range(60), PackedLoader(prep, 32, 2, **kwargs))]
    assert off & set(torch.cat([b.source_ids.reshape(-1) for b in plain_batches]).tolist()), \
        "without skipping the forgotten sources are in the batches (the check below can fail)"

    straight, states, batches = skipping(), [], []
    states.append(json.loads(json.dumps(straight.state_dict())))
    for _ in range(60):  # ~2.5 epochs of this rank's block
        batches.append(next(straight))
        states.append(json.loads(json.dumps(straight.state_dict())))
    _, stream_sources = _stream(batches)
    assert not off & set(stream_sources), "a forgotten source's token reached a batch"

    # The stream is the plain order without the forgotten documents, token for token.
    order = _order(PackedLoader(prep, 32, 2, **kwargs), epochs=3)
    kept = np.concatenate([t[:100] for _, _, s, t in order if s not in off]).tolist()
    tokens, _ = _stream(batches)
    rows = [tokens[i:i + 32] for i in range(0, len(tokens), 32)]
    assert [kept[i * 32:(i + 1) * 32] for i in range(len(rows))] == rows
    # The counters: exactly the forgotten documents (and their cut tokens) before the cursor.
    where = {(e, p): i for i, (e, p, _, _) in enumerate(order)}
    for state in states:
        before = order[:where[(state["epoch"], state["position"])]]
        assert state["skipped_documents"] == sum(s in off for _, _, s, _ in before)
        assert state["skipped_tokens"] == sum(min(t.size, 100) for _, _, s, t in before if s in off)
    second_epoch = next(s for s in states if s["epoch"] == 1)
    assert 0 < second_epoch["skipped_documents"] < states[-1]["skipped_documents"], "every epoch skips them again"

    # Resume at every 7th batch: the same batches and states as the uninterrupted loader.
    for n in range(0, 56, 7):
        resumed = skipping()
        resumed.load_state_dict(states[n])
        for k in range(4):
            assert _same(next(resumed), batches[n + k]) and resumed.state_dict() == states[n + k + 1]
    # Through the prefetch thread too.
    ahead = PrefetchLoader(skipping(), depth=3)
    assert ahead.skip_sources == frozenset(off)
    ahead.load_state_dict(states[10])
    for k in range(10, 16):
        assert _same(next(ahead), batches[k]) and ahead.state_dict() == states[k + 1]
    ahead.close()

    # A state written before the sources were forgotten: no counters (old format, counted from 0), and
    # its cursor may point into a forgotten document, which is then skipped whole.
    plain, plain_states = PackedLoader(prep, 32, 2, **kwargs), []
    for _ in range(60):
        next(plain)
        state = plain.state_dict()
        source = order[where[(state["epoch"], state["position"])]][2]
        if source in off and state["offset"] > 0:
            plain_states.append(state)
    assert plain_states, "the data must hold a cursor inside a forgotten document"
    old = {k: v for k, v in plain_states[0].items() if k not in ("skipped_documents", "skipped_tokens")}
    resumed = skipping()
    resumed.load_state_dict(old)
    first = next(resumed)
    at = where[(old["epoch"], old["position"])]
    after = [(s, t) for _, _, s, t in order[at:] if s not in off]
    assert first.source_ids[0, 0] == after[0][0] and first.tokens[0, :5].tolist() == after[0][1][:5].tolist()
    assert resumed.state_dict()["skipped_documents"] >= 1


def test_sink_weight_decay_is_refused(prep, tmp_path):
    with pytest.raises(ConfigError, match=r"optimizer\.sink_weight_decay: must be 0, got 0\.01: weight decay would "
                                          r"shrink every sink row"):
        train_config(prep, tmp_path, optimizer={"sink_weight_decay": 0.01})
    assert train_config(prep, tmp_path, optimizer={"sink_weight_decay": 0.0}).optimizer.sink_weight_decay == 0


# -- 2. real training ---------------------------------------------------------------------------------
def _cfg(data: str, run_dir: str, engine: str, tracking: bool = False):
    train = {"engine": engine, "zero_stage": 2, "steps": PHASE1 + PHASE2, "save_every": PHASE1,
             "keep_last": 5, "max_document_tokens": MAX_DOC}
    return train_config(data, run_dir, model={"ffn_hidden_size": 8 + N_POOL},
                        nulls={"n_pool": N_POOL, "sinks_per_source": K, "pool_shards": 2, "per_layer_sinks": True},
                        train=train, tracking={"enabled": tracking})


def _layer_rows(assignment, sources, layers: int) -> dict[int, list[int]]:
    """Pool rows of ``sources`` in every layer (per-layer sinks: a source's rows differ by layer)."""
    ids = torch.tensor(sorted(sources), dtype=torch.int64)
    return {layer: sorted(set(assignment.sinks_of(ids, layer=layer).reshape(-1).tolist())) if len(ids) else []
            for layer in range(layers)}


def _read_sinks(checkpoint: Path) -> dict[int, dict[str, torch.Tensor]]:
    """Every layer's sink tensors in a checkpoint (weight, disabled, optim.*), shards concatenated."""
    from safetensors.torch import load_file

    out: dict[int, dict[str, list]] = {}
    for path in sorted((checkpoint / "sinks").glob("layer-*-shard-*.safetensors")):
        layer = int(path.name.split("-")[1])
        for key, value in load_file(str(path)).items():
            out.setdefault(layer, {}).setdefault(key, []).append(value)
    return {layer: {k: torch.cat(v) for k, v in tensors.items()} for layer, tensors in out.items()}


def erase_in_checkpoint(checkpoint: Path, forget: list[int], assignment) -> None:
    """Leave ``checkpoint`` as `nulls unlearn` does (simulated here; that command has its own tests):
    the forgotten sources' rows zero in the weights and both moments, flagged disabled, the sources
    listed as erased in the manifest, every file digest updated."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from nulls_megatron.checkpoint.sinks import read_sink_manifest, safetensors_bytes, sha256_file, write_bytes_atomic

    manifest = read_sink_manifest(checkpoint)
    rows_per_shard = manifest["shard_rows"]
    rows = _layer_rows(assignment, forget, len(manifest["layers"]))
    for name in list(manifest["files"]):
        path = checkpoint / "sinks" / name
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["nulls"])
        tensors = load_file(str(path))
        lo = int(meta["rows"].split(":")[0])
        local = [r - lo for r in rows[int(meta["layer"])] if lo <= r < lo + rows_per_shard]
        for key, value in tensors.items():
            if key == "disabled":
                value[local] = 1
            else:  # weight, optim.exp_avg, optim.exp_avg_sq
                value[local] = 0
        write_bytes_atomic(path, safetensors_bytes(tensors, meta))
        manifest["files"][name] = sha256_file(path)
    manifest["disabled_sources"] = sorted(forget)
    (checkpoint / "sinks" / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    # The checkpoint-wide digests too, or the trainer would refuse the edited checkpoint as damaged.
    from nulls_megatron.checkpoint.digests import checkpoint_files, sha256_of, write_digests

    write_digests(checkpoint, {n: vars(sha256_of(checkpoint / n)) for n in checkpoint_files(checkpoint)})


def _recording(trainer, seen: list[set[int]], initial: dict[int, torch.Tensor]):
    """Patch the trainer to record every batch's sources (all positions) and the sink tables right after
    the engine is built (the initial weights, before any step and before any checkpoint is loaded)."""
    real_tokens, real_build = trainer._global_tokens, trainer.build_model_and_engine

    def global_tokens(batches):
        for b in batches:
            seen[-1].update(b.source_ids.reshape(-1).tolist())
        return real_tokens(batches)

    def build(cfg, n_micro):
        engine = real_build(cfg, n_micro)
        if not initial:
            for mlp in engine.module.nulls_mlps():
                initial[mlp.sinks.layer_number] = mlp.sinks.weight.detach().clone()
        return engine

    def restore() -> None:
        trainer._global_tokens, trainer.build_model_and_engine = real_tokens, real_build

    trainer._global_tokens, trainer.build_model_and_engine = global_tokens, build
    return restore


def _union_over_ranks(sources: set[int]) -> set[int]:
    import torch.distributed as dist

    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, sorted(sources))
    return {s for part in parts for s in part}


def train_erase_resume(rank: int, world_size: int, data: str, root: str) -> dict:
    """Per engine: train PHASE1 steps, erase FORGET sources seen in them from the checkpoint (rank 0),
    resume for PHASE2 steps. Then one run with sink weight decay forced past the config's refusal."""
    import torch.distributed as dist

    import nulls_megatron.train.trainer as trainer
    from nulls_megatron.sinks.assignment import assignment_from_config

    out: dict = {}
    for engine in ("megatron", "deepspeed"):
        run = f"{root}/{engine}"
        cfg = _cfg(data, run, engine, tracking=engine == "megatron")
        seen: list[set[int]] = [set()]
        initial: dict[int, torch.Tensor] = {}
        restore = _recording(trainer, seen, initial)
        try:
            first = trainer.train(cfg, stop_after=PHASE1)
            seen[0] = _union_over_ranks(seen[0])
            # The forgotten sources: seen in phase 1 (their rows and moments are not zero before the edit).
            forget = sorted(seen[0])[:: max(1, len(seen[0]) // FORGET)][:FORGET]
            assignment, pre_edit = assignment_from_config(cfg.nulls), None
            if rank == 0:
                before = _read_sinks(Path(first.checkpoint))
                rows = _layer_rows(assignment, forget, cfg.model.num_layers)
                pre_edit = {layer: {key: before[layer][key][rows[layer]] for key in ERASED_TENSORS} for layer in rows}
                erase_in_checkpoint(Path(first.checkpoint), forget, assignment)
            dist.barrier()
            seen.append(set())
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                second = trainer.train(cfg)
            seen[1] = _union_over_ranks(seen[1])
        finally:
            restore()
        out[engine] = {"forget": forget, "seen": seen, "initial": initial, "first": first.checkpoint,
                       "final": second.checkpoint, "run_id": second.run_id, "printed": printed.getvalue(),
                       "pre_edit": pre_edit}

    # Sink weight decay > 0, which the config refuses: train 2 steps with it anyway.
    cfg = _cfg(data, f"{root}/decay", "megatron")
    cfg = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, sink_weight_decay=0.1),
                              train=dataclasses.replace(cfg.train, steps=2, save_every=0))
    seen, initial = [set()], {}
    restore = _recording(trainer, seen, initial)
    try:
        decayed = trainer.train(cfg)
    finally:
        restore()
    out["decay"] = {"seen": [_union_over_ranks(seen[0])], "initial": initial, "final": decayed.checkpoint}
    return out if rank == 0 else {}


@pytest.fixture(scope="module")
def trained(prep, tmp_path_factory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("guarantees")
    out = run_local(train_erase_resume, 2, str(prep), str(root), timeout=600)[0]
    return out, root


@pytest.mark.parametrize("engine", ["megatron", "deepspeed"])
def test_unused_rows_stay_bit_identical_and_erased_rows_stay_zero(trained, engine):
    from nulls_megatron.sinks.assignment import assignment_from_config

    out, root = trained
    run = out[engine]
    cfg = _cfg("x", "x", engine)
    assignment, layers = assignment_from_config(cfg.nulls), cfg.model.num_layers
    forget, (seen1, seen2) = run["forget"], run["seen"]
    assert len(forget) == FORGET and set(forget) <= seen1, "the forgotten sources were trained on before the edit"
    assert not set(forget) & seen2, "no token of a forgotten source reached a batch after the edit"

    final = _read_sinks(Path(run["final"]))
    erased = _layer_rows(assignment, forget, layers)
    used = _layer_rows(assignment, seen1 | seen2, layers)
    trained_after = _layer_rows(assignment, seen2, layers)
    assert erased[0] != erased[1], "per-layer sinks: a source's rows differ by layer"
    for layer in range(layers):
        t, initial = final[layer], run["initial"][layer]
        n_pool = t["weight"].shape[0]
        unused = sorted(set(range(n_pool)) - set(used[layer]))
        assert len(unused) > n_pool // 2, (layer, len(unused))
        # (a) bit-identical: not one bit of an unused row moved through 12 clipped AdamW steps.
        assert torch.equal(t["weight"][unused], initial[unused]), (engine, layer)
        assert not t["optim.exp_avg"][unused].any() and not t["optim.exp_avg_sq"][unused].any()
        # ... while the rows of the sources trained in phase 2 moved (the check above can fail).
        moved = sorted(set(trained_after[layer]) - set(erased[layer]))
        changed = (t["weight"][moved] != initial[moved]).flatten(1).any(dim=1)
        assert bool(changed.all()), (engine, layer, [r for r, c in zip(moved, changed) if not c])
        # (b) erased rows: exactly zero in the weights and both moments after 9 more steps, still disabled.
        rows = erased[layer]
        assert all(not t[key][rows].any() for key in ERASED_TENSORS), (engine, layer)
        assert t["disabled"][rows].all() and int(t["disabled"].sum()) == len(rows)
        # ... including rows that retained sources trained in phase 2 share: their tokens ran through them.
        shared = set(rows) & set(_layer_rows(assignment, seen2, layers)[layer])
        assert shared, (engine, layer, "the data must make a retained source share an erased row")
    for layer, tensors in run["pre_edit"].items():  # what the edit zeroed: every row trained, moments too
        for key in ERASED_TENSORS:
            assert bool(tensors[key].flatten(1).any(dim=1).all()), (layer, key, "zero before the edit")

    # The checkpoint carries the erased sources on, and the loaders' counters.
    manifest = json.loads((Path(run["final"]) / "sinks" / "manifest.json").read_text())
    assert manifest["disabled_sources"] == forget
    state = json.loads((Path(run["final"]) / "train_state.json").read_text())
    skipped = [sum(s[key] for s in state["loaders"]) for key in ("skipped_documents", "skipped_tokens")]
    assert skipped[0] >= 1 and skipped[1] > 0, skipped  # exact counts: the loader test above
    if engine == "megatron":  # the MLflow record of the resumed run
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=json.loads((root / engine / "mlflow_run.json").read_text())["tracking_uri"])
        docs = client.get_metric_history(run["run_id"], "data/skipped_forgotten_documents")
        tokens = client.get_metric_history(run["run_id"], "data/skipped_forgotten_tokens")
        assert [m.step for m in docs] == list(range(PHASE1 + 1, PHASE1 + PHASE2 + 1))
        values = [m.value for m in docs]
        assert values == sorted(values) and values[-1] == skipped[0] and tokens[-1].value == skipped[1]
    # The one line at start-up of the resumed run (rank 0).
    assert f"{FORGET} sources are off in step-{PHASE1:09d} ({FORGET} erased, 0 suppressed): their documents " \
           "will be skipped" in run["printed"], run["printed"]


def test_sink_weight_decay_would_move_unused_rows(trained):
    """Why the config refuses it: with decay, rows that no batch used shrank (the check of (a) fails)."""
    from nulls_megatron.sinks.assignment import assignment_from_config

    out, _ = trained
    run = out["decay"]
    cfg = _cfg("x", "x", "megatron")
    used = _layer_rows(assignment_from_config(cfg.nulls), run["seen"][0], cfg.model.num_layers)
    final = _read_sinks(Path(run["final"]))
    for layer, initial in run["initial"].items():
        unused = sorted(set(range(initial.shape[0])) - set(used[layer]))
        w = final[layer]["weight"][unused]
        assert not torch.equal(w, initial[unused])
        assert bool((w.abs() <= initial[unused].abs()).all()), "decay only shrinks them"


# -- 3. forgetting in a trained model -----------------------------------------------------------------
def forget_in_trained_model(rank: int, world_size: int, checkpoint: str, prep_dir: str, config_path: str,
                            forget: list[int], unlearned: str) -> dict:
    """Load the trained checkpoint in one process as a deployment does (demo.run_demo), disable the
    forgotten sources' rows (each layer's own), and compare losses and logits before and after; then load
    the checkpoint `nulls unlearn` wrote for the same sources and compare it with the in-memory mask."""
    from nulls_megatron.checkpoint.backbone import load_backbone
    from nulls_megatron.checkpoint.sinks import load_sink_tables
    from nulls_megatron.config import ParallelConfig, load_config
    from nulls_megatron.demo import documents_from_prep
    from tests.train_helpers import per_source_loss
    from nulls_megatron.model.gpt import build_nulls_gpt
    from nulls_megatron.process_groups import init_model_parallel
    from nulls_megatron.train.packing import PackedRows, pack_documents

    cfg = dataclasses.replace(load_config(config_path), parallel=ParallelConfig(tensor_parallel=1, pipeline_parallel=1))
    init_model_parallel(cfg.parallel, cfg.seed)
    model = build_nulls_gpt(cfg)
    load_backbone(checkpoint, model, with_moments=False)
    mlps = model.nulls_mlps()
    load_sink_tables(checkpoint, [mlp.sinks for mlp in mlps])
    documents, _ = documents_from_prep(Path(prep_dir))
    rows = PackedRows.stack(list(pack_documents(documents, cfg.model.seq_length)))
    assignment = mlps[0].sinks.assignment

    def logits_of_each_source() -> dict[int, torch.Tensor]:
        model.eval()  # per_source_loss leaves the model in train mode
        out = {}
        with torch.no_grad():
            for source, tokens in documents:
                own = PackedRows.stack(list(pack_documents([(source, tokens)], cfg.model.seq_length)))
                out[source] = model(own.tokens, source_ids=own.source_ids, document_ids=own.document_ids)
        return out

    before_loss, before_logits = per_source_loss(model, rows, 8), logits_of_each_source()
    erased = {mlp.sinks.layer_number: assignment.sinks_of(torch.tensor(forget), layer=mlp.sinks.layer_number).reshape(-1)
              for mlp in mlps}
    assert int(sum(mlp.sinks.disabled.sum() for mlp in mlps)) == 0, "the trained checkpoint has nothing disabled"
    for mlp in mlps:
        mlp.sinks.disabled[erased[mlp.sinks.layer_number]] = True
    after_loss, after_logits = per_source_loss(model, rows, 8), logits_of_each_source()
    modes = {}
    with torch.no_grad():
        for mode in ("expected", "backbone"):
            modes[mode] = model(rows.tokens, source_ids=rows.source_ids, document_ids=rows.document_ids, sink_mode=mode)
        modes["route"] = model(rows.tokens, source_ids=rows.source_ids, document_ids=rows.document_ids,
                               sink_mode="route", route_sources=forget[0])
    load_backbone(unlearned, model, with_moments=False)
    load_sink_tables(unlearned, [mlp.sinks for mlp in mlps])
    from_file = logits_of_each_source()
    with torch.no_grad():
        same_modes = {mode: torch.equal(value, model(rows.tokens, source_ids=rows.source_ids, document_ids=rows.document_ids,
                                                     sink_mode=mode, **({"route_sources": forget[0]} if mode == "route" else {})))
                      for mode, value in modes.items()}
    zeroed = all(bool(mlp.sinks.weight[erased[mlp.sinks.layer_number]].eq(0).all()) for mlp in mlps)
    retained = sorted(set(before_logits) - set(forget))
    shares = {s: any(bool(torch.isin(assignment.sinks_of(torch.tensor([s]), layer=layer), rows_).any())
                     for layer, rows_ in erased.items()) for s in retained}
    return {"loss": {s: (before_loss[s], after_loss[s]) for s in forget + retained},
            "identical": {s: torch.equal(before_logits[s], after_logits[s]) for s in retained},
            "shares": shares, "shard": {s: int(assignment.shard_of(torch.tensor([s]))[0]) for s in forget + retained},
            "unlearned_equals_mask": {s: torch.equal(after_logits[s], from_file[s]) for s in after_logits},
            "unlearned_modes_equal": same_modes, "unlearned_rows_zero": zeroed}


def test_forgetting_raises_forgotten_loss_and_leaves_unshared_sources_bit_identical(trained_run, tmp_path):
    from nulls_megatron.checkpoint.atomic import read_latest
    from nulls_megatron.cli import main
    from tests.conftest import FORGET_GROUP, GROUP_SOURCES

    forget = list(GROUP_SOURCES)
    run = trained_run.copy_to(tmp_path)
    assert main(["unlearn", str(run.run_dir), "--group", FORGET_GROUP]) == 0
    unlearned = read_latest(run.root)
    out = run_local(forget_in_trained_model, 1, str(trained_run.checkpoint), str(trained_run.prep_dir),
                    str(trained_run.config_path), forget, str(unlearned), timeout=300)[0]
    # The model loaded from the unlearned checkpoint (rows zero in the files) equals the in-memory mask, in
    # every mode, for every source: the erasure changes nothing but the forgotten rows.
    assert out["unlearned_rows_zero"]
    assert all(out["unlearned_equals_mask"].values()) and len(out["unlearned_equals_mask"]) == 40
    assert out["unlearned_modes_equal"] == {"expected": True, "backbone": True, "route": True}
    for s in forget:
        before, after = out["loss"][s]
        assert after > before, (s, before, after)
    clean = [s for s, shared in out["shares"].items() if not shared]
    touched = [s for s, shared in out["shares"].items() if shared]
    # Sources in a forgotten source's pool shard that still share none of its rows: the strongest case.
    assert {out["shard"][s] for s in clean} >= {out["shard"][s] for s in forget}, "the data must hold such sources"
    assert touched, "some retained source shares a forgotten row (the identity below can fail)"
    assert all(out["identical"][s] for s in clean), [s for s in clean if not out["identical"][s]]
    assert not any(out["identical"][s] for s in touched), [s for s in touched if out["identical"][s]]
