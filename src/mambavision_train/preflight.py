"""What is checked before any expensive work: the environment (the torch floor, before the config is read), the
values of a request against what its schema allows (config.py's ranges and choices, the registries, the keys that
depend on each other), and a whole request against its data and its output folders (what train.py and eval.py do
first, and all of what ``dry_run=true`` does).

The torch floor is what the code needs, not a guess: FSDP2's public API (``torch.distributed.fsdp.fully_shard`` and
``FSDPModule``, imported on every run) is there from 2.6, the Triton kernels' ``tl.range(..., loop_unroll_factor=)``
comes with the Triton of torch 2.6, and FSDP2 honours ``reshard_after_forward`` on the root module from 2.8 (before,
the EMA teacher's forward under MESA leaves the root parameters gathered and the EMA update fails on their shapes).
CI tests torch 2.14.1.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .config import DistKind, EvalConfig, TrainConfig
from . import hub
from .errors import ConfigError

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
    """Everything about a training request that can go wrong before any expensive work: the config (below),
    both splits of the data and their classes, enough images for one step, a run directory that can be written and
    that does not hold another run it would overwrite."""
    from .config import AugConfig, DataConfig, typed
    from .data import check, class_map, num_images
    from .checkpoint.resume import refuse_a_used_run_dir
    accumulation = validate_train(cfg, world_size)
    data, aug = typed(DataConfig, cfg.data), typed(AugConfig, cfg.aug)
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
    from .config import DataConfig, typed
    from .data import check
    validate_eval(cfg, world_size)
    data = typed(DataConfig, cfg.data)
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


# ------------------------------------------------------------------------------------------- the config values
def _in(cfg, key: str, lo=None, hi=None, lo_open=False, hi_open=False):
    from omegaconf import OmegaConf
    v = OmegaConf.select(cfg, key)
    if v is None:
        return
    bad = (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and (v >= hi if hi_open else v > hi))
    if bad:
        left, right = ("(" if lo_open else "[") + ("-inf" if lo is None else f"{lo:g}"), \
            ("inf" if hi is None else f"{hi:g}") + (")" if hi_open else "]")
        raise ConfigError(f"{key}={v} is out of range: it must be in {left}, {right}")


def _choice(key: str, value, choices, what: str = ""):
    if value not in choices:
        if what:  # a registry too long to print: the nearest names
            close = difflib.get_close_matches(str(value), list(choices), n=3, cutoff=0.5)
            raise ConfigError(f"{key}={value!r} is not {what}; closest: {', '.join(close) or 'none'}")
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(map(str, choices))}")


def check_device(device: str, world_size: int = 1):
    import torch
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ConfigError(f"device={device!r} is not one of: auto, cpu, cuda, cuda:N")
    if ":" in device and world_size > 1:  # every rank on the same GPU: NCCL refuses it ("duplicate GPU")
        raise ConfigError(f"device={device} with {world_size} processes would put every rank on one GPU; use "
                          f"device=auto or cuda (each rank takes the GPU of its local rank)")
    if device.startswith("cuda"):
        count = torch.cuda.device_count()
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= count:
            raise ConfigError(f"device={device}: this machine has {count} CUDA device(s); use device=auto or cpu")


def check_source(key: str, source: str | None):
    """A local path that is not there fails now, not after the model and the data are built."""
    from pathlib import Path
    if source and not Path(source).expanduser().exists() and hub.repo_id(source) is None:
        raise ConfigError(f"{key}={source} does not exist (a file, one of our run directories, or a Hugging Face "
                          f"repo id like nvidia/MambaVision-T-1K)")


def check_run_root(cfg):
    """An empty run_root (MAMBAVISION_RUNS='') would put run_dir=${run_root}/NAME at the filesystem's root."""
    from omegaconf import OmegaConf
    raw = OmegaConf.to_container(OmegaConf.masked_copy(cfg, ["run_dir"]), resolve=False)["run_dir"]
    if not str(cfg.run_root).strip() and "${run_root}" in str(raw):
        raise ConfigError("run_root is empty (MAMBAVISION_RUNS set to ''?); set run_root=DIR or run_dir=DIR")


def check_fields(cfg, schema, prefix: str = ""):
    """Every range and string choice written beside the schema's fields (config.valid), nested groups included."""
    import typing
    from dataclasses import fields, is_dataclass
    hints = typing.get_type_hints(schema)
    for f in fields(schema):
        key = prefix + f.name
        rule = f.metadata.get("valid")
        if rule:
            from omegaconf import OmegaConf
            v = OmegaConf.select(cfg, key)
            keys = [f"{key}.{i}" for i in range(len(v))] if rule["each"] and v is not None else [key]
            for k in keys:
                if rule["choices"] is not None:
                    v = OmegaConf.select(cfg, k)
                    if v is not None:
                        _choice(k, v, rule["choices"])
                else:
                    _in(cfg, k, rule["lo"], rule["hi"], rule["lo_open"], rule["hi_open"])
        elif is_dataclass(hints[f.name]):
            check_fields(cfg, hints[f.name], key + ".")


def check_model(cfg):
    import timm
    from . import models  # noqa: F401  (registers the variants)
    _choice("model.name", cfg.model.name, timm.list_models("mambavision*"))


def check_scan(cfg):
    """The scan implementation can run on the run's device (e.g. scan_impl=triton without triton)."""
    import torch
    from .ops.selective_scan import resolve_impl
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device.replace("auto", "cpu")
    try:
        resolve_impl(cfg.model.scan_impl, torch.device(device), deterministic=bool(cfg.get("deterministic")))
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"model.scan_impl={cfg.model.scan_impl}: {e}") from None


def check_schema(schema, cfg):
    """Keys Hydra let in past the schema (``+key=value`` opens it): merged into the schema, they fail."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError
    try:
        OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    except ConfigKeyError as e:
        raise ConfigError(f"{e.full_key}: no such key (a typo, or a '+' too many?)") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:  # ??? in an experiment: a value only the user can give
        raise ConfigError(f"{missing[0]} must be set (e.g. {missing[0]}=...); this config leaves it to you")


def check_request(cfg, schema, world_size: int, source: str):
    """What training and evaluation requests share: the schema's keys and values, the model, the device, the scan
    and the weights named by the key ``source``."""
    check_schema(schema, cfg)
    check_model(cfg)
    check_fields(cfg, schema)
    check_device(cfg.device, world_size)
    check_scan(cfg)
    check_source(source, cfg[source])


def validate_train(cfg, world_size: int) -> int:
    """Everything about a training request that types cannot say; returns the gradient accumulation steps."""
    from timm.optim import list_optimizers
    check_request(cfg, TrainConfig, world_size, "init_from")
    check_run_root(cfg)
    _choice("optim.name", cfg.optim.name, list_optimizers(), what="a timm optimizer (timm.optim.list_optimizers())")
    if cfg.sched.warmup_epochs > cfg.epochs:
        raise ConfigError(f"sched.warmup_epochs={cfg.sched.warmup_epochs} is longer than epochs={cfg.epochs}")
    if cfg.dist.kind == DistKind.none and world_size > 1:
        raise ConfigError(f"dist=none with {world_size} processes would train {world_size} independent models; use "
                          f"dist=ddp or dist=fsdp")
    per_step = cfg.micro_batch_size * world_size
    if cfg.batch_size % per_step:
        raise ConfigError(f"batch_size={cfg.batch_size} is not a multiple of micro_batch_size ({cfg.micro_batch_size})"
                          f" x world size ({world_size}) = {per_step}; change batch_size or micro_batch_size")
    mixing = (cfg.aug.mixup > 0 or cfg.aug.cutmix > 0) and cfg.aug.mixup_prob > 0
    if mixing and cfg.micro_batch_size % 2:
        raise ConfigError(f"micro_batch_size={cfg.micro_batch_size}: Mixup/CutMix pairs images within a batch, so it "
                          f"must be even")
    return cfg.batch_size // per_step


def validate_eval(cfg, world_size: int = 1):
    check_request(cfg, EvalConfig, world_size, "source")
