"""The data package's checks and its one constructor: where a split lives (``check``, ``num_images``,
``class_map``: one line that says what to do when it is missing) and ``build_loader``, which picks the FFCV,
ImageFolder or synthetic loader and the DeviceAugment that finishes its batches."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..config import DATA_KINDS as KINDS
from ..config import AugConfig, DataConfig
from ..errors import DataError
from .augment import DeviceAugment
from .order import Shard

FFCV_EXTRA = "pip install 'mambavision-train[ffcv]' (docs/data.md)"


def ffcv_installed() -> bool:
    """Whether the ffcv extra is installed, found without importing it: importing FFCV sets torch's thread count
    (ffcv.pipeline.compiler), which a run that never reads a .beton must not see."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in ("ffcv", "numba"))
    except ImportError:  # an import hook that refuses the name: as good as not installed
        return False


HOW_TO_PREPARE = ("prepare ImageNet with `python -m mambavision_train.data.convert /path/to/imagenet /path/to/ffcv` "
                  "(docs/data.md), or run the demo on bundled data: python train.py experiment=demo")
HOW_TO_EXTRACT = ("extract ImageNet's archives with `python -m mambavision_train.data.imagenet_prep --archives DIR "
                  "--out /path/to/imagenet` (docs/data.md)")


def check(cfg: DataConfig, split: str) -> Path | None:
    """Fail fast, before anything expensive, with one line that says what to do."""
    path = _locate(cfg, split)
    if cfg.kind == "ffcv":
        from .ffcv_loader import beton_reader, num_labels
        _check_labels(path, num_labels(beton_reader(path)), cfg.num_classes)
    return path


def _locate(cfg: DataConfig, split: str) -> Path | None:
    """The split's .beton file or class-folder tree, checked for all but the labels inside a .beton."""
    if cfg.kind not in KINDS:
        raise DataError(f"unknown data.kind {cfg.kind!r}; choose one of {', '.join(KINDS)}")
    if cfg.kind == "synthetic":
        return None
    if cfg.kind == "ffcv" and not ffcv_installed():
        instead = "data.kind=folder" if cfg.prepare else "data=imagenet_folder"
        raise DataError(f"data.kind=ffcv needs the ffcv extra: {FFCV_EXTRA}, or use {instead}")
    if cfg.prepare == "digits":
        from . import digits
        digits.prepare(cfg.root, beton=cfg.kind == "ffcv")
    if not cfg.root:
        raise DataError(f"data.root is not set: point it at your data, or {HOW_TO_PREPARE}")
    root = Path(cfg.root).expanduser()
    if cfg.kind == "ffcv":
        path = root / f"{split}.beton"
        if not path.is_file():
            if not root.exists():
                raise DataError(f"data.root={root} does not exist; {HOW_TO_PREPARE}")
            raise DataError(f"{path} not found: data.root must hold FFCV files; {HOW_TO_PREPARE}")
        return path
    path = Path(cfg.folder_root or root).expanduser() / split
    if not path.is_dir():
        raise DataError(f"{path} not found: data.root must hold {split}/<class>/<image> folders; {HOW_TO_EXTRACT}")
    from .classes import folder_classes
    classes = len(folder_classes(path))  # one directory listing
    if not classes:
        raise DataError(f"{path} has no class folders: data.root must hold {split}/<class>/<image> folders")
    if classes > cfg.num_classes:
        raise DataError(f"{path} has {classes} class folders but data.num_classes={cfg.num_classes}; set "
                        f"data.num_classes={classes}")
    return path


def num_images(cfg: DataConfig, split: str) -> int:
    """How many images a split holds (what its .beton's header or its folders list; no image is read)."""
    path = _locate(cfg, split)
    if cfg.kind == "ffcv":
        from .ffcv_loader import beton_reader
        return int(beton_reader(path).num_samples)
    if cfg.kind == "folder":
        from .classes import scan_tree
        return len(scan_tree(path)[1])
    return cfg.num_samples


def class_map(cfg: DataConfig) -> list[str] | None:
    """The training data's class names in label order (None when it has none: synthetic data, a .beton without the
    converter's classes.json). Image folders: the train split's class folders, which the val split must match."""
    from .classes import beton_classes, check_same_classes, folder_classes
    if cfg.kind == "ffcv":
        return beton_classes(Path(cfg.root).expanduser())
    if cfg.kind != "folder":
        return None
    train, val = (Path(cfg.folder_root or cfg.root).expanduser() / s for s in (cfg.train_split, cfg.val_split))
    classes = folder_classes(train)
    check_same_classes(classes, folder_classes(val), train, val)
    return classes


def _check_labels(path: Path, labels: int, num_classes: int):
    if labels > num_classes:
        raise DataError(f"{path} has labels up to {labels - 1} but data.num_classes={num_classes}; set "
                        f"data.num_classes={labels}")


def build_loader(cfg: DataConfig, aug: AugConfig | None, *, train: bool, batch_size: int, res: int,
                 crop_pct: float = 1.0, crop_mode: str = "center", interpolation: str = "bicubic",
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), seed: int = 0, shard: Shard = Shard(),
                 device="cpu", classes: list[str] | None = None):
    """A loader for the train or val split and the DeviceAugment that finishes its batches on ``device``.
    ``classes``: the class map labels must follow (the model's); image folders are labelled by name through it."""
    aug = aug or AugConfig()
    # The checks of check(), but a .beton's tables are read once, for its label check and the loader together
    # (the trainer has already run check() to fail before anything is built; eval.py relies on this one).
    path = _locate(cfg, cfg.train_split if train else cfg.val_split)
    common = dict(train=train, batch_size=batch_size, res=res, seed=seed, shard=shard)
    cpu_done: tuple = ()
    if cfg.kind == "ffcv":
        from .classes import beton_classes, few
        from .ffcv_loader import FFCVLoader, beton_reader, num_labels
        own = beton_classes(path.parent)
        if classes is not None and own is not None and list(own) != list(classes):
            raise DataError(f"{path.parent / 'classes.json'} labels other classes than the model's class map "
                            f"({few(own, 4)} vs {few(classes, 4)}): FFCV files keep the labels they were written "
                            f"with; evaluate the image folders (data.kind=folder) to match them by name")
        reader = beton_reader(path)
        _check_labels(path, num_labels(reader), cfg.num_classes)
        loader = FFCVLoader(path, crop_pct=crop_pct, crop_mode=crop_mode, scale=tuple(aug.scale),
                            ratio=tuple(aug.ratio), hflip=aug.hflip, num_workers=cfg.num_workers,
                            os_cache=cfg.os_cache, reader=reader, device=device, **common)
    elif cfg.kind == "folder":
        from .classes import check_known, folder_classes
        from .folder_loader import FolderLoader
        if classes is not None:
            check_known(folder_classes(path), classes, path)
        loader = FolderLoader(path, aug=aug, crop_pct=crop_pct, crop_mode=crop_mode, interpolation=interpolation,
                              num_workers=cfg.num_workers, classes=classes, **common)
        cpu_done = ("rand_augment", "color_jitter")  # timm's PIL transforms did them per sample
    else:
        from .synthetic import SyntheticLoader
        loader = SyntheticLoader(num_classes=cfg.num_classes, num_samples=cfg.num_samples, **common)
    return loader, DeviceAugment(aug, cfg.num_classes, mean, std, device, train=train, cpu_done=cpu_done,
                                 reused_buffers=cfg.kind == "ffcv")

