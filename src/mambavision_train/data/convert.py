"""Convert an ImageFolder tree (ImageNet's ``train/<class>/*.JPEG``, ``val/<class>/*.JPEG``) into FFCV .beton files.

    python -m mambavision_train.data.convert /data/imagenet /data/imagenet_ffcv [--max-side 512] [--quality 90]
        [--compress-prob 1.0] [--workers 16] [--splits train,val] [--overwrite]

Writes ``<out>/<split>.beton``, ``<out>/classes.json`` (torchvision ImageFolder's class order) and
``<out>/<split>_skipped.txt`` (files that do not decode, with the reason). Every file is decoded once up front in
parallel: unreadable ones are skipped and reported instead of crashing the writer halfway; the outcome is cached in
``<out>/<split>.scan.json`` so an interrupted conversion does not redo it. The .beton is written under a
``.partial`` name and renamed when complete, so a file with the final name is always whole.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .images import BadImage, load_rgb


@dataclass
class ConvertOptions:
    max_side: int = 512  # longer side stored; RandomResizedCrop at 224 rarely needs more (ImageNet averages ~400x350)
    quality: int = 90  # JPEG quality of stored images
    compress_prob: float = 1.0  # fraction stored as JPEG; the rest raw (bigger, no decode cost)
    workers: int = max(1, (os.cpu_count() or 1))
    overwrite: bool = False
    chunk_size: int = 100


class ConversionError(RuntimeError):
    pass


def scan_tree(split_dir: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes and (path, label) pairs exactly as torchvision's ImageFolder would list them."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
    classes, class_to_idx = find_classes(str(split_dir))
    return classes, make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)


def _check(args):
    path, max_side = args
    try:
        load_rgb(path, max_side)
        return None
    except BadImage as e:
        return str(e)


def check_files(samples, opts: ConvertOptions, cache: Path, desc: str) -> tuple[list, list]:
    """Decode every file once; returns (good samples, [(path, reason)]). Cached in ``cache``."""
    if cache.exists():
        state = json.loads(cache.read_text())
        if state.get("files") == len(samples) and state.get("max_side") == opts.max_side:
            bad = {p: r for p, r in state["skipped"]}
            return [s for s in samples if s[0] not in bad], state["skipped"]
    bad = []
    with ProcessPoolExecutor(opts.workers) as pool:
        results = pool.map(_check, [(p, opts.max_side) for p, _ in samples], chunksize=64)
        for (path, _), reason in tqdm(zip(samples, results), total=len(samples), desc=f"check {desc}", unit="img",
                                      smoothing=0.05, dynamic_ncols=True):
            if reason is not None:
                bad.append((path, reason))
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps({"files": len(samples), "max_side": opts.max_side, "skipped": bad}))
    os.replace(tmp, cache)
    bad_paths = {p for p, _ in bad}
    return [s for s in samples if s[0] not in bad_paths], bad


class _FileDataset:
    """What FFCV's writer reads: (HxWx3 uint8 image, label), decoded with the robust reader."""

    def __init__(self, samples, max_side):
        self.samples, self.max_side = samples, max_side

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return np.asarray(load_rgb(path, self.max_side)), label


def write_beton(samples, path: Path, opts: ConvertOptions):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    mode = "jpg" if opts.compress_prob >= 1.0 else "proportion"
    fields = {"image": RGBImageField(write_mode=mode, max_resolution=opts.max_side, jpeg_quality=opts.quality,
                                     compress_probability=opts.compress_prob),
              "label": IntField()}
    writer = DatasetWriter(str(partial), fields, num_workers=opts.workers)
    _run_watched(lambda: writer.from_indexed_dataset(_FileDataset(samples, opts.max_side), chunksize=opts.chunk_size))
    os.replace(partial, path)


class _TrackedProcess(multiprocessing.Process):
    started: list = []

    def start(self):
        _TrackedProcess.started.append(self)
        super().start()


def _run_watched(write):
    """Run FFCV's writer, failing fast if one of its worker processes dies: FFCV itself would wait forever."""
    import ffcv.writer
    _TrackedProcess.started = []
    errors = []

    def target():
        try:
            write()
        except BaseException as e:  # re-raised in the calling thread
            errors.append(e)

    original, ffcv.writer.Process = ffcv.writer.Process, _TrackedProcess
    thread = threading.Thread(target=target, daemon=True)
    try:
        thread.start()
        while thread.is_alive():
            thread.join(0.5)
            dead = [p for p in _TrackedProcess.started if p.exitcode not in (None, 0)]
            if dead:
                for p in _TrackedProcess.started:
                    p.kill()
                raise ConversionError(f"an FFCV writer process died (exit code {dead[0].exitcode}); nothing was "
                                      "written under the final name: run the same command again")
    finally:
        ffcv.writer.Process = original
    if errors:
        raise errors[0]


def convert_split(src: Path, out: Path, split: str, opts: ConvertOptions) -> dict:
    split_dir = src / split
    target = out / f"{split}.beton"
    t0 = time.time()
    classes, samples = scan_tree(split_dir)
    if not samples:
        raise ConversionError(f"no images under {split_dir} (expected {split_dir}/<class>/<image>)")
    good, skipped = check_files(samples, opts, out / f"{split}.scan.json", split)
    (out / f"{split}_skipped.txt").write_text("".join(f"{p}\t{r}\n" for p, r in skipped))
    write_beton(good, target, opts)
    seconds = time.time() - t0
    return dict(split=split, classes=classes, images=len(good), skipped=len(skipped), seconds=seconds,
                mb=target.stat().st_size / 2**20)


def convert(src, out, splits=("train", "val"), opts: ConvertOptions = ConvertOptions()) -> list[dict]:
    src, out = Path(src), Path(out)
    missing = [s for s in splits if not (src / s).is_dir()]
    if missing:
        raise ConversionError(f"{src} has no {'/'.join(missing)} folder (expected {src}/<split>/<class>/<image>)")
    out.mkdir(parents=True, exist_ok=True)
    for split in splits:
        target = out / f"{split}.beton"
        if target.exists() and not opts.overwrite:  # refuse before any expensive work
            raise ConversionError(f"{target} already exists; pass --overwrite to convert {split} again")
    results = [convert_split(src, out, split, opts) for split in splits]
    classes = results[0]["classes"]
    for r in results[1:]:
        if r["classes"] != classes:
            raise ConversionError(f"{r['split']} has other class folders than {results[0]['split']}")
    (out / "classes.json").write_text(json.dumps({"classes": classes,
                                                  "class_to_idx": {c: i for i, c in enumerate(classes)}}, indent=1))
    return results


def summary_table(results) -> str:
    lines = ["| split | images | skipped | classes | size MB | minutes | img/s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['split']} | {r['images']:,} | {r['skipped']:,} | {len(r['classes'])} | {r['mb']:.1f} | "
                     f"{r['seconds'] / 60:.1f} | {(r['images'] + r['skipped']) / max(r['seconds'], 1e-9):.0f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mambavision_train.data.convert",
                                 description="Convert an ImageFolder tree into FFCV .beton files.")
    ap.add_argument("src", help="folder with <split>/<class>/<image> (e.g. the extracted ImageNet-1K)")
    ap.add_argument("out", help="output folder for <split>.beton, classes.json and reports")
    d = ConvertOptions()
    ap.add_argument("--splits", default="train,val", help="comma-separated split folders (default: train,val)")
    ap.add_argument("--max-side", type=int, default=d.max_side, help=f"longer side stored, pixels (default {d.max_side})")
    ap.add_argument("--quality", type=int, default=d.quality, help=f"JPEG quality (default {d.quality})")
    ap.add_argument("--compress-prob", type=float, default=d.compress_prob,
                    help="fraction of images stored as JPEG, the rest raw (default 1.0: all JPEG)")
    ap.add_argument("--workers", type=int, default=d.workers, help=f"processes (default: all cores, {d.workers})")
    ap.add_argument("--overwrite", action="store_true", help="replace existing .beton files")
    args = ap.parse_args(argv)
    opts = ConvertOptions(max_side=args.max_side, quality=args.quality, compress_prob=args.compress_prob,
                          workers=args.workers, overwrite=args.overwrite)
    try:
        results = convert(args.src, args.out, tuple(s for s in args.splits.split(",") if s), opts)
    except ConversionError as e:
        sys.exit(f"error: {e}")
    print(summary_table(results))
    for r in results:
        if r["skipped"]:
            print(f"{r['skipped']} {r['split']} files skipped, listed in {Path(args.out) / (r['split'] + '_skipped.txt')}")


if __name__ == "__main__":
    main()
