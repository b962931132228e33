"""Files that appear whole or not at all. A reader (a browser, a copy taken mid-run, the next start after a kill)
never sees half a file: everything is written beside its target and renamed into place. ``durable`` adds the fsyncs
a checkpoint needs to survive a power loss too. A leaf: torch is imported only by ``save_torch``."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def aside(path: str | os.PathLike) -> Path:
    """Where ``path`` is written before the rename: per process, so two writers at once (paper_table.sbatch's array
    elements) each rename a whole file. Leftovers of a killed writer match ``.*.tmp``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: str | os.PathLike, durable: bool = False, previous: Path | None = None):
    """``with replacing(p) as tmp: write tmp`` puts the file at ``p`` when the block succeeds and removes ``tmp``
    when it fails (a full disk must not keep half a file around). ``previous``: the file it replaces is kept under
    that name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = aside(path)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str):
    with replacing(path) as tmp:
        tmp.write_text(text)


def save_torch(obj, path: str | os.PathLike, previous: Path | None = None):
    """``torch.save`` that survives a kill or a power loss at any moment."""
    import torch
    # Into an open file: given a path, torch writes through its own writer, and a full disk raises a RuntimeError
    # instead of the OSError (ENOSPC) the caller turns into its one line.
    with replacing(path, durable=True, previous=previous) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def duplicate(src: str | os.PathLike, dst: str | os.PathLike):
    """``dst`` as a second name of the durable file ``src`` (``best`` beside ``last``): a hard link, as timm's
    checkpoint saver makes, where the file system has them, else a durable copy. A link is safe here because no file
    is ever written in place: the next ``last`` is a new file renamed over the name, and the old one lives on under
    ``dst``."""
    with replacing(dst, durable=True) as tmp:  # a link's fsync finds nothing to write; the directory's is the point
        try:
            os.link(src, tmp)
        except OSError:  # no hard links here (some network and FUSE file systems): the bytes once more
            shutil.copyfile(src, tmp)
