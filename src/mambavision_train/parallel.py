"""How the model is spread over the ranks: not at all, DDP, or FSDP2 (with the units and mixed precision the model
chooses, models/parallelize.py). Under FSDP2 the EMA copy is sharded the same way, so each rank averages only its own
shard."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .distributed import DistInfo, convert_sync_batchnorm

def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (a plain tensor is its own shard)."""
    return t.to_local() if hasattr(t, "to_local") else t


def parallelize(model: nn.Module, ema_module: nn.Module | None, cfg, info: DistInfo,
                param_dtype: torch.dtype | None) -> tuple[nn.Module, nn.Module]:
    """Returns (the module whose parameters the optimizer updates, the module the training step calls)."""
    if not info.distributed or cfg.kind == "none":
        return model, model
    if cfg.sync_bn:
        model = convert_sync_batchnorm(model, info.device)
    if cfg.kind == "ddp":
        ids = [info.device.index] if info.device.type == "cuda" else None
        return model, nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from .models.parallelize import fsdp_units  # the model's own plan, beside it (torchtitan's parallelize.py)
    fsdp_units(model, param_dtype, cfg.reshard_after_forward)
    if ema_module is not None:
        # Always resharded after its forward: the EMA runs no backward that would reshard it (MESA's teacher forward,
        # validation), and its update needs its shards, not gathered parameters.
        fsdp_units(ema_module, None, reshard_after_forward=True)
    return model, model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def grad_sync(wrapped: nn.Module, sync: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of an accumulated step."""
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if sync else wrapped.no_sync()
    if is_sharded(wrapped):
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def clip_grad_norm(params, max_norm: float | None) -> torch.Tensor:
    """Global gradient norm (clipped to max_norm when set), as a tensor on the device: reading it is the caller's
    choice (a host-device sync). With FSDP2 the norm is a DTensor over the shards, made whole here."""
    norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm if max_norm else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
