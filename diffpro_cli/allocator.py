"""glibc malloc settings for steady CPU latency, and the explicit trim that checkpoint loading uses.

By default glibc hands freed memory back to the OS: blocks above a (moving) size threshold are
mmap'd and unmapped on every free, and the top of the heap is trimmed once 128 KiB are free. A
denoising step allocates and frees the same activation-sized tensors (0.1–2 MB) thousands of times,
so every step faults those pages in again. Measured on a 2-vCPU AMD EPYC VM (session 10,
docs/results.md): the built-in DiT's int8 plan ran a batch-8 forward in 14–18 ms with glibc's
defaults and 10.4–10.8 ms with freed memory kept, fp32 in 22–31 vs 21–22 ms, bf16 unchanged (11 ms);
and the default's timings wandered from run to run with the process's heap history. That is the
allocator, not the kernels, so diffpro keeps freed memory for the process (PyTorch's own CPU
performance guide recommends jemalloc/tcmalloc for the same reason; this needs no preload).

`steady_allocator()` is called by every stage (StageContext) and by `diffpro.load`, once per process;
every row of a bench runs in that same process, so baselines get it too. `DIFFPRO_MALLOC=default`
leaves glibc's defaults alone. The cost table's fingerprint records which is in force.
"""

from __future__ import annotations

import functools
import os
import platform

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3       # glibc's mallopt parameter numbers
SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20),    # blocks below 32 MiB come from the heap (glibc's maximum)
            (M_TRIM_THRESHOLD, 1 << 30),     # keep up to 1 GiB of free heap instead of returning it
            (M_TOP_PAD, 64 << 20))           # grow the heap in 64 MiB steps
STEADY = "glibc: freed memory kept (mmap threshold 32 MiB, trim threshold 1 GiB)"

_applied: list[str] = []


@functools.lru_cache(maxsize=1)
def _libc():
    """glibc through ctypes, or None (another C library, or not Linux)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def steady_allocator() -> str:
    """Keep freed memory in the process (module docstring), once; returns what is in force."""
    if _applied:
        return _applied[0]
    libc = _libc()
    if os.environ.get("DIFFPRO_MALLOC", "").strip().lower() == "default":
        label = "default (DIFFPRO_MALLOC=default)"
    elif libc is None or not hasattr(libc, "mallopt"):
        label = "default (not glibc)"
    elif all(libc.mallopt(param, value) == 1 for param, value in SETTINGS):
        label = STEADY
    else:
        label = "default (mallopt refused)"
    _applied.append(label)
    return label


def allocator_label() -> str:
    """What is in force now, without changing it."""
    return _applied[0] if _applied else "default"


def release_freed_memory() -> None:
    """Hand free heap pages back to the OS now (malloc_trim, regardless of the trim threshold): used
    between layers while a checkpoint unpacks, so its temporaries do not pile up."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
