"""What a run directory holds besides checkpoints and metrics.jsonl, written by rank 0 (docs/training.md, "What a
run leaves behind"):

- ``config.yaml`` and ``overrides.txt``: the resolved config and the command-line overrides of the latest start (each
  checkpoint keeps the config it was written with);
- ``train.log``: every line rank 0 prints, appended across restarts, each start under a header line;
- ``metrics.csv`` and ``curves.png``: rewritten from metrics.jsonl (curves.py), the table at every epoch's end, the
  figure at the end and at epochs' ends where drawing it costs under 5% (metrics.RunMetrics.summarize). Deriving
  them from the log of record, rather than appending, is what keeps one row per epoch when a resumed run repeats
  steps.
"""

from __future__ import annotations

import csv
import socket
import time
from pathlib import Path

from omegaconf import OmegaConf

from . import curves, files
from .log import RunLog


def command_line_overrides() -> list[str]:
    """The overrides train.py was given; none when the config was composed by hand (tests, notebooks)."""
    from hydra.core.hydra_config import HydraConfig
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def start(run_dir: Path, cfg, log: RunLog, world_size: int):
    """Rank 0, once the request is checked: the config files, and a header in train.log that separates restarts."""
    overrides = command_line_overrides()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run_dir / "overrides.txt").write_text("".join(f"{o}\n" for o in overrides))
    log(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}, {world_size} process(es): train.py "
        f"{' '.join(overrides)}".rstrip(), console=False)


def cell(column: str, value) -> str:
    """Six significant digits, enough to read and plot (metrics.jsonl keeps every digit); the time as logged."""
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) and column != "time" else str(value)


def write_csv(rows: list[dict], path: Path):
    with files.replacing(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(curves.CSV_COLUMNS))
        writer.writeheader()
        writer.writerows({k: cell(k, v) for k, v in row.items()} for row in rows)


def write_csv_from_log(run_dir: Path):
    """metrics.csv from metrics.jsonl."""
    write_csv(curves.epoch_rows(curves.read_records(run_dir / "metrics.jsonl")), run_dir / "metrics.csv")


def draw_curves(run_dir: Path, log: RunLog):
    """curves.png from metrics.jsonl. A figure that fails to draw costs a warning, not the run."""
    records = curves.read_records(run_dir / "metrics.jsonl")
    try:
        curves.draw(curves.series(records), run_dir / "curves.png", title=run_dir.name)
    except Exception as e:  # noqa: BLE001  (matplotlib's errors have no common base)
        log(f"warning: curves.png not written: {type(e).__name__}: {e}")
