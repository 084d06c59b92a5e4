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
from kernels.permute_rows import (permute_rows, permute_rows_reference, unpermute_rows,  # noqa: E402
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

    print("all kernel checks passed")


if __name__ == "__main__":
    main()
