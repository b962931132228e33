"""The fallback loader: torchvision's ImageFolder with timm's own transforms, for machines without FFCV.

The per-sample transforms are exactly timm's ``create_transform`` (RandomResizedCrop with random interpolation,
flip, PIL RandAugment on the CPU in training; resize + center crop in evaluation, the paper-exact path), in
prefetcher mode: they stop at uint8 tensors and the rest happens on the device (``augment.py``).
Each sample's random draws are seeded from (seed, epoch, index), so results do not depend on the number of
workers or on where an epoch was resumed.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image
from timm.data import auto_augment, create_transform
from timm.data.transforms_factory import transforms_imagenet_train
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets import ImageFolder

from .ffcv_decoder import sample_key
from .order import Shard, batches_per_epoch, rank_indices


def _posterize(img, bits_to_keep, **_):
    # timm's PosterizeIncreasing asks for 0 bits at magnitude 10 (reached by m9 + noise). Pillow < 12 gave a black
    # image (what the official runs saw); Pillow >= 12 raises. Keep the old behaviour.
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return _timm_posterize(img, bits_to_keep)


_timm_posterize = auto_augment.posterize
for _name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
    auto_augment.NAME_TO_OP[_name] = _posterize


def eval_transform(res: int, crop_pct: float, interpolation: str = "bicubic", crop_mode: str = "center"):
    """timm's eval transform (resize shorter side to floor(res / crop_pct), center crop), ending at uint8."""
    return create_transform(res, is_training=False, interpolation=interpolation, crop_pct=crop_pct,
                            crop_mode=crop_mode, use_prefetcher=True)


def train_transform(res: int, aug):
    """timm's training transform up to uint8 (random erasing and Mixup/CutMix follow on the device)."""
    return transforms_imagenet_train(res, scale=tuple(aug.scale), ratio=tuple(aug.ratio), hflip=aug.hflip, vflip=0.0,
                                     color_jitter=aug.color_jitter or None, force_color_jitter=aug.force_color_jitter,
                                     auto_augment=aug.rand_augment or None, interpolation=aug.train_interpolation,
                                     re_prob=0.0, use_prefetcher=True)


class SeededDataset(Dataset):
    """Runs the transform of sample i under RNGs seeded from (seed, epoch, i); restores them afterwards."""

    def __init__(self, dataset: ImageFolder, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        key = int(sample_key(self.seed, self.epoch, i))
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(key)
        np.random.seed(key % 2**32)
        torch.manual_seed(key % 2**63)
        try:
            image, label = self.dataset[i]
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])
        return torch.as_tensor(np.asarray(image)), label


class ShardBatchSampler(Sampler):
    def __init__(self, owner: "FolderLoader"):
        self.owner = owner

    def __iter__(self):
        o = self.owner
        idx = rank_indices(len(o.dataset), o.batch_size, o.seed, o.epoch, o.shard, shuffle=o.train,
                           drop_last=o.train, start_batch=o.start_batch)
        for b in range(0, len(idx), o.batch_size):
            yield idx[b:b + o.batch_size].tolist()

    def __len__(self):
        return len(self.owner)


class FolderLoader:
    """Iterate (images uint8 (B, 3, H, W), labels int64 (B,)) over one rank's share of an ImageFolder tree."""

    def __init__(self, root, *, train: bool, batch_size: int, res: int, aug=None, crop_pct: float = 1.0,
                 crop_mode: str = "center", interpolation: str = "bicubic", seed: int = 0, shard: Shard = Shard(),
                 num_workers: int = 2):
        self.train, self.batch_size, self.seed, self.shard = train, batch_size, seed, shard
        transform = train_transform(res, aug) if train else eval_transform(res, crop_pct, interpolation, crop_mode)
        self.folder = ImageFolder(str(root), transform=transform)
        self.dataset = SeededDataset(self.folder, seed)
        self.epoch, self.start_batch = 0, 0
        self.loader = DataLoader(self.dataset, batch_sampler=ShardBatchSampler(self), num_workers=num_workers,
                                 pin_memory=torch.cuda.is_available(), persistent_workers=False)

    @property
    def classes(self):
        return self.folder.classes

    def set_epoch(self, epoch: int, start_batch: int = 0):
        self.epoch, self.start_batch = epoch, start_batch
        self.dataset.epoch = epoch

    def __len__(self):
        return batches_per_epoch(len(self.dataset), self.batch_size, self.shard, drop_last=self.train) - self.start_batch

    def __iter__(self):
        for images, labels in self.loader:
            yield images, labels.long()
