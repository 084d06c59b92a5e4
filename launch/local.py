"""Run a function on N local processes joined by a gloo process group.

This is how tests and CPU demos exercise distributed code (tensor/pipeline
parallelism, data parallelism) on one machine without torchrun::

    # tests/test_x.py -- fn must be defined at module level
    def _body(rank, world_size, scale):
        t = torch.ones(1) * (rank + 1) * scale
        torch.distributed.all_reduce(t)
        return t.item()

    assert run_local(_body, 2, 10.0) == [30.0, 30.0]

Each child is started with the "spawn" method (a fresh interpreter: no forked
torch/gloo state), so ``fn``, its arguments and its return value travel by
pickle: ``fn`` must be importable by its module and name (a module-level
function, not a lambda, closure or nested function), and the return value must
be picklable.  A spawn costs several seconds (mostly imports), so put many
checks into one launch.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launch.env import find_free_port

# After one rank fails, the others usually fail within milliseconds (gloo peers
# see the connection close); wait this long for their reports, then kill them.
_FAILURE_GRACE_S = 3.0
_POLL_S = 0.02


class RankFailedError(RuntimeError):
    """A rank of :func:`run_local` raised or died.

    ``rank`` is the first rank seen failing, ``exc_type`` the name of its
    exception type and ``child_traceback`` its formatted traceback.  When the
    child's exception could be pickled it is chained as ``__cause__``.
    """

    def __init__(self, message: str, rank: int, exc_type: str, child_traceback: str):
        super().__init__(message)
        self.rank = rank
        self.exc_type = exc_type
        self.child_traceback = child_traceback


def _result_path(outdir: str, rank: int) -> str:
    return os.path.join(outdir, f"rank{rank}.pkl")


def _write_result(outdir: str, rank: int, payload: tuple) -> None:
    tmp = _result_path(outdir, rank) + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(payload, f)
    os.replace(tmp, _result_path(outdir, rank))  # the parent never sees half a file


def _error_payload(exc: BaseException) -> tuple:
    try:
        exc_bytes = pickle.dumps(exc)
        pickle.loads(exc_bytes)
    except Exception:
        exc_bytes = None
    return ("error", type(exc).__qualname__, str(exc), traceback.format_exc(), exc_bytes)


def _child(rank, world_size, port, fn, args, kwargs, outdir, num_threads, pg_timeout_s):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=pg_timeout_s),
        )
        result = fn(rank, world_size, *args, **kwargs)
        payload = ("ok", pickle.dumps(result))
    except BaseException as exc:  # reported to the parent, which re-raises
        payload = _error_payload(exc)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    _write_result(outdir, rank, payload)


def _check_importable(fn: Callable) -> None:
    qualname = getattr(fn, "__qualname__", "")
    if not callable(fn) or "<lambda>" in qualname or "<locals>" in qualname:
        raise TypeError(
            f"run_local needs a module-level function (spawned children import it "
            f"by name); got {fn!r}"
        )


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def run_local(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300,
    num_threads: Optional[int] = 1,
    **kwargs: Any,
) -> List[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` spawned
    processes joined by a gloo process group on 127.0.0.1; return the per-rank
    return values, in rank order.

    ``fn`` must be a module-level function (see the module docstring).  Each
    child calls ``torch.set_num_threads(num_threads)`` first (default 1: ranks
    share the machine's cores; ``None`` leaves torch's default).  The group is
    initialised before ``fn`` runs and destroyed after it returns.

    Raises :class:`RankFailedError` naming the rank and carrying the child's
    full traceback if any rank raises or dies, and :class:`TimeoutError` if
    the ranks have not all finished after ``timeout`` seconds; in both cases
    every child is killed first.
    """
    _check_importable(fn)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    outdir = tempfile.mkdtemp(prefix="run_local_")
    port = find_free_port()
    procs = []
    try:
        for rank in range(world_size):
            p = ctx.Process(
                target=_child,
                args=(rank, world_size, port, fn, args, kwargs, outdir, num_threads, timeout),
                name=f"run_local-rank{rank}",
            )
            p.start()
            procs.append(p)

        deadline = time.monotonic() + timeout
        payloads: dict = {}
        failed: List[int] = []  # in the order they were seen failing
        grace_end = None
        while len(payloads) < world_size:
            for rank, p in enumerate(procs):
                if rank in payloads:
                    continue
                path = _result_path(outdir, rank)
                exitcode = p.exitcode  # read before the file: a child writes, then exits
                if os.path.exists(path):
                    with open(path, "rb") as f:
                        payloads[rank] = pickle.load(f)
                    p.join(5)
                elif exitcode is not None:  # died without reporting (signal, os._exit)
                    payloads[rank] = (
                        "error", "ProcessDied",
                        f"exited with code {exitcode} without reporting a result", "", None,
                    )
                else:
                    continue
                if payloads[rank][0] == "error":
                    failed.append(rank)
            now = time.monotonic()
            if failed and grace_end is None:
                grace_end = now + _FAILURE_GRACE_S
            if grace_end is not None and now > grace_end:
                break
            if now > deadline:
                _stop(procs)
                pending = [r for r in range(world_size) if r not in payloads]
                raise TimeoutError(
                    f"run_local({getattr(fn, '__qualname__', fn)}, world_size={world_size}): "
                    f"rank(s) {pending} still running after {timeout:g} s; killed all ranks"
                )
            time.sleep(_POLL_S)

        if failed:
            _stop(procs)
            first = failed[0]
            _, exc_type, msg, tb, exc_bytes = payloads[first]
            others = "".join(
                f"\n\n--- rank {r} also failed: {payloads[r][1]}: {payloads[r][2]}"
                for r in failed[1:]
            )
            unfinished = [r for r in range(world_size) if r not in payloads]
            if unfinished:
                others += f"\n\n--- rank(s) {unfinished} killed after the failure"
            error = RankFailedError(
                f"rank {first} of {world_size} failed in "
                f"{getattr(fn, '__qualname__', fn)}: {exc_type}: {msg}\n\n"
                f"--- traceback of rank {first} ---\n{tb or '(none: the process died)'}{others}",
                rank=first,
                exc_type=exc_type,
                child_traceback=tb,
            )
            cause = pickle.loads(exc_bytes) if exc_bytes is not None else None
            raise error from cause
        return [pickle.loads(payloads[rank][1]) for rank in range(world_size)]
    finally:
        _stop(procs)
        shutil.rmtree(outdir, ignore_errors=True)
