"""ImageNet-1K from the official archives into the folders the loaders and the converter read.

    python -m mambavision_train.data.imagenet_prep --archives /data/downloads --out /data/imagenet [--splits train,val]

reads ``ILSVRC2012_devkit_t12.tar.gz``, ``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar`` from
``--archives`` and writes ``<out>/train/<wnid>/*.JPEG``, ``<out>/val/<wnid>/*.JPEG`` and ``<out>/meta.bin``. The work
is torchvision's ``ImageNet`` preparation (``torchvision.datasets.imagenet``): it reads the devkit (which of its
synsets are the 1,000 classes, and the validation ground truth, given as ILSVRC2012_IDs and not in the classes'
sorted order), checks each archive's MD5, unpacks the per-class tars and sorts the flat validation images into class
folders. ``<out>`` is also what ``torchvision.datasets.ImageNet(out)`` opens.

All three archives are looked for, and the free disk space checked, before anything is written. Each split is
unpacked under ``<split>.partial`` and renamed when complete, so a split folder with its final name is always whole:
a rerun skips the splits that are done and redoes one that was interrupted (torchvision's unpacking cannot resume
halfway through a split).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from ..log import say
from .. import tables
from ..errors import DataError

SPLITS = ("train", "val")
WHERE = "download them from https://image-net.org (account required; docs/data.md)"


def archive_names() -> dict[str, str]:
    """Archive file name per part (devkit, train, val): torchvision's table, so the names cannot drift from what its
    parsers look for."""
    from torchvision.datasets.imagenet import ARCHIVE_META
    return {part: name for part, (name, _md5) in ARCHIVE_META.items()}


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_request(archives: Path, out: Path, splits) -> list[str]:
    """The splits still to extract; raises DataError (one line) for a missing archive or too little disk space,
    before anything is written."""
    names = archive_names()
    todo = [s for s in splits if not (out / s).is_dir()]
    needed = (["devkit"] if todo and not (out / "meta.bin").is_file() else []) + todo
    missing = [str(archives / names[part]) for part in needed if not (archives / names[part]).is_file()]
    if missing:
        raise DataError(f"{', '.join(missing)} not found: {WHERE}")
    # An extracted split takes about the size of its archive (the train tar's per-class tars are unpacked and
    # deleted one at a time); running out of space hours into the train tar would waste them.
    need = sum((archives / names[s]).stat().st_size for s in todo)
    free = shutil.disk_usage(_existing_parent(out)).free
    if need > free:
        raise DataError(f"{out} has {_size(free)} free; extracting {', '.join(todo)} needs about {_size(need)}: "
                        "free some space or choose another --out")
    return todo


def _verified(archive: Path, parse, *args, **kwargs):
    """Run one of torchvision's parsers; the RuntimeError it raises for an archive that fails its MD5 check becomes one
    line (we looked for the file already, so that is what it means)."""
    try:
        return parse(*args, **kwargs)
    except RuntimeError as e:
        if not str(e).startswith("The archive"):
            raise
        raise DataError(f"{archive} is not the official archive (its MD5 differs): an incomplete or damaged "
                        f"download? {WHERE}") from None


class Progress:
    """A line on stderr every ``interval`` seconds while torchvision works (it reports nothing itself): what
    ``count()`` says is done so far, out of ``total``, the rate and an ETA. Plain lines, no carriage returns: they read
    the same in a terminal and in a SLURM log."""

    def __init__(self, count, total: int, interval: float = 30.0):
        self.count, self.total, self.interval = count, total, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.t0 = time.time()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def _run(self):
        while not self.stop.wait(self.interval):
            try:
                what, done = self.count()
            except OSError:  # a folder renamed or removed under us between two looks
                continue
            elapsed = time.time() - self.t0
            eta = f", eta {(self.total - done) * elapsed / done / 60:.0f} min" if done else ""
            say(f"{what}: {done:,}/{self.total:,} after {elapsed / 60:.1f} min{eta}")


def _count_train(folder: Path):
    """Torchvision first unpacks one tar per class, then turns each into a folder and deletes the tar: while no
    folder exists, the tars so far count; after that, the folders whose tar is gone."""
    def count():
        tars, dirs = set(), set()
        for e in os.scandir(folder):
            if e.is_dir():
                dirs.add(e.name)
            else:
                tars.add(e.name.removesuffix(".tar"))
        if dirs:
            return "train: class archives extracted", len(dirs - tars)
        return "train: class archives unpacked (then each is extracted)", len(tars)
    return count


def _count_val(folder: Path):
    return lambda: ("val: images unpacked", sum(1 for e in os.scandir(folder) if e.is_file()))


def _tree_counts(folder: Path) -> tuple[int, int]:
    classes = [e for e in os.scandir(folder) if e.is_dir()]
    return len(classes), sum(1 for c in classes for f in os.scandir(c.path) if f.is_file())


def extract_split(split: str, archives: Path, out: Path, val_wnids, num_classes: int, interval: float) -> dict:
    from torchvision.datasets.imagenet import parse_train_archive, parse_val_archive
    archive = archives / archive_names()[split]
    partial = out / f"{split}.partial"
    if partial.exists():  # an interrupted run: torchvision's unpacking starts from an empty folder
        say(f"{split}: removing {partial} left by an interrupted run")
        shutil.rmtree(partial)
    partial.mkdir()
    t0 = time.time()
    say(f"{split}: checking the MD5 of {archive} ({_size(archive.stat().st_size)}), then unpacking it")
    if split == "train":
        with Progress(_count_train(partial), num_classes, interval):
            _verified(archive, parse_train_archive, str(out), file=str(archive), folder=str(partial))
    else:
        with Progress(_count_val(partial), len(val_wnids), interval):
            _verified(archive, parse_val_archive, str(out), file=str(archive), wnids=list(val_wnids),
                      folder=str(partial))
    classes, images = _tree_counts(partial)
    if split == "val":
        # torchvision pairs sorted file names with the ground truth by zip(), which stops silently at the shorter.
        stray = _count_val(partial)()[1]
        if stray or images != len(val_wnids):
            raise DataError(f"{archive} holds {images + stray:,} images but the devkit labels {len(val_wnids):,}: "
                            f"not the ILSVRC2012 validation set? {WHERE}")
    os.replace(partial, out / split)
    seconds = time.time() - t0
    say(f"{split}: {classes} classes, {images:,} images in {seconds / 60:.1f} min: {out / split}")
    return dict(split=split, classes=classes, images=images, seconds=seconds)


def prepare(archives, out, splits=SPLITS, interval: float = 30.0) -> list[dict]:
    """Extract ``splits`` from the archives in ``archives`` into ``out``; returns one summary per split extracted."""
    from torchvision.datasets.imagenet import load_meta_file, parse_devkit_archive
    archives, out = Path(archives).expanduser().resolve(), Path(out).expanduser().resolve()
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise DataError(f"--splits {','.join(splits)}: choose among {','.join(SPLITS)}")
    todo = check_request(archives, out, splits)
    for split in splits:
        if split not in todo:
            say(f"{split}: {out / split} exists, skipped (delete it to extract it again)")
    if not todo:
        return []
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "meta.bin").is_file():
        # torchvision writes meta.bin in place; written aside and renamed, a file with that name is always whole.
        devkit, tmp = archives / archive_names()["devkit"], out / "devkit.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            _verified(devkit, parse_devkit_archive, str(tmp), file=str(devkit))
            os.replace(tmp / "meta.bin", out / "meta.bin")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    wnid_to_classes, val_wnids = load_meta_file(str(out))
    say(f"devkit: {len(wnid_to_classes)} classes, {len(val_wnids):,} validation labels")
    # val first: its archive is 20x smaller, so a damaged one is found in minutes, not after the hours of train.
    return [extract_split(s, archives, out, val_wnids, len(wnid_to_classes), interval)
            for s in sorted(todo, key=("val", "train").index)]


def summary_table(results) -> str:
    return tables.markdown(["split", "classes", "images", "minutes"],
                           [(r["split"], r["classes"], f"{r['images']:,}", f"{r['seconds'] / 60:.1f}") for r in results])


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mambavision_train.data.imagenet_prep",
                                 description="Extract ImageNet-1K's official archives into train/<wnid>/ and "
                                             "val/<wnid>/ folders.")
    ap.add_argument("--archives", required=True, help="folder with " + ", ".join(archive_names().values()))
    ap.add_argument("--out", required=True, help="folder for train/, val/ and meta.bin (data.root of "
                                                 "data=imagenet_folder, the converter's source)")
    ap.add_argument("--splits", default=",".join(SPLITS), help="comma-separated (default: train,val; "
                                                               "val alone needs no train archive)")
    ap.add_argument("--interval", type=float, default=30.0, help="seconds between progress lines (default 30)")
    args = ap.parse_args(argv)
    try:
        results = prepare(args.archives, args.out, tuple(s for s in args.splits.split(",") if s), args.interval)
    except DataError as e:
        say(f"error: {e}")
        sys.exit(2)
    if results:
        print(summary_table(results))


if __name__ == "__main__":
    main()
