"""The selective scan of Mamba, with mamba_ssm's ``selective_scan_fn`` semantics, on any device.

Implementations, chosen per call (``impl=``, the model's ``scan_impl``), per process (``MAMBAVISION_SCAN=...``) or
automatically (``auto``: the first that can run on the tensors' device, in this order):
  ``cuda``       mamba_ssm's compiled kernel; CUDA tensors only
  ``triton``     ours, two fused Triton kernels (triton_scan.py); CUDA tensors, or CPU under TRITON_INTERPRET=1
  ``torch``      ours, in PyTorch (torch_scan.py): CPU, any GPU, any dtype with an fp32 state
  ``mamba_ref``  mamba_ssm's ``selective_scan_ref``, the per-step loop the official code falls back to (slow)
All but the reference run behind one PyTorch operator (op.py), which torch.compile and FlopCounterMode see as one op.
"""

from __future__ import annotations

import os

import torch

from .mamba_ssm_compat import has_cuda_kernel, reference_selective_scan_fn
from .op import has_triton, scan_macs

IMPLS = ("auto", "cuda", "triton", "torch", "mamba_ref")
ENV_VAR = "MAMBAVISION_SCAN"


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown selective-scan implementation {impl!r}; choose one of {', '.join(IMPLS)}")
    return impl


def _triton_can_run(device: torch.device) -> bool:
    return has_triton() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def available_impls() -> list[str]:
    """The implementations that can run here (``cuda`` and ``triton`` also need CUDA tensors)."""
    gpu = torch.cuda.is_available()
    impls = ["cuda"] if has_cuda_kernel() and gpu else []
    impls += ["triton"] if has_triton() and gpu else []
    impls.append("torch")
    if reference_selective_scan_fn() is not None:
        impls.append("mamba_ref")
    return impls


@torch.compiler.assume_constant_result  # a fixed choice per device: torch.compile bakes it in instead of tracing it
def _resolve(impl: str | None, device_type: str) -> str:
    device = torch.device(device_type)
    impl = _check_impl(impl or os.environ.get(ENV_VAR) or "auto")
    if impl == "auto":
        if device.type == "cuda":
            return "cuda" if has_cuda_kernel() else "triton" if has_triton() else "torch"
        return "torch"
    if impl == "cuda" and (device.type != "cuda" or not has_cuda_kernel()):
        raise RuntimeError(
            "selective scan 'cuda' needs CUDA tensors and mamba_ssm's compiled kernel "
            f"(device {device}, kernel {'installed' if has_cuda_kernel() else 'missing'}); "
            f"use 'triton' or 'torch', or unset {ENV_VAR}")
    if impl == "triton" and not _triton_can_run(device):
        raise RuntimeError(
            "selective scan 'triton' needs the triton package (it comes with CUDA builds of torch) and CUDA tensors "
            f"(device {device}, triton {'installed' if has_triton() else 'missing'}; TRITON_INTERPRET=1 runs it on "
            f"CPU, slowly); use 'torch' or unset {ENV_VAR}")
    if impl == "mamba_ref" and reference_selective_scan_fn() is None:
        raise RuntimeError("selective scan 'mamba_ref' needs the mamba-ssm package: pip install -e '.[cuda]'")
    return impl


def resolve_impl(impl: str | None, device: torch.device, deterministic: bool = False) -> str:
    """The implementation that runs for ``impl`` (None: ``$MAMBAVISION_SCAN``, else auto) on ``device``.
    ``deterministic``: never mamba_ssm's kernel, whose backward adds gradients with atomics (auto takes ours)."""
    which = _resolve(impl, device.type)
    if deterministic and which == "cuda":
        if (impl or os.environ.get(ENV_VAR) or "auto") == "cuda":
            raise RuntimeError("'cuda' (mamba_ssm's kernel) sums gradients with atomics, so it is not deterministic; "
                               "use 'triton' or 'torch' with deterministic=true")
        which = "triton" if has_triton() else "torch"
    return which


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, impl: str | None = None):
    """y = selective_scan(u, delta, A, B, C, ...) exactly as mamba_ssm's ``selective_scan_fn``.

    u, delta: (b, d, l); A: (d, n); B, C: (b, n, l); D, delta_bias: (d,); z: (b, d, l).
    delta = softplus(delta + delta_bias) if delta_softplus; h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t (fp32);
    y_t = <h_t, C_t> + D u_t; y *= silu(z) when z is given. Returns y in u's dtype (and the last state if asked).
    """
    if B.dim() != 3 or C.dim() != 3:
        raise ValueError("the selective scan takes B and C shaped (batch, d_state, seqlen); "
                         f"got B {tuple(B.shape)}, C {tuple(C.shape)}")
    which = resolve_impl(impl, u.device)
    if which == "mamba_ref":  # the reference, as it is: not behind the operator
        return reference_selective_scan_fn()(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    out, last, *_ = torch.ops.mambavision.selective_scan(
        u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(), D,
        None if z is None else z.contiguous(), delta_bias, bool(delta_softplus), which)
    return (out, last) if return_last_state else out


__all__ = ["selective_scan", "available_impls", "resolve_impl", "scan_macs", "IMPLS", "ENV_VAR"]
