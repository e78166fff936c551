"""DDPM (ancestral) and DDIM sampling over ANY increasing subset of the training timesteps.

Given kept timesteps τ_1 < … < τ_K, the sampler walks τ_K → τ_1 and treats the subset as its own
Markov chain with alphas ᾱ(τ_i) (the respacing of Nichol & Dhariwal): for the full subset 0..T-1
this is exactly standard DDPM, and for a uniform subset it is DDIM. Noise is drawn per sample from
its own generator seeded by (seed, sample index), so sample i is the same whatever the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from diffpro_cli.errors import UsageError
from diffpro_cli.models.base import DiffusionModel

SAMPLE_SEED_STRIDE = 1_000_003


def uniform_timesteps(num_train: int, steps: int) -> list[int]:
    """`steps` evenly spaced training timesteps from 0 to num_train - 1, increasing: diffusers' DDIM
    "linspace" spacing, except that one step is the last timestep (diffusers gives 0, a no-op sampler)."""
    from diffusers import DDIMScheduler

    if not 1 <= steps <= num_train:
        raise UsageError(f"--steps {steps}: must be between 1 and {num_train}")
    if steps == 1:
        return [num_train - 1]
    sched = DDIMScheduler(num_train_timesteps=num_train, timestep_spacing="linspace")
    sched.set_timesteps(steps)
    return sorted(set(int(t) for t in sched.timesteps))


def parse_timesteps(text: str, num_train: int) -> list[int]:
    """'start:stop:step' (inclusive range, any direction) or comma list → sorted unique ints."""
    try:
        if ":" in text:
            a, b, step = (int(v) for v in text.split(":"))
            step = abs(step) or 1
            lo, hi = min(a, b), max(a, b)
            values = list(range(hi, lo - 1, -step))
        else:
            values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"timesteps {text!r}: use START:STOP:STEP (e.g. 999:0:50) or a comma list") from None
    values = sorted(set(min(max(v, 0), num_train - 1) for v in values))
    if not values:
        raise UsageError(f"timesteps {text!r}: selects no timestep")
    return values


def validate_timesteps(timesteps: Sequence[int], num_train: int) -> list[int]:
    ts = [int(t) for t in timesteps]
    if not ts:
        raise UsageError("timestep subset is empty; keep at least one step")
    if any(b <= a for a, b in zip(ts, ts[1:])):
        raise UsageError("timesteps must be strictly increasing; sort and de-duplicate them")
    if ts[0] < 0 or ts[-1] >= num_train:
        raise UsageError(f"timesteps must lie in [0, {num_train - 1}]")
    return ts


def sample_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * SAMPLE_SEED_STRIDE + int(i)) for i in indices]


def default_labels(model: DiffusionModel, n: int) -> torch.Tensor | None:
    """Class i % num_classes for sample i (so a grid of 10·k shows every class)."""
    if model.num_classes is None:
        return None
    return torch.arange(n) % model.num_classes


def initial_batches(model: DiffusionModel, n: int, labels, seed: int, batch_size: int, first_index: int):
    """Yields (global indices, per-sample generators, x_T, labels) batch by batch."""
    if labels is None:
        labels = default_labels(model, first_index + n)
        labels = labels[first_index:] if labels is not None else None
    for start in range(0, n, batch_size):
        idx = list(range(first_index + start, first_index + min(n, start + batch_size)))
        gens = sample_generators(seed, idx)
        x = torch.stack([torch.randn(model.sample_shape, generator=g) for g in gens])
        yield idx, gens, x, (labels[start:start + len(idx)] if labels is not None else None)


@dataclass
class SamplerConfig:
    method: str = "ddim"        # "ddim" | "ddpm"
    eta: float = 0.0            # DDIM only
    cfg_scale: float = 1.0      # 1.0 = no guidance
    clip_x0: bool = True        # clip the predicted x0 to [-1, 1] (pixel-space models); DDIM then uses
                                # the eps implied by the clipped x0

    def as_dict(self) -> dict:
        return dict(method=self.method, eta=self.eta, cfg_scale=self.cfg_scale, clip_x0=self.clip_x0)


def guided_eps(model: DiffusionModel, x: torch.Tensor, t: int, y: torch.Tensor | None, cfg_scale: float) -> torch.Tensor:
    tt = torch.full((x.shape[0],), int(t), dtype=torch.long)
    if y is None or cfg_scale == 1.0 or model.null_class is None:
        return model.eps(x, tt, y)
    null = torch.full_like(y, model.null_class)
    both = model.eps(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, null]))
    cond, uncond = both.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def _randn_like(x: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    return torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens])


def step(x, eps, a_t: float, a_prev: float, cfg: SamplerConfig, gens) -> torch.Tensor:
    """One update from ᾱ_t to ᾱ_prev (ᾱ_prev = 1 after the last step)."""
    x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
    if cfg.clip_x0:
        x0 = x0.clamp(-1, 1)
        if cfg.method == "ddim":
            # the eps consistent with the clipped x0 (ADM's DDIM; diffusers' use_clipped_model_output):
            # keeping the raw eps adds a jump at every step, so more steps would not converge
            eps = (x - a_t ** 0.5 * x0) / (1 - a_t) ** 0.5
    if cfg.method == "ddpm":
        beta = 1 - a_t / a_prev
        mean = (a_prev ** 0.5 * beta / (1 - a_t)) * x0 + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t)) * x
        var = beta * (1 - a_prev) / (1 - a_t)   # "fixed_small" posterior variance
        if a_prev >= 1.0 or var <= 0:
            return mean
        return mean + var ** 0.5 * _randn_like(x, gens)
    if cfg.method == "ddim":
        sigma = cfg.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5 if a_prev < 1 else 0.0
        out = a_prev ** 0.5 * x0 + max(0.0, 1 - a_prev - sigma ** 2) ** 0.5 * eps
        if sigma > 0:
            out = out + sigma * _randn_like(x, gens)
        return out
    raise UsageError(f"--method {cfg.method}: unknown sampler; use ddim or ddpm")


@torch.no_grad()
def sample(
    model: DiffusionModel,
    n: int,
    timesteps: Sequence[int],
    cfg: SamplerConfig = SamplerConfig(),
    labels: torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int = 16,
    first_index: int = 0,
    advance: Callable[[int], None] = lambda k: None,
    on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    decode: bool = True,
) -> torch.Tensor:
    """n samples [n, C, H, W] (decoded) walking `timesteps` (increasing list) from high to low.

    Sample j (global index first_index + j) depends only on (seed, global index, label, timesteps).
    `on_step(t, x_t, eps)` observes every model call (profiling, drift measurement).
    """
    ts = validate_timesteps(timesteps, model.num_train_timesteps)
    acp = model.alphas_cumprod
    outs = []
    for idx, gens, x, y in initial_batches(model, n, labels, seed, batch_size, first_index):
        for i in range(len(ts) - 1, -1, -1):
            t = ts[i]
            a_t = float(acp[t])
            a_prev = float(acp[ts[i - 1]]) if i > 0 else 1.0
            eps = guided_eps(model, x, t, y, cfg.cfg_scale)
            if on_step is not None:
                on_step(t, x, eps)
            x = step(x, eps, a_t, a_prev, cfg, gens)
            advance(len(idx))
        outs.append(model.decode(x) if decode else x)
    return torch.cat(outs) if outs else torch.empty(0, *model.sample_shape)


def save_grid(images: torch.Tensor, path, nrow: int | None = None) -> None:
    """Write a PNG grid of samples in [-1, 1]. 1 or 3 channels as they are; other counts (undecoded
    latents, e.g. 4 channels) show their first three channels as RGB (first one as gray for 2), the
    usual quick look at a latent."""
    import io
    import math

    import numpy as np
    from PIL import Image

    from diffpro_cli.artifacts import atomic_write_bytes
    from diffpro_cli.mnist import to_uint8

    if images.shape[1] not in (1, 3):
        images = images[:, :3] if images.shape[1] > 3 else images[:, :1]
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    pad = 2
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    pix = to_uint8(images).permute(0, 2, 3, 1).numpy()
    for k in range(n):
        r, q = divmod(k, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = pix[k]
    buf = io.BytesIO()
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def betas_from_alphas_cumprod(acp: torch.Tensor) -> torch.Tensor:
    prev = torch.cat([torch.ones(1, dtype=acp.dtype), acp[:-1]])
    return 1 - acp / prev


@torch.no_grad()
def sample_dpmsolver(
    model: DiffusionModel,
    n: int,
    steps: int,
    cfg_scale: float = 1.0,
    labels: torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int = 16,
    first_index: int = 0,
    advance: Callable[[int], None] = lambda k: None,
    decode: bool = True,
) -> torch.Tensor:
    """DPM-Solver++ (2nd order multistep, diffusers' scheduler) at `steps` steps, same seeded initial noise."""
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=model.num_train_timesteps,
        trained_betas=betas_from_alphas_cumprod(model.alphas_cumprod).float().numpy(),
        algorithm_type="dpmsolver++", solver_order=2,
    )
    outs = []
    for idx, gens, x, y in initial_batches(model, n, labels, seed, batch_size, first_index):
        sched.set_timesteps(steps)
        for t in sched.timesteps:
            eps = guided_eps(model, x, int(t), y, cfg_scale)
            x = sched.step(eps, t, x).prev_sample
            advance(len(idx))
        outs.append(model.decode(x) if decode else x)
    return torch.cat(outs) if outs else torch.empty(0, *model.sample_shape)
