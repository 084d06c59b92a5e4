"""The sink pool sharded over 2 expert-parallel ranks (gloo), dispatched with all-to-all, against the
whole table on each rank (EP=1): outputs and every gradient, for balanced loads, a skewed load (every
token to rank 0, rank 1 receives nothing) and a rank with no token; twice, bit-identical."""
from __future__ import annotations

import torch

from launch.local import run_local

D, N_POOL, K, SHARDS = 16, 64, 4, 4


def _case(name: str, rank: int, assignment) -> torch.Tensor:
    """This rank's token sources for one case."""
    gen = torch.Generator().manual_seed(100 * rank + len(name))
    if name == "balanced":
        return torch.randint(0, 50, (37 + 11 * rank,), generator=gen)
    candidates = torch.arange(0, 400)
    on_rank0 = candidates[assignment.shard_of(candidates) < SHARDS // 2]
    if name == "skewed":  # every token of both ranks to sources whose sinks rank 0 holds
        return on_rank0[torch.randint(0, len(on_rank0), (29,), generator=gen)]
    if name == "rank 1 has no token":
        return torch.randint(0, 50, (23,), generator=gen) if rank == 0 else torch.zeros(0, dtype=torch.int64)
    raise ValueError(name)


def worker(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from nulls_megatron.sinks.assignment import SinkAssignment
    from nulls_megatron.sinks.dispatch import AllToAllSinkDispatcher, LocalSinkDispatcher

    assignment = SinkAssignment(N_POOL, K, n_shards=SHARDS, seed=3)
    gen = torch.Generator().manual_seed(0)
    table_full = torch.randn(N_POOL, 3, D, generator=gen) * 0.5
    disabled = torch.zeros(N_POOL, dtype=torch.bool)
    disabled[[5, 40]] = True  # forgotten rows stay off through the dispatch
    rows = N_POOL // world_size
    group = dist.new_group(list(range(world_size)))
    out = {}
    for name in ("balanced", "skewed", "rank 1 has no token"):
        sources = _case(name, rank, assignment)
        t = sources.numel()
        x0 = torch.randn(t, D, generator=torch.Generator().manual_seed(7 + rank))
        base0 = torch.randn(t, D, generator=torch.Generator().manual_seed(9 + rank))
        grad = torch.randn(t, D, generator=torch.Generator().manual_seed(11 + rank))

        def run(dispatcher, table_rows, shard_disabled):
            x, base = x0.clone().requires_grad_(True), base0.clone().requires_grad_(True)
            table = table_rows.clone().requires_grad_(True)
            plan = dispatcher.plan(sources)
            y = dispatcher.forward(x, table, shard_disabled, plan, base=base)
            (y * grad).sum().backward()
            return y.detach(), x.grad, base.grad, table.grad if table.grad is not None else torch.zeros_like(table)

        ref_y, ref_dx, ref_dbase, ref_dtable = run(LocalSinkDispatcher(assignment), table_full, disabled)
        dist.all_reduce(ref_dtable, group=group)  # both ranks' tokens train the one table
        ep = AllToAllSinkDispatcher(assignment, group)
        shard = slice(rank * rows, (rank + 1) * rows)
        first = run(ep, table_full[shard], disabled[shard])
        second = run(ep, table_full[shard], disabled[shard])
        out[name] = {"tokens": t, "received": None,
                     "y": torch.allclose(first[0], ref_y, atol=1e-6, rtol=1e-6),
                     "dx": torch.allclose(first[1], ref_dx, atol=1e-6, rtol=1e-6),
                     "dbase": torch.equal(first[2], ref_dbase),
                     # the owner sums both ranks' tokens in one pass, the reference per rank then over ranks
                     "dtable": torch.allclose(first[3], ref_dtable[shard], rtol=0,
                                              atol=1e-6 * max(1.0, float(ref_dtable[shard].abs().max()))),
                     "dtable_nonzero": bool(first[3].abs().sum() > 0),
                     "disabled_rows_untouched": bool(first[3][disabled[shard]].abs().sum() == 0),
                     "repeat_bit_identical": all(torch.equal(a, b) for a, b in zip(first, second))}
        out[name]["received"] = sum(ep.plan(sources).recv_splits)
    return out


def test_all_to_all_dispatch_on_2_ranks_equals_the_whole_table():
    r0, r1 = run_local(worker, 2, timeout=300)
    for name in r0:
        for r in (r0, r1):
            checks = {k: v for k, v in r[name].items() if isinstance(v, bool)}
            ok = {k for k, v in checks.items() if v} | ({"dtable_nonzero"} if not r[name]["received"] else set())
            assert ok == set(checks), (name, checks, r[name])
    assert r1["skewed"]["received"] == 0 and r0["skewed"]["received"] == r0["skewed"]["tokens"] + r1["skewed"]["tokens"]
    assert r1["rank 1 has no token"]["tokens"] == 0
    assert r0["balanced"]["received"] > 0 and r1["balanced"]["received"] > 0
