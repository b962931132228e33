"""The selective scan's test references: a naive float64 loop, random inputs, gradients, relative error."""

import torch
import torch.nn.functional as F


def naive_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    """The recurrence of the Mamba paper, one time step and one state at a time, in float64."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    b, d, l = u.shape
    h = torch.zeros(b, d, A.shape[1], dtype=torch.float64)
    ys = []
    for t in range(l):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, -1)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * F.silu(z.double())
    return (y, h) if return_last_state else y


def make_inputs(b, d, l, n, with_z, with_D, with_bias, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0, shift=0.0: (scale * torch.randn(*s, generator=g) + shift).to(dtype).requires_grad_()
    return dict(
        u=r(b, d, l), delta=r(b, d, l, scale=0.5), A=(-torch.rand(d, n, generator=g) * 4 - 0.1).to(dtype).requires_grad_(),
        B=r(b, n, l), C=r(b, n, l), D=r(d) if with_D else None, z=r(b, d, l) if with_z else None,
        delta_bias=r(d, scale=0.3) if with_bias else None)


def grads(fn, x, gout, softplus=True):
    out = fn(**x, delta_softplus=softplus)
    leaves = [v for v in x.values() if v is not None]
    return [out] + list(torch.autograd.grad(out, leaves, gout))


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
