"""The bundled demo data: scikit-learn's 1,797 real 8x8 handwritten digits as a small ImageNet look-alike.

On first use, written as an ImageFolder tree of upsampled RGB PNGs with a fixed stratified 80/20 split and, for
data.kind=ffcv, converted to .beton files by the same converter as ImageNet; both stay in a cache folder.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32  # stored resolution: 8x8 upsampled 4x
VAL_FRACTION = 0.2


def default_root() -> Path:
    return Path(os.environ.get("MAMBAVISION_CACHE", Path.home() / ".cache" / "mambavision_train")) / "digits"


def build_folder(root: Path) -> Path:
    """root/images/{train,val}/{0..9}/*.png; returns root/images. Idempotent (a marker file closes the build)."""
    images = root / "images"
    done = images / ".complete"
    if done.exists():
        return images
    from sklearn.datasets import load_digits
    digits = load_digits()
    rng = np.random.default_rng(0)
    counts = {"train": 0, "val": 0}
    for label in range(10):
        idx = np.flatnonzero(digits.target == label)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * VAL_FRACTION))
        for split, part in (("val", idx[:n_val]), ("train", idx[n_val:])):
            d = images / split / str(label)
            d.mkdir(parents=True, exist_ok=True)
            for i in part:
                gray = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
                Image.fromarray(gray).resize((SIZE, SIZE), Image.BICUBIC).convert("RGB").save(d / f"{i:04d}.png")
            counts[split] += len(part)
    done.write_text(json.dumps(counts))
    return images


def prepare(root: str | os.PathLike | None = None, workers: int = 2, beton: bool = True) -> Path:
    """Build the digits ImageFolder under ``root`` if missing, and its .beton files too with ``beton`` (they need
    the ffcv extra; data.kind=folder reads the ImageFolder alone); returns ``root``."""
    root = Path(root) if root else default_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # every rank of a first distributed run gets here: one builds, the rest wait
        build_folder(root)
        if beton and not all((root / f"{s}.beton").exists() for s in ("train", "val")):
            write_betons(root, workers)
    return root


def write_betons(root: Path, workers: int = 2):
    """``root``/{train,val}.beton from the image folders in ``root``/images, as the demo stores them."""
    import torch
    from .convert import ConvertOptions, convert
    threads = torch.get_num_threads()
    convert(root / "images", root, ("train", "val"), ConvertOptions(max_side=SIZE, quality=95, workers=workers,
                                                                   overwrite=True))
    # Importing FFCV sets torch's thread count to 1 (ffcv.pipeline.compiler): a run that had to build the data would
    # otherwise compute (and round) differently from the same run resumed.
    torch.set_num_threads(threads)
