"""Selective scan in plain PyTorch: fast on CPU, correct anywhere.

Semantics are mamba_ssm's ``selective_scan_fn`` (see ``selective_scan`` in this package). The work splits into
 1. dense, vectorised passes over (l, b, d, n): dA = exp(delta*A), dBu = delta*u*B, y = <h, C>, and their gradients;
 2. the only sequential part, the linear recurrence h_t = dA_t * h_{t-1} + dBu_t.

The recurrence is solved as a two-level scan: the sequence is cut into chunks of K ~ sqrt(l) steps, every chunk is
scanned from a zero state at once (K steps, each one fused multiply-add over all chunks), then the chunk carries are
propagated (l/K small steps) and folded back in with the cumulative product of dA. That is ~2*sqrt(l) Python-level
ops instead of l, on tensors l/K times larger (MambaVision: l = 196 -> 28 steps, l = 49 -> 14). Products of dA lie in
(0, 1] (A < 0, delta > 0 after softplus), so nothing overflows, unlike log-space/cumsum formulations.

Tensors are laid out (K, nc, b, d[, n]) with time index t = c*K + k, so that the per-step slices are contiguous.
The backward pass is hand-written: the adjoint of the recurrence is the same recurrence run backwards.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _chunking(seqlen: int) -> tuple[int, int]:
    """Chunk length K and chunk count nc with K * nc >= seqlen, K ~ sqrt(seqlen)."""
    k = max(1, math.isqrt(seqlen))
    if k * k < seqlen:
        k += 1
    return k, -(-seqlen // k)


def _to_scan(x: torch.Tensor, k: int, nc: int, dtype: torch.dtype) -> torch.Tensor:
    """(b, c, l) -> (K, nc, b, c), zero-padded at the end of the sequence."""
    b, c, l = x.shape
    x = x.to(dtype)
    if k * nc != l:
        x = F.pad(x, (0, k * nc - l))
    return x.view(b, c, nc, k).permute(3, 2, 0, 1).contiguous()


def _from_scan(x: torch.Tensor, seqlen: int) -> torch.Tensor:
    """(K, nc, b, c) -> (b, c, l)."""
    k, nc, b, c = x.shape
    return x.permute(2, 3, 1, 0).reshape(b, c, nc * k)[..., :seqlen]


def linear_scan(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """h[k, c] for h_t = a_t * h_{t-1} + x_t, h_{-1} = 0, with t = c*K + k. Overwrites and returns x."""
    h = x
    kk, nc = h.shape[:2]
    for k in range(1, kk):
        torch.addcmul(h[k], a[k], h[k - 1], out=h[k])
    if nc > 1:
        # prod[k, c] = a[0, c] * ... * a[k, c], for chunks 1.. (chunk 0 starts from the true zero state).
        # (torch.cumprod over the leading dim is ~10x slower than this loop of contiguous multiplies.)
        prod = torch.empty_like(a[:, 1:])
        prod[0] = a[0, 1:]
        for k in range(1, kk):
            torch.mul(prod[k - 1], a[k, 1:], out=prod[k])
        # carry[c] = true state at the end of chunk c, which chunk c+1 starts from.
        carry = h[-1].clone()
        for c in range(1, nc):
            torch.addcmul(carry[c], prod[-1, c - 1], carry[c - 1], out=carry[c])
        h[:, 1:].addcmul_(prod, carry[:-1].unsqueeze(0))
    return h


def linear_scan_functional(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``linear_scan`` without writing into any tensor: the same two-level scan (the same chunks, the same order of
    operations up to fused multiply-adds), built from new tensors. Exporters need a graph without in-place writes
    (ONNX has none; torch.export's decompositions must be functional); training keeps the in-place loop, which
    allocates nothing per step."""
    kk, nc = x.shape[:2]
    steps = [x[0]]
    for k in range(1, kk):
        steps.append(a[k] * steps[-1] + x[k])
    h = torch.stack(steps)
    if nc == 1:
        return h
    prods = [a[0, 1:]]
    for k in range(1, kk):
        prods.append(prods[-1] * a[k, 1:])
    prod = torch.stack(prods)
    carries = [h[-1, 0]]
    for c in range(1, nc - 1):  # the last chunk's carry feeds nothing
        carries.append(h[-1, c] + prod[-1, c - 1] * carries[-1])
    return torch.cat([h[:, :1], h[:, 1:] + prod * torch.stack(carries).unsqueeze(0)], dim=1)


def linear_scan_reverse(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The adjoint of ``linear_scan``: s_t = g_t + a_{t+1} * s_{t+1}. Overwrites and returns g."""
    s = g
    kk, nc = s.shape[:2]
    for k in range(kk - 2, -1, -1):
        torch.addcmul(s[k], a[k + 1], s[k + 1], out=s[k])
    if nc > 1:
        # suffix[k, c] = a[k+1, c] * ... * a[K-1, c] * a[0, c+1]: how the adjoint at the start of chunk c+1
        # reaches step k of chunk c (for chunks ..nc-2).
        suffix = torch.empty_like(a[:, :-1])
        suffix[-1] = a[0, 1:]
        for k in range(kk - 2, -1, -1):
            torch.mul(suffix[k + 1], a[k + 1, :-1], out=suffix[k])
        # carry[c] = true adjoint at the start of chunk c+1, flowing back into chunk c.
        carry = s[0, 1:].clone()
        for c in range(nc - 3, -1, -1):
            torch.addcmul(carry[c], suffix[0, c + 1], carry[c + 1], out=carry[c])
        s[:, :-1].addcmul_(suffix, carry.unsqueeze(0))
    return s


def state_dtype(u: torch.Tensor) -> torch.dtype:
    """The dtype of the state and of the arithmetic: never below fp32."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _layout(u, delta, B, C, delta_bias, softplus):
    """Everything the two passes share, from the inputs: compute dtype, chunking, delta before and after
    softplus, and the scan-layout copies of u, delta, B, C."""
    cdt = state_dtype(u)
    k, nc = _chunking(u.shape[-1])
    delta_raw = delta.to(cdt)
    if delta_bias is not None:
        delta_raw = delta_raw + delta_bias.to(cdt)[:, None]
    dt = F.softplus(delta_raw) if softplus else delta_raw
    return cdt, delta_raw, dt, _to_scan(u, k, nc, cdt), _to_scan(dt, k, nc, cdt), _to_scan(B, k, nc, cdt), \
        _to_scan(C, k, nc, cdt)


def residuals_like(u, A, z):
    """Empty tensors shaped like what ``forward`` keeps for ``backward`` (for tracing without computing)."""
    b, d, l = u.shape
    k, nc = _chunking(l)
    cdt = state_dtype(u)
    state = u.new_empty((k, nc, b, d, A.shape[1]), dtype=cdt)
    return [state, torch.empty_like(state), u.new_empty((b, d, l) if z is not None else (0,), dtype=cdt)]


def forward(u, delta, A, B, C, D, z, delta_bias, softplus, recurrence=linear_scan):
    """(out in u's dtype, last state, residuals [dA, h, y before the z gate (only with z)]); B, C: (b, n, l).
    ``recurrence``: ``linear_scan``, or ``linear_scan_functional`` for exporters (the rest writes in place nowhere)."""
    seqlen = u.shape[-1]
    cdt, _, _, u_s, dt_s, B_s, C_s = _layout(u, delta, B, C, delta_bias, softplus)  # (K, nc, b, d|n); padding dt = 0
    k = u_s.shape[0]
    dA = torch.exp(dt_s.unsqueeze(-1) * A.to(cdt))  # (K, nc, b, d, n); 1 on padding
    h = recurrence(dA, (dt_s * u_s).unsqueeze(-1) * B_s.unsqueeze(-2))
    y = _from_scan((h * C_s.unsqueeze(-2)).sum(-1), seqlen)
    if D is not None:
        y = y + D.to(cdt)[:, None] * u.to(cdt)
    out = y if z is None else y * F.silu(z.to(cdt))
    last = h[(seqlen - 1) % k, (seqlen - 1) // k].clone()
    return out.to(u.dtype), last, [dA, h, y if z is not None else y.new_empty(0)]


def backward(gout, u, delta, A, B, C, D, z, delta_bias, softplus, dA, h, y):
    """Gradients (u, delta, A, B, C, D, z, delta_bias) from ``forward``'s residuals; None for absent inputs."""
    seqlen = u.shape[-1]
    cdt, delta_raw, _, u_s, dt_s, B_s, C_s = _layout(u, delta, B, C, delta_bias, softplus)
    k, nc = dt_s.shape[:2]
    g = gout.to(cdt)

    gz = None
    if z is not None:
        zc = z.to(cdt)
        sig = torch.sigmoid(zc)
        gz = (g * y * sig * (1 + zc * (1 - sig))).to(z.dtype)
        g = g * zc * sig
    gD = None if D is None else (g * u.to(cdt)).sum((0, 2)).to(D.dtype)

    g_s = _to_scan(g, k, nc, cdt)  # dL/dy, (K, nc, b, d)
    gC = _from_scan((h * g_s.unsqueeze(-1)).sum(-2), seqlen)
    # Adjoint of the state, s_t = dL/dh_t (h_t feeds y_t and h_{t+1}): the recurrence run backwards.
    s = linear_scan_reverse(dA, g_s.unsqueeze(-1) * C_s.unsqueeze(-2))
    # From h_t = dA_t h_{t-1} + dBu_t: dL/d(dBu_t) = s_t and w_t = dL/d(delta_t A) = s_t * h_{t-1} * dA_t.
    w = s * dA
    w[1:] *= h[:-1]  # h_{t-1} within a chunk ...
    w[0, 1:] *= h[-1, :-1]  # ... and across the boundary from the previous chunk
    w[0, 0].zero_()  # h_{-1} = 0
    A_c = A.to(cdt)
    g_dtu = (s * B_s.unsqueeze(-2)).sum(-1)  # dL/d(delta_t u_t)
    g_dt = (w * A_c).sum(-1) + g_dtu * u_s
    gA = w.mul_(dt_s.unsqueeze(-1)).sum((0, 1, 2)).to(A.dtype)
    gB = _from_scan((s * (dt_s * u_s).unsqueeze(-1)).sum(-2), seqlen)

    gu = _from_scan(g_dtu * dt_s, seqlen)
    if D is not None:
        gu = gu + g * D.to(cdt)[:, None]
    g_dt = _from_scan(g_dt, seqlen)
    if softplus:
        g_dt = g_dt * torch.sigmoid(delta_raw)
    g_bias = None if delta_bias is None else g_dt.sum((0, 2)).to(delta_bias.dtype)
    return gu.to(u.dtype), g_dt.to(delta.dtype), gA, gB.to(B.dtype), gC.to(C.dtype), gD, gz, g_bias
