"""The configuration schema, every group of it in this one module: a typed dataclass per config group, registered
with Hydra's ConfigStore, each field with its default, its meaning and (``valid(...)``) the values it may take.

Hydra checks every composed config against these: an unknown key, a value of the wrong type or a choice outside
its Enum fails while the config composes. The ranges and string choices written beside the fields, the names looked
up in registries and the values derived from several keys are checked by preflight.py, before anything is built.
Either way the user gets one line and exit code 2. Group values live in conf/<group>/*.yaml; the top-level keys,
their defaults and what they mean live here. A leaf: the standard library, omegaconf and errors.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar, Optional, Tuple

from omegaconf import MISSING

from .errors import DataError


def valid(default=MISSING, *, lo=None, hi=None, lo_open=False, hi_open=False, choices=None, each=False):
    """A field's default and the values it may take: [lo, hi] (open ends with lo_open / hi_open), one of
    ``choices``, or with ``each`` every element of a tuple so. preflight.check_fields reads them."""
    rule = dict(lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, choices=choices, each=each)
    if isinstance(default, (list, tuple, dict)):
        return field(default_factory=lambda: default, metadata={"valid": rule})
    return field(default=default, metadata={"valid": rule})


def typed(cls, node):
    """A DataConfig / AugConfig from a Hydra/OmegaConf node or dict; unknown keys are an error, not ignored. The one
    conversion to typed objects, done by the entry point's checks (preflight.check_train)."""
    from dataclasses import fields
    from omegaconf import DictConfig, OmegaConf
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise DataError(f"unknown {cls.__name__} key(s) {unknown}; valid keys: {sorted(known)}")
    return cls(**values)


DATA_KINDS = ("ffcv", "folder", "synthetic")


@dataclass
class DataConfig:
    kind: str = valid("ffcv", choices=DATA_KINDS)  # ffcv | folder | synthetic
    root: Optional[str] = None  # ffcv: folder with <split>.beton; folder: folder with <split>/<class>/<image>
    folder_root: Optional[str] = None  # where the ImageFolder tree is when it differs from root (digits)
    prepare: Optional[str] = None  # "digits": build the bundled demo data in root on first use
    train_split: str = "train"
    val_split: str = "val"
    num_classes: int = valid(1000, lo=1)
    num_workers: int = valid(8, lo=0)
    os_cache: bool = True  # FFCV: read through the page cache (False: its own quasi-random memory manager)
    num_samples: int = 12800  # synthetic: images per epoch


@dataclass
class AugConfig:
    """Everything the paper's recipe sets, each switchable (0 / None turns a step off); data/augment.py applies it."""
    rand_augment: Optional[str] = "rand-m9-mstd0.5-inc1"
    color_jitter: float = valid(0.4, lo=0, hi=1)  # as in timm: ignored while RandAugment is on, unless
    force_color_jitter: bool = False  # force_color_jitter
    reprob: float = valid(0.25, lo=0, hi=1)  # random erasing probability
    remode: str = valid("pixel", choices=("pixel", "const", "rand"))
    recount: int = valid(1, lo=1)
    mixup: float = valid(0.8, lo=0)  # Mixup alpha
    cutmix: float = valid(1.0, lo=0)  # CutMix alpha
    mixup_prob: float = valid(1.0, lo=0, hi=1)
    mixup_switch_prob: float = valid(0.5, lo=0, hi=1)
    mixup_mode: str = valid("batch", choices=("batch", "pair", "elem"))
    smoothing: float = valid(0.1, lo=0, hi=1, hi_open=True)
    # Crop and flip happen in the loader (FFCV decoder or PIL transforms); kept here so that one config drives both.
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = valid(0.5, lo=0, hi=1)
    # fallback loader only: timm's random bilinear/bicubic RandomResizedCrop
    train_interpolation: str = valid("random", choices=("random", "bilinear", "bicubic", "nearest"))


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
    img_size: Optional[int] = valid(None, lo=16)  # resolution; null: the variant's default
    crop_pct: Optional[float] = valid(None, lo=0, hi=1, lo_open=True)  # evaluation crop; null: the variant's default
    drop_path_rate: Optional[float] = valid(None, lo=0, hi=1, hi_open=True)  # null: the paper's value for this variant
    scan_impl: Optional[ScanImpl] = None  # null: $MAMBAVISION_SCAN or auto (GPU: mamba_ssm's kernel, else Triton)
    grad_checkpointing: bool = False
    freeze: Freeze = Freeze.none  # fine-tuning: no updates for this part and what precedes it (BN frozen too)


@dataclass
class OptimConfig:
    name: str = MISSING  # any timm optimizer: adamw, lamb (the paper's), sgd, ...
    lr: float = valid(lo=0, lo_open=True)  # absolute, not scaled by the batch size
    # not applied to parameters with ndim <= 1 or named *.bias (timm's rule)
    weight_decay: float = valid(lo=0)
    betas: Tuple[float, float] = valid((0.9, 0.999), lo=0, hi=1, hi_open=True, each=True)
    eps: float = valid(1e-8, lo=0, lo_open=True)
    layer_decay: Optional[float] = valid(None, lo=0, hi=1, lo_open=True)  # layer-wise lr decay (0.75 for
    # fine-tuning); null: off


@dataclass
class SchedConfig:
    warmup_epochs: float = valid(lo=0)
    warmup_lr: float = valid(lo=0)
    min_lr: float = valid(lo=0)
    cooldown_epochs: int = valid(lo=0)


@dataclass
class DistConfig:
    kind: DistKind = MISSING
    sync_bn: bool = False  # the official recipe averages BN statistics before evaluation instead
    reshard_after_forward: bool = True  # fsdp: false keeps gathered parameters from forward to backward
    # How long a rank waits for the others in a collective before it ends the run with one line (exit 75): a rank
    # that died or hangs. Checkpoint saves wait checkpoint.timeout_s instead.
    timeout_s: float = valid(600.0, lo=1)
    # No step or phase finished for this long: write every thread's stack of each rank once (the run goes on).
    # 0: three times the slowest step or phase seen, at least 300 s.
    watchdog_s: float = valid(0.0, lo=0)


@dataclass
class LoggerConfig:
    mode: LoggerMode = MISSING
    project: str = "mambavision-train"
    entity: Optional[str] = None


@dataclass
class EmaConfig:
    enabled: bool = True
    decay: float = valid(0.9998, lo=0, hi=1)
    warmup: bool = False  # timm ModelEmaV3's warm-up: decay min(decay, 1 - step^-2/3), for short runs


@dataclass
class MesaConfig:
    weight: float = valid(0.0, lo=0)  # the paper recipe sets it per model (experiment/)
    start_ratio: float = valid(0.25, lo=0, hi=1)


@dataclass
class CheckpointConfig:
    # also write last.pth.tar every N optimizer steps (mid-epoch resume); 0: per epoch
    every_n_steps: int = valid(0, lo=0)
    keep_steps: bool = False  # keep a copy of each of those as step_<N>.pth.tar ...
    keep_last_n: int = valid(3, lo=1)  # ... the newest N of them
    # how long the other ranks wait for rank 0 to write one (a large model on a slow shared file system)
    timeout_s: float = valid(1800.0, lo=1)


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
    seed: int = valid(31, lo=0)  # + rank for the augmentation and DropPath draws
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    epochs: int = valid(310, lo=1)  # cosine epochs; sched.cooldown_epochs more at min_lr follow (310 + 10 = 320)
    batch_size: int = valid(4096, lo=1)  # global batch per optimizer step (the paper's); lr is absolute, not scaled
    # per device per forward; accumulation = batch_size / (micro_batch_size x GPUs)
    micro_batch_size: int = valid(128, lo=1)
    eval_batch_size: Optional[int] = valid(None, lo=1)  # default: micro_batch_size
    amp: Amp = Amp.auto
    deterministic: bool = False  # CUDA: deterministic kernels, so a resume is bit-exact there too (slower); false:
    # cuDNN picks its fastest kernels. The CPU is always deterministic.
    channels_last: bool = True
    compile: bool = False
    clip_grad: Optional[float] = valid(5.0, lo=0, lo_open=True)  # global grad-norm clipping; null: off
    nan_policy: NanPolicy = NanPolicy.stop
    ema: EmaConfig = field(default_factory=EmaConfig)
    mesa: MesaConfig = field(default_factory=MesaConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log_every: int = valid(50, lo=1)
    progress: bool = True  # tqdm bar with img/s and ETA (rank 0)
    max_steps: Optional[int] = valid(None, lo=1)  # stop after this many optimizer steps (smoke tests)
    dry_run: bool = False  # check the request, its data and its run_dir, say what would run, and exit


@dataclass
class EvalConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    source: Optional[str] = None  # the weights: one of our run directories or checkpoints (EMA), an exported state
    # dict, an official .pth.tar, a model.safetensors or a Hugging Face repo id; null: the variant's official weights
    weights: Weights = Weights.auto  # auto: EMA for our training checkpoints, plain (the only weights) otherwise
    pretrain: Pretrain = Pretrain.auto  # which paper row: auto (21k when the weights' name says 21K, or the variant
    # exists only 21K-pretrained) | 1k | 21k
    batch_size: int = valid(128, lo=1)
    amp: Amp = Amp.fp32  # the paper evaluates in fp32
    device: str = "auto"
    channels_last: bool = True
    table: Optional[str] = None  # append a row to this markdown file (the reproduction table)
    dry_run: bool = False  # check the request and its validation data, say what would run, and exit
    topk: int = valid(5, lo=1)  # also report top-k accuracy for this k (top-1 and top-5 are always reported)
    out_dir: Optional[str] = None  # per_class.csv, confusion.csv/png; null: beside `table` (<table>_<model>_<weights>/)
    # when there is one, else not written (balanced accuracy is printed either way)
    progress: bool = True
    # Keys that had another name, for the unknown-key line (train's checkpoint.* is a group of save settings)
    renamed: ClassVar[dict] = {"checkpoint": "source"}


def register():
    """Make the schemas and the model options known to Hydra (before it composes)."""
    from hydra.core.config_store import ConfigStore
    from .models.mambavision import ARCHS
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    for name in ARCHS:  # model=mambavision_b: one schema, one option per registered variant
        cs.store(group="model", name=name, node=ModelConfig(name=name))
