"""The run's random generators in one place: seeding them, and their states in weights_only-safe types for the
checkpoint (engine/trainer.py seeds, checkpoint/states.py saves and restores, data/folder_loader.py seeds workers)."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_all(seed: int):
    """python, numpy and torch (CPU and every CUDA device), as timm's random_seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_host(key: int):
    """python, numpy and torch's CPU generator only. torch.manual_seed would also reseed every CUDA generator
    (DropPath's, the device augmentation's), which a loader thread or worker must leave alone."""
    random.seed(key)
    np.random.seed(key % 2**32)
    torch.default_generator.manual_seed(key % 2**63)


def state() -> dict:
    """This process's generator states, in types torch.load(weights_only=True) reads back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                     "cached": cached}}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_state(s: dict):
    random.setstate(_tuples(s["python"]))
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def _tuples(x):
    """torch.load gives back lists where python's random state had tuples."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
