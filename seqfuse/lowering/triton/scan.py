"""seqfuse.scan on Triton kernels (the "triton" runtime path).

Contract (see :mod:`seqfuse.lowering.scan_op`):

    supports(t, a) -> None | reason
    forward(a, b, c, h0, dt, u, attrs) -> (y, h)
    backward(grad_y, grad_h, a, b, c, h0, dt, u, attrs) -> (da, db, dc, dh0, ddt, du)   (None where not needed)

Shapes: a, b, c, dt, u broadcastable to (*R, T, N), h0 to (*R, N); y is (*R, T) with a readout
c, else (*R, T, N); h (*R, N) the last state computed (t = 0 when ``reverse``).  The step is
h_t = decay_t ⊙ h_{t-1} + input_t with decay_t = exp(dt_t ⊙ a_t) when dt is given (a holds
log-decays: Mamba-1's A) else a_t, and input_t = b_t ⊙ dt_t ⊙ u_t (a missing factor is 1).
Both algorithms ("recurrent", "chunked") compute the same function.  "chunked" runs the kernels
of :mod:`seqfuse.lowering.triton.scan_kernels`, which form the decays and inputs in registers
(never a (*R, T, N) product in memory): blocks of BLOCK_T steps scanned in log depth with
``tl.associative_scan``, the state carried across blocks in fp32.  "recurrent" (chosen by
passes/select for decoding: a static T <= DECODE_MAX_T on CUDA) runs the step-by-step decode
kernel of :mod:`seqfuse.lowering.triton.decode` on materialized decays and inputs (T is a few
steps there); the backward is the blocked backward kernel below for either algorithm.

Broadcast operands keep their layout (stride 0; no copy): each operand is an expanded
(*R, T, N) view whose row dims are coalesced to at most three.  With a readout the whole N of a
row is one program (N ≤ MAX_N_READOUT), so y_t = Σ_n c_t[n]·h_t[n] is a plain in-program
reduction (no atomics); without one N is split in blocks of BLOCK_N.  The backward writes each
operand's gradient to an fp32 buffer per row, already summed over the axes along which the
operand is broadcast within (T, N) (Mamba's A (D, 1, N): (rows, 1, N); its dt and x (B, D, T, 1):
(rows, T, N blocks)), else per element (rows, T, N); torch sums the rest (N blocks, row dims).

With ``attrs["readout_dtype"]`` bf16 or fp16 the readout reads the states rounded to it (the
kernels' ROUND constexpr, :func:`round_code`; bf16 rounded to nearest even on the bits, as the GPU's
cast, since the interpreter's truncates) and y is in promote(readout_dtype, c); the backward's dc
reads the rounded states and the gradient reaching h_t through the readout, dy_t·c_t, is rounded
as autograd through the program's cast rounds it.  The final state is not rounded.

Refused (the next path runs the call): no triton / not allowed on this device (common.py),
complex or fp64 operands, N > MAX_N_READOUT with a readout, more than 2**31 rows or steps.
"""
from __future__ import annotations

import math

import torch

from seqfuse.lowering.reference.scan import discretize, out_dtype, scan_shape, y_dtype
from seqfuse.lowering.triton import decode
from seqfuse.lowering.triton.common import Rows as _Rows, KernelModule, next_pow2
from seqfuse.runtime import Impl, register_impl

_OPERANDS = ("a", "b", "c", "h0", "dt", "u")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: with a readout one program holds a row's whole state (the readout reduces over N in registers)
MAX_N_READOUT = 256
#: launch configs: BLOCK_N state entries per program (without a readout; with one, all of N), and
#: BLOCK_T steps per associative scan.  On a GPU the (BLOCK_T, BLOCK_N) tile is kept near TILE
#: elements (TILE_WARPS8 and up: 8 warps; the backward of a discretized call, which holds the
#: factors a, b, dt, u of a tile besides its maps, from TILE_WARPS8_DISCRETIZED_BWD): ptxas -v for
#: sm_90 shows no spills with these for N = 16 … 256 (forward and backward, with and without dt
#: and u; checked offline, not timed).  The interpreter's are small so that tests at T ≤ 40 cross
#: several blocks.
GPU_CONFIG = {"BLOCK_T": 64, "MIN_BLOCK_T": 16, "BLOCK_N": 32, "TILE": 1024, "TILE_WARPS8": 4096,
              "TILE_WARPS8_DISCRETIZED_BWD": 1024}
INTERPRETER_CONFIG = {"BLOCK_T": 8, "MIN_BLOCK_T": 8, "BLOCK_N": 8, "TILE": 1 << 30, "TILE_WARPS8": 1 << 30,
                      "TILE_WARPS8_DISCRETIZED_BWD": 1 << 30}

_kernels = KernelModule("scan_kernels")


def _launch(N: int, readout: bool, discretized_backward: bool = False) -> dict:
    """BLOCK_T, BLOCK_N and num_warps for a state of size N (the whole N in one program with a readout)."""
    cfg = INTERPRETER_CONFIG if _kernels().INTERPRETED else GPU_CONFIG
    block_n = max(2, next_pow2(N))
    if not readout:
        block_n = min(cfg["BLOCK_N"], block_n)
    block_t = max(cfg["MIN_BLOCK_T"], min(cfg["BLOCK_T"], cfg["TILE"] // block_n))
    warps8 = cfg["TILE_WARPS8_DISCRETIZED_BWD" if discretized_backward else "TILE_WARPS8"]
    return dict(BLOCK_T=block_t, BLOCK_N=block_n, num_warps=8 if block_t * block_n >= warps8 else 4)


def round_code(readout_dtype) -> int:
    """The kernels' ROUND constexpr for ``attrs["readout_dtype"]`` (scan_kernels.ROUND_*): the
    states are fp32 in the kernels, so an fp32 (or no) readout_dtype rounds nothing."""
    return {torch.bfloat16: 1, torch.float16: 2}.get(readout_dtype, 0)


def supports(t: dict, a: dict) -> str | None:
    """None when the triton kernels compute exactly this call, else the reason they do not."""
    ops = [(n, t.get(n)) for n in _OPERANDS]
    first = t["a"]
    reason = _kernels.availability(first.device)
    if not reason and a.get("algorithm") == "recurrent":   # the forward runs decode.py's kernel
        reason = decode._kernels.availability(first.device)
    if reason:
        return reason
    for name, x in ops:
        if x is None:
            continue
        if x.is_complex():
            return f"{name} is complex (the kernels are real; the eager reference runs complex scans)"
        if x.dtype not in _DTYPES:
            return f"{name} dtype {x.dtype} (the kernels take float32, float16, bfloat16)"
        if x.device != first.device:
            return "inputs on different devices"
    try:
        full = scan_shape(*(t.get(n) for n in _OPERANDS))
    except ValueError as exc:
        return str(exc)
    *R, T, N = full
    if t.get("c") is not None and N > MAX_N_READOUT:
        return f"state size N={N} > {MAX_N_READOUT} with a readout (one program holds a row's state)"
    if math.prod(R) >= 2 ** 31 or T >= 2 ** 31 or math.prod(full) >= 2 ** 62:
        return "more than 2**31 rows or steps"
    return None


# --- row layout -------------------------------------------------------------------------

def _views(*ops):
    """The operands (a, b, c, h0[, dt, u]) as (*R, T, N) views (h0 as (*R, N); None stays None), with
    their coalesced row layout: (full shape, views, rows)."""
    full = scan_shape(*ops)
    R, N = full[:-2], full[-1]
    views = [None if x is None else x.expand(*R, N) if i == 3 else x.expand(full) for i, x in enumerate(ops)]
    rows = _Rows(R, [v for v in views if v is not None])
    if not rows.ok:  # more than three row dims that do not merge: materialize the broadcasts
        views = [None if v is None else v.contiguous() for v in views]
        rows = _Rows(R, [v for v in views if v is not None])
    return full, views, rows


def _st(rows: _Rows, x, state=False) -> tuple:
    """Three row strides + the (T, N) strides of an operand (N only for a state); zeros when absent."""
    if x is None:
        return (0,) * (4 if state else 5)
    return (*rows.strides(x), x.stride(-1)) if state else (*rows.strides(x), x.stride(-2), x.stride(-1))


def _strides(rows: _Rows, av, bv, cv, hv, dv, uv) -> tuple:
    """The kernels' stride arguments: a, b, c, h0 (a state), dt, u."""
    return (*_st(rows, av), *_st(rows, bv), *_st(rows, cv), *_st(rows, hv, state=True), *_st(rows, dv),
            *_st(rows, uv))


def forward(a, b, c, h0, dt, u, attrs):
    """(y, h) of seqfuse.scan on the triton kernels; y (*R, T) with a readout else (*R, T, N), h (*R, N),
    in the promoted dtype of the operands (y: promote(readout_dtype, c) when ``attrs["readout_dtype"]``
    rounds the states the readout reads).  The decays exp(dt·a) and inputs b·dt·u of a discretized
    call are formed in the kernel, except for "recurrent" (the decode kernel of decode.py, on
    materialized ones: T is a few steps there)."""
    dtype = out_dtype(a, b, c, h0, dt, u)
    ydtype = y_dtype(dtype, c, attrs.get("readout_dtype"))
    if attrs.get("algorithm") == "recurrent":
        decay, inp = discretize(a, b, dt, u)
        y, h = decode.scan_forward(decay, inp, c, h0, attrs)
        return y.to(ydtype), h.to(dtype)
    full, (av, bv, cv, hv, dv, uv), rows = _views(a, b, c, h0, dt, u)
    *R, T, N = full
    y = torch.empty((*R, T) if c is not None else full, device=a.device, dtype=ydtype)
    h = torch.empty((*R, N), device=a.device, dtype=dtype)
    if rows.count == 0 or N == 0:
        return y, h
    if T == 0:
        h.copy_(hv if hv is not None else torch.zeros_like(h))
        return y, h
    cfg = _launch(N, c is not None)
    grid = (rows.count, -(-N // cfg["BLOCK_N"]))
    _kernels().scan_fwd_kernel[grid](
        *(x if x is not None else av for x in (av, bv, cv, hv, dv, uv)), y, h,
        T, N, rows.sizes[1], rows.sizes[2], *_strides(rows, av, bv, cv, hv, dv, uv),
        HAS_C=c is not None, HAS_H0=h0 is not None, HAS_DT=dt is not None, HAS_U=u is not None,
        REVERSE=bool(attrs.get("reverse", False)), ROUND=round_code(attrs.get("readout_dtype")), **cfg)
    return y, h


def _summed(x, T: int, N: int) -> int:
    """The kernel's SUM_* of an operand's gradient: the axes (T, N) along which ``x`` is broadcast,
    summed in the kernel (scan_kernels.SUM_T, SUM_N bits)."""
    K = _kernels()
    return (K.SUM_T if x.shape[-2] == 1 < T else 0) | (K.SUM_N if x.shape[-1] == 1 < N else 0)


def _grad_buffer(rows: _Rows, T: int, N: int, n_blocks: int, summed: int, state: bool, **f32):
    """The fp32 buffer the backward kernel writes an operand's gradient to (see scan_kernels'
    _grad_tile): (rows, T or 1, N or its N blocks) by ``summed``; a state's (rows, N)."""
    K = _kernels()
    if state:
        return torch.empty(rows.count, N, **f32)
    return torch.empty(rows.count, 1 if summed & K.SUM_T else T, n_blocks if summed & K.SUM_N else N, **f32)


def _reduce(g, like, R, summed: int):
    """A gradient buffer of :func:`_grad_buffer`, summed to ``like``'s shape and dtype: over the N
    blocks the kernel left (when it summed over N), then over the broadcast dims."""
    g = g.reshape(*R, *g.shape[1:])
    if summed & _kernels().SUM_N and g.shape[-1] > 1:
        g = g.sum(-1, keepdim=True)
    if tuple(g.shape) != tuple(like.shape):
        g = g.sum_to_size(like.shape)
    return g.to(like.dtype)


def backward(grad_y, grad_h, a, b, c, h0, dt, u, attrs):
    """(da, db, dc, dh0, ddt, du) of :func:`forward` given the gradients of y and of the final state,
    each in its operand's shape and dtype (None where ``attrs["needs"]`` (six bools) is False or the
    operand is absent).  Both algorithms run the blocked backward kernel, the discretized form
    without materializing its decays and inputs; the gradients of operands broadcast along T or N
    are summed over those axes in the kernel.  With ``attrs["readout_dtype"]`` dc takes the rounded
    states and the gradient reaching them through the readout is rounded (as autograd through the
    program's cast)."""
    ops = (a, b, c, h0, dt, u)
    needs = [bool(n) and x is not None for n, x in zip(list(attrs["needs"]) + [False] * 2, ops)]
    if not any(needs):
        return (None,) * 6
    full, views, rows = _views(*ops)
    *R, T, N = full
    f32 = dict(device=a.device, dtype=torch.float32)
    if rows.count == 0 or N == 0 or T == 0:
        zero = [torch.zeros_like(x) if n else None for x, n in zip(ops, needs)]
        if needs[3] and T == 0:
            zero[3] = grad_h.expand(*R, N).sum_to_size(h0.shape).to(h0.dtype)
        return tuple(zero)
    # no reduction over N in the backward: N is split in blocks
    cfg = _launch(N, False, discretized_backward=dt is not None or u is not None)
    block_t, block_n = cfg["BLOCK_T"], cfg["BLOCK_N"]
    nblk, n_blocks = -(-T // block_t), -(-N // block_n)
    dy = grad_y.expand((*R, T) if c is not None else full).contiguous()
    dht = (grad_h if grad_h is not None else torch.zeros(*R, N, **f32)).expand(*R, N).contiguous()
    ckpt = torch.empty(rows.count, nblk, N, **f32)
    summed = [_summed(x, T, N) if x is not None and i != 3 else 0 for i, x in enumerate(ops)]
    grads = [_grad_buffer(rows, T, N, n_blocks, s, i == 3, **f32) if n else None
             for i, (n, s) in enumerate(zip(needs, summed))]
    av = views[0]
    _kernels().scan_bwd_kernel[(rows.count, n_blocks)](
        *(x if x is not None else av for x in views), dy, dht, ckpt,
        *(x if x is not None else ckpt for x in grads),
        T, N, nblk, rows.sizes[1], rows.sizes[2], *_strides(rows, *views),
        HAS_C=c is not None, HAS_H0=h0 is not None, HAS_DT=dt is not None, HAS_U=u is not None,
        REVERSE=bool(attrs.get("reverse", False)), ROUND=round_code(attrs.get("readout_dtype")),
        NEED_DA=needs[0], NEED_DB=needs[1], NEED_DC=needs[2], NEED_DH0=needs[3], NEED_DDT=needs[4],
        NEED_DU=needs[5],
        SUM_A=summed[0], SUM_B=summed[1], SUM_C=summed[2], SUM_DT=summed[4], SUM_U=summed[5],
        **cfg)
    return tuple(_reduce(g, x, R, s) if n else None for g, x, n, s in zip(grads, ops, needs, summed))


def register() -> None:
    """Register the triton implementation of seqfuse.scan with the runtime dispatcher."""
    register_impl("scan", Impl("triton", supports, forward, backward))


register()  # importing this module (scan_op.py does) adds the "triton" path, tried before "cpu"
