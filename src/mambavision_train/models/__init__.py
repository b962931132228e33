"""The MambaVision family, registered with timm (``timm.create_model("mambavision_t")``)."""
from .dense import MambaVisionDense, dense_backbone, load_dense_weights
from .flops import count_flops
from .fpn import MambaVisionFPN, fpn_backbone
from .mambavision import MambaVision, MambaVisionMixer, default_cfgs
from .paper import PAPER, is_in21k, paper_row
from ..errors import CheckpointError
from .pretrained import load_pretrained, read_checkpoint

__all__ = ["MambaVision", "MambaVisionMixer", "default_cfgs", "load_pretrained", "read_checkpoint",
           "CheckpointError", "count_flops", "PAPER", "is_in21k", "paper_row", "MambaVisionDense", "dense_backbone",
           "load_dense_weights", "MambaVisionFPN", "fpn_backbone"]
