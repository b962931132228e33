"""What a checkpoint of train.py holds and what its files are called: the one module that spells either.

A run directory's ``checkpoints/`` holds ``last``, ``previous`` (the one ``last`` replaced), ``best`` (by EMA top-1)
and ``step_<N>`` copies, as single files (``.pth.tar``: one process, DDP) or as links to sharded directories under
``dcp/`` (``.dcp``: FSDP2, with the rank-0 part in ``meta.pth``); and the EMA weights exported in full, in the layout of
the official and timm checkpoints (``ema_last.pth``, ``ema_best.pth``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

DIR = "checkpoints"
FILE, SHARDED, SHARDS, META = ".pth.tar", ".dcp", "dcp", "meta.pth"
LAST, PREVIOUS, BEST = "last", "previous", "best"
EMA_LAST, EMA_BEST = "ema_last.pth", "ema_best.pth"


def step_name(global_step: int) -> str:
    return f"step_{global_step}"


# A training checkpoint's keys. The weights and the optimizer come from their objects (store.py); each other key is
# a state the trainer registers with its Checkpointer, or a value written for the reader (classes, config).
MODEL, EMA, OPTIMIZER = "model", "ema", "optimizer"
STATE, SCHEDULER, SCALER, RNG, BN_STATS = "state", "scheduler", "scaler", "rng", "bn_stats"
CLASSES, WORLD_SIZE, CONFIG = "classes", "world_size", "config"

# An exported EMA file: {WEIGHTS: the state dict with the official names, CLASSES, ARCH: the variant, IMG_SIZE}.
WEIGHTS, ARCH, IMG_SIZE = "state_dict", "model", "img_size"


def is_training_checkpoint(ckpt) -> bool:
    """One of train.py's: EMA weights beside the counters (they are the weights to use, as the official recipe
    selects by them)."""
    return isinstance(ckpt.get(EMA), Mapping) and STATE in ckpt


def directory(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / DIR


def latest(run_dir: str | os.PathLike) -> Path | None:
    """The run's last checkpoint: ``last.dcp`` (sharded) or ``last.pth.tar``, whichever was written last."""
    d = directory(run_dir)
    found = [p for p in (d / (LAST + SHARDED), d / (LAST + FILE)) if p.exists()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def candidates(run_dir: str | os.PathLike) -> list[Path]:
    """Every checkpoint of the run that could be resumed from, newest first: ``last``, ``previous``, the ``step_<N>``
    copies and ``best`` (single files), or every complete sharded directory."""
    d = directory(run_dir)
    if not d.is_dir():
        return []
    files = [p for p in d.glob("*" + FILE) if not p.name.startswith(".")]
    sharded = [p for p in (d / SHARDS).glob("*") if p.is_dir() and not p.name.endswith(".tmp")] \
        if (d / SHARDS).is_dir() else []
    return sorted(files + sharded, key=lambda p: p.stat().st_mtime, reverse=True)


def has_files(run_dir: str | os.PathLike) -> bool:
    d = directory(run_dir)
    return d.is_dir() and any(d.iterdir())
