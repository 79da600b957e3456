"""seqfuse.delta's recurrent algorithm on Triton kernels: the plain rule and the generalized step (a read
key p, an erase key e, read="previous": Comba, GDN-2, IPLR, DPLR, RWKV-7), forward and backward.

The "triton" path of :mod:`seqfuse.lowering.triton.delta` routes a call whose ``attrs["algorithm"]``
is "recurrent" here.  passes/select chooses "recurrent" on CUDA for a static T of at most
DELTA_RECURRENT_MAX_T (decoding: the state carried between calls through h0) and for every call of
the generalized step, which the chunked kernels do not take (the kernels walk time sequentially, so
they are correct at every length but only parallel over batch, heads and value blocks).  Kernels:
:mod:`seqfuse.lowering.triton.delta_recurrent_kernels`.

    supports(t, a) -> None | reason
    forward(q, k, v, beta, g, h0, p, e, attrs) -> (y, h)
    backward(grad_y, grad_h, q, k, v, beta, g, h0, p, e, attrs) -> (dq, dk, dv, dbeta, dg, dh0, dp, de)

The backward reruns the forward storing the state entering every CHUNK-th step (CHUNK ≈ √T), then
walks the chunks in reverse, recomputing each chunk's states into a per-program scratch: memory is
(T / CHUNK + CHUNK)·K·V fp32 per (batch, head), not T states.

Refused (the next path runs the call): no triton / not allowed on this device (common.py), dtypes
other than fp32 / fp16 / bf16, a key size above MAX_K (the whole key axis of a state block lives in
one program's registers), tensors of 2**31 elements or more, NaN / inf operands (the eager reference
defines which non-finite class each element gets).
"""
from __future__ import annotations

import math

import torch

from seqfuse.lowering.reference.delta import check_delta_args, out_dtype
from seqfuse.lowering.triton.common import KernelModule, next_pow2
from seqfuse.runtime import all_finite

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_OPERANDS = ("q", "k", "v", "beta", "g", "h0", "p", "e")
#: the (BLOCK_K, BLOCK_V) state block lives in one program's registers with the whole key axis
MAX_K = 256
#: the launch layout on a GPU: elements of a program's state block and warps (BLOCK_V = TILE // BLOCK_K
#: within [8, 64]).  From ptxas -v for sm_90 (tests/kernels/test_delta_recurrent_triton.py): at 4 warps
#: the backward spills even with 1024-element blocks and the forward spills for some flags with 1024 or
#: 2048; at 8 warps neither spills with 1024 (the backward does with 2048 for K ≤ 128).  Not timed: no
#: GPU here.  The interpreter's BLOCK_V is small so that tests cross several value blocks.
GPU_TILE, GPU_WARPS = 1024, 8
INTERPRETER_BLOCK_V = 16

_kernels = KernelModule("delta_recurrent_kernels")


def block_size(n: int) -> int:
    """A power of two of at least 16 covering ``n`` (the delta kernels' key and value blocks)."""
    return max(16, next_pow2(n))


def operand_reason(t: dict, a: dict) -> str | None:
    """Why a delta call's operands are not for the triton delta kernels (gate kind, dtype, device, int32
    offsets, shapes), or None.  Shared by the chunked kernels' ``supports``."""
    if a.get("gate") not in ("none", "scalar", "vector"):
        return f"gate={a.get('gate')!r} (the triton kernels take none, scalar and vector)"
    named = [(n, t.get(n)) for n in _OPERANDS]
    for name, x in named:
        if x is None:
            continue
        if x.dtype not in _DTYPES:
            return f"{name} dtype {x.dtype} (the kernels take float32, float16, bfloat16)"
        if x.device != t["q"].device:
            return "inputs on different devices"
        if x.numel() >= 2 ** 31:
            return f"{name} has 2**31 elements or more"
    try:
        check_delta_args(*(x for _, x in named[:6]), a["gate"], t.get("p"), t.get("e"), a.get("read", "decayed"))
    except ValueError as exc:
        return f"shapes: {exc}"
    return None


def supports(t: dict, a: dict) -> str | None:
    """None when the recurrent kernels compute exactly this call, else the reason they do not."""
    q = t["q"]
    reason = _kernels.availability(q.device) or operand_reason(t, a)
    if reason:
        return reason
    if q.shape[-1] > MAX_K:
        return f"key size K={q.shape[-1]} above {MAX_K} (a state block holds the whole key axis)"
    if not bool(all_finite(*(t.get(n) for n in _OPERANDS))):
        return "a NaN or inf operand (the eager reference decides each element's non-finite class)"
    return None


def _layout(K: int, V: int, T: int):
    """(BLOCK_K, BLOCK_V, CHUNK, warps) for a call."""
    kern = _kernels()
    block_k = block_size(K)
    if kern.INTERPRETED:
        block_v = min(INTERPRETER_BLOCK_V, block_size(V))
    else:
        block_v = min(max(8, GPU_TILE // block_k), 64, block_size(V))
    return block_k, block_v, max(1, math.isqrt(max(T, 1))), GPU_WARPS


def _key_strides(x, like):
    """The four strides of a (B, T, H, K) key operand, or ``like``'s when x is None (not read)."""
    return (x if x is not None else like).stride()


def gate_strides(g, beta, gate):
    """(the log-decay operand to pass, its four strides): beta stands in for an absent g (never read), a
    per-head g has stride 0 along the key axis."""
    gg = g if g is not None else beta
    return gg, (*gg.stride()[:3], gg.stride(3) if gate == "vector" else 0)


def forward(q, k, v, beta, g, h0, p, e, a):
    """(y (B, T, H, V), h (B, H, K, V)) in the operands' promoted dtype."""
    return _forward(q, k, v, beta, g, h0, p, e, a, store_states=False)[:2]


def _forward(q, k, v, beta, g, h0, p, e, a, store_states):
    """(y, h, checkpoints, (block_k, block_v, chunk, warps)); checkpoints is the fp32 scratch
    (B·H, NV, NC, BLOCK_K, BLOCK_V) of the state entering every CHUNK-th step when ``store_states``."""
    kern = _kernels()
    B, T, H, K = k.shape
    V = v.shape[-1]
    dtype = out_dtype(q, k, v, beta, g, h0, p, e)
    y = torch.empty((B, T, H, V), dtype=dtype, device=q.device)
    h = torch.empty((B, H, K, V), dtype=dtype, device=q.device)
    block_k, block_v, chunk, warps = _layout(K, V, T)
    gg, g_strides = gate_strides(g, beta, a["gate"])
    s0 = h0 if h0 is not None else h
    grid = (B * H, -(-V // block_v))   # B·H first: the grid's other axes stop at 65535
    if store_states:
        ck = torch.empty((B * H, grid[1], max(1, -(-T // chunk)), block_k, block_v), dtype=torch.float32,
                         device=q.device)
    else:
        ck = y
    kern.delta_recurrent_fwd[grid](
        q, k, v, beta, gg, p if p is not None else k, e if e is not None else k, s0, y, h, ck,
        *q.stride(), *k.stride(), *v.stride(), *beta.stride(), *g_strides, *_key_strides(p, k),
        *_key_strides(e, k), *s0.stride(), *y.stride(), *h.stride(), T, H, K, V, float(a["scale"]), chunk,
        GATE={"none": 0, "scalar": 1, "vector": 2}[a["gate"]], HAS_P=p is not None, HAS_E=e is not None,
        PREVIOUS=a.get("read", "decayed") == "previous", HAS_H0=h0 is not None, STORE_STATES=store_states,
        BLOCK_K=block_k, BLOCK_V=block_v, num_warps=warps)
    return y, h, ck, (block_k, block_v, chunk, warps)


def backward(grad_y, grad_h, q, k, v, beta, g, h0, p, e, a):
    """(dq, dk, dv, dbeta, dg, dh0, dp, de), each in its operand's dtype (None for an operand that is
    None or not in ``a["needs"]``).  The kernel adds the value blocks' shares of dq, dk, dbeta, dg, dp,
    de into one fp32 buffer each (atomics)."""
    kern = _kernels()
    B, T, H, K = k.shape
    V = v.shape[-1]
    needs = a.get("needs", [True] * 8)
    _, _, ck, (block_k, block_v, chunk, warps) = _forward(q, k, v, beta, g, h0, p, e, a, store_states=True)
    nv = ck.shape[1]
    f32 = dict(dtype=torch.float32, device=q.device)
    dq = torch.zeros((B, T, H, K), **f32)
    dk = torch.zeros((B, T, H, K), **f32)
    dp = torch.zeros((B, T, H, K), **f32) if p is not None else dq
    de = torch.zeros((B, T, H, K), **f32) if e is not None else dq
    db = torch.zeros((B, T, H), **f32)
    dg = torch.zeros((B, T, H, K) if a["gate"] == "vector" else (B, T, H), **f32)
    dv = torch.empty((B, T, H, V), **f32)
    dh0 = torch.empty((B, H, K, V), **f32)
    scratch = torch.empty((B * H * nv, chunk, block_k, block_v), **f32)
    gg, g_strides = gate_strides(g, beta, a["gate"])
    kern.delta_recurrent_bwd[(B * H, nv)](
        q, k, v, beta, gg, p if p is not None else k, e if e is not None else k, ck, scratch, grad_y, grad_h,
        dq, dk, dv, db, dg, dp, de, dh0,
        *q.stride(), *k.stride(), *v.stride(), *beta.stride(), *g_strides, *_key_strides(p, k),
        *_key_strides(e, k), *grad_y.stride(), *grad_h.stride(), B, T, H, K, V, float(a["scale"]), chunk,
        GATE={"none": 0, "scalar": 1, "vector": 2}[a["gate"]], HAS_P=p is not None, HAS_E=e is not None,
        PREVIOUS=a.get("read", "decayed") == "previous", BLOCK_K=block_k, BLOCK_V=block_v, num_warps=warps)
    grads = (dq, dk, dv, db, dg if g is not None else None, dh0, dp if p is not None else None,
             de if e is not None else None)
    return tuple(None if (x is None or gr is None or not n) else gr.to(x.dtype)
                 for x, gr, n in zip((q, k, v, beta, g, h0, p, e), grads, needs))
