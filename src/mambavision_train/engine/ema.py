"""Exponential moving average of the weights, the model the official recipe validates and selects by.

The arithmetic is timm's ``ModelEmaV2`` (what the official train.py uses): every state-dict entry becomes
``decay * ema + (1 - decay) * model``. That includes BatchNorm's running mean and variance (averaged, not copied)
and, as in ModelEmaV2, integer buffers such as ``num_batches_tracked``, whose float result is truncated back into
the integer tensor.

With ``warmup`` the decay of update t (from 1) is ``min(decay, 1 - t ** -2/3)``, 0 for the first (timm's ModelEmaV3
warm-up with its defaults, as timm's train.py steps it): the average forgets its start quickly in the first updates, so a short fine-tuning run's EMA is not stuck
at the initial weights (with decay 0.9998 it would average ~5000 updates). The paper's recipe has no warm-up.

Unlike timm's classes it never deep-copies a wrapped model: the EMA copy is made from the plain module before any
DDP/FSDP wrapping, and entries are matched by name, which also works on FSDP2's sharded DTensors (each rank averages
its own shard; buffers are replicated and averaged per rank).
"""

from __future__ import annotations

import copy

import torch

from ..parallel import local


class EMA:
    WARMUP_POWER = 2 / 3  # timm ModelEmaV3's warmup_power (warmup_gamma 1)

    def __init__(self, model: torch.nn.Module, decay: float = 0.9998, warmup: bool = False):
        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """The decay of the ``step``-th update (1-based): with the warm-up, ModelEmaV3.get_decay(step) as timm's
        train.py calls it (the first update copies the weights)."""
        if not self.warmup:
            return self.decay
        return 0.0 if step <= 1 else min(self.decay, 1.0 - step ** -self.WARMUP_POWER)

    def _entries(self, module):
        return {**dict(module.named_parameters()), **dict(module.named_buffers())}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int = 1):
        """Average ``model`` in; ``step``: this update's number (1-based), for the warm-up."""
        decay = self.decay_at(step)
        own = self._entries(self.module)
        floats, others = [], []
        for name, value in self._entries(model).items():
            ema, value = local(own[name]), local(value.detach())
            (floats if ema.is_floating_point() else others).append((ema, value))
        if floats:  # decay * e + (1 - decay) * m with ModelEmaV2's three roundings, so the result is bit-identical
            ema = [e for e, _ in floats]
            scaled = torch._foreach_mul([v.to(e.dtype) for e, v in floats], 1.0 - decay)
            torch._foreach_mul_(ema, decay)
            torch._foreach_add_(ema, scaled)
        for ema, value in others:  # ModelEmaV2's expression: float arithmetic, truncated by copy_
            ema.copy_(decay * ema + (1.0 - decay) * value)

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state):
        self.module.load_state_dict(state)
