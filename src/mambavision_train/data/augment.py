"""The part of the augmentation that runs on the model's device, batch at a time, after the loader.

uint8 (B, 3, H, W) from any loader -> float, channels_last -> [RandAugment] -> [colour jitter] -> [Mixup / CutMix
with label smoothing] -> normalise -> [random erasing]. That is the official pipeline's order (timm's prefetcher with
FastCollateMixup): per-sample augmentation, then the batch is mixed, then normalised and erased on the GPU, so an
erased box is noise in the mixed image, not a box of one image blended into another. Random erasing and
Mixup/CutMix are timm's own classes; RandAugment is ``randaugment.py`` (timm's ops on tensors, per sample).

One difference from FastCollateMixup: it mixes uint8 images and rounds the result to integers; we mix floats
(at most half a grey level apart, before normalisation).

No step reads a value back from the device or sizes a tensor by its values, so the host never waits for the GPU
here (tests/test_augment_syncs.py counts none for the paper recipe): RandAugment is written so (randaugment.py),
colour jitter and normalisation are elementwise; timm's Mixup in batch mode draws its lambda and box with numpy on
the host and slices; timm's RandomErasing draws boxes with Python's random and erases image by image in a Python
loop, about two small kernels per erased image. (Mixup's 'elem' and 'pair' modes copy their per-sample lambdas to
the device with a blocking copy: one wait per batch. The batch itself comes over with non_blocking=True, which
overlaps with the device's work only from pinned memory.)
"""

from __future__ import annotations

import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing

from ..config import AugConfig
from . import randaugment


class DeviceAugment:
    """Callable (images uint8 (B,3,H,W), labels (B,)) -> (images float channels_last, targets).

    Targets are soft (B, num_classes) when Mixup/CutMix is on, else the labels. ``cpu_done`` lists the steps the
    loader already did per sample on the CPU (the fallback loader runs timm's PIL RandAugment)."""

    def __init__(self, cfg: AugConfig | None, num_classes: int, mean, std, device, train: bool = True,
                 cpu_done: tuple = (), reused_buffers: bool = False):
        self.cfg, self.train, self.device = cfg or AugConfig(), train, torch.device(device)
        # FFCV hands out views of pinned buffers that its thread refills a few batches later, with CPU writes its
        # CUDA events do not order: an asynchronous copy still queued behind the previous step would read the next
        # batch's pixels. Copied first into a fresh pinned tensor, which PyTorch's caching host allocator keeps until
        # the copy has run, the transfer stays asynchronous without a host-device sync. (Only a GPU shows the race.)
        self.stage = reused_buffers and self.device.type == "cuda"
        c = self.cfg
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255
        self.ra = randaugment.parse(c.rand_augment) if (train and c.rand_augment and "rand_augment" not in cpu_done) else None
        self.jitter = c.color_jitter if (train and c.color_jitter and (not c.rand_augment or c.force_color_jitter)
                                         and "color_jitter" not in cpu_done) else 0.0
        self.erase = RandomErasing(c.reprob, mode=c.remode, max_count=c.recount, device=str(self.device)) \
            if (train and c.reprob > 0) else None
        self.mixup = Mixup(mixup_alpha=c.mixup, cutmix_alpha=c.cutmix, prob=c.mixup_prob,
                           switch_prob=c.mixup_switch_prob, mode=c.mixup_mode, label_smoothing=c.smoothing,
                           num_classes=num_classes) if (train and (c.mixup > 0 or c.cutmix > 0) and c.mixup_prob > 0) else None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        if self.stage:
            images = torch.empty_like(images, pin_memory=True).copy_(images)
        x = images.to(self.device, non_blocking=True).float().contiguous(memory_format=torch.channels_last)
        y = labels.to(self.device, non_blocking=True)
        if self.ra is not None:
            x = randaugment.rand_augment(x, **self.ra)
        if self.jitter:
            x = color_jitter(x, self.jitter)
        if self.mixup is not None:
            if x.shape[0] % 2:
                raise ValueError(f"Mixup/CutMix needs an even batch size per device, got {x.shape[0]}")
            x, y = self.mixup(x, y)
        x = (x - self.mean) / self.std
        if self.erase is not None:
            x = self.erase(x)
        return x.contiguous(memory_format=torch.channels_last), y


def color_jitter(x, strength: float, generator=None):
    """Brightness, contrast, saturation factors ~ U[1 - s, 1 + s] per image (torchvision's ColorJitter without hue,
    applied in that fixed order rather than a random one)."""
    b = x.shape[0]
    f = lambda: (1 + strength * (2 * torch.rand(b, device=x.device, generator=generator) - 1)).view(-1, 1, 1, 1)
    x = (x * f()).clamp(0, 255)
    gray = randaugment._gray(x)
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    x = (mean + f() * (x - mean)).clamp(0, 255)
    gray = randaugment._gray(x)
    return (gray + f() * (x - gray)).clamp(0, 255)
