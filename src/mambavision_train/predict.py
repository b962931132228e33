"""Classify images with a trained MambaVision: top-k classes with their names, to the screen, a CSV or a JSON file.

    python -m mambavision_train.predict SOURCE PATH... [--topk 5] [--out predictions.csv|.json] [--weights FILE]
        [--batch-size 64] [--workers 4] [--device auto]

SOURCE, as the exporter takes it (models/loading.py): one of our run directories (its EMA weights, class map and
resolution), one of our weights files (they name their variant), an official ``.pth.tar``, or a model name (its
official weights, or ``--weights FILE`` for a file that does not name its variant). PATH: image files and folders (searched recursively). Images go through the variant's own
eval transform (timm's, as eval.py's), in batches; class names come from the weights' class map (ImageNet's synsets
for a 1000-class model without one). An unreadable image is one line, skipped and counted; the rest go on.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import files
from .log import say

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}


def find_images(paths: list[str]) -> list[Path]:
    """The image files among ``paths`` and under the folders among them, in a stable order; a missing path is an
    error (before the model is read)."""
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
                            and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.is_file():
            found.append(p)
        else:
            raise SystemExit(f"error: {p} does not exist (give image files or folders of images)")
    if not found:
        raise SystemExit(f"error: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {' '.join(paths)}")
    return found


class Images(Dataset):
    """(uint8 CHW tensor or None, index, why it is unreadable or None) per file."""

    def __init__(self, files: list[Path], transform):
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from .data.images import BadImage, load_rgb
        try:
            image = load_rgb(self.files[i])
        except BadImage as e:
            return None, i, str(e)
        import numpy as np
        return torch.as_tensor(np.asarray(self.transform(image))), i, None


def collate(items):
    kept = [(x, i) for x, i, _ in items if x is not None]
    return (torch.stack([x for x, _ in kept]) if kept else None, [i for _, i in kept],
            [(i, why) for x, i, why in items if x is None])


def class_names(source) -> list[str]:
    from .engine.eval_run import class_names as names
    return names(source.classes, source.model.num_classes)


def predict(source, files: list[Path], topk: int, batch_size: int, workers: int, device: torch.device,
            progress: bool = True):
    """Yields (file, [(class, probability)] * topk) in file order; unreadable files are reported and skipped."""
    from .data.augment import DeviceAugment
    from .data.folder_loader import eval_transform
    view = source.preprocessing
    transform = eval_transform(view["res"], view["crop_pct"], view["interpolation"], view["crop_mode"])
    normalise = DeviceAugment(None, source.model.num_classes, view["mean"], view["std"], device, train=False)
    model = source.model.to(device, memory_format=torch.channels_last)
    names, k = class_names(source), min(topk, source.model.num_classes)
    loader = DataLoader(Images(files, transform), batch_size=batch_size, num_workers=workers, collate_fn=collate)
    bar = tqdm(total=len(files), unit="img", desc="predict", disable=not progress, dynamic_ncols=True)
    with torch.no_grad():
        for images, index, bad in loader:
            for i, why in bad:
                say(f"warning: skipped {files[i]}: not a readable image ({why})")
            if images is not None:
                x, _ = normalise(images, torch.zeros(len(index), dtype=torch.int64))
                prob, top = model(x).float().softmax(1).topk(k, dim=1)
                for row, i in enumerate(index):
                    yield files[i], [(names[c], p) for c, p in zip(top[row].tolist(), prob[row].tolist())]
            bar.update(len(index) + len(bad))
    bar.close()


def write(rows: list, out: Path, topk: int):
    """CSV: path, then class_i and prob_i for i = 1..k; JSON: a list of {path, top: [{class, prob}]}. Written aside
    and renamed into place."""
    with files.replacing(out) as tmp, open(tmp, "w", newline="") as f:
        if out.suffix == ".json":
            json.dump([{"path": str(p), "top": [{"class": c, "prob": round(q, 6)} for c, q in top]}
                       for p, top in rows], f, indent=1)
        else:
            w = csv.writer(f)
            w.writerow(["path", *[col for i in range(1, topk + 1) for col in (f"class_{i}", f"prob_{i}")]])
            w.writerows([[p, *[v for c, q in top for v in (c, f"{q:.6f}")]] for p, top in rows])


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mambavision_train.predict", description=__doc__.splitlines()[0])
    ap.add_argument("source", help="a run directory, a weights file, or a model name (python -m mambavision_train.models)")
    ap.add_argument("paths", nargs="+", help="image files and folders of images")
    ap.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    ap.add_argument("--out", help="write the predictions to this .csv or .json file (default: print them)")
    ap.add_argument("--weights", help="with a model name as SOURCE: its weights (a file or a Hugging Face repo id)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image decoding processes")
    ap.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    for key in ("topk", "batch_size"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            sys.exit(f"error: --{key.replace('_', '-')} must be at least 1")
    if args.out and Path(args.out).suffix not in (".csv", ".json"):
        sys.exit(f"error: --out {args.out}: give a .csv or .json file")
    files = find_images(args.paths)
    from .models.loading import load_source
    from .errors import CheckpointError
    try:
        loaded = load_source(args.source, args.weights)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          args.device.replace("auto", "cpu"))
    print(f"predict: {len(files)} image{'s' * (len(files) != 1)} with {loaded.name}, {loaded.weights} "
          f"({loaded.model.num_classes} classes)", flush=True)
    t0 = time.perf_counter()
    rows = list(predict(loaded, files, args.topk, args.batch_size, args.workers, device,
                        progress=not args.no_progress and sys.stderr.isatty()))
    seconds = time.perf_counter() - t0
    if args.out:
        write(rows, Path(args.out), min(args.topk, loaded.model.num_classes))
    else:
        for path, top in rows:
            print(f"{path}: " + ", ".join(f"{c} {100 * q:.1f}%" for c, q in top))
    skipped = len(files) - len(rows)
    print(f"predicted {len(rows)} image{'s' * (len(rows) != 1)} ({skipped} unreadable, skipped) in {seconds:.1f} s "
          f"({len(rows) / max(seconds, 1e-9):.1f} img/s){f' -> {args.out}' if args.out else ''}", flush=True)


if __name__ == "__main__":
    main()
