"""The training loss as one object the step calls: the criterion the augmentation implies, plus MESA's
self-distillation term from the EMA teacher once it is on (timm keeps distillation as a task object likewise).

MESA (Memory-Efficient Sharpness-Aware training, as the official code applies it): once ``epoch / epochs >
start_ratio``, loss += weight * 50 * KL(log_softmax(s / 3) || softmax(t / 3)), t the EMA model's logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

TEMPERATURE = 3.0
SCALE = 50.0


def criterion(aug):
    if aug.mixup > 0 or aug.cutmix > 0:
        return SoftTargetCrossEntropy()  # smoothing is folded into the Mixup targets
    return LabelSmoothingCrossEntropy(aug.smoothing) if aug.smoothing > 0 else torch.nn.CrossEntropyLoss()


def mesa_active(weight: float, start_ratio: float, epoch: int, epochs: int) -> bool:
    return weight > 0 and epoch / epochs > start_ratio


def mesa_loss(logits: torch.Tensor, ema_logits: torch.Tensor, weight: float) -> torch.Tensor:
    p = F.log_softmax(logits.float() / TEMPERATURE, dim=1)
    q = F.softmax(ema_logits.detach().float() / TEMPERATURE, dim=1)
    return weight * SCALE * F.kl_div(p, q, reduction="batchmean")


class Loss:
    def __init__(self, aug, mesa, epochs: int, teacher=None):
        """teacher: the EMA model (MESA's), or None when the run has no EMA."""
        self.criterion, self.mesa, self.epochs, self.teacher = criterion(aug), mesa, epochs, teacher
        self.with_teacher = False

    def start_epoch(self, epoch: int):
        self.with_teacher = self.teacher is not None and mesa_active(self.mesa.weight, self.mesa.start_ratio, epoch,
                                                                     self.epochs)

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        loss = self.criterion(logits, target)
        if self.with_teacher:
            with torch.no_grad():
                teacher_logits = self.teacher(images)
            loss = loss + mesa_loss(logits, teacher_logits, self.mesa.weight)
        return loss
