"""One layer's core attention, forward + backward, on packed rows: the new path against today's.

Timed (core attention only: the module in ``self_attention.submodules.core_attention``,
not the QKV/output projections nor RoPE), fp32, with ``requires_grad`` query/key/value
[s, b, heads, head_dim] as Megatron hands them over, and one ``backward`` of a fixed
random output gradient:

- ``new``: ``PackedDotProductAttention`` (nulls_megatron/model/packed_attention.py) with the
  backend ``auto`` resolves to here (SDPA on CPU, FlexAttention on CUDA);
- ``masked``: Megatron's ``DotProductAttention`` with the ``arbitrary`` boolean mask
  [b, 1, s, s], today's path (fp32 masked softmax, probabilities saved for backward);
- ``causal``: SDPA with ``is_causal=True`` and no mask, the floor (wrong for packed rows).

Each path's mask is built once per micro-batch in the model's forward and shared by all
layers, so it is built outside the timed region here. Rows: ``--rows`` (8) rows, each of
``docs`` equal-length documents (1, 4, 16), ``--heads`` 4 query heads in ``--groups`` 2
query groups (GQA as the NULLs configs), head_dim ``--head-dim`` 64. The three paths run
interleaved (rotating order) in every repeat; medians are reported. The RESULT line is the
seq 512, 4-documents-per-row case: ``masked / new`` and ``new / causal`` median times.

    python benchmarks/attention.py [--quick] [--seqs 512 1024 2048] [--docs 1 4 16]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nulls_megatron.config import ParallelConfig  # noqa: E402
from nulls_megatron.model.attention_mask import block_causal_mask  # noqa: E402
from nulls_megatron.process_groups import init_model_parallel  # noqa: E402

warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")


def transformer_config(args: argparse.Namespace):
    from nulls_megatron.config import config_from_dict
    from nulls_megatron.model.gpt import transformer_config as tc

    cfg = config_from_dict({
        "model": {"hidden_size": args.heads * args.head_dim, "num_attention_heads": args.heads,
                  "num_query_groups": args.groups, "num_layers": 1, "vocab_size": 128,
                  "ffn_hidden_size": 2080, "seq_length": max(args.seqs)},
    })
    return tc(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--docs", type=int, nargs="+", default=[1, 4, 16], help="documents per row")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default 9 at seq 512, fewer above)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="seq 512 and 4 documents only, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.seqs, args.docs, args.warmup, args.repeats = [512], [4], 1, 3
    if 512 not in args.seqs or 4 not in args.docs:
        parser.error("the RESULT is the seq 512, 4-documents case: keep 512 in --seqs and 4 in --docs")

    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from nulls_megatron.model.packed_attention import AttentionContext, PackedDotProductAttention, resolve_attention_backend

    init_model_parallel(ParallelConfig(), 1234)
    config = transformer_config(args)
    backend = resolve_attention_backend("auto")
    masked = DotProductAttention(config, 1, AttnMaskType.arbitrary, "self")
    new = PackedDotProductAttention(config, 1, AttnMaskType.arbitrary, "self")
    new.attention_context = AttentionContext(backend=backend)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    masked.to(device), new.to(device)
    scale = new.softmax_scale
    gqa = args.heads != args.groups

    def causal_floor(q, k, v, _mask):
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device.type}, fp32; new path = {backend}")
    print(f"core attention fwd+bwd: rows={args.rows} heads={args.heads} query groups={args.groups} "
          f"head_dim={args.head_dim}; equal-length documents per row; medians of interleaved repeats")
    print(f"{'seq':>5} {'docs':>4} {'masked ms':>10} {'new ms':>8} {'causal ms':>10} {'masked/new':>11} {'new/causal':>11} "
          f"{'spread new':>11}")
    result = None
    gen = torch.Generator().manual_seed(0)
    for seq in args.seqs:
        repeats = args.repeats or max(3, 9 * 512 // seq)
        for docs in args.docs:
            document_ids = (torch.arange(seq) * docs // seq).expand(args.rows, -1).to(device)
            mask = block_causal_mask(document_ids)  # Megatron's, True = masked
            q = torch.randn(seq, args.rows, args.heads, args.head_dim, generator=gen).to(device).requires_grad_()
            k, v = (torch.randn(seq, args.rows, args.groups, args.head_dim, generator=gen).to(device).requires_grad_()
                    for _ in range(2))
            grad = torch.randn(seq, args.rows, args.heads * args.head_dim, generator=gen).to(device)

            def run_new(q, k, v, _mask):
                return new(q, k, v, None)

            paths = {"masked": lambda q, k, v, m: masked(q, k, v, m), "new": run_new, "causal": causal_floor}
            times: dict[str, list[float]] = {name: [] for name in paths}
            new.attention_context.prepare(document_ids)  # once per micro-batch, as the model's forward does
            for i in range(args.warmup + repeats):
                names = list(paths)
                names = names[i % 3:] + names[: i % 3]  # rotate which path goes first
                for name in names:
                    for t in (q, k, v):
                        t.grad = None
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    out = paths[name](q, k, v, mask)
                    out.backward(grad)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if i >= args.warmup:
                        times[name].append(time.perf_counter() - start)
            new.attention_context.clear()
            med = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
            spread = 1e3 * (max(times["new"]) - min(times["new"]))
            vs_masked, vs_causal = med["masked"] / med["new"], med["new"] / med["causal"]
            print(f"{seq:>5} {docs:>4} {med['masked']:>10.1f} {med['new']:>8.1f} {med['causal']:>10.1f} "
                  f"{vs_masked:>10.2f}x {vs_causal:>10.2f}x {spread:>9.1f}ms", flush=True)
            if seq == 512 and docs == 4:
                result = (vs_masked, vs_causal)
    print(f"RESULT attention_vs_masked={result[0]:.2f} attention_vs_causal_floor={result[1]:.2f}")


if __name__ == "__main__":
    main()
