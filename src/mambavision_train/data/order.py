"""The order in which a rank sees the samples of an epoch: a pure function of (seed, epoch, rank, world size).

Shared by every loader, so that a resumed run sees exactly the batches it would have seen, FFCV or not:
- the epoch's permutation comes from a generator seeded with (seed, epoch), the same on every rank;
- rank r takes every world-th sample from position r (shards are disjoint and together cover the epoch);
- in training every rank keeps the same number of full batches (DDP needs equal step counts): the few samples
  past the last full batch, a different few each epoch, wait for the next epoch;
- a loader can start at batch k of an epoch (resume mid-epoch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, {self.world_size})")


def epoch_permutation(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(num_samples).astype(np.int64)


def rank_indices(num_samples: int, batch_size: int, seed: int, epoch: int, shard: Shard = Shard(),
                 shuffle: bool = True, drop_last: bool = True, start_batch: int = 0) -> np.ndarray:
    """The sample indices rank ``shard.rank`` reads in ``epoch``, from batch ``start_batch`` on."""
    indices = epoch_permutation(num_samples, seed, epoch, shuffle)[shard.rank::shard.world_size]
    if drop_last:
        per_rank = (num_samples // shard.world_size) // batch_size * batch_size
        indices = indices[:per_rank]
    return indices[start_batch * batch_size:]


def batches_per_epoch(num_samples: int, batch_size: int, shard: Shard = Shard(), drop_last: bool = True) -> int:
    if drop_last:
        return (num_samples // shard.world_size) // batch_size
    longest = -(-num_samples // shard.world_size)
    return -(-longest // batch_size)
