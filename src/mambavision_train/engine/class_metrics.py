"""What an evaluation says per class: accuracy of each class, balanced accuracy (their mean, what a skewed validation
set needs), and the confusion matrix, as CSV files and, for up to ``PNG_MAX_CLASSES`` classes, a picture."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from .. import files

PNG_MAX_CLASSES = 50  # beyond that a confusion matrix is a grey square: the CSV holds it


def per_class(confusion: torch.Tensor, names: list[str]) -> list[dict]:
    """One row per class: its images, how many were right, and the accuracy (%; None for a class without images)."""
    images, right = confusion.sum(1), confusion.diagonal()
    return [{"label": i, "class": names[i], "images": int(images[i]), "correct": int(right[i]),
             "accuracy": 100.0 * int(right[i]) / int(images[i]) if images[i] else None}
            for i in range(len(names))]


def balanced_accuracy(rows: list[dict]) -> float:
    """The mean of the per-class accuracies, over the classes that have images (sklearn's balanced_accuracy_score)."""
    accs = [r["accuracy"] for r in rows if r["accuracy"] is not None]
    return sum(accs) / len(accs)


def _atomic_csv(path: Path, header: list, rows: list[list]):
    with files.replacing(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write(confusion: torch.Tensor, names: list[str], out: Path, title: str) -> dict:
    """per_class.csv, confusion.csv (and confusion.png for few classes) in ``out``; returns what was written and the
    balanced accuracy."""
    out.mkdir(parents=True, exist_ok=True)
    rows = per_class(confusion, names)
    _atomic_csv(out / "per_class.csv", ["label", "class", "images", "correct", "accuracy"],
                [[r["label"], r["class"], r["images"], r["correct"], "" if r["accuracy"] is None else
                  f"{r['accuracy']:.4f}"] for r in rows])
    _atomic_csv(out / "confusion.csv", ["true \\ predicted", *names],
                [[names[i], *map(int, confusion[i])] for i in range(len(names))])
    files = ["per_class.csv", "confusion.csv"]
    if len(names) <= PNG_MAX_CLASSES:
        draw(confusion, names, out / "confusion.png", title)
        files.append("confusion.png")
    return {"balanced_top1": balanced_accuracy(rows), "files": [str(out / f) for f in files]}


def draw(confusion: torch.Tensor, names: list[str], path: Path, title: str):
    """Rows normalised to the class's images (recall on the diagonal), counts written in the cells."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    n = len(names)
    share = confusion.double() / confusion.sum(1, keepdim=True).clamp_min(1)
    side = min(14.0, 2.5 + 0.35 * n)
    fig = Figure(figsize=(side, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=90, fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    with files.replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
