"""Every Triton kernel of kernels/ against its pure-torch reference, in Triton's interpreter.

Run by tests/test_triton_kernels.py in a child process with TRITON_INTERPRET=1 (it must be set
before triton is imported); prints one line per check and exits non-zero on the first mismatch.
"""
from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from kernels.destination_permutation import destination_permutation, destination_permutation_reference  # noqa: E402
from kernels.grouped_sink_swiglu import grouped_sink_swiglu  # noqa: E402
from kernels.permute_rows import (gather, permute_rows, permute_rows_reference, unpermute_rows,  # noqa: E402
                                  unpermute_rows_reference)


def check(name: str, ok: bool) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}", flush=True)
    if not ok:
        sys.exit(1)


def destination_cases(gen: torch.Generator):
    for n, d in [(1, 1), (37, 5), (128, 3), (129, 1), (300, 7), (1000, 64), (513, 200)]:
        yield f"random n={n} D={d}", torch.randint(0, d, (n,), generator=gen), d
    yield "every token to one destination of 4", torch.full((300,), 2, dtype=torch.int64), 4
    yield "destinations with no token", torch.randint(0, 3, (200,), generator=gen) * 2, 9
    yield "int32 ids", torch.randint(0, 6, (77,), generator=gen).int(), 6
    yield "empty", torch.zeros(0, dtype=torch.int64), 3


def sink_cases():
    """(name, offsets, k, d, table rows, perm?, base?): tiny, the interpreter runs a program at a time.
    Tiles hold 64 tokens for k <= 32 and 32 for k <= 128; table-gradient programs 64 sinks; fewer
    table rows than sinks in all groups make groups share rows."""
    yield "uneven groups (1, 0, 11, 138 tokens: 3 tiles) k=5 d=48 perm base", [0, 1, 1, 12, 150], 5, 48, 12, True, True
    yield "one group holding every token k=25 d=130", [0, 21], 25, 130, 40, False, False
    yield "grouped tokens k=5 d=130 base folded", [0, 7, 9, 30], 5, 130, 9, False, True
    yield "k=70 (2 sink blocks, 32-token tiles) d=20 perm", [0, 3, 40], 70, 20, 100, True, False


def sink_inputs(gen: torch.Generator, offsets: list[int], k: int, d: int, n_rows: int, with_perm: bool, with_base: bool):
    n_groups, n_tokens = len(offsets) - 1, offsets[-1]
    # The last row only for the first group's first sink, disabled: its gradient must be exactly zero.
    row_ids = torch.stack([torch.randperm(n_rows - 1, generator=gen)[:k] for _ in range(n_groups)])
    row_ids[0, 0] = n_rows - 1
    gates = torch.rand(n_groups, k, generator=gen) + 0.5
    gates[0, 0] = 0.0
    return dict(
        x=torch.randn(n_tokens, d, generator=gen), table=torch.randn(n_rows, 3, d, generator=gen) * 0.3,
        perm=torch.randperm(n_tokens, generator=gen) if with_perm else None, offsets=offsets, row_ids=row_ids,
        gates=gates, base=torch.randn(n_tokens, d, generator=gen) if with_base else None,
        grad_y=torch.randn(n_tokens, d, generator=gen))


def run_sinks(impl: str, inputs: dict, grad_table_into: torch.Tensor | None = None, need_x: bool = True):
    """(y, grad x, grad table, grad base) of one forward and backward."""
    x = inputs["x"].clone().requires_grad_(need_x)
    table = torch.nn.Parameter(inputs["table"].clone())
    base = None if inputs["base"] is None else inputs["base"].clone().requires_grad_(True)
    y = grouped_sink_swiglu(x, table, inputs["perm"], inputs["offsets"], inputs["row_ids"], inputs["gates"], base=base,
                            grad_table_into=grad_table_into, impl=impl)
    y.backward(inputs["grad_y"])
    assert grad_table_into is None or table.grad_added_to_main_grad
    return y.detach(), x.grad, None if grad_table_into is not None else table.grad, None if base is None else base.grad


def close(got: torch.Tensor | None, want: torch.Tensor | None) -> bool:
    if got is None or want is None:
        return got is None and want is None
    return torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max().clamp_min(1.0)))


def check_grouped_sink_swiglu(gen: torch.Generator) -> None:
    for name, offsets, k, d, n_rows, with_perm, with_base in sink_cases():
        inputs = sink_inputs(gen, offsets, k, d, n_rows, with_perm, with_base)
        got, want = run_sinks("triton", inputs), run_sinks("torch", inputs)
        for what, a, b in zip(("output", "grad x", "grad table", "grad base"), got, want):
            check(f"grouped_sink_swiglu {name}: {what}", close(a, b))
        check(f"grouped_sink_swiglu {name}: a disabled sink's row gets exactly zero gradient",
              torch.count_nonzero(got[2][n_rows - 1]) == 0)
        again = run_sinks("triton", inputs)
        check(f"grouped_sink_swiglu {name}: bit-identical on a second run",
              all(a is None and b is None or torch.equal(a, b) for a, b in zip(got, again)))

    inputs = sink_inputs(gen, [0, 5, 6, 18], 6, 40, 10, True, False)
    main_grads = []
    for impl in ("triton", "torch"):
        main_grad = torch.zeros(10, 3, 40)
        main_grad[3] = 1.0  # earlier micro-batches' sums stay and are added to
        for _ in range(2):
            run_sinks(impl, inputs, grad_table_into=main_grad, need_x=False)
        main_grads.append(main_grad)
    check("grouped_sink_swiglu grad_table_into (fp32 main_grad, twice, table only)", close(*main_grads))


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    for name, dest, d in destination_cases(gen):
        got = destination_permutation(dest, d, impl="triton")
        want = destination_permutation_reference(dest, d)
        check(f"destination_permutation {name}", all(torch.equal(a, b) for a, b in zip(got, want)))

    for n, h, dtype in [(1, 1, torch.float32), (37, 130, torch.float32), (64, 257, torch.bfloat16), (0, 8, torch.float32)]:
        x = torch.randn(n, h, generator=gen).to(dtype).requires_grad_(True)
        base = torch.randn(n, h, generator=gen).to(dtype).requires_grad_(True)
        perm = torch.randperm(n, generator=gen)
        grad = torch.randn(n, h, generator=gen).to(dtype)
        x_ref, base_ref = x.detach().clone().requires_grad_(True), base.detach().clone().requires_grad_(True)
        y, y_ref = permute_rows(x, perm, impl="triton"), permute_rows_reference(x_ref, perm)
        check(f"permute_rows n={n} h={h} {dtype}", torch.equal(y, y_ref))
        out, out_ref = unpermute_rows(y, perm, base, impl="triton"), unpermute_rows_reference(y_ref, perm, base_ref)
        # The add is math: exact in fp32; in bf16 within one unit in the last place (the interpreter
        # rounds fp32 -> bf16 toward zero, torch and Triton on GPUs to nearest).
        same = torch.equal(out, out_ref) if dtype == torch.float32 else torch.allclose(out, out_ref, rtol=2**-7, atol=0)
        check(f"unpermute_rows + base n={n} h={h} {dtype}", same)
        back = unpermute_rows(permute_rows(x, perm, impl="triton"), perm, impl="triton")
        check(f"unpermute(permute(x)) == x n={n} h={h}", torch.equal(back, x))
        if n:
            (out * grad).sum().backward()
            (out_ref * grad).sum().backward()
            check(f"gradients n={n} h={h} {dtype}", torch.equal(x.grad, x_ref.grad) and torch.equal(base.grad, base_ref.grad))

    # A gather of some rows (repeats allowed, none at all) into a slice of a larger buffer, as the
    # dispatch writes the tokens a rank keeps straight into place.
    x = torch.randn(29, 70, generator=gen)
    for index in (torch.randint(0, 29, (11,), generator=gen), torch.zeros(0, dtype=torch.int64)):
        buffer = torch.full((index.numel() + 5, 70), -1.0)
        gather(x, index, impl="triton", out=buffer[:index.numel()])
        check(f"gather {index.numel()} of 29 rows into a slice", torch.equal(buffer[:index.numel()], x[index])
              and bool((buffer[index.numel():] == -1).all()))
        check(f"gather {index.numel()} of 29 rows", torch.equal(gather(x, index, impl="triton"), x[index]))

    check_grouped_sink_swiglu(gen)
    print("all kernel checks passed")


if __name__ == "__main__":
    main()
