"""Where metrics go, on rank 0 only: W&B (online, offline or disabled) and metrics.jsonl in the run directory (the
greppable console lines are the trainer's, through its RunLog). The W&B run id is kept in checkpoints, so a resumed
run continues the same run with larger steps. ``Throughput`` measures what those lines report about speed."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from . import tables


class MetricsLogger:
    def __init__(self, run_dir, cfg, enabled: bool, config: dict, run_id: str | None = None, name: str = "run",
                 log=print):
        """log: where the one line goes when online logging falls back to offline (the run's RunLog)."""
        self.enabled = enabled
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.jsonl = Path(run_dir) / "metrics.jsonl"
        self.wandb = None
        if not enabled:
            return
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        if cfg.mode != "disabled":
            import wandb
            os.environ.setdefault("WANDB_SILENT", "true")
            start = lambda mode: wandb.init(project=cfg.project, entity=cfg.get("entity"), name=name, id=self.run_id,
                                            resume="allow", mode=mode, dir=str(run_dir), config=config,
                                            settings=wandb.Settings(init_timeout=120))
            mode, why = str(cfg.mode), None
            if mode == "online":  # compute nodes often have no route out: find out in seconds, not init_timeout's 120
                why = unreachable(os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url)
            if why is None and mode == "online":
                try:
                    self.wandb = start("online")
                except Exception as e:  # noqa: BLE001  (wandb's errors: CommError, UsageError, AuthenticationError...)
                    why = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            if why is not None:
                log(f"warning: W&B online logging is not possible here ({why}); logging offline instead: upload "
                    f"later with `wandb sync {Path(run_dir) / 'wandb'}/offline-run-*`")
                mode = "offline"
            if self.wandb is None:
                self.wandb = start(mode)

    def log(self, metrics: dict, step: int):
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def summary(self, values: dict):
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def unreachable(url: str, timeout: float = 5.0) -> str | None:
    """Why the W&B server at ``url`` cannot be reached (no route, refused, no name), or None when it answers a TCP
    connection: a check of seconds."""
    import socket
    from urllib.parse import urlparse
    u = urlparse(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((u.hostname, port), timeout=timeout).close()
    except OSError as e:
        return f"{u.hostname}:{port} unreachable: {e.strerror or type(e).__name__}"
    return None


class Throughput:
    """Images per second and the fraction of time spent waiting for data since the last report, and the time left
    for the whole run (not only the epoch) at the pace this process has kept so far, validation included. The same
    over the training part of an epoch (``start_epoch`` .. ``epoch_report``), for metrics.csv."""

    def __init__(self, images_per_step: int, total_steps: int, done_steps: int):
        self.images_per_step, self.total, self.first = images_per_step, total_steps, done_steps
        self.done, self.steps, self.wait = done_steps, 0, 0.0
        self.t0 = self.t_last = time.perf_counter()
        self.start_epoch()

    def start_epoch(self):
        self.epoch_t0, self.epoch_steps, self.epoch_wait = time.perf_counter(), 0, 0.0

    def waited(self, seconds: float):
        self.wait += seconds
        self.epoch_wait += seconds

    def step(self):
        self.steps += 1
        self.done += 1
        self.epoch_steps += 1

    def epoch_report(self) -> dict:
        """This process's part of the epoch (all of it unless the run resumed inside it)."""
        dt = max(time.perf_counter() - self.epoch_t0, 1e-9)
        return {"time_s": dt, "img_per_s": self.images_per_step * self.epoch_steps / dt,
                "data_wait_frac": self.epoch_wait / dt}

    def report(self) -> dict:
        now = time.perf_counter()
        dt = max(now - self.t_last, 1e-9)
        per_step = (now - self.t0) / max(self.done - self.first, 1)
        out = {"img_per_s": self.images_per_step * self.steps / dt, "data_wait_frac": self.wait / dt,
               "eta_s": per_step * max(self.total - self.done, 0)}
        self.t_last, self.steps, self.wait = now, 0, 0.0
        return out


def duration(seconds: float) -> str:
    """1d 02:03:04 / 02:03:04: greppable and sortable."""
    days, rest = divmod(int(seconds), 86400)
    h, rest = divmod(rest, 3600)
    return (f"{days}d " if days else "") + f"{h:02d}:{rest // 60:02d}:{rest % 60:02d}"


CURVES_EVERY = 50  # curves.png is redrawn after at least this many times its last drawing's duration


class RunMetrics:
    """What a run reports, on rank 0: the periodic training line (train.log, and the console where no progress bar
    shows it), each epoch's row of metrics.jsonl (metrics.csv and curves.png are derived from it), and the summary at
    the end. The trainer hands over numbers; the wording and the files are decided here."""

    def __init__(self, run_dir: Path, logger: MetricsLogger, meter: Throughput, log, is_main: bool, live: bool):
        self.run_dir, self.logger, self.meter, self.log, self.is_main, self.live = (run_dir, logger, meter, log,
                                                                                    is_main, live)
        self.summarized_at = None  # the global step metrics.csv was last written at
        self.drawn_at = None  # ... and curves.png
        # When curves.png was last drawn and how long that took; before the first drawing, a second is assumed
        self.drawn_time, self.draw_s = time.monotonic(), 1.0

    def train_line(self, st, out: dict, lr: float, steps_per_epoch: int):
        speed = self.meter.report()
        metrics = {"train/loss": out["loss"], "train/grad_norm": out["grad_norm"], "train/lr": lr,
                   "train/img_per_s": speed["img_per_s"], "train/data_wait_frac": speed["data_wait_frac"],
                   "train/epoch": st.epoch,
                   "train/epochs_done": st.epoch + st.step / steps_per_epoch,  # curves.png's x
                   "train/skipped_steps": st.skipped_steps}
        import torch
        if torch.cuda.is_available():
            metrics["train/gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.logger.log(metrics, st.global_step)
        # On a terminal the bar shows this; train.log gets the line either way.
        self.log(f"train epoch {st.epoch} step {st.step}/{steps_per_epoch} global {st.global_step} "
                 f"loss {out['loss']:.4f} lr {lr:.3e} img/s {speed['img_per_s']:.1f} "
                 f"data {100 * speed['data_wait_frac']:.0f}% eta {duration(speed['eta_s'])}", console=not self.live)

    def epoch_end(self, st, val: dict, lr: float, speed: dict):
        """The epoch's line and its row of metrics.csv (curves.py): what this record holds beyond the line. speed:
        the training part's, measured before validation."""
        val = {**val, "train/epoch_time_s": speed["time_s"]}
        self.log(f"val epoch {st.epoch} " + " ".join(f"{k} {v:.3f}" for k, v in val.items()))
        mean_loss = st.epoch_loss_sum / st.epoch_loss_steps if st.epoch_loss_steps else float("nan")
        self.logger.log({**val, "train/epoch": st.epoch, "train/epoch_loss": mean_loss, "train/lr": lr,
                         "train/epoch_img_per_s": speed["img_per_s"],
                         "train/epoch_data_wait_frac": speed["data_wait_frac"]}, st.global_step)
        self.summarize(st.global_step)

    def summarize(self, global_step: int, final: bool = False):
        """metrics.csv from what metrics.jsonl holds now, and curves.png at the end and wherever it costs little (at
        most once per step each)."""
        from . import rundir
        if not self.is_main:
            return
        if self.summarized_at != global_step:
            rundir.write_csv_from_log(self.run_dir)
            self.summarized_at = global_step
        # matplotlib takes ~0.5 s to draw the figure (a few seconds for a 300-epoch log on a loaded node) while the
        # other ranks wait at the checkpoint: redrawn once the training since the last drawing took CURVES_EVERY
        # times that (under 2% of the run; every epoch of an ImageNet run, at the end only in a demo's).
        due = time.monotonic() - self.drawn_time >= CURVES_EVERY * self.draw_s
        if self.drawn_at != global_step and (final or due):
            t0 = time.monotonic()
            rundir.draw_curves(self.run_dir, self.log)
            self.drawn_at, self.drawn_time, self.draw_s = global_step, time.monotonic(), time.monotonic() - t0

    def finish(self, st, val: dict, images: int, elapsed: float) -> dict:
        """The summary: in W&B, and as a table at the end of train.log. Returns it."""
        self.summarize(st.global_step, final=True)
        summary = {"base_top1": val.get("val/top1"), "ema_top1": val.get("val_ema/top1"),
                   "best_top1": st.best_top1, "best_epoch": st.best_epoch, "img_per_s": images / max(elapsed, 1e-9),
                   "epochs": st.epoch, "global_step": st.global_step, "skipped_steps": st.skipped_steps,
                   "checkpoints": str(self.run_dir / "checkpoints"), "minutes": elapsed / 60}
        self.logger.summary(summary)
        self.log(summary_table(summary))
        self.logger.close()
        return summary


def summary_table(s: dict) -> str:
    fmt = lambda v: "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))
    rows = [("val top-1, base weights", s["base_top1"]), ("val top-1, EMA weights", s["ema_top1"]),
            ("best top-1 (selects best.pth.tar)", s["best_top1"]), ("best epoch", s["best_epoch"]),
            ("train images/s", s["img_per_s"]), ("epochs done", s["epochs"]), ("optimizer steps", s["global_step"]),
            ("skipped steps (non-finite loss)", s["skipped_steps"]), ("wall time, minutes", s["minutes"]),
            ("checkpoints", s["checkpoints"])]
    return "\n" + tables.markdown(["summary", "value"], [(k, fmt(v)) for k, v in rows], aligned=True)
