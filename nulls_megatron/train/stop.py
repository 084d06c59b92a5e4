"""Stopping a run early and cleanly: a signal to any rank, or a ``STOP`` file in the run directory."""
from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

STOP_FILE = "STOP"  # <run_dir>/STOP: checkpoint after the current step and exit (SLURM's pre-timeout trap writes it)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """A request to checkpoint and exit early: SIGTERM/SIGUSR1 to any rank, or ``<run_dir>/STOP``.

    Checked once per step with one all-reduce, so every rank stops after the same step; a file
    works across nodes whatever the launcher does with signals (torchrun kills its workers
    30 s after forwarding SIGTERM, too soon for a large checkpoint).
    """

    def __init__(self, run_dir: Path) -> None:
        self.file = run_dir / STOP_FILE
        self.signal: int | None = None
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._received)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _received(self, signum: int, frame) -> None:
        self.signal = signum

    def clear_stale(self) -> None:
        """Remove a STOP file left by an earlier job's pre-timeout trap that then crashed before consuming
        it: obeying it would stop this submission after one step with exit 0 and no requeue. Rank 0."""
        if dist.get_rank() == 0 and self.file.exists():
            age = time.time() - self.file.stat().st_mtime
            self.file.unlink(missing_ok=True)
            print(f"removed a stale {self.file} (written {age / 60:.0f} min ago, before this run started)", flush=True)

    def agreed(self) -> bool:
        """True on every rank when any rank saw a request; ``reason`` then names it on every rank."""
        flags = torch.tensor([self.signal or 0, int(dist.get_rank() == 0 and self.file.exists())])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, file = (int(v) for v in flags)
        self.reason = signal.Signals(signum).name if signum else str(self.file) if file else None
        return self.reason is not None
