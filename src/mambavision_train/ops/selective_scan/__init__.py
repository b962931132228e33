"""The selective scan of Mamba, with mamba_ssm's ``selective_scan_fn`` semantics, on any device.

Implementations, chosen per call (``impl=``), per process (``MAMBAVISION_SCAN=...`` or ``set_default_impl``) or
automatically:
  ``cuda``       mamba_ssm's compiled kernel; CUDA tensors only (used by ``auto`` when installed)
  ``torch``      ours, in PyTorch (torch_scan.py): CPU, any GPU, any dtype with an fp32 state
  ``mamba_ref``  mamba_ssm's ``selective_scan_ref``, the per-step loop the official code falls back to (slow)
"""

from __future__ import annotations

import contextlib
import os

import torch

from .mamba_ssm_compat import cuda_selective_scan_fn, has_cuda_kernel, reference_selective_scan_fn
from .torch_scan import SelectiveScanTorch

IMPLS = ("auto", "cuda", "torch", "mamba_ref")
ENV_VAR = "MAMBAVISION_SCAN"
_default_impl: str | None = None
_shape_log: list | None = None  # set by count_scan_calls()


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown selective-scan implementation {impl!r}; choose one of {', '.join(IMPLS)}")
    return impl


def set_default_impl(impl: str | None) -> None:
    """Force an implementation for this process (None: back to ``$MAMBAVISION_SCAN`` or auto)."""
    global _default_impl
    _default_impl = None if impl is None else _check_impl(impl)


def default_impl() -> str:
    return _default_impl or _check_impl(os.environ.get(ENV_VAR, "auto") or "auto")


def available_impls() -> list[str]:
    """The implementations that can run here (``cuda`` also needs CUDA tensors)."""
    impls = ["torch"]
    if has_cuda_kernel() and torch.cuda.is_available():
        impls.insert(0, "cuda")
    if reference_selective_scan_fn() is not None:
        impls.append("mamba_ref")
    return impls


def resolve_impl(impl: str | None, device: torch.device) -> str:
    impl = _check_impl(impl) if impl else default_impl()
    if impl == "auto":
        return "cuda" if device.type == "cuda" and has_cuda_kernel() else "torch"
    if impl == "cuda" and (device.type != "cuda" or not has_cuda_kernel()):
        raise RuntimeError(
            "selective scan 'cuda' needs CUDA tensors and mamba_ssm's compiled kernel "
            f"(device {device}, kernel {'installed' if has_cuda_kernel() else 'missing'}); "
            f"use impl 'torch' or unset {ENV_VAR}")
    if impl == "mamba_ref" and reference_selective_scan_fn() is None:
        raise RuntimeError("selective scan 'mamba_ref' needs the mamba-ssm package: pip install -e '.[cuda]'")
    return impl


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, impl: str | None = None):
    """y = selective_scan(u, delta, A, B, C, ...) exactly as mamba_ssm's ``selective_scan_fn``.

    u, delta: (b, d, l); A: (d, n); B, C: (b, n, l); D, delta_bias: (d,); z: (b, d, l).
    delta = softplus(delta + delta_bias) if delta_softplus; h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t (fp32);
    y_t = <h_t, C_t> + D u_t; y *= silu(z) when z is given. Returns y in u's dtype (and the last state if asked).
    """
    if _shape_log is not None:
        _shape_log.append((u.shape[0], u.shape[1], u.shape[2], A.shape[1]))
        return torch.empty_like(u)
    which = resolve_impl(impl, u.device)
    if which == "cuda":
        return cuda_selective_scan_fn()(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if which == "mamba_ref":
        return reference_selective_scan_fn()(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return SelectiveScanTorch.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


@contextlib.contextmanager
def count_scan_calls():
    """Within the block, scans are not computed (an empty output is returned, meta tensors welcome); the list
    yielded collects (batch, d, seqlen, d_state) per call. Lets FLOP counting keep the scan apart."""
    global _shape_log
    outer, _shape_log = _shape_log, []
    try:
        yield _shape_log
    finally:
        _shape_log = outer


__all__ = ["count_scan_calls", "selective_scan", "set_default_impl", "default_impl", "available_impls", "resolve_impl", "IMPLS", "ENV_VAR"]
