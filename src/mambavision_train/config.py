"""The configuration schema: one typed dataclass per config group, registered with Hydra's ConfigStore.

Hydra checks every composed config against these: an unknown key, a value of the wrong type or a choice outside
its Enum fails while the config composes. ``validate_train`` / ``validate_eval`` check the rest in one place (ranges,
names looked up in registries, values derived from several keys), before anything is built. Either way the user
gets one line and exit code 2 (cli.py). Group values live in conf/<group>/*.yaml; the top-level keys, their
defaults and what they mean live here.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Optional, Tuple

from omegaconf import MISSING

from .errors import ConfigError

from .data import AugConfig, DataConfig
from .data import KINDS as DATA_KINDS


class Choice(str, Enum):
    """A string choice that compares, hashes and prints as its value (OmegaConf validates it by name)."""
    __str__ = str.__str__
    __format__ = str.__format__


class Amp(Choice):
    auto = "auto"  # bf16 on GPUs with native bf16, else fp16; fp32 on the CPU
    bf16 = "bf16"
    fp16 = "fp16"  # with a GradScaler
    fp32 = "fp32"


class NanPolicy(Choice):
    stop = "stop"  # exit with code 2 before any update, the last checkpoint intact
    skip = "skip"  # every rank skips the step; counted and logged


class DistKind(Choice):
    none = "none"
    ddp = "ddp"
    fsdp = "fsdp"


class LoggerMode(Choice):
    online = "online"
    offline = "offline"
    disabled = "disabled"


class ScanImpl(Choice):
    auto = "auto"
    cuda = "cuda"  # mamba_ssm's kernel
    triton = "triton"  # ours, fused Triton kernels: any CUDA GPU, nothing to compile
    torch = "torch"  # ours, runs everywhere
    mamba_ref = "mamba_ref"  # mamba_ssm's reference loop (slow; tests)


class InitHead(Choice):
    reset = "reset"  # a classifier for another number of classes keeps its fresh initialisation
    keep = "keep"  # the classifier must fit and is loaded too


class Freeze(Choice):
    none = "none"
    stem = "stem"  # ... and everything before it: stage1 = stem + stage 1, ..., stage4 = all but the classifier
    stage1 = "stage1"
    stage2 = "stage2"
    stage3 = "stage3"
    stage4 = "stage4"  # linear probing


class Weights(Choice):
    auto = "auto"
    ema = "ema"
    plain = "plain"


Pretrain = Choice("Pretrain", {"auto": "auto", "1k": "1k", "21k": "21k"})  # names that are not identifiers


@dataclass
class ModelConfig:
    name: str = MISSING  # a registered variant: python -m mambavision_train.models lists them
    img_size: Optional[int] = None  # resolution; null: the variant's default
    crop_pct: Optional[float] = None  # evaluation crop; null: the variant's default
    drop_path_rate: Optional[float] = None  # null: the paper's value for this variant
    scan_impl: Optional[ScanImpl] = None  # null: $MAMBAVISION_SCAN or auto (GPU: mamba_ssm's kernel, else Triton)
    grad_checkpointing: bool = False
    freeze: Freeze = Freeze.none  # fine-tuning: no updates for this part and what precedes it (BN frozen too)


@dataclass
class OptimConfig:
    name: str = MISSING  # any timm optimizer: adamw, lamb (the paper's), sgd, ...
    lr: float = MISSING  # absolute, not scaled by the batch size
    weight_decay: float = MISSING  # not applied to parameters with ndim <= 1 or named *.bias (timm's rule)
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    layer_decay: Optional[float] = None  # layer-wise lr decay (e.g. 0.75 for fine-tuning); null: off


@dataclass
class SchedConfig:
    warmup_epochs: float = MISSING
    warmup_lr: float = MISSING
    min_lr: float = MISSING
    cooldown_epochs: int = MISSING


@dataclass
class DistConfig:
    kind: DistKind = MISSING
    sync_bn: bool = False  # the official recipe averages BN statistics before evaluation instead
    reshard_after_forward: bool = True  # fsdp: false keeps gathered parameters from forward to backward


@dataclass
class LoggerConfig:
    mode: LoggerMode = MISSING
    project: str = "mambavision-train"
    entity: Optional[str] = None


@dataclass
class EmaConfig:
    enabled: bool = True
    decay: float = 0.9998
    warmup: bool = False  # timm ModelEmaV3's warm-up: decay min(decay, 1 - step^-2/3), for short runs


@dataclass
class MesaConfig:
    weight: float = 0.0  # the paper recipe sets it per model (experiment/)
    start_ratio: float = 0.25


@dataclass
class CheckpointConfig:
    every_n_steps: int = 0  # also write last.pth.tar every N optimizer steps (mid-epoch resume); 0: per epoch
    keep_steps: bool = False  # keep a copy of each of those as step_<N>.pth.tar ...
    keep_last_n: int = 3  # ... the newest N of them


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    aug: AugConfig = MISSING
    optim: OptimConfig = MISSING
    sched: SchedConfig = MISSING
    dist: DistConfig = MISSING
    logger: LoggerConfig = MISSING
    run_name: str = "${model.name}"
    run_root: str = "${oc.env:MAMBAVISION_RUNS,runs}"  # where run directories go: scratch storage on a cluster
    run_dir: str = "${run_root}/${run_name}"  # shared by every rank and every restart: resume=auto looks here
    resume: str = "auto"  # auto: the newest checkpoint in run_dir that loads, if any | never | a path
    resume_allow_changes: bool = False  # resume a checkpoint of another recipe or world size, with the new values
    init_from: Optional[str] = None  # fine-tune: start from these weights (our run dir or checkpoint: EMA; an
    # official .pth.tar, a model.safetensors, a Hugging Face id); a checkpoint in run_dir still takes precedence
    init_head: InitHead = InitHead.reset
    seed: int = 31  # + rank for the augmentation and DropPath draws
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    epochs: int = 310  # cosine epochs; sched.cooldown_epochs more at min_lr follow (310 + 10 = 320)
    batch_size: int = 4096  # global batch per optimizer step (the paper's); lr is absolute, not scaled
    micro_batch_size: int = 128  # per device per forward; accumulation = batch_size / (micro_batch_size x GPUs)
    eval_batch_size: Optional[int] = None  # default: micro_batch_size
    amp: Amp = Amp.auto
    deterministic: bool = False  # CUDA: deterministic kernels, so a resume is bit-exact there too (slower); false:
    # cuDNN picks its fastest kernels. The CPU is always deterministic.
    channels_last: bool = True
    compile: bool = False
    clip_grad: Optional[float] = 5.0  # global grad-norm clipping; null: off
    nan_policy: NanPolicy = NanPolicy.stop
    ema: EmaConfig = field(default_factory=EmaConfig)
    mesa: MesaConfig = field(default_factory=MesaConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log_every: int = 50
    progress: bool = True  # tqdm bar with img/s and ETA (rank 0)
    max_steps: Optional[int] = None  # stop after this many optimizer steps (smoke tests)
    dry_run: bool = False  # check the request, its data and its run_dir, say what would run, and exit


@dataclass
class EvalConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    checkpoint: Optional[str] = None  # ours (.pth.tar: EMA), an exported state dict, an official .pth.tar, a
    # model.safetensors or a Hugging Face repo id; null: the variant's official weights
    weights: Weights = Weights.auto  # auto: EMA for our training checkpoints, 'state_dict' for official files
    pretrain: Pretrain = Pretrain.auto  # which paper row: auto (21k when the weights' name says 21K, or the variant
    # exists only 21K-pretrained) | 1k | 21k
    batch_size: int = 128
    amp: Amp = Amp.fp32  # the paper evaluates in fp32
    device: str = "auto"
    channels_last: bool = True
    table: Optional[str] = None  # append a row to this markdown file (the reproduction table)
    dry_run: bool = False  # check the request and its validation data, say what would run, and exit
    topk: int = 5  # also report top-k accuracy for this k (top-1 and top-5 are always reported)
    out_dir: Optional[str] = None  # per_class.csv, confusion.csv/png; null: beside `table` (<table>_<model>_<weights>/)
    # when there is one, else not written (balanced accuracy is printed either way)
    progress: bool = True


def register():
    """Make the schemas and the model options known to Hydra (before it composes)."""
    from hydra.core.config_store import ConfigStore
    from .models.mambavision import ARCHS
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    for name in ARCHS:  # model=mambavision_b: one schema, one option per registered variant
        cs.store(group="model", name=name, node=ModelConfig(name=name))


# ----------------------------------------------------------------------------------------------------- checks
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
    if source and not Path(source).expanduser().exists() and (source.startswith(("/", ".", "~"))
                                                               or source.count("/") != 1):
        raise ConfigError(f"{key}={source} does not exist (a file, one of our run directories, or a Hugging Face "
                          f"repo id like nvidia/MambaVision-T-1K)")


def check_run_root(cfg):
    """An empty run_root (MAMBAVISION_RUNS='') would put run_dir=${run_root}/NAME at the filesystem's root."""
    from omegaconf import OmegaConf
    raw = OmegaConf.to_container(OmegaConf.masked_copy(cfg, ["run_dir"]), resolve=False)["run_dir"]
    if not str(cfg.run_root).strip() and "${run_root}" in str(raw):
        raise ConfigError("run_root is empty (MAMBAVISION_RUNS set to ''?); set run_root=DIR or run_dir=DIR")


def check_model(cfg):
    import timm
    from . import models  # noqa: F401  (registers the variants)
    _choice("model.name", cfg.model.name, timm.list_models("mambavision*"))
    _in(cfg, "model.img_size", 16)
    _in(cfg, "model.crop_pct", 0, 1, lo_open=True)
    _in(cfg, "model.drop_path_rate", 0, 1, hi_open=True)


def check_scan(cfg):
    """The scan implementation can run on the run's device (e.g. scan_impl=triton without triton)."""
    import torch
    from .ops.selective_scan import resolve_impl
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device.replace("auto", "cpu")
    try:
        resolve_impl(cfg.model.scan_impl, torch.device(device), deterministic=bool(cfg.get("deterministic")))
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"model.scan_impl={cfg.model.scan_impl}: {e}") from None


def check_data(cfg):
    _choice("data.kind", cfg.data.kind, DATA_KINDS)
    _in(cfg, "data.num_classes", 1)
    _in(cfg, "data.num_workers", 0)


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


def validate_train(cfg, world_size: int) -> int:
    """Everything about a training request that types cannot say; returns the gradient accumulation steps."""
    from timm.optim import list_optimizers
    check_schema(TrainConfig, cfg)
    check_model(cfg)
    check_data(cfg)
    check_device(cfg.device, world_size)
    check_scan(cfg)
    check_source("init_from", cfg.init_from)
    check_run_root(cfg)
    for key, lo in (("epochs", 1), ("batch_size", 1), ("micro_batch_size", 1), ("eval_batch_size", 1), ("seed", 0),
                    ("log_every", 1), ("max_steps", 1), ("checkpoint.every_n_steps", 0), ("checkpoint.keep_last_n", 1),
                    ("sched.warmup_epochs", 0), ("sched.warmup_lr", 0), ("sched.min_lr", 0),
                    ("sched.cooldown_epochs", 0), ("optim.weight_decay", 0), ("mesa.weight", 0), ("aug.mixup", 0),
                    ("aug.cutmix", 0), ("aug.recount", 1)):
        _in(cfg, key, lo)
    for key in ("ema.decay", "mesa.start_ratio", "aug.reprob", "aug.mixup_prob", "aug.mixup_switch_prob",
                "aug.hflip", "aug.color_jitter"):
        _in(cfg, key, 0, 1)
    for key in ("optim.lr", "optim.eps", "clip_grad"):
        _in(cfg, key, 0, lo_open=True)
    _in(cfg, "aug.smoothing", 0, 1, hi_open=True)
    _in(cfg, "optim.layer_decay", 0, 1, lo_open=True)
    for i, beta in enumerate(cfg.optim.betas):
        _in(cfg, f"optim.betas.{i}", 0, 1, hi_open=True)
    _choice("optim.name", cfg.optim.name, list_optimizers(), what="a timm optimizer (timm.optim.list_optimizers())")
    _choice("aug.remode", cfg.aug.remode, ("pixel", "const", "rand"))
    _choice("aug.mixup_mode", cfg.aug.mixup_mode, ("batch", "pair", "elem"))
    _choice("aug.train_interpolation", cfg.aug.train_interpolation, ("random", "bilinear", "bicubic", "nearest"))
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
    check_schema(EvalConfig, cfg)
    check_model(cfg)
    check_data(cfg)
    check_device(cfg.device, world_size)
    check_scan(cfg)
    check_source("checkpoint", cfg.checkpoint)
    _in(cfg, "batch_size", 1)
    _in(cfg, "topk", 1)
