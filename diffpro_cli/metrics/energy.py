"""Energy counters where the machine exposes one: RAPL (CPU package, Linux powercap) or NVML (GPU).

Returns None with a reason where no counter is readable; a number is never estimated.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

RAPL_ROOT = Path("/sys/class/powercap")


def _rapl_domains() -> list[Path]:
    if not RAPL_ROOT.exists():
        return []
    found = []
    for d in sorted(RAPL_ROOT.glob("intel-rapl:*")):
        if d.name.count(":") == 1 and (d / "energy_uj").exists():
            try:
                int((d / "energy_uj").read_text())
                found.append(d)
            except (OSError, ValueError):
                continue
    return found


def _read_uj(d: Path) -> int:
    return int((d / "energy_uj").read_text())


def _max_uj(d: Path) -> int:
    try:
        return int((d / "max_energy_range_uj").read_text())
    except (OSError, ValueError):
        return 2 ** 32


@contextmanager
def energy_meter(device: str = "cpu"):
    """Yields a dict filled on exit with {"joules": float | None, "source": str, "note": str}."""
    result = {"joules": None, "source": None, "note": None}
    if device.startswith("cuda"):
        # the body runs outside every try: an error in it (a CUDA OOM while timing) must reach the caller
        # as itself, not be caught here and end in contextlib's "generator didn't stop after throw()"
        try:
            import pynvml

            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(0)
            start = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
        except Exception as exc:  # pynvml missing or the counter is not supported
            result["note"] = f"NVML energy counter unavailable ({type(exc).__name__})"
            yield result
            return
        yield result
        try:
            end = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
            result.update(joules=(end - start) / 1000.0, source="nvml total energy")
        except Exception as exc:  # noqa: BLE001 - the counter stopped answering: no number, said why
            result["note"] = f"NVML energy counter unreadable after the run ({type(exc).__name__})"
        return
    domains = _rapl_domains()
    if not domains:
        result["note"] = "no readable RAPL counter (/sys/class/powercap) on this machine"
        yield result
        return
    start = {d: _read_uj(d) for d in domains}
    yield result
    total = 0
    for d in domains:
        delta = _read_uj(d) - start[d]
        if delta < 0:  # counter wrapped
            delta += _max_uj(d)
        total += delta
    result.update(joules=total / 1e6, source="RAPL package domains (whole socket, includes other load)")
