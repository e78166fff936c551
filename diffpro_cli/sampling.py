"""DDPM (ancestral), DDIM and flow-matching Euler sampling over ANY increasing subset of the training timesteps.

Every model has a discrete training schedule of N steps indexed 0 … N-1 (increasing noise): ᾱ_t for
epsilon and v-prediction models, σ_t (flow-matching sigmas with shift, `DiffusionModel.sigmas()`) for
flow models. A subset is a strictly increasing list of those integer indices: that is what prune selects,
what plans record and what the network is called with (a flow network's timestep σ_t·N is applied inside
the network call, see models.base `flow_timesteps`).

Given kept timesteps τ_1 < … < τ_K, the sampler walks τ_K → τ_1 and treats the subset as its own
Markov chain with alphas ᾱ(τ_i) (the respacing of Nichol & Dhariwal): for the full subset 0..T-1
this is exactly standard DDPM, and for a uniform subset it is DDIM. v-prediction models step through
their ε-equivalent. Flow models take Euler steps x_{σ_next} = x_σ + (σ_next − σ)·v down to σ = 0
(`method` "euler", or "ddim" with eta 0, which is the same update for flow). Noise is drawn per sample
from its own generator seeded by (seed, sample index), so sample i is the same whatever the batch size.

Conditioning (class labels, a `models.conditioning.Conditioning` of embeddings, or None) is sliced per
batch and passed through unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from diffpro_cli.devices import net_device
from diffpro_cli.errors import InputError, UsageError
from diffpro_cli.models.base import DiffusionModel
from diffpro_cli.models.conditioning import Conditioning, take, to_device

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
            if step == 0:
                raise UsageError(f"timesteps {text!r}: STEP must not be 0; use e.g. {a}:{b}:50")
            step = abs(step)
            lo, hi = min(a, b), max(a, b)
            values = list(range(hi, lo - 1, -step))
        else:
            values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"timesteps {text!r}: use START:STOP:STEP (e.g. 999:0:50) or a comma list") from None
    outside = [v for v in values if not 0 <= v <= num_train]    # num_train itself: the last step (1000:0:50)
    if outside:
        raise UsageError(f"timesteps {text!r}: {outside[0]} is outside the model's 0..{num_train - 1}; "
                         f"use e.g. {num_train - 1}:0:50")
    values = sorted(set(min(v, num_train - 1) for v in values))
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


def read_timesteps_file(path, num_train: int) -> tuple[dict, list[int]]:
    """A timesteps.json (from `diffpro prune`) and its validated timesteps (timesteps_of)."""
    from diffpro_cli.artifacts import read_json

    doc = read_json(path, "diffpro.timesteps/1")
    return doc, timesteps_of(doc, path, num_train)


def timesteps_of(doc: dict, path, num_train: int) -> list[int]:
    """A timesteps.json document's validated timesteps; a bad list is the file's fault (exit 3, naming
    it), not an option's."""
    ts = doc["timesteps"]
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ts):
        raise InputError(f"{path}: 'timesteps' must be a list of integer timesteps; re-run `diffpro prune`")
    try:
        return validate_timesteps(ts, num_train)
    except UsageError as exc:
        raise InputError(f"{path}: {exc.message.split(';')[0]}; re-run `diffpro prune` for this model") from None


def _generator_seed(value: int) -> int:
    """`value` itself where torch's manual_seed takes it ([-2**63, 2**64)), so every seed that worked keeps its
    noise; otherwise reduced mod 2**64 (a large --seed such as `date +%s%N` overflowed: ValueError traceback)."""
    return value if -(2 ** 63) <= value < 2 ** 64 else value % 2 ** 64


def sample_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(_generator_seed(seed * SAMPLE_SEED_STRIDE + int(i))) for i in indices]


def default_labels(model: DiffusionModel, n: int):
    """The default conditioning of samples 0 … n-1: class i % num_classes for sample i (so a grid of 10·k
    shows every class); for embedding-conditioned models entry i % M of the model's conditioning set
    (`model.conditioning_set`, e.g. read with models.conditioning.load_conditioning); None if unconditional."""
    cond_set = model.conditioning_set
    if model.conditioning == "embeddings":
        if cond_set is None:
            raise UsageError(f"{model.spec}: is conditioned on text embeddings; pass --prompts FILE (prompts encoded with the pipeline's text encoders) or --conditioning FILE (prompt embeddings)")
        return cond_set.cycle(n)
    if cond_set is not None and model.num_classes is not None:   # a class-label set: plain labels, cycled
        return cond_set.cycle(n).class_labels
    if model.num_classes is None:
        return None
    return torch.arange(n) % model.num_classes


def model_device(model: DiffusionModel) -> torch.device:
    """Where the model's network lives (its first parameter or buffer; the CPU for an empty one)."""
    return net_device(model.net)


def initial_batches(model: DiffusionModel, n: int, labels, seed: int, batch_size: int, first_index: int):
    """Yields (global indices, per-sample generators, x_T, conditioning) batch by batch, on the model's
    device. x_T is drawn on the CPU from each sample's own generator and then moved, so a sample starts
    from the same noise on every device."""
    device = model_device(model)
    if labels is None:
        labels = default_labels(model, first_index + n)
        labels = labels[first_index:] if labels is not None else None
    for start in range(0, n, batch_size):
        idx = list(range(first_index + start, first_index + min(n, start + batch_size)))
        gens = sample_generators(seed, idx)
        x = torch.stack([torch.randn(model.sample_shape, generator=g) for g in gens]).to(device)
        yield idx, gens, x, to_device(take(labels, start, len(idx)), device)


@dataclass
class SamplerConfig:
    method: str = "ddim"        # "ddim" | "ddpm" | "euler" (flow models; "ddim" with eta 0 is the same update there)
    eta: float = 0.0            # DDIM only
    cfg_scale: float = 1.0      # 1.0 = no guidance
    clip_x0: bool | None = None  # clip the predicted x0 to [-1, 1]; DDIM then uses the eps implied by the
                                 # clipped x0. None: the model's default (pixel space yes, VAE latents no)

    def for_model(self, model: DiffusionModel) -> "SamplerConfig":
        """This config with clip_x0 resolved: a VAE's latents are not bounded by [-1, 1], so clipping them
        (as diffusers' pipelines do not) would change every latent model's samples."""
        if self.clip_x0 is not None:
            return self
        return dataclasses.replace(self, clip_x0=model.clip_x0_default)

    def as_dict(self) -> dict:
        return dict(method=self.method, eta=self.eta, cfg_scale=self.cfg_scale, clip_x0=self.clip_x0)


def _guided(model: DiffusionModel, fn, x: torch.Tensor, t: int, y, cfg_scale: float) -> torch.Tensor:
    """uncond + scale·(cond − uncond) of fn(x, t, conditioning); one call with the batch doubled."""
    tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
    if y is None or cfg_scale == 1.0:
        return fn(x, tt, y)
    if isinstance(y, Conditioning) and not y.is_class:
        both_y = Conditioning.cat([y, to_device(y.unconditional(model.null_class), x.device)])
    else:
        if model.null_class is None:
            return fn(x, tt, y)
        labels = y.class_labels if isinstance(y, Conditioning) else y
        both_y = torch.cat([labels, torch.full_like(labels, model.null_class)])
    both = fn(torch.cat([x, x]), torch.cat([tt, tt]), both_y)
    cond, uncond = both.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def guided_eps(model: DiffusionModel, x: torch.Tensor, t: int, y, cfg_scale: float) -> torch.Tensor:
    """The (ε-equivalent) noise prediction with classifier-free guidance."""
    return _guided(model, model.eps, x, t, y, cfg_scale)


def guided_output(model: DiffusionModel, x: torch.Tensor, t: int, y, cfg_scale: float) -> torch.Tensor:
    """What the sampler steps with, guided: the velocity for flow models (guidance on v, as diffusers' flow
    pipelines do), ε otherwise."""
    return _guided(model, model.sampler_output, x, t, y, cfg_scale)


def split_prediction(is_flow: bool, a, s, x: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, ε) from the state x = a·x0 + s·ε and the sampler output (ε, or the velocity v = ε − x0 for flow)."""
    if is_flow:
        return x - s * out, x + a * out
    return (x - s * out) / a, out


def flow_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float, cfg: SamplerConfig) -> torch.Tensor:
    """One flow-matching Euler step x + (σ_next − σ)·v. With clip_x0 the clipped x0 = x − σ·v and the noise it
    implies are moved to σ_next (the deterministic DDIM update in flow form; the same drift as `step`)."""
    if not cfg.clip_x0:
        return x + (sigma_next - sigma) * v
    x0 = (x - sigma * v).clamp(-1, 1)
    eps = (x - (1 - sigma) * x0) / sigma
    return (1 - sigma_next) * x0 + sigma_next * eps


def check_guidance(cfg_scale: float) -> None:
    """--cfg as every sampling command takes it: a NaN or infinite scale turns every sample NaN, which
    later surfaces as the model's fault (profile: NaN activations; prune: no subset fits the grid)."""
    if not math.isfinite(cfg_scale):
        raise UsageError(f"--cfg {cfg_scale}: must be a finite guidance scale (1 = off), e.g. 4")


def check_method(model: DiffusionModel, cfg: SamplerConfig) -> None:
    if model.is_flow:
        if cfg.method not in ("euler", "ddim") or (cfg.method == "ddim" and cfg.eta != 0):
            raise UsageError(f"--method {cfg.method}: {model.spec} is a flow-matching model; use euler (or ddim with eta 0)")
    elif cfg.method not in ("ddim", "ddpm"):
        raise UsageError(f"--method {cfg.method}: unknown sampler for an {model.prediction_type} model; use ddim or ddpm")


def _randn_like(x: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    return torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x.device)


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

    Sample j (global index first_index + j) depends only on (seed, global index, conditioning, timesteps).
    `labels`: class labels [n], a Conditioning with n rows, or None (the model's default conditioning).
    `on_step(t, x_t, out)` observes every model call (profiling, drift measurement): `out` is ε (the
    ε-equivalent for v-prediction) or, for flow models, the velocity (`split_prediction` gives x0 and ε).
    """
    ts = validate_timesteps(timesteps, model.num_train_timesteps)
    check_method(model, cfg)
    cfg = cfg.for_model(model)
    acp = model.alphas_cumprod
    sig = model.sigmas() if model.is_flow else None
    outs = []
    for idx, gens, x, y in initial_batches(model, n, labels, seed, batch_size, first_index):
        for i in range(len(ts) - 1, -1, -1):
            t = ts[i]
            out = guided_output(model, x, t, y, cfg.cfg_scale)
            if on_step is not None:
                on_step(t, x, out)
            if sig is not None:
                x = flow_step(x, out, float(sig[t]), float(sig[ts[i - 1]]) if i > 0 else 0.0, cfg)
            else:
                a_t = float(acp[t])
                a_prev = float(acp[ts[i - 1]]) if i > 0 else 1.0
                x = step(x, out, a_t, a_prev, cfg, gens)
            advance(len(idx))
        outs.append((model.decode(x) if decode else x).cpu())
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
    """DPM-Solver++ (2nd order multistep, diffusers' scheduler) at `steps` steps, same seeded initial noise.
    v-prediction models step with their ε-equivalent; flow models are refused (use the Euler sampler)."""
    from diffusers import DPMSolverMultistepScheduler

    if model.is_flow:
        raise UsageError(f"{model.spec}: DPM-Solver++ here is for epsilon/v-prediction models; sample flow models with euler")
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
        outs.append((model.decode(x) if decode else x).cpu())
    return torch.cat(outs) if outs else torch.empty(0, *model.sample_shape)
