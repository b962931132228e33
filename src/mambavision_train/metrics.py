"""Where metrics go, on rank 0 only: W&B (online, offline or disabled), metrics.jsonl in the run directory, and
one greppable console line per log. The W&B run id is kept in checkpoints, so a resumed run continues the same run
with larger steps."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir, cfg, enabled: bool, config: dict, run_id: str | None = None, name: str = "run"):
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
            self.wandb = wandb.init(project=cfg.project, entity=cfg.get("entity"), name=name, id=self.run_id,
                                    resume="allow", mode=cfg.mode, dir=str(run_dir), config=config,
                                    settings=wandb.Settings(init_timeout=120))

    def log(self, metrics: dict, step: int, console: str | None = None):
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if console:
            print(console, flush=True)

    def summary(self, values: dict):
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
