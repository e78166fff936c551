"""The machine a latency was measured on: its fingerprint (CPU model and the ISA the kernels use, or the
GPU; torch; threads; the allocator), and whether it runs bf16 math in hardware. The cost table is stamped
with it, and allocate refuses a table from another machine unless it is passed explicitly."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

from diffpro_cli.console import QUIET_UI, UI
from diffpro_cli.errors import InputError

ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile", "avx512_bf16", "amx_bf16")
FINGERPRINT_VERSION = 3   # 2: bf16 flags in isa_flags; 3: the allocator setting (allocator.py) is recorded
BF16_FLAGS = ("avx512_bf16", "amx_bf16")          # bf16 dot products in hardware (oneDNN uses them for bf16 GEMMs)
# oneDNN ISA caps below its bf16 levels: bf16 is then emulated (slower than fp32), so not a candidate
_ONEDNN_CAPS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def _cpu_name_and_flags() -> tuple[str, set[str]]:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return name, flags


def machine_fingerprint(device: str = "cpu") -> dict:
    """What a latency depends on besides the model: CPU model, the ISA the kernels use, torch, threads;
    on a GPU its name, compute capability and CUDA version instead of the CPU's kernels."""
    import torch

    from diffpro_cli.allocator import allocator_label
    from diffpro_cli.quant.kernels import cpu_has_vnni, isa_cap_without_vnni

    if str(device).startswith("cuda"):
        dev = torch.device(device)
        return {"device": "cuda", "gpu": torch.cuda.get_device_name(dev),
                "capability": list(torch.cuda.get_device_capability(dev)), "cuda": torch.version.cuda,
                "torch": torch.__version__, "version": FINGERPRINT_VERSION}
    name, flags = _cpu_name_and_flags()
    return {"device": device, "cpu": name, "isa_flags": sorted(f for f in ISA_FLAGS if f in flags),
            "kernel_vnni": bool(cpu_has_vnni()), "isa_cap": isa_cap_without_vnni(),
            "torch": torch.__version__, "threads": int(torch.get_num_threads()), "allocator": allocator_label(),
            "version": FINGERPRINT_VERSION}


def isa_cap_without_bf16() -> str | None:
    """The environment variable (as "NAME=value") that caps oneDNN's ISA below native bf16, if any."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        if os.environ.get(name, "").strip().upper() in _ONEDNN_CAPS_WITHOUT_BF16:
            return f"{name}={os.environ[name].strip()}"
    return None


def bf16_support(device: str = "cpu") -> tuple[bool, str]:
    """(whether bf16 math runs in hardware on `device`, why): CUDA with bf16 support, or a CPU with
    AVX512_BF16 / AMX-BF16 that no oneDNN ISA cap keeps from using them. Elsewhere bf16 is emulated
    (slower than fp32): the cost table does not time it and bench's default rows leave it out."""
    import torch

    if str(device).startswith("cuda"):
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ok, "CUDA bf16 supported" if ok else "CUDA without bf16 support"
    cap = isa_cap_without_bf16()
    if cap is not None:
        return False, f"{cap} caps oneDNN below bf16 (emulated)"
    have = [f for f in BF16_FLAGS if f in _cpu_name_and_flags()[1]]
    return (True, f"CPU flags {', '.join(have)}") if have else (False, "no avx512_bf16/amx_bf16 CPU flag (emulated)")


def native_bf16(device: str = "cpu") -> bool:
    return bf16_support(device)[0]


def fingerprint_id(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def describe_fingerprint(fp: dict) -> str:
    if fp.get("device") == "cuda":
        return f"{fp.get('gpu')} (sm {'.'.join(map(str, fp.get('capability') or []))}, CUDA {fp.get('cuda')}), torch {fp.get('torch')}"
    return (f"{fp.get('cpu')} [{','.join(fp.get('isa_flags') or []) or 'no AVX2'}"
            f"{', VNNI kernels' if fp.get('kernel_vnni') else ', no VNNI kernels'}], torch {fp.get('torch')}, "
            f"{fp.get('threads')} threads")


def check_fingerprint(doc: dict, path: Path, explicit: bool, ui: UI = QUIET_UI, device: str = "cpu") -> None:
    """Refuse a table measured on another machine (or device) unless the user passed it explicitly."""
    here = machine_fingerprint(device)
    there = doc.get("fingerprint") or {}
    if fingerprint_id(there) == fingerprint_id(here):
        return
    what = f"{path} was measured on {describe_fingerprint(there)}; this is {describe_fingerprint(here)}"
    if describe_fingerprint(there) == describe_fingerprint(here):   # say what differs, not the same words twice
        diffs = [f"{k} {there.get(k)!r} there, {here.get(k)!r} here" for k in sorted(set(there) | set(here)) if there.get(k) != here.get(k)]
        what = f"{path} was measured on this kind of machine ({describe_fingerprint(here)}) but with {'; '.join(diffs)}"
    if explicit:
        ui.warn(f"{what}: planning with it as given (--cost-table)")
        return
    raise InputError(f"{what}; delete it (or pass --force) to re-measure here, or pass it as --cost-table to plan for that machine")
