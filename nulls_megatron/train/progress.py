"""The progress line a training run prints: step, loss, throughput, elapsed time and ETA."""
from __future__ import annotations

import math


def format_progress(step: int, total_steps: int, loss: float, tokens_per_s: float, elapsed_s: float,
                    start_step: int = 0) -> str:
    """``step 120/1000 (12.0%) | loss 3.4521 | 45.2k tok/s | elapsed 1m05s | ETA 7m57s``.

    ``elapsed_s`` is the time since this process started at ``start_step`` (after a resume, the
    ETA extrapolates from the steps run since then)."""
    pct = 100.0 * step / total_steps if total_steps > 0 else 0.0
    if step > start_step and total_steps > 0:
        eta = _duration(max(total_steps - step, 0) * elapsed_s / (step - start_step))
    else:
        eta = "?"
    return (f"step {step}/{total_steps} ({pct:.1f}%) | loss {loss:.4f} | {_si(tokens_per_s)} tok/s | "
            f"elapsed {_duration(elapsed_s)} | ETA {eta}")


def _si(x: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.1f}{suffix}"
    return f"{x:.0f}" if math.isfinite(x) else str(x)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h:02d}h{m:02d}m"
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
