"""Exponential moving average of the weights, the model the official recipe validates and selects by.

Unlike timm's ModelEmaV3 it never deep-copies a wrapped model: the EMA copy is made from the plain module before
any DDP/FSDP wrapping, and updated with foreach ops over matching parameter lists, which also works on FSDP2's
sharded DTensors (each rank averages its own shard).
"""

from __future__ import annotations

import copy

import torch

from ..parallel import local


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float = 0.9998):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def _pairs(self, model):
        own = dict(self.module.named_parameters())
        params = [(own[n], p.detach()) for n, p in model.named_parameters()]
        own_buffers = dict(self.module.named_buffers())
        buffers = [(own_buffers[n], b) for n, b in model.named_buffers()]
        return params, buffers

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        """ema = decay * ema + (1 - decay) * weights; buffers (BN statistics) are copied, as timm does."""
        params, buffers = self._pairs(model)
        float_pairs = [(local(e), local(p)) for e, p in params if e.is_floating_point()]
        if float_pairs:
            torch._foreach_lerp_([e for e, _ in float_pairs], [p.to(e.dtype) for e, p in float_pairs], 1.0 - self.decay)
        for e, b in buffers:
            e.copy_(b)

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state):
        self.module.load_state_dict(state)
