"""bench: every baseline and diffpro's plan, measured in one run with the same seeds.

Rows (DESIGN.md): fp32 on the reference schedule (and bf16 where the device runs it natively:
stages/bench_float.py, with bf16-ddim-K beside ddim-K), uniform W8A8 and uniform 4-bit weights on the same
schedule, uniform step reduction (DDIM spacing) and DPM-Solver++ at diffpro's step count, fp32 on
diffpro's selected timesteps ("subset": the step selection alone, against the ddim row at the same
count), and diffpro (its quantized checkpoint on its selected timesteps). Per row: latency per image (interleaved
repeats across rows, median/min/max), peak memory while loading and running, checkpoint size,
average weight bits, energy where a counter exists, FID against reference statistics and against
the fp32 samples (same seeds), and which kernels ran. Quantized baselines are written to disk as real
checkpoints and loaded back, so their size is a file size and their kernels are the deployed ones.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from diffpro_cli import __version__
from diffpro_cli.artifacts import atomic_write_json, read_json, sha256_json
from diffpro_cli.console import QUIET_UI, UI
from diffpro_cli.errors import InputError, UsageError
from diffpro_cli.models.base import DiffusionModel
from diffpro_cli.sampling import (
    SamplerConfig,
    sample,
    sample_dpmsolver,
    uniform_timesteps,
)
from diffpro_cli.stages import bench_float
from diffpro_cli.stages.bench_cache import (
    CACHE_ROWS,  # rows on request (docs/caching.md)
)
from diffpro_cli.stages.bench_compile import compile_rows
from diffpro_cli.stages.bench_options import checkpoint_identity
from diffpro_cli.stages.bench_float import FLOAT_ROWS
from diffpro_cli.stages.bench_same_latency import TOKEN as SAME_LATENCY, add_same_latency_row, same_latency_steps
from diffpro_cli.stages.comparisons import (
    derived_ratios,
    steps_note,
    strongest_float_baseline,
    versus_cache,
    versus_step_cut,
)

REPORT_SCHEMA = "diffpro.report/1"
# per-row fields from metrics.evidence (docs/report.md)
EVIDENCE_FIELDS = ("fid_ci95", "fid_vs_fp_ci95", "kid", "kid_std", "psnr_vs_fp32", "psnr_vs_fp32_ci95",
                   "ssim_vs_fp32", "ssim_vs_fp32_ci95", "paired_n")
BUILTIN_REFERENCE_NOTE = ("built-in models were trained on MNIST's test images, which are also the FID/KID "
                          "reference (builtin:mnist): their FID measures memorisation as much as quality")
# every row a default run may hold; FLOAT_ROWS (bf16) only where the device runs bf16 natively (default_rows)
ALL_ROWS = ("fp32", "bf16", "w8a8-uniform", "w4-uniform", "ddim", "bf16-ddim", "dpmsolver", "subset", "diffpro",
            SAME_LATENCY)


def default_rows(device: str = "cpu") -> list[str]:
    """ALL_ROWS, less the bf16 rows where `device` would only emulate bf16 (bench_float.native_bf16)."""
    native = bench_float.native_bf16(device)[0]
    return [r for r in ALL_ROWS if native or r not in FLOAT_ROWS]


@dataclass
class BenchConfig:
    rows: list[str] = field(default_factory=default_rows)
    reference_steps: int = 100          # schedule of the full-precision and uniform-bits rows
    steps: int | None = None            # reduced step count; default: diffpro's timesteps, else reference_steps // 2
    method: str = "ddim"
    cfg_scale: float = 1.0
    fid: bool = False
    fid_n: int = 200
    reference: str = "builtin:mnist"
    inception_weights: str | None = None
    seed: int = 0
    repeats: int = 5
    latency_batch: int = 8
    latency_steps: int | None = None    # time this many steps and scale to the row's count (huge models)
    sample_batch: int = 50
    grid_n: int = 10
    memory: bool = True                 # peak memory per row, each in a fresh process
    compile: bool = False               # torch.compile EVERY row (fp32 ones too: the honest baseline), quant/compiled.py
    cache: bool = True                  # the diffpro row runs its checkpoint's cache schedule (--no-cache: every unit)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Row:
    name: str
    model: DiffusionModel
    timesteps: list[int] | None          # None: DPM-Solver++
    steps: int
    size_bytes: int
    weight_bits_avg: float
    identity: str                        # what determines this row's samples (for caches)
    peak_mem_bytes: int | None = None
    notes: list[str] = field(default_factory=list)
    load_spec: str = ""                  # what a fresh process loads to measure this row's memory
    load_mem_bytes: int | None = None
    cache: object | None = None          # a diffpro_cli.cache policy run around the sampler (cache rows)
    block_counts: list[int] = field(default_factory=lambda: [0, 0])   # block evaluations run, possible
    cache_log: list[dict] = field(default_factory=list)   # per network call: step, units computed (cache rows)
    same_latency: bool = False           # the float step cut at diffpro's measured latency (bench_same_latency)

    def compute_fraction(self) -> float | None:
        """Share of block evaluations run, measured over every sampler call of this row (1.0 uncached)."""
        if self.cache is None:
            return 1.0
        return self.block_counts[0] / self.block_counts[1] if self.block_counts[1] else None

    def sampler(self, cfg: BenchConfig, n: int, batch: int, first_index: int = 0, advance=lambda k: None):
        if self.cache is not None:
            from diffpro_cli.cache import cached

            with cached(self.model, self.cache) as run:
                out = sample(self.model, n, self.timesteps, SamplerConfig(method=cfg.method, cfg_scale=cfg.cfg_scale),
                             seed=cfg.seed, batch_size=batch, first_index=first_index, advance=advance)
            self.block_counts[0] += run.evaluations
            self.block_counts[1] += run.calls * run.num_units
            self.cache_log.extend(run.log)
            return out
        if self.timesteps is None:
            return sample_dpmsolver(self.model, n, self.steps, cfg.cfg_scale, seed=cfg.seed, batch_size=batch,
                                    first_index=first_index, advance=advance)
        return sample(self.model, n, self.timesteps, SamplerConfig(method=cfg.method, cfg_scale=cfg.cfg_scale),
                      seed=cfg.seed, batch_size=batch, first_index=first_index, advance=advance)


# ---------------------------------------------------------------------------------------------
# building rows
# ---------------------------------------------------------------------------------------------


def float_size_bytes(model: DiffusionModel, float_bytes: int = 4) -> int:
    """Bytes of the network's state dict with every float tensor at `float_bytes` (4: what an fp32
    checkpoint holds; 2: bf16)."""
    return sum(t.numel() * float_bytes if t.is_floating_point() else t.numel() * t.element_size()
               for t in model.net.state_dict().values())


def kernel_counts(model: DiffusionModel) -> dict[str, int]:
    counts = Counter()
    float_name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(getattr(model, "compute_dtype", None), "fp32")
    for _, (mod, _) in model.quantizable_layers().items():
        counts[getattr(mod, "kernel_name", None) or float_name] += 1
    return dict(counts)


def checkpoint_info(qdir: Path) -> dict:
    """Size on disk, average weight bits and timesteps of a diffpro quantized checkpoint."""
    meta = read_json(qdir / "diffpro.json")
    weights = qdir / "model.safetensors"
    if not weights.exists():
        raise InputError(f"{qdir}: model.safetensors is missing; re-run `diffpro quantize`")
    return {"size_bytes": weights.stat().st_size, "avg_bits": meta.get("totals", {}).get("avg_bits"),
            "timesteps": meta.get("timesteps"), "meta": meta}


def build_rows(ctx, cfg: BenchConfig, quantized: Path | None, timesteps: list[int] | None) -> tuple[list[Row], list[str]]:
    """Every requested row; quantized checkpoints are loaded through the context (its trust flag)."""
    notes = []
    workdir, model_spec = ctx.workdir, ctx.model_spec
    fp = ctx.model()   # memory is measured later, in fresh processes (measure_memory)
    for option, value in (("--reference-steps", cfg.reference_steps), ("--steps", cfg.steps)):   # sampling names only --steps
        if value is not None and not 1 <= value <= fp.num_train_timesteps:
            raise UsageError(f"{option} {value}: must be between 1 and {fp.num_train_timesteps} (the model's timesteps)")
    ref_ts = uniform_timesteps(fp.num_train_timesteps, cfg.reference_steps)
    qinfo = checkpoint_info(quantized) if quantized is not None else None
    if qinfo is not None:   # a checkpoint of another model would be benched against this one's baselines
        from diffpro_cli.stages.quantize import check_same_model

        check_same_model(str(quantized), qinfo["meta"].get("model"), fp)
        planned = qinfo["meta"].get("planned_for") or ""
        if planned.startswith("compiled-") and not cfg.compile:
            notes.append(f"{quantized} was planned for compiled execution ({planned}, allocate --compile): "
                         "this bench ran eager; pass --compile to time it as deployed")
        elif planned and not planned.startswith("compiled-") and cfg.compile:
            notes.append(f"{quantized} was planned for eager execution ({planned}); allocate --compile prices "
                         "every path compiled, for a plan served compiled")
    from diffpro_cli.stages.bench_cache import (
        cache_row,
        checkpoint_policy,
        diffpro_nocache_row,
    )

    # the plan's step subset; a checkpoint with a cache schedule records the bits+steps plan's as base_timesteps
    diffpro_ts = timesteps or (((qinfo["meta"].get("cache") or {}).get("base_timesteps") or qinfo["timesteps"]) if qinfo else None)
    policy = checkpoint_policy(qinfo, cfg.cache)
    k = cfg.steps or (len(diffpro_ts) if diffpro_ts else max(1, cfg.reference_steps // 2))
    fp_id = fp.sha256 or sha256_json(fp.spec)
    fp_bytes = float_size_bytes(fp)
    rows: list[Row] = []
    bf16_shared: dict = {}   # one bf16 copy for both bf16 rows; `fp` stays fp32
    for name in dict.fromkeys(cfg.rows):   # a row named twice is measured and reported once
        if name == "fp32":
            rows.append(Row("fp32", fp, ref_ts, len(ref_ts), fp_bytes, 32.0, f"fp32:{fp_id}"))
        elif name in ("w8a8-uniform", "w4-uniform"):
            bits = 8 if name.startswith("w8") else 4
            qdir = workdir / "bench" / "baselines" / name
            uniform_checkpoint(fp, bits, qdir, force=ctx.force)
            qm = ctx.load(qdir)
            info = checkpoint_info(qdir)
            # the cache identity names the checkpoint's own tensors: a re-quantized baseline (new code,
            # --force) must not reuse the old one's FID features
            tensors = info["meta"].get("provenance", {}).get("tensors_sha256")
            rows.append(Row(name, qm, ref_ts, len(ref_ts), info["size_bytes"], info["avg_bits"],
                            f"{name}:{fp_id}:{tensors}", load_spec=str(qdir)))
        elif name == "ddim":
            rows.append(Row(f"ddim-{k}", fp, uniform_timesteps(fp.num_train_timesteps, k), k, fp_bytes, 32.0,
                            f"ddim{k}:{fp_id}"))
        elif name == "dpmsolver" and getattr(fp, "prediction_type", "epsilon") == "flow":
            notes.append("dpmsolver row skipped: DPM-Solver++ is not defined here for flow-matching models (ddim-K is their step cut)")
        elif name == "dpmsolver":
            rows.append(Row(f"dpmsolver-{k}", fp, None, k, fp_bytes, 32.0, f"dpm{k}:{fp_id}"))
        elif name == "subset":   # full precision on diffpro's timesteps: the step selection alone
            if not diffpro_ts:
                notes.append("subset row skipped: no timesteps (run `diffpro prune` or pass --timesteps)")
                continue
            rows.append(Row(f"fp32-subset-{len(diffpro_ts)}", fp, list(diffpro_ts), len(diffpro_ts), fp_bytes, 32.0,
                            f"subset:{fp_id}:{sha256_json(list(diffpro_ts))}"))
        elif name == "diffpro":
            if qinfo is None:
                notes.append("diffpro row skipped: no quantized checkpoint (run `diffpro quantize` or pass --quantized)")
                continue
            qm = ctx.load(quantized)
            ts = policy.timesteps if policy is not None else (diffpro_ts or ref_ts)
            rows.append(Row("diffpro", qm, list(ts), len(ts), qinfo["size_bytes"], qinfo["avg_bits"],
                            f"diffpro:{checkpoint_identity(qinfo['meta'])}:{sha256_json(list(ts))}"
                            + (f":{sha256_json(policy.as_dict())}" if policy is not None else ""),
                            load_spec=str(quantized), cache=policy,
                            notes=([f"cache schedule of the plan: compute fraction {policy.compute_fraction():.3f}"] if policy is not None else [])
                            + [f"allocate's check before quantize: {v}" for v in [qinfo["meta"].get("provenance", {}).get("plan_check")] if v]))
        elif name == SAME_LATENCY:   # its step count comes from the timing round (measure_bench)
            continue
        elif name in FLOAT_ROWS:
            rows.extend(bench_float.bf16_row(name, fp, ref_ts, k, fp_id, bf16_shared, ctx.device))
        elif name == "diffpro-nocache":
            rows.extend(diffpro_nocache_row(ctx, qinfo, quantized, diffpro_ts, notes))
        elif name in CACHE_ROWS:
            rows.extend(cache_row(ctx, cfg, name, fp, ref_ts, fp_id, fp_bytes, notes))
        else:
            raise UsageError(f"--rows: unknown row {name!r}; choose from {', '.join(ALL_ROWS + CACHE_ROWS)}")
    for row in rows:
        row.load_spec = row.load_spec or model_spec
    return rows, notes


def measure_memory(rows: list[Row], cfg: BenchConfig, ctx) -> str:
    """Peak memory of every row: a fresh process loads the row's model and samples one latency batch
    (in-process numbers would be wrong: the heap an earlier model freed is reused). Rows that load the
    same model share the number. Returns the method, for the notes."""
    from diffpro_cli.metrics.memory import subprocess_peak

    measured: dict[str, dict] = {}
    opts = ctx.load_options
    for row in rows:
        if row.load_spec not in measured:
            ctx.ui.info(f"bench: peak memory of {row.load_spec} (fresh process)")
            # the trust flag reaches quantized checkpoints too (their network may come from module:factory);
            # --weights belongs to the float model only
            weights = opts.weights if row.load_spec == ctx.model_spec else None
            measured[row.load_spec] = subprocess_peak(row.load_spec, cfg.latency_batch, trust_code=opts.trust_code,
                                                      weights=weights, ui=ctx.ui,
                                                      conditioning=ctx.conditioning_file(), device=ctx.device)
        row.load_mem_bytes = measured[row.load_spec]["load_bytes"]
        row.peak_mem_bytes = measured[row.load_spec]["run_bytes"]
    return next(iter(measured.values()))["method"] if measured else ""


def uniform_checkpoint(model: DiffusionModel, bits: int, out_dir: Path, force: bool = False) -> Path:
    """A uniform-bits baseline written as a real checkpoint (reused when already there)."""
    from diffpro_cli.devices import net_device
    from diffpro_cli.stages.quantize import quantize_uniform_to_dir, uniform_plan, wants_pair_bound

    if (out_dir / "diffpro.json").exists() and not force:
        meta = read_json(out_dir / "diffpro.json")
        same_plan = meta.get("provenance", {}).get("plan_sha256") == sha256_json(uniform_plan(model, bits))
        # made on a CPU with the other saturation rule (pair-bounded weights or not): quantize again here
        bounded = any(rec.get("pair_bounded") for rec in (meta.get("layers") or {}).values())
        same_rule = bounded == (bits == 8 and wants_pair_bound("auto", str(net_device(model.net))))
        if meta.get("model", {}).get("sha256") in (None, model.sha256) and same_plan and same_rule:
            return out_dir
    quantize_uniform_to_dir(model, bits, out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------


def measure_latency(rows: list[Row], cfg: BenchConfig, ui: UI = QUIET_UI, device: str = "cpu") -> dict[str, dict]:
    """Per-image latency of every row, timed round-robin so load drift hits all rows alike."""
    from diffpro_cli.metrics.energy import energy_meter
    from diffpro_cli.metrics.latency import interleaved, scale

    fns = {}
    for row in rows:
        sub = row
        if cfg.latency_steps and row.timesteps is not None and cfg.latency_steps < row.steps and row.cache is None:
            sub = Row(row.name, row.model, row.timesteps[-cfg.latency_steps:], cfg.latency_steps, 0, 0, "")
        fns[row.name] = (lambda r=sub: r.sampler(cfg, cfg.latency_batch, cfg.latency_batch))
    ui.info(f"bench: timing {len(rows)} rows × {cfg.repeats} repeats (batch {cfg.latency_batch})")
    for fn in fns.values():   # the warm-up runs outside the energy window: it holds the timed repeats only
        fn()
    with energy_meter(device) as energy:
        stats = interleaved(fns, repeats=cfg.repeats, warmup=0, ui=ui, description="bench: timing", device=device)
    out = {}
    total_images = cfg.repeats * cfg.latency_batch * len(rows)
    for row in rows:
        per_image, timed_share = scale(stats[row.name], cfg.latency_batch), 1.0
        if cfg.latency_steps and row.timesteps is not None and cfg.latency_steps < row.steps and row.cache is None:
            timed_share = cfg.latency_steps / row.steps   # latency and energy both scale to the row's steps
            per_image = scale(per_image, timed_share)
            row.notes.append(f"latency timed over {cfg.latency_steps} steps and scaled to {row.steps}")
        out[row.name] = {"latency": per_image, "energy": None}
        if energy["joules"] is not None:
            # one counter for the whole interleaved run: share it by each row's time
            share = stats[row.name]["median"] / sum(s["median"] for s in stats.values())
            out[row.name]["energy"] = energy["joules"] * share * len(rows) / total_images / timed_share
    if energy["joules"] is None:
        out["_note"] = energy["note"]
    return out


def device_info(device: str = "cpu") -> dict:
    from diffpro_cli.allocator import allocator_label
    from diffpro_cli.devices import device_name, is_cuda

    if is_cuda(device):
        return {"kind": "cuda", "name": device_name(device), "device": device, "threads": torch.get_num_threads(),
                "torch": torch.__version__, "cuda": torch.version.cuda}
    from diffpro_cli.planning.fingerprint import bf16_support, machine_fingerprint

    fp = machine_fingerprint("cpu")   # the cost table's: which ISA the integer kernels and bf16 really ran on
    return {"kind": "cpu", "name": fp["cpu"], "threads": torch.get_num_threads(), "torch": torch.__version__,
            "allocator": allocator_label(), "isa_flags": fp["isa_flags"],
            "integer_kernels": "VNNI" if fp["kernel_vnni"] else "pre-VNNI (AVX2 vpmaddubsw)", "isa_cap": fp["isa_cap"],
            "bf16": "native" if bf16_support("cpu")[0] else "emulated"}


def measure_bench(ctx, cfg: BenchConfig, quantized: Path | None = None, timesteps: list[int] | None = None,
                  step_evidence: dict | None = None) -> dict:
    """Measure every row and write bench/report.json + report.md + figures; returns the report."""
    from diffpro_cli import report as report_mod

    ui, workdir, model_spec = ctx.ui, ctx.workdir, ctx.model_spec
    bench_dir = workdir / "bench"
    from diffpro_cli.artifacts import writable_dir
    from diffpro_cli.sampling import SamplerConfig, check_method, default_labels
    from diffpro_cli.stages.bench_fid import fid_for_rows, fid_inputs

    check_method(ctx.model(), SamplerConfig(method=cfg.method))   # before any row is built or timed
    default_labels(ctx.model(), 1)   # a text model without --prompts / --conditioning: now, not after the baselines are written
    if ctx.model().is_quantized:
        raise InputError(f"{ctx.model().spec}: is a diffpro quantized checkpoint, not a float model; bench the float "
                         f"model it was made from, with this checkpoint as --quantized")
    if cfg.fid and ctx.model().random_weights:   # before the baseline checkpoints are quantized and written
        raise UsageError(f"{ctx.model().spec} has random weights: FID is meaningless; drop --fid (speed and memory only)")
    writable_dir(bench_dir)   # a report that cannot be written must fail now, not after minutes of measuring
    if (bench_dir / "report.json").is_dir():
        raise UsageError(f"{bench_dir / 'report.json'}: is a directory; remove it or choose another --workdir")
    rows, notes = build_rows(ctx, cfg, quantized, timesteps)
    if cfg.compile:
        notes.append(compile_rows(rows, ctx.device))
    if not rows:
        skipped = [n for n in notes if " row skipped: " in n]   # why each requested row could not be built
        if SAME_LATENCY in cfg.rows:
            skipped.append(f"{SAME_LATENCY} is chosen from the diffpro row's timing: add diffpro and ddim (or fp32)")
        raise UsageError("--rows selects nothing to measure: " + ("; ".join(skipped) if skipped else "name at least one row"))
    from diffpro_cli.distributed import barrier, broadcast_from_main, is_main, rank_world

    fp_model = rows[0].model if rows[0].name == "fp32" else None
    fid_setup = fid_inputs(rows, cfg, ctx.device) if cfg.fid else None
    timing = measure_latency(rows, cfg, ui, ctx.device) if is_main() else {}   # other ranks would skew the timing
    if SAME_LATENCY in cfg.rows:
        k_same, why = broadcast_from_main(same_latency_steps(rows, timing) if is_main() else None)
        if k_same is not None:
            add_same_latency_row(rows, timing, k_same[0], Row, k_same[1])
        elif is_main():
            notes.append(why)
    if is_main() and cfg.memory:
        notes.append("peak_mem_bytes: " + measure_memory(rows, cfg, ctx)
                     + f", batch {cfg.latency_batch}; load_mem_bytes: the load alone")
    elif is_main():
        notes.append("memory not measured (memory = false)")
    barrier()
    fid_results, samples = ({}, {})
    if cfg.fid:
        fid_results, samples = fid_for_rows(rows, cfg, workdir, *fid_setup, ui=ui)
        if rank_world()[1] > 1:
            notes.append(f"FID sampling and Inception features sharded over {rank_world()[1]} processes")
    else:
        notes.append("FID not measured (pass --fid)")
    if not is_main():
        return {}
    if "_note" in timing:
        notes.append(f"energy: {timing['_note']}")
    model0 = rows[0].model if fp_model is None else fp_model
    report = {
        "schema": REPORT_SCHEMA,
        "diffpro_version": __version__,
        "model": {"spec": model_spec, "sha256": model0.sha256, "random_weights": bool(model0.random_weights),
                  "untrained": bool(model0.untrained)},
        "device": device_info(ctx.device),
        "fid": {"n_samples": cfg.fid_n if cfg.fid else None, "reference": cfg.reference if cfg.fid else None,
                "reference_n": fid_results.get("_reference_n"), "seed": cfg.seed,
                **({"evidence": fid_results["_evidence"]} if "_evidence" in fid_results else {})},
        "sampler": {"method": cfg.method, "cfg_scale": cfg.cfg_scale, "reference_steps": cfg.reference_steps},
        "baseline": "fp32" if any(r.name == "fp32" for r in rows) else rows[0].name,
        "rows": [],
        "notes": notes,
        "config": cfg.as_dict(),
    }
    for row in rows:
        f = fid_results.get(row.name, {})
        report["rows"].append({
            "name": row.name,
            "weight_bits_avg": row.weight_bits_avg,
            "size_bytes": row.size_bytes,
            "steps": row.steps,
            "latency_s_per_image": timing[row.name]["latency"],
            "peak_mem_bytes": row.peak_mem_bytes,
            "load_mem_bytes": row.load_mem_bytes,
            "energy_j_per_image": timing[row.name]["energy"],
            "compute_fraction": row.compute_fraction(),
            "fid": f.get("fid"),
            "fid_vs_fp": f.get("fid_vs_fp"),
            **{k: f.get(k) for k in EVIDENCE_FIELDS},
            "kernels": kernel_counts(row.model),
            "notes": row.notes,
            **({"same_latency_as": "diffpro"} if row.same_latency else {}),
        })
    report["derived"] = derived_ratios(report, fid_results.get("_replicates"))
    report["versus_step_cut"] = versus_step_cut(report, fid_results.get("_replicates"))
    report["versus_cache"] = versus_cache(report, fid_results.get("_replicates"))
    report["strongest_float_baseline"] = strongest_float_baseline(report)
    if step_evidence:   # prune's paired test of its drift-selected steps against uniform spacing, same seeds
        report["steps_vs_uniform"] = step_evidence
        notes.append(steps_note(step_evidence))
    for v in report["versus_cache"] + report["versus_step_cut"]:
        notes.insert(0, v["line"])
    if model0.random_weights:
        report["notes"].append("RANDOM WEIGHTS: speed and memory only; no quality metric is meaningful")
    if model0.untrained:
        report["notes"].append("UNTRAINED built-in weights: FID values are not meaningful")
    if model_spec.startswith("builtin:"):
        report["notes"].append(BUILTIN_REFERENCE_NOTE)
    if cfg.fid:
        report["notes"].append("LPIPS vs fp32: not measured (its network weights cannot be fetched offline; "
                               "PSNR and SSIM are the paired same-seed metrics here)")
    from diffpro_cli.stages.bench_cache import schedule_figure

    report["cache_schedules"] = schedule_figure(rows, bench_dir / "figures" / "cache_schedule.png", notes)
    atomic_write_json(bench_dir / "report.json", report)
    report_mod.write_markdown(report, bench_dir, samples, workdir, cfg.grid_n)
    return report


def run_bench(ctx, cfg: BenchConfig, *, quantized: Path | None = None, timesteps_path: Path | None = None):
    """`measure_bench` through the lock: skipped when the model, checkpoint, timesteps and config are
    unchanged. Returns a StageResult (value: the report, or None when up to date)."""
    from diffpro_cli.artifacts import input_record
    from diffpro_cli.distributed import rank_world
    from diffpro_cli.stages.bench_options import validate_config
    from diffpro_cli.stages.common import StageOutcome
    from diffpro_cli.stages.context import StageResult

    validate_config(cfg)   # before the model loads: the CLI, the API and run share it
    workdir = ctx.workdir
    inputs = {"model": ctx.model_record()}
    if quantized is not None:
        inputs["quantized"] = input_record(quantized)
    ts, evidence = None, None
    if timesteps_path is not None:
        inputs["timesteps"] = input_record(timesteps_path)
        from diffpro_cli.stages.quantize import read_timesteps

        ts_doc, ts = read_timesteps(timesteps_path, ctx.model())   # as quantize reads it
        evidence = ts_doc.get("paired_vs_uniform")
    outputs = {"report": workdir / "bench" / "report.json", "markdown": workdir / "bench" / "report.md"}

    def compute():
        if not cfg.compile:
            return measure_bench(ctx, cfg, quantized=quantized, timesteps=ts, step_evidence=evidence)
        from diffpro_cli.quant.compiled import released

        with released():   # the compiled rows' frozen weight copies die with the rows, not with the process
            return measure_bench(ctx, cfg, quantized=quantized, timesteps=ts, step_evidence=evidence)

    # under torchrun every rank must take part in the collectives, so no rank may skip on its own:
    # sharded runs always compute (rank 0 still records the lock)
    sharded = rank_world()[1] > 1
    if sharded and rank_world()[0] != 0:
        compute()
        return StageResult(StageOutcome("bench", "computed", "sharded worker", {k: str(v) for k, v in outputs.items()}, 0.0))
    return ctx.run_stage("bench", inputs, cfg.as_dict(), outputs, compute, seed=cfg.seed, force=ctx.force or sharded)
