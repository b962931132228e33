"""A run's checkpointer (torchtitan's shape): the trainer registers its state objects once, and the checkpointer
owns the rest: what a checkpoint holds (the store's weights, each registered state under its key, the values written
for readers), when one is written (``checkpoint.every_n_steps``, ``keep_steps``, ``keep_last_n``), and what a start
loads (``resume``)."""

from __future__ import annotations

from pathlib import Path

from ..errors import TrainingError
from . import format as fmt
from .resume import checkpoints_to_try, load_first_good
from .store import CheckpointWriteError, RunCheckpoints, finite


class Checkpointer:
    def __init__(self, cfg, store: RunCheckpoints, weight_modules, device, log):
        """cfg: the run's config (its ``checkpoint`` group and ``resume``); weight_modules(): what holds the weights,
        checked to be finite before every save and after every load."""
        self.cfg, self.store, self.weight_modules, self.device, self.log = cfg, store, weight_modules, device, log
        self.states, self.values = {}, {}
        self.changes_allowed = False  # whether the checkpoint a resume loads may differ from this config

    def register(self, key: str, state):
        """An object with state_dict()/load_state_dict(), saved under ``key`` and restored at a resume."""
        self.states[key] = state

    def write_also(self, **values):
        """Values for the readers of a checkpoint (the class map, the config), never loaded back."""
        self.values.update(values)

    # ----------------------------------------------------------------------------------------------- saving
    def due(self, global_step: int, epoch_done: bool) -> tuple[bool, str | None]:
        """Whether to write a checkpoint inside the epoch after ``global_step`` (the epoch's end always writes one),
        and the name of the copy to keep with it."""
        every = self.cfg.checkpoint.every_n_steps
        if epoch_done or not every or global_step % every:
            return False, None
        return True, fmt.step_name(global_step) if self.cfg.checkpoint.keep_steps else None

    def save(self, global_step: int, best: bool = False, tag: str | None = None):
        """Collective (RNG gather, finiteness verdict, sharded writes): every rank takes part."""
        if not finite(self.weight_modules().values(), self.device):
            raise TrainingError(f"the weights are not finite at global step {global_step}: no checkpoint written; "
                                f"the last good one is {fmt.latest(self.store.dir.parent) or 'none yet'}")
        meta = {key: state.state_dict() for key, state in self.states.items()}
        try:
            self.store.save({**meta, **self.values}, best=best, tag=tag)
        except CheckpointWriteError as e:
            raise TrainingError(str(e)) from None

    # --------------------------------------------------------------------------------------------- resuming
    def resume(self, world_size: int) -> Path | None:
        """Restore the newest checkpoint that ``resume`` allows and that loads (weights, optimizer and every
        registered state); None when the run starts from scratch."""
        run_dir = self.store.dir.parent
        paths = checkpoints_to_try(run_dir, str(self.cfg.resume))
        if not paths:
            return None
        path, state, failed, self.changes_allowed = load_first_good(self.store, paths, self.cfg, world_size,
                                                       list(self.weight_modules().values()), self.device, self.log)
        if failed:
            self.log(f"warning: skipped {', '.join(f'{p.name} ({why})' for p, why in failed)}; resuming from the "
                     f"newest checkpoint that loads: {path}")
        for key, obj in self.states.items():
            obj.load_state_dict(state[key])
        return path
