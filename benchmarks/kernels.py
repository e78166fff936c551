"""Kernel benchmark: fp32 vs torch's dynamic int8 vs torchao vs diffpro's integer kernels.

    python benchmarks/kernels.py                       # everything (DiT-XL/2 takes a while on 2 cores)
    python benchmarks/kernels.py --skip-forward --skip-memory   # per-layer table, sizes only
    python benchmarks/kernels.py --forward-layers 4    # a 4-block DiT-XL/2-width model for a quick look

    python benchmarks/kernels.py --compiled --skip-forward --skip-sizes --skip-memory   # + torch.compile rows

Every number is a ratio against fp32 measured in the same run, variants interleaved round-robin so load
drift on a shared machine hits them alike; ratios are of medians (min in brackets). Compiled variants
(--compiled: quant/compiled.py, inductor with freezing) are compared with torch.compile'd fp32, the honest
baseline, and their compile time is printed. The load average is printed with every table: on a shared
2-core machine, 2-thread timings are only comparable between runs at similar load. Random weights:
speed, size and memory only — never quality.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

# `python benchmarks/kernels.py` puts this folder first on sys.path, where this file would shadow the
# `kernels` package that transformers imports (Hugging Face hub kernels) as soon as diffusers loads it
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from torch import nn  # noqa: E402

warnings.filterwarnings("ignore")


def _native_bf16() -> bool:
    from diffpro_cli.planning.fingerprint import bf16_support

    return bf16_support("cpu")[0]


BF16 = _native_bf16()   # a bf16 row in every table where the CPU computes bf16 in hardware

# (name, tokens, in, out): DiT-XL/2 at 256 px, batch 2 (2 × 256 tokens), hidden 1152
DIT_XL_LAYERS = [
    ("attn qkv (fused)", 512, 1152, 3456),
    ("attn out", 512, 1152, 1152),
    ("mlp fc1", 512, 1152, 4608),
    ("mlp fc2", 512, 4608, 1152),
    ("adaLN (6x1152)", 2, 1152, 6912),
]
# builtin:dit-mnist at bench's latency batch (8 × 64 tokens), hidden 192
BUILTIN_LAYERS = [
    ("attn qkv (fused)", 512, 192, 576),
    ("attn out", 512, 192, 192),
    ("mlp fc1", 512, 192, 768),
    ("mlp fc2", 512, 768, 192),
    ("adaLN (6x192)", 8, 192, 1152),
]


def load_note() -> str:
    try:
        return "load average " + " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "load average n/a"


def compile_timed(module):
    """torch.compile'd module (diffpro_cli/quant/compiled.py); it compiles on its first call."""
    from diffpro_cli.quant import compiled

    return compiled.compile_module(module)


def interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for f in fns.values():
            f()
        for _ in range(repeats):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    return times


def ratios(times: dict[str, list[float]], base: str = "fp32") -> dict[str, str]:
    med, low = statistics.median(times[base]), min(times[base])
    return {k: f"{med / statistics.median(v):.2f}x ({low / min(v):.2f}x)" for k, v in times.items()}


def print_table(title: str, rows: dict[str, dict[str, str]], base_ms: dict[str, float]) -> None:
    print(f"\n## {title}")
    cols = list(next(iter(rows.values())).keys())
    print("| layer | fp32 ms | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for name, r in rows.items():
        print(f"| {name} | {base_ms[name]:.1f} | " + " | ".join(r[c] for c in cols) + " |")


def torch_dynamic(module: nn.Module) -> nn.Module:
    torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
    return torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8)


def torchao_variants(module: nn.Module) -> dict[str, nn.Module]:
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except Exception:
        return {}
    out = {}
    for name, cfg in (("torchao-int8dyn", Int8DynamicActivationInt8WeightConfig), ("torchao-int8wo", Int8WeightOnlyConfig)):
        try:
            m = copy.deepcopy(module)
            quantize_(m, cfg())
            out[name] = m
        except Exception as exc:  # a config that does not run on this build
            print(f"  {name}: skipped ({str(exc).splitlines()[0][:80]})")
    return out


def diffpro_variants(make, static_absmax=None) -> dict[str, nn.Module]:
    """make(bits, act_mode) -> quantized module."""
    return {"diffpro-w8a8-dyn": make(8, "dynamic"), "diffpro-w8a8-token": make(8, "dynamic-token"),
            "diffpro-w8a8-static": make(8, "static"), "diffpro-w4a8-dyn": make(4, "dynamic")}


def bench_layers(repeats: int, with_torchao: bool, shapes=DIT_XL_LAYERS, title="DiT-XL/2 shapes, batch 2", with_compiled=False) -> None:
    """Per-layer latency. With `with_compiled`: torch.compile'd fp32 and diffpro's compiled W8A8 layers
    (per-tensor and per-token), their ratios against the compiled fp32 layer, and the compile times."""
    from diffpro_cli.quant.layers import quantize_module

    rows, base_ms, compile_s = {}, {}, {}
    for name, tokens, fin, fout in shapes:
        torch.manual_seed(0)
        lin = nn.Linear(fin, fout).eval()
        x = torch.randn(tokens, fin)
        amax = float(x.abs().max())
        models = {"fp32": lin, "torch-dyn": torch_dynamic(copy.deepcopy(nn.Sequential(lin)))}
        if with_torchao:
            models.update(torchao_variants(nn.Sequential(copy.deepcopy(lin))))
        models.update(diffpro_variants(lambda b, mode: quantize_module(lin, b, act_mode=mode, static_absmax=amax if mode == "static" else None)))
        if with_compiled:
            with torch.no_grad():
                for key, module in (("fp32-compiled", copy.deepcopy(lin)), ("diffpro-w8a8-dyn-compiled", quantize_module(lin, 8)),
                                    ("diffpro-w8a8-token-compiled", quantize_module(lin, 8, act_mode="dynamic-token"))):
                    t0 = time.perf_counter()
                    models[key] = compile_timed(module)
                    models[key](x)
                    compile_s[f"{name} {key}"] = time.perf_counter() - t0
        fns = {k: (lambda m=m: m(x)) for k, m in models.items()}
        if BF16:   # the strongest float where the CPU has bf16 in hardware (AMX / AVX512_BF16): activations in bf16
            lin_bf, xb = copy.deepcopy(lin).bfloat16(), x.bfloat16()
            fns["bf16"] = lambda: lin_bf(xb)
        times = interleaved(fns, repeats)
        r = ratios(times)
        if with_compiled:
            rc = ratios({k: v for k, v in times.items() if k.endswith("-compiled")}, "fp32-compiled")
            r.update({k: f"{v} [{rc[k]}]" for k, v in r.items() if k in rc})
        rows[name] = {k: v for k, v in r.items() if k != "fp32"}
        base_ms[name] = statistics.median(times["fp32"]) * 1e3
        print(f"  {name}: done", flush=True)
    note = "; compiled rows: vs eager fp32, then [vs compiled fp32]" if with_compiled else ""
    print_table(f"Per-layer latency vs fp32 ({title}; threads {torch.get_num_threads()}, {repeats} interleaved repeats, "
                f"{load_note()}): median ratio (min ratio){note}", rows, base_ms)
    if compile_s:
        print(f"compile time (first call), s: median {statistics.median(compile_s.values()):.1f}, max {max(compile_s.values()):.1f}")


def dit_xl(layers: int):
    from diffpro_cli.models.random_arch import RANDOM_ARCHS, build_random_net
    from diffpro_cli.models.base import DiffusionModel, dit_forward, linear_alphas_cumprod

    cls, config = RANDOM_ARCHS["dit-xl-2"]
    net = build_random_net(cls, dict(config, num_layers=layers), seed=0)
    return DiffusionModel(spec=f"random:dit-xl-2[{layers} blocks]", net=net, kind="dit", sample_shape=(4, 32, 32),
                          alphas_cumprod=linear_alphas_cumprod(), forward_fn=dit_forward, num_classes=1000,
                          random_weights=True, config={"class": cls, "config": dict(config, num_layers=layers)})


def quantized_copy(model, bits: int, act_mode: str, static_ranges=None):
    from diffpro_cli.stages.quantize import apply_plan, uniform_plan

    m = copy.deepcopy(model)
    return apply_plan(m, uniform_plan(m, bits, 8, act_mode), static_ranges)


def one_step_ranges(model, x, t, y) -> dict:
    """Static ranges from one forward pass at the benchmark's timestep (speed only)."""
    amax, hooks = {}, []
    for name, (mod, _) in model.quantizable_layers().items():
        hooks.append(mod.register_forward_pre_hook(lambda m, i, n=name: amax.__setitem__(n, float(i[0].abs().max()))))
    with torch.inference_mode():
        model.eps(x, t, y)
    for h in hooks:
        h.remove()
    return {n: ([int(t[0])], [v]) for n, v in amax.items()}


def bench_forward(model, batch: int, repeats: int, with_torchao: bool, title: str, with_compiled: bool = False) -> None:
    """Whole forward through `model.eps` (what bench's latency rows run, at its latency batch by
    default), every variant a full model with fused q/k/v; with `with_compiled`, torch.compile'd fp32
    and compiled W8A8 models too, compared with the compiled fp32 one."""
    from diffpro_cli.quant import compiled

    torch.manual_seed(0)
    x = torch.randn(batch, *model.sample_shape)
    t = torch.full((batch,), 500)
    y = (torch.arange(batch) % model.num_classes) if model.num_classes else None
    ranges = one_step_ranges(model, x, t, y)
    torch_dyn = dataclasses.replace(model, net=torch_dynamic(copy.deepcopy(model.net)))
    variants = {"fp32": model, "torch-dyn": torch_dyn}
    if BF16:   # bench's bf16 row: the float model computing in bf16
        variants["bf16"] = copy.deepcopy(model).set_compute_dtype(torch.bfloat16)
    if with_torchao:
        variants.update({k: dataclasses.replace(model, net=m) for k, m in torchao_variants(model.net).items()})
    for key, (bits, mode) in {"diffpro-w8a8-dyn": (8, "dynamic"), "diffpro-w8a8-token": (8, "dynamic-token"),
                              "diffpro-w8a8-static": (8, "static"), "diffpro-w4a8-dyn": (4, "dynamic")}.items():
        variants[key] = timestep_aware(quantized_copy(model, bits, mode, ranges))
        gc.collect()
    compile_s = {}
    if with_compiled and model.kind != "dit":
        print(f"  {title}: compiled variants skipped (the compiled path leaves convolutions eager; see docs/quantization.md)")
    if with_compiled and model.kind == "dit":
        with torch.no_grad():
            for key, make in (("fp32-compiled", lambda: copy.deepcopy(model)),
                              ("diffpro-w8a8-dyn-compiled", lambda: quantized_copy(model, 8, "dynamic")),
                              ("diffpro-w8a8-token-compiled", lambda: quantized_copy(model, 8, "dynamic-token"))):
                t0 = time.perf_counter()
                variants[key] = compiled.compile_model(make())
                variants[key].eps(x, t, y)
                compile_s[key] = time.perf_counter() - t0
    with torch.inference_mode():
        ref = model.eps(x, t, y)
        err = {k: float((m.eps(x, t, y) - ref).norm() / ref.norm()) for k, m in variants.items()}
    before = load_note()
    times = interleaved({k: (lambda m=m: m.eps(x, t, y)) for k, m in variants.items()}, repeats)
    r = ratios(times)
    rc = ratios({k: v for k, v in times.items() if k.endswith("-compiled")}, "fp32-compiled") if compile_s else {}
    print(f"\n## Whole forward: {title} (model.eps, batch {batch}, threads {torch.get_num_threads()}, {repeats} interleaved repeats; "
          f"{before} before, {load_note()} after)")
    print(f"fp32 median {statistics.median(times['fp32']) * 1e3:.1f} ms" +
          ("; compile s (first call): " + ", ".join(f"{k} {v:.0f}" for k, v in compile_s.items()) if compile_s else ""))
    print("| variant | speed-up vs eager fp32: median (min) | vs compiled fp32 | rel. output error vs fp32 |")
    print("|---|---|---|---|")
    for k in variants:
        print(f"| {k} | {r[k]} | {rc.get(k, '')} | {err[k]:.4f} |")
    sys.stdout.flush()


def timestep_aware(model):
    """The quantized model as a loaded checkpoint runs it: forward inside a timestep context (static
    layers read their calibrated range from it)."""
    from diffpro_cli.quant.layers import timestep_context

    base = model.forward_fn

    def forward(net, x, t, y):
        with timestep_context(t):
            return base(net, x, t, y)
    return dataclasses.replace(model, forward_fn=forward)


def size_plans(model) -> dict[str, dict]:
    from diffpro_cli.stages.quantize import uniform_plan

    plans = {"w8a8": uniform_plan(model, 8), "w4a8": uniform_plan(model, 4)}
    mixed = uniform_plan(model, 4)
    for name, (_, role) in model.quantizable_layers().items():   # sensitive roles keep 8 bits
        if role in ("time_embed", "class_embed", "patch_embed", "final"):
            mixed["layers"][name]["weight_bits"] = 8
    plans["mixed"] = mixed
    return plans


def bench_sizes(model, out_root: Path) -> None:
    """Write the uniform and a 4/8 mixed checkpoint (reused by the forward and memory benchmarks)."""
    from diffpro_cli.checkpoint import save_quantized

    fp32 = sum(t.numel() * 4 for t in model.net.state_dict().values() if t.is_floating_point())
    print(f"\n## Checkpoint size on disk ({model.spec}; fp32 state dict {fp32 / 1e6:.1f} MB)")
    print("| checkpoint | MB | avg weight bits | smaller than fp32 |")
    print("|---|---|---|---|")
    labels = {"mixed": "mixed 4/8 (embeddings, patch embed, final at 8; rest 4)"}
    for name, plan in size_plans(model).items():
        meta = save_quantized(model, plan, out_root / name)
        print(f"| {labels.get(name, name)} | {meta['totals']['bytes'] / 1e6:.1f} | {meta['totals']['avg_bits']:.2f} | {fp32 / meta['totals']['bytes']:.2f}x |")
    sys.stdout.flush()


def bench_forward_lean(model, out_root: Path, repeats: int, with_token: bool) -> None:
    """Whole DiT-XL/2 forward with memory to spare: quantized variants are loaded from the checkpoints
    bench_sizes wrote (the deployed path), torch's dynamic model from a second fresh build."""
    from diffpro_cli.checkpoint import load_quantized, save_quantized
    from diffpro_cli.stages.quantize import uniform_plan

    torch.manual_seed(0)
    x = torch.randn(2, *model.sample_shape)
    t = torch.full((2,), 500)
    y = torch.arange(2)
    torch_dyn = dit_xl(model.net.config.num_layers).net
    torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
    torch_dyn = torch.ao.quantization.quantize_dynamic(torch_dyn, {nn.Linear}, dtype=torch.qint8, inplace=True)
    gc.collect()
    variants = {"fp32": model, "torch-dyn": None, "diffpro-w8a8-dyn": load_quantized(out_root / "w8a8"),
                "diffpro-w4a8-dyn": load_quantized(out_root / "w4a8")}
    if BF16:   # the strongest float on a CPU with bf16 in hardware
        variants["bf16"] = copy.deepcopy(model).set_compute_dtype(torch.bfloat16)
    if with_token:
        save_quantized(model, uniform_plan(model, 8, 8, "dynamic-token"), out_root / "w8a8-token")
        variants["diffpro-w8a8-token"] = load_quantized(out_root / "w8a8-token")
    # the same W8A8 with every integer Linear on oneDNN's matmul instead of fbgemm (what a plan names
    # per layer when the cost table measures oneDNN faster: docs/planning.md, "Which integer kernel")
    onednn = uniform_plan(model, 8)
    for entry in onednn["layers"].values():
        entry["kernel"] = "cpu-onednn-int8"
    save_quantized(model, onednn, out_root / "w8a8-onednn")
    variants["diffpro-w8a8-dyn-onednn"] = load_quantized(out_root / "w8a8-onednn")

    def run(k):
        if k == "torch-dyn":
            return model.forward_fn(torch_dyn, x, t, y)[:, :4]
        return (variants[k] if k != "fp32" else model).eps(x, t, y)

    with torch.inference_mode():
        ref = run("fp32")
        err = {k: float((run(k) - ref).norm() / ref.norm()) for k in variants}
    times = interleaved({k: (lambda k=k: run(k)) for k in variants}, repeats)
    r = ratios(times)
    print(f"\n## Whole forward: {model.spec} (batch 2, threads {torch.get_num_threads()}, {repeats} interleaved repeats; "
          f"diffpro loaded from its checkpoints)")
    print(f"fp32 median {statistics.median(times['fp32']):.2f} s")
    print("| variant | speed-up vs fp32: median (min) | rel. output error vs fp32 |")
    print("|---|---|---|")
    for k in variants:
        print(f"| {k} | {r[k]} | {err[k]:.4f} |")
    sys.stdout.flush()


def peak_load_bytes(spec: str) -> int:
    """Peak RSS growth of a fresh process loading `spec` (diffpro_cli.metrics.memory; load only)."""
    from diffpro_cli.metrics.memory import subprocess_peak

    result = subprocess_peak(spec, batch=1, steps=0)
    if result["load_bytes"] is None:
        raise RuntimeError(f"loading {spec} in a fresh process {result['method']}")
    return result["load_bytes"]


def bench_memory(model, out_root: Path) -> None:
    """Peak RSS growth while loading and touching every tensor once (safetensors files may be mapped
    lazily): fp32 diffusers directory vs diffpro checkpoints, each in a fresh process."""
    fp_dir = out_root / "fp32-diffusers"
    model.net.save_pretrained(fp_dir)
    fp = max(peak_load_bytes(str(fp_dir)), 1)
    print(f"\n## Peak load memory ({model.spec}), fresh process, RSS growth")
    print("| checkpoint | peak MB | fraction of fp32 |")
    print("|---|---|---|")
    print(f"| fp32 (diffusers dir) | {fp / 1e6:.0f} | 1.00 |")
    for name in ("w8a8", "w4a8", "mixed"):
        d = out_root / name
        if (d / "diffpro.json").exists():
            q = peak_load_bytes(str(d))
            print(f"| diffpro {name} | {q / 1e6:.0f} | {q / fp:.2f} |")
    sys.stdout.flush()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--layer-repeats", type=int, default=9)
    ap.add_argument("--forward-repeats", type=int, default=3)
    ap.add_argument("--forward-layers", type=int, default=28, help="DiT-XL/2 blocks (28 = the real model)")
    ap.add_argument("--skip-layers", action="store_true")
    ap.add_argument("--skip-forward", action="store_true")
    ap.add_argument("--skip-builtin", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-sizes", action="store_true")
    ap.add_argument("--no-torchao", action="store_true")
    ap.add_argument("--compiled", action="store_true", help="also torch.compile fp32 and diffpro W8A8 (quant/compiled.py); "
                    "compile takes ~20-60 s per variant on 2 cores")
    ap.add_argument("--builtin-batch", type=int, default=8, help="batch of the built-in models' forward (bench's latency batch: 8)")
    ap.add_argument("--builtin-repeats", type=int, default=15)
    ap.add_argument("--with-token", action="store_true", help="also time a per-token W8A8 DiT-XL/2 (needs ~1.6 GB more)")
    ap.add_argument("--out", type=Path, default=None, help="scratch directory for checkpoints (default: a temp dir)")
    args = ap.parse_args(argv)
    from diffpro_cli.allocator import steady_allocator

    print(f"malloc: {steady_allocator()}")   # what diffpro's stages run under (allocator.py)
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffpro_cli.quant.kernels import cpu_has_amx_int8, cpu_has_vnni

    print(f"# diffpro kernel benchmark — torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
          f"capability {torch.backends.cpu.get_cpu_capability()}, VNNI {cpu_has_vnni()}, AMX int8 {cpu_has_amx_int8()}, "
          f"native bf16 {BF16}")
    with_torchao = not args.no_torchao
    if args.compiled:
        from diffpro_cli.quant.compiled import unavailable_reason

        if unavailable_reason():
            print(f"compiled variants skipped: {unavailable_reason()}")
            args.compiled = False
    if not args.skip_layers:
        bench_layers(args.layer_repeats, with_torchao, with_compiled=args.compiled)
        if not args.skip_builtin:
            bench_layers(args.layer_repeats, with_torchao, BUILTIN_LAYERS, "builtin:dit-mnist shapes, batch 8", args.compiled)
    if not args.skip_builtin:
        from diffpro_cli.loading import load_model

        for spec in ("builtin:dit-mnist", "builtin:unet-mnist"):
            bench_forward(load_model(spec), args.builtin_batch, args.builtin_repeats, with_torchao, spec, args.compiled)
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        if args.skip_forward and args.skip_sizes and args.skip_memory:
            return
        model = dit_xl(args.forward_layers)
        bench_sizes(model, Path(tmp))          # the checkpoints the next two steps use
        if not args.skip_forward:
            bench_forward_lean(model, Path(tmp), args.forward_repeats, args.with_token)
            gc.collect()
        if not args.skip_memory:
            bench_memory(model, Path(tmp))


if __name__ == "__main__":
    main()
