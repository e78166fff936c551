"""report.md against report.json when the run has no fp32 row: the derived columns' reference row is named."""

import json


def test_without_an_fp32_row_the_report_names_the_row_speedups_are_against(cli, tmp_path):
    """Catches: `--rows ddim,dpmsolver` (no fp32) made ddim-2 the baseline in report.json, but report.md's
    "speedup", "compression" and "ΔFID" columns and the CLI's "speedup 1.00x" did not say against what
    (a reader takes them as against fp32)."""
    rc, out, err = cli("bench", "random:dit-tiny", "--rows", "ddim,dpmsolver", "--repeats", 1, "--latency-batch", 1,
                       "--reference-steps", 4, "--steps", 2, "-w", tmp_path)
    assert rc == 0, err
    rep = json.loads((tmp_path / "bench" / "report.json").read_text())
    assert rep["baseline"] == "ddim-2"
    md = (tmp_path / "bench" / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| row |"))
    assert "speedup vs ddim-2" in header and "ΔFID vs ddim-2" in header and "compression vs ddim-2" in header
    for r in rep["rows"]:   # the table's speedup is report.json's
        line = next(line for line in md.splitlines() if line.startswith(f"| {r['name']} |"))
        assert f"| {rep['derived'][r['name']]['speedup']:.2f}x" in line
        assert "x vs ddim-2" in next(o for o in out.splitlines() if o.strip().startswith(r["name"] + ":"))
