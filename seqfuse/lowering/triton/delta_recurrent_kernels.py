"""Triton kernels of seqfuse.delta's recurrent algorithm: the step loop, forward and adjoint, for the
plain rule and the generalized step (a read key p, an erase key e, read="previous").

Imported lazily by :mod:`seqfuse.lowering.triton.delta_recurrent` on the first call that runs on the
triton path (``@triton.jit`` fixes interpreted vs compiled mode when it runs).

One program per (batch, head, block of BLOCK_V value dims).  Every term of a step acts on the
state's columns independently (the read r = Rᵀp is one number per column), so a program keeps its
(BLOCK_K, BLOCK_V) block of the state in fp32 registers and walks the steps in order, as the
reference's ``delta_recurrent`` does for the whole state::

    D = α ⊙ S                 α = e^g: 1 (gate none), one per head (scalar), one per key row (vector)
    r = Rᵀp                   R = D ("decayed") or S ("previous"); p = k without a read key
    S ← D + k ⊗ β(v − r)      without an erase key,   S ← D + β(k ⊗ v − e ⊗ r)   with one
    y = scale · Sᵀq

(the write in the reference's order, so the two agree to fp32 rounding step by step).

The backward (``delta_recurrent_bwd``, same programs) walks the steps in reverse carrying dS in
registers.  The forward run with STORE_STATES keeps the state entering every CHUNK-th step (fp32,
CK); per chunk, in reverse, the backward recomputes the states entering the chunk's steps into a
per-program scratch (SCR, CHUNK states) and then differentiates the chunk's steps from its last to
its first.  Memory: (T / CHUNK + CHUNK) states per program; the host takes CHUNK ≈ √T.

Steps of the last chunk past T load k = v = p = e = β = g = 0 (no change to the state, nothing
stored), so both loops run whole chunks.

Constexpr flags: GATE (0 none, 1 scalar, 2 vector), HAS_P, HAS_E, PREVIOUS, HAS_H0, STORE_STATES,
BLOCK_K (≥ the key size: the whole key axis is in one program), BLOCK_V.
"""
from __future__ import annotations

import triton
import triton.language as tl

INTERPRETED = bool(triton.knobs.runtime.interpret)

# As in delta_kernels.py: no function of triton's standard library (tl.sum, tl.zeros, ...), since an
# interpreted kernel cannot call a helper jitted for compilation (and back); sums name tl.sum's combine.
_SUM = tl.standard._sum_combine


@triton.jit
def _key_row(X, stride_t, stride_k, t, offs_k, mask):
    """Row t of a (T, K) operand, X at this (batch, head), as fp32 (zeros off ``mask``)."""
    return tl.load(X + t * stride_t + offs_k * stride_k, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_step(Qb, Kb, Vb, Bb, Gb, Pb, Eb, stride_qt, stride_qk, stride_kt, stride_kk, stride_vt, stride_vv,
               stride_bt, stride_gt, stride_gk, stride_pt, stride_pk, stride_et, stride_ek,
               t, T, offs_k, offs_v, k_ok, v_ok,
               GATE: tl.constexpr, HAS_P: tl.constexpr, HAS_E: tl.constexpr):
    """Step t's operands in fp32 from pointers already at this (batch, head): (q, k, v, β, α, p, e), p and e
    being k without a read / erase key, α = e^g (unused for gate none).  Past T: zeros (α = 1)."""
    t_ok = t < T
    kmask = k_ok & t_ok
    q = _key_row(Qb, stride_qt, stride_qk, t, offs_k, kmask)
    k = _key_row(Kb, stride_kt, stride_kk, t, offs_k, kmask)
    p = k
    if HAS_P:
        p = _key_row(Pb, stride_pt, stride_pk, t, offs_k, kmask)
    e = k
    if HAS_E:
        e = _key_row(Eb, stride_et, stride_ek, t, offs_k, kmask)
    v = tl.load(Vb + t * stride_vt + offs_v * stride_vv, mask=v_ok & t_ok, other=0.0).to(tl.float32)
    beta = tl.load(Bb + t * stride_bt, mask=t_ok, other=0.0).to(tl.float32)
    if GATE == 2:
        alpha = tl.exp(_key_row(Gb, stride_gt, stride_gk, t, offs_k, kmask))
    elif GATE == 1:
        alpha = tl.exp(tl.load(Gb + t * stride_gt, mask=t_ok, other=0.0).to(tl.float32))
    else:
        alpha = beta
    return q, k, v, beta, alpha, p, e


@triton.jit
def _step(S, k, v, beta, alpha, p, e, GATE: tl.constexpr, HAS_E: tl.constexpr, PREVIOUS: tl.constexpr):
    """One step of the rule on a (BLOCK_K, BLOCK_V) state block: (D, r, S_new)."""
    if GATE == 2:
        D = S * alpha[:, None]
    elif GATE == 1:
        D = S * alpha
    else:
        D = S
    if PREVIOUS:
        r = tl.reduce(S * p[:, None], 0, _SUM)
    else:
        r = tl.reduce(D * p[:, None], 0, _SUM)
    if HAS_E:
        S = D + beta * (k[:, None] * v[None, :] - e[:, None] * r[None, :])
    else:
        S = D + k[:, None] * (beta * (v - r))[None, :]
    return D, r, S


@triton.jit
def delta_recurrent_fwd(
        Q, K, V, BETA, G, P, E, H0, Y, HT, CK,
        stride_qb, stride_qt, stride_qh, stride_qk,
        stride_kb, stride_kt, stride_kh, stride_kk,
        stride_vb, stride_vt, stride_vh, stride_vv,
        stride_bb, stride_bt, stride_bh,
        stride_gb, stride_gt, stride_gh, stride_gk,
        stride_pb, stride_pt, stride_ph, stride_pk,
        stride_eb, stride_et, stride_eh, stride_ek,
        stride_sb, stride_sh, stride_sk, stride_sv,
        stride_yb, stride_yt, stride_yh, stride_yv,
        stride_ob, stride_oh, stride_ok, stride_ov,
        T, H, KD, VD, scale, CHUNK,
        GATE: tl.constexpr, HAS_P: tl.constexpr, HAS_E: tl.constexpr, PREVIOUS: tl.constexpr,
        HAS_H0: tl.constexpr, STORE_STATES: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """y (B, T, H, V) and the final state (B, H, K, V) of one (batch, head, value block); with
    STORE_STATES, also the state entering every CHUNK-th step into CK (B·H, NV, NC, BLOCK_K, BLOCK_V)
    fp32, for the backward kernel."""
    # -- phase 0: which program; offsets
    pid_bh = tl.program_id(0).to(tl.int64)     # (B·H on the grid's first axis: up to 2**31 - 1)
    pid_v = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    k_ok = offs_k < KD
    v_ok = offs_v < VD
    Qb, Kb, Vb = Q + b * stride_qb + h * stride_qh, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh
    Bb, Gb = BETA + b * stride_bb + h * stride_bh, G + b * stride_gb + h * stride_gh
    Pb, Eb = P + b * stride_pb + h * stride_ph, E + b * stride_eb + h * stride_eh

    # -- phase 1: the state entering the first step
    if HAS_H0:
        S = tl.load(H0 + b * stride_sb + h * stride_sh + offs_k[:, None] * stride_sk + offs_v[None, :] * stride_sv,
                    mask=k_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
    else:
        S = tl.full([BLOCK_K, BLOCK_V], 0.0, tl.float32)

    # -- phase 2: the steps in order, chunk by chunk (a checkpoint entering each chunk)
    NC = (T + CHUNK - 1) // CHUNK
    ck_offs = offs_k[:, None] * BLOCK_V + tl.arange(0, BLOCK_V)[None, :]
    ck_base = CK + (pid_bh * tl.num_programs(1) + pid_v) * NC * (BLOCK_K * BLOCK_V)
    for c in range(0, NC):
        if STORE_STATES:
            tl.store(ck_base + tl.cast(c, tl.int64) * (BLOCK_K * BLOCK_V) + ck_offs, S)
        for i in range(0, CHUNK):
            t = c * CHUNK + i
            t_ok = t < T
            q, k, v, beta, alpha, p, e = _load_step(
                Qb, Kb, Vb, Bb, Gb, Pb, Eb, stride_qt, stride_qk, stride_kt, stride_kk, stride_vt, stride_vv,
                stride_bt, stride_gt, stride_gk, stride_pt, stride_pk, stride_et, stride_ek,
                t, T, offs_k, offs_v, k_ok, v_ok, GATE, HAS_P, HAS_E)
            _, _, S = _step(S, k, v, beta, alpha, p, e, GATE, HAS_E, PREVIOUS)
            y = tl.reduce(S * q[:, None], 0, _SUM) * scale
            tl.store(Y + b * stride_yb + h * stride_yh + t * stride_yt + offs_v * stride_yv,
                     y.to(Y.dtype.element_ty), mask=v_ok & t_ok)

    # -- phase 3: the final state
    tl.store(HT + b * stride_ob + h * stride_oh + offs_k[:, None] * stride_ok + offs_v[None, :] * stride_ov,
             S.to(HT.dtype.element_ty), mask=k_ok[:, None] & v_ok[None, :])


@triton.jit
def delta_recurrent_bwd(
        Q, K, V, BETA, G, P, E, CK, SCR, DY, DHT,
        DQ, DK, DV, DB, DG, DP, DE, DH0,
        stride_qb, stride_qt, stride_qh, stride_qk,
        stride_kb, stride_kt, stride_kh, stride_kk,
        stride_vb, stride_vt, stride_vh, stride_vv,
        stride_bb, stride_bt, stride_bh,
        stride_gb, stride_gt, stride_gh, stride_gk,
        stride_pb, stride_pt, stride_ph, stride_pk,
        stride_eb, stride_et, stride_eh, stride_ek,
        stride_yb, stride_yt, stride_yh, stride_yv,
        stride_ob, stride_oh, stride_ok, stride_ov,
        B, T, H, KD, VD, scale, CHUNK,
        GATE: tl.constexpr, HAS_P: tl.constexpr, HAS_E: tl.constexpr, PREVIOUS: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """The adjoint of delta_recurrent_fwd for one (batch, head, value block).

    Per step, in reverse, with G = dS + scale·q ⊗ dy the gradient reaching S_t and u = β(v − r)::

        dq = scale·S_t dy
        no erase key:  dk = G u,  dv = β Gᵀk,  dr = −β Gᵀk,  dβ = (Gᵀk)·(v − r)
        an erase key:  dk = β G v,  de = −β G r,  dv = β Gᵀk,  dr = −β Gᵀe,  dβ = kᵀGv − eᵀGr
        dp = R dr      (added to dk without a read key)
        dD = G (+ p ⊗ dr when R = D),   dS_{t-1} = α ⊙ dD (+ p ⊗ dr when R = S_{t-1})
        dg = Σ D ⊙ dD  (over the whole block: scalar; over the values: vector)

    dv (B, T, H, V) and dh0 (B, H, K, V) are this block's own; dq, dk, dp, de (B, T, H, K), dbeta
    (B, T, H) and dg (B, T, H) or (B, T, H, K) are sums over the value dims: each block adds its share
    with atomics into buffers the host zeroed (one fp32 copy whatever the number of blocks; on a GPU
    the order of the additions, so the last bit, may differ between runs).  All outputs fp32
    contiguous.  SCR is a per-program scratch of CHUNK states (B·H·NV, CHUNK, BLOCK_K, BLOCK_V).
    """
    # -- phase 0: which program; offsets
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    k_ok = offs_k < KD
    v_ok = offs_v < VD
    Qb, Kb, Vb = Q + b * stride_qb + h * stride_qh, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh
    Bb, Gb = BETA + b * stride_bb + h * stride_bh, G + b * stride_gb + h * stride_gh
    Pb, Eb = P + b * stride_pb + h * stride_ph, E + b * stride_eb + h * stride_eh
    NC = (T + CHUNK - 1) // CHUNK
    blk = offs_k[:, None] * BLOCK_V + tl.arange(0, BLOCK_V)[None, :]
    prog = pid_bh * tl.num_programs(1) + pid_v
    ck_base = CK + prog * NC * (BLOCK_K * BLOCK_V)
    scr_base = SCR + prog * CHUNK * (BLOCK_K * BLOCK_V)

    # -- phase 1: dS leaving the last step is grad_h
    dS = tl.load(DHT + b * stride_ob + h * stride_oh + offs_k[:, None] * stride_ok + offs_v[None, :] * stride_ov,
                 mask=k_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)

    # -- phase 2: the chunks in reverse order
    for cc in range(0, NC):
        c = NC - 1 - cc
        # 2a. the states entering the chunk's steps, recomputed from its checkpoint into the scratch
        S = tl.load(ck_base + tl.cast(c, tl.int64) * (BLOCK_K * BLOCK_V) + blk)
        for i in range(0, CHUNK):
            t = c * CHUNK + i
            tl.store(scr_base + tl.cast(i, tl.int64) * (BLOCK_K * BLOCK_V) + blk, S)
            _, k, v, beta, alpha, p, e = _load_step(
                Qb, Kb, Vb, Bb, Gb, Pb, Eb, stride_qt, stride_qk, stride_kt, stride_kk, stride_vt, stride_vv,
                stride_bt, stride_gt, stride_gk, stride_pt, stride_pk, stride_et, stride_ek,
                t, T, offs_k, offs_v, k_ok, v_ok, GATE, HAS_P, HAS_E)
            _, _, S = _step(S, k, v, beta, alpha, p, e, GATE, HAS_E, PREVIOUS)
        tl.debug_barrier()   # the scratch is read back below by whichever threads hold those elements
        # 2b. the chunk's steps from the last to the first
        for ii in range(0, CHUNK):
            i = CHUNK - 1 - ii
            t = c * CHUNK + i
            t_ok = t < T
            Sp = tl.load(scr_base + tl.cast(i, tl.int64) * (BLOCK_K * BLOCK_V) + blk)
            q, k, v, beta, alpha, p, e = _load_step(
                Qb, Kb, Vb, Bb, Gb, Pb, Eb, stride_qt, stride_qk, stride_kt, stride_kk, stride_vt, stride_vv,
                stride_bt, stride_gt, stride_gk, stride_pt, stride_pk, stride_et, stride_ek,
                t, T, offs_k, offs_v, k_ok, v_ok, GATE, HAS_P, HAS_E)
            dy = tl.load(DY + b * stride_yb + h * stride_yh + t * stride_yt + offs_v * stride_yv,
                         mask=v_ok & t_ok, other=0.0).to(tl.float32)
            D, r, St = _step(Sp, k, v, beta, alpha, p, e, GATE, HAS_E, PREVIOUS)
            # through y = scale·S_tᵀq
            dq = tl.reduce(St * dy[None, :], 1, _SUM) * scale
            Gr = dS + (scale * q)[:, None] * dy[None, :]
            # through the write
            Gk = tl.reduce(Gr * k[:, None], 0, _SUM)                                  # (BLOCK_V,)
            dv = beta * Gk
            if HAS_E:
                Gv = tl.reduce(Gr * v[None, :], 1, _SUM)                              # (BLOCK_K,)
                Grr = tl.reduce(Gr * r[None, :], 1, _SUM)
                dk = beta * Gv
                de = -beta * Grr
                dr = -beta * tl.reduce(Gr * e[:, None], 0, _SUM)
                db = tl.reduce(k * Gv, 0, _SUM) - tl.reduce(e * Grr, 0, _SUM)
            else:
                dk = tl.reduce(Gr * (beta * (v - r))[None, :], 1, _SUM)
                dr = -beta * Gk
                db = tl.reduce(Gk * (v - r), 0, _SUM)
                de = dk   # unused: no erase key
            # through the read r = Rᵀp
            if PREVIOUS:
                dp = tl.reduce(Sp * dr[None, :], 1, _SUM)
                dD = Gr
            else:
                dp = tl.reduce(D * dr[None, :], 1, _SUM)
                dD = Gr + p[:, None] * dr[None, :]
            if not HAS_P:
                dk += dp
            # through the decay D = α ⊙ S_{t-1}
            if GATE == 2:
                dS = alpha[:, None] * dD
                dgv = tl.reduce(D * dD, 1, _SUM)
            elif GATE == 1:
                dS = alpha * dD
                dgs = tl.reduce(tl.reduce(D * dD, 1, _SUM), 0, _SUM)
            else:
                dS = dD
            if PREVIOUS:
                dS += p[:, None] * dr[None, :]
            # this block's share of the sums over the value dims, added into the fp32 buffers
            row = (b * T + t) * H + h
            kmask = k_ok & t_ok
            tl.atomic_add(DQ + row * KD + offs_k, dq, mask=kmask)
            tl.atomic_add(DK + row * KD + offs_k, dk, mask=kmask)
            if HAS_P:
                tl.atomic_add(DP + row * KD + offs_k, dp, mask=kmask)
            if HAS_E:
                tl.atomic_add(DE + row * KD + offs_k, de, mask=kmask)
            tl.atomic_add(DB + row, db, mask=t_ok)
            if GATE == 2:
                tl.atomic_add(DG + row * KD + offs_k, dgv, mask=kmask)
            elif GATE == 1:
                tl.atomic_add(DG + row, dgs, mask=t_ok)
            tl.store(DV + ((b * T + t) * H + h) * VD + offs_v, dv, mask=v_ok & t_ok)
        tl.debug_barrier()   # the next chunk overwrites the scratch

    # -- phase 3: the gradient of h0
    tl.store(DH0 + ((b * H + h) * KD + offs_k[:, None]) * VD + offs_v[None, :], dS,
             mask=k_ok[:, None] & v_ok[None, :])
