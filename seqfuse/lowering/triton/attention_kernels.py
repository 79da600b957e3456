"""Triton kernels of seqfuse.attention: flash-attention forward and backward (dK/dV, dQ).

Imported lazily by :mod:`seqfuse.lowering.triton.attention` on the first call
that runs on the triton path: ``@triton.jit`` decides at decoration time
whether to compile or to interpret (``TRITON_INTERPRET=1``), so the decision
is taken when the kernels are first needed, not when seqfuse is imported.

Every kernel is specialized by its UPPER_CASE constexpr parameters; the
generator in ``attention.py`` derives them from the op's attributes:

  MASK            0 none, 1 causal (j <= i + diag), 2 window (i + diag - window < j <= i + diag)
  HAS_BIAS        an additive bias tensor is read (broadcast through its strides)
  HAS_KEEP        a boolean keep tensor is read (True = attend), as uint8
  BIAS_AFTER_MASK the bias is added after masked scores are replaced by ``fill``
  NEG_INF_FILL    fill is -inf: tiles the structural mask empties add exp(-inf) = 0
                  and are skipped (with a finite fill every tile counts)
  SOFTCAP         scores are soft-capped: c·tanh(s / c)
  EMPTY_ZERO      a row whose every score is -inf outputs 0 and passes no gradient
                  (empty_rows="zero"); otherwise NaN, as the softmax of all -inf gives
  GROUPS          query heads per key/value head (GQA/MQA): kv head = h // GROUPS
  HEAD_DIM(_V)    true head dims; BLOCK_D(_V) the power-of-two tiles covering them
  DOT_PRECISION   "ieee" for fp32 inputs (no TF32); "tf32" (unused) for fp16/bf16
  DOT_FP32        matrix-product operands are widened to fp32 after loading / rounding to the
                  input dtype (exact products, so the numbers do not change); set only under the
                  interpreter for bf16, whose tl.dot in triton 3.6 multiplies the raw bf16 bits
  EXACT_STATS     backward: recompute each row's max and sum instead of trusting the saved lse.
                  With a bias or a finite fill a whole row can sit at a huge magnitude (-1e4,
                  finfo.min), where fp32 lse = m + log l loses log l; set for those calls
  EXACT_DELTA     dQ kernel: compute Δ = Σ_j P_ij dP_ij from the fp32 probabilities (and hand it
                  to the dK/dV kernel) instead of reading rowsum(dO·O) off the rounded output
  HAS_SINK        a per-row sink logit (attention sinks) starts each row's online softmax: one
                  term exp(sink - m) of the sum with no value; the lse includes it

Tensors are addressed as (Z, H, L, D) through four strides each, so BLHD and
BHLD views and broadcast (stride-0) axes need no copy; batch/head offsets are
int64.  Scores, softmax statistics and accumulators are fp32; P and dS are cast
to the input dtype for the matrix products, as FlashAttention-2 does.
Positions are int64 vectors (cheap 1-D work; keeps the interpreter fast).
"""
from __future__ import annotations

import triton
import triton.language as tl

#: True when these kernels were built for the interpreter (TRITON_INTERPRET=1)
INTERPRETED = bool(triton.knobs.runtime.interpret)

_LOG2E = tl.constexpr(1.4426950408889634)

# No function of triton's standard library (tl.max, tl.sum, tl.zeros, ...) is called: those are
# @triton.jit functions, jitted for one mode when triton.language is first imported, and an
# interpreted kernel cannot call a compiled one.  Row reductions name the combine functions
# tl.max / tl.sum reduce fp32 with (the interpreter runs these two as numpy reductions), and
# tl.full replaces tl.zeros, so the kernels work whether or not TRITON_INTERPRET was set when
# triton was imported (inductor imports it early).
_MAX = tl.standard._elementwise_max
_SUM = tl.standard._sum_combine


@triton.jit
def _tanh(x):
    """tanh in fp32 with small relative error for every x (libdevice is not available in the interpreter)."""
    ax = tl.abs(x)
    # |x| < 0.625: odd minimax polynomial (Cephes tanhf), no cancellation near 0
    z = x * x
    poly = (((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z + 1.33314422036e-1) * z
    small = (poly - 3.33332819422e-1) * z * x + x
    # otherwise 1 - 2 / (exp(2|x|) + 1), which tends to ±1 exactly when exp overflows
    big = 1.0 - 2.0 / (tl.exp(2.0 * ax) + 1.0)
    big = tl.where(x < 0, -big, big)
    return tl.where(ax < 0.625, small, big)


@triton.jit
def _scores(qk, rows, cols, in_row, in_col, b_ptrs, c_ptrs, scale, fill, softcap, diag, window,
            MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, BIAS_AFTER_MASK: tl.constexpr,
            NEG_INF_FILL: tl.constexpr, SOFTCAP: tl.constexpr, FULL: tl.constexpr):
    """Scores the softmax sees for one tile, from the raw products ``qk`` (fp32, (BLOCK_M, BLOCK_N)).

    rows (BLOCK_M, 1) / cols (1, BLOCK_N) are query / key positions, in_row / in_col
    whether they exist; b_ptrs / c_ptrs address the tile of bias / keep.
    Returns (s, allowed, t): s with -inf on keys past the end; allowed where the raw
    score survives the masks (broadcastable to the tile); t = tanh(scale·qk / softcap).
    FULL: the structural mask allows every (row, key) pair of the tile and every key exists, so
    neither is evaluated (a keep tensor still is).
    """
    # scale, then soft-cap
    s = qk * scale
    t = s
    if SOFTCAP:
        t = _tanh(s / softcap)
        s = softcap * t
    # additive bias (before the mask unless BIAS_AFTER_MASK)
    if HAS_BIAS:
        b = tl.load(b_ptrs, mask=in_row & in_col, other=0.0).to(tl.float32)
        if not BIAS_AFTER_MASK:
            s = s + b
    # structural and keep masks: a masked score is replaced by `fill`
    allowed = in_col
    if MASK == 1 and not FULL:
        allowed = allowed & (cols - rows <= diag)
    if MASK == 2 and not FULL:
        rel = cols - rows
        allowed = allowed & (rel <= diag) & (rel > diag - window)
    if HAS_KEEP:
        allowed = allowed & (tl.load(c_ptrs, mask=in_row & in_col, other=0) != 0)
    if (MASK != 0 and not FULL) or HAS_KEEP:
        s = tl.where(allowed, s, fill)
    if HAS_BIAS:
        if BIAS_AFTER_MASK:
            s = s + b
    # keys past the end are not in the row at all (already -inf when fill is -inf)
    if not (NEG_INF_FILL and (MASK != 0 or HAS_KEEP)) and not FULL:
        s = tl.where(in_col, s, float("-inf"))
    return s, allowed, t


@triton.jit
def _key_runs(m0, lo, hi, LK, diag, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
              NEG_INF_FILL: tl.constexpr):
    """(a, b): of the key tiles lo, lo + BLOCK_N, ... below hi that the query tile at m0 visits, tiles
    [a, b) are allowed whole by the structural mask and hold only existing keys; [0, a) and [b, ...)
    are cut by it (window edge; diagonal, last).  (0, 0) without a structural mask or with a finite fill."""
    a = 0
    b = 0
    if NEG_INF_FILL and MASK != 0:
        n_tiles = (tl.maximum(hi - lo, 0) + BLOCK_N - 1) // BLOCK_N
        t_hi = tl.maximum(tl.minimum(m0 + diag + 1 - lo, LK - lo), 0) // BLOCK_N  # tiles with j <= i + diag
        t_lo = 0
        if MASK == 2:                                                          # ... and j > i + diag - window
            t_lo = (tl.maximum(m0 + BLOCK_M + diag - window - lo, 0) + BLOCK_N - 1) // BLOCK_N
        a = tl.minimum(t_lo, n_tiles)
        b = tl.maximum(tl.minimum(t_hi, n_tiles), a)
    return a, b


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, kt_base, v_base, b_base, c_base, n_start, n_end,
               rows, in_row, offs_nb, kd_ok, vd_ok, stride_kn, stride_vn, stride_bn, stride_cn,
               LK, scale, fill, softcap, diag, window, BLOCK_N: tl.constexpr,
               MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, BIAS_AFTER_MASK: tl.constexpr,
               NEG_INF_FILL: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
               DOT_FP32: tl.constexpr, FULL: tl.constexpr):
    """The online-softmax update of (acc, m_i, l_i) by the key tiles n_start, n_start + BLOCK_N, ...
    below n_end.  FULL: every key of these tiles exists and the structural mask allows every
    (row, key) pair of them, so neither is evaluated (a keep tensor still is)."""
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + offs_nb
        in_n = offs_n < LK
        if FULL:
            kt = tl.load(kt_base + offs_n[None, :] * stride_kn, mask=kd_ok, other=0.0)
        else:
            kt = tl.load(kt_base + offs_n[None, :] * stride_kn, mask=in_n[None, :] & kd_ok, other=0.0)
        if DOT_FP32:
            kt = kt.to(tl.float32)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
        b_ptrs = b_base + offs_n[None, :] * stride_bn
        c_ptrs = c_base + offs_n[None, :] * stride_cn
        s, allowed, t = _scores(qk, rows, offs_n[None, :], in_row, in_n[None, :], b_ptrs, c_ptrs,
                                scale, fill, softcap, diag, window,
                                MASK, HAS_BIAS, HAS_KEEP, BIAS_AFTER_MASK, NEG_INF_FILL, SOFTCAP, FULL)
        # new running max; a row with nothing yet (max -inf) subtracts 0 so exp gives 0, not NaN
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2((s - m_use[:, None]) * _LOG2E)
        alpha = tl.exp2((m_i - m_use) * _LOG2E)
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        if FULL:
            v = tl.load(v_base + offs_n[:, None] * stride_vn, mask=vd_ok, other=0.0)
        else:
            v = tl.load(v_base + offs_n[:, None] * stride_vn, mask=in_n[:, None] & vd_ok, other=0.0)
        p_in = p.to(v.dtype)
        if DOT_FP32:
            v = v.to(tl.float32)
            p_in = p_in.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p_in, v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def attention_fwd(
        Q, K, V, BIAS, KEEP, OUT, LSE, SINK,
        stride_qz, stride_qh, stride_qm, stride_qd,
        stride_kz, stride_kh, stride_kn, stride_kd,
        stride_vz, stride_vh, stride_vn, stride_vd,
        stride_bz, stride_bh, stride_bm, stride_bn,
        stride_cz, stride_ch, stride_cm, stride_cn,
        stride_oz, stride_oh, stride_om, stride_od,
        stride_sz, stride_sh, stride_sm,
        H, LQ, LK, scale, fill, softcap, diag, window,
        HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
        MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, BIAS_AFTER_MASK: tl.constexpr,
        NEG_INF_FILL: tl.constexpr, SOFTCAP: tl.constexpr, EMPTY_ZERO: tl.constexpr, DOT_PRECISION: tl.constexpr,
        DOT_FP32: tl.constexpr, HAS_SINK: tl.constexpr):
    """out = softmax(scores)·V for one query tile of one (batch, head); lse = log Σ_j exp(scores)."""
    # -- phase 0: which tile; the kv head is the query head's group (GQA), never a copy.  Causal: the
    #    last query tiles see the most keys, so they are launched first (less tail imbalance)
    pid_m = tl.program_id(0)
    if MASK == 1 and NEG_INF_FILL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_zh = tl.program_id(1).to(tl.int64)
    z = pid_zh // H
    h = pid_zh % H
    hk = h // GROUPS
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_nb = tl.arange(0, BLOCK_N).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    rows = offs_m[:, None]
    in_row = rows < LQ

    # -- phase 1: the range of key tiles to visit (block skipping for causal / window with fill -inf)
    lo = 0
    hi = LK
    if NEG_INF_FILL and MASK != 0:
        hi = tl.minimum(LK, tl.minimum(m0 + BLOCK_M, LQ) + diag)        # j <= i + diag
    if NEG_INF_FILL and MASK == 2:
        lo = tl.maximum(0, m0 + diag - window + 1) // BLOCK_N * BLOCK_N  # j > i + diag - window

    # -- phase 2: load the query tile once; set up pointers to the first key/value/bias/keep tile
    q = tl.load(Q + z * stride_qz + h * stride_qh + rows * stride_qm + offs_d[None, :] * stride_qd,
                mask=in_row & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    kt_base = K + z * stride_kz + hk * stride_kh + offs_d[:, None] * stride_kd
    v_base = V + z * stride_vz + hk * stride_vh + offs_dv[None, :] * stride_vd
    b_base = BIAS + z * stride_bz + h * stride_bh + rows * stride_bm
    c_base = KEEP + z * stride_cz + h * stride_ch + rows * stride_cm
    kd_ok = offs_d[:, None] < HEAD_DIM
    vd_ok = offs_dv[None, :] < HEAD_DIM_V

    # -- phase 3: stream key/value tiles with an online softmax (running max m_i, running sum l_i)
    #    (a sink logit starts the row: one term exp(sink - sink) = 1 of the sum, with no value)
    if HAS_SINK:
        m_i = tl.load(SINK + z * stride_sz + h * stride_sh + offs_m * stride_sm, mask=offs_m < LQ,
                      other=0.0).to(tl.float32)
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, tl.float32)
    # tiles [lo, hi) in three runs: the edge tiles the structural mask cuts (masked), the tiles it
    # allows whole (FULL: no mask arithmetic, every key exists), the diagonal / last tiles (masked)
    a, b = _key_runs(m0, lo, hi, LK, diag, window, BLOCK_M, BLOCK_N, MASK, NEG_INF_FILL)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, kt_base, v_base, b_base, c_base, lo, lo + a * BLOCK_N,
                               rows, in_row, offs_nb, kd_ok, vd_ok, stride_kn, stride_vn, stride_bn, stride_cn,
                               LK, scale, fill, softcap, diag, window, BLOCK_N,
                               MASK, HAS_BIAS, HAS_KEEP, BIAS_AFTER_MASK, NEG_INF_FILL, SOFTCAP,
                               DOT_PRECISION, DOT_FP32, False)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, kt_base, v_base, b_base, c_base, lo + a * BLOCK_N,
                               lo + b * BLOCK_N,
                               rows, in_row, offs_nb, kd_ok, vd_ok, stride_kn, stride_vn, stride_bn, stride_cn,
                               LK, scale, fill, softcap, diag, window, BLOCK_N,
                               MASK, HAS_BIAS, HAS_KEEP, BIAS_AFTER_MASK, NEG_INF_FILL, SOFTCAP,
                               DOT_PRECISION, DOT_FP32, True)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, kt_base, v_base, b_base, c_base, lo + b * BLOCK_N, hi,
                               rows, in_row, offs_nb, kd_ok, vd_ok, stride_kn, stride_vn, stride_bn, stride_cn,
                               LK, scale, fill, softcap, diag, window, BLOCK_N,
                               MASK, HAS_BIAS, HAS_KEEP, BIAS_AFTER_MASK, NEG_INF_FILL, SOFTCAP,
                               DOT_PRECISION, DOT_FP32, False)

    # -- phase 4: normalize; write out and lse.  An empty row (every score -inf) has acc = 0, l = 0:
    #    out = 0/0 = NaN as the softmax gives, or 0 with EMPTY_ZERO; its lse is -inf either way
    lse = m_i + tl.log(l_i)
    if EMPTY_ZERO:
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(OUT + z * stride_oz + h * stride_oh + rows * stride_om + offs_dv[None, :] * stride_od,
             out.to(OUT.dtype.element_ty), mask=in_row & vd_ok)
    tl.store(LSE + pid_zh * LQ + offs_m, lse, mask=offs_m < LQ)


@triton.jit
def _dq_tiles(dq, q, do, off, inv, delta, kt_base, vt_base, b_base, c_base, db_base, n_start, n_end,
              rows, in_row, offs_nb, kd_ok, vd_ok, stride_kn, stride_vn, stride_bn, stride_cn,
              LK, scale, fill, softcap, diag, window, BLOCK_N: tl.constexpr,
              MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, BIAS_AFTER_MASK: tl.constexpr,
              NEG_INF_FILL: tl.constexpr, SOFTCAP: tl.constexpr, EXACT_STATS: tl.constexpr,
              NEED_DBIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, FULL: tl.constexpr):
    """dQ += dS·K over the key tiles n_start, n_start + BLOCK_N, ... below n_end (and dS into DBIAS
    with NEED_DBIAS).  FULL as in _fwd_tiles: no structural mask, every key exists."""
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + offs_nb
        in_n = offs_n < LK
        if FULL:
            kt = tl.load(kt_base + offs_n[None, :] * stride_kn, mask=kd_ok, other=0.0)
            vt = tl.load(vt_base + offs_n[None, :] * stride_vn, mask=vd_ok, other=0.0)
        else:
            kt = tl.load(kt_base + offs_n[None, :] * stride_kn, mask=in_n[None, :] & kd_ok, other=0.0)
            vt = tl.load(vt_base + offs_n[None, :] * stride_vn, mask=in_n[None, :] & vd_ok, other=0.0)
        k_dtype = kt.dtype
        if DOT_FP32:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        # -- phase 4: recompute P
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
        b_ptrs = b_base + offs_n[None, :] * stride_bn
        c_ptrs = c_base + offs_n[None, :] * stride_cn
        s, allowed, t = _scores(qk, rows, offs_n[None, :], in_row, in_n[None, :], b_ptrs, c_ptrs,
                                scale, fill, softcap, diag, window,
                                MASK, HAS_BIAS, HAS_KEEP, BIAS_AFTER_MASK, NEG_INF_FILL, SOFTCAP, FULL)
        p = tl.exp2((s - off[:, None]) * _LOG2E)
        if EXACT_STATS:
            p = p * inv[:, None]
        # -- phase 5: dS = P ∘ (dO·Vᵀ − Δ)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        # -- phase 6: the bias gradient is dS wherever the bias reaches the softmax
        if NEED_DBIAS:
            db_ptrs = db_base + offs_n[None, :]
            if BIAS_AFTER_MASK:
                tl.store(db_ptrs, ds, mask=in_row & in_n[None, :])
            else:
                tl.store(db_ptrs, tl.where(allowed, ds, 0.0), mask=in_row & in_n[None, :])
        # -- phase 7: zero where the mask replaced the score; softcap chain rule; dQ += dS·K
        if (MASK != 0 and not FULL) or HAS_KEEP:
            ds = tl.where(allowed, ds, 0.0)
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        ds_in = ds.to(k_dtype)
        if DOT_FP32:
            ds_in = ds_in.to(tl.float32)
        dq += tl.dot(ds_in, tl.trans(kt), input_precision=DOT_PRECISION)
    return dq


@triton.jit
def attention_bwd_dq(
        Q, K, V, BIAS, KEEP, DO, LSE, DELTA, STATS, DQ, DBIAS, SINK,
        stride_qz, stride_qh, stride_qm, stride_qd,
        stride_kz, stride_kh, stride_kn, stride_kd,
        stride_vz, stride_vh, stride_vn, stride_vd,
        stride_bz, stride_bh, stride_bm, stride_bn,
        stride_cz, stride_ch, stride_cm, stride_cn,
        stride_doz, stride_doh, stride_dom, stride_dod,
        stride_dqz, stride_dqh, stride_dqm, stride_dqd,
        stride_sz, stride_sh, stride_sm,
        H, LQ, LK, scale, fill, softcap, diag, window,
        HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
        MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, BIAS_AFTER_MASK: tl.constexpr,
        NEG_INF_FILL: tl.constexpr, SOFTCAP: tl.constexpr, EMPTY_ZERO: tl.constexpr, NEED_DBIAS: tl.constexpr,
        EXACT_STATS: tl.constexpr, EXACT_DELTA: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
        HAS_SINK: tl.constexpr):
    """dQ of one query tile of one (batch, head).  Runs before the dK/dV kernel: with EXACT_STATS it
    also writes each row's (max, 1/sum) into STATS (Z, H, 2, LQ); with EXACT_DELTA it computes
    Δ_i = Σ_j P_ij dP_ij from the fp32 probabilities and writes it into DELTA (instead of reading
    Δ = rowsum(dO ∘ O) off the output rounded to its 16-bit dtype, whose error the dQ sum can
    amplify when the head dim is too small to average it); with NEED_DBIAS it writes dS into
    DBIAS (Z, H, LQ, LK), fp32."""
    # -- phase 0: which tile (causal: longest rows first, as the forward); load Q, dO and Δ once
    pid_m = tl.program_id(0)
    if MASK == 1 and NEG_INF_FILL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_zh = tl.program_id(1).to(tl.int64)
    z = pid_zh // H
    h = pid_zh % H
    hk = h // GROUPS
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_nb = tl.arange(0, BLOCK_N).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    rows = offs_m[:, None]
    in_row = rows < LQ
    q = tl.load(Q + z * stride_qz + h * stride_qh + rows * stride_qm + offs_d[None, :] * stride_qd,
                mask=in_row & (offs_d[None, :] < HEAD_DIM), other=0.0)
    do = tl.load(DO + z * stride_doz + h * stride_doh + rows * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=in_row & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    if not EXACT_DELTA:
        delta = tl.load(DELTA + pid_zh * LQ + offs_m, mask=offs_m < LQ, other=0.0)
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)

    # -- phase 1: the range of key tiles to visit (as in the forward)
    lo = 0
    hi = LK
    if NEG_INF_FILL and MASK != 0:
        hi = tl.minimum(LK, tl.minimum(m0 + BLOCK_M, LQ) + diag)
    if NEG_INF_FILL and MASK == 2:
        lo = tl.maximum(0, m0 + diag - window + 1) // BLOCK_N * BLOCK_N
    kt_start = K + z * stride_kz + hk * stride_kh + (lo + offs_nb)[None, :] * stride_kn + offs_d[:, None] * stride_kd
    b_start = BIAS + z * stride_bz + h * stride_bh + rows * stride_bm + (lo + offs_nb)[None, :] * stride_bn
    c_start = KEEP + z * stride_cz + h * stride_ch + rows * stride_cm + (lo + offs_nb)[None, :] * stride_cn
    kd_ok = offs_d[:, None] < HEAD_DIM
    vd_ok = offs_dv[:, None] < HEAD_DIM_V
    step_k, step_v = BLOCK_N * stride_kn, BLOCK_N * stride_vn
    step_b, step_c = BLOCK_N * stride_bn, BLOCK_N * stride_cn

    # -- phase 2: each row's softmax statistics: P = exp(s - off) · inv [and Δ = Σ_j P_ij dP_ij]
    if EXACT_STATS or EXACT_DELTA:
        # recomputed exactly, as the forward's online softmax does (the saved lse may have lost log l)
        if HAS_SINK:  # the sink's term of the sum, as in the forward (its value is 0: no term of Δ)
            m_i = tl.load(SINK + z * stride_sz + h * stride_sh + offs_m * stride_sm, mask=offs_m < LQ,
                          other=0.0).to(tl.float32)
            l_i = tl.full([BLOCK_M], 1.0, tl.float32)
        else:
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.full([BLOCK_M], 0.0, tl.float32)
        d_i = tl.full([BLOCK_M], 0.0, tl.float32)
        kt_ptrs, b_ptrs, c_ptrs = kt_start, b_start, c_start
        vt_ptrs = V + z * stride_vz + hk * stride_vh + (lo + offs_nb)[None, :] * stride_vn + \
            offs_dv[:, None] * stride_vd
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + offs_nb
            in_n = offs_n < LK
            kt = tl.load(kt_ptrs, mask=in_n[None, :] & kd_ok, other=0.0)
            if DOT_FP32:
                kt = kt.to(tl.float32)
            qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
            s, allowed, t = _scores(qk, rows, offs_n[None, :], in_row, in_n[None, :], b_ptrs, c_ptrs,
                                    scale, fill, softcap, diag, window,
                                    MASK, HAS_BIAS, HAS_KEEP, BIAS_AFTER_MASK, NEG_INF_FILL, SOFTCAP, False)
            m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2((m_i - m_use) * _LOG2E)
            e = tl.exp2((s - m_use[:, None]) * _LOG2E)
            l_i = l_i * alpha + tl.reduce(e, 1, _SUM)
            if EXACT_DELTA:
                vt = tl.load(vt_ptrs, mask=in_n[None, :] & vd_ok, other=0.0)
                if DOT_FP32:
                    vt = vt.to(tl.float32)
                dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
                # every key the row sees counts, masked-and-filled ones too: Δ = dO·O and O sums them all
                d_i = d_i * alpha + tl.reduce(e * dp, 1, _SUM)
                vt_ptrs += step_v
            m_i = m_new
            kt_ptrs += step_k
            if HAS_BIAS:
                b_ptrs += step_b
            if HAS_KEEP:
                c_ptrs += step_c
    if EXACT_DELTA:
        # an empty row: 0/0 = NaN as dO·O with O = NaN, or 0 with EMPTY_ZERO (O = 0)
        delta = d_i / l_i
        if EMPTY_ZERO:
            delta = tl.where(l_i == 0.0, 0.0, delta)
        tl.store(DELTA + pid_zh * LQ + offs_m, delta, mask=offs_m < LQ)
    if EXACT_STATS:
        # an empty row keeps off = 0, inv = 1/0 = inf: P = 0·inf = NaN, as the reference's softmax;
        # with EMPTY_ZERO inv = 0, so P = 0 and no gradient flows through the row
        off = tl.where(m_i == float("-inf"), 0.0, m_i)
        inv = 1.0 / l_i
        if EMPTY_ZERO:
            inv = tl.where(l_i == 0.0, 0.0, inv)
        tl.store(STATS + pid_zh * 2 * LQ + offs_m, off, mask=offs_m < LQ)
        tl.store(STATS + pid_zh * 2 * LQ + LQ + offs_m, inv, mask=offs_m < LQ)
    else:
        # (with EMPTY_ZERO an empty row's lse arrives as +inf: P = exp(-inf) = 0)
        off = tl.load(LSE + pid_zh * LQ + offs_m, mask=offs_m < LQ, other=float("inf"))
        inv = off  # unused without EXACT_STATS

    # -- phase 3: stream the key/value tiles (causal / window: edge, whole and diagonal runs, as the forward)
    kt_base = K + z * stride_kz + hk * stride_kh + offs_d[:, None] * stride_kd
    vt_base = V + z * stride_vz + hk * stride_vh + offs_dv[:, None] * stride_vd
    b_base = BIAS + z * stride_bz + h * stride_bh + rows * stride_bm
    c_base = KEEP + z * stride_cz + h * stride_ch + rows * stride_cm
    db_base = DBIAS + pid_zh * LQ * LK + rows * LK
    a, b = _key_runs(m0, lo, hi, LK, diag, window, BLOCK_M, BLOCK_N, MASK, NEG_INF_FILL)
    dq = _dq_tiles(dq, q, do, off, inv, delta, kt_base, vt_base, b_base, c_base, db_base, lo, lo + a * BLOCK_N,
                   rows, in_row, offs_nb, kd_ok, vd_ok, stride_kn, stride_vn, stride_bn, stride_cn,
                   LK, scale, fill, softcap, diag, window, BLOCK_N,
                   MASK, HAS_BIAS, HAS_KEEP, BIAS_AFTER_MASK, NEG_INF_FILL, SOFTCAP, EXACT_STATS, NEED_DBIAS,
                   DOT_PRECISION, DOT_FP32, False)
    dq = _dq_tiles(dq, q, do, off, inv, delta, kt_base, vt_base, b_base, c_base, db_base, lo + a * BLOCK_N,
                   lo + b * BLOCK_N,
                   rows, in_row, offs_nb, kd_ok, vd_ok, stride_kn, stride_vn, stride_bn, stride_cn,
                   LK, scale, fill, softcap, diag, window, BLOCK_N,
                   MASK, HAS_BIAS, HAS_KEEP, BIAS_AFTER_MASK, NEG_INF_FILL, SOFTCAP, EXACT_STATS, NEED_DBIAS,
                   DOT_PRECISION, DOT_FP32, True)
    dq = _dq_tiles(dq, q, do, off, inv, delta, kt_base, vt_base, b_base, c_base, db_base, lo + b * BLOCK_N, hi,
                   rows, in_row, offs_nb, kd_ok, vd_ok, stride_kn, stride_vn, stride_bn, stride_cn,
                   LK, scale, fill, softcap, diag, window, BLOCK_N,
                   MASK, HAS_BIAS, HAS_KEEP, BIAS_AFTER_MASK, NEG_INF_FILL, SOFTCAP, EXACT_STATS, NEED_DBIAS,
                   DOT_PRECISION, DOT_FP32, False)

    # -- phase 8: write dQ in the output buffer's dtype
    dq = dq * scale
    tl.store(DQ + z * stride_dqz + h * stride_dqh + rows * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=in_row & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, b_base, c_base, off_base, delta_base, m_start, m_end,
                offs_mb, cols, in_col, d_ok, dv_ok, stride_qm, stride_dom, stride_bm, stride_cm,
                LQ, scale, fill, softcap, diag, window, BLOCK_M: tl.constexpr,
                MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, BIAS_AFTER_MASK: tl.constexpr,
                NEG_INF_FILL: tl.constexpr, SOFTCAP: tl.constexpr, EXACT_STATS: tl.constexpr,
                DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, FULL: tl.constexpr):
    """dV += Pᵀ·dO and dK += dSᵀ·Q over the query tiles m_start, m_start + BLOCK_M, ... below m_end.
    FULL: every row of these tiles and every key of this tile exists, and the structural mask
    allows every pair (no mask arithmetic)."""
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + offs_mb
        in_m = offs_m < LQ
        if FULL:
            q = tl.load(q_base + offs_m[:, None] * stride_qm, mask=d_ok, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dom, mask=dv_ok, other=0.0)
        else:
            q = tl.load(q_base + offs_m[:, None] * stride_qm, mask=in_m[:, None] & d_ok, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dom, mask=in_m[:, None] & dv_ok, other=0.0)
        q_dtype = q.dtype
        do_dtype = do.dtype
        if DOT_FP32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        # rows past the end get off = +inf, hence P = 0
        off = tl.load(off_base + offs_m, mask=in_m, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=in_m, other=0.0)
        # recompute P = exp(s - off) [· inv]
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        b_ptrs = b_base + offs_m[:, None] * stride_bm
        c_ptrs = c_base + offs_m[:, None] * stride_cm
        s, allowed, t = _scores(qk, offs_m[:, None], cols, in_m[:, None], in_col, b_ptrs, c_ptrs,
                                scale, fill, softcap, diag, window,
                                MASK, HAS_BIAS, HAS_KEEP, BIAS_AFTER_MASK, NEG_INF_FILL, SOFTCAP, FULL)
        p = tl.exp2((s - off[:, None]) * _LOG2E)
        if EXACT_STATS:
            p = p * tl.load(off_base + LQ + offs_m, mask=in_m, other=0.0)[:, None]
        # dV += Pᵀ·dO
        p_in = p.to(do_dtype)
        if DOT_FP32:
            p_in = p_in.to(tl.float32)
        dv += tl.dot(tl.trans(p_in), do, input_precision=DOT_PRECISION)
        # dS = P ∘ (dO·Vᵀ − Δ), zero where the mask replaced the score; softcap chain rule
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if (MASK != 0 and not FULL) or HAS_KEEP:
            ds = tl.where(allowed, ds, 0.0)
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        # dK += dSᵀ·Q (the scale is applied once at the end)
        ds_in = ds.to(q_dtype)
        if DOT_FP32:
            ds_in = ds_in.to(tl.float32)
        dk += tl.dot(tl.trans(ds_in), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def attention_bwd_dkdv(
        Q, K, V, BIAS, KEEP, DO, LSE, DELTA, STATS, DK, DV,
        stride_qz, stride_qh, stride_qm, stride_qd,
        stride_kz, stride_kh, stride_kn, stride_kd,
        stride_vz, stride_vh, stride_vn, stride_vd,
        stride_bz, stride_bh, stride_bm, stride_bn,
        stride_cz, stride_ch, stride_cm, stride_cn,
        stride_doz, stride_doh, stride_dom, stride_dod,
        stride_dkz, stride_dkh, stride_dkn, stride_dkd,
        stride_dvz, stride_dvh, stride_dvn, stride_dvd,
        H, HK, LQ, LK, scale, fill, softcap, diag, window,
        HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
        MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, BIAS_AFTER_MASK: tl.constexpr,
        NEG_INF_FILL: tl.constexpr, SOFTCAP: tl.constexpr, EMPTY_ZERO: tl.constexpr, EXACT_STATS: tl.constexpr,
        DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """dK and dV of one key tile of one (batch, kv head), summed over the query heads of its GQA group."""
    # -- phase 0: which key tile; load K and V once
    pid_n = tl.program_id(0)
    pid_zh = tl.program_id(1).to(tl.int64)
    z = pid_zh // HK
    hk = pid_zh % HK
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_mb = tl.arange(0, BLOCK_M).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    cols = offs_n[None, :]
    in_col = cols < LK
    d_ok = offs_d[None, :] < HEAD_DIM
    dv_ok = offs_dv[None, :] < HEAD_DIM_V
    k = tl.load(K + z * stride_kz + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=(offs_n[:, None] < LK) & d_ok, other=0.0)
    v = tl.load(V + z * stride_vz + hk * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=(offs_n[:, None] < LK) & dv_ok, other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_DV], 0.0, tl.float32)

    # -- phase 1: the range of query tiles that can see these keys (block skipping)
    lo = 0
    hi = LQ
    if NEG_INF_FILL and MASK != 0:
        lo = tl.maximum(0, n0 - diag) // BLOCK_M * BLOCK_M                          # i >= j - diag
    if NEG_INF_FILL and MASK == 2:
        hi = tl.minimum(LQ, tl.minimum(n0 + BLOCK_N, LK) - 1 - diag + window)      # i < j - diag + window

    # -- phase 2: the runs of query tiles: the diagonal tiles the mask cuts, the tiles it allows whole
    #    (every row exists too), the window's far edge and the ragged last tile
    a = 0
    b = 0
    if NEG_INF_FILL and MASK != 0:
        n_tiles = (tl.maximum(hi - lo, 0) + BLOCK_M - 1) // BLOCK_M
        u_lo = (tl.maximum(n0 + BLOCK_N - 1 - diag - lo, 0) + BLOCK_M - 1) // BLOCK_M   # i >= j - diag
        u_hi = tl.maximum(LQ - lo, 0) // BLOCK_M                                         # rows exist
        if MASK == 2:                                                                    # i < j - diag + window
            u_hi = tl.minimum(u_hi, (tl.maximum(n0 - BLOCK_M + 1 - diag + window - lo, 0) + BLOCK_M - 1) // BLOCK_M)
        a = tl.minimum(u_lo, n_tiles)
        b = tl.maximum(tl.minimum(u_hi, n_tiles), a)
        b = tl.where(n0 + BLOCK_N <= LK, b, a)                                           # keys exist

    # -- phase 3: for every query head of the group, stream its query tiles
    for g in range(GROUPS):
        h = hk * GROUPS + g
        zh = z * H + h
        q_base = Q + z * stride_qz + h * stride_qh + offs_d[None, :] * stride_qd
        do_base = DO + z * stride_doz + h * stride_doh + offs_dv[None, :] * stride_dod
        b_base = BIAS + z * stride_bz + h * stride_bh + cols * stride_bn
        c_base = KEEP + z * stride_cz + h * stride_ch + cols * stride_cn
        if EXACT_STATS:
            off_base = STATS + zh * 2 * LQ
        else:
            off_base = LSE + zh * LQ
        delta_base = DELTA + zh * LQ
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, b_base, c_base, off_base, delta_base, lo,
                             lo + a * BLOCK_M, offs_mb, cols, in_col, d_ok, dv_ok,
                             stride_qm, stride_dom, stride_bm, stride_cm, LQ, scale, fill, softcap, diag, window,
                             BLOCK_M, MASK, HAS_BIAS, HAS_KEEP, BIAS_AFTER_MASK, NEG_INF_FILL, SOFTCAP, EXACT_STATS,
                             DOT_PRECISION, DOT_FP32, False)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, b_base, c_base, off_base, delta_base,
                             lo + a * BLOCK_M, lo + b * BLOCK_M, offs_mb, cols, in_col, d_ok, dv_ok,
                             stride_qm, stride_dom, stride_bm, stride_cm, LQ, scale, fill, softcap, diag, window,
                             BLOCK_M, MASK, HAS_BIAS, HAS_KEEP, BIAS_AFTER_MASK, NEG_INF_FILL, SOFTCAP, EXACT_STATS,
                             DOT_PRECISION, DOT_FP32, True)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, b_base, c_base, off_base, delta_base,
                             lo + b * BLOCK_M, hi, offs_mb, cols, in_col, d_ok, dv_ok,
                             stride_qm, stride_dom, stride_bm, stride_cm, LQ, scale, fill, softcap, diag, window,
                             BLOCK_M, MASK, HAS_BIAS, HAS_KEEP, BIAS_AFTER_MASK, NEG_INF_FILL, SOFTCAP, EXACT_STATS,
                             DOT_PRECISION, DOT_FP32, False)

    # -- phase 7: write dK, dV in the output buffers' dtype
    dk = dk * scale
    tl.store(DK + z * stride_dkz + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=(offs_n[:, None] < LK) & d_ok)
    tl.store(DV + z * stride_dvz + hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=(offs_n[:, None] < LK) & dv_ok)
