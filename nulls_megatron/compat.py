"""Every patch of Megatron-core, torch or DeepSpeed behaviour, in one place, each applied explicitly.

What is patched, why, and where it is applied; every entry was checked against the versions in
``CHECKED_AGAINST`` (``tests/test_megatron_cpu.py`` fails when the installed ones differ, so that an
upgrade re-reads this list):

| patch | why | applied by |
|---|---|---|
| ``apply_cpu_compat()``: ``torch.cuda.current_device``, the RNG tracker, the recompute RNG state, the default causal masks, ``torch.cuda.synchronize`` | Megatron-core assumes CUDA in a dozen places; CPU only, no-op with CUDA | model building and seeding |
| ``pipeline_schedule_compat()``: ``device="cuda"`` factory calls and ``Tensor.cuda()`` mapped to the CPU | the pipeline schedules and a stage-split tied embedding allocate on CUDA; CPU only, for one call | schedules, optimizer, model building |
| ``distributed_optimizer_compat()``: the above, and ``Tensor.type()`` naming CPU float tensors as their CUDA types | Megatron's distributed optimizer and its gradient clipping accept parameters only by CUDA type name (``'torch.cuda.FloatTensor'``); CPU only, for one call | the distributed optimizer's construction and step |
| ``dist_checkpoint_reader(factory)``: Megatron's torch_dist load strategy reads through our reader | the strategy builds its reader with a module function and takes none as an argument; ours refuses pickled objects | backbone loads |
| ``in_process_write_queue()``: the writers' results queue, and writers that die with their trainer | a ``multiprocessing`` Manager per save costs ~8 s on 2 cores; a SIGKILLed trainer left its forked writers running | backbone saves |
| ``quiet_torch_dcp_deprecations()`` | torch 2.13 deprecates the DCP API megatron-core 0.16 loads through, three FutureWarnings a rank per load | backbone loads |
| ``quiet_unknown_mlp_notice()`` | Megatron logs "Unknown MLP type" for every layer whose MLP is not its own: expected for the NULLs MLP | model building |
| ``deferred_torch_compile()``: ``torch.compile`` of a function compiles at its first call, not when it is decorated | megatron-core decorates its fusions with ``torch.compile`` at import, which imports TorchDynamo and Inductor: ~2 s of a process's start on 2 cores (Inductor's ~1 s of it in a training process), for fusions the CPU configuration never calls; CPU only | the import of megatron-core (``nulls_megatron.megatron_import``, installed by ``import nulls_megatron``) |
| ``skip_deepspeed_shm_build()`` | DeepSpeed's CPU comm backend JIT-compiles a shared-memory all-reduce (174 s on 2 cores) used only for inference | the DeepSpeed engine, CPU only |

``cpu_transformer_config_overrides()`` gives the ``TransformerConfig`` kwargs CPU needs, and
``model_parallel_seed(seed)`` is the CPU counterpart of ``tensor_parallel.model_parallel_cuda_manual_seed``.
docs/megatron_cpu.md explains the CPU patches and what stays unsupported.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import os
import queue
import signal
import sys
import threading
import warnings
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

CHECKED_AGAINST = {"megatron-core": "0.16.1", "torch": "2.13.0", "deepspeed": "0.19.8"}

_APPLIED = False


def cpu_transformer_config_overrides() -> dict:
    """``TransformerConfig`` kwargs for a CPU-only run (all fused/CUDA paths off).

    Every key exists in megatron-core 0.16.1's ``TransformerConfig`` or
    ``ModelParallelConfig``; use with the layer spec from
    ``get_gpt_layer_local_spec()`` (the Transformer Engine spec needs TE).
    """
    return dict(
        # Build the full master weight on CPU and give each TP rank its slice:
        # same weights at every TP size (the "GPU" path would init each shard
        # under the per-rank model-parallel RNG stream instead).
        use_cpu_initialization=True,
        # Fused kernels: Apex/TE/CUDA extensions, none of which exist on CPU.
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        memory_efficient_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        use_fused_weighted_squared_relu=False,
        fused_single_qkv_rope=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        moe_grouped_gemm=False,
        cross_entropy_loss_fusion=False,
        # Transformer Engine / CUDA-only features.
        use_te_rng_tracker=False,
        use_te_activation_func=False,
        tp_comm_overlap=False,
        enable_cuda_graph=False,
        cuda_graph_impl="none",
        # Sequence parallelism needs TE's LayerNorm / CUDA buffers.
        sequence_parallel=False,
    )


def _cpu_rng_tracker_class():
    """A ``CudaRNGStatesTracker`` whose named states are CPU generator states.

    Kept a subclass so that Megatron's ``isinstance(..., CudaRNGStatesTracker)``
    checks still hold.  Without it, ``add`` (called by
    ``model_parallel_cuda_manual_seed``) fails with
    ``AssertionError: Torch not compiled with CUDA enabled`` on
    ``torch.cuda.get_rng_state()``, and ``fork`` (used for dropout inside
    tensor-parallel regions) fails the same way in ``_get_cuda_rng_state``.
    """
    from megatron.core.tensor_parallel import random as mp_random

    class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
        """RNG tracker keeping CPU ``torch.Generator`` states."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.states_[name] = torch.Generator(device="cpu").manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            # Same protocol as the CUDA tracker, on the default CPU generator:
            # swap the named state in, run, store it back, restore the caller's.
            # (The CUDA version also warns when the CPU state changes inside the
            # fork; here that is the point, so there is no such check.)
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig_state = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                if self._current_state_name != name:
                    raise Exception(
                        f"current state name {self._current_state_name} is not the same as "
                        f"the desired state name {name}."
                    )
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    return CpuRNGStatesTracker


def _cpu_current_device() -> str:
    return "cpu"


def apply_cpu_compat() -> bool:
    """Patch Megatron-core for a CPU-only torch; no-op (False) when CUDA exists.

    Returns True when the patches are in place (also on repeated calls).
    Call it before building models or seeding; it is cheap to call again.
    """
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True

    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer import utils as transformer_utils

    # 1. torch.cuda.current_device() -> "cpu".  Megatron passes it as `device=`
    #    in rotary embeddings (rotary_pos_embedding.py:162, `inv_freq.to(...)`),
    #    attention, gather/split buffers (tensor_parallel/mappings.py, utils.py)
    #    and ColumnParallelLinear; on a CPU torch each raises
    #    `AssertionError: Torch not compiled with CUDA enabled`.  Megatron calls
    #    it as `torch.cuda.current_device()` from a dozen modules, so the
    #    attribute on torch.cuda is the one place to change.  Safe: with CUDA
    #    absent nothing else can use a CUDA device index.
    torch.cuda.current_device = _cpu_current_device

    # 2. RNG tracker on CPU generator states.  Megatron creates its tracker in
    #    initialize_rng_tracker() from the module global `CudaRNGStatesTracker`,
    #    so rebinding that global is the narrowest point: every tracker created
    #    afterwards (get_cuda_rng_tracker, model_parallel_cuda_manual_seed) is a
    #    CPU one, and no other code changes.  A CUDA tracker created earlier is
    #    dropped (it could not have held any state: `add` fails without CUDA).
    mp_random.CudaRNGStatesTracker = _cpu_rng_tracker_class()
    if mp_random._CUDA_RNG_STATE_TRACKER is not None and not isinstance(
        mp_random._CUDA_RNG_STATE_TRACKER, mp_random.CudaRNGStatesTracker
    ):
        mp_random.initialize_rng_tracker(force_reset=True)

    # 3. The "CUDA" RNG state saved/restored around activation recompute
    #    (CheckpointFunction via _get_all_rng_states/_set_all_rng_states) is the
    #    CPU generator's.  Without this, recompute_granularity="full" fails with
    #    `AssertionError: Torch not compiled with CUDA enabled` in
    #    torch.cuda.random.get_rng_state.  (The CPU tracker above does not use
    #    these two functions.)
    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    # 4. The causal mask built when no attention_mask is passed
    #    (FusedScaleMaskSoftmax.forward_torch_softmax, the unfused path) is
    #    allocated with device="cuda" (transformer/utils.py:35): `AssertionError:
    #    Torch not compiled with CUDA enabled`.  fused_softmax imported the
    #    functions by name, so patch them there (and in transformer.utils for
    #    other callers).  Passing an explicit attention_mask avoids this path.
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    def get_sliding_window_causal_mask(sq, skv, window_size):
        m = torch.ones(sq, skv, dtype=torch.bool)
        mu = torch.triu(m, diagonal=skv - sq - window_size[0])
        return ~torch.tril(mu, diagonal=skv - sq + window_size[1])

    for module in (fused_softmax, transformer_utils):
        module.get_default_causal_mask = get_default_causal_mask
        module.get_sliding_window_causal_mask = get_sliding_window_causal_mask

    # 5. Pipeline p2p (p2p_communication.py, batch_p2p_sync=True) calls
    #    torch.cuda.synchronize() after every batched send/recv: `AssertionError:
    #    Torch not compiled with CUDA enabled`. gloo's waits are already
    #    synchronous on CPU, so there is nothing to synchronise.
    torch.cuda.synchronize = lambda *a, **k: None

    _APPLIED = True
    logger.info("Megatron-core CPU compatibility patches applied")
    return True


class _CudaDeviceToCpu(TorchFunctionMode):
    """Turn ``device="cuda"`` in factory calls into the CPU, and ``Tensor.cuda()`` into a no-op
    (used around pipeline schedules, the optimizer, and building a model whose tied embedding
    is split over pipeline stages: language_module.py syncs it with ``weight.data.cuda()``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cuda:
            return args[0]
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


_CUDA_TYPE_NAMES = {"torch.FloatTensor": "torch.cuda.FloatTensor", "torch.HalfTensor": "torch.cuda.HalfTensor",
                    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor"}


class _CpuTensorsNamedAsCuda(_CudaDeviceToCpu):
    """``_CudaDeviceToCpu``, and ``tensor.type()`` (no argument: the name query, not a cast) answering
    a CPU float tensor's CUDA type name. distrib_optimizer.py sorts parameters into fp32 and bf16 by
    ``param.type() == 'torch.cuda.FloatTensor'`` and raises for anything else, and clip_grads.py
    asserts the same of every gradient; nothing else differs for a CPU tensor."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        return super().__torch_function__(func, types, args, kwargs)


@contextlib.contextmanager
def distributed_optimizer_compat():
    """Context for building and stepping Megatron's distributed optimizer on CPU (a no-op with CUDA):
    its type-name checks see CUDA names, and its ``device="cuda"`` allocations land on the CPU. With
    gloo (torch >= 2.13 has reduce-scatter and all-gather into a tensor) it then runs as on GPUs."""
    if not apply_cpu_compat():
        yield
        return
    with _CpuTensorsNamedAsCuda():
        yield


@contextlib.contextmanager
def pipeline_schedule_compat():
    """Context for Megatron's forward-backward schedules on CPU (a no-op with CUDA).

    The schedules allocate their token counter with ``device="cuda"``
    (schedules.py: ``torch.zeros([], dtype=torch.int, device="cuda")``), which
    fails without CUDA. A torch-function mode maps such calls to the CPU for the
    duration of the schedule only, so nothing else pays for it.
    """
    if not apply_cpu_compat():
        yield
        return
    with _CudaDeviceToCpu():
        yield


def model_parallel_seed(seed: int) -> None:
    """Seed the default and the model-parallel RNG streams (CPU or GPU).

    On CPU this is ``model_parallel_cuda_manual_seed`` with CPU generators: the
    default generator gets ``seed`` (same on every TP rank: weight init with
    ``use_cpu_initialization``, dropout outside TP regions), and the tracker
    gets the streams Megatron defines -- ``model-parallel-rng`` =
    ``seed + 2718 + tp_rank`` (dropout inside TP regions: differs per TP rank),
    ``data-parallel-rng`` = ``seed`` and ``expert-parallel-rng``.
    Call after ``parallel_state.initialize_model_parallel``.
    """
    from megatron.core.tensor_parallel import random as mp_random

    apply_cpu_compat()
    # Megatron seeds the default stream with torch.cuda.manual_seed, a silent
    # no-op without CUDA; on CPU the default stream is the CPU generator.  (On
    # GPU this also seeds the CPU generator, used by use_cpu_initialization.)
    torch.manual_seed(seed)
    mp_random.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


# ---------------------------------------------------------------------------------------------
# dist_checkpointing: the backbone's save and load

_swap_lock = threading.Lock()  # the swaps below rebind module globals: one save or load at a time


@contextlib.contextmanager
def dist_checkpoint_reader(make_reader: Callable[[str], Any]) -> Iterator[None]:
    """Megatron's torch_dist load strategy reads through ``make_reader(checkpoint_dir)`` for the duration.

    The strategy builds its reader with the module function ``_get_filesystem_reader`` and offers no
    argument for another, so that function is swapped (megatron/core/dist_checkpointing/strategies/torch.py)."""
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch_strategy

    original = mcore_torch_strategy._get_filesystem_reader
    with _swap_lock:
        mcore_torch_strategy._get_filesystem_reader = lambda checkpoint_dir, cache_metadata=False: make_reader(checkpoint_dir)
        try:
            yield
        finally:
            mcore_torch_strategy._get_filesystem_reader = original


@contextlib.contextmanager
def quiet_torch_dcp_deprecations() -> Iterator[None]:
    """torch 2.13 deprecates the ShardedTensor / load_state_dict API that megatron-core 0.16 loads
    through, and says so on every load (three FutureWarnings a rank); nothing for a user to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*(DTensor|load_state_dict. is deprecated).*")
        yield


@contextlib.contextmanager
def in_process_write_queue() -> Iterator[None]:
    """Collect the writers' results in a plain queue during a synchronous save, from writers that
    die with their parent.

    Megatron's torch_dist writer reports through a queue made by
    ``filesystem_async._get_write_results_queue``: a ``multiprocessing`` Manager (a spawned server
    process, ~8 s on this 2-core machine for each new process, since spawn re-imports the main
    module) so that async saves may run elsewhere. A synchronous save reads the queue in the process
    that wrote it, so a ``queue.Queue`` serves; it is swapped in for the duration of one save only.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    original = filesystem_async._get_write_results_queue
    writer = filesystem_async.FileSystemWriterAsync
    original_write = writer.__dict__["write_preloaded_data"]
    results: queue.Queue = queue.Queue()
    with _swap_lock:
        filesystem_async._get_write_results_queue = lambda: results
        writer.write_preloaded_data = staticmethod(_dies_with_parent(original_write.__func__))
        try:
            yield
        finally:
            filesystem_async._get_write_results_queue = original
            writer.write_preloaded_data = original_write


_PR_SET_PDEATHSIG = 1


def _dies_with_parent(write: Any) -> Any:
    """Megatron forks one writer process per bucket; a trainer SIGKILLed mid-save would leave them
    running (holding hundreds of MB, its ports and files) until their write ends, or forever when it
    blocks on the results queue. On Linux each writer asks the kernel to SIGKILL it when its parent
    dies (prctl PR_SET_PDEATHSIG), and exits at once if the parent is already gone."""
    parent = os.getpid()

    def write_then_report(*args: Any, **kwargs: Any) -> Any:
        if sys.platform.startswith("linux"):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # the parent died between fork and prctl
                os._exit(1)
        return write(*args, **kwargs)

    return write_then_report


# ---------------------------------------------------------------------------------------------
# Notices


class _DropUnknownMlpNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Unknown MLP type")


_UNKNOWN_MLP_FILTER = _DropUnknownMlpNotice()


def quiet_unknown_mlp_notice() -> None:
    """Megatron's TransformerLayer logs "Unknown MLP type" for every layer whose MLP is not one of its
    own; for the NULLs MLP that is expected (it takes the TP group from parallel_state itself).
    Idempotent (a logger holds a filter once)."""
    logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_UNKNOWN_MLP_FILTER)


def skip_deepspeed_shm_build() -> None:
    """DeepSpeed's torch comm backend JIT-compiles a C++ shared-memory all-reduce on the CPU accelerator
    when it is created (ninja + a compiler; measured 174 s on 2 cores, then cached in
    ~/.cache/torch_extensions). Only inference_all_reduce uses it; training collectives go through
    torch.distributed (gloo). Without it the backend keeps None, its documented "op not available"
    value. CPU only: a no-op with CUDA."""
    if torch.cuda.is_available():
        return
    comm_torch = importlib.import_module("deepspeed.comm.torch")
    comm_torch.build_shm_op = lambda: None


@contextlib.contextmanager
def deferred_torch_compile() -> Iterator[None]:
    """While active, ``torch.compile(fn)`` of a plain function returns a wrapper that compiles on its
    first call instead of at once. Megatron-core decorates its fusion functions with ``torch.compile``
    when its modules are imported; the call itself imports TorchDynamo and Inductor, ~2 s of a
    process's ~5 s import of megatron-core on 2 cores (TorchDynamo's ~0.8 s comes back in a process that
    builds a torch optimizer), for functions the CPU configuration never calls
    (``cpu_transformer_config_overrides`` turns the fusions off). ``torch.compile`` compiles lazily
    anyway, at the first call, so a deferred function behaves the same when it is called. Applied by
    ``nulls_megatron.megatron_import`` around the import of megatron-core, CPU only."""
    real = torch.compile

    def compile_on_first_call(model=None, **options):
        if model is None:  # the decorator-factory form, torch.compile(**options)(fn)
            return lambda fn: compile_on_first_call(fn, **options)
        if not inspect.isfunction(model):  # modules and other callables: as torch.compile would
            return real(model, **options)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = real(model, **options)
            return compiled(*args, **kwargs)

        return call

    torch.compile = compile_on_first_call
    try:
        yield
    finally:
        torch.compile = real
