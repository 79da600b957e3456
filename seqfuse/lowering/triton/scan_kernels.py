"""Triton kernels of seqfuse.scan; the host side is :mod:`seqfuse.lowering.triton.scan`.

One *row* is one independent recurrence h_t = a_t ⊙ h_{t-1} + b_t over (T, N) (an index of the
leading dims R of the broadcast (*R, T, N) shape).  A row index r is split into three coalesced
batch indices (i0, i1, i2) of sizes (S0, S1, S2), and each operand finds its row by its own
strides (``_row``), so a broadcast operand (stride 0: Mamba-1's C expanded over channels, an a
shared over the batch) is never materialized.

Time is walked in *scan order*: position i is time i, or T-1-i when ``REVERSE`` (a reverse scan
is the forward scan of the flipped sequence), so both directions share one code path.

* ``scan_fwd_kernel``, grid (rows, N blocks): a sequential loop over blocks of BLOCK_T
  positions; inside a block, ``tl.associative_scan`` composes the affine maps
  h -> a·h + b ((a1, b1) then (a2, b2) is (a1·a2, a2·b1 + b2)) and the state carried from the
  previous block is applied to the prefix maps.  The readout y_t = Σ_n c_t[n]·h_t[n] is a
  reduction over the N block: with a readout the host launches ONE program per row's N (the
  block covers all of N), so no atomics are needed.
* ``scan_bwd_kernel``, grid (rows, N blocks): a forward sweep stores the state entering every
  block (fp32 checkpoints, (rows, blocks, N)); then blocks are taken last to first: the block's
  states are recomputed from its checkpoint (h_t, and h_{t-1} by a second scan of the maps
  shifted by one position) and the adjoint g_t = dy_t·c_t + a_{t+1}·g_{t+1} is a reverse
  ``tl.associative_scan`` of the same affine maps, carrying g across blocks;
  da = g·h_{t-1}, db = g, dc = dy·h_t, and dh0 = a_0·g_0.  The gradients are written per row in
  full (rows, T, N) fp32 buffers and summed to the operands' broadcast shapes by the host.

State and every product are fp32, whatever the operands' dtype (fp32, fp16, bf16).
"""
from __future__ import annotations

import triton
import triton.language as tl

#: True when ``@triton.jit`` below built interpreted kernels (TRITON_INTERPRET=1 at import)
INTERPRETED = bool(triton.knobs.runtime.interpret)

# No function of triton's standard library (tl.sum, tl.zeros, tl.cumsum, ...) is called: those are
# @triton.jit functions jitted for one mode when triton.language is first imported, and an
# interpreted kernel cannot call a compiled one (tl.reduce / tl.associative_scan with the combine
# functions below and tl.full stand in for them).


@triton.jit
def _sum_combine(x, y):
    return x + y


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    """(a1, b1) then (a2, b2): h -> a2·(a1·h + b1) + b2."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _row(r, S1, S2, ST0, ST1, ST2):
    """Element offset of row ``r`` of a strided operand (batch dims coalesced to three)."""
    i2 = r % S2
    i1 = (r // S2) % S1
    i0 = r // S2 // S1
    return i0.to(tl.int64) * ST0 + i1.to(tl.int64) * ST1 + i2.to(tl.int64) * ST2


@triton.jit
def _times(pos, T, REVERSE: tl.constexpr):
    """Time index of scan positions ``pos``."""
    if REVERSE:
        return T - 1 - pos
    else:
        return pos


@triton.jit
def scan_fwd_kernel(
        A, B, C, H0, Y, HT,
        T, N, S1, S2,
        SA0, SA1, SA2, SAT, SAN,
        SB0, SB1, SB2, SBT, SBN,
        SC0, SC1, SC2, SCT, SCN,
        SH0, SH1, SH2, SHN,
        HAS_C: tl.constexpr, HAS_H0: tl.constexpr, REVERSE: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """Y (rows, T) with HAS_C (else (rows, T, N)) and HT (rows, N), both contiguous, in Y's dtype."""
    r = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_i = tl.arange(0, BLOCK_T)
    a_ptr = A + _row(r, S1, S2, SA0, SA1, SA2)
    b_ptr = B + _row(r, S1, S2, SB0, SB1, SB2)
    c_ptr = C + _row(r, S1, S2, SC0, SC1, SC2)
    r64 = r.to(tl.int64)

    # phase 1: the state entering the first block (h0, or zero)
    if HAS_H0:
        h = tl.load(H0 + _row(r, S1, S2, SH0, SH1, SH2) + offs_n * SHN, mask=mask_n, other=0.0).to(tl.float32)
    else:
        h = tl.full((BLOCK_N,), 0.0, tl.float32)

    for p0 in range(0, T, BLOCK_T):
        # phase 2: the block's maps (a, b); positions past T are the identity (a = 1, b = 0)
        pos = p0 + offs_i
        mask_t = pos < T
        t = _times(pos, T, REVERSE)
        m2 = mask_t[:, None] & mask_n[None, :]
        a = tl.load(a_ptr + t[:, None] * SAT + offs_n[None, :] * SAN, mask=m2, other=1.0).to(tl.float32)
        b = tl.load(b_ptr + t[:, None] * SBT + offs_n[None, :] * SBN, mask=m2, other=0.0).to(tl.float32)
        # phase 3: prefix maps inside the block (log-depth), applied to the carried state
        pa, pb = tl.associative_scan((a, b), 0, _affine_combine)
        hs = pa * h[None, :] + pb                                        # (BLOCK_T, BLOCK_N)
        # phase 4: the readout y_t = Σ_n c_t[n]·h_t[n] (the whole N in this program), or every state
        if HAS_C:
            c = tl.load(c_ptr + t[:, None] * SCT + offs_n[None, :] * SCN, mask=m2, other=0.0).to(tl.float32)
            y = tl.reduce(c * hs, 1, _sum_combine)
            tl.store(Y + r64 * T + t, y.to(Y.dtype.element_ty), mask=mask_t)
        else:
            tl.store(Y + (r64 * T + t[:, None]) * N + offs_n[None, :], hs.to(Y.dtype.element_ty), mask=m2)
        # phase 5: carry the last state of the block (the padding is the identity)
        h = tl.reduce(tl.where(offs_i[:, None] == BLOCK_T - 1, hs, 0.0), 0, _sum_combine)

    # phase 6: the final state (the one at t = 0 when REVERSE)
    tl.store(HT + r64 * N + offs_n, h.to(HT.dtype.element_ty), mask=mask_n)


@triton.jit
def scan_bwd_kernel(
        A, B, C, H0, DY, DHT, CKPT, DA, DB, DC, DH0,
        T, N, NBLK, S1, S2,
        SA0, SA1, SA2, SAT, SAN,
        SB0, SB1, SB2, SBT, SBN,
        SC0, SC1, SC2, SCT, SCN,
        SH0, SH1, SH2, SHN,
        HAS_C: tl.constexpr, HAS_H0: tl.constexpr, REVERSE: tl.constexpr,
        NEED_DA: tl.constexpr, NEED_DB: tl.constexpr, NEED_DC: tl.constexpr, NEED_DH0: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """DY (rows, T) with HAS_C (else (rows, T, N)), DHT (rows, N) contiguous; CKPT (rows, NBLK, N)
    fp32 scratch; DA, DB, DC (rows, T, N) and DH0 (rows, N) contiguous fp32 outputs."""
    r = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_i = tl.arange(0, BLOCK_T)
    a_ptr = A + _row(r, S1, S2, SA0, SA1, SA2)
    b_ptr = B + _row(r, S1, S2, SB0, SB1, SB2)
    c_ptr = C + _row(r, S1, S2, SC0, SC1, SC2)
    r64 = r.to(tl.int64)
    ck_ptr = CKPT + r64 * NBLK * N + offs_n

    # phase 1: forward sweep, storing the state entering every block
    if HAS_H0:
        h = tl.load(H0 + _row(r, S1, S2, SH0, SH1, SH2) + offs_n * SHN, mask=mask_n, other=0.0).to(tl.float32)
    else:
        h = tl.full((BLOCK_N,), 0.0, tl.float32)
    for k in range(0, NBLK):
        tl.store(ck_ptr + k * N, h, mask=mask_n)
        pos = k * BLOCK_T + offs_i
        t = _times(pos, T, REVERSE)
        m2 = (pos < T)[:, None] & mask_n[None, :]
        a = tl.load(a_ptr + t[:, None] * SAT + offs_n[None, :] * SAN, mask=m2, other=1.0).to(tl.float32)
        b = tl.load(b_ptr + t[:, None] * SBT + offs_n[None, :] * SBN, mask=m2, other=0.0).to(tl.float32)
        pa, pb = tl.associative_scan((a, b), 0, _affine_combine)
        h = tl.reduce(tl.where(offs_i[:, None] == BLOCK_T - 1, pa * h[None, :] + pb, 0.0), 0, _sum_combine)
    tl.debug_barrier()  # the checkpoints are read back below (by other threads of this program, maybe)

    # phase 2: the adjoint, blocks last to first; g carries ∂L/∂h of the position after the block
    # (the final state's gradient enters through a virtual step with a_T = 1)
    g = tl.load(DHT + r64 * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    for kk in range(0, NBLK):
        k = NBLK - 1 - kk
        pos = k * BLOCK_T + offs_i
        mask_t = pos < T
        t = _times(pos, T, REVERSE)
        m2 = mask_t[:, None] & mask_n[None, :]
        h_in = tl.load(ck_ptr + k * N, mask=mask_n, other=0.0)
        # phase 2a: the block's states h_t from its checkpoint
        a = tl.load(a_ptr + t[:, None] * SAT + offs_n[None, :] * SAN, mask=m2, other=1.0).to(tl.float32)
        b = tl.load(b_ptr + t[:, None] * SBT + offs_n[None, :] * SBN, mask=m2, other=0.0).to(tl.float32)
        pa, pb = tl.associative_scan((a, b), 0, _affine_combine)
        hs = pa * h_in[None, :] + pb
        # phase 2b: h_{t-1}: the maps shifted by one position, the first one the constant h_in
        pos_p = pos - 1
        t_p = _times(pos_p, T, REVERSE)
        m_p = ((pos_p >= k * BLOCK_T) & (pos_p < T))[:, None] & mask_n[None, :]
        a_p = tl.load(a_ptr + t_p[:, None] * SAT + offs_n[None, :] * SAN, mask=m_p, other=1.0).to(tl.float32)
        b_p = tl.load(b_ptr + t_p[:, None] * SBT + offs_n[None, :] * SBN, mask=m_p, other=0.0).to(tl.float32)
        first = (offs_i == 0)[:, None]
        a_p = tl.where(first, 0.0, a_p)
        b_p = tl.where(first, h_in[None, :], b_p)
        _, h_prev = tl.associative_scan((a_p, b_p), 0, _affine_combine)
        # phase 2c: what reaches h_t directly: dy_t·c_t with a readout, else dy_t
        if HAS_C:
            dy = tl.load(DY + r64 * T + t, mask=mask_t, other=0.0).to(tl.float32)
            c = tl.load(c_ptr + t[:, None] * SCT + offs_n[None, :] * SCN, mask=m2, other=0.0).to(tl.float32)
            direct = dy[:, None] * c
        else:
            direct = tl.load(DY + (r64 * T + t[:, None]) * N + offs_n[None, :], mask=m2, other=0.0).to(tl.float32)
        # phase 2d: the adjoint g_t = direct_t + a_{t+1}·g_{t+1}: a reverse scan of (a_{t+1}, direct_t),
        # applied to the g carried from the next block (the last position's a_{t+1} is 1)
        pos_n = pos + 1
        t_n = _times(pos_n, T, REVERSE)
        m_n = (pos_n < T)[:, None] & mask_n[None, :]
        a_n = tl.load(a_ptr + t_n[:, None] * SAT + offs_n[None, :] * SAN, mask=m_n, other=1.0).to(tl.float32)
        ga, gb = tl.associative_scan((a_n, direct), 0, _affine_combine, reverse=True)
        gs = ga * g[None, :] + gb
        # phase 2e: the operands' gradients at these positions
        out = (r64 * T + t[:, None]) * N + offs_n[None, :]
        if NEED_DA:
            tl.store(DA + out, gs * h_prev, mask=m2)
        if NEED_DB:
            tl.store(DB + out, gs, mask=m2)
        if NEED_DC:
            tl.store(DC + out, dy[:, None] * hs, mask=m2)
        g = tl.reduce(tl.where(first, gs, 0.0), 0, _sum_combine)   # g_0 of this block

    # phase 3: the initial state's gradient dh0 = a_0·g_0
    if NEED_DH0:
        t0 = _times(offs_n * 0, T, REVERSE)
        a0 = tl.load(a_ptr + t0 * SAT + offs_n * SAN, mask=mask_n & (T > 0), other=1.0).to(tl.float32)
        tl.store(DH0 + r64 * N + offs_n, a0 * g, mask=mask_n)
