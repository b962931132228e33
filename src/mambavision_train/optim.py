"""Optimizer and learning-rate schedule, as the official recipe builds them with timm.

Parameter groups follow timm (and so the official code): parameters with ndim <= 1 or named ``*.bias`` get no
weight decay; everything else is decayed (A_log is 2-D and decayed). ``lamb`` is timm's Lamb, which also clips the
global gradient norm at 1.0 internally. The cosine schedule is stepped every optimizer step, with the warmup
inside the cosine, then ``cooldown_epochs`` at ``min_lr``.
"""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """cfg: name (adamw|lamb|any timm optimizer), lr (absolute: not scaled by batch size), weight_decay, and for
    Adam-style optimizers betas and eps."""
    adam_like = any(k in cfg.name for k in ("adam", "lamb"))
    extra = dict(betas=tuple(cfg.betas), eps=cfg.eps) if adam_like else {}
    return create_optimizer_v2(model, opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               filter_bias_and_bn=True, **extra)


def build_scheduler(cfg, optimizer, epochs: int, steps_per_epoch: int) -> CosineLRScheduler:
    """cfg: warmup_epochs, warmup_lr, min_lr, cooldown_epochs. Steps are optimizer steps."""
    return CosineLRScheduler(optimizer, t_initial=epochs * steps_per_epoch, lr_min=cfg.min_lr,
                             warmup_t=int(cfg.warmup_epochs * steps_per_epoch), warmup_lr_init=cfg.warmup_lr,
                             warmup_prefix=False, cycle_limit=1, t_in_epochs=False)
