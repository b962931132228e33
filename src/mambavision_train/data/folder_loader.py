"""The fallback loader: image folders with timm's own transforms, for machines without FFCV.

Folders are read as torchvision's ImageFolder reads them (hidden entries left out, as the converter does), and
labelled by name through the run's class map (classes.py) when one is given.

The per-sample transforms are exactly timm's ``create_transform`` (RandomResizedCrop with random interpolation,
flip, PIL RandAugment on the CPU in training; resize + center crop in evaluation, the paper-exact path), in
prefetcher mode: they stop at uint8 tensors and the rest happens on the device (``augment.py``).
Each sample's random draws are seeded from (seed, epoch, index), and the DataLoader has a generator of its own, so
results do not depend on the number of workers or on where an epoch was resumed, and loading never draws from the
global RNGs that training (DropPath, Mixup) draws from.

Files are read with the converter's reader (``images.load_rgb``): EXIF orientation applied, CMYK, gray, palette
and alpha images made RGB, PNG behind a .JPEG name decoded by its content. Files that do not decode (empty,
truncated, not an image) are found as they are read: a header check up front misses truncated files, and a full
decode of ImageNet up front would cost as much as an epoch. Whether a file decodes is a property of the file, so:
- in training, the slot of an unreadable file gets the next readable file in ImageFolder order (wrapping around),
  under the slot's own random draws: every rank keeps its number of full batches, and any run (resumed, other
  workers) sees the same batches;
- in evaluation it is left out: the metric is over the readable images, as with a .beton, which holds only those.
Each rank reports every unreadable file once, with a running count, on stderr: ``skipped N unreadable files so
far, e.g. <path> (<reason>)``.

Nothing here needs FFCV (or numba): this loader is for the machines that lack them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import re
import signal
import threading
import time

import numpy as np
import torch
from PIL import Image
from timm.data import auto_augment, create_transform
from timm.data.transforms_factory import transforms_imagenet_train
from torch.utils.data import DataLoader, Dataset, Sampler
from ..log import say
from ..preemption import PRIORITY as STOP_SIGNALS
from .. import rng
from ..errors import DataError
from .classes import scan_tree
from .images import BadImage, load_rgb
from .order import Shard, batches_per_epoch, rank_indices, sample_key

POSTERIZE = ("Posterize", "PosterizeIncreasing", "PosterizeOriginal")


def _posterize(img, bits_to_keep, **kw):
    # timm's PosterizeIncreasing asks for 0 bits at magnitude 10 (reached by m9 + noise). Pillow < 12 gave a black
    # image (what the official runs saw); Pillow >= 12 raises. Keep the old behaviour.
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kw)


def _with_posterize_fix(transform):
    """Point the posterize ops of ``transform`` at ``_posterize``. Only these op instances change: timm's global
    NAME_TO_OP, which every other AugmentOp in the process is built from, stays as timm has it."""
    for t in transform.transforms:
        ops = list(getattr(t, "ops", ())) + [op for sub in getattr(t, "policy", ()) for op in sub]  # Rand/AutoAugment
        for op in ops:
            if getattr(op, "name", None) in POSTERIZE:
                op.aug_fn = _posterize
    return transform


def eval_transform(res: int, crop_pct: float, interpolation: str = "bicubic", crop_mode: str = "center"):
    """timm's eval transform (resize shorter side to floor(res / crop_pct), center crop), ending at uint8."""
    return create_transform(res, is_training=False, interpolation=interpolation, crop_pct=crop_pct,
                            crop_mode=crop_mode, use_prefetcher=True)


def train_transform(res: int, aug):
    """timm's training transform up to uint8 (random erasing and Mixup/CutMix follow on the device)."""
    return _with_posterize_fix(transforms_imagenet_train(
        res, scale=tuple(aug.scale), ratio=tuple(aug.ratio), hflip=aug.hflip, vflip=0.0,
        color_jitter=aug.color_jitter or None, force_color_jitter=aug.force_color_jitter,
        auto_augment=aug.rand_augment or None, interpolation=aug.train_interpolation, re_prob=0.0,
        use_prefetcher=True))


@contextlib.contextmanager
def seeded(key: int):
    """Python's, numpy's and torch's CPU global RNGs (what timm's PIL transforms draw from) seeded from ``key``, and
    restored afterwards: with num_workers=0 they are the training loop's own. Only torch's CPU generator:
    torch.manual_seed would also reseed every CUDA generator (DropPath's, the device augmentation's), which nothing
    here restores."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    rng.seed_host(key)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class SeededDataset(Dataset):
    """Sample i -> (uint8 CHW image tensor, or None when left out; label; [(path, reason)] of unreadable files met).

    ``replace_bad``: an unreadable file's slot takes the next readable file (training) instead of being left out."""

    def __init__(self, samples: list, root: str, transform, seed: int, replace_bad: bool):
        self.samples, self.root, self.transform = samples, root, transform
        self.seed, self.replace_bad, self.epoch = seed, replace_bad, 0

    def __len__(self):
        return len(self.samples)

    def read(self, i):
        bad = []
        n = len(self.samples)
        for j in itertools.chain(range(i, n), range(i)):
            path, label = self.samples[j]
            try:
                return load_rgb(path), label, bad
            except Exception as e:  # BadImage, or whatever else a corrupt file makes a PIL plugin raise
                bad.append((path, str(e) if isinstance(e, BadImage) else f"{type(e).__name__}: {e}"))
                if not self.replace_bad:
                    return None, label, bad
        raise DataError(f"no file under {self.root} decodes as an image")

    def __getitem__(self, i):
        image, label, bad = self.read(i)
        if image is not None:
            with seeded(int(sample_key(self.seed, self.epoch, i))):
                image = torch.as_tensor(np.asarray(self.transform(image)))
        return image, label, bad


def collate(samples):
    """(images stacked, or None if none is left; labels; unreadable files met), from SeededDataset samples."""
    kept = [(x, y) for x, y, _ in samples if x is not None]
    images = torch.stack([x for x, _ in kept]) if kept else None
    return images, torch.tensor([y for _, y in kept], dtype=torch.int64), [b for *_, bad in samples for b in bad]


class ShardBatchSampler(Sampler):
    def __init__(self, owner: "FolderLoader"):
        self.owner = owner

    def __iter__(self):
        o = self.owner
        idx = rank_indices(len(o.dataset), o.batch_size, o.seed, o.epoch, o.shard, shuffle=o.train,
                           drop_last=o.train, start_batch=o.start_batch)
        for b in range(0, len(idx), o.batch_size):
            yield idx[b:b + o.batch_size].tolist()

    def __len__(self):
        return len(self.owner)


def _ignore_sigchld(signum, frame):
    pass


def report_worker_deaths_where_batches_are_asked_for():
    """torch's SIGCHLD handler (installed by the first multi-worker iterator) raises "DataLoader worker ... is killed
    by signal" in whatever the training process is doing when a worker dies: inside a checkpoint write, or between
    two collectives, where the other ranks would wait for it until their timeout. Without it the iterator still
    notices a dead worker when the batch it owed is asked for (it checks its workers every few seconds while it
    waits), and that error is raised in __iter__ above, where it becomes one line. SIGCHLD's default is to ignore."""
    if threading.current_thread() is not threading.main_thread():
        return
    handler = signal.getsignal(signal.SIGCHLD)
    if getattr(handler, "__module__", "") == "torch.utils.data._utils.signal_handling":
        signal.signal(signal.SIGCHLD, _ignore_sigchld)


def leave_stop_signals_to_the_trainer(worker_id: int):
    """Slurm sends its signals (requeue, preemption, cancellation, the time-limit warning) to every process of the
    job step, these workers included. A worker that died of Slurm's SIGTERM would make the DataLoader raise in the
    training process before it could write its checkpoint (a requeued run would start over). So the workers ignore
    the stop signals, and the trainer stops them once it has checkpointed (Slurm's SIGKILL ends them after KillWait).
    A SIGTERM from the training process itself still ends a worker, as torch's own worker handler does: it is how
    multiprocessing stops workers left running at exit. Python's handlers do not see the sender, so a thread waits
    for SIGTERM with sigwaitinfo, which does."""
    if not hasattr(signal, "sigwaitinfo"):  # macOS: no Slurm to signal the workers, nothing to leave
        return
    for sig in STOP_SIGNALS:
        if sig != signal.SIGTERM:
            signal.signal(sig, signal.SIG_IGN)
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on inherit the mask

    def wait_for_sigterm():
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)

    threading.Thread(target=wait_for_sigterm, name="sigterm-from-trainer", daemon=True).start()


class FolderLoader:
    """Iterate (images uint8 (B, 3, H, W), labels int64 (B,)) over one rank's share of an ImageFolder tree."""

    def __init__(self, root, *, train: bool, batch_size: int, res: int, aug=None, crop_pct: float = 1.0,
                 crop_mode: str = "center", interpolation: str = "bicubic", seed: int = 0, shard: Shard = Shard(),
                 num_workers: int = 2, classes: list[str] | None = None):
        """classes: the class map to label the folders by (their sorted names when None)."""
        self.train, self.batch_size, self.seed, self.shard, self.res = train, batch_size, seed, shard, res
        transform = train_transform(res, aug) if train else eval_transform(res, crop_pct, interpolation, crop_mode)
        self.root = str(root)
        found, samples = scan_tree(root, None if classes is None else {c: i for i, c in enumerate(classes)})
        self.classes = list(classes) if classes is not None else found
        self.dataset = SeededDataset(samples, self.root, transform, seed, replace_bad=train)
        self.epoch, self.start_batch = 0, 0
        self.skipped: dict[str, str] = {}  # unreadable files met by this process: path -> reason
        # iter(DataLoader) draws its workers' base seed from this generator; left to the global one, the draw would
        # shift the training RNG stream, and a resumed run makes it at another point than an uninterrupted one.
        self.generator = torch.Generator()
        self.loader = DataLoader(self.dataset, batch_sampler=ShardBatchSampler(self), num_workers=num_workers,
                                 collate_fn=collate, generator=self.generator, pin_memory=torch.cuda.is_available(),
                                 persistent_workers=False, worker_init_fn=leave_stop_signals_to_the_trainer)

    def set_epoch(self, epoch: int, start_batch: int = 0):
        self.epoch, self.start_batch = epoch, start_batch
        self.dataset.epoch = epoch
        # Every sample reseeds its own draws, so the workers' base seed does not reach the pixels; fixed all the same,
        # from (seed, epoch): the key of the index one past the last sample, which no sample uses.
        self.generator.manual_seed(int(sample_key(self.seed, epoch, len(self.dataset))) >> 1)

    def __len__(self):
        return batches_per_epoch(len(self.dataset), self.batch_size, self.shard, drop_last=self.train) - self.start_batch

    def __iter__(self):
        batches = iter(self.loader)
        report_worker_deaths_where_batches_are_asked_for()
        batch = self.start_batch
        while True:
            try:
                images, labels, bad = next(batches)
            except StopIteration:
                return
            except (RuntimeError, ConnectionError, EOFError, FileNotFoundError) as e:
                # torch raises "DataLoader worker (pid N) exited unexpectedly" when the batch a dead worker owed is
                # asked for. A batch it had queued before it died fails instead as it is unpickled: its tensors
                # travel as file descriptors that the worker itself was to hand over.
                dead = self._dead_workers(batches, e)
                if not dead:
                    raise
                raise DataError(self._worker_died(dead, batch)) from None
            batch += 1
            self._report(bad)
            if images is not None:
                yield images, labels

    @staticmethod
    def _dead_workers(batches, error: Exception) -> list[str]:
        """The workers that ``error`` comes from, named "N (pid P, killed by SIG...)"; none if it is another error."""
        workers = list(enumerate(getattr(batches, "_workers", ())))
        if isinstance(error, RuntimeError):
            found = re.match(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\)", str(error))
            if not found:
                return []
            pids = {int(p) for p in re.findall(r"\d+", found.group(1))}
            dead = [(i, w) for i, w in workers if w.pid in pids]
            if not dead:
                return [f"pid {p}" for p in sorted(pids)]
        else:
            # The worker's sockets close as it exits, a moment before it can be reaped.
            deadline = time.monotonic() + 5
            while not (dead := [(i, w) for i, w in workers if w.exitcode is not None]) and time.monotonic() < deadline:
                time.sleep(0.05)
        return [f"{i} (pid {w.pid}{', killed by ' + signal.Signals(-w.exitcode).name if (w.exitcode or 0) < 0 else ''})"
                for i, w in dead]

    def _worker_died(self, dead: list[str], batch: int) -> str:
        """The line for a dead worker: which one, how it ended, where the run was."""
        rank = f"rank {self.shard.rank}: " if self.shard.world_size > 1 else ""
        return (f"{rank}DataLoader worker {', '.join(dead)} of {self.root} died while loading batch {batch} of epoch "
                f"{self.epoch} (counted from 0) (SIGKILL is most often the out-of-memory killer: lower "
                f"data.num_workers or ask for more memory; see the job's or the kernel's log); the last checkpoint is "
                f"intact: run the same command again to resume from it")

    def _report(self, bad):
        for path, reason in bad:
            if path in self.skipped:
                continue
            self.skipped[path] = reason
            n = len(self.skipped)
            if n <= 10 or n % 100 == 0:  # a tree with thousands of broken files must not drown the log
                rank = f"rank {self.shard.rank}: " if self.shard.world_size > 1 else ""
                what = "each replaced by the next readable file" if self.train else "left out of evaluation"
                say(f"warning: {rank}{self.root}: skipped {n} unreadable file{'s' * (n != 1)} so far "
                    f"({what}), e.g. {path} ({reason})")
