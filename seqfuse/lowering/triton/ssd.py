"""seqfuse.ssd on Triton kernels (the "triton" runtime path): the chunked algorithm, and the
recurrent (decode) form through :mod:`seqfuse.lowering.triton.decode`.

Contract (see :mod:`seqfuse.lowering.ssd_op`):

    supports(t, a) -> None | reason
    forward(x, b, c, a, d, h0, attrs) -> (y, h)
    backward(grad_y, grad_h, x, b, c, a, d, h0, attrs) -> (dx, db, dc, da, dd, dh0)

Shapes: x (B, T, H, P); b, c (B, T, H, N) (or broadcasting to it: a b shared by all heads is a
stride-0 view, never copied); a (B, T, H) for decay="scalar", (B, T, H, N) for "vector", None for
"none"; d (H,) or (H, P); h0 (B, H, P, N).  y (B, T, H, P) and the final state (B, H, P, N) in
the promoted dtype of x, b, c.

Forward: one fused kernel (:mod:`seqfuse.lowering.triton.ssd_kernels`), one program per
(b, h, block of P), the chunks walked in order with the state in fp32 registers.  Its chunk
length is the kernel's tile (BLOCK_T: 32 or 16 on a GPU, see GPU_CONFIG), not
``attrs["chunk"]``: every chunk length computes the same function.

Backward: the chunked algorithm's adjoint, states recomputed by a forward sweep and stored per
chunk.  Decay none / scalar with P, N <= MAX_PN_BACKWARD: ``ssd_chunked_bwd_kernel`` (one program
per (b, h)).  Decay vector (N <= MAX_N_VECTOR, any P): ``ssd_vector_bwd_kernel``, one program per
(b, h, block of P, block of N) (a vector decay keeps the state's columns independent too), with the
exact (BLOCK_T, BLOCK_T, BLOCK_N) decay tile of the forward; db, dc, da are summed over the P
blocks and dx over the N blocks on the host.  Otherwise (decay none / scalar with larger P or N)
it recomputes through the chunked reference's written-out adjoint
(:func:`seqfuse.lowering.reference.ssd.ssd_chunked_backward`, torch ops on the call's device with
``attrs["chunk"]``).

Refused (the next path runs the call): no triton / not allowed on this device (common.py), an
algorithm other than "chunked" or "recurrent", complex or fp64 operands, N > MAX_N (MAX_N_VECTOR for vector
decay: its scores are a (BLOCK_T, BLOCK_T, N) tile), tensors of 2**31 elements or more.
"""
from __future__ import annotations

import torch

from seqfuse.lowering.reference.ssd import DECAYS, check_ssd_args, out_dtype, ssd_chunked_backward, ssd_shapes
from seqfuse.lowering.triton.common import KernelModule, next_pow2 as _next_pow2
from seqfuse.runtime import Impl, all_finite, below_pos_inf, register_impl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: the state block (BLOCK_P, N) of a program lives in registers
MAX_N = 128
MAX_N_VECTOR = 64
#: tl.dot input precision of the fp32 tiles on a GPU: fp32-accurate "tf32x3" for fp32 operands,
#: one-pass "tf32" (10-bit mantissa, finer than the operands' own) for fp16 / bf16 operands
FP32_DOT_PRECISION = "tf32x3"
LOWP_DOT_PRECISION = "tf32"
#: launch configs per decay kind and largest N: (N_max, BLOCK_T steps per chunk, BLOCK_P value dims
#: per program, num_warps).  On a GPU chosen from ptxas -v for sm_90 (no or small register spills;
#: checked offline, not timed).  The interpreter's are small so that tests at T ≤ 40, P ≤ 16 cross
#: several chunks and P blocks.
GPU_CONFIG = {"none": [(64, 32, 32, 8), (128, 16, 16, 4)],
              "scalar": [(64, 32, 32, 8), (128, 16, 16, 4)],
              "vector": [(64, 16, 32, 8)]}
INTERPRETER_CONFIG = {"none": [(MAX_N, 8, 8, 4)], "scalar": [(MAX_N, 8, 8, 4)], "vector": [(MAX_N, 8, 8, 4)]}
_DECAY_CODE = {"none": 0, "scalar": 1, "vector": 2}

_kernels = KernelModule("ssd_kernels")


def operand_reason(t: dict, decay) -> tuple[str | None, tuple | None]:
    """(reason, None) when an ssd call's operands are not for any triton ssd kernel (decay kind,
    dtype, device, int32 offsets, shapes); else (None, (B, T, H, P, N))."""
    if decay not in DECAYS:
        return f"decay {decay!r}", None
    named = [(n, t.get(n)) for n in ("x", "b", "c", "a", "d", "h0")]
    for name, v in named:
        if v is None:
            continue
        if v.is_complex():
            return f"{name} is complex (the kernel is real)", None
        if v.dtype not in _DTYPES:
            return f"{name} dtype {v.dtype} (the kernel takes float32, float16, bfloat16)", None
        if v.device != t["x"].device:
            return "inputs on different devices", None
        if v.numel() >= 2 ** 31:
            return f"{name} has 2**31 elements or more (int32 offsets inside a sequence)", None
    try:
        check_ssd_args(*(v for _, v in named), decay)
        return None, ssd_shapes(t["x"], t["b"], t["c"], t.get("h0"))
    except (ValueError, RuntimeError) as exc:
        return f"shapes: {exc}", None


def _nonfinite_operand(t: dict) -> bool:
    """A NaN or ±inf in any operand but the log-decay, or a NaN or +inf in the log-decay (-inf, a
    reset of the state, is exact)."""
    ok = all_finite(*(v for name, v in t.items() if name != "a"))
    if t.get("a") is not None:
        ok = ok & below_pos_inf(t["a"]).to(ok.device)
    return not bool(ok)


def supports(t: dict, a: dict) -> str | None:
    """None when the triton kernels compute exactly this call, else the reason they do not."""
    x = t["x"]
    reason = _kernels.availability(x.device)
    if reason:
        return reason
    if "needs" in a and _nonfinite_operand(t):
        # a backward call (its attributes carry ``needs``): the chunked adjoint takes differences of
        # cumulative sums, which meet inf - inf at an infinite input at a reset step where the
        # program's gradient is finite; the recurrence differentiated step by step keeps its NaN rules.
        # A log-decay of -inf alone (a reset) is exact in the kernels.
        return "a NaN or inf operand in the backward (the chunked adjoint would meet inf - inf)"
    if a.get("algorithm") == "recurrent":  # the decode kernel (decode.py); the backward as for "chunked"
        from seqfuse.lowering.triton import decode
        return decode.ssd_supports(t, a)
    if a.get("algorithm") != "chunked":
        return f"algorithm {a.get('algorithm')!r} (the triton kernels implement 'chunked' and 'recurrent')"
    decay = a.get("decay")
    reason, shapes = operand_reason(t, decay)
    if reason:
        return reason
    B, T, H, P, N = shapes
    limit = MAX_N_VECTOR if decay == "vector" else MAX_N
    if N > limit:
        return f"state size N={N} > {limit} for decay={decay!r} (a program's state block lives in registers)"
    if B * T * H * max(P, N) >= 2 ** 31:
        return "2**31 elements or more"
    return None


def _launch(decay: str, N: int, dtype: torch.dtype) -> dict:
    """BLOCK_T, BLOCK_P, num_warps and the dot precision for a state of size N."""
    interpreted = _kernels().INTERPRETED
    table = (INTERPRETER_CONFIG if interpreted else GPU_CONFIG)[decay]
    _, block_t, block_p, warps = next((row for row in table if N <= row[0]), table[-1])
    precision = "ieee" if interpreted else (FP32_DOT_PRECISION if dtype == torch.float32 else LOWP_DOT_PRECISION)
    return dict(BLOCK_T=block_t, BLOCK_P=block_p, num_warps=warps, PRECISION=precision)


def forward_launch(x, b, c, a, d, h0, decay):
    """What the ssd forward kernels (chunked here, decode in decode.py: the same leading signature)
    share: ((B, T, H, P, N), y, h, args, flags) with y (B, T, H, P) and h (B, H, P, N) fresh outputs
    in the promoted dtype, args the operands as strided views of their full shapes (stride 0 where
    one broadcasts: never copied), the outputs, the sizes and the strides, and flags the DECAY /
    HAS_D / HAS_H0 constexprs.  args is None when there is nothing to compute."""
    B, T, H, P, N = ssd_shapes(x, b, c, h0)
    dtype = out_dtype(x, b, c)
    y = torch.empty(B, T, H, P, device=x.device, dtype=dtype)
    h = torch.empty(B, H, P, N, device=x.device, dtype=dtype)
    if y.numel() == 0 and h.numel() == 0:
        return (B, T, H, P, N), y, h, None, None
    xv = x.expand(B, T, H, P)
    bv, cv = b.expand(B, T, H, N), c.expand(B, T, H, N)
    av = None if a is None else a.expand((B, T, H) if decay == "scalar" else (B, T, H, N))
    dv = None if d is None else (d[:, None] if d.dim() == 1 else d).expand(H, P)
    hv = h0.expand(B, H, P, N) if h0 is not None else None
    a_st = (0, 0, 0, 0) if av is None else (*av.stride()[:3], av.stride(3) if decay == "vector" else 0)
    dummy = xv
    args = (xv, bv, cv, av if av is not None else dummy, dv if dv is not None else dummy,
            hv if hv is not None else dummy, y, h,
            T, H, P, N,
            *xv.stride(), *bv.stride(), *cv.stride(), *a_st,
            *(dv.stride() if dv is not None else (0, 0)), *(hv.stride() if hv is not None else (0, 0, 0, 0)))
    flags = dict(DECAY=_DECAY_CODE[decay], HAS_D=d is not None, HAS_H0=h0 is not None)
    return (B, T, H, P, N), y, h, args, flags


def forward(x, b, c, a, d, h0, attrs):
    """(y (B, T, H, P), h (B, H, P, N)) of the chunked SSD on the triton kernel ("recurrent": decode.py)."""
    if attrs.get("algorithm") == "recurrent":
        from seqfuse.lowering.triton import decode
        return decode.ssd_forward(x, b, c, a, d, h0, attrs)
    decay = attrs["decay"]
    (B, T, H, P, N), y, h, args, flags = forward_launch(x, b, c, a, d, h0, decay)
    if args is None:
        return y, h
    cfg = _launch(decay, N, y.dtype)
    gpu = not _kernels().INTERPRETED
    block_n = max(16 if gpu else 2, _next_pow2(N))   # tl.dot's smallest tile on a GPU is 16
    block_p = min(cfg.pop("BLOCK_P"), max(16 if gpu else 2, _next_pow2(P)))
    grid = (B * H, -(-P // block_p))
    _kernels().ssd_chunked_fwd_kernel[grid](*args, **flags, BLOCK_P=block_p, BLOCK_N=block_n, **cfg)
    return y, h


#: the backward kernel holds all of P and N of a (b, h) in one program (decay none / scalar)
MAX_PN_BACKWARD = 64
#: vector decay's backward kernel: (BLOCK_T, BLOCK_P, BLOCK_N, num_warps); a program owns a
#: (BLOCK_P, BLOCK_N) tile of the state and a (BLOCK_T, BLOCK_T, BLOCK_N) tile of decays.  On a GPU
#: chosen from ptxas -v for sm_90 (checked offline, not timed): 255 registers, spills of ~90 B (bf16
#: operands, tf32 dots) and ~350 B (fp32, tf32x3) at BLOCK_P = 64; none at BLOCK_P = 16, ~400-800 B
#: at BLOCK_P = 32 (P = 17 … 32); BLOCK_N = 64 spills ~1 KB.  Keeping a log-decay of -inf exact (the
#: counts of _log_cum, an (l, n) tile more) took BLOCK_N = 32 from ~350 B to 564 B of spills (fp32,
#: tf32x3, d and h0); BLOCK_N = 16 spills 204 B.  The interpreter's split the tests'
#: P = 12, N = 6 into two blocks each, so the host's sums over blocks are exercised.
VECTOR_BWD_GPU_CONFIG = (16, 64, 16, 8)
VECTOR_BWD_INTERPRETER_CONFIG = (8, 8, 4, 4)


def backward_kernel_reason(x, b, c, h0, decay) -> str | None:
    """None when a backward kernel runs this call, else why the chunked reference's adjoint does."""
    B, T, H, P, N = ssd_shapes(x, b, c, h0)
    if decay == "vector":
        if N > MAX_N_VECTOR:
            return f"N={N} > {MAX_N_VECTOR} for decay='vector'"
        return None
    if max(P, N) > MAX_PN_BACKWARD:
        return f"P={P} or N={N} > {MAX_PN_BACKWARD}"
    return None


def _vector_grads(dy, dht, x, b, c, a, d, h0, dtype):
    """fp32 (dx, db, dc, da, dd, dh0) in full shapes from ``ssd_vector_bwd_kernel`` (dd per (b, h, p)).

    Grid (b·h, P blocks, N blocks): the state's rows and (vector decay) columns evolve independently;
    db, dc, da are summed here over the P blocks and dx over the N blocks."""
    B, T, H, P, N = ssd_shapes(x, b, c, h0)
    f32 = dict(device=x.device, dtype=torch.float32)
    xv = x.expand(B, T, H, P)
    bv, cv, av = b.expand(B, T, H, N), c.expand(B, T, H, N), a.expand(B, T, H, N)
    dv = (d[:, None] if d.dim() == 1 else d).expand(H, P) if d is not None else None
    hv = h0.expand(B, H, P, N) if h0 is not None else None
    interpreted = _kernels().INTERPRETED
    block_t, block_p, block_n, warps = VECTOR_BWD_INTERPRETER_CONFIG if interpreted else VECTOR_BWD_GPU_CONFIG
    low = 2 if interpreted else 16   # tl.dot's smallest tile on a GPU is 16
    block_p, block_n = min(block_p, max(low, _next_pow2(P))), min(block_n, max(low, _next_pow2(N)))
    npb, nnb, nchunk = -(-P // block_p), -(-N // block_n), -(-T // block_t)
    ckpt = torch.empty(B * H, max(nchunk, 1), P, N, **f32)
    dx = torch.empty(nnb, B, T, H, P, **f32)
    dB, dC, dA = (torch.empty(npb, B, T, H, N, **f32) for _ in range(3))
    dd = torch.empty(B, H, P, **f32)
    dh0 = torch.empty(B, H, P, N, **f32)
    dummy = xv
    _kernels().ssd_vector_bwd_kernel[(B * H, npb, nnb)](
        xv, bv, cv, av, dv if dv is not None else dummy, hv if hv is not None else dummy, dy, dht, ckpt,
        dx, dB, dC, dA, dd, dh0,
        T, H, P, N, nchunk, B * T * H * N, B * T * H * P,
        *xv.stride(), *bv.stride(), *cv.stride(), *av.stride(),
        *(dv.stride() if dv is not None else (0, 0)), *(hv.stride() if hv is not None else (0, 0, 0, 0)),
        HAS_D=d is not None, HAS_H0=h0 is not None, PRECISION=_launch("vector", N, dtype)["PRECISION"],
        BLOCK_T=block_t, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=warps)
    return dx.sum(0), dB.sum(0), dC.sum(0), dA.sum(0), dd, dh0


def backward(grad_y, grad_h, x, b, c, a, d, h0, attrs):
    """(dx, db, dc, da, dd, dh0), each in its operand's shape and dtype (None where not needed).

    Decay none / scalar with P, N <= MAX_PN_BACKWARD: ``ssd_chunked_bwd_kernel`` (one program per
    (b, h): a forward sweep storing the state entering each chunk, then the chunks last to first).
    Decay vector (N <= MAX_N_VECTOR): ``ssd_vector_bwd_kernel`` the same way, per tile of the state
    (:func:`_vector_grads`).  Otherwise (larger P or N): the chunked reference's adjoint in torch ops."""
    decay = attrs["decay"]
    needs = attrs["needs"]
    if backward_kernel_reason(x, b, c, h0, decay) is not None:
        return ssd_chunked_backward(grad_y, grad_h, x, b, c, a, d, h0, decay=decay, chunk=attrs["chunk"],
                                    needs=needs)
    B, T, H, P, N = ssd_shapes(x, b, c, h0)
    dev = x.device
    f32 = dict(device=dev, dtype=torch.float32)
    dy = grad_y.expand(B, T, H, P).contiguous()
    dht = (grad_h if grad_h is not None else torch.zeros(B, H, P, N, **f32)).expand(B, H, P, N).contiguous()
    if decay == "vector":
        grads = _vector_grads(dy, dht, x, b, c, a, d, h0, out_dtype(x, b, c))
        return _operand_grads(grads, (x, b, c, a, d, h0), needs)
    xv = x.expand(B, T, H, P)
    bv, cv = b.expand(B, T, H, N), c.expand(B, T, H, N)
    av = a.expand(B, T, H) if a is not None else None
    dv = (d[:, None] if d.dim() == 1 else d).expand(H, P) if d is not None else None
    hv = h0.expand(B, H, P, N) if h0 is not None else None
    cfg = _launch(decay, N, out_dtype(x, b, c))
    cfg.pop("BLOCK_P")
    interpreted = _kernels().INTERPRETED
    block_t = cfg.pop("BLOCK_T") if interpreted else 16   # ptxas -v, sm_90: ~1 KB spills at P = N = 64
    low = 2 if interpreted else 16
    nchunk = -(-T // block_t)
    ckpt = torch.empty(B * H, max(nchunk, 1), P, N, **f32)
    dx, dB, dC = torch.empty(B, T, H, P, **f32), torch.empty(B, T, H, N, **f32), torch.empty(B, T, H, N, **f32)
    da = torch.empty(B, T, H, **f32) if a is not None else dx
    dd = torch.empty(B, H, P, **f32)
    dh0 = torch.empty(B, H, P, N, **f32)
    dummy = xv
    _kernels().ssd_chunked_bwd_kernel[(B * H,)](
        xv, bv, cv, av if av is not None else dummy, dv if dv is not None else dummy,
        hv if hv is not None else dummy, dy, dht, ckpt, dx, dB, dC, da, dd, dh0,
        T, H, P, N, nchunk,
        *xv.stride(), *bv.stride(), *cv.stride(), *(av.stride() if av is not None else (0, 0, 0)),
        *(dv.stride() if dv is not None else (0, 0)), *(hv.stride() if hv is not None else (0, 0, 0, 0)),
        DECAY=_DECAY_CODE[decay], HAS_D=d is not None, HAS_H0=h0 is not None,
        BLOCK_T=block_t, BLOCK_P=max(low, _next_pow2(P)), BLOCK_N=max(low, _next_pow2(N)),
        num_warps=4 if interpreted else 8, PRECISION=cfg["PRECISION"])
    return _operand_grads((dx, dB, dC, da, dd, dh0), (x, b, c, a, d, h0), needs)


def _operand_grads(grads, operands, needs):
    """The kernels' fp32 gradients in full shapes (dd per (b, h, p)) summed back to each operand's
    shape (broadcast operands) and cast to its dtype; None where not needed or absent."""
    dx, dB, dC, da, dd, dh0 = grads
    x, b, c, a, d, h0 = operands
    dd_hp = dd.sum(0) if d is not None else None
    if d is not None and d.dim() == 1:
        dd_hp = dd_hp.sum(-1)
    grads = (dx, dB, dC, da if a is not None else None, dd_hp, dh0 if h0 is not None else None)
    return tuple(g.sum_to_size(t.shape).to(t.dtype) if (n and t is not None) else None
                 for g, t, n in zip(grads, operands, needs))


def register() -> None:
    """Register the triton implementation of seqfuse.ssd with the runtime dispatcher."""
    register_impl("ssd", Impl("triton", supports, forward, backward))


register()  # importing this module (ssd_op.py does) adds the "triton" path, tried before "cpu"
