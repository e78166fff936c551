"""Issue #19's demo bars, read off one bench report: PASS / FAIL per bar, and the machine that ran it.

    python benchmarks/acceptance.py diffpro-work/demo/bench/report.json

The bars (all from the same run, ratios against rows of that run):
  * diffpro at least 1.25x as fast as ddim-K at its own K steps;
  * diffpro at least 2.5x as fast as fp32 on the full schedule, and at least 7x smaller;
  * diffpro's ΔFID (vs the reference data, against fp32's) at most +5, and its FID vs fp32 at most half
    of w4-uniform's;
  * w8a8-uniform at least 1.3x as fast as fp32 (eager or compiled, as the report's config says) with
    ΔFID at most +3.
Medians decide (the minima are printed beside them). The report's device line says which CPU and ISA
ran the kernels, and any cap (AVX2 emulated on a VNNI CPU is not an AVX2-only CPU): the bars hold for
"this CPU" only. Exit status 0 when every bar that could be read passes, 1 otherwise (2: unreadable).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _row(report: dict, name: str) -> dict | None:
    return next((r for r in report.get("rows", []) if r.get("name") == name), None)


def _ddim_row(report: dict, steps: int) -> dict | None:
    return _row(report, f"ddim-{steps}") or _row(report, f"euler-{steps}")   # flow models name it euler-K


def bars(report: dict) -> list[dict]:
    """One record per bar: name, required, measured (None where the report lacks it), passed, note."""
    derived = report.get("derived", {})
    out = []

    def bar(name: str, required: str, value, ok, note: str = ""):
        out.append({"bar": name, "required": required, "measured": value, "passed": None if value is None else bool(ok),
                    "note": note})

    dp, w8, w4 = _row(report, "diffpro"), _row(report, "w8a8-uniform"), _row(report, "w4-uniform")
    d_dp, d_w8 = derived.get("diffpro", {}), derived.get("w8a8-uniform", {})
    ddim = _ddim_row(report, dp["steps"]) if dp else None
    d_ddim = derived.get(ddim["name"], {}) if ddim else {}
    ratio = d_dp["speedup"] / d_ddim["speedup"] if d_dp.get("speedup") and d_ddim.get("speedup") else None
    ratio_min = (d_dp["speedup_min"] / d_ddim["speedup_min"]
                 if d_dp.get("speedup_min") and d_ddim.get("speedup_min") else None)
    bar(f"diffpro vs {ddim['name'] if ddim else 'ddim-K'} (same steps)", ">= 1.25x", ratio, ratio is not None and ratio >= 1.25,
        f"minima {ratio_min:.2f}x" if ratio_min else "")
    s = d_dp.get("speedup")
    bar("diffpro vs fp32 (full schedule)", ">= 2.5x", s, s is not None and s >= 2.5,
        f"minima {d_dp['speedup_min']:.2f}x" if d_dp.get("speedup_min") else "")
    c = d_dp.get("compression")
    bar("diffpro size vs fp32", ">= 7x smaller", c, c is not None and c >= 7)
    f = d_dp.get("delta_fid")
    bar("diffpro ΔFID", "<= +5", f, f is not None and f <= 5)
    mine, theirs = (dp or {}).get("fid_vs_fp"), (w4 or {}).get("fid_vs_fp")
    half = mine / theirs if mine is not None and theirs else None
    bar("diffpro FID vs fp32 / w4-uniform's", "<= 0.5", half, half is not None and half <= 0.5,
        f"{mine:.1f} vs {theirs:.1f}" if half is not None else "")
    mode = "compiled" if (report.get("config") or {}).get("compile") else "eager"
    s8 = d_w8.get("speedup") if w8 else None
    bar(f"w8a8-uniform vs fp32 ({mode})", ">= 1.3x", s8, s8 is not None and s8 >= 1.3,
        f"minima {d_w8['speedup_min']:.2f}x" if d_w8.get("speedup_min") else "")
    f8 = d_w8.get("delta_fid") if w8 else None
    bar("w8a8-uniform ΔFID", "<= +3", f8, f8 is not None and f8 <= 3)
    return out


def device_line(report: dict) -> str:
    from diffpro_cli.report import isa_text

    d = report.get("device", {})
    line = f"{d.get('name', '?')} ({d.get('kind', '?')}, {d.get('threads', '?')} threads, torch {d.get('torch', '?')})"
    if "isa_flags" not in d:
        return line + "; ISA not recorded (a report from before session 12)"
    return line + isa_text(d) + (" — EMULATED: numerics, not speed" if d.get("isa_cap") else "")


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path, help="bench/report.json of one run")
    ap.add_argument("--json", action="store_true", help="print the records as JSON")
    args = ap.parse_args(argv)
    try:
        report = json.loads(args.report.read_text())
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {args.report} ({exc}); pass a bench/report.json", file=sys.stderr)
        return 2
    records = bars(report)
    if args.json:
        print(json.dumps({"device": report.get("device"), "bars": records}, indent=2))
    else:
        print(f"Device: {device_line(report)}")
        for r in records:
            verdict = {True: "PASS", False: "FAIL", None: "n/a "}[r["passed"]]
            print(f"  {verdict}  {r['bar']:42s} {r['required']:>14s}  measured {_fmt(r['measured']):>7s}  {r['note']}")
    return 0 if all(r["passed"] is not False for r in records) and any(r["passed"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
