"""The report's comparisons between rows measured in one bench run: ratios against the baseline row,
diffpro against the float step cut at the same step count, diffpro against the cache rows, and prune's paired steps test as one line.
Pure functions over report dicts (stages/bench.py builds the rows and calls them)."""

from __future__ import annotations


def derived_ratios(report: dict, replicates=None) -> dict:
    """Speedup, compression and ΔFID of every row against the baseline row (null where not measured);
    with the bootstrap `replicates` (metrics.evidence.Replicates), ΔFID's paired 95 % interval."""
    base = next((r for r in report["rows"] if r["name"] == report["baseline"]), None)
    out = {}
    for r in report["rows"]:
        if base is None:
            break
        speed = base["latency_s_per_image"]["median"] / r["latency_s_per_image"]["median"]
        out[r["name"]] = {
            "speedup": round(speed, 3),
            "compression": round(base["size_bytes"] / r["size_bytes"], 3) if r["size_bytes"] else None,
            "delta_fid": (r["fid"] - base["fid"]) if r["fid"] is not None and base["fid"] is not None else None,
        }
        if base["latency_s_per_image"].get("min") and r["latency_s_per_image"].get("min"):
            # fastest repeat against fastest repeat: what the kernels cost when nothing else interferes
            # (interference only adds time); the median is what a user sees on a busy machine
            out[r["name"]]["speedup_min"] = round(base["latency_s_per_image"]["min"] / r["latency_s_per_image"]["min"], 3)
        if replicates is not None:
            out[r["name"]]["delta_fid_ci95"] = (None if r["name"] == base["name"]
                                                else replicates.paired_ci(r["name"], base["name"], "fid"))
    return out


def speed_verdict(ratio: float, slower: str = "SLOWER") -> str:
    """'1.23x faster' / '1.23x SLOWER...' for the other row's latency over diffpro's (slower: the inverse,
    diffpro's latency over the row's, not '0.81x SLOWER'); a ratio that prints as 1.00x is a tie, not
    'SLOWER' (0.996) or 'faster' (1.004): the text must not contradict its number."""
    if f"{ratio:.2f}" == "1.00" or f"{1 / ratio:.2f}" == "1.00":
        return "1.00x, a tie"
    return f"{ratio:.2f}x faster" if ratio > 1.0 else f"{1 / ratio:.2f}x {slower}"


def size_words(smaller: float) -> str:
    """'7.05x smaller' for the other row's bytes over diffpro's; '1.25x LARGER' below 1 (a plan keeping
    many layers float against a bf16 row), not '0.80x smaller'; 'the same size' at 1.00x."""
    if not smaller:
        return "size n/a"
    if f"{smaller:.2f}" == "1.00":
        return "the same size"
    return f"{smaller:.2f}x smaller" if smaller > 1 else f"{1 / smaller:.2f}x LARGER"


def steps_note(p: dict) -> str:
    """One line for prune's paired comparison of drift-selected and uniform steps."""
    lo, hi = p["ci95"]
    verdict = "significant" if p.get("significant") else "not significant"
    return (f"steps: drift-selected vs uniform on the same {p['n']} calibration samples: uniform − selected drift "
            f"{p['mean_uniform_minus_selected']:.3g} [95% CI {lo:.3g}, {hi:.3g}], {p['wins']} wins / {p['losses']} losses, "
            f"sign test p = {p['sign_test_p']:.3g} ({verdict})")


def versus_step_cut(report: dict, replicates=None) -> list[dict]:
    """diffpro against the float step cut a user could pick instead (ddim-K, fp32-subset-K and, where
    measured, bf16-ddim-K at the same K): latency ratio and FID vs fp32 side by side, measured in this
    run. The plan must not lose on speed. With the bootstrap `replicates`, paired 95 % intervals of
    diffpro minus the row: FID vs fp32 (`delta_fid_vs_fp_ci95`) and FID vs the reference (`delta_fid_ci95`)."""
    dp = next((r for r in report["rows"] if r["name"] == "diffpro"), None)

    def same_steps(prefixes):
        return lambda name, r: dp is not None and r["steps"] == dp["steps"] and name.startswith(prefixes)

    return (_versus(report, replicates, same_steps(("ddim-", "fp32-subset-")),
                    lambda r: f"same {r['steps']} steps, float weights",
                    slower="SLOWER: quantized compute does not pay on this machine")
            + _versus(report, replicates, same_steps(("bf16-ddim-",)),
                      lambda r: f"same {r['steps']} steps, float weights computing in bf16",
                      slower="SLOWER: plain bf16 at the same steps beats the plan on this machine")
            + [_quality_at_same_latency(v) for v in _versus(
                report, replicates, lambda name, r: r.get("same_latency_as") == "diffpro",
                lambda r: f"float DDIM on {r['steps']} steps, as fast as diffpro")])


def _quality_at_same_latency(entry: dict) -> dict:
    """The same-latency step cut's line ends with who has the samples closer to fp32's when a user spends
    the same time either way (the paired interval decides where there is one)."""
    d, ci = entry.get("delta_fid_vs_fp"), entry.get("delta_fid_vs_fp_ci95")
    if d is None:
        return entry
    if d == 0 or (ci is not None and not (ci[0] > 0 or ci[1] < 0)):
        verdict = "no significant difference in FID vs fp32"
    elif d > 0:
        verdict = ("FEWER FLOAT STEPS WIN: at this latency float DDIM is closer to fp32; plan steps and bits together "
                   "(allocate --budget latency=F) or keep more steps")
    else:
        verdict = "diffpro is closer to fp32"
    entry["same_latency_verdict"] = verdict
    entry["line"] += f"; at the same latency: {verdict}"
    return entry


def strongest_float_baseline(report: dict) -> dict | None:
    """The faster of ddim-K and bf16-ddim-K at diffpro's step count (the float baseline the plan must
    beat on this machine) with diffpro's speedup over it; None without a diffpro row or such a row."""
    rows = {r["name"]: r for r in report["rows"]}
    dp = rows.get("diffpro")
    if dp is None:
        return None
    cands = [r for n, r in rows.items() if n.startswith(("ddim-", "bf16-ddim-")) and r["steps"] == dp["steps"]]
    if not cands:
        return None
    best = min(cands, key=lambda r: r["latency_s_per_image"]["median"])
    ratio = best["latency_s_per_image"]["median"] / dp["latency_s_per_image"]["median"]
    out = {"row": best["name"], "steps": best["steps"], "latency_s_per_image": best["latency_s_per_image"]["median"],
           "diffpro_speedup": round(ratio, 3),
           "line": (f"strongest float baseline at diffpro's {dp['steps']} steps: {best['name']} "
                    f"({best['latency_s_per_image']['median'] * 1000:.1f} ms/img); diffpro {speed_verdict(ratio)}")}
    if best["latency_s_per_image"].get("min") and dp["latency_s_per_image"].get("min"):
        # fastest repeats too (as derived's speedup_min): on a busy machine the medians can disagree
        out["diffpro_speedup_min"] = round(best["latency_s_per_image"]["min"] / dp["latency_s_per_image"]["min"], 3)
        out["line"] += f" (fastest repeats: {speed_verdict(out['diffpro_speedup_min'], 'slower')})"
    return out


CACHE_DESCRIPTIONS = {"diffpro-nocache": "the same checkpoint and steps without its cache schedule",
                      "cache-only": "float weights, full steps, the planner's cache schedule"}


def versus_cache(report: dict, replicates=None) -> list[dict]:
    """diffpro (with its cache schedule) against the other ways to reuse computation measured in the run:
    the bits+steps plan alone (diffpro-nocache), cache-only and the hand-set baselines (fbcache-T,
    deepcache-N); same fields as `versus_step_cut`."""
    def pick(name, r):
        return name in CACHE_DESCRIPTIONS or name.startswith(("fbcache-", "deepcache-"))

    return _versus(report, replicates, pick,
                   lambda r: CACHE_DESCRIPTIONS.get(r["name"], f"hand-set cache, float weights, {r['steps']} steps"))


def _versus(report: dict, replicates, pick, describe, slower: str = "SLOWER") -> list[dict]:
    rows = {r["name"]: r for r in report["rows"]}
    dp = rows.get("diffpro")
    if dp is None:
        return []
    out = []
    for name, r in rows.items():
        if name == "diffpro" or not pick(name, r):
            continue
        ratio = r["latency_s_per_image"]["median"] / dp["latency_s_per_image"]["median"]
        entry = {"row": name, "steps": r["steps"], "speedup": round(ratio, 3),
                 "fid_vs_fp": {"diffpro": dp["fid_vs_fp"], name: r["fid_vs_fp"]}}
        quality = ""
        if dp["fid_vs_fp"] is not None and r["fid_vs_fp"] is not None:
            quality = f"; FID vs fp32 {dp['fid_vs_fp']:.2f} vs {r['fid_vs_fp']:.2f}"
            entry["delta_fid_vs_fp"] = dp["fid_vs_fp"] - r["fid_vs_fp"]
        if dp.get("fid") is not None and r.get("fid") is not None:
            entry["delta_fid"] = dp["fid"] - r["fid"]
        if replicates is not None:
            entry["delta_fid_vs_fp_ci95"] = replicates.paired_ci("diffpro", name, "fid_vs_fp")
            entry["delta_fid_ci95"] = replicates.paired_ci("diffpro", name, "fid")
            ci = entry["delta_fid_vs_fp_ci95"]
            if quality and ci is not None:
                sig = "significant" if ci[0] > 0 or ci[1] < 0 else "not significant"
                quality += f" (paired Δ {entry['delta_fid_vs_fp']:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}], {sig})"
        # smaller than this row (a bf16 row holds half of fp32's bytes); else than the baseline
        smaller = (r["size_bytes"] / dp["size_bytes"] if r.get("size_bytes") and dp.get("size_bytes")
                   else report["derived"].get("diffpro", {}).get("compression") or 0)
        entry["line"] = f"diffpro vs {name} ({describe(r)}): {speed_verdict(ratio, slower)}{quality}, {size_words(smaller)}"
        out.append(entry)
    return out
