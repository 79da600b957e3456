"""seqfuse.scan on Triton kernels (the "triton" runtime path).

Contract (see :mod:`seqfuse.lowering.scan_op`):

    supports(t, a) -> None | reason
    forward(a, b, c, h0, attrs) -> (y, h)
    backward(grad_y, grad_h, a, b, c, h0, attrs) -> (da, db, dc, dh0)   (None where not needed)

Shapes: a, b, c broadcastable to (*R, T, N), h0 to (*R, N); y is (*R, T) with a readout c, else
(*R, T, N); h (*R, N) the last state computed (t = 0 when ``reverse``).  Both algorithms
("recurrent", "chunked") compute the same function.  "chunked" runs the kernels of
:mod:`seqfuse.lowering.triton.scan_kernels`: blocks of BLOCK_T steps scanned in log depth with
``tl.associative_scan``, the state carried across blocks in fp32.  "recurrent" (chosen by
passes/select for decoding: a static T <= DECODE_MAX_T on CUDA) runs the step-by-step decode
kernel of :mod:`seqfuse.lowering.triton.decode`; the backward is the blocked backward kernel
below for either algorithm.

Broadcast operands keep their layout (stride 0; no copy): each operand is an expanded
(*R, T, N) view whose row dims are coalesced to at most three.  With a readout the whole N of a
row is one program (N ≤ MAX_N_READOUT), so y_t = Σ_n c_t[n]·h_t[n] is a plain in-program
reduction (no atomics); without one N is split in blocks of BLOCK_N.  The backward writes the
per-element gradients in (rows, T, N) fp32 buffers and sums them to the operands' shapes in
torch.

Refused (the next path runs the call): no triton / not allowed on this device (common.py),
complex or fp64 operands, N > MAX_N_READOUT with a readout, more than 2**31 rows or steps.
"""
from __future__ import annotations

import math

import torch

from seqfuse.lowering.reference.scan import out_dtype, scan_shape, with_discretization
from seqfuse.lowering.triton import decode
from seqfuse.lowering.triton.common import Rows as _Rows, availability
from seqfuse.runtime import Impl, register_impl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: with a readout one program holds a row's whole state (the readout reduces over N in registers)
MAX_N_READOUT = 256
#: launch configs: BLOCK_N state entries per program (without a readout; with one, all of N), and
#: BLOCK_T steps per associative scan.  On a GPU the (BLOCK_T, BLOCK_N) tile is kept near TILE
#: elements (TILE_WARPS8 and up: 8 warps): ptxas -v for sm_90 shows no spills with these for
#: N = 16 … 256 (forward and backward; checked offline, not timed).  The interpreter's are small so
#: that tests at T ≤ 40 cross several blocks.
GPU_CONFIG = {"BLOCK_T": 64, "MIN_BLOCK_T": 16, "BLOCK_N": 32, "TILE": 1024, "TILE_WARPS8": 4096}
INTERPRETER_CONFIG = {"BLOCK_T": 8, "MIN_BLOCK_T": 8, "BLOCK_N": 8, "TILE": 1 << 30, "TILE_WARPS8": 1 << 30}

_kernels_module = None


def _kernels():
    """The kernel module, imported on first use (``@triton.jit`` reads TRITON_INTERPRET when it runs)."""
    global _kernels_module
    if _kernels_module is None:
        from seqfuse.lowering.triton import scan_kernels
        _kernels_module = scan_kernels
    return _kernels_module


def _launch(N: int, readout: bool) -> dict:
    """BLOCK_T, BLOCK_N and num_warps for a state of size N (the whole N in one program with a readout)."""
    cfg = INTERPRETER_CONFIG if _kernels().INTERPRETED else GPU_CONFIG
    block_n = max(2, triton_next_pow2(N))
    if not readout:
        block_n = min(cfg["BLOCK_N"], block_n)
    block_t = max(cfg["MIN_BLOCK_T"], min(cfg["BLOCK_T"], cfg["TILE"] // block_n))
    return dict(BLOCK_T=block_t, BLOCK_N=block_n, num_warps=8 if block_t * block_n >= cfg["TILE_WARPS8"] else 4)


def supports(t: dict, a: dict) -> str | None:
    """None when the triton kernels compute exactly this call, else the reason they do not."""
    ops = [(n, t.get(n)) for n in ("a", "b", "c", "h0")]
    first = t["a"]
    reason = availability(first.device, _kernels_module)
    if not reason and a.get("algorithm") == "recurrent":   # the forward runs decode.py's kernel
        reason = availability(first.device, decode._kernels_module)
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
        full = scan_shape(t["a"], t["b"], t.get("c"), t.get("h0"))
    except ValueError as exc:
        return str(exc)
    *R, T, N = full
    if t.get("c") is not None and N > MAX_N_READOUT:
        return f"state size N={N} > {MAX_N_READOUT} with a readout (one program holds a row's state)"
    if math.prod(R) >= 2 ** 31 or T >= 2 ** 31 or math.prod(full) >= 2 ** 62:
        return "more than 2**31 rows or steps"
    return None


# --- row layout -------------------------------------------------------------------------

def _views(a, b, c, h0):
    """a, b, c as (*R, T, N) views and h0 as (*R, N), with their coalesced row layout."""
    full = scan_shape(a, b, c, h0)
    R, N = full[:-2], full[-1]
    views = [a.expand(full), b.expand(full), None if c is None else c.expand(full),
             None if h0 is None else h0.expand(*R, N)]
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


def forward(a, b, c, h0, attrs):
    """(y, h) of seqfuse.scan on the triton kernels; y (*R, T) with a readout else (*R, T, N), h (*R, N),
    in the promoted dtype of the operands.  "recurrent": the decode kernel (decode.py)."""
    if attrs.get("algorithm") == "recurrent":
        return decode.scan_forward(a, b, c, h0, attrs)
    full, (av, bv, cv, hv), rows = _views(a, b, c, h0)
    *R, T, N = full
    dtype = out_dtype(a, b, c, h0)
    y = torch.empty((*R, T) if c is not None else full, device=a.device, dtype=dtype)
    h = torch.empty((*R, N), device=a.device, dtype=dtype)
    if rows.count == 0 or N == 0:
        return y, h
    if T == 0:
        h.copy_(hv if hv is not None else torch.zeros_like(h))
        return y, h
    cfg = _launch(N, c is not None)
    grid = (rows.count, -(-N // cfg["BLOCK_N"]))
    dummy = av
    _kernels().scan_fwd_kernel[grid](
        av, bv, cv if cv is not None else dummy, hv if hv is not None else dummy, y, h,
        T, N, rows.sizes[1], rows.sizes[2],
        *_st(rows, av), *_st(rows, bv), *_st(rows, cv), *_st(rows, hv, state=True),
        HAS_C=c is not None, HAS_H0=h0 is not None, REVERSE=bool(attrs.get("reverse", False)), **cfg)
    return y, h


def _reduce(g, like):
    """A per-element gradient (full shape, fp32) summed over ``like``'s broadcast dims, in its dtype."""
    if tuple(g.shape) != tuple(like.shape):
        g = g.sum_to_size(like.shape)
    return g.to(like.dtype)


def backward(grad_y, grad_h, a, b, c, h0, attrs):
    """(da, db, dc, dh0) of :func:`forward` given the gradients of y and of the final state, each in
    its operand's shape and dtype (None where ``attrs["needs"]`` is False or the operand is absent)."""
    needs = [bool(n) and x is not None for n, x in zip(attrs["needs"], (a, b, c, h0))]
    if not any(needs):
        return (None,) * 4
    full, (av, bv, cv, hv), rows = _views(a, b, c, h0)
    *R, T, N = full
    f32 = dict(device=a.device, dtype=torch.float32)
    if rows.count == 0 or N == 0 or T == 0:
        zero = [torch.zeros_like(x) if n else None for x, n in zip((a, b, c, h0), needs)]
        if needs[3] and T == 0:
            zero[3] = grad_h.expand(*R, N).sum_to_size(h0.shape).to(h0.dtype)
        return tuple(zero)
    cfg = _launch(N, False)   # no reduction over N in the backward: N is split in blocks
    block_t, block_n = cfg["BLOCK_T"], cfg["BLOCK_N"]
    nblk = -(-T // block_t)
    dy = grad_y.expand((*R, T) if c is not None else full).contiguous()
    dht = (grad_h if grad_h is not None else torch.zeros(*R, N, **f32)).expand(*R, N).contiguous()
    ckpt = torch.empty(rows.count, nblk, N, **f32)
    da, db, dc = (torch.empty(full, **f32) if n else None for n in needs[:3])
    dh0 = torch.empty(*R, N, **f32) if needs[3] else None
    dummy = ckpt
    grid = (rows.count, -(-N // block_n))
    _kernels().scan_bwd_kernel[grid](
        av, bv, cv if cv is not None else dummy, hv if hv is not None else dummy, dy, dht, ckpt,
        *(x if x is not None else dummy for x in (da, db, dc, dh0)),
        T, N, nblk, rows.sizes[1], rows.sizes[2],
        *_st(rows, av), *_st(rows, bv), *_st(rows, cv), *_st(rows, hv, state=True),
        HAS_C=c is not None, HAS_H0=h0 is not None, REVERSE=bool(attrs.get("reverse", False)),
        NEED_DA=needs[0], NEED_DB=needs[1], NEED_DC=needs[2], NEED_DH0=needs[3],
        **cfg)
    return tuple(_reduce(g, x) if n else None for g, x, n in zip((da, db, dc, dh0), (a, b, c, h0), needs))


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def register() -> None:
    """Register the triton implementation of seqfuse.scan with the runtime dispatcher."""
    register_impl("scan", Impl("triton", supports, *with_discretization(forward, backward)))


register()  # importing this module (scan_op.py does) adds the "triton" path, tried before "cpu"
