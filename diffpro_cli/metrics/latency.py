"""Wall-clock latency with warm-up and repeats; medians, not means (these machines are shared)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from diffpro_cli.devices import is_cuda, synchronize


def _span(fn: Callable[[], object], device: str) -> float:
    """Seconds `fn` takes: CUDA events around it on a GPU (the queued work, synchronised), else wall clock
    (synchronised with any GPU work in flight, as before devices existed)."""
    if is_cuda(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    synchronize()
    t0 = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1, *,
                advance: Callable[[int], object] | None = None, ui=None, description: str = "timing",
                device: str = "cpu") -> dict[str, dict]:
    """Time several candidates round-robin so drifting machine load hits them all alike (CUDA events
    where `device` is a GPU).

    Progress: `advance(1)` is called after each round of repeats; or pass `ui` (a console.UI) to get a
    `description` progress over the `repeats` rounds (a plain line every 30 s when not a TTY)."""
    if advance is None and ui is not None:
        with ui.progress(description, total=repeats) as adv:
            return interleaved(fns, repeats, warmup, advance=adv, device=device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            samples[k].append(_span(fn, device))
        if advance is not None:
            advance(1)
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "repeats": repeats} for k, v in samples.items()}

def scale(stats: dict, factor: float) -> dict:
    """Divide a latency record by `factor` (e.g. per batch → per image)."""
    return {k: (v / factor if k != "repeats" else v) for k, v in stats.items()}
