"""The prepared GPU check (docs/gpu_check.md): what a task lent a GPU runs, in one process, in minutes.

1. Each engine (Megatron DDP with its distributed optimizer, DeepSpeed ZeRO-1) trains a small NULLs GPT for ``--steps`` steps on
   synthetic packed documents (bf16 on CUDA, fp32 on CPU), with a checkpoint halfway: tokens/s and
   MFU (FLOPs per token from benchmarks/scaling_estimate.py against the GPU's bf16 peak).
2. The same run stopped at the checkpoint and resumed gives bit-identical losses.
3. FlexAttention (compiled on CUDA) against SDPA on the same packed rows: forward outputs and
   input gradients (FlexAttention's backward runs only on CUDA: on CPU the forward alone).
4. The Triton kernels of kernels/ (destination permutation, row permute / un-permute with the
   combine add, the grouped sink SwiGLU forward and backward in fp32 and bf16, its gradients
   bit-identical across runs) against their torch references on the device (on CPU: the references
   themselves; tests/test_triton_kernels.py checks the kernels there in Triton's interpreter).
The last line: ``RESULT gpu_check=ok|failed device=... megatron_tokens_per_s=... mfu=...``.

    python benchmarks/gpu_check.py [--steps 50] [--quick]     # --quick: a CPU smoke of the script itself
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense FLOP/s


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def check_config(data: Path, run_dir: Path, engine: str, steps: int, quick: bool):
    from nulls_megatron.config import config_from_dict

    cuda = torch.cuda.is_available()
    d, layers, seq = (64, 2, 128) if quick else (512, 8, 1024)
    return config_from_dict({
        "model": {"vocab_size": 256, "hidden_size": d, "num_layers": layers, "num_attention_heads": 8,
                  "num_query_groups": 4, "ffn_hidden_size": 64 + 2048, "seq_length": seq},
        "nulls": {"n_backbone": 64, "n_pool": 2048, "sinks_per_source": 32},
        # Megatron: its distributed optimizer (the GPU default) also in the CPU run, so the test runs this path.
        "optimizer": {"warmup_steps": 2, "distributed": "on" if engine == "megatron" else "auto"},
        "train": {"data": str(data), "run_dir": str(run_dir), "steps": steps, "micro_batch_rows": 2 if quick else 8,
                  "global_batch_rows": 2 if quick else 8, "save_every": max(1, steps // 2), "engine": engine,
                  "precision": "bf16" if cuda else "fp32", "log_every": max(1, steps // 5)},
        "tracking": {"enabled": False},
    }, "gpu_check")


def train_engine(data: Path, work: Path, engine: str, steps: int, quick: bool) -> dict:
    import importlib.util

    from nulls_megatron.train.trainer import train

    # benchmarks/ is not a package (and its data_prep.py would shadow ours on sys.path): load by path.
    spec = importlib.util.spec_from_file_location("scaling_estimate", Path(__file__).with_name("scaling_estimate.py"))
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)
    flops_per_token = scaling.flops_per_token

    cfg = check_config(data, work / f"{engine}-full", engine, steps, quick)
    started = time.perf_counter()
    full = train(cfg)
    seconds = time.perf_counter() - started
    tokens = steps * cfg.train.global_batch_rows * cfg.model.seq_length
    split_cfg = check_config(data, work / f"{engine}-split", engine, steps, quick)
    first = train(split_cfg, stop_after=steps // 2)
    second = train(split_cfg)
    peak = peak_flops()
    tps = tokens / seconds  # includes the first steps' compilation and the checkpoint: a lower bound
    return {"losses_finite": all(x == x and abs(x) != float("inf") for x in full.losses),
            "resume_bit_exact": first.losses + second.losses == full.losses,
            "tokens_per_s": tps, "mfu": tps * flops_per_token(cfg)["train"] / peak if peak else None,
            "last_loss": full.losses[-1]}


def check_flex_attention() -> dict:
    from nulls_megatron.model.attention_mask import segment_ids
    from nulls_megatron.model.packed_attention import document_causal_block_mask, flex_attention_fn

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    b, h, s, hd = 4, 8, 512, 64
    doc = torch.repeat_interleave(torch.arange(4), torch.tensor([100, 200, 62, 150])).expand(b, s).to(device)
    grad = device.type == "cuda"  # FlexAttention refuses inputs that need grad on the CPU
    q, k, v = (torch.randn(b, h, s, hd, generator=gen).to(device).requires_grad_(grad) for _ in range(3))
    seg = segment_ids(doc)
    mask = ((seg.unsqueeze(2) == seg.unsqueeze(1)) & torch.ones(s, s, dtype=torch.bool, device=device).tril()).unsqueeze(1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = flex_attention_fn(device)(q, k, v, block_mask=document_causal_block_mask(doc))
    result = {"device": str(device), "forward_max_abs_diff": float((out - ref).abs().max())}
    if device.type == "cuda":
        grads_ref = torch.autograd.grad(ref.sum(), (q, k, v))
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        result["backward_max_abs_diff"] = max(float((a - r).abs().max()) for a, r in zip(grads, grads_ref))
    result["ok"] = all(v < 1e-3 for k_, v in result.items() if k_.endswith("diff"))
    return result


def check_triton_kernels() -> dict:
    """kernels/ as production code runs them on this device (Triton on CUDA) against the torch references."""
    from kernels.backend import use_triton
    from kernels.destination_permutation import destination_permutation, destination_permutation_reference
    from kernels.permute_rows import permute_rows, permute_rows_reference, unpermute_rows, unpermute_rows_reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    dest = torch.randint(0, 8, (65_536,), generator=gen).to(device)
    result: dict = {"impl": "triton" if use_triton(dest) else "torch reference"}
    got, want = destination_permutation(dest, 8), destination_permutation_reference(dest, 8)
    result["destination_permutation_exact"] = all(torch.equal(a, b) for a, b in zip(got, want))
    x = torch.randn(65_536, 1024, generator=gen).to(device, torch.bfloat16)
    base = torch.randn(65_536, 1024, generator=gen).to(device, torch.bfloat16)
    perm = got[2]
    result["permute_rows_exact"] = torch.equal(permute_rows(x, perm), permute_rows_reference(x, perm))
    diff = (unpermute_rows(x, perm, base).float() - unpermute_rows_reference(x, perm, base).float()).abs().max()
    result["unpermute_rows_max_abs_diff"] = float(diff)
    result["grouped_sink_swiglu"] = check_grouped_sink_swiglu(device)
    result["ok"] = (result["destination_permutation_exact"] and result["permute_rows_exact"] and float(diff) < 1e-2
                    and result["grouped_sink_swiglu"]["ok"])
    return result


def check_grouped_sink_swiglu(device: str) -> dict:
    """The grouped sink SwiGLU as production code runs it (impl="auto") against impl="torch": output and
    gradients of x, table and base, largest difference relative to the reference's largest value, over
    skewed group sizes, groups sharing rows and disabled sinks; then a second run bit-identical."""
    from kernels.destination_permutation import destination_permutation
    from kernels.grouped_sink_swiglu import grouped_sink_swiglu

    cuda = device == "cuda"
    n_tokens, d, n_groups, k, n_rows = (65_536, 1024, 64, 32, 4096) if cuda else (512, 64, 8, 8, 64)
    gen = torch.Generator().manual_seed(1)
    dest = (torch.rand(n_tokens, generator=gen) ** 3 * n_groups).long().to(device)  # a few groups hold most tokens
    counts, _, perm = destination_permutation(dest, n_groups)
    offsets = [0, *torch.cumsum(counts, 0).tolist()]
    row_ids = torch.stack([torch.randperm(n_rows, generator=gen)[:k] for _ in range(n_groups)]).to(device)
    gates = (torch.rand(n_groups, k, generator=gen) < 0.9).float().to(device)
    result: dict = {}
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        x = torch.randn(n_tokens, d, generator=gen).to(device, dtype)
        table = (torch.randn(n_rows, 3, d, generator=gen) * d ** -0.5).to(device, dtype)
        base = torch.randn(n_tokens, d, generator=gen).to(device, dtype)
        grad_y = torch.randn(n_tokens, d, generator=gen).to(device, dtype)

        def run(impl: str) -> list[torch.Tensor]:
            leaves = [t.clone().requires_grad_(True) for t in (x, table, base)]
            y = grouped_sink_swiglu(leaves[0], leaves[1], perm, offsets, row_ids, gates, base=leaves[2], counts=counts,
                                    impl=impl)
            y.backward(grad_y)
            return [y.detach()] + [t.grad for t in leaves]

        got, want = run("auto"), run("torch")
        name = str(dtype).removeprefix("torch.")
        rel = [float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)) for a, b in zip(got, want)]
        result[f"{name}_max_rel_diff"] = dict(zip(("y", "x", "table", "base"), rel))
        result[f"{name}_ok"] = max(rel) < tol
        result[f"{name}_bit_identical_rerun"] = all(torch.equal(a, b) for a, b in zip(got, run("auto")))
    result["ok"] = all(v for key, v in result.items() if key.endswith(("_ok", "_rerun")))
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="tiny model, few steps: checks the script itself on CPU")
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args()
    from nulls_megatron.train.smoke import write_synthetic_data

    report = {"torch": torch.__version__, "cuda": torch.version.cuda,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    print(json.dumps(report))
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        data = write_synthetic_data(work / "data", documents=40 if args.quick else 400)
        for engine in ("megatron", "deepspeed"):
            report[engine] = train_engine(data, work, engine, args.steps, args.quick)
            print(engine, json.dumps(report[engine]), flush=True)
    report["flex_attention"] = check_flex_attention()
    print("flex_attention", json.dumps(report["flex_attention"]))
    report["triton_kernels"] = check_triton_kernels()
    print("triton_kernels", json.dumps(report["triton_kernels"]))
    ok = report["flex_attention"]["ok"] and report["triton_kernels"]["ok"] and all(report[e]["losses_finite"] and report[e]["resume_bit_exact"]
                                               for e in ("megatron", "deepspeed"))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    mfu = report["megatron"]["mfu"]
    print(f"RESULT gpu_check={'ok' if ok else 'failed'} device={report['device'].replace(' ', '_')} "
          f"megatron_tokens_per_s={report['megatron']['tokens_per_s']:.0f} "
          f"deepspeed_tokens_per_s={report['deepspeed']['tokens_per_s']:.0f} mfu={mfu if mfu is None else round(mfu, 3)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
