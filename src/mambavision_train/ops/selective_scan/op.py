"""The selective scan as a PyTorch operator: ``torch.ops.mambavision.selective_scan`` and its backward.

Registering it with ``torch.library`` (a fake implementation for shapes, an autograd formula, a FLOP formula) is
what lets torch.compile trace MambaVision without graph breaks, lets ``FlopCounterMode`` count the scan like any
other op, and lets meta tensors flow through it. Every implementation sits behind the same two operators; which
one runs is an argument (``impl``), resolved before the call.

Each implementation has ``forward(u, delta, A, B, C, D, z, delta_bias, softplus) -> (out, last, residuals)`` and
``backward(gout, <the inputs>, softplus, *residuals) -> 8 gradients``. The residuals are what its backward needs
from its forward (each keeps different tensors); the operator carries exactly ``N_RESIDUALS`` of them, placeholders
where unused, because an operator's outputs are fixed by its schema. mamba_ssm's ``selective_scan_ref`` is not
behind the operator: it is the reference the others are tested against, with autograd through its own ops.
"""

from __future__ import annotations

import functools
import importlib
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import torch_scan

N_RESIDUALS = 3


class _MambaCuda:
    """mamba_ssm's compiled kernel, called the way its own ``SelectiveScanFn`` calls it
    (mamba_ssm/ops/selective_scan_interface.py): forward keeps its chunk states x (and the pre-gate output)."""

    @staticmethod
    def ext():
        return importlib.import_module("selective_scan_cuda")

    def forward(self, u, delta, A, B, C, D, z, delta_bias, softplus):
        out, x, *rest = self.ext().fwd(u, delta, A, B[:, None], C[:, None], D, z, delta_bias, softplus)
        last = x[:, :, -1, 1::2].clone()
        return (out, last, [x]) if z is None else (rest[0], last, [x, out])

    def backward(self, gout, u, delta, A, B, C, D, z, delta_bias, softplus, x, out, *_):
        du, ddelta, dA, dB, dC, dD, ddelta_bias, *rest = self.ext().bwd(
            u, delta, A, B[:, None], C[:, None], D, z, delta_bias, gout, x, out if z is not None else None, None,
            softplus, False)
        return (du, ddelta, dA, dB[:, 0], dC[:, 0], dD if D is not None else None, rest[0] if z is not None else None,
                ddelta_bias if delta_bias is not None else None)

    @staticmethod
    def residuals_like(u, A, z):
        b, d, l = u.shape
        x = u.new_empty((b, d, -(-l // 2048), 2 * A.shape[1]), dtype=torch.float32)  # its chunks: 2048 steps
        return [x] if z is None else [x, torch.empty_like(u)]


class _Triton:
    """The Triton kernels, imported on first use (importing triton takes a moment, and it may be absent)."""

    @staticmethod
    def module():
        return importlib.import_module(".triton_scan", __package__)

    def forward(self, u, delta, A, B, C, D, z, delta_bias, softplus):
        out, last, ckpt = self.module().forward(u, delta, A, B, C, D, z, delta_bias, softplus)
        return out, last, [ckpt]

    def backward(self, gout, u, delta, A, B, C, D, z, delta_bias, softplus, ckpt, *_):
        return self.module().backward(gout, u, delta, A, B, C, D, z, delta_bias, softplus, ckpt)

    def residuals_like(self, u, A, z):
        return [self.module().checkpoints_like(u, A)]


IMPLEMENTATIONS = {"torch": torch_scan, "triton": _Triton(), "cuda": _MambaCuda()}


def _placeholder(like: Tensor) -> Tensor:
    # One element, not zero: the operator checks that its outputs do not alias, and empty tensors share address 0.
    return like.new_empty(1)


def _padded(residuals: list, like: Tensor) -> list:
    return list(residuals) + [_placeholder(like) for _ in range(N_RESIDUALS - len(residuals))]


def _dense(*tensors):
    """The operator's inputs in contiguous memory: the kernels index raw pointers as if they were. The Python wrapper
    makes them so, but torch.compile calls the operator directly and Inductor may hand it any strides (a no-op for
    tensors that are contiguous already)."""
    return [t if t is None else t.contiguous() for t in tensors]


@torch.library.custom_op("mambavision::selective_scan", mutates_args=())
def selective_scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                      z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                      impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, last state, residual 0..2): see the module docstring. ``impl`` must already be resolved."""
    out, last, residuals = IMPLEMENTATIONS[impl].forward(*_dense(u, delta, A, B, C, D, z, delta_bias), delta_softplus)
    return (out, last, *_padded(residuals, A))


@selective_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, impl):
    state = torch_scan.state_dtype(u) if impl == "torch" else torch.float32
    last = u.new_empty((u.shape[0], u.shape[1], A.shape[1]), dtype=state)
    return (torch.empty_like(u), last, *_padded(IMPLEMENTATIONS[impl].residuals_like(u, A, z), A))


@torch.library.custom_op("mambavision::selective_scan_backward", mutates_args=())
def selective_scan_backward_op(gout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                               D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                               r0: Tensor, r1: Tensor, r2: Tensor, delta_softplus: bool,
                               impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (u, delta, A, B, C, D, z, delta_bias); placeholders stand for the absent optional inputs."""
    grads = IMPLEMENTATIONS[impl].backward(*_dense(gout, u, delta, A, B, C, D, z, delta_bias), delta_softplus,
                                           *_dense(r0, r1, r2))
    return tuple(_placeholder(gout) if g is None else g.contiguous() for g in grads)


@selective_scan_backward_op.register_fake
def _(gout, u, delta, A, B, C, D, z, delta_bias, r0, r1, r2, delta_softplus, impl):
    return tuple(_placeholder(gout) if x is None else torch.empty_like(x) for x in (u, delta, A, B, C, D, z, delta_bias))


def _setup_context(ctx, inputs, output):
    *tensors, softplus, impl = inputs
    ctx.save_for_backward(*tensors, *output[2:])
    ctx.mark_non_differentiable(*output[1:])  # the last state (as in mamba_ssm) and the residuals
    ctx.softplus, ctx.impl = softplus, impl
    ctx.present = [t is not None for t in tensors]


def _backward(ctx, gout, *_):
    *tensors, r0, r1, r2 = ctx.saved_tensors
    grads = torch.ops.mambavision.selective_scan_backward(gout.contiguous(), *tensors, r0, r1, r2, ctx.softplus,
                                                          ctx.impl)
    return (*[g if present else None for g, present in zip(grads, ctx.present)], None, None)


selective_scan_op.register_autograd(_backward, setup_context=_setup_context)


def functional_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, impl):
    """The operator as plain, functional aten ops: the PyTorch scan with its recurrence out of place, whichever
    ``impl`` the graph names (the numbers are the same). Exporters that do not know the operator get this in its
    place (``ExportedProgram.run_decompositions(DECOMPOSITIONS)``, then ONNX). A decomposition rather than an
    onnxscript translation of the operator: one implementation, in PyTorch, tested against the training scan,
    good for any backend that takes an aten graph."""
    out, last, residuals = torch_scan.forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                              recurrence=torch_scan.linear_scan_functional)
    return (out, last, *_padded(residuals, A))


DECOMPOSITIONS = {torch.ops.mambavision.selective_scan.default: functional_selective_scan}


def scan_macs(b: int, d: int, l: int, n: int, with_D: bool = True) -> int:
    """Multiply-adds of one scan: exp(delta*A) and delta*u*B (1 MAC each, the exp not counted), the state update
    h = dA*h + dBu (1), the readout <h, C> (1) per (b, d, l, n); D*u per (b, d, l)."""
    return 3 * b * d * l * n + (b * d * l if with_D else 0)


@register_flop_formula(torch.ops.mambavision.selective_scan)
def _scan_flops(u_shape, delta_shape, A_shape, B_shape, C_shape, D_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * scan_macs(*u_shape, A_shape[1], with_D=D_shape is not None)  # FLOPs = 2 x MACs, as for matmuls


@register_flop_formula(torch.ops.mambavision.selective_scan_backward)
def _scan_backward_flops(gout_shape, u_shape, delta_shape, A_shape, B_shape, C_shape, D_shape, *args,
                         out_shape=None, **kwargs) -> int:
    return 2 * _scan_flops(u_shape, delta_shape, A_shape, B_shape, C_shape, D_shape)  # the convention: 2x forward


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    """True when triton imports (it ships with CUDA builds of torch)."""
    try:
        importlib.import_module("triton.language")
    except Exception:  # ImportError, or a triton that does not match this torch
        return False
    return True
