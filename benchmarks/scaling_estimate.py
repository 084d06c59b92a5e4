"""The paper's run on H100 nodes, on paper: FLOPs per token from a config, step time and MFU, and the
memory the attention path saves for backward, and the weights and optimizer state per GPU (docs/scaling.md).

Everything is computed from the config (default configs/wiki_1b_paper.yaml) and published H100
figures; nothing here is a measurement on a GPU. Counted per token (forward; training = 3x):
matmuls of the active parameters (QKV, attention out, the backbone + one source's k sinks of every
MLP, the LM head), and attention scores + values with the causal half of a packed row (documents are
shorter than the row; counted as if the row were one document: an upper bound).

The expert-parallel part sizes the sink pool for a deletion budget (the pool whose expected zeroed
share after ``--deletions`` stays under ``--collateral``), the sink state per GPU at each EP size, and
the bytes the dispatch moves per step with their time at published all-to-all bandwidths.

    python benchmarks/scaling_estimate.py [--config configs/wiki_1b_paper.yaml] [--gpus 64] [--mfu 0.35]
        [--deletions 100] [--collateral 0.1]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nulls_megatron.config import load_config  # noqa: E402

H100_BF16_DENSE = 989e12  # FLOP/s, SXM, dense (no sparsity)
H100_HBM = 3.35e12  # bytes/s
# Published all-to-all bandwidths per GPU (bytes/s): NCCL on H100 NVLink, DeepEP's dispatch intranode
# (NVLink) and internode (RDMA, 43-58 GB/s: the low end is used).
ALL_TO_ALL_BANDWIDTH = {"NCCL, NVLink (intranode)": 370e9, "DeepEP, NVLink (intranode)": 153e9,
                        "DeepEP, RDMA (internode)": 43e9}
GPUS_PER_NODE = 8


def flops_per_token(cfg) -> dict[str, float]:
    m, n = cfg.model, cfg.nulls
    d, h, g, hd, s = m.hidden_size, m.num_attention_heads, m.num_query_groups, m.head_dim, m.seq_length
    qkv = d * (h * hd + 2 * g * hd)
    out = h * hd * d
    mlp_live = 3 * d * (n.n_backbone + n.sinks_per_source)
    mlp_dense = 3 * d * m.ffn_hidden_size  # the reference code's masked-dense MLP computes all of I
    head = d * m.vocab_size
    attn = 2 * 2 * s * h * hd * 0.5  # scores and values, causal half
    layer = 2 * (qkv + out + mlp_live) + attn
    forward = m.num_layers * layer + 2 * head
    return {"forward": forward, "train": 3 * forward,
            "train_masked_dense": 3 * (m.num_layers * (2 * (qkv + out + mlp_dense) + attn) + 2 * head),
            "active_params": m.num_layers * (qkv + out + mlp_live) + head}


def total_params(cfg) -> int:
    """Every parameter of the model: embeddings (tied), attention, norms, backbone and the whole sink pool."""
    m, n = cfg.model, cfg.nulls
    d, h, g, hd = m.hidden_size, m.num_attention_heads, m.num_query_groups, m.head_dim
    attention = d * (h * hd + 2 * g * hd) + h * hd * d
    mlp = 3 * d * (n.n_backbone + n.n_pool)  # every layer has its own sink table
    layer = attention + mlp + 2 * d
    embeddings = d * m.vocab_size * (1 if m.tie_embeddings else 2)
    return m.num_layers * layer + embeddings + d


def state_bytes_per_gpu(params: int, data_parallel: int) -> tuple[float, float]:
    """(replicated, distributed-optimizer) bytes per GPU: bf16 weights (2) and the fp32 gradient buffer
    (4) on every rank; fp32 masters and AdamW's two moments (12) on every rank, or 1/DP of them."""
    return params * (2 + 4 + 12), params * (2 + 4 + 12 / data_parallel)


def pool_for_deletion_budget(k: int, deletions: int, collateral: float) -> int:
    """Smallest pool (rows per layer) whose expected zeroed share after ``deletions`` forgotten sources,
    ``1 - (1 - k / n_pool) ** deletions``, is at most ``collateral``."""
    def keeps(n_pool: int) -> bool:
        return 1 - (1 - k / n_pool) ** deletions <= collateral * (1 + 1e-12)  # not a rounding error's row more

    n_pool = max(k, math.ceil(k / (1 - (1 - collateral) ** (1 / deletions))))
    while not keeps(n_pool):
        n_pool += 1
    while n_pool > k and keeps(n_pool - 1):
        n_pool -= 1
    return n_pool


def sink_state_bytes_per_gpu(n_pool: int, d: int, layers: int, ep: int, expert_dp: int) -> float:
    """Sink-table bytes per GPU with the pool sharded over ``ep`` ranks: bf16 rows and an fp32
    gradient buffer on every replica, fp32 masters and two moments sharded over the ``expert_dp``
    replicas (the distributed optimizer)."""
    params = n_pool * 3 * d * layers / ep
    return params * (2 + 4 + 12 / expert_dp)


def dispatch_bytes_per_step(tokens_per_gpu: int, d: int, layers: int, ep: int, bytes_per_value: int = 2) -> float:
    """Bytes one GPU sends in a step's all-to-alls: each token's activation row goes to its owner and
    its result comes back (forward), and both again in the backward (gradients); a share 1 / EP of the
    tokens stays on its own rank."""
    return 4 * layers * tokens_per_gpu * d * bytes_per_value * (ep - 1) / ep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "wiki_1b_paper.yaml"))
    p.add_argument("--gpus", type=int, default=64)
    p.add_argument("--mfu", type=float, default=0.35, help="assumed model FLOP utilisation for the time estimate")
    p.add_argument("--tokens", type=float, default=32e9)
    p.add_argument("--doc-tokens", type=float, default=713, help="mean tokens per article (the paper's data)")
    p.add_argument("--launch-us", type=float, default=8.0, help="cost of one small kernel launch + its sync points")
    p.add_argument("--deletions", type=int, default=100, help="sources to be forgotten over the model's life")
    p.add_argument("--collateral", type=float, default=0.1, help="largest acceptable zeroed share of a layer's pool")
    p.add_argument("--imbalance", type=float, default=1.45,
                   help="max/mean tokens per EP rank (benchmarks/ep_load_balance.py: EP 8, documents cut to 1024)")
    args = p.parse_args()
    cfg = load_config(args.config)
    m, t = cfg.model, cfg.train
    f = flops_per_token(cfg)
    tokens_step = t.global_batch_rows * m.seq_length
    per_gpu = tokens_step / args.gpus
    step_flops = f["train"] * tokens_step
    ideal = step_flops / (args.gpus * H100_BF16_DENSE)
    print(f"active parameters (matmuls per token): {f['active_params'] / 1e6:.0f}M")
    print(f"FLOPs per token: forward {f['forward'] / 1e9:.3f} G, training {f['train'] / 1e9:.3f} G "
          f"(masked-dense MLP as the reference code: {f['train_masked_dense'] / 1e9:.2f} G, "
          f"{f['train_masked_dense'] / f['train']:.1f}x)")
    print(f"step: {tokens_step:,} tokens = {step_flops / 1e15:.2f} PFLOP; {per_gpu:,.0f} tokens per GPU on {args.gpus} GPUs")
    print(f"step time at 100% of the bf16 peak: {ideal * 1e3:.0f} ms; at MFU {args.mfu:.0%}: {ideal / args.mfu * 1e3:.0f} ms")
    run_s = args.tokens / tokens_step * ideal / args.mfu
    print(f"the {args.tokens / 1e9:.0f}B-token run at MFU {args.mfu:.0%}: {run_s / 3600:.1f} h on {args.gpus} GPUs "
          f"({run_s * args.gpus / 3600:,.0f} GPU-hours): the sink pool holds most parameters but costs no FLOPs")
    sources = per_gpu / args.doc_tokens + t.micro_batch_rows  # whole documents plus one split per row
    launches = sources * m.num_layers * (6 + 6)  # per source and layer: 2 GEMMs fwd, 4 bwd, ~6 elementwise
    grouped = m.num_layers * 5  # the Triton kernel: 1 launch forward; backward the input and row gradients, a sort, the per-row sum
    print(f"a per-source sink loop (the torch reference's first form; it now batches sources of one length): ~{sources:.0f} sources "
          f"per GPU and step (documents of {args.doc_tokens:.0f} tokens) -> ~{launches:,.0f} kernel launches, "
          f"{launches * args.launch_us / 1e3:.0f} ms at {args.launch_us:.0f} us each: more than the step's compute; "
          f"the grouped Triton kernel (the CUDA default): ~{grouped} launches, {grouped * args.launch_us / 1e3:.1f} ms")
    b, h, s, layers = t.micro_batch_rows, m.num_attention_heads, m.seq_length, m.num_layers
    probs = b * h * s * s * 4 * layers  # fp32 softmax probabilities saved for backward, every layer
    print(f"masked attention (today's path before issue 10): fp32 probabilities saved for backward "
          f"{probs / 2**30:.1f} GiB per micro-batch of {b} rows; reading and writing them "
          f"(~4 passes forward + backward) costs {4 * probs / H100_HBM * 1e3:.0f} ms of HBM time per micro-batch, "
          f"against {f['train'] * b * s / H100_BF16_DENSE / args.mfu * 1e3:.0f} ms of compute at MFU {args.mfu:.0%}")
    lse = b * h * s * 4 * layers
    print(f"FlexAttention / SDPA with a block mask: {lse / 2**20:.1f} MiB of log-sum-exp saved per micro-batch")
    total = total_params(cfg)
    replicated, sharded = state_bytes_per_gpu(total, args.gpus)
    print(f"weights and optimizer state per GPU ({total / 1e9:.2f}B parameters, bf16 weights, fp32 gradient buffer, "
          f"fp32 masters and two AdamW moments; TP = PP = 1, DP = {args.gpus}): replicated {replicated / 2**30:.1f} GiB; "
          f"Megatron's distributed optimizer (optimizer.distributed, the GPU default) {sharded / 2**30:.1f} GiB")
    print_expert_parallel_plan(cfg, args, per_gpu, ideal / args.mfu)
    print(f"RESULT train_gflop_per_token={f['train'] / 1e9:.3f} step_ms_at_mfu={ideal / args.mfu * 1e3:.0f} "
          f"run_hours={run_s / 3600:.1f}")


def print_expert_parallel_plan(cfg, args, tokens_per_gpu: float, step_s: float) -> None:
    m, n = cfg.model, cfg.nulls
    k, d, layers = n.sinks_per_source, m.hidden_size, m.num_layers
    n_pool = pool_for_deletion_budget(k, args.deletions, args.collateral)
    share = 1 - (1 - k / n.n_pool) ** args.deletions
    print(f"deletion budget: {args.deletions} sources at <= {args.collateral:.0%} of the pool zeroed needs {n_pool:,} "
          f"sink rows per layer ({n_pool / n.n_pool:.1f}x the paper's {n.n_pool:,}, which would lose {share:.0%})")
    print(f"{'EP':>4} {'expert DP':>10} {'sink state / GPU':>17} {'dispatch / step':>16}  "
          + "  ".join(f"{name:>27}" for name in ALL_TO_ALL_BANDWIDTH))
    for ep in (1, 2, 4, 8, 16):
        expert_dp = args.gpus // ep
        state = sink_state_bytes_per_gpu(n_pool, d, layers, ep, expert_dp)
        moved = dispatch_bytes_per_step(int(tokens_per_gpu), d, layers, ep)
        times = []
        for name, bandwidth in ALL_TO_ALL_BANDWIDTH.items():
            usable = (ep <= GPUS_PER_NODE) == ("intranode" in name)
            cost = moved * args.imbalance / bandwidth
            times.append(f"{cost * 1e3:6.1f} ms ({cost / step_s:4.0%} of step)" if usable and ep > 1 else f"{'-':>27}")
        print(f"{ep:>4} {expert_dp:>10} {state / 2**30:>13.1f} GiB {moved / 2**30:>12.2f} GiB  " + "  ".join(
            f"{t:>27}" for t in times))


if __name__ == "__main__":
    main()
