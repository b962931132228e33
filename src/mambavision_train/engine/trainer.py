"""The training loop: build in a fixed order, then epochs of optimizer steps, validation, checkpoints.

Build order: process group -> model -> data -> EMA -> device/DDP -> optimizer, schedule, scaler -> logger -> resume.
A step is ``accumulation`` micro-batches (forward, loss [+ MESA], backward) then one optimizer update and one EMA
update. Validation of the base and EMA weights closes every epoch; the best checkpoint is chosen by EMA top-1, as in
the official code.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from .. import recipe, rng, rundir
from ..checkpoint import format as fmt
from ..checkpoint.checkpointer import Checkpointer
from ..checkpoint.states import RankBatchNorm, RankGenerators, Scaler, Schedule, TrainState
from ..checkpoint.store import RunCheckpoints
from ..data import Shard, build_loader
from ..data import classes as class_files
from ..distributed import DistInfo, all_reduce_max, env_world_size, init_distributed, reduce_bn_stats
from ..errors import CheckpointError, TrainingError
from ..log import RunLog
from ..metrics import MetricsLogger, RunMetrics, Throughput
from ..models.build import create_model, variant_data_args
from ..models.pretrained import init_from
from ..ops.selective_scan import resolve_impl
from ..optim import build_optimizer, build_scheduler, freeze
from ..parallel import clip_grad_norm, grad_sync, is_sharded, parallelize
from ..precision import AMP_NAMES, amp_dtype, autocast, set_determinism
from ..preemption import StopSignals
from ..preflight import check_train
from ..watchdog import Heartbeat, Watchdog, peer_failures
from .ema import EMA
from .evaluate import evaluate
from .loss import Loss


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        # Everything that can be wrong with the request fails here, before any expensive work.
        request = check_train(cfg, env_world_size())
        self.accum, self.data_cfg, self.aug_cfg, self.classes = (request.accumulation, request.data, request.aug,
                                                                 request.classes)
        self.dist: DistInfo = init_distributed(cfg.device, cfg.dist.timeout_s, cfg.checkpoint.timeout_s)
        self.run_dir = Path(cfg.run_dir)
        # Rank 0's lines from here on go to train.log too, the line that ends the run included.
        self.log = RunLog(self.run_dir / "train.log" if self.dist.is_main else None)
        self.heartbeat = Heartbeat()
        self.watchdog = Watchdog(self.heartbeat, self.run_dir / "watchdog" / f"rank{self.dist.rank}.log",
                                 self.dist.rank, cfg.dist.watchdog_s)
        self.watchdog.start()
        with self.failures():
            self.build()

    def failures(self):
        """What ends the run goes into train.log; a peer lost in a collective ends it with one line (exit 75)."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.log.failures())
        stack.enter_context(peer_failures(self.heartbeat, self.dist.rank, self.cfg.dist.timeout_s,
                                          lambda: fmt.latest(self.run_dir)))
        return stack

    # ------------------------------------------------------------------------------------------------- build
    def build(self):
        cfg = self.cfg
        self.stops = StopSignals(self.dist.device, self.dist.is_main, log=self.log, group=self.dist.save_group)
        self.stopping = None
        self.dtype = amp_dtype(cfg.amp, self.dist.device)
        set_determinism(cfg.deterministic, self.dist.device)
        # The scan this run computes with, fixed once here (auto depends on the device and on what is installed).
        self.scan = resolve_impl(cfg.model.scan_impl, self.dist.device, deterministic=cfg.deterministic)
        if self.dist.is_main:
            rundir.start(self.run_dir, cfg, self.log, self.dist.world_size)
            class_files.write(self.classes, self.run_dir / "classes.json")
            recipe.announce(cfg, self.run_dir, out=self.log, world_size=self.dist.world_size,
                            accumulation=self.accum, amp=AMP_NAMES[self.dtype], device=str(self.dist.device),
                            scan=self.scan)
        self.state = TrainState()
        self.live = self.dist.is_main and cfg.progress and sys.stdout.isatty()  # progress bars, else log lines
        rng.seed_all(cfg.seed)  # the same initial weights on every rank
        self.model = self.build_model()
        # Then every rank draws its own augmentation and DropPath (timm's random_seed(seed, rank), as the official
        # code): one Mixup lambda per rank, not one for the whole global batch. The data order does not depend on
        # these generators: it is a function of (seed, epoch) alone (data/order.py).
        rng.seed_all(cfg.seed + self.dist.rank)
        self.build_data()
        self.ema = EMA(self.model, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.enabled else None
        # FSDP2 shards only contiguous parameters: there channels_last stays on the activations (the convolutions
        # follow their input's layout).
        fmt = torch.channels_last if cfg.channels_last and cfg.dist.kind != "fsdp" else torch.contiguous_format
        for module in self.weight_modules().values():
            module.to(self.dist.device, memory_format=fmt)
        self.model, self.wrapped = parallelize(self.model, self.ema.module if self.ema else None, cfg.dist,
                                               self.dist, self.dtype)
        self.train_model = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        self.optimizer = build_optimizer(cfg.optim, self.model)
        self.steps_per_epoch = len(self.train_loader) // self.accum
        if self.steps_per_epoch == 0:  # preflight counted the images; a loader may still keep fewer (unreadable)
            raise TrainingError(f"one optimizer step needs {cfg.batch_size} images per epoch but this rank has "
                                f"{len(self.train_loader) * cfg.micro_batch_size}; lower batch_size")
        self.total_epochs = cfg.epochs + cfg.sched.cooldown_epochs
        self.scheduler = build_scheduler(cfg.sched, self.optimizer, cfg.epochs, self.steps_per_epoch)
        self.warn_if_the_ema_cannot_follow(self.total_epochs * self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.dist.device.type, enabled=self.dtype == torch.float16)
        self.loss = Loss(cfg.aug, cfg.mesa, cfg.epochs, teacher=self.ema.module if self.ema else None)
        self.checkpointer = self.build_checkpointer()
        self.heartbeat.at("resume (all ranks agree on the checkpoint)")
        resumed = self.checkpointer.resume(self.dist.world_size)
        if resumed:
            st = self.state
            self.log(f"resumed from {resumed}: epoch {st.epoch}, step {st.step}/{self.steps_per_epoch}, "
                     f"global step {st.global_step}")
        logger = MetricsLogger(self.run_dir, cfg.logger, self.dist.is_main,
                               OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
                               run_id=self.state.wandb_id, name=cfg.run_name, log=self.log)
        self.state.wandb_id = logger.run_id
        total = self.total_epochs * self.steps_per_epoch
        self.meter = Throughput(cfg.batch_size, min(total, cfg.max_steps or total), self.state.global_step)
        self.metrics = RunMetrics(self.run_dir, logger, self.meter, self.log, self.dist.is_main, self.live)

    def warn_if_the_ema_cannot_follow(self, steps: int):
        """An EMA that averages over many more updates than the run has stays near the initial weights, and it is
        the EMA that picks best.pth.tar and that eval.py evaluates: one line says so before the run spends its time."""
        ema = self.cfg.ema
        if self.dist.is_main and ema.enabled and not ema.warmup and 1 / (1 - ema.decay) > steps:
            self.log(f"warning: ema.decay={ema.decay:g} averages the last ~{1 / (1 - ema.decay):.0f} optimizer steps "
                     f"but this run has {steps}: the EMA weights (which select best.pth.tar and which eval.py "
                     f"evaluates) would stay close to the initial ones; set ema.warmup=true or "
                     f"ema.decay={max(0.0, 1 - 10 / steps):.3g}")

    def build_model(self):
        m = self.cfg.model
        model = create_model(m, self.cfg.data.num_classes, drop_path_rate=m.drop_path_rate, scan_impl=self.scan)
        if self.cfg.init_from:  # before the EMA copy: it starts from these weights too
            try:
                loaded = init_from(model, self.cfg.init_from, str(self.cfg.init_head))
            except CheckpointError as e:
                raise TrainingError(f"init_from: {e}") from None
            self.log(loaded)
        freeze(model, str(self.cfg.model.freeze))
        if self.cfg.model.grad_checkpointing:
            model.set_grad_checkpointing(True)
        return model

    def build_data(self):
        cfg, data, aug = self.cfg, self.data_cfg, self.aug_cfg
        view = variant_data_args(self.model, cfg.model)
        common = dict(res=view["res"], mean=view["mean"], std=view["std"], seed=cfg.seed,
                      shard=Shard(self.dist.rank, self.dist.world_size), device=self.dist.device, classes=self.classes)
        self.train_loader, self.train_aug = build_loader(data, aug, train=True, batch_size=cfg.micro_batch_size,
                                                         **common)
        self.val_loader, self.val_aug = build_loader(data, aug, train=False,
                                                     batch_size=cfg.eval_batch_size or cfg.micro_batch_size,
                                                     **{**view, **common})

    def autocast(self):
        return autocast(self.dist.device, self.dtype)

    def build_checkpointer(self) -> Checkpointer:
        """What a checkpoint holds besides the weights and the optimizer, registered once (checkpoint/format.py
        names the keys)."""
        cfg = self.cfg
        store = RunCheckpoints(self.run_dir, self.model, self.ema, self.optimizer, self.dist.is_main,
                               sharded=is_sharded(self.model), device=self.dist.device,
                               keep_last_n=cfg.checkpoint.keep_last_n, group=self.dist.save_group,
                               export={fmt.CLASSES: self.classes, fmt.ARCH: cfg.model.name,
                                       fmt.IMG_SIZE: cfg.model.img_size})
        checkpointer = Checkpointer(cfg, store, self.weight_modules, self.dist.device, self.log)
        checkpointer.register(fmt.STATE, self.state)
        schedule = Schedule(self.scheduler, self.optimizer, changes_allowed=lambda: checkpointer.changes_allowed)
        checkpointer.register(fmt.SCHEDULER, schedule)
        checkpointer.register(fmt.SCALER, Scaler(self.scaler, self.log))
        checkpointer.register(fmt.RNG, RankGenerators(self.dist))
        checkpointer.register(fmt.BN_STATS, RankBatchNorm(self.dist, self.weight_modules))
        checkpointer.write_also(**{fmt.CLASSES: self.classes, fmt.WORLD_SIZE: self.dist.world_size,
                                   fmt.CONFIG: OmegaConf.to_yaml(cfg, resolve=True)})
        return checkpointer

    def weight_modules(self) -> dict:
        """What holds the run's weights and BatchNorm statistics: the model and, if on, its EMA."""
        return {"model": self.model, **({"ema": self.ema.module} if self.ema else {})}

    def save(self, best: bool = False, tag: str | None = None):
        self.heartbeat.at(f"the checkpoint after global step {self.state.global_step} (the other ranks wait for "
                          f"rank 0 up to checkpoint.timeout_s={self.cfg.checkpoint.timeout_s:g})")
        self.checkpointer.save(self.state.global_step, best=best, tag=tag)

    # ------------------------------------------------------------------------------------------------ steps
    def train_step(self, batches) -> dict:
        """One optimizer step over ``accumulation`` micro-batches pulled from the iterator ``batches``.

        Each micro-batch is augmented (copied off the loader's buffer) before the next is requested: FFCV reuses its
        output buffers, so holding a batch while asking for another would let the loader overwrite it."""
        cfg = self.cfg
        losses = []
        for i in range(self.accum):
            t0 = time.perf_counter()
            images, labels = next(batches)
            self.meter.waited(time.perf_counter() - t0)
            x, y = self.train_aug(images, labels)
            with grad_sync(self.wrapped, i == self.accum - 1):
                with self.autocast():
                    loss = self.loss(self.train_model(x), y, x)
                self.scaler.scale(loss / self.accum).backward()
            losses.append(loss.detach().float())
        losses = torch.stack(losses)
        self.scaler.unscale_(self.optimizer)
        norm = clip_grad_norm(self.model.parameters(), cfg.clip_grad)
        # One verdict for every rank, in one all-reduce: a rank that skipped alone would leave the others stepping on
        # the NaN it all-reduced into their gradients, one that stopped alone would leave them waiting in a
        # collective; the same reduction carries the strongest stop signal any rank has received. With fp16 an inf
        # gradient is routine: the GradScaler skips that step and lowers its scale.
        flags = torch.stack([~torch.isfinite(losses).all(), ~torch.isfinite(norm) & (not self.scaler.is_enabled())])
        stop = flags.new_full((1,), self.stops.received, dtype=torch.int32)  # a fill on the device, not a copy
        verdict = all_reduce_max(torch.cat([flags.int(), stop]))
        # The step's one wait for the device: everything the host needs from it, in one copy.
        bad_loss, bad_grad, stop, loss, grad_norm = torch.cat([verdict.float(), losses.mean()[None],
                                                               norm.float()[None]]).tolist()
        out = {"loss": loss, "grad_norm": grad_norm, "stop": self.stops.signal(int(stop))}
        if bad_loss or bad_grad:
            return {**out, **self.non_finite(losses, grad_norm, "loss" if bad_loss else "gradient")}
        self.scaler.step(self.optimizer)  # fp16: the scaler reads its inf verdict here (one more wait)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema:
            self.ema.update(self.model, self.state.global_step + 1)
        return out

    def non_finite(self, losses, grad_norm, what: str) -> dict:
        """Every rank gets here at the same step: skip it together, or stop together before any update."""
        st = self.state
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.update()  # closes the unscale_ above (and lowers the fp16 scale if it overflowed)
        where = f"epoch {st.epoch}, step {st.step} (global step {st.global_step + 1})"
        if self.cfg.nan_policy == "skip":
            st.skipped_steps += 1
            self.log(f"warning: non-finite {what} on some rank at {where}: step skipped on every rank "
                     f"({st.skipped_steps} so far)")
            return {"loss": float("nan"), "grad_norm": float("nan"), "skipped": st.skipped_steps}
        last = fmt.latest(self.run_dir)
        raise TrainingError(f"non-finite {what} (this rank: loss {losses.tolist()}, grad norm {grad_norm}) at {where}"
                            f"; no update was applied. Last good checkpoint: {last or 'none yet'} (rerun to resume "
                            f"from it; nan_policy=skip skips such steps; try amp=bf16 or a lower optim.lr)")

    def train_epoch(self):
        cfg, st = self.cfg, self.state
        self.train_model.train()
        self.train_loader.set_epoch(st.epoch, start_batch=st.step * self.accum)
        batches = iter(self.train_loader)
        self.loss.start_epoch(st.epoch)
        # A bar on a terminal; where nobody watches one (SLURM, nohup, a pipe) the periodic lines below instead.
        bar = tqdm(total=self.steps_per_epoch, initial=st.step, desc=f"epoch {st.epoch}", unit="step",
                   disable=not self.live, dynamic_ncols=True, leave=False)
        self.meter.start_epoch()
        while st.step < self.steps_per_epoch:
            self.scheduler.step_update(st.global_step + 1)  # the official schedule: lr of update k is sched(k)
            self.heartbeat.at(f"global step {st.global_step + 1} (epoch {st.epoch}; its forward, backward, gradient "
                              f"all-reduce and verdict all-reduce)")
            out = self.train_step(batches)
            st.step += 1
            st.global_step += 1
            self.heartbeat.step_finished(st.global_step)
            self.meter.step()
            if math.isfinite(out["loss"]):
                st.epoch_loss_sum += out["loss"]
                st.epoch_loss_steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.3f}")
            if st.global_step % cfg.log_every == 0 or st.step == self.steps_per_epoch:
                self.log_train(out)
            due, tag = self.checkpointer.due(st.global_step, epoch_done=st.step == self.steps_per_epoch)
            if due:
                self.save(tag=tag)
            self.stopping = out["stop"]  # decided by every rank in the step's verdict
            if self.stopping or (cfg.max_steps and st.global_step >= cfg.max_steps):
                break
        bar.close()

    def log_train(self, out: dict):
        self.metrics.train_line(self.state, out, self.optimizer.param_groups[0]["lr"], self.steps_per_epoch)

    def validate(self) -> dict:
        self.heartbeat.at(f"validation after epoch {self.state.epoch} (its all-reduces)")
        progress = (lambda it: tqdm(it, desc="val", leave=False, disable=not self.live))
        reduce_bn_stats(self.model)
        out = {f"val/{k}": v for k, v in evaluate(self.model, self.val_loader, self.val_aug, self.autocast,
                                                  progress).items() if k != "count"}
        if self.ema:
            reduce_bn_stats(self.ema.module)
            out.update({f"val_ema/{k}": v for k, v in evaluate(self.ema.module, self.val_loader, self.val_aug,
                                                                self.autocast, progress).items() if k != "count"})
        return out

    # ------------------------------------------------------------------------------------------------- loop
    def fit(self) -> dict:
        try:
            with self.failures():
                return self.loop()
        finally:
            self.watchdog.stop()

    def loop(self) -> dict:
        cfg, st = self.cfg, self.state
        t_start, images, val = time.perf_counter(), 0, {}
        while st.epoch < self.total_epochs and not (cfg.max_steps and st.global_step >= cfg.max_steps):
            steps_before = st.global_step
            self.train_epoch()
            images += (st.global_step - steps_before) * cfg.batch_size
            if st.step < self.steps_per_epoch:  # stopped by max_steps or a signal inside the epoch
                self.save()
                break
            speed = self.meter.epoch_report()
            val = self.validate()
            top1 = val["val_ema/top1" if self.ema else "val/top1"]  # the official code selects by the EMA
            best = top1 > st.best_top1
            if best:
                st.best_top1, st.best_epoch = top1, st.epoch
            self.metrics.epoch_end(st, val, self.optimizer.param_groups[0]["lr"], speed)
            st.epoch, st.step, st.epoch_loss_sum, st.epoch_loss_steps = st.epoch + 1, 0, 0.0, 0
            self.save(best=best)
            self.stopping = self.stopping or self.stops.requested()
            if self.stopping:
                break
        summary = self.metrics.finish(st, val, images, time.perf_counter() - t_start)
        if self.stopping:
            self.heartbeat.at(f"the stop after global step {st.global_step} (every rank waits for rank 0's requeue)")
            raise self.stops.finish(self.stopping)  # every rank waits there until the checkpoint and requeue are done
        return summary
