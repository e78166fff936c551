"""score's calibration inputs and single-layer errors: measured (--measure) or first-order estimated (taylor).

The calibration inputs are the profile's own (same seed, samples, timesteps); each error is the
relative MSE of the noise prediction when ONE layer is quantised.
"""

from __future__ import annotations

import torch


def pick_timesteps(timesteps: list[int], k: int) -> list[int]:
    """k of the timesteps, evenly spread (all of them when k ≥ len)."""
    if k >= len(timesteps):
        return list(timesteps)
    idx = torch.linspace(0, len(timesteps) - 1, k).round().long().tolist()
    return [timesteps[i] for i in sorted(set(idx))]


@torch.no_grad()
def calibration_set(model, profile_doc: dict, n_samples: int, n_timesteps: int):
    """(x_t, t, y, timesteps, n) of the profile's first n samples at evenly spread profile timesteps.

    Sample i depends only on (seed, i, label, timesteps), so these are the inputs the profile saw.
    """
    from diffpro_cli.sampling import SamplerConfig, sample
    from diffpro_cli.stages.profile import calibration_labels

    cal = profile_doc["calibration"]
    ts = list(cal["timesteps"])
    n = min(n_samples, int(cal["samples"]))
    keep = set(pick_timesteps(ts, n_timesteps))
    labels = calibration_labels(model, int(cal["samples"]), cal.get("classes"))
    labels = labels[:n] if labels is not None else None
    batch = int(cal["batch"])
    xs, tt, ys = [], [], []
    calls = [0]

    def on_step(t, x, eps):
        b = calls[0] // len(ts)
        calls[0] += 1
        if t in keep:
            xs.append(x.clone())
            tt.append(torch.full((x.shape[0],), int(t), dtype=torch.long))
            if labels is not None:
                ys.append(labels[b * batch: b * batch + x.shape[0]])

    sampler = SamplerConfig(method=cal["sampler"]["method"], cfg_scale=cal["sampler"]["cfg_scale"])
    sample(model, n, ts, sampler, labels=labels, seed=int(cal["seed"]), batch_size=batch, on_step=on_step, decode=False)
    from diffpro_cli.models.conditioning import cat_conditions

    y = cat_conditions(ys) if labels is not None else None   # labels, or a Conditioning (embedding models)
    return torch.cat(xs), torch.cat(tt), y, sorted(keep), n


@torch.no_grad()
def _eps_all(model, x, t, y, batch: int) -> torch.Tensor:
    outs = []
    for s in range(0, x.shape[0], batch):
        outs.append(model.eps(x[s:s + batch], t[s:s + batch], y[s:s + batch] if y is not None else None))
    return torch.cat(outs)


@torch.no_grad()
def reference_eps(model, x, t, y, batch: int) -> tuple[torch.Tensor, float]:
    """The unquantised prediction on the calibration inputs and its Σ‖eps‖²: every measured error is
    relative to it, so `score` computes it once and hands it to each measurement."""
    ref = _eps_all(model, x, t, y, batch)
    return ref, float(ref.double().square().sum()) or 1.0


def relative_error(out: torch.Tensor, reference: tuple[torch.Tensor, float]) -> float:
    ref, denom = reference
    return float((out - ref).double().square().sum()) / denom


@torch.no_grad()
def error_with_weight(model, mod, weight: torch.Tensor, x, t, y, reference, batch: int) -> float:
    """The relative error of the prediction with `mod`'s weight replaced by `weight` (restored after)."""
    original = mod.weight.data.clone()
    mod.weight.data.copy_(weight)
    try:
        return relative_error(_eps_all(model, x, t, y, batch), reference)
    finally:
        mod.weight.data.copy_(original)


def kernel_grid(probe) -> tuple[str, str, int | None, bool]:
    """(grid key, activation scheme, qmax, reduce_range) of the kernel a prepared quant layer runs: the
    key is the input grid's bits ("8", "7"), "8" for kernels with float activations."""
    from diffpro_cli.quant.kernels import act_bits_of

    kernel = probe._kernel
    qmax = kernel.act_qmax
    return ("8" if qmax is None else str(act_bits_of(qmax)), kernel.act_scheme(probe), qmax,
            getattr(kernel, "reduce_range", False))


def _group(w: torch.Tensor, group_size: int | None) -> int | None:
    return group_size if group_size and w[0].numel() % group_size == 0 else None


@torch.no_grad()
def measure_layer_errors(model, names: list[str], x, t, y, bits: list[int], group_size: int | None = None,
                         batch: int = 16, advance=lambda n=1: None, reference=None) -> dict[str, dict[str, float]]:
    """Σ‖eps_q - eps‖² / Σ‖eps‖² when ONE layer's weights are fake-quantised, per layer and bit width.
    `reference`: reference_eps of these inputs, when the caller has it."""
    from diffpro_cli.quant.reference import fake_quant_weight

    layers = model.quantizable_layers()
    reference = reference or reference_eps(model, x, t, y, batch)
    result = {}
    for name in names:
        mod = layers[name][0]
        w = mod.weight.data
        per_bits = {}
        for b in bits:
            per_bits[str(b)] = error_with_weight(model, mod, fake_quant_weight(w, b, _group(w, group_size)),
                                                 x, t, y, reference, batch)
            advance(1)
        result[name] = per_bits
    return result


@torch.no_grad()
def measure_act_errors(model, names: list[str], x, t, y, act_mode: str = "dynamic", batch: int = 16,
                       advance=lambda n=1: None, reference=None) -> dict[str, dict[str, float]]:
    """Σ‖eps_q - eps‖² / Σ‖eps‖² when ONE layer's INPUT is quantised exactly as its CPU integer kernel
    quantises it (the kernel's own scheme and grid, weights kept float), per layer → {act bits: error}
    for each input grid the kernels use at 4- and 8-bit weights: "8" with VNNI, "7" without
    (quant/kernels.py::cpu_act_qmax). Why: a layer's activation error has nothing to do with its weight
    error (a patch embedding sees x_t itself), so the allocator should not reuse the weight curve for it.
    Static mode is measured with one range per call: its calibrated ranges do not exist yet."""
    from diffpro_cli.quant.layers import quantize_module

    layers = model.quantizable_layers()
    reference = reference or reference_eps(model, x, t, y, batch)
    mode = "dynamic" if act_mode == "static" else act_mode
    result = {}
    for name in names:
        result[name] = {}
        for weight_bits in (4, 8):   # the two activation grids the CPU kernels use (identical with VNNI)
            key, scheme, qmax, reduce_range = kernel_grid(quantize_module(layers[name][0], weight_bits, act_bits=8, act_mode=mode))
            if key not in result[name]:
                result[name][key] = _act_error(model, layers[name][0], x, t, y, reference, batch, scheme, qmax, reduce_range)
        advance(1)
    return result


def _act_error(model, mod, x, t, y, reference, batch, scheme, qmax, reduce_range) -> float:
    """Relative eps error with `mod`'s input fake-quantised on the kernel's grid (0 for float kernels)."""
    from diffpro_cli.quant.reference import reference_activation

    if scheme == "float" or qmax is None:   # a kernel with float activations adds no error
        return 0.0

    def quantise_input(module, inputs, scheme=scheme, qmax=qmax, reduce_range=reduce_range):
        x_in = inputs[0]
        flat = x_in if scheme == "sample" else x_in.reshape(-1, x_in.shape[-1])
        x_hat = reference_activation(flat, scheme, qmax, None, reduce_range)[0]
        return (x_hat.to(x_in.dtype).reshape(x_in.shape), *inputs[1:])

    handle = mod.register_forward_pre_hook(quantise_input)
    try:
        out = _eps_all(model, x, t, y, batch)
    finally:
        handle.remove()
    return relative_error(out, reference)


def _layer_delta(module, x: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    """The change of the layer's output when its weight changes by dw (bias unchanged)."""
    if isinstance(module, torch.nn.Conv2d):
        return module._conv_forward(x, dw, None)
    return torch.nn.functional.linear(x, dw)


def taylor_layer_errors(model, names: list[str], x, t, y, bits: list[int], group_size: int | None = None,
                        batch: int = 16, probes: int = 2, seed: int = 0, advance=lambda n=1: None) -> dict[str, dict[str, float]]:
    """First-order estimate of `measure_layer_errors` for every layer at once.

    eps changes by J_l Δy_l when layer l's output changes by Δy_l = ΔW_l x_l. With a Gaussian probe r per
    sample, E_r[(rᵀ J_l Δy_l)²] = ‖J_l Δy_l‖², and rᵀ J_l = ∂(rᵀ eps)/∂y_l comes from ONE backward pass
    for all layers. Cost: probes × (forward + backward) per batch, plus one extra GEMM per layer and bit
    width, instead of one forward per layer and bit width.
    """
    from diffpro_cli.quant.reference import fake_quant_weight

    table = model.quantizable_layers()
    modules = {n: table[n][0] for n in names}
    num = {n: {b: 0.0 for b in bits} for n in names}
    den = 0.0
    gen = torch.Generator().manual_seed(seed)
    saved = [(p, p.requires_grad) for p in model.net.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        for s in range(0, x.shape[0], batch):
            xb, tb = x[s:s + batch], t[s:s + batch]
            yb = y[s:s + batch] if y is not None else None
            n = xb.shape[0]
            for _ in range(probes):
                records = []

                def hook(mod, args, out, name):
                    z = torch.zeros_like(out, requires_grad=True)
                    records.append((name, mod, args[0].detach(), z))
                    return out + z

                handles = [m.register_forward_hook(lambda m, a, o, name=nm: hook(m, a, o, name)) for nm, m in modules.items()]
                try:
                    with torch.enable_grad():
                        eps = model.eps(xb, tb, yb)
                        r = torch.randn(eps.shape, generator=gen).to(eps.device)   # same probes on every device
                        grads = torch.autograd.grad((eps * r).sum(), [z for *_, z in records], allow_unused=True)
                finally:
                    for h in handles:
                        h.remove()
                den += float(eps.detach().double().square().sum()) / probes
                acc = {}
                with torch.no_grad():
                    for (name, mod, xin, _), g in zip(records, grads):
                        if g is None:
                            continue
                        w = mod.weight.detach()
                        for b in bits:
                            dy = _layer_delta(mod, xin, fake_quant_weight(w, b, _group(w, group_size)) - w)
                            v = (g * dy).reshape(n, -1).sum(1) if dy.shape[0] == n else (g * dy).sum().reshape(1)
                            acc[(name, b)] = acc.get((name, b), 0) + v.double()
                for (name, b), v in acc.items():
                    num[name][b] += float(v.square().sum()) / probes
                del records, grads
            advance(n)
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
    den = den or 1.0
    return {n: {str(b): num[n][b] / den for b in bits} for n in names}
