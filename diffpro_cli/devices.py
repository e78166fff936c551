"""Where a run computes: the CPU, or a CUDA GPU. One place that checks a `--device` value, puts a loaded
model there and answers device questions (synchronise, peak memory, name) for the stages.

CUDA status: every CUDA path below has run only in `make cuda-check` on a GPU machine, never in the CPU
test suite (docs/results.md says which GPU verified what); the CPU paths are the tested ones.
"""

from __future__ import annotations

import torch

from diffpro_cli.errors import UsageError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device` ("cpu", "cuda", "cuda:N") as a torch.device; one-line UsageError for anything else, or for
    CUDA on a machine without one."""
    if device is None or device == "":
        return torch.device("cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {device!r}: use cpu, cuda or cuda:N") from None
    if target.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device!r}: diffpro runs on cpu or cuda")
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device!r}: no CUDA device here (torch.cuda.is_available() is False); use --device cpu")
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                             f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return target


def device_text(device: str | torch.device | None) -> str:
    """The canonical spelling recorded in artifacts and lock configs ("cpu", "cuda", "cuda:1")."""
    return str(resolve_device(device))


def is_cuda(device: str | torch.device | None) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def net_device(net: torch.nn.Module) -> torch.device:
    """Where a network lives: its first parameter or buffer (the CPU for an empty one). Under accelerate's
    offload (weights on the meta device, moved in by hooks for each call) it is the hooks' execution device."""
    first = next(iter(net.parameters()), None)
    if first is None:
        first = next(iter(net.buffers()), None)
    if first is not None and first.device.type == "meta":
        return _offload_execution_device(net)
    return torch.device("cpu") if first is None else first.device


def _offload_execution_device(net: torch.nn.Module) -> torch.device:
    """The execution device of accelerate's AlignDevicesHook(s) on `net` (cpu_offload, disk_offload,
    device_map dispatch); the CPU where no hook names one."""
    for mod in net.modules():
        hook = getattr(mod, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):   # SequentialHook or one hook
            device = getattr(h, "execution_device", None)
            if device is not None:
                return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return torch.device("cpu")


def place(model, device: str | torch.device | None):
    """Move a loaded DiffusionModel's network to `device` (no-op on the CPU). Quantized layers re-prepare
    their kernel for the new device on their next call (quant/kernels_cuda.py on CUDA), which needs the
    stored integers: load the checkpoint with keep_integers=True (loading.load_model does for CUDA)."""
    target = resolve_device(device)
    if net_device(model.net) != target:
        model.net.to(target)
    return model


def synchronize(device: str | torch.device | None = None) -> None:
    """Wait for queued GPU work (a no-op on the CPU), so wall-clock spans cover the work they time."""
    if device is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    elif is_cuda(device):
        torch.cuda.synchronize(torch.device(device))


def reset_peak_memory(device: str | torch.device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(torch.device(device))
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def peak_memory_bytes(device: str | torch.device) -> int | None:
    """Peak bytes torch's CUDA allocator handed out since the last reset_peak_memory; None on the CPU
    (bench measures CPU peaks as a fresh process's RSS instead: metrics/memory.py)."""
    if not is_cuda(device):
        return None
    torch.cuda.synchronize(torch.device(device))
    return int(torch.cuda.max_memory_allocated(torch.device(device)))


def device_name(device: str | torch.device) -> str:
    """The GPU's marketing name for reports and fingerprints ("NVIDIA H100 80GB HBM3"), "cpu" otherwise."""
    if is_cuda(device):
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"
