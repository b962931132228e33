"""What is checked before any expensive work: the environment (the torch floor, before the config is read), and a
whole request against its data and its output folders (what train.py and eval.py do first, and all of what
``dry_run=true`` does).

The torch floor is what the code needs, not a guess: FSDP2's public API (``torch.distributed.fsdp.fully_shard`` and
``FSDPModule``, imported on every run) is there from 2.6, the Triton kernels' ``tl.range(..., loop_unroll_factor=)``
comes with the Triton of torch 2.6, and FSDP2 honours ``reshard_after_forward`` on the root module from 2.8 (before,
the EMA teacher's forward under MESA leaves the root parameters gathered and the EMA update fails on their shapes).
CI tests torch 2.14.1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TORCH_FLOOR = "2.8"


def torch_problem() -> str | None:
    """One line saying why this torch cannot run the project, or None."""
    import torch
    if torch.__version__ < TORCH_FLOOR:  # TorchVersion compares as a version, not as text
        return (f"torch {torch.__version__} is too old: mambavision-train needs torch >= {TORCH_FLOOR} (FSDP2's "
                f"public API and root resharding, Triton 3.2); pip install 'torch>={TORCH_FLOOR}' with the build for "
                f"your CUDA (https://pytorch.org/get-started/locally/)")
    return None


@dataclass
class TrainRequest:
    """A training request checked against its data, before anything is built."""
    accumulation: int
    data: object  # DataConfig
    aug: object  # AugConfig
    classes: list | None
    images: int  # in the train split


def writable(key: str, path, file: bool = False) -> None:
    """``path`` (a folder, or with ``file`` a file) can be created and written: its first existing ancestor is a
    writable folder (an existing file: writable itself)."""
    from .errors import ConfigError
    p = Path(path).expanduser().absolute()
    if file and p.is_file():
        if not os.access(p, os.W_OK):
            raise ConfigError(f"{key}={path}: this user cannot write to it")
        return
    p = p.parent if file else p
    while not p.exists():
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path}: {p} is not a folder this user can write to; point it elsewhere (scratch "
                          f"storage: run_root=... or MAMBAVISION_RUNS)")


def check_train(cfg, world_size: int) -> TrainRequest:
    """Everything about a training request that can go wrong before any expensive work: the config (config.py),
    both splits of the data and their classes, enough images for one step, a run directory that can be written and
    that does not hold another run it would overwrite."""
    from .config import validate_train
    from .errors import ConfigError
    from .data import AugConfig, DataConfig, check, class_map, from_config, num_images
    from .checkpoint.resume import refuse_a_used_run_dir
    accumulation = validate_train(cfg, world_size)
    data, aug = from_config(DataConfig, cfg.data), from_config(AugConfig, cfg.aug)
    for split in (data.train_split, data.val_split):
        check(data, split)
    classes = class_map(data)  # label i is classes[i]; image folders: both splits agree
    images = num_images(data, data.train_split)
    if images // world_size < cfg.batch_size // world_size:
        raise ConfigError(f"one optimizer step needs {cfg.batch_size} images per epoch but this rank has "
                          f"{images // world_size}; lower batch_size (a small dataset: experiment=finetune_own, "
                          f"docs/finetune.md)")
    writable("run_dir", cfg.run_dir)
    refuse_a_used_run_dir(Path(cfg.run_dir), str(cfg.resume))
    return TrainRequest(accumulation, data, aug, classes, images)


def check_eval(cfg, world_size: int):
    """eval.py's request and its validation data (the weights are read by the run itself: they may be a file that
    training has yet to write, or a Hugging Face download)."""
    from .config import validate_eval
    from .data import DataConfig, check, from_config
    validate_eval(cfg, world_size)
    data = from_config(DataConfig, cfg.data)
    check(data, data.val_split)
    for key in ("table", "out_dir"):
        if cfg.get(key):
            writable(key, cfg[key], file=key == "table")
    return data


def dry_run(cfg, script: str) -> dict:
    """``dry_run=true``: the checks of a real start, then one line saying what would run (what the sbatch scripts
    ask before a job spends hours training). Nothing is written."""
    from .distributed import env_world_size
    world = env_world_size()
    if script == "train":
        r = check_train(cfg, world)
        print(f"ok: train.py would train {cfg.model.name} on {r.images:,} images of {cfg.data.root} "
              f"({len(r.classes) if r.classes else cfg.data.num_classes} classes), {world} process(es) x "
              f"{r.accumulation} accumulation, into {cfg.run_dir}", flush=True)
    else:
        data = check_eval(cfg, world)
        print(f"ok: eval.py would evaluate {cfg.model.name} on {data.root} ({data.val_split})", flush=True)
    return {"ok": True}
