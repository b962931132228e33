"""Exponential moving average of the weights, the model the official recipe validates and selects by.

The arithmetic is timm's ``ModelEmaV2`` (what the official train.py uses): every state-dict entry becomes
``decay * ema + (1 - decay) * model``. That includes BatchNorm's running mean and variance (averaged, not copied)
and, as in ModelEmaV2, integer buffers such as ``num_batches_tracked``, whose float result is truncated back into
the integer tensor.

Unlike timm's classes it never deep-copies a wrapped model: the EMA copy is made from the plain module before any
DDP/FSDP wrapping, and entries are matched by name, which also works on FSDP2's sharded DTensors (each rank averages
its own shard; buffers are replicated and averaged per rank).
"""

from __future__ import annotations

import copy

import torch

from ..parallel import local


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float = 0.9998):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def _entries(self, module):
        return {**dict(module.named_parameters()), **dict(module.named_buffers())}

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        own = self._entries(self.module)
        floats, others = [], []
        for name, value in self._entries(model).items():
            ema, value = local(own[name]), local(value.detach())
            (floats if ema.is_floating_point() else others).append((ema, value))
        if floats:  # decay * e + (1 - decay) * m with ModelEmaV2's three roundings, so the result is bit-identical
            ema = [e for e, _ in floats]
            scaled = torch._foreach_mul([v.to(e.dtype) for e, v in floats], 1.0 - self.decay)
            torch._foreach_mul_(ema, self.decay)
            torch._foreach_add_(ema, scaled)
        for ema, value in others:  # ModelEmaV2's expression: float arithmetic, truncated by copy_
            ema.copy_(self.decay * ema + (1.0 - self.decay) * value)

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state):
        self.module.load_state_dict(state)
