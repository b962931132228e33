"""MambaVision under torchvision's feature pyramid: a backbone for torchvision's FasterRCNN, MaskRCNN, RetinaNet.

torchvision's detectors take any module with an ``out_channels`` attribute that returns an OrderedDict of maps.
Its own ``BackboneWithFPN`` taps a backbone's direct children, which cannot give MambaVision's stage maps (each
stage ends in its downsample), so the body here is the official dense backbone (models/dense.py) and the pyramid
torchvision's ``FeaturePyramidNetwork`` with its max-pool level on top, as in ``resnet_fpn_backbone``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch.nn as nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .dense import MambaVisionDense, dense_backbone


class MambaVisionFPN(nn.Module):
    """``body`` (a MambaVisionDense) then the pyramid: maps '0', '1', ... (one per output stage, stride 4 up for
    the default outputs) and 'pool' (stride 2 x the last), each with ``out_channels`` channels."""

    def __init__(self, body: MambaVisionDense, out_channels: int = 256):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork([body.feature_info[i]["num_chs"] for i in body.out_indices], out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x):
        return self.fpn(OrderedDict((str(k), m) for k, m in enumerate(self.body(x))))


def fpn_backbone(name: str, weights=None, out_channels: int = 256, out_indices: Sequence[int] = (0, 1, 2, 3),
                 windows="det", trainable_stages: int = 5, norm_eval: bool = False, **kwargs) -> MambaVisionFPN:
    """A torchvision detection backbone: ``MaskRCNN(fpn_backbone("mambavision_t", weights=...), num_classes=91)``.

    weights: ImageNet or dense weights, as load_dense_weights takes them (None: random init). windows: "det" (the
    official COCO windows), "seg", "cls" or four sizes. trainable_stages: torchvision's trainable_layers counted over
    the stem and the four stages, from the last: 5 trains everything (the official runs), 3 freezes the stem and
    stage 1, 0 freezes the whole body. norm_eval: the body's BatchNorms in eval mode in training. Other keyword
    arguments go to dense_backbone (drop_path_rate, norm_layer, scan_impl, ...)."""
    if not 0 <= trainable_stages <= 5:
        raise ValueError(f"trainable_stages={trainable_stages}: 0 (the body frozen) ... 5 (stem and 4 stages trained)")
    body = dense_backbone(name, windows=windows, weights=weights, out_indices=out_indices,
                          frozen_stages=4 - trainable_stages, norm_eval=norm_eval, **kwargs)
    return MambaVisionFPN(body, out_channels)
