"""Numerics of a run, in one place for training, evaluation and the benchmarks: the autocast dtype an ``amp``
setting means on a device, the autocast context, and the determinism switch."""

from __future__ import annotations

import contextlib
import os

import torch

AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
AMP_NAMES = {v: k for k, v in AMP.items()}


def amp_dtype(amp: str, device: torch.device):
    """The autocast dtype of an ``amp`` setting (validated by the config schema); None: no autocast. ``auto``: bf16
    on GPUs that compute in bf16 natively (A100, H100, ...), fp16 (with a GradScaler) on those that would only
    emulate it (V100, T4: emulated bf16 is several times slower), fp32 on the CPU."""
    if amp != "auto":
        return AMP[amp]
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def autocast(device: torch.device, dtype):
    """A context that runs the forward in ``dtype`` (None: as it is)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def set_determinism(deterministic: bool, device: torch.device):
    """``deterministic=true``: torch's deterministic algorithms, cuBLAS's deterministic workspace and no cuDNN
    autotuning, so that the same steps give the same bits on a GPU too (the scan is chosen accordingly:
    ops.selective_scan.resolve_impl). Off on a GPU: cuDNN benchmarks its kernels per shape and keeps the fastest, as
    timm does; cuDNN's weight gradients, SDPA's backward and mamba_ssm's kernel then add in an order that varies from
    run to run. The CPU kernels are deterministic either way."""
    if deterministic:
        # Read by cuBLAS when its first handle is made: before any matmul of this process (torch's reproducibility
        # notes). A value set by the user is kept.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
