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
                                 read_weights, resolve_source)


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


def _from_config(cfg, weights) -> tuple[nn.Module, dict, str]:
    """The model a training config describes (its variant, resolution and classes), loaded with ``weights``."""
    model_cfg = OmegaConf.merge(cfg.model, {"scan_impl": "torch"})
    model = create_model(model_cfg, cfg.data.num_classes)
    sd, kind = read_weights(weights, model)
    load_pretrained(model, sd)
    return model, variant_data_args(model, model_cfg), kind


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


def _run_config(path: Path):
    """The config a run directory (or a file in its checkpoints/) was trained with, or None."""
    run = path if path.is_dir() else path.parent.parent if path.parent.name == "checkpoints" else None
    if run is not None and (run / "config.yaml").is_file():
        return OmegaConf.load(run / "config.yaml")
    return None


def load_source(source: str, weights: str | None = None) -> Source:
    """The model to export, with its weights; ExportError / CheckpointError (one line) for what cannot be."""
    path = Path(source).expanduser()
    if path.exists():
        if weights is not None:
            raise ExportError(f"--weights goes with a model name; {source} already holds weights "
                              f"(export the model they belong to: python -m mambavision_train.export MODEL "
                              f"--weights {weights})")
        if path.is_dir() and not (path / "checkpoints").is_dir():
            raise ExportError(f"{source} is a directory but not a run directory (no checkpoints/ in it)")
        cfg = _run_config(path)
        ckpt = None
        if cfg is None and path.is_file():
            ckpt = read_checkpoint(resolve_source(path))
            if is_training_checkpoint(ckpt) and isinstance(ckpt.get("config"), str):
                cfg = OmegaConf.create(ckpt["config"])
        if cfg is None:
            if path.is_dir():
                raise ExportError(f"{source} has no config.yaml: it is not a run directory of train.py")
            raise ExportError(f"{source} holds weights but does not say which model they belong to: name it, "
                              f"e.g. python -m mambavision_train.export mambavision_t --weights {source}")
        model, prep, kind = _from_config(cfg, ckpt if ckpt is not None else path)
        return Source(model.eval(), cfg.model.name, _described(kind, source), prep)
    if not is_model_name(source):
        if "/" in source or Path(source).suffix:
            raise CheckpointError(f"not found: {source} (a run directory or weights file; or a model name: "
                                  f"python -m mambavision_train.models lists them)")
        raise ExportError(f"unknown model {source!r}; choose one of: {', '.join(ARCHS)} (or give a run directory "
                          "or a weights file)")
    model, described = _from_name(source, weights)
    return Source(model.eval(), source.partition(".")[0], described,
                  variant_data_args(model, SimpleNamespace(img_size=None, crop_pct=None)))
