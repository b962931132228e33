"""mambavision-train: train and evaluate the MambaVision family on ImageNet-1K, with or without CUDA kernels.

Importing the package registers the models with timm: ``timm.create_model("mambavision_t")``; as a backbone for
detection and segmentation: ``dense_backbone`` (the official dense module), ``fpn_backbone`` (torchvision's detectors).
"""
from .models import PAPER, CheckpointError, MambaVision, count_flops, dense_backbone, fpn_backbone, load_pretrained
from .ops import available_impls, selective_scan

__version__ = "0.1.0"
__all__ = ["MambaVision", "load_pretrained", "count_flops", "selective_scan", "available_impls", "PAPER",
           "CheckpointError", "dense_backbone", "fpn_backbone"]
