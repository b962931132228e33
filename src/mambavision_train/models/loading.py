"""A ready model from what a user names, for the commands that use one trained model (predict, export):

- one of our run directories: the variant and resolution from its ``config.yaml``, its EMA weights;
- a weights file: ours (training checkpoint or exported EMA file, which name their variant) or an official one
  (``--model`` names the variant; the official files' ``arch`` is read when it is one of ours);
- a registered variant name, with ``weights`` (any file ``load_pretrained`` takes, or a Hugging Face repo id) or
  without (its official weights).
The class count comes from the weights' classifier, the class map from the weights (None for official files).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
import torch

from .pretrained import CheckpointError, Weights, load_pretrained, read_checkpoint, read_weights, resolve_source

# The official package's model names (its timm registry, and the 'arch' its checkpoints record) to ours.
OFFICIAL_ARCH = {"mamba_vision_T": "mambavision_t", "mamba_vision_T2": "mambavision_t2",
                 "mamba_vision_S": "mambavision_s", "mamba_vision_B": "mambavision_b",
                 "mamba_vision_L": "mambavision_l", "mamba_vision_L2": "mambavision_l2"}


@dataclass
class Loaded:
    model: torch.nn.Module  # eval mode, on the CPU
    name: str  # the variant
    classes: list | None
    source: str  # what was loaded, in words


def _run_config(run_dir: Path) -> dict:
    from omegaconf import OmegaConf
    cfg = OmegaConf.load(run_dir / "config.yaml")
    return {"name": cfg.model.name, "img_size": cfg.model.get("img_size")}


def _variant_of(ckpt) -> str | None:
    """The variant a weights file names: ours record it ('model', or the training config), official ones 'arch'."""
    if isinstance(ckpt.get("model"), str):
        return ckpt["model"]
    if isinstance(ckpt.get("config"), str):
        from omegaconf import OmegaConf
        return OmegaConf.create(ckpt["config"]).model.name
    arch = ckpt.get("arch")
    return OFFICIAL_ARCH.get(arch, arch) if isinstance(arch, str) else None


def load_model(source: str, model: str | None = None, weights: str | None = None,
               img_size: int | None = None) -> Loaded:
    """Raises CheckpointError with one line for anything that does not name a model and its weights."""
    known = set(timm.list_models("mambavision*"))
    path = Path(source).expanduser()
    if source in known:
        if model:
            raise CheckpointError(f"{source} is a model name already; --model names the variant of a weights file")
        name, where = source, weights or timm.models.get_pretrained_cfg(source).hf_hub_id
        config, ckpt = {}, None
    elif weights:
        raise CheckpointError(f"--weights goes with a model name (e.g. mambavision_t --weights FILE), not with {source}")
    elif path.is_dir() and (path / "checkpoints").is_dir():
        if not (path / "config.yaml").is_file():
            raise CheckpointError(f"{path} has checkpoints but no config.yaml: give the weights file and --model")
        config, where, ckpt = _run_config(path), str(path), None
        name = model or config["name"]
    elif path.exists() or source.count("/") == 1:
        where = source
        ckpt = read_checkpoint(resolve_source(source))
        name = model or _variant_of(ckpt)
        if name is None:
            raise CheckpointError(f"{source} does not say which variant it holds: add --model NAME "
                                  f"(python -m mambavision_train.models lists them)")
        config = {}
    else:
        raise CheckpointError(f"{source} is neither a model name, a run directory nor a weights file (model names: "
                              f"python -m mambavision_train.models)")
    if name not in known:
        raise CheckpointError(f"{name!r} is not a MambaVision variant (python -m mambavision_train.models lists them)")
    size = img_size or config.get("img_size")
    probe = timm.create_model(name, **({"img_size": size} if size else {}))
    found: Weights = read_weights(where if ckpt is None else ckpt, probe)  # a file read once
    head = found.state_dict.get("head.weight")
    classes = head.shape[0] if head is not None else probe.num_classes
    net = probe if classes == probe.num_classes else timm.create_model(
        name, num_classes=classes, **({"img_size": size} if size else {}))
    load_pretrained(net, found.state_dict)
    return Loaded(net.eval(), name, found.classes, f"{where} ({found.kind} weights, {classes} classes)")
