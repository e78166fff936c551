"""The GPU check of issue #20, prepared to run in one go on a lent GPU (`make cuda-check`).

    python benchmarks/cuda_kernels.py [--arch dit-xl-2] [--batch 8] [--repeats 20] [--json OUT.json]

DiT-XL/2 with random weights (speed and numerics against the same network in float, never quality),
one forward at `--batch` latents (4×32×32, 256 tokens), timed with CUDA events after warm-up:
  fp16, bf16                         the float baselines (the whole network cast)
  w8a8 (dynamic / dynamic-token)     every Linear on torch._int_mm (cuda-int8-intmm); the rest in fp16
  w4a16                              every Linear with K % 128 == 0 on tinygemm int4 (cuda-int4-tinygemm)
  w8-fp8 (sm ≥ 8.9)                  the same W8 weights re-rounded to e4m3 on torch._scaled_mm
The patch embedding and final layer compute on float activations from their stored weights, as
`quantize --bits` does. Prints a markdown table (ms per forward, speed-up vs fp16, relative error of
the output against the fp32 network, kernels used) and writes it as JSON with `--json`.
Without CUDA it says so and exits 0, so it is safe anywhere. Every kernel here is UNVERIFIED until this
script has run on a GPU: if one fails, its row says why and the others still run.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

# see benchmarks/kernels.py: this folder must not shadow the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch

VARIANTS = ("fp16", "bf16", "w8a8-dynamic", "w8a8-token", "w4a16", "w8-fp8")


def _float_rest(net: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast every float parameter and buffer outside diffpro's quant layers (their scales stay float32)."""
    for mod in net.modules():
        if getattr(mod, "is_diffpro_quant", False):
            continue
        for store in (mod._parameters, mod._buffers):
            for key, t in store.items():
                if t is not None and t.is_floating_point():
                    store[key] = torch.nn.Parameter(t.to(dtype), requires_grad=False) if isinstance(t, torch.nn.Parameter) else t.to(dtype)


def build(variant: str, spec: str):
    """The network of `variant` on the GPU, and the dtype its inputs take."""
    import diffpro
    from diffpro_cli.stages.quantize import uniform_plan

    model = diffpro.load(spec, seed=0)
    net = model.net.eval()
    if variant in ("fp16", "bf16"):
        dtype = torch.float16 if variant == "fp16" else torch.bfloat16
        return net.to(dtype).cuda(), dtype
    if variant == "w4a16":
        plan = uniform_plan(model, 4, act_bits=16, group_size=128)
    else:
        plan = uniform_plan(model, 8, act_mode="dynamic" if variant == "w8a8-dynamic" else "dynamic-token")
    diffpro.quantize_(model, plan, fuse=variant != "w8-fp8")
    if variant == "w8-fp8":
        for mod in net.modules():
            if getattr(mod, "is_diffpro_quant", False) and mod.kind == "linear" and mod.act_mode == "dynamic-token":
                mod.prefer = "cuda-fp8"
    _float_rest(net, torch.float16)
    return net.cuda(), torch.float16


def forward(net, x, t, y):
    return net(x, timestep=t, class_labels=y, return_dict=False)[0]


def time_forward(net, args, repeats: int) -> float:
    """Median ms per forward (CUDA events, after 3 warm-up calls)."""
    with torch.inference_mode():
        for _ in range(3):
            forward(net, *args)
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            forward(net, *args)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="dit-xl-2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_kernels: no CUDA device here; nothing to measure (run it on a GPU machine)")
        return 0
    spec = f"random:{args.arch}"
    gpu = torch.cuda.get_device_name(0)
    print(f"{gpu}, torch {torch.__version__}, {spec}, batch {args.batch}")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 4, 32, 32, generator=gen)
    t = torch.randint(0, 1000, (args.batch,), generator=gen)
    y = torch.randint(0, 1000, (args.batch,), generator=gen)

    import diffpro

    ref_net = diffpro.load(spec, seed=0).net.eval().cuda()
    with torch.inference_mode():
        ref = forward(ref_net, x.cuda(), t.cuda(), y.cuda()).float()
    del ref_net
    torch.cuda.empty_cache()

    rows = []
    for variant in [v for v in args.variants.split(",") if v]:
        row = {"variant": variant}
        try:
            t0 = time.perf_counter()
            net, dtype = build(variant, spec)
            inputs = (x.cuda().to(dtype), t.cuda(), y.cuda())
            with torch.inference_mode():
                out = forward(net, *inputs).float()
            row["rel_error_vs_fp32"] = float((out - ref).norm() / ref.norm())
            row["ms"] = time_forward(net, inputs, args.repeats)
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
            row["kernels"] = dict(collections.Counter(m.kernel_name for m in net.modules() if getattr(m, "is_diffpro_quant", False)))
            row["build_s"] = time.perf_counter() - t0
            del net
        except Exception as exc:   # noqa: BLE001  (an unverified kernel failing must not hide the other rows)
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        rows.append(row)
        print(json.dumps(row), flush=True)

    base = next((r["ms"] for r in rows if r["variant"] == "fp16" and "ms" in r), None)
    print(f"\n| variant | ms / forward (batch {args.batch}) | vs fp16 | rel. error vs fp32 | kernels |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | failed: {r['error']} | | | |")
            continue
        speed = f"{base / r['ms']:.2f}x" if base else "n/a"
        kernels = ", ".join(f"{k}×{n}" for k, n in r["kernels"].items()) or "float"
        print(f"| {r['variant']} | {r['ms']:.2f} | {speed} | {r['rel_error_vs_fp32']:.4f} | {kernels} |")
    if args.json:
        args.json.write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "spec": spec, "batch": args.batch, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
