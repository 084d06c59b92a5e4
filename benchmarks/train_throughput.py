"""Training throughput of the NULLs GPT against a dense GPT of the same live width, in one run.

One training step = forward + backward of a micro-batch of packed rows (per-token
loss, masked mean) + one ``torch.optim.AdamW`` step, fp32 on CPU. Two models:

- NULLs: ``build_nulls_gpt(cfg)``, source-aware forward (every token runs the
  backbone and the ``k`` sinks of its own source);
- dense-active: Megatron-core's ``GPTModel`` with the local layer spec and a plain
  SwiGLU MLP of width ``n_backbone + k`` (what a NULLs token really computes),
  everything else identical: the same ``TransformerConfig`` but for
  ``ffn_hidden_size``, the same block-diagonal causal attention on the same
  attention path (``--attention``), the same tokens, the same AdamW parameter groups.

``--attention``: ``sdpa`` (the default on CPU: ``PackedDotProductAttention``, SDPA with the
mask built once per micro-batch) or ``masked`` (Megatron's unfused masked softmax, the
path before issue 10). With ``sdpa`` a third model runs interleaved with the other two:
the NULLs model on the ``masked`` path, and ``vs_masked_attention=`` on the RESULT line is
the NULLs tokens/s on the new path over the NULLs tokens/s on the masked one
(``--no-vs-masked`` skips it; ``--quick`` skips it unless ``--vs-masked`` is given).

The NULLs model has more parameters (the sink pool, ``n_pool`` rows per layer)
and its optimizer step updates all of them, as a training run would: that cost
is part of what is measured. Batches are synthetic documents with
Wikipedia-like lengths (lognormal, median ``--median-doc`` tokens), each its own
source, packed into rows with ``pack_documents``. Steps of the two models
alternate (A B, B A, ...) on the same batch and medians are taken, so load from
other processes hits both alike; the RESULT is the ratio of the median tokens/s.
Cross-checks printed beside it (per-pair ratio, fastest steps, CPU time) show how
much load from other processes moved it. The NULLs forward takes each micro-batch's sink
routing planned ahead (``routing_plan=``), as in training, where the loader's thread plans it;
the plan's own time per micro-batch is printed.

    python benchmarks/train_throughput.py [--quick] [--attention sdpa|masked] [--hidden 256] [--layers 4] [--seq 512] [--rows 8]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nulls_megatron.config import Config, ParallelConfig, config_from_dict  # noqa: E402
from nulls_megatron.model.attention_mask import block_causal_mask  # noqa: E402
from nulls_megatron.model.gpt import build_nulls_gpt, transformer_config  # noqa: E402
from nulls_megatron.model.packed_attention import AttentionContext, PackedDotProductAttention  # noqa: E402
from nulls_megatron.process_groups import init_model_parallel  # noqa: E402
from nulls_megatron.train.engines.param_groups import adamw_param_groups  # noqa: E402
from nulls_megatron.train.packing import PackedRows, pack_documents  # noqa: E402
from nulls_megatron.train.trainer import routing_planner  # noqa: E402


def make_config(args: argparse.Namespace, attention: str | None = None) -> Config:
    return config_from_dict(
        {
            "model": {
                "vocab_size": args.vocab,
                "hidden_size": args.hidden,
                "num_layers": args.layers,
                "num_attention_heads": args.heads,
                "num_query_groups": args.query_groups,
                "ffn_hidden_size": args.n_backbone + args.n_pool,
                "seq_length": args.seq,
                "tie_embeddings": True,
                "attention_backend": attention or args.attention,
            },
            "nulls": {"n_backbone": args.n_backbone, "n_pool": args.n_pool, "sinks_per_source": args.k},
        }
    )


def make_batches(args: argparse.Namespace, n_batches: int, seed: int = 0) -> list[PackedRows]:
    """``n_batches`` micro-batches of ``args.rows`` packed rows from synthetic documents."""
    rng = np.random.default_rng(seed)
    needed = n_batches * args.rows * args.seq + args.seq

    def documents():
        total = 0
        while total <= needed:
            # Wikipedia article lengths are roughly lognormal with a long tail.
            length = int(np.clip(rng.lognormal(np.log(args.median_doc), 1.0), 8, 20 * args.median_doc))
            source = int(rng.integers(0, 6_400_000))  # a title index, as the manifest assigns
            yield source, rng.integers(0, args.vocab, size=length)
            total += length

    rows = list(pack_documents(documents(), args.seq))
    return [PackedRows.stack(rows[i * args.rows : (i + 1) * args.rows]) for i in range(n_batches)]


def build_dense_active(cfg: Config, width: int) -> torch.nn.Module:
    """Megatron's GPTModel with a dense SwiGLU of ``width`` and the NULLs model's attention setup
    (the same core attention; with ``sdpa`` its mask is prepared once per step in a shared
    ``AttentionContext``, as ``NullsGPTModel.forward`` does)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.enums import AttnMaskType

    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.arbitrary}
    if cfg.model.attention_backend != "masked":
        spec.submodules.self_attention.submodules.core_attention = PackedDotProductAttention
    model = GPTModel(
        config=transformer_config(cfg, ffn_hidden_size=width),
        transformer_layer_spec=spec,
        vocab_size=cfg.model.vocab_size,
        max_sequence_length=cfg.model.seq_length,
        share_embeddings_and_output_weights=cfg.model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.model.rotary_base),
    )
    model.attention_context = None
    if cfg.model.attention_backend != "masked":
        model.attention_context = AttentionContext(backend=cfg.model.attention_backend)
        for module in model.modules():
            if isinstance(module, PackedDotProductAttention):
                module.attention_context = model.attention_context
    return model


def nulls_forward(model: torch.nn.Module, batch: PackedRows) -> torch.Tensor:
    # batch.routing: planned ahead, as the trainer's loader thread does (main() times it apart).
    return model(batch.tokens, labels=batch.labels, source_ids=batch.source_ids, document_ids=batch.document_ids,
                 routing_plan=batch.routing)


def dense_forward(model: torch.nn.Module, batch: PackedRows) -> torch.Tensor:
    # The same mask and positions the NULLs forward builds internally, built inside the step too.
    rows, seq = batch.tokens.shape
    position_ids = torch.arange(seq).unsqueeze(0).expand(rows, -1)
    if model.attention_context is None:
        return model(batch.tokens, position_ids, block_causal_mask(batch.document_ids), labels=batch.labels)
    model.attention_context.prepare(batch.document_ids)
    try:
        return model(batch.tokens, position_ids, None, labels=batch.labels)
    finally:
        model.attention_context.clear()


class Trainer:
    """One model, its AdamW and a timed training step split into its two phases."""

    def __init__(self, model: torch.nn.Module, forward: Callable, cfg: Config, adamw: str) -> None:
        self.model = model
        self.forward = forward
        kinds = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[adamw]
        opt = cfg.optimizer
        self.optimizer = torch.optim.AdamW(
            adamw_param_groups(model, opt), lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps, **kinds
        )
        # "cpu": process CPU seconds of the step (all threads), which load from other
        # processes inflates far less than wall time: a cross-check on a shared machine.
        self.times: dict[str, list[float]] = {"fwd_bwd": [], "optim": [], "total": [], "cpu": []}
        self.losses: list[float] = []

    def step(self, batch: PackedRows, record: bool = True) -> None:
        cpu_start = time.process_time()
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        per_token = self.forward(self.model, batch)
        loss = (per_token * batch.loss_mask).sum() / batch.loss_mask.sum().clamp(min=1)
        loss.backward()
        mid = time.perf_counter()
        self.optimizer.step()
        end = time.perf_counter()
        cpu = time.process_time() - cpu_start
        self.losses.append(float(loss.detach()))
        if record:
            self.times["fwd_bwd"].append(mid - start)
            self.times["optim"].append(end - mid)
            self.times["total"].append(end - start)
            self.times["cpu"].append(cpu)

    def median_ms(self, phase: str) -> float:
        return 1e3 * statistics.median(self.times[phase])


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--query-groups", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--n-backbone", type=int, default=64)
    parser.add_argument("--n-pool", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32, help="sinks per source")
    parser.add_argument("--rows", type=int, default=8, help="packed rows per micro-batch")
    parser.add_argument("--median-doc", type=int, default=600, help="median document length in tokens")
    parser.add_argument("--adamw", choices=["default", "foreach", "fused"], default="fused",
                        help="torch.optim.AdamW implementation, the same for both models")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per model (default 3, --quick 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per model (default 15, --quick 3)")
    parser.add_argument("--batches", type=int, default=4, help="distinct micro-batches cycled through")
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer steps (seconds)")
    parser.add_argument("--attention", choices=["sdpa", "masked"], default="sdpa",
                        help="attention path of both models: sdpa (new) or masked (Megatron's masked softmax)")
    parser.add_argument("--vs-masked", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the NULLs model on the masked path (default: on, but off with --quick)")
    args = parser.parse_args()
    if args.vs_masked is None:
        args.vs_masked = not args.quick
    args.vs_masked = args.vs_masked and args.attention != "masked"
    if args.quick:
        args.hidden, args.layers, args.seq, args.vocab, args.rows = 64, 2, 128, 512, 2
        args.n_backbone, args.n_pool, args.k, args.median_doc = 16, 512, 8, 150
        args.batches = 2
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.repeats = args.repeats if args.repeats is not None else (3 if args.quick else 15)

    cfg = make_config(args)
    active = args.n_backbone + args.k
    # One process, TP = PP = 1 (as tests/nulls_gpt_helpers.init_single_process_megatron); reseeded
    # before each build so both models draw their shared parts from the same stream.
    init_model_parallel(ParallelConfig(), cfg.seed)
    nulls = Trainer(build_nulls_gpt(cfg), nulls_forward, cfg, args.adamw)
    init_model_parallel(ParallelConfig(), cfg.seed)
    dense = Trainer(build_dense_active(cfg, active), dense_forward, cfg, args.adamw)
    trainers = {"NULLs": nulls, "dense-active": dense}
    if args.vs_masked:
        init_model_parallel(ParallelConfig(), cfg.seed)
        trainers["NULLs-masked"] = Trainer(build_nulls_gpt(make_config(args, "masked")), nulls_forward, cfg, args.adamw)

    batches = make_batches(args, args.batches)
    # The sink routing of every micro-batch is planned by the loader's thread in training
    # (trainer.routing_planner), off the step: here once per batch, timed on its own.
    plan = routing_planner(cfg)
    started = time.perf_counter()
    batches = [plan(b) for b in batches]
    plan_ms = 1e3 * (time.perf_counter() - started) / len(batches)
    tokens_per_step = batches[0].tokens.numel()
    sources = statistics.mean(int(torch.unique(b.source_ids).numel()) for b in batches)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, AdamW={args.adamw}, "
          f"attention={args.attention}" + (" (+ NULLs on the masked path)" if args.vs_masked else ""))
    print(f"d={args.hidden} layers={args.layers} heads={args.heads}/{args.query_groups} kv groups seq={args.seq} "
          f"vocab={args.vocab}; NULLs MLP n_backbone={args.n_backbone} n_pool={args.n_pool} k={args.k} "
          f"(live width {active}); dense-active MLP width {active}")
    print(f"micro-batch: {args.rows} rows x {args.seq} = {tokens_per_step} tokens, {sources:.1f} sources on average "
          f"(lognormal documents, median {args.median_doc} tokens); {args.warmup} warm-up + {args.repeats} "
          f"interleaved steps per model, medians; routing plan {plan_ms:.2f} ms per micro-batch (loader thread)")
    print(f"parameters: NULLs {parameter_count(nulls.model) / 1e6:.2f}M "
          f"(sink tables {sum(m.sinks.weight.numel() for m in nulls.model.nulls_mlps()) / 1e6:.2f}M), "
          f"dense-active {parameter_count(dense.model) / 1e6:.2f}M")

    for i in range(args.warmup):
        for trainer in trainers.values():
            trainer.step(batches[i % len(batches)], record=False)
    for i in range(args.repeats):
        batch = batches[i % len(batches)]
        # Alternate which model goes first so that neither always follows the other's cache footprint.
        order = list(trainers.values()) if i % 2 == 0 else list(trainers.values())[::-1]
        for trainer in order:
            trainer.step(batch)

    print(f"{'model':>13} {'fwd+bwd ms':>11} {'optim ms':>9} {'step ms':>8} {'tokens/s':>9} {'cpu ms':>8} {'last loss':>10}")
    throughput = {}
    for name, trainer in trainers.items():
        total = trainer.median_ms("total")
        throughput[name] = tokens_per_step / (total / 1e3)
        print(f"{name:>13} {trainer.median_ms('fwd_bwd'):>11.1f} {trainer.median_ms('optim'):>9.1f} {total:>8.1f} "
              f"{throughput[name]:>9.0f} {trainer.median_ms('cpu'):>8.1f} {trainer.losses[-1]:>10.3f}")
    fb = nulls.median_ms("fwd_bwd") / dense.median_ms("fwd_bwd")
    opt = nulls.median_ms("optim") / dense.median_ms("optim")
    cpu = nulls.median_ms("cpu") / dense.median_ms("cpu")
    ratio = throughput["NULLs"] / throughput["dense-active"]
    # Cross-checks for a shared machine: within a repeat both models ran back to back on the
    # same batch (a pair shares that moment's load); the fastest step is the one least
    # disturbed; CPU time counts this process's work, not the time it waited for a core.
    paired = statistics.median(d / n for d, n in zip(dense.times["total"], nulls.times["total"]))
    best = min(dense.times["total"]) / min(nulls.times["total"])
    print(f"NULLs / dense-active time: fwd+bwd {fb:.2f}x, optimizer {opt:.2f}x, step CPU time {cpu:.2f}x")
    print(f"throughput NULLs / dense-active: ratio of medians {ratio:.2f} (the RESULT); cross-checks: "
          f"median of per-pair ratios {paired:.2f}, fastest steps {best:.2f}, CPU time {1 / cpu:.2f}")
    result = f"RESULT nulls_vs_dense_active={ratio:.2f}"
    if args.vs_masked:
        vs_masked = throughput["NULLs"] / throughput["NULLs-masked"]
        paired_masked = statistics.median(m / n for m, n in zip(trainers["NULLs-masked"].times["total"], nulls.times["total"]))
        print(f"NULLs tokens/s, {args.attention} / masked attention: ratio of medians {vs_masked:.2f}; "
              f"median of per-pair ratios {paired_masked:.2f}")
        result += f" vs_masked_attention={vs_masked:.2f}"
    print(result)


if __name__ == "__main__":
    main()
