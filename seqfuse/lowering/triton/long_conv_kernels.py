"""Triton kernels of seqfuse.long_conv; the host side is :mod:`seqfuse.lowering.triton.long_conv`.

Every kernel works on *rows*: one row is one sequence (b, h, ...) of the
broadcast output.  A row index r is split into three coalesced batch indices
(i0, i1, i2) of sizes (S0, S1, S2) and each strided operand finds its row by
its own strides (``_row``), so broadcast operands (stride 0) are never
materialized.  Scratch buffers and outputs are contiguous (rows, T).

Two algorithms:

* direct (``toeplitz_kernel``): the time axis is cut into blocks of M samples;
  for a lag of δ blocks the taps between two blocks form an M×M Toeplitz
  matrix, so a tile of BLOCK_A blocks is updated with one tensor-core product
  per lag: Y[a, :] += X[a ∓ δ, :] @ T_δ.  The same kernel computes the
  causal convolution (forward, ``CORRELATE=False``) and the correlations of
  the backward (du, dk; ``CORRELATE=True``).
* FFT (``fft_cols_kernel``, ``fft_rows_kernel``, ``ifft_cols_kernel``): the
  four-step (Monarch) factorization of the DFT of size N = N1·N2: a signal
  x[N2·n1 + n2] viewed as an N1×N2 matrix A is transformed as
  D = ((F_N1 @ A) ∘ T) @ F_N2, D[f1, f2] = X̂[f1 + N1·f2], T[f1, n2] =
  ω_N^(f1·n2); the inverse runs the same steps backwards with conjugates.
  Real and imaginary parts are separate fp32 tiles; every product is a
  ``tl.dot``.  Spectra are stored in the D layout (rows, N1, N2).

The epilogue of the forward, y = act(scale·conv + d·u) · gate, and of the
backward's first step (dz = ∂y/∂z with z the activation's input, plus the
per-element pieces of ∂gate and ∂d) is fused into the last phase of both
algorithms (``_epilogue``).
"""
from __future__ import annotations

import triton
import triton.language as tl

#: True when ``@triton.jit`` below built interpreted kernels (TRITON_INTERPRET=1 at import)
INTERPRETED = bool(triton.knobs.runtime.interpret)

# No function of triton's standard library (tl.zeros, tl.sigmoid, tl.cdiv, ...) is called: those are
# @triton.jit functions jitted for one mode when triton.language is first imported, and an interpreted
# kernel cannot call a compiled one (tl.full, exp and integer division stand in for them).


@triton.jit
def _row(r, S1, S2, ST0, ST1, ST2):
    """Element offset of row ``r`` of a strided operand (batch dims coalesced to three)."""
    i2 = r % S2
    i1 = (r // S2) % S1
    i0 = r // S2 // S1
    return i0.to(tl.int64) * ST0 + i1.to(tl.int64) * ST1 + i2.to(tl.int64) * ST2


@triton.jit
def _epilogue(c, q, mask, r, X, x_row, SXT, D, d_row, SDT, G, g_row, SGT, GR, gr_row, SGRT,
              Y, GA, DZU, YL, scale,
              HAS_D: tl.constexpr, HAS_GATE: tl.constexpr, SILU: tl.constexpr, BACKWARD: tl.constexpr,
              STORE_GA: tl.constexpr, STORE_DZU: tl.constexpr):
    """The fused epilogue on a tile ``c`` of the convolution at times ``q`` of row ``r``.

    forward:  Y = act(z) · gate,  z = scale·c + d·x
    backward: Y = dz = grad · gate · act'(z);  GA = grad · act(z) (∂gate per element);
              DZU = dz · x (∂d per element).  Outputs are contiguous rows of length YL.
    """
    # skip connection: z = scale·c + d·x
    z = c * scale
    if HAS_D or STORE_DZU:
        x = tl.load(X + x_row + q * SXT, mask=mask, other=0.0).to(tl.float32)
    if HAS_D:
        dv = tl.load(D + d_row + q * SDT, mask=mask, other=0.0).to(tl.float32)
        z = z + dv * x
    # activation
    if SILU:
        sig = 1.0 / (1.0 + tl.exp(-z))
        act = z * sig
    else:
        act = z
    if HAS_GATE:
        gt = tl.load(G + g_row + q * SGT, mask=mask, other=0.0).to(tl.float32)
    out = r.to(tl.int64) * YL + q
    if not BACKWARD:
        # gate, store y
        if HAS_GATE:
            act = act * gt
        tl.store(Y + out, act.to(Y.dtype.element_ty), mask=mask)
    else:
        # backward of gate and activation: dz = grad · gate · act'(z)
        g = tl.load(GR + gr_row + q * SGRT, mask=mask, other=0.0).to(tl.float32)
        if STORE_GA:
            tl.store(GA + out, g * act, mask=mask)
        if HAS_GATE:
            g = g * gt
        if SILU:
            g = g * (sig * (1.0 + z * (1.0 - sig)))
        tl.store(Y + out, g.to(Y.dtype.element_ty), mask=mask)
        if STORE_DZU:
            tl.store(DZU + out, g * x, mask=mask)


@triton.jit
def toeplitz_kernel(X, K, D, G, GR, Y, GA, DZU,
                    L, KLEN, OUT_LEN, S1, S2,
                    SX0, SX1, SX2, SXT, SK0, SK1, SK2, SKT, SD0, SD1, SD2, SDT,
                    SG0, SG1, SG2, SGT, SR0, SR1, SR2, SRT,
                    scale,
                    CORRELATE: tl.constexpr, HAS_D: tl.constexpr, HAS_GATE: tl.constexpr, SILU: tl.constexpr,
                    BACKWARD: tl.constexpr, STORE_GA: tl.constexpr, STORE_DZU: tl.constexpr,
                    LOWP: tl.constexpr, PRECISION: tl.constexpr, BLOCK_A: tl.constexpr, M: tl.constexpr):
    """Direct convolution of one tile of BLOCK_A·M outputs of one row (grid: rows × tiles).

    CORRELATE=False: y[t] = Σ_{0≤s<KLEN} k[s]·x[t-s]      (x of length L; causal convolution)
    CORRELATE=True:  y[t] = Σ_{0≤s<KLEN} k[s]·x[t+s]      (x zero beyond L; the backward's correlations)
    for t < OUT_LEN, followed by the epilogue (forward: KLEN = taps, OUT_LEN = L).
    """
    r = tl.program_id(0)
    a0 = tl.program_id(1) * BLOCK_A
    x_row = _row(r, S1, S2, SX0, SX1, SX2)
    k_row = _row(r, S1, S2, SK0, SK1, SK2)
    a = a0 + tl.arange(0, BLOCK_A)          # time blocks of this tile
    i = tl.arange(0, M)                     # position inside a block
    acc = tl.full((BLOCK_A, M), 0.0, tl.float32)
    # lags δ (in blocks) holding a tap: s = δ·M ± (i - j) ∈ [0, KLEN)
    n_lag = (KLEN + M - 2) // M + 1
    if CORRELATE:
        n_lag = tl.minimum(n_lag, (L + M - 1) // M - a0)
    else:
        n_lag = tl.minimum(n_lag, a0 + BLOCK_A)
    for dl in range(0, n_lag):
        # phase 1: the source blocks a ∓ δ of the signal (zero outside [0, L))
        if CORRELATE:
            src = (a[:, None] + dl) * M + i[None, :]
        else:
            src = (a[:, None] - dl) * M + i[None, :]
        xs = tl.load(X + x_row + src * SXT, mask=(src >= 0) & (src < L), other=0.0)
        # phase 2: the Toeplitz block of the taps, T[j, i] = k[δ·M + i - j] (convolution)
        # or k[δ·M + j - i] (correlation)
        if CORRELATE:
            s = dl * M + i[:, None] - i[None, :]
        else:
            s = dl * M + i[None, :] - i[:, None]
        ks = tl.load(K + k_row + s * SKT, mask=(s >= 0) & (s < KLEN), other=0.0)
        # phase 3: Y[a, i] += Σ_j X[a ∓ δ, j] · T[j, i] on tensor cores
        if LOWP:
            acc = tl.dot(xs, ks, acc)
        else:
            acc = tl.dot(xs.to(tl.float32), ks.to(tl.float32), acc, input_precision=PRECISION)
    # phase 4: epilogue
    q = a[:, None] * M + i[None, :]
    _epilogue(acc, q, q < OUT_LEN, r,
              X, x_row, SXT, D, _row(r, S1, S2, SD0, SD1, SD2), SDT, G, _row(r, S1, S2, SG0, SG1, SG2), SGT,
              GR, _row(r, S1, S2, SR0, SR1, SR2), SRT, Y, GA, DZU, OUT_LEN, scale,
              HAS_D, HAS_GATE, SILU, BACKWARD, STORE_GA, STORE_DZU)


@triton.jit
def fft_cols_kernel(X, OR, OI, F1R, F1I, TWR, TWI,
                    LEN, S1, S2, SX0, SX1, SX2, SXT,
                    N1: tl.constexpr, N2: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Steps 1-2 of the forward DFT for columns [n2, n2 + BLOCK_N) of one row (grid: rows × N2/BLOCK_N):
    C[f1, n2] = T[f1, n2] · Σ_{n1} F_N1[f1, n1] · x[N2·n1 + n2]   (x real, zero-padded from LEN to N)."""
    r = tl.program_id(0)
    n2 = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    f1 = tl.arange(0, N1)
    x_row = _row(r, S1, S2, SX0, SX1, SX2)
    acc_r = tl.full((N1, BLOCK_N), 0.0, tl.float32)
    acc_i = tl.full((N1, BLOCK_N), 0.0, tl.float32)
    # step 1: length-N1 DFTs down the columns, contraction over n1 in blocks (x is real: 2 products)
    for kb in range(0, N1, BLOCK_K):
        n1 = kb + tl.arange(0, BLOCK_K)
        t = n1[:, None] * N2 + n2[None, :]
        xa = tl.load(X + x_row + t * SXT, mask=t < LEN, other=0.0).to(tl.float32)
        fr = tl.load(F1R + f1[:, None] * N1 + n1[None, :])
        fi = tl.load(F1I + f1[:, None] * N1 + n1[None, :])
        acc_r = tl.dot(fr, xa, acc_r, input_precision=PRECISION)
        acc_i = tl.dot(fi, xa, acc_i, input_precision=PRECISION)
    # step 2: twiddles T[f1, n2] = ω_N^(f1·n2)
    tw = f1[:, None] * N2 + n2[None, :]
    tr = tl.load(TWR + tw)
    ti = tl.load(TWI + tw)
    out = r.to(tl.int64) * (N1 * N2) + tw
    tl.store(OR + out, acc_r * tr - acc_i * ti)
    tl.store(OI + out, acc_r * ti + acc_i * tr)


@triton.jit
def fft_rows_kernel(XR, XI, YR, YI, SR, SI, F2R, F2I, TWR, TWI,
                    S1, S2, SS0, SS1, SS2,
                    N1: tl.constexpr, N2: tl.constexpr, FORWARD: tl.constexpr, MULT: tl.constexpr,
                    CONJ_X: tl.constexpr, CONJ_S: tl.constexpr, INVERSE: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The row-local middle of a convolution for rows [f1, f1 + BLOCK_M) of one row's N1×N2 matrix
    (grid: rows × N1/BLOCK_M); each phase is a compile-time flag:

      FORWARD  step 3 of the DFT:  D = C @ F_N2                    (else D is read from X)
      MULT     the spectral product D ← D · S (CONJ_X: conj(D), CONJ_S: conj(S)); S is a strided
               spectrum (the kernel's, broadcast over the batch, or another row-aligned one)
      INVERSE  steps 1-2 of the inverse DFT: E = (D @ conj(F_N2)) ∘ conj(T)
    The result (E, or D) goes to Y, which must not alias X."""
    r = tl.program_id(0)
    f1 = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, N2)
    base = r.to(tl.int64) * (N1 * N2)
    if FORWARD:
        # step 3: length-N2 DFTs along the rows, contraction over n2 in blocks (complex: 4 products)
        dr = tl.full((BLOCK_M, N2), 0.0, tl.float32)
        di = tl.full((BLOCK_M, N2), 0.0, tl.float32)
        for kb in range(0, N2, BLOCK_K):
            n2 = kb + tl.arange(0, BLOCK_K)
            cr = tl.load(XR + base + f1[:, None] * N2 + n2[None, :])
            ci = tl.load(XI + base + f1[:, None] * N2 + n2[None, :])
            fr = tl.load(F2R + n2[:, None] * N2 + cols[None, :])
            fi = tl.load(F2I + n2[:, None] * N2 + cols[None, :])
            dr = tl.dot(cr, fr, dr, input_precision=PRECISION)
            dr = tl.dot(-ci, fi, dr, input_precision=PRECISION)
            di = tl.dot(cr, fi, di, input_precision=PRECISION)
            di = tl.dot(ci, fr, di, input_precision=PRECISION)
    else:
        dr = tl.load(XR + base + f1[:, None] * N2 + cols[None, :])
        di = tl.load(XI + base + f1[:, None] * N2 + cols[None, :])
    if CONJ_X:
        di = -di
    if MULT:
        # pointwise product with the other spectrum (same D layout)
        s_row = _row(r, S1, S2, SS0, SS1, SS2)
        sr = tl.load(SR + s_row + f1[:, None] * N2 + cols[None, :])
        si = tl.load(SI + s_row + f1[:, None] * N2 + cols[None, :])
        if CONJ_S:
            si = -si
        pr = dr * sr - di * si
        di = dr * si + di * sr
        dr = pr
    if INVERSE:
        # inverse steps 1-2, one block of output columns at a time: E = (D @ conj(F_N2)) ∘ conj(T)
        for nb in range(0, N2, BLOCK_K):
            n2 = nb + tl.arange(0, BLOCK_K)
            fr = tl.load(F2R + cols[:, None] * N2 + n2[None, :])
            fi = tl.load(F2I + cols[:, None] * N2 + n2[None, :])
            er = tl.dot(dr, fr, input_precision=PRECISION)
            er = tl.dot(di, fi, er, input_precision=PRECISION)
            ei = tl.dot(di, fr, input_precision=PRECISION)
            ei = tl.dot(-dr, fi, ei, input_precision=PRECISION)
            tw = f1[:, None] * N2 + n2[None, :]
            tr = tl.load(TWR + tw)
            ti = tl.load(TWI + tw)
            tl.store(YR + base + tw, er * tr + ei * ti)
            tl.store(YI + base + tw, ei * tr - er * ti)
    else:
        tl.store(YR + base + f1[:, None] * N2 + cols[None, :], dr)
        tl.store(YI + base + f1[:, None] * N2 + cols[None, :], di)


@triton.jit
def ifft_cols_kernel(ER, EI, F1R, F1I,
                     X, D, G, GR, Y, GA, DZU,
                     OUT_LEN, S1, S2,
                     SX0, SX1, SX2, SXT, SD0, SD1, SD2, SDT, SG0, SG1, SG2, SGT, SR0, SR1, SR2, SRT,
                     scale,
                     HAS_D: tl.constexpr, HAS_GATE: tl.constexpr, SILU: tl.constexpr, BACKWARD: tl.constexpr,
                     STORE_GA: tl.constexpr, STORE_DZU: tl.constexpr,
                     N1: tl.constexpr, N2: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Step 3 of the inverse DFT for columns [n2, n2 + BLOCK_N) of one row, then the epilogue
    (grid: rows × N2/BLOCK_N):  c[N2·n1 + n2] = Re Σ_{f1} conj(F_N1)[n1, f1] · E[f1, n2] / N."""
    r = tl.program_id(0)
    n2 = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n1 = tl.arange(0, N1)
    base = r.to(tl.int64) * (N1 * N2)
    acc = tl.full((N1, BLOCK_N), 0.0, tl.float32)
    # inverse step 3: only the real part, Re(conj(F)·E) = F_re·E_re + F_im·E_im
    for kb in range(0, N1, BLOCK_K):
        f1 = kb + tl.arange(0, BLOCK_K)
        er = tl.load(ER + base + f1[:, None] * N2 + n2[None, :])
        ei = tl.load(EI + base + f1[:, None] * N2 + n2[None, :])
        fr = tl.load(F1R + n1[:, None] * N1 + f1[None, :])
        fi = tl.load(F1I + n1[:, None] * N1 + f1[None, :])
        acc = tl.dot(fr, er, acc, input_precision=PRECISION)
        acc = tl.dot(fi, ei, acc, input_precision=PRECISION)
    acc = acc * (1.0 / (N1 * N2))
    # epilogue on the first OUT_LEN samples
    q = n1[:, None] * N2 + n2[None, :]
    _epilogue(acc, q, q < OUT_LEN, r,
              X, _row(r, S1, S2, SX0, SX1, SX2), SXT, D, _row(r, S1, S2, SD0, SD1, SD2), SDT,
              G, _row(r, S1, S2, SG0, SG1, SG2), SGT, GR, _row(r, S1, S2, SR0, SR1, SR2), SRT,
              Y, GA, DZU, OUT_LEN, scale,
              HAS_D, HAS_GATE, SILU, BACKWARD, STORE_GA, STORE_DZU)
