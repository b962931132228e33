"""A run's metrics.jsonl as per-epoch rows (metrics.csv) and as one figure (curves.png); report.py draws with the
same helpers.

metrics.jsonl is the log of record: one line per logged step (``train/loss`` ...) and one per epoch's end
(``val/top1`` ...). A run resumed from a checkpoint logs again the steps and the epoch it redoes: the last record of a
step or an epoch wins. matplotlib is used through a Figure of its own with the Agg canvas, never pyplot: no
process-wide backend or figure registry, nothing to close, safe beside a training loop.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from . import files

# metrics.csv, like timm's summary.csv: column -> the key of the epoch's record in metrics.jsonl.
CSV_COLUMNS = {
    "epoch": "train/epoch", "train_loss": "train/epoch_loss", "val_loss": "val/loss", "val_top1": "val/top1",
    "val_top5": "val/top5", "val_ema_loss": "val_ema/loss", "val_ema_top1": "val_ema/top1",
    "val_ema_top5": "val_ema/top5", "lr": "train/lr", "img_per_s": "train/epoch_img_per_s",
    "data_wait_frac": "train/epoch_data_wait_frac", "epoch_time_s": "train/epoch_time_s", "step": "step",
    "time": "time",
}
STEP_SERIES = ("train/loss", "train/lr", "train/img_per_s", "train/data_wait_frac")
EPOCH_SERIES = ("val/top1", "val_ema/top1", "val/loss", "val_ema/loss")  # measured at the epoch's end
EPOCH_MEANS = ("train/epoch_loss", "train/epoch_img_per_s", "train/epoch_data_wait_frac")  # over the epoch

# (title, y label, y scale (None: a power of ten in the label), [(series, legend label, style)]): the six small
# multiples of curves.png. What is measured per logged step is noisy: a faint line, the epoch's value over it.
PANELS = (
    ("training loss", "loss", 1, [("train/loss", "logged steps", "step"), ("train/epoch_loss", "epoch mean", "dark")]),
    ("learning rate", "lr", None, [("train/lr", None, "line")]),
    ("validation top-1", "top-1 (%)", 1, [("val/top1", "base", "base"), ("val_ema/top1", "EMA", "ema")]),
    ("validation loss", "loss", 1, [("val/loss", "base", "base"), ("val_ema/loss", "EMA", "ema")]),
    ("throughput", "images / s", 1, [("train/img_per_s", "logged steps", "step"),
                                     ("train/epoch_img_per_s", "epoch", "dark")]),
    ("waiting for data", "% of the time", 100, [("train/data_wait_frac", "logged steps", "step"),
                                                ("train/epoch_data_wait_frac", "epoch", "dark")]),
)
# Okabe-Ito colours: distinguishable with colour blindness and in greyscale print.
STYLES = {"step": dict(color="#9a9a9a", lw=0.7), "dark": dict(color="#222222", lw=1.4, marker="o", ms=2.5),
          "line": dict(color="#0072B2", lw=1.1), "base": dict(color="#0072B2", lw=1.4, marker="o", ms=2.5),
          "ema": dict(color="#D55E00", lw=1.4, marker="s", ms=2.5)}
DPI = 150
CURVES_INCHES = (10.0, 5.4)
# Fixed for curves.png, which is redrawn during training: room for a y label and five-digit ticks on the left of
# each panel and the title above the top row.
CURVES_MARGINS = dict(left=0.055, right=0.99, bottom=0.085, top=0.9, wspace=0.25, hspace=0.25)
CURVES_PX = (int(CURVES_INCHES[0] * DPI), int(CURVES_INCHES[1] * DPI))


def read_records(path: Path) -> list[dict]:
    """Every record of a metrics.jsonl; a last line cut short by a kill is left out."""
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def step_records(records: list[dict]) -> list[dict]:
    return sorted({r["step"]: r for r in records if "train/loss" in r}.values(), key=lambda r: r["step"])


def epoch_records(records: list[dict]) -> list[dict]:
    ends = sorted({r.get("train/epoch", ("step", r["step"])): r for r in records if "val/top1" in r}.values(),
                  key=lambda r: r["step"])
    # Runs logged before epoch records named their epoch: the n-th epoch's end is the n-th one.
    return [r if "train/epoch" in r else {**r, "train/epoch": n} for n, r in enumerate(ends)]


def epoch_rows(records: list[dict]) -> list[dict]:
    """One row per epoch (the columns of CSV_COLUMNS; None where a run does not have the value, e.g. EMA off)."""
    return [{col: r.get(key) for col, key in CSV_COLUMNS.items()} for r in epoch_records(records)]


def series(records: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """What curves.png plots: series -> (x in epochs, y). Steps sit at the fraction of training done when they were
    logged (``train/epochs_done``), validation at the epoch's end (epoch + 1), an epoch's means at its middle."""
    out = {}
    steps, epochs = step_records(records), epoch_records(records)
    for key in STEP_SERIES:
        pts = [(r.get("train/epochs_done", r.get("train/epoch", 0)), r[key]) for r in steps if key in r]
        out[key] = ([x for x, _ in pts], [y for _, y in pts])
    for keys, at in ((EPOCH_SERIES, 1.0), (EPOCH_MEANS, 0.5)):
        for key in keys:
            pts = [(r["train/epoch"] + at, r[key]) for r in epochs if key in r and "train/epoch" in r]
            out[key] = ([x for x, _ in pts], [y for _, y in pts])
    return out


# ---------------------------------------------------------------------------------------------------- drawing
def figure(inches: tuple[float, float], rows: int = 1, cols: int = 1, margins: dict | None = None, **kwargs):
    """A Figure on its own Agg canvas and its axes, styled for print: no top/right frame, small type. ``margins``
    (``Figure.subplots_adjust``'s): fixed ones instead of the constrained layout, which costs half a drawing."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=inches, dpi=DPI, layout=None if margins else "constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, **kwargs)
    if margins:
        fig.subplots_adjust(**margins)
    for ax in axes.flat:
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(labelsize=7, length=3, width=0.6)
        for side in ("left", "bottom"):
            ax.spines[side].set_linewidth(0.6)
    return fig, axes


def label(ax, text: str, ylabel: str):
    ax.set_title(text, fontsize=9, loc="left")
    ax.set_ylabel(ylabel, fontsize=8)


def epoch_axis(ax):
    from matplotlib.ticker import MaxNLocator
    ax.set_xlabel("epoch", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(left=0)


def save(fig, path: Path):
    with files.replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)


def draw(data: dict, path: Path, title: str = ""):
    """curves.png: the six panels of PANELS against epochs, CURVES_PX pixels."""
    fig, axes = figure(CURVES_INCHES, 2, 3, margins=CURVES_MARGINS, sharex=True)
    for ax, (name, ylabel, scale, lines) in zip(axes.flat, PANELS):
        label(ax, name, ylabel)
        drawn = 0
        if scale is None:  # the power of ten goes into the label, not above the axis where the title is
            top = max((abs(y) for key, _, _ in lines for y in data.get(key, ([], []))[1]), default=0)
            power = math.floor(math.log10(top)) if top > 0 else 0
            scale = 10.0 ** -power
            if power:
                label(ax, name, rf"{ylabel} ($\times 10^{{{power}}}$)")
        for key, legend, style in lines:
            xs, ys = data.get(key, ([], []))
            if xs:
                style = STYLES[style] if len(xs) <= 40 else {**STYLES[style], "marker": None}  # dots for few points
                ax.plot(xs, [y * scale for y in ys], label=legend, **style)
                drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, "not logged yet", transform=ax.transAxes, ha="center", va="center", fontsize=8,
                    color="#9a9a9a")
        elif drawn > 1:
            ax.legend(frameon=False, fontsize=7)
    for ax in axes[-1]:
        epoch_axis(ax)
    if title:
        fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    save(fig, path)
