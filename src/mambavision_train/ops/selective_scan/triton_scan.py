"""Selective scan as two fused Triton kernels (forward, backward): any CUDA GPU, nothing to compile ahead of time.

One program owns a block of channels of one image, with their (BLOCK_D, d_state) fp32 states in registers, and walks
the sequence step by step (a few steps unrolled together, so the loads of later steps are issued ahead of the
arithmetic of earlier ones). Nothing of size (b, d, l, n) ever reaches memory:
  forward   reads u, delta, B, C (z), writes y, and the state at the start of every chunk of CHUNK steps;
  backward  walks the chunks from the last: it recomputes the chunk's states from its checkpoint into a
            per-program scratch of CHUNK states (it stays in cache), then runs the adjoint recurrence backwards,
            s_t = C_t g_t + dA_{t+1} s_{t+1}, and forms every input gradient on the way.
Gradients that sum over channels (B, C) or over the batch and time (A, D, delta_bias) are written as per-program
partial sums and added up in PyTorch: no atomics, so results are bit-for-bit reproducible (exact resume relies on it).

With ``TRITON_INTERPRET=1`` set before this module is imported, the same kernels run on CPU tensors in Triton's
interpreter: that is how the tests check them on machines without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class KernelConfig:
    block_d: int = 4  # channels per program; block_d * d_state states spread over the program's threads
    chunk: int = 32  # steps between checkpoints, unrolled in the kernels
    num_warps: int = 1
    unroll: int = 4  # steps unrolled together: the loads of later steps issue early; the full chunk compiles slowly


def default_config(dstate: int, seqlen: int) -> KernelConfig:
    # One warp, one state per thread (d_state 8 -> 4 channels): many small programs keep the GPU full even at
    # MambaVision's short sequences, and each thread's state update is a single FMA per step. Chunks no longer
    # than the sequence: unrolled steps past its end would be wasted work.
    return KernelConfig(block_d=max(1, 32 // triton.next_power_of_2(dstate)),
                        chunk=min(32, triton.next_power_of_2(seqlen)))


@triton.jit
def _softplus(x):
    # torch's softplus (linear above 20); log1p(e) by its series where e = exp(x) is too small for log(1 + e)
    e = tl.exp(x)
    small = e * (1.0 - 0.5 * e)
    return tl.where(x > 20.0, x, tl.where(e < 1e-4, small, tl.log(1.0 + e)))


@triton.jit
def _step_inputs(u_ptr, dt_ptr, B_ptr, C_ptr, bias, row, bn_row, t, m, m_n,
                 HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """u_t, delta_t (after bias and softplus; 0 outside the sequence), delta_t before softplus, B_t, C_t."""
    u = tl.load(u_ptr + row + t, mask=m, other=0.0).to(tl.float32)
    dt_raw = tl.load(dt_ptr + row + t, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt_raw += bias
    dt = dt_raw
    if SOFTPLUS:
        dt = _softplus(dt_raw)
    dt = tl.where(m, dt, 0.0)  # padding steps are the identity: dA = 1, dBu = 0
    Bt = tl.load(B_ptr + bn_row + t, mask=m_n, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + bn_row + t, mask=m_n, other=0.0).to(tl.float32)
    return u, dt, dt_raw, Bt, Ct


@triton.jit
def _program_setup(A_ptr, D_ptr, bias_ptr, dim, seqlen, dstate, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's image and channels, their masks and offsets, and its rows of A, D and delta_bias (zeros when
    absent)."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]
    dn = offs_d[:, None] * dstate + offs_n[None, :]
    A = tl.load(A_ptr + dn, mask=mask_dn, other=0.0).to(tl.float32)
    Dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    row = pid_b * dim * seqlen + offs_d * seqlen  # (b, d, 0) of each channel
    bn_row = pid_b * dstate * seqlen + offs_n * seqlen  # (b, n, 0) of each state
    return pid_b, offs_d, offs_n, mask_d, mask_n, mask_dn, dn, A, Dv, bias, row, bn_row


@triton.jit
def _scan_fwd(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, ckpt_ptr, last_ptr,
              dim, seqlen, dstate, nchunks,
              HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, UNROLL: tl.constexpr):
    pid_b, offs_d, offs_n, mask_d, mask_n, mask_dn, dn, A, Dv, bias, row, bn_row = _program_setup(
        A_ptr, D_ptr, bias_ptr, dim, seqlen, dstate, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N)
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for c in range(nchunks):
        tl.store(ckpt_ptr + (pid_b * nchunks + c) * dim * dstate + dn, h, mask=mask_dn)
        for k in tl.range(0, CHUNK, loop_unroll_factor=UNROLL):
            t = c * CHUNK + k
            m = mask_d & (t < seqlen)
            u, dt, dt_raw, Bt, Ct = _step_inputs(u_ptr, dt_ptr, B_ptr, C_ptr, bias, row, bn_row, t, m,
                                                 mask_n & (t < seqlen), HAS_BIAS, SOFTPLUS)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
            y = tl.sum(h * Ct[None, :], axis=1)
            if HAS_D:
                y += Dv * u
            if HAS_Z:
                z = tl.load(z_ptr + row + t, mask=m, other=0.0).to(tl.float32)
                y = y * z * tl.sigmoid(z)
            tl.store(out_ptr + row + t, y.to(out_ptr.dtype.element_ty), mask=m)
    tl.store(last_ptr + pid_b * dim * dstate + dn, h, mask=mask_dn)


@triton.jit
def _scan_bwd(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, gout_ptr, ckpt_ptr, scratch_ptr,
              gu_ptr, gdt_ptr, gz_ptr, gA_ptr, gB_ptr, gC_ptr, gD_ptr, gbias_ptr,
              dim, seqlen, dstate, nchunks,
              HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, UNROLL: tl.constexpr):
    pid_b, offs_d, offs_n, mask_d, mask_n, mask_dn, dn, A, Dv, bias, row, bn_row = _program_setup(
        A_ptr, D_ptr, bias_ptr, dim, seqlen, dstate, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N)
    pid_d = tl.program_id(1)
    nblocks = tl.num_programs(1)
    part_row = (pid_b * nblocks + pid_d) * dstate * seqlen + offs_n * seqlen  # this program's B/C partial sums
    # The program's own CHUNK states, (CHUNK, BLOCK_D, BLOCK_N): written and read back by the same threads.
    scratch = scratch_ptr + (pid_b * nblocks + pid_d) * (CHUNK * BLOCK_D * BLOCK_N) \
        + tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + offs_n[None, :]
    r = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # dA_{t+1} s_{t+1}: what h_t owes to the future
    gA = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    gD = tl.zeros((BLOCK_D,), dtype=tl.float32)
    gbias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for ci in range(nchunks):
        c = nchunks - 1 - ci
        # Recompute the chunk's states from its checkpoint; keep h_{t-1} of every step.
        h = tl.load(ckpt_ptr + (pid_b * nchunks + c) * dim * dstate + dn, mask=mask_dn, other=0.0)
        for k in tl.range(0, CHUNK, loop_unroll_factor=UNROLL):
            t = c * CHUNK + k
            m = mask_d & (t < seqlen)
            u, dt, dt_raw, Bt, Ct = _step_inputs(u_ptr, dt_ptr, B_ptr, C_ptr, bias, row, bn_row, t, m,
                                                 mask_n & (t < seqlen), HAS_BIAS, SOFTPLUS)
            tl.store(scratch + k * BLOCK_D * BLOCK_N, h)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
        # The adjoint, from the chunk's last step to its first.
        for kk in tl.range(0, CHUNK, loop_unroll_factor=UNROLL):
            k = CHUNK - 1 - kk
            t = c * CHUNK + k
            m = mask_d & (t < seqlen)
            m_n = mask_n & (t < seqlen)
            u, dt, dt_raw, Bt, Ct = _step_inputs(u_ptr, dt_ptr, B_ptr, C_ptr, bias, row, bn_row, t, m, m_n,
                                                 HAS_BIAS, SOFTPLUS)
            h_prev = tl.load(scratch + k * BLOCK_D * BLOCK_N)
            dA = tl.exp(dt[:, None] * A)
            dtu = dt * u
            h = dA * h_prev + dtu[:, None] * Bt[None, :]
            g = tl.load(gout_ptr + row + t, mask=m, other=0.0).to(tl.float32)
            if HAS_Z:
                z = tl.load(z_ptr + row + t, mask=m, other=0.0).to(tl.float32)
                y = tl.sum(h * Ct[None, :], axis=1)
                if HAS_D:
                    y += Dv * u
                sig = tl.sigmoid(z)
                tl.store(gz_ptr + row + t, (g * y * sig * (1.0 + z * (1.0 - sig))).to(gz_ptr.dtype.element_ty),
                         mask=m)
                g = g * z * sig
            s = r + g[:, None] * Ct[None, :]  # dL/dh_t
            w = s * dA * h_prev  # dL/d(delta_t A)
            sB = tl.sum(s * Bt[None, :], axis=1)  # dL/d(delta_t u_t)
            gdt = tl.sum(w * A, axis=1) + sB * u
            gu = sB * dt
            if HAS_D:
                gu += g * Dv
                gD += g * u
            if SOFTPLUS:
                gdt = gdt * tl.sigmoid(dt_raw)
            gdt = tl.where(m, gdt, 0.0)
            gbias += gdt
            gA += w * dt[:, None]
            tl.store(gu_ptr + row + t, gu.to(gu_ptr.dtype.element_ty), mask=m)
            tl.store(gdt_ptr + row + t, gdt.to(gdt_ptr.dtype.element_ty), mask=m)
            tl.store(gB_ptr + part_row + t, tl.sum(s * dtu[:, None], axis=0), mask=m_n)
            tl.store(gC_ptr + part_row + t, tl.sum(h * g[:, None], axis=0), mask=m_n)
            r = dA * s
    tl.store(gA_ptr + pid_b * dim * dstate + dn, gA, mask=mask_dn)
    if HAS_D:
        tl.store(gD_ptr + pid_b * dim + offs_d, gD, mask=mask_d)
    if HAS_BIAS:
        tl.store(gbias_ptr + pid_b * dim + offs_d, gbias, mask=mask_d)


def _flags(D, z, delta_bias, softplus, cfg, dstate):
    return dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus),
                BLOCK_D=cfg.block_d, BLOCK_N=triton.next_power_of_2(dstate), CHUNK=cfg.chunk, UNROLL=cfg.unroll,
                num_warps=cfg.num_warps)


def checkpoints_like(u, A, config: KernelConfig | None = None):
    """The forward's chunk checkpoints, uninitialised: (b, chunks, d, n) fp32 (also the operator's fake)."""
    b, d, l = u.shape
    chunk = (config or default_config(A.shape[1], l)).chunk
    return u.new_empty((b, triton.cdiv(l, chunk), d, A.shape[1]), dtype=torch.float32)


def forward(u, delta, A, B, C, D, z, delta_bias, softplus, config: KernelConfig | None = None):
    """(y, last state, chunk checkpoints (b, chunks, d, n) fp32). Inputs contiguous; B, C (b, n, l)."""
    b, d, l = u.shape
    n = A.shape[1]
    cfg = config or default_config(n, l)
    out = torch.empty_like(u)
    ckpt = checkpoints_like(u, A, cfg)
    nchunks = ckpt.shape[1]
    last = torch.empty(b, d, n, device=u.device, dtype=torch.float32)
    _scan_fwd[(b, triton.cdiv(d, cfg.block_d))](
        u, delta, A, B, C, u if D is None else D, u if z is None else z, u if delta_bias is None else delta_bias,
        out, ckpt, last, d, l, n, nchunks, **_flags(D, z, delta_bias, softplus, cfg, n))
    return out, last, ckpt


def backward(gout, u, delta, A, B, C, D, z, delta_bias, softplus, ckpt, config: KernelConfig | None = None):
    """Gradients (u, delta, A, B, C, D, z, delta_bias); None for the absent optional inputs."""
    b, d, l = u.shape
    n = A.shape[1]
    cfg = config or default_config(n, l)
    assert cfg.chunk * (ckpt.shape[1] - 1) < l <= cfg.chunk * ckpt.shape[1], "not the forward's chunking"
    nblocks = triton.cdiv(d, cfg.block_d)
    f32 = dict(device=u.device, dtype=torch.float32)
    gu, gdt = torch.empty_like(u), torch.empty_like(delta)
    gz = None if z is None else torch.empty_like(z)
    gA = torch.empty(b, d, n, **f32)
    gB, gC = torch.empty(b, nblocks, n, l, **f32), torch.empty(b, nblocks, n, l, **f32)
    gD = None if D is None else torch.empty(b, d, **f32)
    gbias = None if delta_bias is None else torch.empty(b, d, **f32)
    scratch = torch.empty(b * nblocks * cfg.chunk * cfg.block_d * triton.next_power_of_2(n), **f32)
    _scan_bwd[(b, nblocks)](
        u, delta, A, B, C, u if D is None else D, u if z is None else z, u if delta_bias is None else delta_bias,
        gout, ckpt, scratch, gu, gdt, gu if gz is None else gz, gA, gB, gC, gA if gD is None else gD,
        gA if gbias is None else gbias, d, l, n, ckpt.shape[1], **_flags(D, z, delta_bias, softplus, cfg, n))
    return (gu, gdt, gA.sum(0).to(A.dtype), gB.sum(1).to(B.dtype), gC.sum(1).to(C.dtype),
            None if D is None else gD.sum(0).to(D.dtype), gz, None if gbias is None else gbias.sum(0).to(delta_bias.dtype))
