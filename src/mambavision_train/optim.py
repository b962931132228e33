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
    """cfg: name (adamw|lamb|any timm optimizer), lr (absolute: not scaled by batch size), weight_decay,
    layer_decay (layer-wise lr decay through the model's group_matcher; null: off), and for Adam-style optimizers
    betas and eps. Frozen parameters (model.freeze) are left out."""
    adam_like = any(k in cfg.name for k in ("adam", "lamb"))
    extra = dict(betas=tuple(cfg.betas), eps=cfg.eps) if adam_like else {}
    return create_optimizer_v2(model, opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               filter_bias_and_bn=True, layer_decay=cfg.layer_decay, **extra)


# What model.freeze=<part> freezes: that part and everything before it.
FREEZE = {"stem": ["patch_embed"], "stage1": ["patch_embed", "levels.0"],
          "stage2": ["patch_embed", "levels.0", "levels.1"],
          "stage3": ["patch_embed", "levels.0", "levels.1", "levels.2"],
          "stage4": ["patch_embed", "levels", "norm"]}  # all but the classifier: linear probing


def freeze(model: torch.nn.Module, part: str | None):
    """timm's freeze: no gradients, and BatchNorm frozen too (statistics included), for ``part`` and what precedes it."""
    if part and part != "none":
        from timm.utils import freeze as timm_freeze
        timm_freeze(model, FREEZE[part])


def build_scheduler(cfg, optimizer, epochs: int, steps_per_epoch: int) -> CosineLRScheduler:
    """cfg: warmup_epochs, warmup_lr, min_lr, cooldown_epochs. Steps are optimizer steps."""
    return CosineLRScheduler(optimizer, t_initial=epochs * steps_per_epoch, lr_min=cfg.min_lr,
                             warmup_t=int(cfg.warmup_epochs * steps_per_epoch), warmup_lr_init=cfg.warmup_lr,
                             warmup_prefix=False, cycle_limit=1, t_in_epochs=False)
