"""What to export: SOURCE (a model name, a run directory, a weights file) as the model it names, built as it was
trained and loaded with its weights, in eval mode on the PyTorch scan.

The weights are found by ``read_weights``, the resolver ``init_from=`` uses: a run directory gives its EMA weights,
one of our training checkpoints its EMA weights, any other file (or Hugging Face repo) what ``load_pretrained``
takes. The architecture comes from the run's config where there is one (name, resolution, classes); a bare weights
file does not say which variant it is, so the model is then named on the command line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch.nn as nn
from omegaconf import OmegaConf

from ..engine.evaluate import create_model, variant_data_args
from ..models.mambavision import ARCHS
from ..models.pretrained import (CheckpointError, is_training_checkpoint, load_pretrained, read_checkpoint,
                                 read_weights)


class ExportError(RuntimeError):
    """A request the exporter refuses, in one line that says what to do."""


@dataclass
class Source:
    model: nn.Module  # eval mode, PyTorch scan
    name: str  # the variant
    weights: str  # where the weights came from, in words
    preprocessing: dict  # the eval transform: res, crop_pct, crop_mode, interpolation, mean, std


def is_model_name(name: str) -> bool:
    return name.partition(".")[0] in ARCHS  # a pretrained tag (mambavision_b.in21k_ft_in1k) changes no weight


def _described(kind: str, weights) -> str:
    return f"{'EMA weights' if kind == 'EMA' else 'weights'} of {weights}"


def _from_name(name: str, weights: str | None) -> tuple[nn.Module, str]:
    """The variant ``name``, with the class count of ``weights`` (a fine-tuned classifier keeps its classes)."""
    import timm
    model = timm.create_model(name, scan_impl="torch")
    if weights is None:
        return model, "random init (no --weights)"
    sd, kind = read_weights(weights, model)
    head = sd.get("head.weight")
    if head is not None and head.shape[0] != model.num_classes:
        model = timm.create_model(name, scan_impl="torch", num_classes=head.shape[0])
    load_pretrained(model, sd)
    return model, _described(kind, weights)


def _run_config(run: Path):
    """The config a run directory was trained with (its latest start's), or None."""
    return OmegaConf.load(run / "config.yaml") if (run / "config.yaml").is_file() else None


def _from_path(path: Path) -> Source:
    """A run directory or a checkpoint: the model as the run trained it (the checkpoint's own config, else that of
    the run whose checkpoints/ holds the file), with the weights ``init_from`` would take from it."""
    if path.is_dir():
        if not (path / "checkpoints").is_dir():
            raise ExportError(f"{path} is a directory but not a run directory (no checkpoints/ in it)")
        cfg, weights = _run_config(path), path
        if cfg is None:
            raise ExportError(f"{path} has no config.yaml: it is not a run directory of train.py")
    else:
        weights = read_checkpoint(path)
        own = weights.get("config") if is_training_checkpoint(weights) else None
        cfg = OmegaConf.create(own) if isinstance(own, str) else None
        if cfg is None and path.parent.name == "checkpoints":
            cfg = _run_config(path.parent.parent)
        if cfg is None:
            raise ExportError(f"{path} holds weights but does not say which model they belong to: name it, "
                              f"e.g. python -m mambavision_train.export mambavision_t --weights {path}")
    model_cfg = OmegaConf.merge(cfg.model, {"scan_impl": "torch"})
    model = create_model(model_cfg, cfg.data.num_classes)
    sd, kind = read_weights(weights, model)
    load_pretrained(model, sd)
    return Source(model.eval(), cfg.model.name, _described(kind, path), variant_data_args(model, model_cfg))


def load_source(source: str, weights: str | None = None) -> Source:
    """The model to export, with its weights; ExportError / CheckpointError (one line) for what cannot be."""
    path = Path(source).expanduser()
    if path.exists():
        if weights is not None:
            raise ExportError(f"--weights goes with a model name; {source} already holds weights "
                              f"(export the model they belong to: python -m mambavision_train.export MODEL "
                              f"--weights {weights})")
        return _from_path(path)
    if not is_model_name(source):
        if "/" in source or Path(source).suffix:
            raise CheckpointError(f"not found: {source} (a run directory or weights file; or a model name: "
                                  f"python -m mambavision_train.models lists them)")
        raise ExportError(f"unknown model {source!r}; choose one of: {', '.join(ARCHS)} (or give a run directory "
                          "or a weights file)")
    model, described = _from_name(source, weights)
    return Source(model.eval(), source.partition(".")[0], described,
                  variant_data_args(model, SimpleNamespace(img_size=None, crop_pct=None)))
