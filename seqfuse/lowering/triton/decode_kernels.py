"""Triton kernels of the recurrent (decode) form of seqfuse.ssd and seqfuse.scan; the host side is
:mod:`seqfuse.lowering.triton.decode`.

Both kernels walk time one step at a time with the state in fp32 registers: the form for decoding
(T = 1, one token per call, the state carried between calls) and for a few steps (T up to a
handful), where a chunk of the chunked kernels would be mostly padding.  Each step is a handful of
element-wise products and one reduction; no ``tl.dot``, no cumulative sums, no chunk tiles.

* ``ssd_decode_kernel``, grid (B·H, P blocks): one program per (batch b, head h, block of
  BLOCK_P value dims) holds S (BLOCK_P, BLOCK_N) and per step t

      decay   S  = exp(a_t) ⊙ S       (a scalar per head, or a gate per key dim n, ``DECAY``)
      write   S += x_t ⊗ b_t
      read    y_t = Σ_n S[:, n]·c_t[n]  (+ d ⊙ x_t)

  then writes the final state.
* ``scan_decode_kernel``, grid (row blocks, N blocks): one program per block of BLOCK_R rows and
  BLOCK_N state entries (with a readout the whole N, so y_t = Σ_n c_t[n]·h_t[n] is an in-program
  reduction) holds h (BLOCK_R, BLOCK_N) and per scan position i (time i, or T-1-i when
  ``REVERSE``) computes h = a_t ⊙ h + b_t; the readout reads h rounded to bf16 / fp16 when
  ``ROUND`` says so (seqfuse.scan's readout_dtype).  A row index is split into three coalesced batch
  indices as in :mod:`seqfuse.lowering.triton.scan_kernels` (each operand finds its row by its own
  strides: broadcast operands stay stride-0 views).

Operands are loaded in their own dtype (fp32, fp16, bf16) and converted to fp32; outputs are
stored in the dtype of the output buffers the host allocates.
"""
from __future__ import annotations

import triton
import triton.language as tl

#: True when ``@triton.jit`` below built interpreted kernels (TRITON_INTERPRET=1 at import)
INTERPRETED = bool(triton.knobs.runtime.interpret)

# No function of triton's standard library (tl.sum, tl.zeros, ...) is called: those are
# @triton.jit functions jitted for one mode when triton.language is first imported, and an
# interpreted kernel cannot call a compiled one (tl.reduce with the combine function below and
# tl.full stand in for them).


@triton.jit
def _sum_combine(x, y):
    return x + y


@triton.jit
def _round(x, ROUND: tl.constexpr):
    """``x`` (fp32) rounded to bf16 (ROUND 1) or fp16 (ROUND 2), to nearest even, and back; for
    ROUND 0 ``x`` itself (no instruction: the branches are resolved when the kernel is compiled).
    bf16 is rounded on the bits (add half an ulp of bf16, less one unless the kept last bit is odd;
    clear the dropped 16 bits; NaN kept), the same as the GPU's cvt.rn: the interpreter's
    fp32 -> bf16 cast truncates."""
    if ROUND == 1:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16) << 16
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    elif ROUND == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def ssd_decode_kernel(
        X, Bm, Cm, A, D, H0, Y, HT,
        T, H, P, N,
        SXB, SXT, SXH, SXP,
        SBB, SBT, SBH, SBN,
        SCB, SCT, SCH, SCN,
        SAB, SAT, SAH, SAN,
        SDH, SDP,
        SHB, SHH, SHP, SHN,
        DECAY: tl.constexpr, HAS_D: tl.constexpr, HAS_H0: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """x (B, T, H, P), b, c (B, T, H, N), a (B, T, H[, N]) (SAN = 0 for a scalar decay), d (H, P),
    h0 (B, H, P, N): strided views.  Y (B, T, H, P) and HT (B, H, P, N): contiguous, own dtype."""
    pid = tl.program_id(0)
    bi = (pid // H).to(tl.int64)
    hi = (pid % H).to(tl.int64)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < P
    mask_n = offs_n < N
    mask_pn = mask_p[:, None] & mask_n[None, :]
    x_ptr = X + bi * SXB + hi * SXH
    b_ptr = Bm + bi * SBB + hi * SBH
    c_ptr = Cm + bi * SCB + hi * SCH
    a_ptr = A + bi * SAB + hi * SAH

    # phase 0: the entering state (BLOCK_P, BLOCK_N) in fp32 (h0, or zero); the skip's d
    if HAS_H0:
        h0_ptr = H0 + bi * SHB + hi * SHH
        S = tl.load(h0_ptr + offs_p[:, None] * SHP + offs_n[None, :] * SHN, mask=mask_pn, other=0.0).to(tl.float32)
    else:
        S = tl.full((BLOCK_P, BLOCK_N), 0.0, tl.float32)
    if HAS_D:
        dvec = tl.load(D + hi * SDH + offs_p * SDP, mask=mask_p, other=0.0).to(tl.float32)

    for t in range(T):
        # phase 1: the step's x (p), b and c (n); entries past P or N are zero and stay zero
        x = tl.load(x_ptr + t * SXT + offs_p * SXP, mask=mask_p, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + t * SBT + offs_n * SBN, mask=mask_n, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + t * SCT + offs_n * SCN, mask=mask_n, other=0.0).to(tl.float32)
        # phase 2: decay the state (one factor per head, or one per key dim n)
        if DECAY == 1:
            S = S * tl.exp(tl.load(a_ptr + t * SAT).to(tl.float32))
        elif DECAY == 2:
            g = tl.exp(tl.load(a_ptr + t * SAT + offs_n * SAN, mask=mask_n, other=0.0).to(tl.float32))
            S = S * g[None, :]
        # phase 3: write x_t ⊗ b_t, read y_t = S·c_t (+ d ⊙ x_t)
        S = S + x[:, None] * b[None, :]
        y = tl.reduce(S * c[None, :], 1, _sum_combine)
        if HAS_D:
            y = y + dvec * x
        tl.store(Y + ((bi * T + t) * H + hi) * P + offs_p, y.to(Y.dtype.element_ty), mask=mask_p)

    # phase 4: the final state
    ht_ptr = HT + ((bi * H + hi) * P + offs_p[:, None]) * N + offs_n[None, :]
    tl.store(ht_ptr, S.to(HT.dtype.element_ty), mask=mask_pn)


@triton.jit
def _rows(r, S1, S2, ST0, ST1, ST2):
    """Element offsets of rows ``r`` of a strided operand (batch dims coalesced to three)."""
    i2 = r % S2
    i1 = (r // S2) % S1
    i0 = r // S2 // S1
    return i0.to(tl.int64) * ST0 + i1.to(tl.int64) * ST1 + i2.to(tl.int64) * ST2


@triton.jit
def scan_decode_kernel(
        A, B, C, H0, Y, HT,
        T, N, ROWS, S1, S2,
        SA0, SA1, SA2, SAT, SAN,
        SB0, SB1, SB2, SBT, SBN,
        SC0, SC1, SC2, SCT, SCN,
        SH0, SH1, SH2, SHN,
        HAS_C: tl.constexpr, HAS_H0: tl.constexpr, REVERSE: tl.constexpr, ROUND: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """a, b, c (rows, T, N), h0 (rows, N): strided, rows coalesced to three dims (S0, S1, S2).
    Y (rows, T) with HAS_C (else (rows, T, N)) and HT (rows, N): contiguous, own dtype.  The
    readout reads the states rounded by ROUND (seqfuse.scan's readout_dtype; see _round)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = r < ROWS
    mask_n = offs_n < N
    m2 = mask_r[:, None] & mask_n[None, :]
    a_ptr = A + _rows(r, S1, S2, SA0, SA1, SA2)[:, None] + offs_n[None, :] * SAN
    b_ptr = B + _rows(r, S1, S2, SB0, SB1, SB2)[:, None] + offs_n[None, :] * SBN
    c_ptr = C + _rows(r, S1, S2, SC0, SC1, SC2)[:, None] + offs_n[None, :] * SCN
    r64 = r.to(tl.int64)

    # phase 0: the entering state (BLOCK_R, BLOCK_N) in fp32 (h0, or zero)
    if HAS_H0:
        h = tl.load(H0 + _rows(r, S1, S2, SH0, SH1, SH2)[:, None] + offs_n[None, :] * SHN,
                    mask=m2, other=0.0).to(tl.float32)
    else:
        h = tl.full((BLOCK_R, BLOCK_N), 0.0, tl.float32)

    for i in range(T):
        # phase 1: the step's time index (scan order), a_t and b_t
        if REVERSE:
            t = T - 1 - i
        else:
            t = i
        a = tl.load(a_ptr + t * SAT, mask=m2, other=1.0).to(tl.float32)
        b = tl.load(b_ptr + t * SBT, mask=m2, other=0.0).to(tl.float32)
        # phase 2: the step
        h = a * h + b
        # phase 3: the readout y_t = Σ_n c_t[n]·h_t[n] (the whole N in this program), or the state
        if HAS_C:
            c = tl.load(c_ptr + t * SCT, mask=m2, other=0.0).to(tl.float32)
            y = tl.reduce(c * _round(h, ROUND), 1, _sum_combine)
            tl.store(Y + r64 * T + t, y.to(Y.dtype.element_ty), mask=mask_r)
        else:
            tl.store(Y + (r64[:, None] * T + t) * N + offs_n[None, :], h.to(Y.dtype.element_ty), mask=m2)

    # phase 4: the final state (the one at t = 0 when REVERSE)
    tl.store(HT + r64[:, None] * N + offs_n[None, :], h.to(HT.dtype.element_ty), mask=m2)
