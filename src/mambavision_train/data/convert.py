"""Convert an ImageFolder tree (ImageNet's ``train/<class>/*.JPEG``, ``val/<class>/*.JPEG``) into FFCV .beton files.

    python -m mambavision_train.data.convert /data/imagenet /data/imagenet_ffcv [--max-side 512] [--quality 90]
        [--compress-prob 1.0] [--workers 16] [--splits train,val] [--overwrite]

Writes ``<out>/<split>.beton``, ``<out>/classes.json`` (torchvision ImageFolder's class order; hidden folders and
files are left out) and ``<out>/<split>_skipped.txt`` (files that do not decode, with the reason). Every file is
decoded once up front in parallel: unreadable ones are skipped and reported instead of crashing the writer halfway;
the outcome is cached in ``<out>/<split>.scan.json``, keyed on every file's name, size and mtime, so an interrupted
conversion does not redo it. The .beton is written under a ``.partial`` name and renamed when complete, so a file
with the final name is always whole.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
from tqdm import tqdm

from ..errors import ConversionError
from .. import tables
from .loader import FFCV_EXTRA, ffcv_installed
from .classes import scan_tree
from .classes import write as write_classes
from .images import BadImage, load_rgb


def default_workers() -> int:
    """The SLURM allocation when there is one (the node may have more cores than the job), else every usable core."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class ConvertOptions:
    max_side: int = 512  # longer side stored; RandomResizedCrop at 224 rarely needs more (ImageNet averages ~400x350)
    quality: int = 90  # JPEG quality of stored images
    compress_prob: float = 1.0  # fraction stored as JPEG; the rest raw (bigger, no decode cost)
    workers: int = field(default_factory=default_workers)
    overwrite: bool = False
    chunk_size: int = 100


def _check(args):
    """None for a file that decodes, else why not. Any exception counts: PIL's plugins raise more than OSError on
    corrupt data (a fractional size in a header is a TypeError), and one such file must not stop the scan."""
    path, max_side = args
    try:
        load_rgb(path, max_side)
    except BadImage as e:
        return str(e)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def _scan_key(samples, max_side: int) -> str:
    """What the scan's outcome depends on: the decode size and every file's name, size and mtime, so a file that
    was rewritten, replaced or renamed since invalidates it."""
    h = hashlib.sha256(str(max_side).encode())
    for path, _ in samples:
        try:
            st = os.stat(path)
            stamp = f"{st.st_size} {st.st_mtime_ns}"
        except OSError:  # a dangling link: the scan reports it
            stamp = "-"
        h.update(os.fsencode(path) + b"\0" + stamp.encode() + b"\n")
    return h.hexdigest()


def check_files(samples, opts: ConvertOptions, cache: Path, desc: str) -> tuple[list, list]:
    """Decode every file once; returns (good samples, [(path, reason)]). Cached in ``cache``."""
    key = _scan_key(samples, opts.max_side)
    if cache.exists():
        state = json.loads(cache.read_text())
        if state.get("key") == key:
            bad = {p for p, _ in state["skipped"]}
            return [s for s in samples if s[0] not in bad], state["skipped"]
    bad = []
    try:
        with ProcessPoolExecutor(opts.workers) as pool:
            results = pool.map(_check, [(p, opts.max_side) for p, _ in samples], chunksize=64)
            for (path, _), reason in tqdm(zip(samples, results), total=len(samples), desc=f"check {desc}",
                                          unit="img", smoothing=0.05, dynamic_ncols=True):
                if reason is not None:
                    bad.append((path, reason))
    except BrokenProcessPool:
        raise ConversionError("a process checking the images died (out of memory? killed?); run the same command "
                              "again, with fewer --workers if memory is short") from None
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "skipped": bad}))  # ASCII: undecodable names survive as escapes
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


def _run_watched(write):
    """Run FFCV's writer in a thread and watch its worker processes from here, failing fast if one dies: FFCV itself
    would wait forever. psutil lists the children without collecting them (multiprocessing.active_children() would
    collect one that died between two looks, unseen), and waitid(WNOWAIT) reads an exit status while leaving the
    child for multiprocessing to collect."""
    me = psutil.Process()
    before = {c.pid for c in me.children()}
    errors = []

    def target():
        try:
            write()
        except BaseException as e:  # re-raised in the calling thread
            errors.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
        writers = {c.pid for c in me.children()} - before
        dead = [code for code in map(_exit_code, writers) if code not in (None, 0)]
        if dead:
            for p in multiprocessing.active_children():
                if p.pid in writers:
                    p.kill()
            raise ConversionError(f"an FFCV writer process died (exit code {dead[0]}); nothing was written under "
                                  "the final name: run the same command again")
    if errors:
        raise errors[0]


def _exit_code(pid: int) -> int | None:
    """A child's exit code as multiprocessing gives it (minus the signal for a killed one); None while it runs."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # already collected, so not a writer that died unnoticed
        return None
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _escaped(text: str) -> str:
    """``text`` as one line of UTF-8 for a tab-separated report, whatever a file name holds: bytes that are not
    UTF-8 as \\xNN, and backslash, tab and line breaks escaped as in Python."""
    for char, escape in (("\\", "\\\\"), ("\t", "\\t"), ("\n", "\\n"), ("\r", "\\r")):
        text = text.replace(char, escape)
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def convert_split(src: Path, out: Path, split: str, opts: ConvertOptions) -> dict:
    split_dir = src / split
    target = out / f"{split}.beton"
    t0 = time.time()
    classes, samples = scan_tree(split_dir)
    if not samples:
        raise ConversionError(f"no images under {split_dir} (expected {split_dir}/<class>/<image>)")
    good, skipped = check_files(samples, opts, out / f"{split}.scan.json", split)
    report = out / f"{split}_skipped.txt"
    report.write_text("".join(f"{_escaped(p)}\t{_escaped(r)}\n" for p, r in skipped), encoding="utf-8")
    if not good:
        raise ConversionError(f"none of the {len(samples)} images under {split_dir} decodes; the reasons are in "
                              f"{report}")
    write_beton(good, target, opts)
    seconds = time.time() - t0
    return dict(split=split, classes=classes, images=len(good), skipped=len(skipped), seconds=seconds,
                mb=target.stat().st_size / 2**20)


def convert(src, out, splits=("train", "val"), opts: ConvertOptions | None = None) -> list[dict]:
    if not ffcv_installed():  # before the decode pass: hours on ImageNet, for a writer that cannot run
        raise ConversionError(f"the converter writes FFCV files and needs the ffcv extra: {FFCV_EXTRA}; or train "
                              "on the image folders as they are with data=imagenet_folder")
    src, out, opts = Path(src), Path(out), opts or ConvertOptions()  # built per call: the worker count reads the env
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
    write_classes(classes, out / "classes.json")
    return results


def summary_table(results) -> str:
    return tables.markdown(
        ["split", "images", "skipped", "classes", "size MB", "minutes", "img/s"],
        [(r["split"], f"{r['images']:,}", f"{r['skipped']:,}", len(r["classes"]), f"{r['mb']:.1f}",
          f"{r['seconds'] / 60:.1f}", f"{(r['images'] + r['skipped']) / max(r['seconds'], 1e-9):.0f}") for r in results])


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
    ap.add_argument("--workers", type=int, default=d.workers,
                    help=f"processes (default {d.workers}: SLURM_CPUS_PER_TASK in a SLURM job, else all cores)")
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
