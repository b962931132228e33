"""MambaVision's FSDP2 plan: which modules are units, and in which precision each gathers its parameters.

Every block is a unit (and the rest goes to the root). The stage-3/4 blocks (Mamba mixer or attention, LayerNorm
only) gather their parameters in the AMP dtype and reduce gradients in fp32 through a MixedPrecisionPolicy; the
convolutional stages keep fp32 parameters because BatchNorm's running statistics stay fp32 and the CUDA kernel refuses
low-precision weights next to them (autocast still runs their convolutions in AMP). The Mamba mixers are units of
their own with fp32 parameters: the SSM parameters (A_log, D, the dt bias) enter the scan in fp32, as they do under
DDP with autocast; gathered in bf16 they would be rounded before the mixer's ``.float()`` (autocast still runs the
mixer's projections in the AMP dtype).
"""

from __future__ import annotations

import torch
from torch import nn

from .mambavision import Block, ConvBlock, MambaVisionMixer


def fsdp_units(model: nn.Module, param_dtype: torch.dtype | None, reshard_after_forward: bool = True):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    low = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for module in model.modules():  # inner units first: a unit manages the parameters no inner unit took
        if isinstance(module, MambaVisionMixer):
            fully_shard(module, reshard_after_forward=reshard_after_forward)
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module, mp_policy=low, reshard_after_forward=reshard_after_forward)
        elif isinstance(module, ConvBlock):
            fully_shard(module, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
