"""Which label is which class: the class folders of an image tree, the class map a dataset carries, and the checks
that keep labels meaning the same thing in training, evaluation and prediction.

A class map is the list of class names in label order (label i is ``classes[i]``). Image folders give it as
torchvision's ImageFolder does (sorted folder names), less hidden folders (``.ipynb_checkpoints`` is not a class),
the same rule as the FFCV converter, which writes it to ``<root>/classes.json``. Training stores it in the run
directory (``classes.json``), in every checkpoint and in the exported EMA weights; evaluation and prediction read it
back, and image folders are labelled by name through it, so a class folder missing from one split cannot shift the
labels of the classes after it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import DataError


def scan_tree(split_dir, class_to_idx: dict | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes and (path, label) pairs in torchvision ImageFolder's order, less hidden folders and files: ImageFolder
    would make ``.ipynb_checkpoints`` a class, and take a checkpoint copy or a macOS ``._x.JPEG`` for an image.
    ``class_to_idx``: label the folders by these names instead (a folder absent here is simply not there)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension, make_dataset
    split_dir = os.path.expanduser(split_dir)  # as make_dataset does, so that the prefix below matches its paths
    classes = folder_classes(split_dir)
    root = len(split_dir)

    def visible_image(path: str) -> bool:
        return has_file_allowed_extension(path, IMG_EXTENSIONS) and os.sep + "." not in path[root:]

    mapping = class_to_idx if class_to_idx is not None else {c: i for i, c in enumerate(classes)}
    return classes, make_dataset(split_dir, mapping, is_valid_file=visible_image, allow_empty=True)


def folder_classes(split_dir) -> list[str]:
    """The class folders of one split, sorted, hidden ones left out."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def few(names, n: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def check_same_classes(train: list[str], val: list[str], train_dir, val_dir):
    """Both splits of a training run hold the same class folders, or one line says which differ."""
    if train != val:
        parts = [f"missing from {val_dir}: {few(set(train) - set(val))}" if set(train) - set(val) else "",
                 f"only in {val_dir}: {few(set(val) - set(train))}" if set(val) - set(train) else ""]
        raise DataError(f"{train_dir} and {val_dir} have different class folders ({'; '.join(p for p in parts if p)})"
                        f": give both splits the same class folders (labels are matched by folder name)")


def check_known(found: list[str], classes: list[str], where):
    """Every class folder of an evaluation split is one the model was trained on."""
    unknown = set(found) - set(classes)
    if unknown:
        raise DataError(f"{where} has class folders the model does not know: {few(unknown)} (its class map has "
                        f"{len(classes)}: {few(classes, 5)}); evaluate on the classes it was trained on")


def beton_classes(root) -> list[str] | None:
    """The class map the converter wrote beside a dataset's .beton files, if there is one."""
    path = Path(root) / "classes.json"
    return json.loads(path.read_text())["classes"] if path.is_file() else None


def write(classes: list[str] | None, path: Path):
    """``classes.json`` as the converter writes it: the names in label order, and each name's label."""
    if classes is not None:
        path.write_text(json.dumps({"classes": list(classes),
                                    "class_to_idx": {c: i for i, c in enumerate(classes)}}, indent=1))
