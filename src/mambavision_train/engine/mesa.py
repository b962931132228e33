"""MESA (Memory-Efficient Sharpness-Aware training as the official code applies it): self-distillation from the EMA
model once ``epoch / epochs > start_ratio``: loss += weight * 50 * KL(log_softmax(s / 3) || softmax(t / 3))."""

from __future__ import annotations

import torch
import torch.nn.functional as F

TEMPERATURE = 3.0
SCALE = 50.0


def mesa_active(weight: float, start_ratio: float, epoch: int, epochs: int) -> bool:
    return weight > 0 and epoch / epochs > start_ratio


def mesa_loss(logits: torch.Tensor, ema_logits: torch.Tensor, weight: float) -> torch.Tensor:
    p = F.log_softmax(logits.float() / TEMPERATURE, dim=1)
    q = F.softmax(ema_logits.detach().float() / TEMPERATURE, dim=1)
    return weight * SCALE * F.kl_div(p, q, reduction="batchmean")
