"""MambaVision as a dense backbone (detection, segmentation): the official module, ``MM_mamba_vision`` in
NVlabs/MambaVision ``object_detection/tools/mamba_vision.py`` (the segmentation copy is the same code), with its
parameter names, so its mmdet/mmseg checkpoints load strictly.

What it computes: for each stage in ``out_indices``, the stage's map *before* its downsample (stage i: dim * 2^i
channels at stride 4 * 2^i), through a norm of its own, ``outnorm{i}``; the classifier's BatchNorm and head are
gone. What the official configs say but the official constructor drops is written here as explicit arguments
(docs/dense.md): ``drop_path_rate`` (0.2 ran, whatever a config says), ``frozen_stages`` and ``norm_eval`` (off).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch.nn as nn
from timm.layers import LayerNorm2d
from timm.models._features import feature_take_indices

from .mambavision import ARCHS, MambaVision
from ..errors import CheckpointError
from .pretrained import _describe_mismatch, read_weights

_log = logging.getLogger(__name__)

# Stage windows of the official dense configs. Padded tokens are not neutral (they enter attention and the scan,
# and LayerNorm maps zeros to its bias), so a window changes the features: these are the ones the official
# COCO / ADE20K models were trained and evaluated with. Detection: one size for the family (at 800 x 1344 stage 3
# is 50 x 84, padded into a single 112 x 112 window). Segmentation (512 px crops, L3 640 px): S differs.
WINDOWS = {"det": {"*": (8, 8, 112, 56)},
           "seg": {"*": (8, 8, 64, 32), "mambavision_s": (8, 8, 160, 56)}}
# What the official det/seg runs used: their configs' drop_path_rate (0.2-0.8) never reaches the model.
OFFICIAL_DROP_PATH = 0.2


def windows_for(name: str, windows) -> list[int]:
    """The stage windows of ``name`` for ``windows``: "det" or "seg" (the official presets), "cls" (the
    classification variant's own), or four sizes."""
    if isinstance(windows, str):
        if windows == "cls":
            return list(ARCHS[name]["window_size"])
        if windows not in WINDOWS:
            raise ValueError(f"windows={windows!r}: use 'det', 'seg', 'cls' or four window sizes")
        return list(WINDOWS[windows].get(name, WINDOWS[windows]["*"]))
    if len(windows) != 4:
        raise ValueError(f"windows={windows!r}: give one window size per stage (four)")
    return [int(w) for w in windows]


def _out_norm(kind: str, channels: int) -> nn.Module:
    if kind == "ln2d":
        return LayerNorm2d(channels, eps=1e-5)  # LayerNorm over the channels of an NCHW map (nn.LayerNorm's eps)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "ln":
        # The official 'ln' is nn.LayerNorm applied to NCHW maps: it normalises over the width and fails unless
        # the width equals the channels. No official config uses it.
        raise ValueError("norm_layer='ln' normalises NCHW maps over their width (official code); use 'ln2d'")
    raise ValueError(f"norm_layer={kind!r}: use 'ln2d' (every official config) or 'bn'")


class MambaVisionDense(MambaVision):
    """The official dense backbone: ``forward(x)`` returns one map per stage in ``out_indices``, each taken before
    its downsample and normalised by ``outnorm{i}``. Every stage is kept (so official checkpoints of any
    ``out_indices`` load); the stages after the deepest output are not run and get no gradient.

    frozen_stages: -1 none (the official runs), 0 the stem, k the stem and stages 1..k (with their downsample and
    output norm): no gradients, and eval mode in training. norm_eval: every BatchNorm in eval mode in training
    (statistics frozen; weights still trained)."""

    def __init__(self, out_indices: Sequence[int] = (0, 1, 2, 3), norm_layer: str = "ln2d", frozen_stages: int = -1,
                 norm_eval: bool = False, **arch):
        arch.pop("num_classes", None)
        super().__init__(num_classes=0, **arch)
        self.norm = nn.Identity()  # the classifier's BatchNorm: not part of the dense backbone
        self.out_indices = tuple(sorted(feature_take_indices(len(self.levels), list(out_indices))[0]))
        for i in self.out_indices:
            self.add_module(f"outnorm{i}", _out_norm(norm_layer, self.feature_info[i]["num_chs"]))
        if not -1 <= frozen_stages <= len(self.levels):
            raise ValueError(f"frozen_stages={frozen_stages}: -1 (none), 0 (stem) ... {len(self.levels)} (all)")
        self.frozen_stages, self.norm_eval = frozen_stages, norm_eval
        for m in self._frozen():
            m.requires_grad_(False)

    def _frozen(self):
        if self.frozen_stages >= 0:
            yield self.patch_embed
        for i in range(self.frozen_stages):
            yield self.levels[i]
            if i in self.out_indices:
                yield getattr(self, f"outnorm{i}")

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            for m in self._frozen():
                m.eval()
            if self.norm_eval:
                for m in self.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def forward(self, x):
        maps = self.forward_intermediates(x, list(self.out_indices), intermediates_only=True)
        return [getattr(self, f"outnorm{i}")(m).contiguous() for i, m in zip(self.out_indices, maps)]


# Where a dense backbone's weights sit inside a whole model's state dict: mmdet/mmseg detectors and segmentors
# ('backbone.'), torchvision detectors over fpn_backbone ('backbone.body.').
_INSIDE = ("backbone.", "body.")
# In ImageNet (classification) weights: keys the dense backbone has not, and keys it has that they lack.
_CLASSIFIER, _NEW = ("norm.", "head."), ("outnorm",)


def _backbone_part(sd: dict, own: set) -> tuple[dict, str]:
    inside = ""
    while sd and not set(sd) & own:
        prefix = next((p for p in _INSIDE if any(k.startswith(p) for k in sd)), None)
        if prefix is None:
            break
        sd, inside = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, inside + prefix
    return sd, inside


def _names(keys) -> str:
    return ", ".join(dict.fromkeys(k.rsplit(".", 1)[0] for k in keys))


def load_dense_weights(model: MambaVisionDense, source) -> str:
    """Load ``source`` into ``model`` and say what was loaded, in one line. Dense weights (an official mmdet/mmseg
    checkpoint, its ``backbone.*``; a torchvision detector over fpn_backbone, its ``backbone.body.*``; a saved
    MambaVisionDense) must match exactly. ImageNet weights (official or ours: a file, a Hugging Face repo, a run
    directory) may differ by exactly what a classifier has and a dense backbone has not: no ``outnorm*`` (they
    keep their identity init), and the classifier's ``norm.*`` / ``head.*`` (left out). Anything else is a
    CheckpointError listing it."""
    own = model.state_dict()
    named = "the state dict given" if isinstance(source, Mapping) else str(source)
    sd, kind, _ = read_weights(source, model)
    sd, inside = _backbone_part(dict(sd), set(own))
    dense = any(k.startswith(_NEW) for k in sd)
    new = [] if dense else [k for k in own if k not in sd and k.startswith(_NEW)]
    classifier = [] if dense else [k for k in sd if k not in own and k.startswith(_CLASSIFIER)]
    sd = {k: v for k, v in sd.items() if k not in classifier}
    problem = _describe_mismatch(model, {**{k: own[k] for k in new}, **sd})
    if problem:
        raise CheckpointError(f"{named} does not fit {type(model).__name__}: {problem}")
    model.load_state_dict(sd, strict=not new)
    what = f"{inside}* of a whole model, " if inside else ""
    if dense:
        return f"loaded {named} ({what}{kind} dense weights): every tensor, strictly"
    return (f"loaded {named} ({what}{kind} ImageNet weights): all but, as expected, the new output norms "
            f"{_names(new)} ({len(new)} tensors, identity init) and the classifier's {_names(classifier) or 'nothing'} "
            f"({len(classifier)} tensors, left out)")


def dense_backbone(name: str, windows="det", weights=None, out_indices: Sequence[int] = (0, 1, 2, 3),
                   norm_layer: str = "ln2d", frozen_stages: int = -1, norm_eval: bool = False,
                   drop_path_rate: float = OFFICIAL_DROP_PATH, **kwargs) -> MambaVisionDense:
    """The official dense backbone of variant ``name`` (``mambavision_t`` ...): ``windows`` "det" / "seg" (the
    official presets, WINDOWS), "cls" or four sizes; ``weights``: ImageNet or dense weights, anything
    load_dense_weights takes (None: random init). Other keyword arguments go to MambaVision (``scan_impl``, ...)."""
    if name not in ARCHS:
        raise ValueError(f"unknown MambaVision variant {name!r}: one of {', '.join(ARCHS)}")
    if not isinstance(weights, (str, Mapping, type(None))) and not hasattr(weights, "__fspath__"):
        raise TypeError(f"weights={weights!r}: a file, a Hugging Face repo id, a run directory or a state dict")
    arch = {"mlp_ratio": 4, **ARCHS[name], "window_size": windows_for(name, windows), "drop_path_rate": drop_path_rate}
    model = MambaVisionDense(out_indices=out_indices, norm_layer=norm_layer, frozen_stages=frozen_stages,
                             norm_eval=norm_eval, **{**arch, **kwargs})
    if weights is not None:
        model.weights_loaded = load_dense_weights(model, weights)
        _log.info(model.weights_loaded)
    return model
