"""Random images with fixed labels, for throughput runs without any data on disk."""

from __future__ import annotations

import torch

from .order import Shard, batches_per_epoch


class SyntheticLoader:
    """The same random uint8 batch (B, 3, res, res) and labels, ``num_samples`` per epoch split over the ranks."""

    def __init__(self, *, batch_size: int, res: int, num_classes: int = 1000, num_samples: int = 12800,
                 train: bool = True, seed: int = 0, shard: Shard = Shard(), **_):
        g = torch.Generator().manual_seed(seed + shard.rank)
        self.images = torch.randint(0, 256, (batch_size, 3, res, res), dtype=torch.uint8, generator=g)
        self.labels = torch.arange(batch_size) % num_classes
        self.num_samples, self.batch_size, self.shard, self.train, self.res = num_samples, batch_size, shard, train, res
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0):
        self.start_batch = start_batch

    def __len__(self):
        return batches_per_epoch(self.num_samples, self.batch_size, self.shard, drop_last=True) - self.start_batch

    def __iter__(self):
        for _ in range(len(self)):
            yield self.images, self.labels
