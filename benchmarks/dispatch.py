"""Per-layer forward + backward time of the sink dispatch on 2 gloo ranks, in one run, against:

- **Megatron-core's ``MoEAlltoAllTokenDispatcher``** fed the same routing: top-1, one expert per rank
  (the rank's pool shards), the routing map built from each token's source shard, every stage of
  Megatron's dispatch and combine (preprocess, permutation, all-to-all, un-permutation);
- **the communication floor**: bare ``all_to_all_single`` calls moving the same bytes with the same
  split sizes (dispatch and combine in the forward, both again in the backward). Ours moves fewer
  bytes through the collective: the tokens whose sinks their own rank holds are copied into place and
  skip it. For that reason the script also prints the floor of the bytes that really cross ranks (the
  same calls with each rank's own split 0), for reference; the RESULT uses the floor above.

Ours is ``AllToAllSinkDispatcher.dispatch`` then ``.combine`` (the backbone output added in the
un-permutation). Between dispatch and combine both run the identity as the expert, so the figures
are the dispatch's alone; the grouped sink SwiGLU is measured in ``nulls_mlp.py``. Our
per-micro-batch ``plan`` (destinations, split sizes and the ids exchanged: stages 1-3, the one host
sync) is shared by every layer; a layer's share is ``plan / --layers`` (the paper's 32 by default),
and the time with the whole plan in every layer is printed too. Megatron's preprocess runs per layer,
as in a mixture of experts, whose routing differs per layer.

Tokens: each rank's micro-batch is packed documents with log-normal lengths (fixed seed), each from
a random source among 6.4M, the sources' shards drawn by the sink assignment of ``--shards`` shards.

Megatron's dispatcher expects CUDA (it creates CUDA streams and allocates on
``torch.cuda.current_device()``); in this script only, a compatibility layer gives it dummy streams
and events and hands gloo its split sizes as lists (MEGATRON_ON_CPU.md).

    python benchmarks/dispatch.py [--tokens 4096] [--hidden 512] [--repeats 30] [--layers 32]

Last line: ``RESULT vs_megatron_dispatcher=<Megatron ms / ours> vs_comm_floor=<ours / floor>``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.local import run_local  # noqa: E402

N_SOURCES = 6_407_814


def _cpu_stand_ins_for_megatron_moe() -> None:
    """What Megatron's all-to-all dispatcher needs on a CPU-only torch (this benchmark only)."""
    import torch.distributed as dist

    from nulls_megatron.compat import apply_cpu_compat

    apply_cpu_compat()  # torch.cuda.current_device() -> "cpu", a CPU RNG tracker

    class Event:
        def synchronize(self) -> None:
            pass

    class Stream:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def wait_stream(self, other) -> None:
            pass

        def record_event(self, event=None) -> Event:
            return Event()

    torch.cuda.Stream = Stream
    torch.cuda.current_stream = lambda *a, **k: Stream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    # The splits stay CPU tensors where Megatron expects to have moved them to numpy; gloo wants lists.
    all_to_all_single = dist.all_to_all_single

    def as_list(splits):
        return splits.tolist() if hasattr(splits, "tolist") else splits

    def all_to_all_single_with_list_splits(output, input, output_split_sizes=None, input_split_sizes=None, **kwargs):
        return all_to_all_single(output, input, as_list(output_split_sizes), as_list(input_split_sizes), **kwargs)

    dist.all_to_all_single = all_to_all_single_with_list_splits


def packed_sources(tokens: int, rank: int) -> torch.Tensor:
    """One micro-batch of packed documents: log-normal lengths (median 300 tokens), random sources."""
    gen = torch.Generator().manual_seed(1000 + rank)
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(max(1, int(torch.exp(torch.randn((), generator=gen) + 5.7))))
    lengths[-1] -= sum(lengths) - tokens
    ids = torch.randint(0, N_SOURCES, (len(lengths),), generator=gen)
    return torch.repeat_interleave(ids, torch.tensor(lengths))


def worker(rank: int, world_size: int, args: argparse.Namespace) -> dict:
    import torch.distributed as dist
    import torch.nn.functional as F

    # A core per rank, as a GPU per rank: two ranks of 2 threads each on 2 cores slow every copy 3x.
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world_size))
    _cpu_stand_ins_for_megatron_moe()
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nulls_megatron.compat import cpu_transformer_config_overrides
    from nulls_megatron.sinks.assignment import SinkAssignment
    from nulls_megatron.sinks.dispatch import AllToAllSinkDispatcher

    group = dist.group.WORLD
    alone = [dist.new_group([r]) for r in range(world_size)][rank]  # expert tensor parallel size 1
    assignment = SinkAssignment(args.shards * 32, 4, n_shards=args.shards, seed=1)
    ours = AllToAllSinkDispatcher(assignment, group)
    sources = packed_sources(args.tokens, rank)
    destination = ours.destination(sources)
    d = args.hidden
    gen = torch.Generator().manual_seed(rank)
    x0 = torch.randn(args.tokens, d, generator=gen)
    base0 = torch.randn(args.tokens, d, generator=gen)
    grad = torch.randn(args.tokens, d, generator=gen)

    config = TransformerConfig(
        num_layers=1, hidden_size=d, num_attention_heads=4, num_moe_experts=world_size, moe_router_topk=1, moe_router_pre_softmax=True,
        moe_token_dispatcher_type="alltoall", expert_model_parallel_size=world_size,
        add_bias_linear=False, **cpu_transformer_config_overrides())
    megatron = MoEAlltoAllTokenDispatcher(
        num_local_experts=1, local_expert_indices=[rank], config=config,
        pg_collection=ProcessGroupCollection(ep=group, expt_tp=alone, tp_ep=group))
    routing_map = F.one_hot(destination, world_size).bool()
    probs = routing_map.to(torch.float32)

    plan = ours.plan(sources)

    def run_ours_plan() -> None:
        ours.plan(sources)

    # The expert between dispatch and combine is the identity (a view: no time of its own). The backbone
    # output ``base`` needs no gradient here: in a model it passes through to the backbone's backward.
    def run_ours() -> None:
        x, base = x0.detach().requires_grad_(True), base0
        received = ours.dispatch(x, plan)
        ours.combine(received.view_as(received), plan, base).backward(grad)

    def run_megatron() -> None:
        x, base = x0.detach().requires_grad_(True), base0
        hidden, token_probs = megatron.dispatch_preprocess(x, routing_map, probs)
        hidden, token_probs = megatron.token_dispatch(hidden, token_probs)
        hidden, _, _ = megatron.dispatch_postprocess(hidden, token_probs)
        hidden = megatron.combine_preprocess(hidden.view_as(hidden))
        (megatron.combine_postprocess(megatron.token_combine(hidden)) + base).backward(grad)

    def run_floor() -> None:  # dispatch and combine, forward then backward; outputs allocated as any call does
        rows = x0
        for send, recv in ((plan.send_splits, plan.recv_splits), (plan.recv_splits, plan.send_splits)) * 2:
            out = rows.new_empty(sum(recv), d)
            dist.all_to_all_single(out, rows, recv, send, group=group)
            rows = out

    def run_floor_remote() -> None:  # the same, only the bytes that cross ranks
        for send, recv in ((plan.remote(plan.send_splits), plan.remote(plan.recv_splits)),
                           (plan.remote(plan.recv_splits), plan.remote(plan.send_splits))) * 2:
            dist.all_to_all_single(x0.new_empty(sum(recv), d), x0[:sum(send)], recv, send, group=group)

    # Both dispatchers deliver the same rows to the same ranks and return the same result.
    x = x0.clone()
    mine = ours.combine(ours.dispatch(x, plan), plan, base0)
    hidden, token_probs = megatron.dispatch_preprocess(x, routing_map, probs)
    hidden, _, _ = megatron.dispatch_postprocess(*megatron.token_dispatch(hidden, token_probs))
    theirs = megatron.combine_postprocess(megatron.token_combine(megatron.combine_preprocess(hidden))) + base0
    same_result = bool(torch.allclose(mine, theirs, atol=1e-6))

    fns = {"plan": run_ours_plan, "ours": run_ours, "megatron": run_megatron, "floor": run_floor,
           "floor_remote": run_floor_remote}
    for fn in fns.values():
        for _ in range(3):
            fn()
    times = torch.zeros(len(fns), args.repeats, dtype=torch.float64)
    for r in range(args.repeats):
        for i, fn in enumerate(fns.values()):
            dist.barrier(group)
            start = time.perf_counter()
            fn()
            times[i, r] = time.perf_counter() - start
    dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)  # a step waits for the slower rank
    medians = {name: 1e3 * statistics.median(times[i].tolist()) for i, name in enumerate(fns)}
    return {"medians": medians, "tokens": args.tokens, "threads": torch.get_num_threads(), "sent": plan.send_splits, "received": plan.recv_splits,
            "documents": int(torch.unique_consecutive(sources).numel()), "same_result": same_result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank and micro-batch")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--shards", type=int, default=64, help="pool shards of the assignment (nulls.pool_shards)")
    parser.add_argument("--layers", type=int, default=32, help="layers sharing one plan")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    ranks = run_local(worker, 2, args, timeout=900)
    m = ranks[0]["medians"]
    print(f"torch {torch.__version__}, 2 gloo ranks on {os.cpu_count()} cores ({ranks[0]['threads']} thread(s) per rank); {args.tokens} tokens x d={args.hidden} "
          f"fp32 per rank, median of {args.repeats} (the slower rank's time in each repeat)")
    for rank, r in enumerate(ranks):
        print(f"rank {rank}: {r['documents']} documents, sends {r['sent']}, receives {r['received']}")
    if not all(r["same_result"] for r in ranks):
        raise SystemExit("the two dispatchers disagree: the comparison is void")
    ours = m["ours"] + m["plan"] / args.layers
    ours_plan_each_layer = m["ours"] + m["plan"]
    rows = [("ours: dispatch + combine", m["ours"]), (f"ours: plan (once per micro-batch, 1/{args.layers} per layer)", m["plan"]),
            ("ours per layer", ours), ("ours with the plan in every layer", ours_plan_each_layer),
            ("Megatron MoEAlltoAllTokenDispatcher", m["megatron"]), ("communication floor (bare all_to_all_single)", m["floor"]),
            ("floor of the bytes crossing ranks (own splits 0)", m["floor_remote"])]
    for name, ms in rows:
        print(f"{name:<48} {ms:8.2f} ms")
    print(f"ours vs Megatron: {m['megatron'] / ours:.2f}x faster per layer ({m['megatron'] / ours_plan_each_layer:.2f}x "
          f"with the plan in every layer); ours / floor: {ours / m['floor']:.2f} "
          f"(ours / floor of the crossing bytes: {ours / m['floor_remote']:.2f})")
    print(f"RESULT vs_megatron_dispatcher={m['megatron'] / ours:.2f} vs_comm_floor={ours / m['floor']:.2f}")


if __name__ == "__main__":
    main()
