"""Checkpoints that survive preemption: atomic, complete, and loadable without executing code.

A checkpoint holds model, EMA, optimizer, scheduler, grad scaler, epoch, step within the epoch, global step, the RNG
states of every rank (python, numpy, torch CPU and CUDA), the data-order seed, the W&B run id and step, the best EMA
top-1 and the resolved config. Every file is written next to its target and renamed into place, so a kill at any
moment leaves the previous checkpoint intact. Everything in it is a tensor, number, string or container of those:
it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch


def atomic_save(obj, path: str | os.PathLike):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_copy(src, dst):
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def load(path: str | os.PathLike) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    """This process's RNG states in weights_only-safe types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                       "cached": cached}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    random.setstate(_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuples(x):
    """torch.load gives back lists where python's random state had tuples."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def latest(run_dir: str | os.PathLike) -> Path | None:
    path = Path(run_dir) / "checkpoints" / "last.pth.tar"
    return path if path.is_file() else None
