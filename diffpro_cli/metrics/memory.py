"""Peak memory of a piece of work.

CUDA: torch's allocator high-water mark. CPU: the process's resident set size sampled every few
milliseconds by a thread while the work runs, minus the RSS just before it (so the number is the
memory the work added: model weights loaded inside it plus activations). Linux only (/proc).
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return None


@contextmanager
def peak_memory(device: str = "cpu", interval_s: float = 0.005):
    """Yields a dict filled on exit with {"peak_bytes": int | None, "method": str}."""
    result = {"peak_bytes": None, "method": None}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result.update(peak_bytes=torch.cuda.max_memory_allocated() - base, method="cuda max_memory_allocated")
        return
    base = rss_bytes()
    if base is None:
        yield result
        result["method"] = "unavailable (no /proc)"
        return
    peak = [base]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes() or 0)
            stop.wait(interval_s)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], rss_bytes() or 0)
        result.update(peak_bytes=max(0, peak[0] - base), method="rss high-water minus rss before (sampled 5 ms)")
