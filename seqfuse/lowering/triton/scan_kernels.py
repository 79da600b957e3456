"""Triton kernels of seqfuse.scan; the host side is :mod:`seqfuse.lowering.triton.scan`.

One *row* is one independent recurrence h_t = decay_t ⊙ h_{t-1} + input_t over (T, N) (an index
of the leading dims R of the broadcast (*R, T, N) shape).  The step's maps are formed in
registers from the operands, never materialized: decay_t = exp(dt_t ⊙ a_t) with a dt
(``HAS_DT``; a holds log-decays, e.g. Mamba-1's A) else a_t, and input_t = b_t ⊙ dt_t ⊙ u_t (a
missing factor is 1; ``HAS_U``).  A row index r is split into three coalesced batch indices
(i0, i1, i2) of sizes (S0, S1, S2), and each operand finds its row by its own strides
(``_row``), so a broadcast operand (stride 0: Mamba-1's C expanded over channels, its A shared
over the batch and time, its dt and x shared over the state) is never materialized either.

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
  shifted by one position) and the adjoint g_t = dy_t·c_t + decay_{t+1}·g_{t+1} is a reverse
  ``tl.associative_scan`` of the same affine maps, carrying g across blocks.  The gradients of
  the step's decay and input are g_decay = g·h_{t-1} and g_input = g; the operands' follow:

      da  = g_decay·decay·dt  (with dt; else g_decay)      db = g_input·dt·u
      ddt = g_decay·decay·a + g_input·b·u                  du = g_input·b·dt
      dc  = dy·h_t                                         dh0 = decay_0·g_0

  With states rounded before the readout (``ROUND``, seqfuse.scan's readout_dtype: y_t =
  Σ_n c_t[n]·round(h_t[n])), dc takes the rounded h_t and dy_t·c_t, the gradient reaching h_t
  through the readout, is rounded too (autograd through the program's cast rounds it).

  Each operand's gradient goes to an fp32 buffer per row, summed in the kernel over the axes
  along which the operand is broadcast (``SUM_*``, set by the host from the operand's shape):
  over T in registers across the block loop (an a of shape (…, 1, N), Mamba's A: the buffer is
  (rows, 1, N)), and over this program's N block (a dt or u of shape (…, T, 1): the buffer is
  (rows, T, N blocks)); else per element, (rows, T, N).  The host sums what is left (the N
  blocks, the broadcast row dims).

State and every product are fp32, whatever the operands' dtype (fp32, fp16, bf16).
"""
from __future__ import annotations

import triton
import triton.language as tl

#: True when ``@triton.jit`` below built interpreted kernels (TRITON_INTERPRET=1 at import)
INTERPRETED = bool(triton.knobs.runtime.interpret)

#: the kernels' ``ROUND`` constexpr: the states the readout reads, as they are (ROUND_NONE) or rounded
#: to bf16 / fp16 and back (the program's ``h.to(bf16) @ C``: seqfuse.scan's readout_dtype)
ROUND_NONE = 0
ROUND_BF16 = 1
ROUND_FP16 = 2

#: a gradient's ``SUM_*`` constexpr (the kernels spell the values out): 0 per element, else the sum
#: of these bits: over this program's N block (SUM_N), over time (SUM_T)
SUM_N = 1
SUM_T = 2

# No function of triton's standard library (tl.sum, tl.zeros, tl.cumsum, ...) is called: those are
# @triton.jit functions jitted for one mode when triton.language is first imported, and an
# interpreted kernel cannot call a compiled one (tl.reduce / tl.associative_scan with the combine
# functions below and tl.full stand in for them).
#
# An operand below is a tuple (row pointer, T stride, N stride); ``t`` and ``n`` are index tensors
# of one shape (a (BLOCK_T, BLOCK_N) tile: t[:, None] and n[None, :]), ``mask`` of that shape.


@triton.jit
def _sum_combine(x, y):
    return x + y


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    """(a1, b1) then (a2, b2): h -> a2·(a1·h + b1) + b2."""
    return a1 * a2, a2 * b1 + b2


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
def _load(op, t, n, mask, other):
    """Operand ``op`` at (t, n) in fp32; ``other`` where masked."""
    ptr, st, sn = op
    return tl.load(ptr + t * st + n * sn, mask=mask, other=other).to(tl.float32)


@triton.jit
def _factor(op, t, n, mask, HAS: tl.constexpr):
    """An optional factor (dt, u) at (t, n): 0 where masked, the constant 1 when absent."""
    if HAS:
        x = _load(op, t, n, mask, 0.0)
    else:
        x = 1.0
    return x


@triton.jit
def _discretize(a, b, dt, u, HAS_DT: tl.constexpr):
    """The step's (decay, input) from its factors: (exp(dt·a) with dt else a, b·dt·u)."""
    if HAS_DT:
        decay = tl.exp(dt * a)
    else:
        decay = a
    return decay, b * dt * u


@triton.jit
def _maps(a_op, b_op, dt_op, u_op, t, n, mask, HAS_DT: tl.constexpr, HAS_U: tl.constexpr):
    """The steps' (decay, input) at (t, n); the identity (1, 0) where masked."""
    a = _load(a_op, t, n, mask, 1.0)      # with dt, a masked dt of 0 makes the decay 1
    b = _load(b_op, t, n, mask, 0.0)
    return _discretize(a, b, _factor(dt_op, t, n, mask, HAS_DT), _factor(u_op, t, n, mask, HAS_U), HAS_DT)


@triton.jit
def _decay(a_op, dt_op, t, n, mask, HAS_DT: tl.constexpr):
    """The steps' decay at (t, n): exp(dt·a) with dt, else a; 1 where masked."""
    if HAS_DT:
        d = tl.exp(_load(dt_op, t, n, mask, 0.0) * _load(a_op, t, n, mask, 0.0))
    else:
        d = _load(a_op, t, n, mask, 1.0)
    return d


@triton.jit
def _grad_tile(G, x, acc, r64, t, offs_n, mask_t, mask_n, T, N, SUM: tl.constexpr):
    """A block's gradient tile ``x`` (BLOCK_T, BLOCK_N) of one operand, masked elements counted 0:
    added to ``acc`` (BLOCK_N,) when SUM has SUM_T (stored by _grad_flush), else stored to G,
    summed over this program's N block (SUM_N; G (rows, T, N blocks)) or per element (G (rows, T,
    N)).  Returns acc."""
    x = tl.where(mask_t[:, None] & mask_n[None, :], x, 0.0)
    if SUM >= 2:                          # SUM_T (and maybe SUM_N: _grad_flush)
        acc += tl.reduce(x, 0, _sum_combine)
    elif SUM == 1:                        # SUM_N
        out = (r64 * T + t) * tl.num_programs(1) + tl.program_id(1)
        tl.store(G + out, tl.reduce(x, 1, _sum_combine), mask=mask_t)
    else:
        tl.store(G + (r64 * T + t[:, None]) * N + offs_n[None, :], x, mask=mask_t[:, None] & mask_n[None, :])
    return acc


@triton.jit
def _grad_flush(G, acc, r64, offs_n, mask_n, N, SUM: tl.constexpr):
    """Store a gradient summed over time (SUM has SUM_T): G (rows, 1, N), or (rows, 1, N blocks)
    when also summed over the N block."""
    if SUM >= 2:
        if SUM == 3:
            tl.store(G + r64 * tl.num_programs(1) + tl.program_id(1), tl.reduce(acc, 0, _sum_combine))
        else:
            tl.store(G + r64 * N + offs_n, acc, mask=mask_n)


@triton.jit
def scan_fwd_kernel(
        A, B, C, H0, DT, U, Y, HT,
        T, N, S1, S2,
        SA0, SA1, SA2, SAT, SAN,
        SB0, SB1, SB2, SBT, SBN,
        SC0, SC1, SC2, SCT, SCN,
        SH0, SH1, SH2, SHN,
        SD0, SD1, SD2, SDT, SDN,
        SU0, SU1, SU2, SUT, SUN,
        HAS_C: tl.constexpr, HAS_H0: tl.constexpr, HAS_DT: tl.constexpr, HAS_U: tl.constexpr,
        REVERSE: tl.constexpr, ROUND: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """Y (rows, T) with HAS_C (else (rows, T, N)) and HT (rows, N), both contiguous, each in its own
    dtype; the readout reads the states rounded by ROUND (see _round)."""
    r = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_i = tl.arange(0, BLOCK_T)
    a_op = (A + _row(r, S1, S2, SA0, SA1, SA2), SAT, SAN)
    b_op = (B + _row(r, S1, S2, SB0, SB1, SB2), SBT, SBN)
    c_op = (C + _row(r, S1, S2, SC0, SC1, SC2), SCT, SCN)
    dt_op = (DT + _row(r, S1, S2, SD0, SD1, SD2), SDT, SDN)
    u_op = (U + _row(r, S1, S2, SU0, SU1, SU2), SUT, SUN)
    r64 = r.to(tl.int64)

    # phase 1: the state entering the first block (h0, or zero)
    if HAS_H0:
        h = tl.load(H0 + _row(r, S1, S2, SH0, SH1, SH2) + offs_n * SHN, mask=mask_n, other=0.0).to(tl.float32)
    else:
        h = tl.full((BLOCK_N,), 0.0, tl.float32)

    for p0 in range(0, T, BLOCK_T):
        # phase 2: the block's maps (decay, input); positions past T are the identity (1, 0)
        pos = p0 + offs_i
        mask_t = pos < T
        t = _times(pos, T, REVERSE)
        m2 = mask_t[:, None] & mask_n[None, :]
        a, b = _maps(a_op, b_op, dt_op, u_op, t[:, None], offs_n[None, :], m2, HAS_DT, HAS_U)
        # phase 3: prefix maps inside the block (log-depth), applied to the carried state
        pa, pb = tl.associative_scan((a, b), 0, _affine_combine)
        hs = pa * h[None, :] + pb                                        # (BLOCK_T, BLOCK_N)
        # phase 4: the readout y_t = Σ_n c_t[n]·h_t[n] (the whole N in this program), or every state
        if HAS_C:
            c = _load(c_op, t[:, None], offs_n[None, :], m2, 0.0)
            y = tl.reduce(c * _round(hs, ROUND), 1, _sum_combine)
            tl.store(Y + r64 * T + t, y.to(Y.dtype.element_ty), mask=mask_t)
        else:
            tl.store(Y + (r64 * T + t[:, None]) * N + offs_n[None, :], hs.to(Y.dtype.element_ty), mask=m2)
        # phase 5: carry the last state of the block (the padding is the identity)
        h = tl.reduce(tl.where(offs_i[:, None] == BLOCK_T - 1, hs, 0.0), 0, _sum_combine)

    # phase 6: the final state (the one at t = 0 when REVERSE)
    tl.store(HT + r64 * N + offs_n, h.to(HT.dtype.element_ty), mask=mask_n)


@triton.jit
def scan_bwd_kernel(
        A, B, C, H0, DT, U, DY, DHT, CKPT, DA, DB, DC, DH0, DDT, DU,
        T, N, NBLK, S1, S2,
        SA0, SA1, SA2, SAT, SAN,
        SB0, SB1, SB2, SBT, SBN,
        SC0, SC1, SC2, SCT, SCN,
        SH0, SH1, SH2, SHN,
        SD0, SD1, SD2, SDT, SDN,
        SU0, SU1, SU2, SUT, SUN,
        HAS_C: tl.constexpr, HAS_H0: tl.constexpr, HAS_DT: tl.constexpr, HAS_U: tl.constexpr,
        REVERSE: tl.constexpr, ROUND: tl.constexpr,
        NEED_DA: tl.constexpr, NEED_DB: tl.constexpr, NEED_DC: tl.constexpr, NEED_DH0: tl.constexpr,
        NEED_DDT: tl.constexpr, NEED_DU: tl.constexpr,
        SUM_A: tl.constexpr, SUM_B: tl.constexpr, SUM_C: tl.constexpr, SUM_DT: tl.constexpr,
        SUM_U: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """DY (rows, T) with HAS_C (else (rows, T, N)), DHT (rows, N) contiguous; CKPT (rows, NBLK, N)
    fp32 scratch; DA, DB, DC, DDT, DU contiguous fp32 outputs laid out by their SUM_* (see
    _grad_tile, _grad_flush), DH0 (rows, N) contiguous fp32.  With ROUND the forward's readout read
    rounded states (see _round): dc takes them, and the gradient reaching h_t through the readout,
    dy_t·c_t, is rounded as autograd through the program's cast rounds it."""
    r = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_i = tl.arange(0, BLOCK_T)
    nn = offs_n[None, :]
    a_op = (A + _row(r, S1, S2, SA0, SA1, SA2), SAT, SAN)
    b_op = (B + _row(r, S1, S2, SB0, SB1, SB2), SBT, SBN)
    c_op = (C + _row(r, S1, S2, SC0, SC1, SC2), SCT, SCN)
    dt_op = (DT + _row(r, S1, S2, SD0, SD1, SD2), SDT, SDN)
    u_op = (U + _row(r, S1, S2, SU0, SU1, SU2), SUT, SUN)
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
        a, b = _maps(a_op, b_op, dt_op, u_op, t[:, None], nn, m2, HAS_DT, HAS_U)
        pa, pb = tl.associative_scan((a, b), 0, _affine_combine)
        h = tl.reduce(tl.where(offs_i[:, None] == BLOCK_T - 1, pa * h[None, :] + pb, 0.0), 0, _sum_combine)
    tl.debug_barrier()  # the checkpoints are read back below (by other threads of this program, maybe)

    # phase 2: the adjoint, blocks last to first; g carries ∂L/∂h of the position after the block
    # (the final state's gradient enters through a virtual step with decay_T = 1).  The gradients
    # summed over time accumulate in acc_* (BLOCK_N,).
    g = tl.load(DHT + r64 * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    acc_a = tl.full((BLOCK_N,), 0.0, tl.float32)
    acc_b = tl.full((BLOCK_N,), 0.0, tl.float32)
    acc_c = tl.full((BLOCK_N,), 0.0, tl.float32)
    acc_dt = tl.full((BLOCK_N,), 0.0, tl.float32)
    acc_u = tl.full((BLOCK_N,), 0.0, tl.float32)
    for kk in range(0, NBLK):
        k = NBLK - 1 - kk
        pos = k * BLOCK_T + offs_i
        mask_t = pos < T
        t = _times(pos, T, REVERSE)
        tt = t[:, None]
        m2 = mask_t[:, None] & mask_n[None, :]
        h_in = tl.load(ck_ptr + k * N, mask=mask_n, other=0.0)
        # phase 2a: the block's factors and maps, and its states h_t from its checkpoint
        a_f = _load(a_op, tt, nn, m2, 1.0)
        b_f = _load(b_op, tt, nn, m2, 0.0)
        dt_f = _factor(dt_op, tt, nn, m2, HAS_DT)
        u_f = _factor(u_op, tt, nn, m2, HAS_U)
        a, b = _discretize(a_f, b_f, dt_f, u_f, HAS_DT)
        pa, pb = tl.associative_scan((a, b), 0, _affine_combine)
        hs = pa * h_in[None, :] + pb
        # phase 2b: h_{t-1}: the maps shifted by one position, the first one the constant h_in
        pos_p = pos - 1
        m_p = ((pos_p >= k * BLOCK_T) & (pos_p < T))[:, None] & mask_n[None, :]
        a_p, b_p = _maps(a_op, b_op, dt_op, u_op, _times(pos_p, T, REVERSE)[:, None], nn, m_p, HAS_DT, HAS_U)
        first = (offs_i == 0)[:, None]
        a_p = tl.where(first, 0.0, a_p)
        b_p = tl.where(first, h_in[None, :], b_p)
        _, h_prev = tl.associative_scan((a_p, b_p), 0, _affine_combine)
        # phase 2c: what reaches h_t directly: dy_t·c_t with a readout, else dy_t
        if HAS_C:
            dy = tl.load(DY + r64 * T + t, mask=mask_t, other=0.0).to(tl.float32)
            direct = _round(dy[:, None] * _load(c_op, tt, nn, m2, 0.0), ROUND)
        else:
            direct = tl.load(DY + (r64 * T + tt) * N + nn, mask=m2, other=0.0).to(tl.float32)
        # phase 2d: the adjoint g_t = direct_t + decay_{t+1}·g_{t+1}: a reverse scan of
        # (decay_{t+1}, direct_t), applied to the g carried from the next block (the last
        # position's decay_{t+1} is 1)
        pos_n = pos + 1
        m_n = (pos_n < T)[:, None] & mask_n[None, :]
        a_n = _decay(a_op, dt_op, _times(pos_n, T, REVERSE)[:, None], nn, m_n, HAS_DT)
        ga, gb = tl.associative_scan((a_n, direct), 0, _affine_combine, reverse=True)
        gs = ga * g[None, :] + gb
        # phase 2e: the gradients of the decays (g_decay) and inputs (gs), taken back to the operands
        g_decay = gs * h_prev
        if NEED_DA:
            if HAS_DT:
                acc_a = _grad_tile(DA, g_decay * a * dt_f, acc_a, r64, t, offs_n, mask_t, mask_n, T, N, SUM_A)
            else:
                acc_a = _grad_tile(DA, g_decay, acc_a, r64, t, offs_n, mask_t, mask_n, T, N, SUM_A)
        if NEED_DB:
            acc_b = _grad_tile(DB, gs * dt_f * u_f, acc_b, r64, t, offs_n, mask_t, mask_n, T, N, SUM_B)
        if NEED_DC:
            acc_c = _grad_tile(DC, dy[:, None] * _round(hs, ROUND), acc_c, r64, t, offs_n, mask_t, mask_n, T, N,
                               SUM_C)
        if NEED_DDT:
            ddt = g_decay * a * a_f + gs * b_f * u_f
            acc_dt = _grad_tile(DDT, ddt, acc_dt, r64, t, offs_n, mask_t, mask_n, T, N, SUM_DT)
        if NEED_DU:
            acc_u = _grad_tile(DU, gs * b_f * dt_f, acc_u, r64, t, offs_n, mask_t, mask_n, T, N, SUM_U)
        g = tl.reduce(tl.where(first, gs, 0.0), 0, _sum_combine)   # g_0 of this block

    # phase 3: the gradients summed over time, and the initial state's dh0 = decay_0·g_0
    if NEED_DA:
        _grad_flush(DA, acc_a, r64, offs_n, mask_n, N, SUM_A)
    if NEED_DB:
        _grad_flush(DB, acc_b, r64, offs_n, mask_n, N, SUM_B)
    if NEED_DC:
        _grad_flush(DC, acc_c, r64, offs_n, mask_n, N, SUM_C)
    if NEED_DDT:
        _grad_flush(DDT, acc_dt, r64, offs_n, mask_n, N, SUM_DT)
    if NEED_DU:
        _grad_flush(DU, acc_u, r64, offs_n, mask_n, N, SUM_U)
    if NEED_DH0:
        t0 = _times(offs_n * 0, T, REVERSE)
        a0 = _decay(a_op, dt_op, t0, offs_n, mask_n & (T > 0), HAS_DT)
        tl.store(DH0 + r64 * N + offs_n, a0 * g, mask=mask_n)
