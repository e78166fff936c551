"""Reusing computation across denoising steps: cacheable units, schedules and their real execution.

A DiT (diffusers `DiTTransformer2DModel`) is a chain of transformer blocks; each block is a cacheable
*unit*, and its *residual* is its output minus its input. A unit that is cached at step i does no
compute at all: its output is its new input plus the residual it produced at the last step where it
was computed. Two policies (cache_policy.py) decide which units run:

- `CacheSchedule` (static, chosen offline by `diffpro_cli.planning.cache_plan`): for every sampler
  step (in sampling order: step 0 is the highest timestep) the set of units computed.
- `FirstBlockCache` (dynamic, FBCache/TeaCache style): block 0 always runs; when the mean absolute
  change of its residual against the last step where the rest ran, relative to that residual's mean
  absolute value, is below `threshold`, blocks 1..N-1 are skipped and their combined residual
  (output of the last block minus input of block 1, from that step) is added instead.

Both always compute every unit at the first step (there is nothing to reuse yet) and at the
`protect_tail` last steps (where fine detail forms, the prune stage's protected tail).

`CacheRunner` (a context manager, `with cached(model, policy) as run: sample(model, ...)`) executes a
policy for real: it replaces each block's `forward` on the instance (restored on exit) and learns the
sampler step from the `timestep` the network is called with (a forward pre-hook), so the samplers need
no change. The residuals are stored per network call within a step (with classifier-free guidance the
sampler makes one call on the doubled batch; a caller that makes two calls per step gets two caches,
keyed by the call's position in the step). A new trajectory (the first step's timestep again) starts
from empty caches. The runner counts every block evaluation it actually ran: `compute_fraction` is
measured, not predicted.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from diffpro_cli.cache_policy import (
    CacheSchedule,
    FirstBlockCache,
    policy_from_dict,
    sampling_order,
)
from diffpro_cli.errors import InputError, UsageError
from diffpro_cli.models.base import index_of_timestep
from diffpro_cli.quant.compiled import block_forward

UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")   # the second's cross-attention takes the text via kwargs
# ControlNet / T2I-Adapter residuals added to the deep features: a cached step has none to add them to
_EXTERNAL_RESIDUALS = ("down_block_additional_residuals", "mid_block_additional_residual", "down_intrablock_additional_residuals")


def cache_units(net: nn.Module) -> nn.ModuleList:
    """The cacheable units of a DiT: its transformer blocks."""
    blocks = getattr(net, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise UsageError(f"caching needs a DiT (a network with transformer_blocks), not {type(net).__name__}; "
                         "run without a cache schedule")
    return blocks


def unit_kind(net: nn.Module) -> str:
    """"dit" (one unit per transformer block) or "unet" (one unit: the deep part, DeepCache style)."""
    net = _net(net)
    blocks = getattr(net, "transformer_blocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks):
        return "dit"
    if type(net).__name__ in UNET_CLASSES and len(getattr(net, "down_blocks", ())) >= 2:
        return "unet"
    raise UsageError(f"caching runs on DiT transformer blocks or a U-Net's deep blocks ({' / '.join(UNET_CLASSES)}), "
                     f"not {type(net).__name__}; run without a cache schedule")


def unet_deep_modules(net: nn.Module) -> list[nn.Module]:
    """The deep part of a U-Net (one cacheable unit): down_blocks[1:], mid_block, up_blocks[:-1].
    Its output (up_blocks[-2]'s) is the feature the shallow up block consumes."""
    if any(hasattr(b, "skip_conv") for b in (*net.down_blocks, *net.up_blocks)):
        raise UsageError("caching: U-Nets with skip-sample blocks (SkipDownBlock2D) are not supported; run without a cache schedule")
    mid = [net.mid_block] if net.mid_block is not None else []
    return [*net.down_blocks[1:], *mid, *net.up_blocks[:-1]]


def unit_modules(net: nn.Module) -> list[list[nn.Module]]:
    """Per cacheable unit, the modules whose forwards are its compute (what is timed for its latency)."""
    net = _net(net)
    if unit_kind(net) == "dit":
        return [[b] for b in cache_units(net)]
    return [unet_deep_modules(net)]


def num_cache_units(net: nn.Module) -> int:
    return len(unit_modules(net))


def _net(model) -> nn.Module:
    return model.net if hasattr(model, "net") and isinstance(model.net, nn.Module) else model


@dataclass
class _CallState:
    step: int = -1
    call: int = 0
    compute: frozenset[int] = frozenset()   # static: units to run in this call
    rest: bool = True                       # fbcache: run blocks 1..N-1 in this call


# Joint (MMDiT) blocks, SD3's and FLUX's, take `encoder_hidden_states` beside `hidden_states` and return
# the pair (encoder_hidden_states, hidden_states), the context stream None after a context-pre-only block:
# their residual is the pair of both streams' residuals, reused together.

def _encoder_input(args, kwargs):
    return kwargs.get("encoder_hidden_states", args[0] if args and isinstance(args[0], torch.Tensor) else None)


def _residual(out, hidden, enc):
    if isinstance(out, tuple):
        e_out, h_out = out
        return (None if e_out is None or enc is None else e_out - enc, h_out - hidden)
    return out - hidden


def _apply(res, hidden, enc):
    if isinstance(res, tuple):
        r_e, r_h = res
        return (None if r_e is None else enc + r_e, hidden + r_h)
    return hidden + res


def _image_part(res) -> torch.Tensor:
    return res[1] if isinstance(res, tuple) else res


def _flat(res) -> torch.Tensor:
    """One tensor per residual (image stream first, then the context stream), [batch, features]: what
    calibration compares between steps and the first-block policy measures."""
    if isinstance(res, tuple):
        return torch.cat([r.flatten(1) for r in (res[1], res[0]) if r is not None], dim=1)
    return res


class _UnitForward:
    """A block's wrapped forward, `make(block_forward(block), *args)` (a runner's wrapper), kept with what
    made it: a deep copy of the network rebuilds it for the copied runner and block. (The closure alone
    would be shared by the copy, which would then run the original's blocks and count in its runner.)"""

    def __init__(self, make, block: nn.Module, *args):
        self._make, self._block, self._args = make, block, args
        self._forward = make(block_forward(block), *args)

    def __call__(self, *args, **kwargs):
        return self._forward(*args, **kwargs)

    def __deepcopy__(self, memo):
        return _UnitForward(copy.deepcopy(self._make, memo), copy.deepcopy(self._block, memo), *copy.deepcopy(self._args, memo))


@dataclass
class CacheRunner:
    """Executes a policy on a network's blocks (see the module docstring). None = compute everything
    (still counting, and still calling `on_residual`: how calibration records residuals)."""

    net: nn.Module
    policy: CacheSchedule | FirstBlockCache | None
    timesteps: list[int] | None = None
    on_residual: Callable[[int, int, int, torch.Tensor], None] | None = None   # (step, call, unit, residual)
    evaluations: int = 0
    calls: int = 0
    unit_evaluations: list[int] = field(default_factory=list)   # per unit: forwards actually run
    log: list[dict] = field(default_factory=list)   # per network call: step, call, computed units (, change)

    def __post_init__(self):
        self.blocks = self._units()
        n = len(self.blocks)
        if self.policy is not None:
            if self.policy.num_units != n:
                raise InputError(f"cache policy is for {self.policy.num_units} units, the network has {n} blocks; re-plan the cache")
            self.timesteps = self.policy.timesteps
        if self.timesteps is None:
            raise UsageError("cache runner: pass the sampler's timesteps (or a policy that holds them)")
        order = sampling_order(self.timesteps)
        self._step_of = {t: i for i, t in enumerate(order)}
        self._steps = len(order)
        self._state = _CallState()
        self._res: dict[tuple[int, int], torch.Tensor] = {}     # (call, unit) → residual
        self._fb_ref: dict[int, torch.Tensor] = {}               # call → block 0's reference residual
        self._rest_in: dict[int, tuple] = {}                     # call → inputs of block 1 (computing step)
        self._pairs = False                                      # joint blocks: (context, image) in and out
        self._handles = []
        self.unit_evaluations = [0] * n

    def _units(self):
        return cache_units(self.net)

    @property
    def num_units(self) -> int:
        return len(self.blocks)

    # -- bookkeeping ---------------------------------------------------------------------------

    @property
    def compute_fraction(self) -> float | None:
        return self.evaluations / (self.calls * len(self.blocks)) if self.calls else None

    def _forced(self, step: int) -> bool:
        tail = self.policy.protect_tail if isinstance(self.policy, FirstBlockCache) else 0
        return step == 0 or step >= self._steps - tail

    def _pre_hook(self, module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is None:
            raise UsageError("cache: the network was called without a timestep; caching needs the sampler's timestep")
        tv = torch.as_tensor(index_of_timestep(self.net, t)).reshape(-1)   # a pipeline's σ·N on a flow net: its index
        if tv.numel() == 0 or not bool((tv == tv[0]).all()):
            raise UsageError("cache: one network call mixes timesteps; call the network with one timestep per batch")
        step = self._step_of.get(int(round(float(tv[0]))))
        if step is None:
            raise UsageError(f"cache: the sampler ran timestep {int(tv[0])}, the cache policy was made for other timesteps; "
                             "re-plan the cache for this schedule")
        st = self._state
        if step == st.step:
            st.call += 1
        else:
            if step == 0 and st.step != -1:
                self._res.clear()
                self._fb_ref.clear()
                self._rest_in.clear()
            st.step, st.call = step, 0
        self.calls += 1
        if isinstance(self.policy, CacheSchedule):
            st.compute = self.policy.units_at(step)
            self.log.append({"step": step, "call": st.call, "computed": sorted(st.compute)})
        else:
            st.compute = frozenset(range(len(self.blocks)))
            st.rest = True
            if self.policy is None:
                self.log.append({"step": step, "call": st.call, "computed": sorted(st.compute)})
        return None

    # -- the block wrappers --------------------------------------------------------------------

    def _run(self, u: int, orig, hidden_states, args, kwargs):
        out = orig(hidden_states, *args, **kwargs)
        self.evaluations += 1
        self.unit_evaluations[u] += 1
        return out

    def _static_forward(self, orig, u: int):
        def forward(hidden_states, *args, **kwargs):
            st = self._state
            key = (st.call, u)
            enc = _encoder_input(args, kwargs)
            if u in st.compute:
                out = self._run(u, orig, hidden_states, args, kwargs)
                res = _residual(out, hidden_states, enc)
                if self.policy is not None:
                    self._res[key] = res
                if self.on_residual is not None:
                    self.on_residual(st.step, st.call, u, _flat(res))
                return out
            res = self._res.get(key)
            if res is None or _image_part(res).shape != hidden_states.shape:
                raise InputError(f"cache: unit {u} is cached at step {st.step} but has no residual for this call "
                                 "(the trajectory did not start at the schedule's first step); re-plan the cache")
            return _apply(res, hidden_states, enc)
        return forward

    def _fb_forward(self, orig, u: int):
        n = len(self.blocks)
        pol: FirstBlockCache = self.policy

        def forward(hidden_states, *args, **kwargs):
            st = self._state
            enc = _encoder_input(args, kwargs)
            if u == 0:
                out = self._run(u, orig, hidden_states, args, kwargs)
                self._pairs = isinstance(out, tuple)
                r1 = _flat(_residual(out, hidden_states, enc))
                ref = self._fb_ref.get(st.call)
                change = None
                if self._forced(st.step) or ref is None or ref.shape != r1.shape:
                    st.rest = True
                else:
                    change = float((r1 - ref).abs().mean() / ref.abs().mean().clamp_min(1e-30))
                    st.rest = change >= pol.threshold
                if st.rest:
                    self._fb_ref[st.call] = r1
                self.log.append({"step": st.step, "call": st.call,
                                 "computed": list(range(n)) if st.rest else [0], "change": change})
                return out
            if st.rest:
                if u == 1:
                    self._rest_in[st.call] = (hidden_states, enc)
                out = self._run(u, orig, hidden_states, args, kwargs)
                if u == n - 1:
                    self._res[(st.call, -1)] = _residual(out, *self._rest_in.pop(st.call))
                return out
            if u < n - 1:                     # no compute: the combined residual is added after the last block
                return (enc, hidden_states) if self._pairs else hidden_states
            return _apply(self._res[(st.call, -1)], hidden_states, enc)
        return forward

    # -- install / remove ----------------------------------------------------------------------

    def __enter__(self) -> "CacheRunner":
        if any("forward" in vars(b) for b in self.blocks):
            raise UsageError("cache: the network's blocks are already wrapped (a cache runner is active); leave it first")
        make = self._fb_forward if isinstance(self.policy, FirstBlockCache) else self._static_forward
        for u, block in enumerate(self.blocks):
            block.forward = _UnitForward(make, block, u)
        self._handles.append(self.net.register_forward_pre_hook(self._pre_hook, with_kwargs=True, prepend=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for block in self.blocks:
            vars(block).pop("forward", None)
        self._res.clear()
        self._fb_ref.clear()
        self._rest_in.clear()

    def weighted_fraction(self, unit_cost: Sequence[float]) -> float | None:
        """Share of the blocks' cost actually run, each block weighted by `unit_cost` (e.g. its latency)."""
        if not self.calls:
            return None
        return sum(c * e for c, e in zip(unit_cost, self.unit_evaluations)) / (self.calls * sum(unit_cost))

    def summary(self) -> dict:
        return {"policy": None if self.policy is None else self.policy.policy, "calls": self.calls,
                "evaluations": self.evaluations, "compute_fraction": self.compute_fraction}


class DeepCacheRunner(CacheRunner):
    """DeepCache on a U-Net (UNET_CLASSES): one unit, the deep part (`unet_deep_modules`). At a step where it is
    cached, conv_in, down_blocks[0], up_blocks[-1] and the output layers run on the new input; the deep
    down blocks, the mid block and the deep up blocks do no compute (they pass their input through as
    a placeholder nobody reads), and up_blocks[-2] returns the feature it produced at the last step
    where the unit ran. `on_residual` receives that deep feature (the quantity reused)."""

    def _units(self):
        if isinstance(self.policy, FirstBlockCache):
            raise UsageError("the first-block threshold policy is for DiTs; a U-Net takes a static schedule (deepcache-N)")
        self._deep = unet_deep_modules(self.net)
        return [nn.ModuleList(self._deep)]

    def _deep_forward(self, orig, n_res: int | None, last: bool):
        def forward(*args, **kwargs):
            st = self._state
            if 0 in st.compute:
                out = orig(*args, **kwargs)
                if last:
                    self.evaluations += 1
                    self.unit_evaluations[0] += 1
                    if self.policy is not None:
                        self._res[(st.call, 0)] = out
                    if self.on_residual is not None:
                        self.on_residual(st.step, st.call, 0, out)
                return out
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            if n_res is not None:               # a down block: (sample, res_samples) of the right count
                return x, (x,) * n_res
            if not last:
                return x
            feat = self._res.get((st.call, 0))
            if feat is None:
                raise InputError(f"cache: the U-Net's deep part is cached at step {st.step} but has no feature for this "
                                 "call (the trajectory did not start at the schedule's first step); re-plan the cache")
            return feat
        return forward

    def __enter__(self) -> "DeepCacheRunner":
        if any("forward" in vars(m) for m in self._deep):
            raise UsageError("cache: the network's blocks are already wrapped (a cache runner is active); leave it first")
        net = self.net
        for b in net.down_blocks[1:]:
            n_res = len(b.resnets) + (len(b.downsamplers) if getattr(b, "downsamplers", None) is not None else 0)
            b.forward = _UnitForward(self._deep_forward, b, n_res, False)
        for m in self._deep[len(net.down_blocks) - 1:]:
            m.forward = _UnitForward(self._deep_forward, m, None, m is self._deep[-1])
        self._handles.append(net.register_forward_pre_hook(self._pre_hook, with_kwargs=True, prepend=True))
        return self

    def _pre_hook(self, module, args, kwargs):
        outside = [k for k in _EXTERNAL_RESIDUALS if kwargs.get(k) is not None]
        if outside:
            raise UsageError(f"cache: the U-Net was called with {', '.join(outside)} (ControlNet / T2I-Adapter residuals), "
                             "which a cached step cannot add to its reused deep feature; run without a cache schedule")
        return super()._pre_hook(module, args, kwargs)

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for m in self._deep:
            vars(m).pop("forward", None)
        self._res.clear()


def cached(model, policy, timesteps: Sequence[int] | None = None, on_residual=None) -> CacheRunner:
    """`with cached(model, policy) as run: sample(model, ...)`; `run.compute_fraction` afterwards.
    A DiT's blocks or a U-Net's deep part (DeepCacheRunner)."""
    net = _net(model)
    cls = DeepCacheRunner if unit_kind(net) == "unet" else CacheRunner
    return cls(net, policy, list(timesteps) if timesteps is not None else None, on_residual)


# -- a cache schedule carried by a model (plan → checkpoint → load) -------------------------------


def record_policy(record: dict | None):
    """The executable policy of a plan's / checkpoint's `cache` section, or None (absent or disabled)."""
    if not record or not record.get("enabled") or not record.get("schedule"):
        return None
    return policy_from_dict(record["schedule"])


def model_cache_record(model) -> dict | None:
    """The `cache` section a quantized checkpoint recorded (load_quantized keeps it in model.config)."""
    return (getattr(model, "config", None) or {}).get("cache")


def install_cache(model, policy) -> CacheRunner:
    """Execute `policy` on every later call of the model's network (no context manager): the runner
    stays installed, keyed by the timestep of each call; `model.net._diffpro_cache` is the runner
    (its counters measure what ran). Idempotent for one model: a second install replaces the first."""
    net = _net(model)
    remove_cache(model)
    runner = cached(model, policy).__enter__()
    net._diffpro_cache = runner
    return runner


def remove_cache(model) -> None:
    net = _net(model)
    runner = vars(net).pop("_diffpro_cache", None)
    if runner is not None:
        runner.__exit__(None, None, None)
