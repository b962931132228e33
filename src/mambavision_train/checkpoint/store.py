"""The store: writes and reads a run's checkpoints, atomically, completely, and loadable without executing code.

What goes in besides the weights and the optimizer is the Checkpointer's (checkpointer.py); the names and keys are
format.py's. Every file is written next to its target, fsynced and renamed into place, and the directory is fsynced
after the rename (files.py), so a kill or a power loss at any moment leaves a complete checkpoint behind. The previous
``last`` is kept as ``previous`` (a failed or interrupted write cannot take the only good one with it), and
``step_<N>`` copies are bounded by ``keep_last_n``; ``best`` and the step copies are hard links to the file
(files.duplicate). Everything in a checkpoint is a tensor, number, string or container
of those: it loads with ``torch.load(weights_only=True)``.

Under FSDP2 the model, EMA and optimizer are saved sharded with torch.distributed.checkpoint (each rank writes its
shards) into a fresh directory that is renamed into place; ``last.dcp`` / ``previous.dcp`` / ``best.dcp`` are
symlinks swapped atomically onto it. The EMA weights are also exported in full (``ema_last.pth``, ``ema_best.pth``:
``{"state_dict": the weights with the official names, "classes": the class map, "model": the variant}``, the layout
of the official and timm checkpoints, which their loaders read), on the CPU, loadable by the plain model. Resuming a
sharded checkpoint reads torch.distributed.checkpoint's metadata, which is pickled: resume only your own sharded
checkpoints (docs/training.md).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from .. import files
from ..distributed import all_reduce_max
from . import format as fmt


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, permissions); the previous one is intact."""


def load(path: str | os.PathLike) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def finite(modules, device) -> bool:
    """Whether every parameter and floating buffer of ``modules`` is finite, on every rank (collective)."""
    from ..parallel import local
    bad = any(not bool(torch.isfinite(local(t)).all()) for m in modules
              for t in [*m.parameters(), *m.buffers()] if t.is_floating_point())
    return not bool(all_reduce_max(torch.tensor([int(bad)], device=device)).item())


class RunCheckpoints:
    """Writes and reads a run's checkpoints: one file (one process, DDP) or a sharded directory (FSDP2).

    ``meta`` is the small, rank-0 part (schedule, scaler, counters, RNG states of all ranks, config); the model,
    EMA and optimizer come from the objects themselves."""

    def __init__(self, run_dir, model, ema, optimizer, is_main: bool, sharded: bool, keep_last_n: int = 3,
                 device="cpu", export: dict | None = None, group=None):
        """export: what the exported EMA files carry besides the weights (class map, variant). group: where the
        other ranks wait for rank 0's writes (DistInfo.save_group: gloo, with checkpoint.timeout_s)."""
        self.group = group
        self.dir = fmt.directory(run_dir)
        self.export = export or {}
        self.model, self.ema, self.optimizer, self.is_main, self.sharded = model, ema, optimizer, is_main, sharded
        self.keep_last_n, self.device = keep_last_n, device
        if is_main:
            self._remove_leftovers()

    def _remove_leftovers(self):
        """Temporary files and directories of saves that a crash or a full disk interrupted."""
        if not self.dir.is_dir():
            return
        for p in [*self.dir.glob(".*.tmp*"), *self.dir.glob(f"{fmt.SHARDS}/*.tmp")]:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)

    def save(self, meta: dict, best: bool = False, tag: str | None = None):
        """Collective: every rank calls it, and every rank raises CheckpointWriteError if the write failed."""
        names = [fmt.LAST] + ([fmt.BEST] if best else []) + ([tag] if tag else [])
        error = None
        try:
            (self._save_sharded if self.sharded else self._save_file)(meta, names)
            ema_full = self._ema_full_state()  # collective under FSDP2
            if self.is_main and ema_full is not None:
                files.save_torch({fmt.WEIGHTS: ema_full, **self.export}, self.dir / fmt.EMA_LAST)
                if best:
                    files.duplicate(self.dir / fmt.EMA_LAST, self.dir / fmt.EMA_BEST)
            if self.is_main and tag:
                self._drop_old_step_copies()
        except OSError as e:
            error = e
        failed = torch.tensor([int(error is not None)], device="cpu" if self.group is not None else self.device)
        if all_reduce_max(failed, self.group).item():
            reason = f"{error.strerror or error}" if error is not None else "rank 0 could not write it"
            raise CheckpointWriteError(f"could not write a checkpoint in {self.dir} ({reason}); the previous one is "
                                       f"intact: free space (or fix the path) and run the same command again")

    def _save_file(self, meta, names):
        if not self.is_main:
            return
        state = {fmt.MODEL: self.model.state_dict(), fmt.EMA: self.ema.state_dict() if self.ema else None,
                 fmt.OPTIMIZER: self.optimizer.state_dict(), **meta}
        last = self.dir / (fmt.LAST + fmt.FILE)
        files.save_torch(state, last, previous=self.dir / (fmt.PREVIOUS + fmt.FILE))
        for name in names[1:]:
            files.duplicate(last, self.dir / (name + fmt.FILE))

    def _drop_old_step_copies(self):
        steps = sorted(self.dir.glob(fmt.step_name("*") + ".*"), key=lambda p: int(p.name.split(".")[0].split("_")[1]))
        for p in steps[:max(0, len(steps) - self.keep_last_n)]:
            p.unlink()
        if self.sharded:
            self._prune()

    def _sharded_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
        model, optim = get_state_dict(self.model, self.optimizer)
        state = {fmt.MODEL: model, fmt.OPTIMIZER: optim}
        if self.ema:
            state[fmt.EMA] = get_model_state_dict(self.ema.module)
        return state

    def _save_sharded(self, meta, names):
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        name = [f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9:09d}" if self.is_main else None]
        dist.broadcast_object_list(name)  # one directory name for all ranks
        final = self.dir / fmt.SHARDS / name[0]
        tmp = final.with_name(final.name + ".tmp")
        dcp.save(self._sharded_state(), checkpoint_id=tmp)
        if self.is_main:
            files.save_torch(meta, tmp / fmt.META)
            os.replace(tmp, final)
            files.fsync_dir(final.parent)
            last = self.dir / (fmt.LAST + fmt.SHARDED)
            if last.is_symlink() and last.exists():
                _point(self.dir / (fmt.PREVIOUS + fmt.SHARDED), last.resolve())
            for link in names:
                _point(self.dir / (link + fmt.SHARDED), final)
            self._prune()
        dist.barrier(group=self.group)

    def _prune(self):
        """Remove sharded checkpoints no link points at any more (and leftovers of interrupted saves)."""
        kept = {p.resolve() for p in self.dir.glob("*" + fmt.SHARDED)}
        for d in (self.dir / fmt.SHARDS).iterdir():
            if d.resolve() not in kept:
                shutil.rmtree(d, ignore_errors=True)

    def _ema_full_state(self):
        if not self.ema:
            return None
        if not self.sharded:  # on the CPU: a file of CUDA tensors does not load on a machine without a GPU
            return {k: v.cpu() for k, v in self.ema.state_dict().items()} if self.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(self.ema.module, options=StateDictOptions(full_state_dict=True,
                                                                              cpu_offload=True))

    def read(self, path: Path) -> dict:
        """The checkpoint's contents without touching the model: everything for a single file, the meta part (config,
        counters, RNG states) for a sharded directory."""
        if path.is_dir() != self.sharded:
            raise CheckpointMismatch(
                f"{path} is a {'sharded (FSDP2)' if path.is_dir() else 'single-file'} checkpoint but this run is "
                f"{'dist=fsdp' if self.sharded else 'not sharded'}; resume it with "
                f"{'dist=fsdp' if path.is_dir() else 'dist=none or dist=ddp'} or start a new run_dir")
        return load(path / fmt.META if self.sharded else path)

    def restore(self, path: Path, state: dict):
        """Model, EMA and optimizer from a checkpoint ``read`` returned ``state`` for, in place."""
        if not self.sharded:
            self.model.load_state_dict(state[fmt.MODEL])
            if self.ema and state[fmt.EMA] is not None:
                self.ema.load_state_dict(state[fmt.EMA])
            self.optimizer.load_state_dict(state[fmt.OPTIMIZER])
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict
        shards = self._sharded_state()
        dcp.load(shards, checkpoint_id=path.resolve())
        set_state_dict(self.model, self.optimizer, model_state_dict=shards[fmt.MODEL],
                       optim_state_dict=shards[fmt.OPTIMIZER])
        if self.ema:
            set_model_state_dict(self.ema.module, shards[fmt.EMA])


class CheckpointMismatch(ValueError):
    """A checkpoint written by another kind of run (sharded vs single file)."""


def _point(link: Path, target: Path):
    """Atomically make ``link`` a relative symlink to ``target``."""
    tmp = files.aside(link)
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)
