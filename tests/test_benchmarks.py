"""benchmarks/kernels.py runs as a script (`make bench`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_benchmark_script_runs_with_transformers_installed():
    """Catches: `python benchmarks/kernels.py` shadowing the `kernels` package that transformers imports
    once diffusers loads it (the script's folder is first on sys.path): every table crashed on import.
    The built-in models' table is the cheapest part that imports diffusers."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--skip-layers", "--skip-forward",
                          "--skip-memory", "--skip-sizes", "--no-torchao", "--builtin-repeats", "1", "--threads", "1"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "diffpro-w8a8-dyn" in out.stdout and "Traceback" not in out.stderr
