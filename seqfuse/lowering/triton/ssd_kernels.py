"""Triton kernels of seqfuse.ssd; the host side is :mod:`seqfuse.lowering.triton.ssd`.

``ssd_chunked_bwd_kernel`` (decay none / scalar; after the forward) is the adjoint of the
forward below, one program per (b, h) with all of P and N: a forward sweep stores the state
entering each chunk, then the chunks are taken last to first carrying ∂L/∂S backwards.
``ssd_vector_bwd_kernel`` (decay vector; at the end of this file) does the same per
(BLOCK_P, BLOCK_N) tile of the state, with the exact (BLOCK_T, BLOCK_T, BLOCK_N) decay tile.

``ssd_chunked_fwd_kernel`` runs the chunked (Mamba-2 SSD) algorithm fused in one launch: one
program per (batch b, head h, block of BLOCK_P value dims) walks the chunks of BLOCK_T steps in
order, keeping the state S (BLOCK_P, N) in fp32 registers.  Per chunk, with cum the inclusive
cumulative log-decay from the chunk's start (``tl.associative_scan``) and last = cum at its end:

    intra   y[l]  = Σ_{s<=l} (c_l · L[l, s] · b_s)·x_s,   L[l, s] = exp(cum_l - cum_s)
    inter   y[l] += exp(cum_l) ⊙ (S · c_l)                (the state entering the chunk)
    skip    y[l] += d ⊙ x_l
    state   S     = exp(last) ⊙ S + Σ_s x_s ⊗ (exp(last - cum_s) ⊙ b_s)

Every exponent is a difference cum_l - cum_s with s <= l inside one chunk (masked to -inf above
the diagonal *before* exp), cum_l itself, or last - cum_s: for decays (a <= 0) all are <= 0,
so nothing overflows however strong the decay.  The decay kinds (``DECAY``):

* 0, none (linear attention): L = 1 on and below the diagonal;
* 1, scalar (a (B, T, H), Mamba-2 / RetNet): L is a (BLOCK_T, BLOCK_T) tile, scores = (C·Bᵀ) ∘ L
  with one ``tl.dot``;
* 2, vector (a (B, T, H, N), GLA): L differs per key dim n, so the scores are an exact
  (BLOCK_T, BLOCK_T, N) product reduced over n (no q·exp(cum) / k·exp(-cum) factoring, whose
  exp(-cum) overflows for strong gates); the chunk is kept short (BLOCK_T = 16 on a GPU; see ssd.py GPU_CONFIG).

The products with x and with the state are ``tl.dot`` on fp32 tiles with fp32 accumulation
(``PRECISION``: "ieee" in the interpreter; on a GPU fp32-accurate "tf32x3" for fp32 operands,
"tf32" for fp16 / bf16 operands).
"""
from __future__ import annotations

import triton
import triton.language as tl

#: True when ``@triton.jit`` below built interpreted kernels (TRITON_INTERPRET=1 at import)
INTERPRETED = bool(triton.knobs.runtime.interpret)

# No function of triton's standard library (tl.sum, tl.zeros, tl.cumsum, ...) is called: those are
# @triton.jit functions jitted for one mode when triton.language is first imported, and an
# interpreted kernel cannot call a compiled one (tl.reduce / tl.associative_scan with the combine
# function below and tl.full stand in for them).


@triton.jit
def _sum_combine(x, y):
    return x + y


@triton.jit
def _log_cum(a):
    """Cumulative log-decays along axis 0 that keep a log-decay of -inf (exp(-inf) = 0: a reset, as
    the program's loop computes it) exact: (cum, last) sum the finite ones, (ncum, nlast) count the
    -inf ones.  A segment sum is then -inf when a reset lies inside it, never -inf - (-inf) = NaN."""
    neg = a == float("-inf")
    fin = tl.where(neg, 0.0, a)
    cnt = tl.where(neg, 1.0, 0.0)
    return (tl.associative_scan(fin, 0, _sum_combine), tl.reduce(fin, 0, _sum_combine),
            tl.associative_scan(cnt, 0, _sum_combine), tl.reduce(cnt, 0, _sum_combine))


@triton.jit
def ssd_chunked_fwd_kernel(
        X, Bm, Cm, A, D, H0, Y, HT,
        T, H, P, N,
        SXB, SXT, SXH, SXP,
        SBB, SBT, SBH, SBN,
        SCB, SCT, SCH, SCN,
        SAB, SAT, SAH, SAN,
        SDH, SDP,
        SHB, SHH, SHP, SHN,
        DECAY: tl.constexpr, HAS_D: tl.constexpr, HAS_H0: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """x (B, T, H, P), b, c (B, T, H, N), a (B, T, H[, N]), d (H, P), h0 (B, H, P, N): strided views.
    Y (B, T, H, P) and HT (B, H, P, N): contiguous, in their own dtype."""
    pid = tl.program_id(0)
    bi = (pid // H).to(tl.int64)
    hi = (pid % H).to(tl.int64)
    p0 = tl.program_id(1) * BLOCK_P
    offs_p = p0 + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_T)
    mask_p = offs_p < P
    mask_n = offs_n < N
    causal = offs_l[:, None] >= offs_l[None, :]                       # (l, s): s <= l
    x_ptr = X + bi * SXB + hi * SXH
    b_ptr = Bm + bi * SBB + hi * SBH
    c_ptr = Cm + bi * SCB + hi * SCH
    a_ptr = A + bi * SAB + hi * SAH

    # phase 0: the state entering the first chunk, (BLOCK_P, BLOCK_N) fp32; the skip's d
    if HAS_H0:
        h0_ptr = H0 + bi * SHB + hi * SHH
        S = tl.load(h0_ptr + offs_p[:, None] * SHP + offs_n[None, :] * SHN,
                    mask=mask_p[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    else:
        S = tl.full((BLOCK_P, BLOCK_N), 0.0, tl.float32)
    if HAS_D:
        dvec = tl.load(D + hi * SDH + offs_p * SDP, mask=mask_p, other=0.0).to(tl.float32)

    for t0 in range(0, T, BLOCK_T):
        # phase 1: the chunk's x (l, p), b and c (l, n); padded steps are zero (they change nothing)
        t = t0 + offs_l
        mask_t = t < T
        mtn = mask_t[:, None] & mask_n[None, :]
        mtp = mask_t[:, None] & mask_p[None, :]
        x = tl.load(x_ptr + t[:, None] * SXT + offs_p[None, :] * SXP, mask=mtp, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + t[:, None] * SBT + offs_n[None, :] * SBN, mask=mtn, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + t[:, None] * SCT + offs_n[None, :] * SCN, mask=mtn, other=0.0).to(tl.float32)

        if DECAY == 0:
            # phase 2 (none): scores = (C·Bᵀ) on and below the diagonal
            scores = tl.dot(c, tl.trans(b), input_precision=PRECISION)
            scores = tl.where(causal, scores, 0.0)
            # phase 3: intra-chunk output + the entering state read out
            y = tl.dot(scores, x, input_precision=PRECISION)
            y += tl.dot(c, tl.trans(S), input_precision=PRECISION)
            # phase 4: the state after the chunk
            S += tl.dot(tl.trans(x), b, input_precision=PRECISION)
        elif DECAY == 1:
            # phase 2 (scalar): cumulative log-decay from the chunk start, and over the whole chunk
            a = tl.load(a_ptr + t * SAT, mask=mask_t, other=0.0).to(tl.float32)
            #          (a -inf log-decay, a reset, counted apart: _log_cum)
            cum, last, ncum, nlast = _log_cum(a)                         # (l,), (), (l,), ()
            seg = tl.where(causal & (ncum[:, None] == ncum[None, :]), cum[:, None] - cum[None, :], float("-inf"))
            scores = tl.dot(c, tl.trans(b), input_precision=PRECISION) * tl.exp(seg)
            # phase 3: intra-chunk output + the entering state read out, decayed to step l
            y = tl.dot(scores, x, input_precision=PRECISION)
            y += tl.dot(c, tl.trans(S), input_precision=PRECISION) * tl.exp(tl.where(ncum > 0, float("-inf"), cum))[:, None]
            # phase 4: the state after the chunk: inputs decayed to the chunk's end
            w = tl.exp(tl.where(nlast > ncum, float("-inf"), last - cum))
            S = S * tl.exp(tl.where(nlast > 0, float("-inf"), last)) + tl.dot(tl.trans(x * w[:, None]), b,
                                                                              input_precision=PRECISION)
        else:
            # phase 2 (vector): cum (l, n) per key dim; scores by the exact (l, s, n) product
            a = tl.load(a_ptr + t[:, None] * SAT + offs_n[None, :] * SAN, mask=mtn, other=0.0).to(tl.float32)
            cum, last, ncum, nlast = _log_cum(a)                         # (l, n), (n,), (l, n), (n,)
            seg = tl.where(causal[:, :, None] & (ncum[:, None, :] == ncum[None, :, :]),
                           cum[:, None, :] - cum[None, :, :], float("-inf"))
            scores = tl.reduce(c[:, None, :] * tl.exp(seg) * b[None, :, :], 2, _sum_combine)
            # phase 3: intra-chunk output + the entering state read out with c ⊙ exp(cum)
            y = tl.dot(scores, x, input_precision=PRECISION)
            y += tl.dot(c * tl.exp(tl.where(ncum > 0, float("-inf"), cum)), tl.trans(S), input_precision=PRECISION)
            # phase 4: the state after the chunk, decayed per key dim
            tail = tl.where(nlast[None, :] > ncum, float("-inf"), last[None, :] - cum)
            S = S * tl.exp(tl.where(nlast > 0, float("-inf"), last))[None, :] + \
                tl.dot(tl.trans(x), b * tl.exp(tail), input_precision=PRECISION)

        # phase 5: the skip, and the chunk's output
        if HAS_D:
            y += x * dvec[None, :]
        y_ptr = Y + ((bi * T + t[:, None]) * H + hi) * P + offs_p[None, :]
        tl.store(y_ptr, y.to(Y.dtype.element_ty), mask=mtp)

    # phase 6: the final state
    ht_ptr = HT + ((bi * H + hi) * P + offs_p[:, None]) * N + offs_n[None, :]
    tl.store(ht_ptr, S.to(HT.dtype.element_ty), mask=mask_p[:, None] & mask_n[None, :])


@triton.jit
def ssd_chunked_bwd_kernel(
        X, Bm, Cm, A, D, H0, DY, DHT, CKPT,
        DX, DB, DC, DA, DD, DH0,
        T, H, P, N, NCHUNK,
        SXB, SXT, SXH, SXP,
        SBB, SBT, SBH, SBN,
        SCB, SCT, SCH, SCN,
        SAB, SAT, SAH,
        SDH, SDP,
        SHB, SHH, SHP, SHN,
        DECAY: tl.constexpr, HAS_D: tl.constexpr, HAS_H0: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """The adjoint of ``ssd_chunked_fwd_kernel`` for decay none (0) / scalar (1); one program per
    (b, h) holding all of P and N.  DY (B, T, H, P), DHT (B, H, P, N) contiguous; CKPT (B, H, NCHUNK,
    P, N) fp32 scratch; fp32 contiguous outputs DX (B, T, H, P), DB, DC (B, T, H, N), DA (B, T, H),
    DD (B, H, P) (per (b, h) partial sums of dy ⊙ x), DH0 (B, H, P, N)."""
    pid = tl.program_id(0)
    bi = (pid // H).to(tl.int64)
    hi = (pid % H).to(tl.int64)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_T)
    mask_p = offs_p < P
    mask_n = offs_n < N
    mpn = mask_p[:, None] & mask_n[None, :]
    causal = offs_l[:, None] >= offs_l[None, :]
    x_ptr = X + bi * SXB + hi * SXH
    b_ptr = Bm + bi * SBB + hi * SBH
    c_ptr = Cm + bi * SCB + hi * SCH
    a_ptr = A + bi * SAB + hi * SAH
    pn = offs_p[:, None] * N + offs_n[None, :]
    ck_ptr = CKPT + pid.to(tl.int64) * NCHUNK * P * N + pn
    if HAS_D:
        dvec = tl.load(D + hi * SDH + offs_p * SDP, mask=mask_p, other=0.0).to(tl.float32)

    # phase 1: forward sweep over the chunks, storing the state entering each one
    if HAS_H0:
        S = tl.load(H0 + bi * SHB + hi * SHH + offs_p[:, None] * SHP + offs_n[None, :] * SHN,
                    mask=mpn, other=0.0).to(tl.float32)
    else:
        S = tl.full((BLOCK_P, BLOCK_N), 0.0, tl.float32)
    for k in range(0, NCHUNK):
        tl.store(ck_ptr + k * P * N, S, mask=mpn)
        t = k * BLOCK_T + offs_l
        mask_t = t < T
        x = tl.load(x_ptr + t[:, None] * SXT + offs_p[None, :] * SXP, mask=mask_t[:, None] & mask_p[None, :],
                    other=0.0).to(tl.float32)
        b = tl.load(b_ptr + t[:, None] * SBT + offs_n[None, :] * SBN, mask=mask_t[:, None] & mask_n[None, :],
                    other=0.0).to(tl.float32)
        if DECAY == 1:
            a = tl.load(a_ptr + t * SAT, mask=mask_t, other=0.0).to(tl.float32)
            cum, last, ncum, nlast = _log_cum(a)
            w = tl.exp(tl.where(nlast > ncum, float("-inf"), last - cum))
            S = S * tl.exp(tl.where(nlast > 0, float("-inf"), last)) + tl.dot(tl.trans(x * w[:, None]), b,
                                                                              input_precision=PRECISION)
        else:
            S += tl.dot(tl.trans(x), b, input_precision=PRECISION)
    tl.debug_barrier()  # the checkpoints are read back below

    # phase 2: chunks last to first; dS is ∂L/∂(state after the chunk)
    dS = tl.load(DHT + pid.to(tl.int64) * P * N + pn, mask=mpn, other=0.0).to(tl.float32)
    dd = tl.full((BLOCK_P,), 0.0, tl.float32)
    for kk in range(0, NCHUNK):
        k = NCHUNK - 1 - kk
        t = k * BLOCK_T + offs_l
        mask_t = t < T
        mtp = mask_t[:, None] & mask_p[None, :]
        mtn = mask_t[:, None] & mask_n[None, :]
        x = tl.load(x_ptr + t[:, None] * SXT + offs_p[None, :] * SXP, mask=mtp, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + t[:, None] * SBT + offs_n[None, :] * SBN, mask=mtn, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + t[:, None] * SCT + offs_n[None, :] * SCN, mask=mtn, other=0.0).to(tl.float32)
        dy_off = ((bi * T + t[:, None]) * H + hi) * P + offs_p[None, :]
        dy = tl.load(DY + dy_off, mask=mtp, other=0.0).to(tl.float32)
        S_in = tl.load(ck_ptr + k * P * N, mask=mpn, other=0.0)
        # phase 2a: the chunk's decays (ones without decay)
        if DECAY == 1:
            a = tl.load(a_ptr + t * SAT, mask=mask_t, other=0.0).to(tl.float32)
            cum, last, ncum, nlast = _log_cum(a)
            Lm = tl.exp(tl.where(causal & (ncum[:, None] == ncum[None, :]), cum[:, None] - cum[None, :],
                                 float("-inf")))
            E = tl.exp(tl.where(ncum > 0, float("-inf"), cum))
            w = tl.exp(tl.where(nlast > ncum, float("-inf"), last - cum))
            g_last = tl.exp(tl.where(nlast > 0, float("-inf"), last))
        else:
            Lm = tl.where(causal, 1.0, 0.0)
            E = tl.full((BLOCK_T,), 1.0, tl.float32)
            w = tl.full((BLOCK_T,), 1.0, tl.float32)
            g_last = 1.0
        # phase 2b: the entering state's readout y_off = (c·S_inᵀ) ⊙ E
        dZ = dy * E[:, None]                                                     # (l, p)
        dc = tl.dot(dZ, S_in, input_precision=PRECISION)                         # (l, n)
        dS_read = tl.dot(tl.trans(dZ), c, input_precision=PRECISION)             # (p, n)
        Z = tl.dot(c, tl.trans(S_in), input_precision=PRECISION)                 # (l, p)
        dcum = tl.reduce(dy * Z, 1, _sum_combine) * E
        # phase 2c: inside the chunk, y_diag = ((c·bᵀ) ⊙ L)·x
        G = tl.dot(c, tl.trans(b), input_precision=PRECISION)                    # (l, s)
        dscores = tl.dot(dy, tl.trans(x), input_precision=PRECISION)             # (l, s)
        dx = tl.dot(tl.trans(G * Lm), dy, input_precision=PRECISION)             # (s, p)
        dG = dscores * Lm
        dc += tl.dot(dG, b, input_precision=PRECISION)
        db = tl.dot(tl.trans(dG), c, input_precision=PRECISION)                  # (s, n)
        dseg = dG * G
        dcum += tl.reduce(dseg, 1, _sum_combine) - tl.reduce(dseg, 0, _sum_combine)
        # phase 2d: what the chunk adds to the state, (x ⊙ w)ᵀ·b
        dxw = tl.dot(b, tl.trans(dS), input_precision=PRECISION)                 # (s, p)
        db += tl.dot(x * w[:, None], dS, input_precision=PRECISION)
        dx += dxw * w[:, None]
        dw = tl.reduce(dxw * x, 1, _sum_combine) * w
        dcum -= dw
        # phase 2e: the decay over the whole chunk, S_out = exp(last)·S_in + ...: ∂last, and dS moves
        # to the state entering the chunk
        dlast = tl.reduce(dw, 0, _sum_combine) + g_last * tl.reduce(tl.reduce(dS * S_in, 1, _sum_combine), 0,
                                                                     _sum_combine)
        dS = dS_read + g_last * dS
        # phase 2f: da = reversed cumulative sum of ∂cum (last = cum at the chunk's end)
        if DECAY == 1:
            dcum += tl.where(offs_l == BLOCK_T - 1, dlast, 0.0)
            da = tl.associative_scan(dcum, 0, _sum_combine, reverse=True)
            tl.store(DA + (bi * T + t) * H + hi, da, mask=mask_t)
        # phase 2g: the skip, and the chunk's gradients
        if HAS_D:
            dx += dy * dvec[None, :]
            dd += tl.reduce(dy * x, 0, _sum_combine)
        tl.store(DX + dy_off, dx, mask=mtp)
        bn_off = ((bi * T + t[:, None]) * H + hi) * N + offs_n[None, :]
        tl.store(DB + bn_off, db, mask=mtn)
        tl.store(DC + bn_off, dc, mask=mtn)

    # phase 3: the initial state's gradient and the skip's per-(b, h) partial sums
    tl.store(DH0 + pid.to(tl.int64) * P * N + pn, dS, mask=mpn)
    if HAS_D:
        tl.store(DD + pid.to(tl.int64) * P + offs_p, dd, mask=mask_p)


@triton.jit
def ssd_vector_bwd_kernel(
        X, Bm, Cm, A, D, H0, DY, DHT, CKPT,
        DX, DB, DC, DA, DD, DH0,
        T, H, P, N, NCHUNK, SPLIT_P, SPLIT_N,
        SXB, SXT, SXH, SXP,
        SBB, SBT, SBH, SBN,
        SCB, SCT, SCH, SCN,
        SAB, SAT, SAH, SAN,
        SDH, SDP,
        SHB, SHH, SHP, SHN,
        HAS_D: tl.constexpr, HAS_H0: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """The adjoint of ``ssd_chunked_fwd_kernel`` for decay vector (2); one program per (b, h, block of
    BLOCK_P value dims, block of BLOCK_N key dims): the state's rows p and, for a vector decay, its
    columns n evolve independently, so a program owns a (BLOCK_P, BLOCK_N) tile of it.

    What sums over p (db, dc, da) or over n (dx) is written per block and summed by the host:
    DB, DC, DA (NPB, B, T, H, N) with SPLIT_P = B·T·H·N between the P blocks; DX (NNB, B, T, H, P)
    with SPLIT_N = B·T·H·P between the N blocks; all fp32 contiguous.  DY (B, T, H, P) and DHT
    (B, H, P, N) contiguous; CKPT (B, H, NCHUNK, P, N) fp32 scratch; DD (B, H, P) (per (b, h)
    partial sums of dy ⊙ x, from the first N block), DH0 (B, H, P, N).

    Per chunk, with cum (l, n) the inclusive cumulative log-decay, E = exp(cum), w = exp(last - cum),
    g = exp(last) and L[l, s, n] = exp(cum_l - cum_s) (s <= l), the forward was
        y = scores·x + (c ⊙ E)·S_inᵀ,   scores[l, s] = Σ_n c_l[n]·L[l, s, n]·b_s[n]
        S_out = g ⊙ S_in + xᵀ·(b ⊙ w)
    and ∂cum collapses to c ⊙ dc - b ⊙ db (every term with c_l or b_s carries exp(±cum) of the
    same step), plus ∂last from the state terms."""
    pid = tl.program_id(0)
    bi = (pid // H).to(tl.int64)
    hi = (pid % H).to(tl.int64)
    pb = tl.program_id(1)
    nb = tl.program_id(2)
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_T)
    mask_p = offs_p < P
    mask_n = offs_n < N
    mpn = mask_p[:, None] & mask_n[None, :]
    causal = offs_l[:, None] >= offs_l[None, :]
    x_ptr = X + bi * SXB + hi * SXH
    b_ptr = Bm + bi * SBB + hi * SBH
    c_ptr = Cm + bi * SCB + hi * SCH
    a_ptr = A + bi * SAB + hi * SAH
    pn = offs_p[:, None] * N + offs_n[None, :]
    ck_ptr = CKPT + pid.to(tl.int64) * NCHUNK * P * N + pn
    if HAS_D:
        dvec = tl.load(D + hi * SDH + offs_p * SDP, mask=mask_p, other=0.0).to(tl.float32)

    # phase 1: forward sweep over the chunks, storing the state tile entering each one
    if HAS_H0:
        S = tl.load(H0 + bi * SHB + hi * SHH + offs_p[:, None] * SHP + offs_n[None, :] * SHN,
                    mask=mpn, other=0.0).to(tl.float32)
    else:
        S = tl.full((BLOCK_P, BLOCK_N), 0.0, tl.float32)
    for k in range(0, NCHUNK):
        tl.store(ck_ptr + k * P * N, S, mask=mpn)
        t = k * BLOCK_T + offs_l
        mask_t = t < T
        mtn = mask_t[:, None] & mask_n[None, :]
        x = tl.load(x_ptr + t[:, None] * SXT + offs_p[None, :] * SXP, mask=mask_t[:, None] & mask_p[None, :],
                    other=0.0).to(tl.float32)
        b = tl.load(b_ptr + t[:, None] * SBT + offs_n[None, :] * SBN, mask=mtn, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + t[:, None] * SAT + offs_n[None, :] * SAN, mask=mtn, other=0.0).to(tl.float32)
        cum, last, ncum, nlast = _log_cum(a)                             # (l, n), (n,), (l, n), (n,)
        tail = tl.where(nlast[None, :] > ncum, float("-inf"), last[None, :] - cum)
        S = S * tl.exp(tl.where(nlast > 0, float("-inf"), last))[None, :] + \
            tl.dot(tl.trans(x), b * tl.exp(tail), input_precision=PRECISION)
    tl.debug_barrier()  # the checkpoints are read back below

    # phase 2: chunks last to first; dS is ∂L/∂(state tile after the chunk)
    dS = tl.load(DHT + pid.to(tl.int64) * P * N + pn, mask=mpn, other=0.0).to(tl.float32)
    dd = tl.full((BLOCK_P,), 0.0, tl.float32)
    for kk in range(0, NCHUNK):
        k = NCHUNK - 1 - kk
        t = k * BLOCK_T + offs_l
        mask_t = t < T
        mtp = mask_t[:, None] & mask_p[None, :]
        mtn = mask_t[:, None] & mask_n[None, :]
        x = tl.load(x_ptr + t[:, None] * SXT + offs_p[None, :] * SXP, mask=mtp, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + t[:, None] * SBT + offs_n[None, :] * SBN, mask=mtn, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + t[:, None] * SCT + offs_n[None, :] * SCN, mask=mtn, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + t[:, None] * SAT + offs_n[None, :] * SAN, mask=mtn, other=0.0).to(tl.float32)
        dy_off = ((bi * T + t[:, None]) * H + hi) * P + offs_p[None, :]
        dy = tl.load(DY + dy_off, mask=mtp, other=0.0).to(tl.float32)
        S_in = tl.load(ck_ptr + k * P * N, mask=mpn, other=0.0)
        # phase 2a: the chunk's decays, every exponent <= 0 (L masked on the exponent before exp)
        cum, last, ncum, nlast = _log_cum(a)                             # (l, n), (n,), (l, n), (n,)
        E = tl.exp(tl.where(ncum > 0, float("-inf"), cum))
        w = tl.exp(tl.where(nlast[None, :] > ncum, float("-inf"), last[None, :] - cum))
        g_last = tl.exp(tl.where(nlast > 0, float("-inf"), last))
        Lm = tl.exp(tl.where(causal[:, :, None] & (ncum[:, None, :] == ncum[None, :, :]),
                             cum[:, None, :] - cum[None, :, :], float("-inf")))  # (l, s, n)
        # phase 2b: the entering state's readout y_off = (c ⊙ E)·S_inᵀ
        dc = tl.dot(dy, S_in, input_precision=PRECISION) * E                  # (l, n)
        dS_read = tl.dot(tl.trans(dy), c * E, input_precision=PRECISION)      # (p, n)
        # phase 2c: inside the chunk, y_diag = scores·x (this N block's part of the scores)
        scores = tl.reduce(c[:, None, :] * Lm * b[None, :, :], 2, _sum_combine)     # (l, s)
        dx = tl.dot(tl.trans(scores), dy, input_precision=PRECISION)          # (s, p)
        dscores = tl.dot(dy, tl.trans(x), input_precision=PRECISION)          # (l, s), this P block's part
        dL = dscores[:, :, None] * Lm                                          # (l, s, n)
        dc += tl.reduce(dL * b[None, :, :], 1, _sum_combine)
        db = tl.reduce(dL * c[:, None, :], 0, _sum_combine)                    # (s, n)
        dcum = c * dc - b * db                                                 # ∂cum of the readout and the scores
        # phase 2d: what the chunk adds to the state, xᵀ·(b ⊙ w)
        db_state = tl.dot(x, dS, input_precision=PRECISION) * w               # (s, n)
        dx += tl.dot(b * w, tl.trans(dS), input_precision=PRECISION)          # (s, p)
        db += db_state
        bdw = b * db_state                                                     # ∂w ⊙ w
        dcum -= bdw
        # phase 2e: S_out = g ⊙ S_in + ...: ∂last, and dS moves to the state entering the chunk
        dlast = tl.reduce(bdw, 0, _sum_combine) + g_last * tl.reduce(dS * S_in, 0, _sum_combine)   # (n,)
        dS = dS_read + g_last[None, :] * dS
        # phase 2f: da = reversed cumulative sum of ∂cum (last = cum at the chunk's end)
        dcum += tl.where(offs_l[:, None] == BLOCK_T - 1, dlast[None, :], 0.0)
        da = tl.associative_scan(dcum, 0, _sum_combine, reverse=True)
        # phase 2g: the skip (once, from the first N block), and the chunk's partial gradients
        if HAS_D:
            dx += tl.where(nb == 0, dy * dvec[None, :], 0.0)
            dd += tl.reduce(dy * x, 0, _sum_combine)
        tl.store(DX + nb.to(tl.int64) * SPLIT_N + dy_off, dx, mask=mtp)
        bn_off = pb.to(tl.int64) * SPLIT_P + ((bi * T + t[:, None]) * H + hi) * N + offs_n[None, :]
        tl.store(DB + bn_off, db, mask=mtn)
        tl.store(DC + bn_off, dc, mask=mtn)
        tl.store(DA + bn_off, da, mask=mtn)

    # phase 3: the initial state's gradient tile and the skip's per-(b, h) partial sums
    tl.store(DH0 + pid.to(tl.int64) * P * N + pn, dS, mask=mpn)
    if HAS_D:
        tl.store(DD + pid.to(tl.int64) * P + offs_p, dd, mask=mask_p & (nb == 0))
