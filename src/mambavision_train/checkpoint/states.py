"""The pieces of a run's state the trainer registers with its Checkpointer, beside the weights: each is an object with
``state_dict()`` and ``load_state_dict()`` (torchtitan's ``Stateful``), so the trainer never reads or writes a key.
Collective where it gathers every rank's part: every rank saves and loads them in the same order."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from .. import rng
from ..distributed import DistInfo, gather_objects


@dataclass
class TrainState:
    """The counters: where the run is, and what it has seen."""
    epoch: int = 0  # the epoch in progress
    step: int = 0  # optimizer steps done in that epoch
    global_step: int = 0
    best_top1: float = -1.0
    best_epoch: int = -1
    skipped_steps: int = 0
    wandb_id: str | None = None  # the W&B step is global_step
    epoch_loss_sum: float = 0.0  # finite step losses of the epoch in progress, for its mean in metrics.csv; kept
    epoch_loss_steps: int = 0  # in the checkpoint so that a mid-epoch resume still averages the whole epoch

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict):
        for f in fields(self):
            setattr(self, f.name, state[f.name])


class Schedule:
    """The learning-rate schedule. A resume that allows recipe changes keeps this config's schedule instead, and puts
    its hyper-parameters back over the restored optimizer's (from the restored step on)."""

    def __init__(self, scheduler, optimizer, changes_allowed):
        """changes_allowed(): whether the checkpoint being loaded may differ from this config (the Checkpointer's)."""
        self.scheduler, self.optimizer, self.changes_allowed = scheduler, optimizer, changes_allowed
        self.fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict):
        if self.changes_allowed():
            for group, fresh in zip(self.optimizer.param_groups, self.fresh):
                group.update(fresh)
        else:
            self.scheduler.load_state_dict(state)


class Scaler:
    """The fp16 GradScaler. A disabled one (bf16, fp32) saves ``{}``, which an enabled one refuses: a run that turns
    amp=fp16 on at a resume starts a fresh scale instead."""

    def __init__(self, scaler: torch.amp.GradScaler, log):
        self.scaler, self.log = scaler, log

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict):
        if state or not self.scaler.is_enabled():
            self.scaler.load_state_dict(state)
        else:
            self.log(f"amp=fp16 from here on: the GradScaler starts at scale {self.scaler.get_scale():g}")


class RankGenerators:
    """Every rank's random generators (each draws its own augmentation and DropPath), restored rank by rank; after a
    change of world size they cannot be, and the run goes on from the fresh seeds (check_same_run said so)."""

    def __init__(self, dist: DistInfo):
        self.dist = dist

    def state_dict(self) -> list:
        return gather_objects(rng.state(), self.dist)

    def load_state_dict(self, states: list):
        if len(states) == self.dist.world_size:
            rng.set_state(states[self.dist.rank])


class RankBatchNorm:
    """Every rank's BatchNorm running statistics of the model and EMA. Without SyncBN each rank's statistics drift
    apart between the reductions before validation; a checkpoint holding only rank 0's copy (DDP, and FSDP2's
    replicated buffers) would make resuming inexact. One process: None (the weights hold them)."""

    def __init__(self, dist: DistInfo, modules):
        self.dist, self.modules = dist, modules  # modules(): {"model": ..., "ema": ...}

    def state_dict(self) -> list | None:
        if not self.dist.distributed:
            return None
        mine = {key: {n: b.detach().cpu().clone() for n, b in m.named_buffers() if ".running_" in n}
                for key, m in self.modules().items()}
        return gather_objects(mine, self.dist)

    @torch.no_grad()
    def load_state_dict(self, stats: list | None):
        if not stats or len(stats) != self.dist.world_size:
            return
        for key, module in self.modules().items():
            for name, buf in module.named_buffers():
                if name in stats[self.dist.rank][key]:
                    buf.copy_(stats[self.dist.rank][key][name])
