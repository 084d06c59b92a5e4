"""Megatron-core on CPU: the compatibility layer (nulls_megatron.compat)
and the local launcher (launch.local), on 2 gloo processes.

A spawn costs ~8 s (imports), so the Megatron checks share ONE launch and the
launcher's error path one more.  Functions given to run_local live at module
level (spawned children import them by name) and import Megatron lazily, so
that the error-path children and the parent do not pay for it.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # children inherit sys.path from the parent
    sys.path.insert(0, ROOT)

from launch.env import compute_device, distributed_backend, find_free_port, first_slurm_host, read_dist_env  # noqa: E402
from launch.local import RankFailedError, run_local  # noqa: E402
from tests.nulls_gpt_helpers import gather_full  # noqa: E402

SEED = 1234
VOCAB, SEQ, BATCH = 128, 32, 2
ATOL = 1e-5


# ---------------------------------------------------------------- helpers (run in children)
def _config():
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    from nulls_megatron.compat import cpu_transformer_config_overrides

    return TransformerConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,  # grouped-query attention
        normalization="RMSNorm",
        gated_linear_unit=True,  # SwiGLU = GLU + silu
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        **cpu_transformer_config_overrides(),
    )


def _build_gpt(config=None):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return GPTModel(
        config=config or _config(),
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )


def _grad_norm(model) -> float:
    return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())))


def _dropout_recompute_checks(check):
    """(b) end to end: dropout at TP=2 (attention dropout runs inside the tracker's
    fork) is reproducible, and activation recompute (which saves and restores
    the RNG states) gives the same gradients as no recompute."""
    import dataclasses

    from nulls_megatron.compat import model_parallel_seed

    norms = []
    for recompute in (False, False, True):
        extra = dict(hidden_dropout=0.1, attention_dropout=0.1)
        if recompute:
            extra.update(recompute_granularity="full", recompute_method="uniform",
                         recompute_num_layers=1)
        model_parallel_seed(SEED)
        model = _build_gpt(dataclasses.replace(_config(), **extra))
        loss = _forward_backward(model)
        norms.append((loss.item(), _grad_norm(model)))
    check(norms[0] == norms[1], f"(b) dropout at TP=2 not reproducible: {norms[:2]}")
    check(all(abs(a - b) <= 1e-6 for a, b in zip(norms[0], norms[2])),
          f"(b) recompute with dropout changed loss/grad norm: {norms}")


def _forward_backward(model):
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)
    # attention_mask=None: the causal mask is built by Megatron (patched path).
    loss = model(ids, pos, None, labels=labels).mean()
    loss.backward()
    return loss.detach()


def _rng_checks(rank, tp_rank, check):
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron.core.tensor_parallel.random import get_data_parallel_rng_tracker_name

    from nulls_megatron.compat import model_parallel_seed

    tp_group = ps.get_tensor_model_parallel_group()

    def gather(t):
        out = [torch.empty_like(t) for _ in range(ps.get_tensor_model_parallel_world_size())]
        torch.distributed.all_gather(out, t, group=tp_group)
        return out

    ones = torch.ones(512)
    model_parallel_seed(SEED)
    tracker = get_cuda_rng_tracker()
    check(type(tracker).__name__ == "CpuRNGStatesTracker",
          f"(b) tracker is {type(tracker).__name__}, not the CPU tracker")
    default_draw = torch.rand(16)
    d = gather(default_draw)
    check(torch.equal(d[0], d[1]), "(b) default stream differs across TP ranks")

    before = torch.get_rng_state()
    with tracker.fork():
        mask1 = F.dropout(ones, 0.5)
    check(torch.equal(before, torch.get_rng_state()),
          "(b) fork() did not restore the default CPU generator state")
    with tracker.fork():
        mask2 = F.dropout(ones, 0.5)
    check(not torch.equal(mask1, mask2), "(b) model-parallel stream did not advance between forks")
    with tracker.fork(get_data_parallel_rng_tracker_name()):
        dp_mask = F.dropout(ones, 0.5)

    saved = torch.get_rng_state()
    torch.manual_seed(SEED + 2718 + tp_rank)  # Megatron's tensor-model-parallel seed
    expected = F.dropout(ones, 0.5)
    torch.set_rng_state(saved)
    check(torch.equal(mask1, expected),
          "(b) fork() stream is not the CPU generator seeded with seed + 2718 + tp_rank")

    m = gather(mask1)
    check(not torch.equal(m[0], m[1]), "(b) model-parallel dropout masks equal across TP ranks")
    dp = gather(dp_mask)
    check(torch.equal(dp[0], dp[1]), "(b) data-parallel-rng dropout masks differ across TP ranks")

    model_parallel_seed(SEED)
    with get_cuda_rng_tracker().fork():
        again = F.dropout(ones, 0.5)
    check(torch.equal(again, mask1), "(b) re-seeding did not reproduce the model-parallel stream")


def _megatron_tp_body(rank, world_size):
    """(a) TP=2 == TP=1, (b) RNG tracker, (c) idempotence; returns (failures, info)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron.core.tensor_parallel import random as mp_random

    from nulls_megatron import compat as cpu_compat

    failures = []

    def check(cond, msg):
        if not cond:
            failures.append(f"rank {rank}: {msg}")

    # (c) idempotence, part 1
    check(cpu_compat.apply_cpu_compat() is True, "(c) first apply_cpu_compat() did not return True")
    patched = (torch.cuda.current_device, mp_random.CudaRNGStatesTracker,
               mp_random._get_cuda_rng_state)
    check(cpu_compat.apply_cpu_compat() is True, "(c) second apply_cpu_compat() did not return True")
    check(patched == (torch.cuda.current_device, mp_random.CudaRNGStatesTracker,
                      mp_random._get_cuda_rng_state),
          "(c) second apply_cpu_compat() re-patched")
    check(torch.cuda.current_device() == "cpu", "(c) torch.cuda.current_device() is not 'cpu'")

    # TP=2
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    tp_rank = ps.get_tensor_model_parallel_rank()
    check(tp_rank == rank, f"(a) TP rank {tp_rank} != global rank")
    _rng_checks(rank, tp_rank, check)
    _dropout_recompute_checks(check)

    cpu_compat.model_parallel_seed(SEED)
    model = _build_gpt()
    loss_tp2 = _forward_backward(model)
    params = dict(model.named_parameters())
    w_tp2 = {n: gather_full(p, p.data) for n, p in params.items()}
    g_tp2 = {n: gather_full(p, p.grad) for n, p in params.items()}
    n_sharded = sum(bool(getattr(p, "tensor_model_parallel", False)) for p in params.values())
    check(n_sharded >= 10, f"(a) only {n_sharded} TP-sharded parameters at TP=2")

    # (c) idempotence, part 2: a late call must not reset the live tracker
    tracker = get_cuda_rng_tracker()
    states = {k: v.clone() for k, v in tracker.get_states().items()}
    cpu_compat.apply_cpu_compat()
    check(get_cuda_rng_tracker() is tracker, "(c) apply_cpu_compat() replaced the live RNG tracker")
    check(all(torch.equal(states[k], v) for k, v in get_cuda_rng_tracker().get_states().items()),
          "(c) apply_cpu_compat() changed the tracker's states")

    # TP=1: each rank is its own data-parallel replica, same seed
    del model
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    cpu_compat.model_parallel_seed(SEED)
    ref = _build_gpt()
    loss_tp1 = _forward_backward(ref)
    ref_params = dict(ref.named_parameters())

    check(set(ref_params) == set(params), "(a) parameter names differ between TP=1 and TP=2")
    max_grad_diff = 0.0
    for n, p in ref_params.items():
        if n not in w_tp2:
            continue
        check(w_tp2[n].shape == p.shape,
              f"(a) gathered TP=2 weight {n} has shape {tuple(w_tp2[n].shape)}, TP=1 {tuple(p.shape)}")
        if w_tp2[n].shape == p.shape:
            check(torch.equal(w_tp2[n], p.data),
                  f"(a) TP=2 weight shards of {n} are not the TP=1 weight")
            diff = (g_tp2[n] - p.grad).abs().max().item()
            max_grad_diff = max(max_grad_diff, diff)
            check(diff <= ATOL, f"(a) gradient of {n} differs: max |TP2 - TP1| = {diff:.3g}")
    check(abs(loss_tp2.item() - loss_tp1.item()) <= ATOL,
          f"(a) loss TP=2 {loss_tp2.item():.8f} != TP=1 {loss_tp1.item():.8f}")
    ps.destroy_model_parallel()
    info = {"loss_tp1": loss_tp1.item(), "loss_tp2": loss_tp2.item(),
            "max_grad_diff": max_grad_diff, "n_params": len(params)}
    return failures, info


def _raise_on_rank1(rank, world_size, message):
    if rank == 1:
        raise ValueError(message)
    return rank


# ---------------------------------------------------------------- tests
def test_megatron_gpt_tp2_matches_tp1_on_cpu():
    results = run_local(_megatron_tp_body, 2, timeout=240)
    failures = [f for rank_failures, _ in results for f in rank_failures]
    assert not failures, "\n".join(failures)
    print("TP=2 vs TP=1:", results[0][1])
    for _, info in results:
        assert info["loss_tp1"] == pytest.approx(results[0][1]["loss_tp1"], abs=ATOL), info


def test_run_local_reports_child_exception():
    with pytest.raises(RankFailedError) as excinfo:
        run_local(_raise_on_rank1, 2, "boom from the child", timeout=120)
    err = excinfo.value
    assert err.rank == 1, f"wrong failing rank reported: {err.rank}"
    assert err.exc_type == "ValueError", f"wrong exception type reported: {err.exc_type}"
    text = str(err)
    assert "rank 1" in text and "ValueError: boom from the child" in text, text
    assert "_raise_on_rank1" in err.child_traceback, "child traceback missing from the error"
    assert isinstance(err.__cause__, ValueError), "child exception not chained as __cause__"


def test_run_local_rejects_unimportable_fn():
    with pytest.raises(TypeError, match="module-level"):
        run_local(lambda rank, world_size: rank, 2)


def test_apply_cpu_compat_is_noop_with_cuda(monkeypatch):
    from nulls_megatron import compat as cpu_compat

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    current_device = torch.cuda.current_device
    assert cpu_compat.apply_cpu_compat() is False
    assert torch.cuda.current_device is current_device, "patched although CUDA is available"


def test_patches_were_checked_against_the_installed_versions():
    """Every patch in nulls_megatron/compat.py names the versions it was read against; an upgrade of
    any of them must re-read the list (and bump CHECKED_AGAINST) before it lands."""
    from importlib.metadata import version

    from nulls_megatron.compat import CHECKED_AGAINST

    installed = {name: version(name).split("+")[0] for name in CHECKED_AGAINST}
    assert installed == CHECKED_AGAINST


def test_building_a_model_is_what_silences_megatrons_unknown_mlp_notice():
    import logging

    from nulls_megatron.compat import _UNKNOWN_MLP_FILTER, quiet_unknown_mlp_notice

    layer_logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    layer_logger.removeFilter(_UNKNOWN_MLP_FILTER)
    import nulls_megatron.model.gpt  # noqa: F401  (importing the model installs nothing)
    assert _UNKNOWN_MLP_FILTER not in layer_logger.filters
    quiet_unknown_mlp_notice()
    quiet_unknown_mlp_notice()
    assert layer_logger.filters.count(_UNKNOWN_MLP_FILTER) == 1
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "Unknown MLP type: NullsMegatronMLP", None, None)
    assert not layer_logger.filter(record)


def test_env_detection(monkeypatch):
    assert distributed_backend() == ("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    # On a GPU node one group serves both: CUDA tensors through NCCL, the trainer's CPU scalars through gloo.
    assert distributed_backend(cuda=True) == "cpu:gloo,cuda:nccl" and distributed_backend(cuda=False) == "gloo"
    assert compute_device(cuda=False) == torch.device("cpu")
    from launch.env import _ephemeral_port_floor

    ports = {find_free_port() for _ in range(5)}
    assert all(1024 <= port < _ephemeral_port_floor() for port in ports), ports  # never one the OS hands out
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
             "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"}
    env = read_dist_env(slurm)
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (3, 8, 1, "gpu07")
    assert env.master_port == read_dist_env(dict(slurm, SLURM_PROCID="0")).master_port
    torchrun = dict(slurm, RANK="5", WORLD_SIZE="6", LOCAL_RANK="2",
                    MASTER_ADDR="10.0.0.1", MASTER_PORT="1234")
    env = read_dist_env(torchrun)
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (
        5, 6, 2, "10.0.0.1", 1234)
    assert read_dist_env({}).world_size == 1
    assert first_slurm_host("node1,node2") == "node1"
    assert first_slurm_host("a[3,5-6]") == "a3"
    assert first_slurm_host("node[1-2]-ib") == "node1-ib"
    assert first_slurm_host("rack[1-2]-n[01-02],other") == "rack1-n01"
    with pytest.raises(ValueError, match="cannot parse"):
        first_slurm_host("node[1-2")


def test_megatron_core_imports_without_dynamo_and_its_deferred_fusions_still_compile():
    """`import nulls_megatron` defers megatron-core's torch.compile decorations (compat.deferred_torch_compile):
    a fresh process imports it without TorchDynamo and Inductor, with the package's own loader in place,
    and a deferred fusion compiles at its first call and computes what the eager function does."""
    import subprocess

    probe = (
        "import sys, torch, nulls_megatron, megatron.core\n"
        "import megatron.core.jit as jit\n"
        "from nulls_megatron.megatron_import import _FINDER\n"
        "print('dynamo' if 'torch._dynamo' in sys.modules else 'no-dynamo',\n"
        "      'inductor' if 'torch._inductor' in sys.modules else 'no-inductor',\n"
        "      'deferred' if jit.jit_fuser is not torch.compile else 'eager-compile',\n"
        "      type(megatron.core.__loader__).__name__, type(megatron.core.__spec__.loader).__name__,\n"
        "      'finder-gone' if _FINDER not in sys.meta_path else 'finder-left')\n"
    )
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", probe], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["no-dynamo", "no-inductor", "deferred", "SourceFileLoader", "SourceFileLoader",
                                  "finder-gone"], out.stdout

    from nulls_megatron.compat import deferred_torch_compile

    def gated(y):
        a, b = y.chunk(2, dim=-1)
        return torch.nn.functional.silu(a) * b

    real = torch.compile
    with deferred_torch_compile():
        assert torch.compile is not real
        deferred = torch.compile(gated, backend="eager")
        factory_form = torch.compile(backend="eager")(gated)
        module = torch.compile(torch.nn.Linear(2, 2), backend="eager")
    assert torch.compile is real, "torch.compile restored on leaving"
    assert deferred.__name__ == "gated" and isinstance(module, torch.nn.Module)
    y = torch.randn(3, 8)
    torch.testing.assert_close(deferred(y), gated(y), rtol=0, atol=0)
    torch.testing.assert_close(factory_form(y), gated(y), rtol=0, atol=0)
    from torch._dynamo.utils import counters

    assert counters["frames"]["ok"] >= 1, "the deferred function went through TorchDynamo"


def test_the_import_finder_steps_aside_once_megatron_core_is_imported():
    import megatron.core  # noqa: F401

    from nulls_megatron import megatron_import

    megatron_import.install()
    assert megatron_import._FINDER not in sys.meta_path, "nothing to defer once megatron-core is imported"
