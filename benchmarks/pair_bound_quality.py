"""Quality of pair-bounded weights (quant/pair_bound.py) on the AVX2 integer code paths.

    python benchmarks/pair_bound_quality.py [--model builtin:dit-mnist] [--samples 32] [--steps 50]

Uniform W8A8 dynamic (patch embedding and final layer on float activations, `quantize --bits 8`'s
default plan), built with `diffpro.quantize_`, real kernels. Each variant runs in its own process,
because fbgemm/oneDNN read their ISA caps once per process:
  fp32        float model, no caps (the reference)
  vnni        no caps: VNNI, 8-bit activations
  avx2-a7     caps: today's rule, 7-bit activations for 8-bit weights
  avx2-pb     caps: 8-bit activations, stored integers pair-bounded (excess split from the integers)
  avx2-pbt    caps: 8-bit activations, violating pairs re-rounded jointly from the float weights
  avx2-a8     caps: 8-bit activations, unbounded weights (saturates: shows what the bound buys)
  avx2-pbs    caps: 8-bit activations, per-channel scale searched (x1 … x127/64) for the least weight
              error after the joint pair bound (x127/64 is the global |q| ≤ 64 cap, so never worse)
  avx2-pbsq   as avx2-pbs, searched from the stored integers (target q·scale, not the float weights):
              what a kernel could do at prepare time, leaving checkpoints unchanged
  avx2-cap64  caps: 8-bit activations, global |q| ≤ 64 (scale x127/64; no pair can saturate)
  vnni-pb     no caps: the avx2-pbt integers on VNNI (separates the bound's weight error from the kernel)
  vnni-pbs    no caps: the avx2-pbs integers and scales on VNNI (what stored AVX2-safe weights cost there)
  avx2-gptq   caps: `quantize --rounding gptq --pair-bound off` (GPTQ unbounded: 7-bit activations)
  avx2-gptq-pb  caps: `quantize --rounding gptq --pair-bound on` (pair_bound.bounded_gptq: 8-bit activations)
  vnni-gptq   no caps: `quantize --rounding gptq` (unbounded, 8-bit activations: the VNNI reference)
The gptq rows write a real checkpoint (calibration: quantize's defaults, 4 trajectories x 50 steps) and load it.
Prints PSNR of the final samples against fp32 (same seeds) and the fraction of weights the bound changed.
The pair-bound variants patch `kernels.cpu_act_qmax` to 127 in-process (this script only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

AVX2_ENV = {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
            "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
# this folder holds kernels.py, which would shadow the `kernels` package diffusers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
VARIANTS = ("fp32", "vnni", "avx2-a7", "avx2-pb", "avx2-pbt", "avx2-a8", "avx2-pbs", "avx2-pbsq", "avx2-cap64", "vnni-pb", "vnni-pbs",
            "avx2-gptq", "avx2-gptq-pb", "vnni-gptq")
GPTQ = ("avx2-gptq", "avx2-gptq-pb", "vnni-gptq")
BOUNDED = ("avx2-pb", "avx2-pbt", "avx2-pbs", "avx2-pbsq", "avx2-cap64", "vnni-pb", "vnni-pbs")


def bounded_weights(variant: str, w, q, scale):
    """(integers, scale, changed) for a pair-bound variant; `w` float [out, K], `q`/`scale` as stored."""
    import torch

    from diffpro_cli.quant.formats import fp16_scale
    from diffpro_cli.quant.pair_bound import bounded_channel_grid, pair_bound

    if variant == "avx2-pb":
        fixed, n = pair_bound(q)
        return fixed, scale, n
    if variant in ("avx2-pbt", "vnni-pb"):
        fixed, n = pair_bound(q, w / scale)
        return fixed, scale, n
    if variant == "avx2-cap64":
        s = fp16_scale(scale * 127 / 64)
        fixed = torch.round(w / s).clamp(-64, 64).to(torch.int8)
        return fixed, s, int((fixed != q).sum())
    fixed, s, n = bounded_channel_grid(q, scale, None if variant == "avx2-pbsq" else w)
    return fixed, s.reshape(-1, 1), n


def run_variant(args) -> None:
    import torch

    import diffpro
    from diffpro_cli.quant import kernels
    from diffpro_cli.quant.layers import _QuantBase
    from diffpro_cli.sampling import SamplerConfig, sample, uniform_timesteps
    from diffpro_cli.stages.quantize import uniform_plan

    model = diffpro.load(args.model)
    info = {"variant": args.variant, "vnni": kernels.cpu_has_vnni(), "capability": torch.backends.cpu.get_cpu_capability()}
    if args.variant in GPTQ:
        from diffpro_cli.stages.quantize import QuantizeConfig, quantize_to_dir

        ckpt = Path(args.out) / f"{args.variant}-ckpt"
        cfg = QuantizeConfig(rounding="gptq", pair_bound="on" if args.variant == "avx2-gptq-pb" else "off")
        quantize_to_dir(model, uniform_plan(model, 8), ckpt, cfg=cfg)
        model = diffpro.load(ckpt)
        info["pair_bounded_layers"] = sum(bool(getattr(m, "pair_bounded", False)) for m in model.net.modules())
    elif args.variant != "fp32":
        floats = {n: m.weight.detach().clone() for n, m in model.net.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)}
        if args.variant.startswith("avx2-") and args.variant != "avx2-a7":
            kernels.cpu_act_qmax = lambda bits, group_size=None, pair_bounded=False: 127
        diffpro.quantize_(model, uniform_plan(model, 8))
        changed = total = 0
        err2 = ref2 = 0.0
        for name, layer in model.net.named_modules():
            if not isinstance(layer, _QuantBase) or layer.act_mode == "none" or args.variant not in BOUNDED:
                continue
            assert layer.weight_bits == 8 and layer.weight_scale.shape[1] == 1 and layer.kind == "linear"
            q, scale = layer.int_weight(), layer.weight_scale.float().cpu()
            w = floats[name].reshape(q.shape[0], -1).float()
            fixed, new_scale, n = bounded_weights(args.variant, w, q, scale)
            changed, total = changed + n, total + q.numel()
            err2 += float(((fixed.float() * new_scale - w) ** 2).sum())
            ref2 += float(((q.float() * scale - w) ** 2).sum())
            layer.qweight = fixed.reshape(layer.qweight.shape).to(layer.qweight.device)
            layer.weight_scale = new_scale.to(layer.weight_scale.device)
            layer._forget_kernel()   # rebuilt from the bounded integers at the first call
        if total:
            info["weight_mse_vs_rtn"] = err2 / ref2
        info.update(changed=changed, total=total)
    ts = uniform_timesteps(model.num_train_timesteps, args.steps)
    with torch.inference_mode():
        x = sample(model, args.samples, ts, SamplerConfig(method="ddim"), seed=args.seed, batch_size=args.samples)
    kernel_names = sorted({m.kernel_name for m in model.net.modules() if isinstance(m, _QuantBase)})
    info["kernels"] = kernel_names
    torch.save(x, Path(args.out) / f"{args.variant}.pt")
    (Path(args.out) / f"{args.variant}.json").write_text(json.dumps(info))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:dit-mnist")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--variant", help=argparse.SUPPRESS)   # internal: run one variant in this process
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return run_variant(args)

    import torch

    from diffpro_cli.metrics.paired import psnr

    out = Path(tempfile.mkdtemp(prefix="pair-bound-"))
    variants = ["fp32"] + [v for v in args.variants.split(",") if v != "fp32"]
    for v in variants:
        env = dict(os.environ, **AVX2_ENV) if v.startswith("avx2") else {k: s for k, s in os.environ.items() if k not in AVX2_ENV}
        cmd = [sys.executable, __file__, "--variant", v, "--out", str(out), "--model", args.model,
               "--samples", str(args.samples), "--steps", str(args.steps), "--seed", str(args.seed)]
        subprocess.run(cmd, env=env, check=True)
    ref = torch.load(out / "fp32.pt")
    print(f"{args.model}, uniform W8A8 dynamic (ends on float activations), {args.samples} samples x {args.steps} DDIM steps")
    print(f"{'variant':<10} {'PSNR vs fp32':>13} {'changed weights (weight MSE vs RTN)':>36}  capability / kernels")
    for v in variants[1:]:
        info = json.loads((out / f"{v}.json").read_text())
        p = psnr(torch.load(out / f"{v}.pt"), ref)
        frac = (f"{100 * info['changed'] / info['total']:.2f}% (mse x{info['weight_mse_vs_rtn']:.1f})"
                if info.get("total") else "")
        if "pair_bounded_layers" in info:
            frac = f"{info['pair_bounded_layers']} layers pair-bounded"
        print(f"{v:<10} {p.mean():>10.2f} dB {frac:>36}  {info['capability']} vnni={info['vnni']} {', '.join(info['kernels'])}")


if __name__ == "__main__":
    main()
