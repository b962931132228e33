"""The order in which a rank sees the samples of an epoch: a pure function of (seed, epoch, rank, world size).

Shared by every loader, so that a resumed run sees exactly the batches it would have seen, FFCV or not:
- the epoch's permutation comes from a generator seeded with (seed, epoch), the same on every rank;
- rank r takes every world-th sample from position r (shards are disjoint and together cover the epoch);
- in training every rank keeps the same number of full batches (DDP needs equal step counts): the few samples
  past the last full batch, a different few each epoch, wait for the next epoch;
- a loader can start at batch k of an epoch (resume mid-epoch);
- each sample's random draws (crop, flip, the PIL transforms) come from ``sample_key(seed, epoch, index)``, so they
  depend neither on the worker or thread that decodes it nor on where the epoch was resumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _compiled(fn):
    """numba-compiled where numba is installed (the FFCV decoder calls these from its compiled code); plain numpy
    elsewhere, so that the fallback loader runs where FFCV and numba are not installed."""
    try:
        from numba import njit
    except ImportError:
        def plain(*args):
            with np.errstate(over="ignore"):  # the hash wraps around by design; numpy would warn at every call
                return fn(*args)
        return plain
    return njit(cache=True)(fn)


@_compiled
def mix64(x):
    # splitmix64 finaliser: a good 64-bit hash, wrapping arithmetic
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@_compiled
def sample_key(seed, epoch, index):
    """A 64-bit key (np.uint64) for the random draws of sample ``index`` in ``epoch``: a counter-based hash."""
    return mix64(mix64(mix64(np.uint64(seed)) + np.uint64(epoch)) + np.uint64(index))


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
