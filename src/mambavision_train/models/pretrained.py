"""Loading MambaVision weights: official ``.pth.tar`` files, plain state dicts, ``model.safetensors`` and
Hugging Face repos, without ever executing code from the file.

A thin layer over timm: its ``clean_state_dict`` strips the DDP / torch.compile prefixes and its hub helper downloads.
What is ours: which weights a checkpoint holds (official, ours, EMA or not), the file layout of the official
nvidia/MambaVision-* repos, one-line mismatch messages, and refusing what must not be loaded (sharded checkpoints,
files that need code to unpickle)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
from timm.models import clean_state_dict

from ..checkpoint import format as fmt
from ..checkpoint.format import is_training_checkpoint
from .. import hub
from ..errors import CheckpointError

# What an official (timm CheckpointSaver) checkpoint pickles besides tensors and builtins: the argparse
# namespace of the training run under 'args'. Nothing else is allowed to be unpickled.
SAFE_GLOBALS = [argparse.Namespace]
# Wrappers that prefix every parameter name, beyond the DDP / torch.compile ones timm's clean_state_dict strips:
# the transformers/HF wrapper, detection and segmentation backbones.
WRAPPER_PREFIXES = ("model.", "backbone.", "encoder.")


def read_checkpoint(path: str | os.PathLike) -> Mapping:
    """Read a ``.pth``/``.pth.tar``/``.pt`` or ``.safetensors`` file into a dict, safely."""
    path = Path(path)
    if (path / ".metadata").is_file():
        raise CheckpointError(f"{path} is a sharded (FSDP2) checkpoint: use the run's exported checkpoints/ema_last.pth "
                              f"or convert it: python -m torch.distributed.checkpoint.format_utils dcp_to_torch "
                              f"{path} full.pt")
    if path.name.endswith(".index.json"):
        raise CheckpointError(f"{path} is the index of a sharded checkpoint: give one consolidated weights file "
                              "(MambaVision fits in one)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    # Our own torch.load rather than timm.models.load_state_dict: that returns only the weights it picks (it knows
    # neither our training checkpoints' 'ema' nor whether a file is one of ours), and the timm releases we accept
    # differ on safety: 1.0.15 defaults to weights_only=False and has no allowlist for the official files'
    # argparse.Namespace (its safe loader came later, as a private function). So weights_only=True is said here.
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for forbidden globals, others for corrupt files
        raise CheckpointError(f"refusing to load {path}: it is not a plain weights file that loads with "
                              f"weights_only=True ({str(e).splitlines()[0]})") from None


def _pick_weights(ckpt: Mapping, ema: bool | None) -> Mapping:
    """The model weights inside a training checkpoint (or the checkpoint itself when it is a state dict). timm's
    load_state_dict has the same keys but one rule (EMA if present); ours are: official and timm (state_dict,
    state_dict_ema), ours (model, ema), and the caller says whether EMA is required, refused or a fallback."""
    ema_keys = [k for k in ("state_dict_ema", "model_ema", "ema") if isinstance(ckpt.get(k), Mapping)]
    plain_keys = [k for k in ("state_dict", "model") if isinstance(ckpt.get(k), Mapping)]
    if ema:
        if not ema_keys:
            raise CheckpointError(f"EMA weights requested but the checkpoint has none (top-level keys: {sorted(ckpt)[:10]})")
        return ckpt[ema_keys[0]]
    if plain_keys:
        return ckpt[plain_keys[0]]
    if ema is None and ema_keys:
        return ckpt[ema_keys[0]]
    return ckpt


def _strip_prefix(state_dict: Mapping, expected: set[str]) -> dict:
    """timm's clean_state_dict (DDP, torch.compile), then a wrapper prefix shared by all keys as long as no key
    matches the model's yet (wrappers nest: model.module.x)."""
    sd = clean_state_dict(dict(state_dict))
    while sd and not set(sd) & expected:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in sd)), None)
        if prefix is None:
            break
        sd = clean_state_dict({k[len(prefix):]: v for k, v in sd.items()})
    return sd


def extract_state_dict(ckpt: Mapping, model: nn.Module, ema: bool | None = False) -> dict:
    """The model's weights from any supported checkpoint dict, keys matched to ``model``."""
    sd = _pick_weights(ckpt, ema)
    return _strip_prefix(sd, set(model.state_dict()))


def _describe_mismatch(model: nn.Module, sd: Mapping) -> str | None:
    own = model.state_dict()
    # BatchNorm fills in a missing num_batches_tracked (timm's FrozenBatchNorm2d, used by model.freeze, has none).
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in sd and hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        return None

    def few(items):
        return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")

    parts = [f"missing {len(missing)}: {few(missing)}" if missing else "",
             f"unexpected {len(unexpected)}: {few(unexpected)}" if unexpected else "",
             f"wrong shape {len(shapes)}: {few(shapes)}" if shapes else ""]
    return "; ".join(p for p in parts if p)


def resolve_source(source: str | os.PathLike, filename: str | None = None) -> Path:
    """A local file, or a Hugging Face repo id (``nvidia/MambaVision-T-1K``, ``hf-hub:...``, ``...@revision``)
    downloaded to the cache with timm's hub helper."""
    src = str(source)
    if Path(src).expanduser().exists():
        return Path(src).expanduser()
    repo_id = hub.repo_id(src)
    if repo_id is None:
        raise CheckpointError(f"checkpoint not found: {src} (give a file path or a Hugging Face repo id like "
                              "nvidia/MambaVision-T-1K)")
    from timm.models._hub import download_from_hf, hf_split
    filename = filename or _known_filename(hf_split(repo_id)[0])
    try:
        if filename is None:
            filename = _weights_file(*hf_split(repo_id))
        return Path(download_from_hf(repo_id, filename))
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"could not get {filename or 'weights'} from Hugging Face repo {repo_id}: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                              "(offline? download it once, or pass a local file)") from None


def _known_filename(repo_id: str) -> str | None:
    """The weights file of an official repo: each holds one ``.pth.tar`` named after the model, not the
    ``model.safetensors`` / ``pytorch_model.bin`` timm's hub loader looks for. Read from timm's registry of
    pretrained configs (as timm's own loader reads what it is handed), so this module never imports a model file."""
    from timm.models import get_pretrained_cfg, list_pretrained
    for name in list_pretrained("mambavision*"):
        cfg = get_pretrained_cfg(name)
        if cfg is not None and cfg.hf_hub_id == repo_id:
            return cfg.hf_hub_filename
    return None


def _weights_file(repo_id: str, revision: str | None) -> str:
    """Another repo's weights: its first ``.pth.tar``, else its first ``.safetensors``."""
    from huggingface_hub import list_repo_files
    files = list_repo_files(repo_id, revision=revision)
    found = next((f for f in files if f.endswith(".pth.tar")), None) or next(
        (f for f in files if f.endswith(".safetensors")), None)
    if found is None:
        raise CheckpointError(f"no .pth.tar or .safetensors file in Hugging Face repo {repo_id}")
    return found


def load_pretrained(model: nn.Module, source: str | os.PathLike | Mapping, *, ema: bool | None = False,
                    strict: bool = True, filename: str | None = None, new_classifier: bool = False) -> nn.Module:
    """Load weights into ``model`` from a file path, a Hugging Face repo id, or an in-memory checkpoint dict.

    ema: False (default, as the official loader) takes ``state_dict``; True takes ``state_dict_ema``;
    None prefers plain weights and falls back to EMA ones. strict: every key and shape must match.
    new_classifier: the model's classifier (``head.*``) keeps its fresh initialisation; the rest is as strict.
    """
    ckpt = source if isinstance(source, Mapping) else read_checkpoint(resolve_source(source, filename))
    sd = extract_state_dict(ckpt, model, ema=ema)
    if new_classifier:
        own = model.state_dict()
        sd = {**{k: v for k, v in sd.items() if not k.startswith("head.")},
              **{k: v for k, v in own.items() if k.startswith("head.")}}
    problem = _describe_mismatch(model, sd)
    if problem and strict:
        raise CheckpointError(f"checkpoint does not match {type(model).__name__}: {problem}")
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in sd.items() if k in own and tuple(v.shape) == tuple(own[k].shape)},
                          strict=False)
    return model


class Weights(NamedTuple):
    state_dict: dict
    kind: str  # "EMA" or "plain"
    classes: list | None  # the class map they were trained with (ours), None when the file has none (official)


def read_weights(source, model: nn.Module, weights: str = "auto") -> Weights:
    """The weights of any source ``load_pretrained`` takes, or of one of our run directories (its ``ema_best.pth``,
    else ``ema_last.pth``), with the class map they carry. weights: auto (EMA for our training checkpoints,
    ``state_dict`` for official files) | ema | plain."""
    # (not str() of an in-memory checkpoint: that would format every tensor in it)
    run = None if isinstance(source, Mapping) else fmt.directory(Path(str(source)).expanduser())
    if run is not None and run.is_dir():
        exported = [run / n for n in (fmt.EMA_BEST, fmt.EMA_LAST) if (run / n).is_file()]
        if not exported:
            raise CheckpointError(f"{run} has no exported EMA weights (ema_best.pth / ema_last.pth) yet")
        ckpt = read_checkpoint(exported[0])
        return Weights(extract_state_dict(ckpt, model), "EMA", _classes(ckpt))
    ckpt = source if isinstance(source, Mapping) else read_checkpoint(resolve_source(source))
    ema = {"ema": True, "plain": False}.get(weights, is_training_checkpoint(ckpt))
    return Weights(extract_state_dict(ckpt, model, ema=ema), "EMA" if ema else "plain", _classes(ckpt))


def _classes(ckpt: Mapping) -> list | None:
    classes = ckpt.get(fmt.CLASSES)
    return list(classes) if isinstance(classes, (list, tuple)) else None


def init_from(model: nn.Module, source, init_head: str = "reset") -> str:
    """Fine-tuning's start: every tensor of ``source`` goes into ``model`` (BatchNorm statistics included), except a
    classifier for another number of classes, which keeps its fresh initialisation (``init_head=reset``) or is an
    error (``keep``). Anything else that does not fit is an error listing it. Returns what was loaded, in words."""
    sd, kind, _ = read_weights(source, model)
    own = model.state_dict()
    head = [k for k in own if k.startswith("head.")]
    other = any(k in sd and tuple(sd[k].shape) != tuple(own[k].shape) for k in head)
    if other and init_head == "keep":
        raise CheckpointError(f"init_head=keep, but {source}'s classifier has {sd['head.weight'].shape[0]} classes and "
                              f"this run has {own['head.weight'].shape[0]} (data.num_classes); use init_head=reset")
    if other:
        sd = {k: v for k, v in sd.items() if k not in head}
    problem = _describe_mismatch(model, {**({k: own[k] for k in head} if other else {}), **sd})
    if problem:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: {problem}")
    model.load_state_dict(sd, strict=not other)
    return f"initialised from {source} ({kind} weights" + (", new classifier)" if other else ")")
