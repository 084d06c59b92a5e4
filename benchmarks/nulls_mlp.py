"""Forward+backward time of the NULLs MLP against two baselines, in one run.

- masked-dense: the paper's way, all I neurons computed then multiplied by the
  0/1 mask (the mask is built outside the timed region, to the baseline's favour);
- dense-active: a plain SwiGLU of the live width ``n_backbone + k``: what a token
  really uses, the floor for any sparse scheme.

The NULLs MLP is timed including the per-batch routing plan (in a model it is
built once and shared by every layer, so this overstates its cost).
Shapes keep the paper's ratios (n_backbone / I = 0.061, k / n_pool = 0.013).
Every source count runs with documents of equal length and with uneven ones (log-normal lengths,
as real articles have; fixed seed); the RESULT line holds the worst case over all of them.

    python benchmarks/nulls_mlp.py [--hidden 256] [--width 2048] [--tokens 4096] [--sources 1,4,16,64]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nulls_megatron.sinks.assignment import SinkAssignment  # noqa: E402
from nulls_megatron.sinks.mlp import NullsMLP  # noqa: E402
from nulls_megatron.sinks.reference import dense_weights, masked_dense_swiglu, neuron_mask  # noqa: E402
from nulls_megatron.sinks.routing import SinkRouting  # noqa: E402
from nulls_megatron.sinks.table import normal_init  # noqa: E402

P_GEN, P_MEM = 0.061, 0.013


def interleaved_medians(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median ms of each function, timed in turn within every repeat so that load
    from other processes hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def document_sources(tokens: int, n_sources: int, uneven: bool) -> torch.Tensor:
    """Per-token source ids of ``n_sources`` contiguous documents (as packed rows deliver them):
    equal lengths, or log-normal ones (sigma 1, fixed seed; every document at least one token)."""
    if not uneven:
        return (torch.arange(tokens) * n_sources // tokens) * 7919 + 11
    weights = torch.exp(torch.randn(n_sources, generator=torch.Generator().manual_seed(n_sources)))
    lengths = 1 + (weights / weights.sum() * (tokens - n_sources)).floor().long()
    lengths[torch.argmax(lengths)] += tokens - int(lengths.sum())
    return torch.repeat_interleave(torch.arange(n_sources) * 7919 + 11, lengths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--width", type=int, default=2048, help="MLP width I = n_backbone + n_pool")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--sources", default="1,4,16,64")
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()

    d, width, tokens = args.hidden, args.width, args.tokens
    n_backbone = round(P_GEN * width)
    n_pool = width - n_backbone
    k = round(P_MEM * n_pool)
    active = n_backbone + k
    torch.manual_seed(0)
    init = normal_init(d**-0.5)
    mlp = NullsMLP(d, n_backbone, SinkAssignment(n_pool, k), init_method=init)
    w1, w3, w2 = (w.detach().clone().requires_grad_(True) for w in dense_weights(mlp.backbone_fc1, mlp.backbone_fc2, mlp.sinks.weight))
    dense_fc1 = torch.randn(2 * active, d).mul_(d**-0.5).requires_grad_(True)
    dense_fc2 = torch.randn(d, active).mul_(active**-0.5).requires_grad_(True)
    x = torch.randn(tokens, d, requires_grad=True)
    grad = torch.randn(tokens, d)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; d={d} I={width} n_backbone={n_backbone} "
          f"n_pool={n_pool} k={k} (live width {active}, {active / width:.1%} of I); {tokens} tokens fwd+bwd, "
          f"median of {args.repeats}; lengths: equal, or log-normal (shortest-longest document)")
    print(f"{'sources':>8} {'lengths':>8} {'masked-dense ms':>16} {'dense-active ms':>16} {'NULLs ms':>10} "
          f"{'vs masked-dense':>16} {'vs dense-active':>16}")
    speedups, slowdowns, engine_rows = [], [], []
    for n_sources in [int(s) for s in args.sources.split(",")]:
        t_masked = None
        for uneven in (False,) if n_sources == 1 else (False, True):
            sources = document_sources(tokens, n_sources, uneven)
            lengths = torch.unique_consecutive(sources, return_counts=True)[1]
            mask = neuron_mask(SinkRouting.train(sources), sources, mlp.sinks, tokens)

            def run_masked_dense():
                masked_dense_swiglu(x, w1, w3, w2, mask).backward(grad)

            def run_dense_active():
                gate, up = (x @ dense_fc1.t()).chunk(2, dim=-1)
                ((F.silu(gate) * up) @ dense_fc2.t()).backward(grad)

            def run_nulls():
                mlp(x, SinkRouting.train(sources)).backward(grad)

            # As under the Megatron engines, whose DDP keeps an fp32 gradient buffer (main_grad) per
            # parameter, zeroed once per step: the table's gradient returned by autograd and added into
            # the buffer by the engine's hook, or added straight into it by the kernel (grad_table_into).
            table = mlp.sinks.weight
            main_grad = torch.zeros_like(table)

            def run_nulls_hook_adds():
                main_grad.zero_()
                mlp(x, SinkRouting.train(sources)).backward(grad)
                main_grad.add_(table.grad)
                table.grad = None

            def run_nulls_into_main_grad():
                main_grad.zero_()
                table.main_grad, table.grad_added_to_main_grad = main_grad, False
                try:
                    mlp(x, SinkRouting.train(sources)).backward(grad)
                finally:
                    del table.main_grad
                table.grad = None

            if t_masked is None:  # the masked-dense time does not depend on the lengths
                t_masked = interleaved_medians({"masked": run_masked_dense}, max(3, args.repeats // 3), warmup=1)["masked"]
            fast = interleaved_medians({"dense": run_dense_active, "nulls": run_nulls, "hook": run_nulls_hook_adds,
                                        "into": run_nulls_into_main_grad}, args.repeats)
            t_dense, t_nulls = fast["dense"], fast["nulls"]
            layout = f"{int(lengths.min())}-{int(lengths.max())}" if uneven else "equal"
            engine_rows.append((n_sources, layout, fast["hook"], fast["into"]))
            speedups.append(t_masked / t_nulls)
            slowdowns.append(t_nulls / t_dense)
            print(f"{n_sources:>8} {layout:>8} {t_masked:>16.1f} {t_dense:>16.1f} {t_nulls:>10.1f} "
                  f"{speedups[-1]:>15.2f}x {slowdowns[-1]:>15.2f}x")
    print("under the Megatron engines' fp32 gradient buffers (zeroed once per step), NULLs ms: the table gradient "
          "added by the hook / added by the kernel (grad_table_into)")
    for n_sources, layout, hook, into in engine_rows:
        print(f"{n_sources:>8} {layout:>8} {hook:>10.1f} {into:>10.1f}   {hook / into:.2f}x")
    # the worst case over every source count and length layout
    print(f"RESULT speedup_vs_masked_dense={min(speedups):.2f} slowdown_vs_dense_active={max(slowdowns):.2f}")


if __name__ == "__main__":
    main()
