"""FFCV loaders: uint8 NHWC batches decoded, cropped, resized and flipped by numba threads.

Everything after decoding (normalisation, RandAugment, erasing, Mixup/CutMix) runs on the model's device in
``augment.py``. The pipeline deliberately ends at ToTensor: FFCV hangs on CPU when flip/normalise ops follow
ToTorchImage (ffcv issues #350, #396), and uint8 is the cheapest thing to move to a GPU.
"""

from __future__ import annotations

import os
from datetime import datetime

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.loader import Loader
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline.compiler import Compiler
from ffcv.reader import Reader
from ffcv.traversal_order.base import TraversalOrder
from ffcv.transforms import Squeeze, ToTensor
from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType

from ..errors import DataError

from .ffcv_decoder import CropResizeDecoder
from .order import Shard, batches_per_epoch, rank_indices


AGAIN = "copy it again from its source, or convert it again (python -m mambavision_train.data.convert, docs/data.md)"

# How often (in batches) a loader checks that its .beton is still the file it opened, besides every epoch's start: a
# stat, cheap even on a parallel filesystem at this rate.
STAT_EVERY = 256


def beton_reader(path) -> Reader:
    """A .beton's header and tables (the metadata of every sample, where each one lies), checked to be whole; no
    image is read."""
    check_beton_size(path)
    reader = Reader(str(path))
    check_beton_tables(reader, path)
    return reader


def check_beton_size(path):
    """The header (FFCV's writer.py: header, field descriptors, metadata, data pages, then the allocation table at
    ``alloc_table_ptr`` up to the end of the file, which FFCV's reader takes as the table's end) against the file's
    size. A copy cut short loses its end, the allocation table first: FFCV reads whatever is left as the table and
    fails, or hangs, or reads garbage, only when it reaches a sample whose entry is missing."""
    size = os.stat(path).st_size
    if size < HeaderType.itemsize:
        raise DataError(f"{path} is {size} bytes, shorter than an FFCV header: truncated, or not a .beton; {AGAIN}")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if header["version"] != CURRENT_VERSION:
        raise DataError(f"{path} is not an FFCV file of format version {CURRENT_VERSION} (its header says "
                        f"{header['version']}): truncated or damaged, or written by another FFCV; {AGAIN}")
    table, fields_end = int(header["alloc_table_ptr"]), HeaderType.itemsize + int(header["num_fields"]) * FieldDescType.itemsize
    if not fields_end <= table <= size or (size - table) % ALLOC_TABLE_TYPE.itemsize:
        raise DataError(f"{path} is truncated: {size} bytes, but its header puts the allocation table at byte {table} "
                        f"(entries of {ALLOC_TABLE_TYPE.itemsize} bytes to the end of the file); {AGAIN}")


def check_beton_tables(reader: Reader, path):
    """Every sample's data is in the allocation table and before it: what a table cut at an entry's boundary lacks."""
    table = reader.alloc_table
    end = int(reader.header["alloc_table_ptr"])
    if len(table) and int((table["ptr"] + table["size"]).max()) > end:
        raise DataError(f"{path} is damaged: its allocation table points past its data (byte {end}); {AGAIN}")
    for column in reader.metadata.dtype.names or ():
        meta = reader.metadata[column]
        if meta.dtype.names and "data_ptr" in meta.dtype.names:
            missing = int((~np.isin(meta["data_ptr"], table["ptr"])).sum())
            if missing:
                raise DataError(f"{path} is truncated: {missing} of its {len(meta)} samples have no entry in its "
                                f"allocation table (the end of the file is missing); {AGAIN}")


def file_stamp(path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def check_unchanged(path, stamp: tuple[int, int]):
    """A .beton rewritten, truncated or replaced while the run reads it (FFCV maps it into memory and read its tables
    once): one line instead of garbage images or a SIGBUS."""
    try:
        now = file_stamp(path)
    except OSError as e:
        raise DataError(f"{path} went away while this run reads it ({e.strerror}): put it back, then run the same "
                        f"command again: it resumes from the last checkpoint") from None
    if now != stamp:
        when = datetime.fromtimestamp(now[1] / 1e9).isoformat(timespec="seconds")
        raise DataError(f"{path} changed while this run reads it (size {stamp[0]} -> {now[0]} bytes, modified {when}): "
                        f"a .beton must not be rewritten under a running job; put the original back (or let the copy "
                        f"finish), then run the same command again: it resumes from the last checkpoint")


def num_labels(reader: Reader) -> int:
    """The number of labels a .beton uses (its largest label + 1), from its metadata table."""
    column = reader.metadata[f"f{reader.field_names.index('label')}"]  # FFCV names metadata columns by position
    return int(column.max()) + 1 if len(column) else 0


class _ShardOrder(TraversalOrder):
    """Hands FFCV our (seed, epoch, rank)-determined order. FFCV wants an instance it can call with the loader."""

    def __init__(self, owner: "FFCVLoader"):
        self.owner = owner

    def __call__(self, loader):
        TraversalOrder.__init__(self, loader)
        return self

    def sample_order(self, _ffcv_epoch):
        o = self.owner
        return rank_indices(o.num_samples, o.batch_size, o.seed, o.epoch, o.shard, shuffle=o.train,
                            drop_last=o.train, start_batch=o.start_batch)


class _OnTheRanksGPU(EpochIterator):
    """FFCV's loader thread, started on this process's GPU.

    With CUDA available FFCV wraps each batch in a CUDA stream context of its own (a module constant read at import
    decides it; our pipeline puts nothing on the device, but FFCV cannot be told without patching it for the whole
    process). A new thread's current CUDA device is 0, and leaving that context makes it current: every rank's loader
    thread would open a context on GPU 0 (~0.5 GB each; FFCV issues #114, #210), and rank 0's GPU runs out of memory
    first on L/L2. Made current first, the rank's own device is the one the thread touches. Only a GPU node shows it
    (benchmarks/gpu_check.py counts the contexts where there are 2+ GPUs)."""

    def __init__(self, loader, order, device: torch.device | None):
        self.device = device  # before FFCV's __init__, which starts the thread
        super().__init__(loader, order)

    def run(self):
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        super().run()


class _Loader(Loader):
    """FFCV's Loader whose epochs run in ``_OnTheRanksGPU`` threads; ``__iter__`` is FFCV 1.0.2's own but for the
    iterator class."""

    device: torch.device | None = None

    def __iter__(self):
        Compiler.set_num_threads(self.num_workers)
        order = self.next_traversal_order()
        selected_order = order[:len(self) * self.batch_size]
        self.next_epoch += 1
        if self.code is None or self.recompile:
            self.generate_code()
        return _OnTheRanksGPU(self, selected_order, self.device)


class FFCVLoader:
    """Iterate (images uint8 (B, 3, H, W) in channels_last memory, labels int64 (B,)) over one rank's share of a
    .beton file.

    The images are views into FFCV's reused output buffers: use (or copy) a batch before asking for the next one,
    as DeviceAugment does; a batch kept while iterating on can be overwritten by the loader thread."""

    def __init__(self, path, *, train: bool, batch_size: int, res: int, crop_pct: float = 1.0,
                 crop_mode: str = "center", scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5,
                 seed: int = 0, shard: Shard = Shard(), num_workers: int = 2, os_cache: bool = True,
                 dct_scaling: bool = True, reader: Reader | None = None, device=None):
        """reader: the file's beton_reader() when the caller has one already (its tables are then not read again);
        device: where the batches will go (FFCV's thread is kept on it, above)."""
        self.path, self.train, self.batch_size, self.seed, self.shard = str(path), train, batch_size, seed, shard
        self.res = res
        reader = reader or beton_reader(self.path)
        self.stamp = file_stamp(self.path)  # what the file is now, checked to stay so while the run reads it
        self.num_samples = int(reader.num_samples)  # numpy uint64 in FFCV: keep arithmetic signed
        self.epoch, self.start_batch = 0, 0
        self.decoder = CropResizeDecoder((res, res), mode="random" if train else crop_mode, scale=scale,
                                         ratio=ratio, flip_prob=hflip, crop_pct=crop_pct, seed=seed,
                                         dct_scaling=dct_scaling)
        self.loader = _Loader(self.path, batch_size=batch_size, num_workers=num_workers, os_cache=os_cache,
                             order=_ShardOrder(self), drop_last=train, seed=seed,
                             pipelines={"image": [self.decoder, ToTensor()],
                                        "label": [IntDecoder(), ToTensor(), Squeeze(1)]})
        self.loader.device = torch.device(device) if device is not None else None

    def set_epoch(self, epoch: int, start_batch: int = 0):
        """The next iteration yields batches start_batch.. of ``epoch``."""
        self.epoch, self.start_batch = epoch, start_batch
        self.decoder.set_epoch(epoch)

    def __len__(self):
        return batches_per_epoch(self.num_samples, self.batch_size, self.shard, drop_last=self.train) - self.start_batch

    def __iter__(self):
        check_unchanged(self.path, self.stamp)
        for i, (images, labels) in enumerate(self.loader, 1):
            if i % STAT_EVERY == 0:
                check_unchanged(self.path, self.stamp)
            yield images.permute(0, 3, 1, 2), labels.long()  # NHWC memory viewed as NCHW: channels_last for free
