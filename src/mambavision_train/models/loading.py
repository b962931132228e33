"""A ready model from what a user names, for the commands that use one trained model (predict, export): SOURCE is a
run directory, a weights file or a model name, resolved as ``init_from=`` resolves weights (``read_weights``).

- A run directory: the model as the run trained it (its config.yaml: variant, resolution, classes), its EMA weights.
- A weights file: one of our checkpoints (its own config, or that of the run whose checkpoints/ holds it), one of
  our exported EMA files (they name their variant and resolution), or an official file whose ``arch`` is one of the
  official variants; any other file does not say which variant it holds, so it is given as ``NAME --weights FILE``.
- A model name: that variant with ``--weights`` (a file or a Hugging Face repo), else its official weights or, for a
  command that only needs the graph (export), a random initialisation.
The class count follows the weights' classifier (a fine-tuned model keeps its classes); the class map is the one the
weights carry (None for official files)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn
from omegaconf import OmegaConf

from .build import eval_view
from .mambavision import ARCHS
from ..checkpoint import format as fmt
from ..errors import CheckpointError
from .pretrained import is_training_checkpoint, load_pretrained, read_checkpoint, read_weights

# The official package's model names (the 'arch' its checkpoints record) to ours.
OFFICIAL_ARCH = {"mamba_vision_T": "mambavision_t", "mamba_vision_T2": "mambavision_t2",
                 "mamba_vision_S": "mambavision_s", "mamba_vision_B": "mambavision_b",
                 "mamba_vision_L": "mambavision_l", "mamba_vision_L2": "mambavision_l2"}


@dataclass
class Source:
    model: nn.Module  # eval mode
    name: str  # the variant
    weights: str  # where the weights came from, in words
    preprocessing: dict  # the eval transform: res, crop_pct, crop_mode, interpolation, mean, std
    classes: list | None  # the class map the weights carry


def is_model_name(name: str) -> bool:
    return name.partition(".")[0] in ARCHS  # a pretrained tag (mambavision_b.in21k_ft_in1k) changes no weight


def _described(kind: str, weights) -> str:
    return f"{'EMA weights' if kind == 'EMA' else 'weights'} of {weights}"


def _loaded(name: str, img_size, weights, scan_impl, described_as) -> tuple[nn.Module, list | None, str]:
    """The variant ``name`` at ``img_size``, with the class count of ``weights`` and loaded from them."""
    from .. import models  # noqa: F401  (the variants, registered)
    import timm
    build = lambda **kw: timm.create_model(name, **{k: v for k, v in dict(scan_impl=scan_impl, img_size=img_size,
                                                                          **kw).items() if v is not None})
    model = build()
    found = read_weights(weights, model)
    head = found.state_dict.get("head.weight")
    if head is not None and head.shape[0] != model.num_classes:
        model = build(num_classes=head.shape[0])
    load_pretrained(model, found.state_dict)
    return model, found.classes, _described(found.kind, described_as)


def _run_config(run: Path):
    """The config a run directory was trained with (its latest start's), or None."""
    return OmegaConf.load(run / "config.yaml") if (run / "config.yaml").is_file() else None


def _from_path(path: Path, scan_impl) -> Source:
    if path.is_dir():
        if not fmt.directory(path).is_dir():
            raise CheckpointError(f"{path} is a directory but not a run directory (no checkpoints/ in it)")
        cfg, weights = _run_config(path), path
        if cfg is None:
            raise CheckpointError(f"{path} has no config.yaml: it is not a run directory of train.py")
        arch = {"name": cfg.model.name, "img_size": cfg.model.get("img_size")}
    else:
        weights = read_checkpoint(path)  # read once: the variant and the weights both come from it
        own = weights.get(fmt.CONFIG) if is_training_checkpoint(weights) else None
        cfg = OmegaConf.create(own) if isinstance(own, str) else None
        if cfg is None and path.parent.name == "checkpoints":
            cfg = _run_config(path.parent.parent)
        if cfg is not None:
            arch = {"name": cfg.model.name, "img_size": cfg.model.get("img_size")}
        elif isinstance(weights.get(fmt.ARCH), str):  # our exported EMA files
            arch = {"name": weights[fmt.ARCH], "img_size": weights.get(fmt.IMG_SIZE)}
        elif OFFICIAL_ARCH.get(weights.get("arch")):
            arch = {"name": OFFICIAL_ARCH[weights["arch"]], "img_size": None}
        else:
            raise CheckpointError(f"{path} holds weights but does not say which model they belong to: name it, "
                                  f"e.g. mambavision_t --weights {path}")
    model, classes, described = _loaded(arch["name"], arch["img_size"], weights, scan_impl, path)
    return Source(model.eval(), arch["name"], described, _view(model, arch["img_size"]), classes)


def _view(model, img_size) -> dict:
    return eval_view(model, img_size)


def load_source(source: str, weights: str | None = None, *, official_weights: bool = True,
                scan_impl: str | None = None) -> Source:
    """The model SOURCE names, with its weights, in eval mode; CheckpointError (one line) for what cannot be.
    ``official_weights``: a bare model name takes its official weights (else a random initialisation)."""
    path = Path(source).expanduser()
    if path.exists():
        if weights is not None:
            raise CheckpointError(f"--weights goes with a model name; {source} already holds weights (name the model "
                                  f"they belong to: MODEL --weights {weights})")
        return _from_path(path, scan_impl)
    if not is_model_name(source):
        if "/" in source or Path(source).suffix:
            raise CheckpointError(f"not found: {source} (a run directory or weights file; or a model name: "
                                  f"python -m mambavision_train.models lists them)")
        raise CheckpointError(f"unknown model {source!r}; choose one of: {', '.join(ARCHS)} (or give a run directory "
                              "or a weights file)")
    name = source.partition(".")[0]
    if weights is None and not official_weights:
        import timm
        model = timm.create_model(name, **({"scan_impl": scan_impl} if scan_impl else {}))
        return Source(model.eval(), name, "random init (no --weights)", _view(model, None), None)
    import timm
    where = weights or timm.models.get_pretrained_cfg(source).hf_hub_id
    model, classes, described = _loaded(name, None, where, scan_impl, where)
    return Source(model.eval(), name, described, _view(model, None), classes)
