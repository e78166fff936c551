"""Cache policies: which cacheable units run at each sampler step (the records plans and checkpoints
carry, `diffpro.cache/1`); cache.py executes them.

- `CacheSchedule` (static, chosen offline by `diffpro_cli.planning.cache_plan`): for every sampler
  step (in sampling order: step 0 is the highest timestep) the set of units computed.
- `FirstBlockCache` (dynamic, FBCache/TeaCache style): skip blocks 1..N-1 while block 0's residual
  changes by less than `threshold`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from diffpro_cli.errors import InputError, UsageError

SCHEMA = "diffpro.cache/1"
POLICIES = ("static", "fbcache")


def sampling_order(timesteps: Sequence[int]) -> list[int]:
    ts = [int(t) for t in timesteps]
    if not ts or any(b <= a for a, b in zip(ts, ts[1:])):
        raise UsageError("cache: timesteps must be a non-empty strictly increasing list (the sampler's subset)")
    return ts[::-1]


@dataclass
class CacheSchedule:
    """Static schedule: `computed[i]` = the units run at sampler step i (step 0 = highest timestep)."""

    timesteps: list[int]                 # increasing, as the sampler takes them
    num_units: int
    computed: list[frozenset[int]]       # one set per step, in sampling order
    policy: str = "static"

    def __post_init__(self):
        self.timesteps = [int(t) for t in self.timesteps]
        order = sampling_order(self.timesteps)
        self.computed = [frozenset(int(u) for u in s) for s in self.computed]
        if len(self.computed) != len(order):
            raise InputError(f"cache schedule: {len(self.computed)} steps of units for {len(order)} timesteps; re-plan the cache")
        for i, s in enumerate(self.computed):
            bad = [u for u in s if not 0 <= u < self.num_units]
            if bad:
                raise InputError(f"cache schedule: step {i} names unit {bad[0]}, the network has {self.num_units}; re-plan the cache")
        if len(self.computed[0]) != self.num_units:
            raise InputError("cache schedule: the first step must compute every unit (nothing to reuse yet); re-plan the cache")

    @classmethod
    def full(cls, timesteps: Sequence[int], num_units: int) -> "CacheSchedule":
        return cls(list(timesteps), num_units, [frozenset(range(num_units))] * len(timesteps))

    def units_at(self, step: int) -> frozenset[int]:
        return self.computed[step]

    def compute_fraction(self) -> float:
        return sum(len(s) for s in self.computed) / (len(self.computed) * self.num_units)

    def as_dict(self) -> dict:
        order = sampling_order(self.timesteps)
        return {"policy": self.policy, "num_units": self.num_units, "timesteps": self.timesteps,
                "steps": [{"step": i, "t": t, "computed": sorted(s)} for i, (t, s) in enumerate(zip(order, self.computed))],
                "compute_fraction": self.compute_fraction()}

    @classmethod
    def from_dict(cls, d: dict) -> "CacheSchedule":
        try:
            return cls(d["timesteps"], int(d["num_units"]), [s["computed"] for s in d["steps"]])
        except (KeyError, TypeError) as e:
            raise InputError(f"cache schedule: missing field {e}; re-plan the cache") from None


@dataclass
class FirstBlockCache:
    """Dynamic policy: skip blocks 1..N-1 when block 0's residual changed by less than `threshold`
    (mean |r − r_ref| / mean |r_ref|, r_ref from the last step where the rest ran)."""

    timesteps: list[int]
    num_units: int
    threshold: float
    protect_tail: int = 1
    policy: str = "fbcache"

    def __post_init__(self):
        self.timesteps = [int(t) for t in self.timesteps]
        sampling_order(self.timesteps)
        if not self.threshold >= 0:
            raise UsageError(f"fbcache threshold {self.threshold}: must be >= 0 (0.08 and 0.12 are usual)")
        if not 0 <= self.protect_tail < len(self.timesteps):
            raise UsageError(f"cache protect_tail {self.protect_tail}: must be between 0 and steps - 1 = {len(self.timesteps) - 1}")

    def as_dict(self) -> dict:
        return {"policy": self.policy, "num_units": self.num_units, "timesteps": self.timesteps,
                "threshold": self.threshold, "protect_tail": self.protect_tail}


def policy_from_dict(d: dict):
    kind = d.get("policy")
    if kind == "static":
        return CacheSchedule.from_dict(d)
    if kind == "fbcache":
        return FirstBlockCache(d["timesteps"], int(d["num_units"]), float(d["threshold"]), int(d.get("protect_tail", 1)))
    raise InputError(f"cache policy {kind!r}: unknown (knows {', '.join(POLICIES)}); re-plan the cache")
