"""Shared-input fusion: QuantLinears always called on the same input tensor (attention q/k/v) run as
one GEMM; their stored state stays per layer (layers.py)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from diffpro_cli.quant import kernels
from diffpro_cli.quant.layers import QuantLinear, _QuantBase, call_kernel


class SharedInputGroup:
    """QuantLinears that are always called on the same input tensor, run as one GEMM.

    The first member called with x computes every member's output and keeps the others' slices until
    they are asked for with that same tensor object; a call with any other input recomputes, so results
    are always right (a wrongly grouped pair just loses the speed-up).
    """

    def __init__(self, members: list[QuantLinear]):
        self.members = members
        self.sizes = [m.out_features for m in members]
        self.kernel = None
        self.device = None
        self.label = ""
        # (input, the GEMM's output slices, members yet to take theirs): one attribute, read and replaced
        # whole, so a thread calling the same network can never pair one input with another call's outputs
        self._cached: tuple | None = None
        for m in members:
            m._group = self
            m._kernel = None

    def __deepcopy__(self, memo):
        """The group of the copied members (layers._QuantBase.__deepcopy__): the fused kernel is dropped and
        packed again on the first call, or shared where the members' integers were released."""
        new = SharedInputGroup.__new__(SharedInputGroup)
        memo[id(self)] = new
        released = any(m.integers_released for m in self.members)
        new.kernel, new.device, new.label = (self.kernel, self.device, self.label) if released else (None, None, "")
        new.sizes = list(self.sizes)
        new._cached = None
        new.members = copy.deepcopy(self.members, memo)
        return new

    def prepare(self, device: torch.device) -> None:
        if self.kernel is not None and self.device == device:
            return
        lead = self.members[0]
        cls = kernels.select(lead, device, lead.prefer)
        self.kernel = cls(self.members, device)
        self.device = device
        self.label = kernels.describe(cls, lead, self.kernel.act_qmax) + f"+fused{len(self.members)}"

    def run(self, member: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None or self.device != x.device:
            self.prepare(x.device)
        return self.traced(member, x)

    def traced(self, member: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        """`run` without preparing (under torch.compile the kernel is prepared before the trace; a prepare
        inside it would be traced). Dynamo traces the cache of the other members' slices as side effects
        on this object, so the graph holds the group's GEMM once: computed per member, it stayed three
        GEMMs (inductor merges them only under freezing, which the GPU compile does not use)."""
        i = next(k for k, m in enumerate(self.members) if m is member)
        cached = self._cached
        if cached is not None and cached[0] is x and i in cached[2]:
            pending = cached[2] - {i}
            self._cached = (x, cached[1], pending) if pending else None
            return cached[1][i]
        outs = call_kernel(self.kernel, self.members[0], x).split(self.sizes, dim=-1)
        self._cached = (x, list(outs), set(range(len(outs))) - {i})
        return outs[i]


def fuse_shared_inputs(net: nn.Module) -> int:
    """Group the q/k/v projections of every self-attention (diffusers `Attention`) whose three layers
    are QuantLinears with the same activation mode and kernel; returns the number of groups made."""
    made = 0
    for mod in net.modules():
        members = [getattr(mod, n, None) for n in ("to_q", "to_k", "to_v")]
        if getattr(mod, "is_cross_attention", True) or not all(isinstance(m, QuantLinear) for m in members):
            continue
        if any(m._group is not None for m in members) or len({m.act_mode for m in members}) != 1:
            continue
        prefers = [m.prefer for m in members]
        prefer = max(prefers, key=prefers.count)   # one GEMM runs one kernel: the one most members were measured fastest with
        if len({kernels.select(m, torch.device("cpu"), prefer) for m in members}) != 1:
            continue
        if members[0].act_mode == "static" and not all(torch.equal(m.act_absmax, members[0].act_absmax) for m in members):
            continue
        for m in members:
            if m.prefer != prefer:
                m.prefer = prefer
                m._forget_kernel()
        SharedInputGroup(members)
        made += 1
    return made


def unfuse(net: nn.Module) -> None:
    for mod in net.modules():
        if isinstance(mod, _QuantBase):
            mod._group = None
            mod._kernel = None
