"""The device augmentation (paper recipe) per batch: this checkout's sync-free RandAugment against the previous one.

    python benchmarks/augment.py [--device cpu] [--threads 2] [--repeats 5] [--previous d3660d4]

Both run inside the same ``DeviceAugment`` (RandAugment rand-m9-mstd0.5-inc1, Mixup/CutMix, normalise, random
erasing; colour jitter is off under RandAugment, as in timm); the previous ``randaugment.py`` is read from git at
``--previous`` (the last commit before the sync-free one) into a module at run time. On real photos (scikit-image's),
batch 128 at 224 px and batch 64 at 32 px: time per batch (median of interleaved runs; CPU time on a CPU device,
wall time on a GPU), the host syncs and aten ops per batch (``tests/helpers/syncs.py``: what would make a GPU's host wait,
and about the kernels it would launch), and whether both give the same pixels for the same seeds.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
import types
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from common import interleaved, machine
from mambavision_train.data import augment
from mambavision_train.data.augment import AugConfig, DeviceAugment

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers.imagetree import photo  # noqa: E402
from helpers.syncs import host_syncs  # noqa: E402

SHAPES = [(128, 224, 1), (64, 32, 4)]  # batch, px, repeats (x --repeats)


def previous_randaugment(commit: str) -> types.ModuleType:
    path = "src/mambavision_train/data/randaugment.py"
    shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{path}"], capture_output=True, text=True)
    if shown.returncode:
        raise SystemExit(f"needs the git history with commit {commit} (the previous {path}); pass --previous: "
                         f"{shown.stderr.strip()}")
    source = shown.stdout
    module = types.ModuleType("previous_randaugment")
    exec(compile(source, f"{commit}:{path}", "exec"), module.__dict__)
    return module


def photos(batch: int, res: int) -> torch.Tensor:
    """Crops of scikit-image's photos resized to res (tests/helpers/imagetree.py): uint8 (batch, 3, res, res)."""
    return torch.stack([torch.from_numpy(np.array(photo(i, size=(res, res)))).permute(2, 0, 1) for i in range(batch)])


def seeded(fn, seed):
    torch.manual_seed(seed)
    random.seed(seed)  # timm's erasing
    np.random.seed(seed)  # timm's Mixup
    return fn()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--previous", default="d3660d4", help="commit whose randaugment.py is the previous one")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    aug = DeviceAugment(AugConfig(), 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), args.device)
    previous = previous_randaugment(args.previous)

    def run_previous(x, y):
        with mock.patch.object(augment, "randaugment", previous):
            return aug(x, y)

    impls = {"previous": run_previous, "sync-free": aug}
    # On a CPU device: CPU time (all threads); on a GPU: wall time to the end of the device's work.
    clock, unit = (time.process_time, "CPU-ms") if args.device == "cpu" else (time.perf_counter, "ms")
    print(f"# device augmentation, paper recipe, {args.device}; previous = {args.previous}; {machine()}")
    print(f"| batch x px | previous {unit} | sync-free {unit} | ratio | host syncs | aten ops | same pixels |")
    print("|---|---|---|---|---|---|---|")
    for batch, res, more in SHAPES:
        x = photos(batch, res).to(args.device)
        y = torch.randint(0, 1000, (batch,), device=args.device)
        times = interleaved({k: (lambda f=f: f(x, y)) for k, f in impls.items()}, repeats=args.repeats * more,
                            clock=clock)
        counts = {}
        for k, f in impls.items():
            with host_syncs() as s:
                seeded(lambda: f(x, y), 0)
            counts[k] = s
        same = all(torch.equal(seeded(lambda: impls["previous"](x, y)[0], seed),
                               seeded(lambda: impls["sync-free"](x, y)[0], seed)) for seed in range(3))
        p, n = times["previous"] * 1e3, times["sync-free"] * 1e3
        print(f"| {batch} x {res} | {p:.1f} | {n:.1f} | {n / p:.2f}x | {counts['previous'].count} -> "
              f"{counts['sync-free'].count} | {counts['previous'].launches} -> {counts['sync-free'].launches} | "
              f"{'yes' if same else 'NO'} (3 seeds) |")


if __name__ == "__main__":
    main()
