"""benchmarks/kernels.py runs as a script (`make bench`)."""

from __future__ import annotations

import json
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


def test_acceptance_reads_issue_19_bars_off_a_report(tmp_path):
    """benchmarks/acceptance.py on hand-made reports. Catches: a bar computed against the wrong row (ddim at
    another step count, fp32 instead of ddim), a threshold off by its direction, a missing row read as a
    pass or a fail instead of n/a, an emulated (capped) run not flagged as such."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import acceptance
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def row(name, steps, fid_vs_fp=None):
        return {"name": name, "steps": steps, "fid_vs_fp": fid_vs_fp}

    report = {"device": {"name": "CPU", "kind": "cpu", "threads": 2, "torch": "x", "isa_flags": ["avx2"],
                         "integer_kernels": "pre-VNNI (AVX2 vpmaddubsw)", "isa_cap": "FBGEMM_ENABLE_INSTRUCTIONS=AVX2"},
              "config": {"compile": False},
              "rows": [row("fp32", 50, 0.0), row("w4-uniform", 50, 100.0), row("ddim-10", 10), row("ddim-25", 25),
                       row("diffpro", 25, 49.0)],
              "derived": {"ddim-10": {"speedup": 5.0}, "ddim-25": {"speedup": 2.0, "speedup_min": 2.0},
                          "diffpro": {"speedup": 2.6, "speedup_min": 2.4, "compression": 7.05, "delta_fid": 5.5}}}
    got = {r["bar"]: r["passed"] for r in acceptance.bars(report)}
    assert got == {"diffpro vs ddim-25 (same steps)": True,          # 2.6 / 2.0 = 1.3 (not ddim-10's 5.0)
                   "diffpro vs fp32 (full schedule)": True, "diffpro size vs fp32": True,
                   "diffpro ΔFID": False,                            # +5.5 > +5
                   "diffpro FID vs fp32 / w4-uniform's": True,       # 49 / 100 <= 0.5
                   "w8a8-uniform vs fp32 (eager)": None, "w8a8-uniform ΔFID": None}   # no such row: n/a
    assert "capped by FBGEMM_ENABLE_INSTRUCTIONS=AVX2 — EMULATED" in acceptance.device_line(report)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    assert acceptance.main([str(path)]) == 1
    report["derived"]["diffpro"]["delta_fid"] = 4.0
    path.write_text(json.dumps(report))
    assert acceptance.main([str(path)]) == 0
    assert acceptance.main([str(tmp_path / "missing.json")]) == 2
