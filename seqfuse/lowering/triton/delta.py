"""seqfuse.delta on Triton kernels (the "triton" runtime path): the chunked forward and backward
(gate none, scalar, vector).

Contract (see :mod:`seqfuse.lowering.delta_op`):

    supports(t, a) -> None | reason
    forward(q, k, v, beta, g, h0, attrs) -> (y, h)
    backward(grad_y, grad_h, q, k, v, beta, g, h0, attrs) -> (dq, dk, dv, dbeta, dg, dh0)

Forward: one kernel (:mod:`seqfuse.lowering.triton.delta_kernels`), one program per (batch, head,
block of value dims), chunks of BLOCK_T steps walked in order with the state in fp32 registers;
every chunk length computes the same function, so the kernel's tile, not ``attrs["chunk"]``, is
the chunk.  gate="vector" (KDA) builds the chunk's A and readout scores one row at a time (a
(BLOCK_T, BLOCK_K) decay tile per row, exponents masked to j <= i before exp).

Backward: the forward kernel, run again with STORE_STATES, keeps the state entering each chunk
(fp32 scratch), then ``delta_chunked_bwd`` walks the chunks backward carrying dS in registers
(gate="vector": the terms through A and the scores row by row, like the forward); dv and dh0 are
per value block, dq / dk / dbeta / dg are summed over the value blocks' shares on the host.

A call whose algorithm is "recurrent" (decoding, and every call of the generalized step: a read key
p, an erase key e, read="previous") runs the step-loop kernels of
:mod:`seqfuse.lowering.triton.delta_recurrent` instead.

Refused (the next path runs the call): no triton / not allowed on this device (common.py), for the
chunked algorithm a read key, an erase key or read="previous", dtypes other than fp32 / fp16 /
bf16, head dims above MAX_DIM, tensors of 2**31 elements or more, NaN / inf operands.
(grad_y / grad_h are not seen by supports: a non-finite gradient is mixed over a chunk.)
"""
from __future__ import annotations

import torch

from seqfuse.lowering.reference.delta import out_dtype
from seqfuse.lowering.triton import delta_recurrent
from seqfuse.lowering.triton.delta_recurrent import block_size, gate_strides, operand_reason
from seqfuse.lowering.triton.common import KernelModule
from seqfuse.runtime import Impl, all_finite, register_impl

#: the (BLOCK_K, BLOCK_V) state block and the (BLOCK_T, BLOCK_K) chunk tiles live in registers
MAX_DIM = 128
#: (BLOCK_T, BLOCK_V, num_warps): on a GPU (not tuned: no GPU measured it yet), and under the
#: interpreter small enough that tests at T ≤ 40 cross several chunks and value blocks
GPU_CONFIG = (32, 64, 4)
INTERPRETER_CONFIG = (16, 16, 4)

_kernels = KernelModule("delta_kernels")


def supports(t: dict, a: dict) -> str | None:
    """None when the triton kernel computes exactly this call, else the reason it does not."""
    if a.get("algorithm") == "recurrent":
        return delta_recurrent.supports(t, a)
    q = t["q"]
    reason = _kernels.availability(q.device)
    if reason:
        return reason
    if a.get("algorithm") != "chunked":
        return f"algorithm {a.get('algorithm')!r} (the triton kernels are the chunked and the recurrent ones)"
    if t.get("p") is not None or t.get("e") is not None:
        return "a read key p or an erase key e (the kernels read and erase with k)"
    if a.get("read", "decayed") != "decayed":
        return "read='previous' (the kernels read the decayed state)"
    reason = operand_reason(t, a)
    if reason:
        return reason
    if q.shape[-1] > MAX_DIM or t["v"].shape[-1] > MAX_DIM:
        return f"head dims K={q.shape[-1]}, V={t['v'].shape[-1]} above {MAX_DIM} (the state block lives in registers)"
    if not bool(all_finite(*(t.get(n) for n in ("q", "k", "v", "beta", "g", "h0")))):
        return "a NaN or inf operand (the chunked form mixes every step of a chunk)"
    return None


def forward(q, k, v, beta, g, h0, a):
    """(y (B, T, H, V), h (B, H, K, V)) in the operands' promoted dtype."""
    return _forward(q, k, v, beta, g, h0, a, store_states=False)[:2]


def _forward(q, k, v, beta, g, h0, a, store_states):
    """(y, h, states, (block_t, block_k, block_v, warps)); states is the fp32 scratch
    (B·H, NV, NT, BLOCK_K, BLOCK_V) of the states entering every chunk when ``store_states``."""
    kern = _kernels()
    B, T, H, K = k.shape
    V = v.shape[-1]
    dtype = out_dtype(q, k, v, beta, g, h0)
    y = torch.empty((B, T, H, V), dtype=dtype, device=q.device)
    h = torch.empty((B, H, K, V), dtype=dtype, device=q.device)
    block_t, block_v, warps = INTERPRETER_CONFIG if kern.INTERPRETED else GPU_CONFIG
    block_v = min(block_v, block_size(V))
    gate = {"none": 0, "scalar": 1, "vector": 2}[a["gate"]]
    gg, g_strides = gate_strides(g, beta, a["gate"])
    s0 = h0 if h0 is not None else h
    grid = (B * H, -(-V // block_v))   # B·H first: the grid's other axes stop at 65535
    block_k = block_size(K)
    if store_states:
        states = torch.empty((B * H, grid[1], -(-T // block_t), block_k, block_v), dtype=torch.float32,
                             device=q.device)
    else:
        states = y
    kern.delta_chunked_fwd[grid](
        q, k, v, beta, gg, s0, y, h, states,
        *q.stride(), *k.stride(), *v.stride(), *beta.stride(), *g_strides, *s0.stride(), *y.stride(),
        *h.stride(), T, H, K, V, float(a["scale"]),
        GATE=gate, HAS_H0=h0 is not None, STORE_STATES=store_states, BLOCK_T=block_t, BLOCK_K=block_k,
        BLOCK_V=block_v, DOT_PRECISION="ieee" if kern.INTERPRETED else "tf32x3", num_warps=warps)
    return y, h, states, (block_t, block_k, block_v, warps)


def backward(grad_y, grad_h, q, k, v, beta, g, h0, a):
    """(dq, dk, dv, dbeta, dg, dh0) of the chunked kernel (any gate), each in its operand's
    dtype (None for an operand that is None or not in ``a["needs"]``): the forward kernel stores the
    state entering every chunk, then delta_chunked_bwd walks the chunks backward carrying dS.
    dq, dk, dbeta, dg are summed over the value blocks here."""
    kern = _kernels()
    B, T, H, K = k.shape
    V = v.shape[-1]
    needs = a.get("needs", [True] * 6)
    _, _, states, (block_t, block_k, block_v, warps) = _forward(q, k, v, beta, g, h0, a, store_states=True)
    nv = states.shape[1]
    f32 = dict(dtype=torch.float32, device=q.device)
    dq = torch.empty((nv, B, T, H, K), **f32)
    dk = torch.empty((nv, B, T, H, K), **f32)
    db = torch.empty((nv, B, T, H), **f32)
    dg = torch.empty((nv, B, T, H, K) if a["gate"] == "vector" else (nv, B, T, H), **f32)
    dv = torch.empty((B, T, H, V), **f32)
    dh0 = torch.empty((B, H, K, V), **f32)
    gg, g_strides = gate_strides(g, beta, a["gate"])
    kern.delta_chunked_bwd[(B * H, nv)](
        q, k, v, beta, gg, states, grad_y, grad_h, dq, dk, dv, db, dg, dh0,
        *q.stride(), *k.stride(), *v.stride(), *beta.stride(), *g_strides, *grad_y.stride(), *grad_h.stride(),
        B, T, H, K, V, float(a["scale"]), GATE={"none": 0, "scalar": 1, "vector": 2}[a["gate"]], BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_V=block_v,
        DOT_PRECISION="ieee" if kern.INTERPRETED else "tf32x3", num_warps=warps)
    grads = (dq.sum(0), dk.sum(0), dv, db.sum(0), dg.sum(0) if g is not None else None, dh0)
    return tuple(None if (x is None or gr is None or not n) else gr.to(x.dtype)
                 for x, gr, n in zip((q, k, v, beta, g, h0), grads, needs))


def _impl_forward(q, k, v, beta, g, h0, p, e, a):
    if a.get("algorithm") == "recurrent":
        return delta_recurrent.forward(q, k, v, beta, g, h0, p, e, a)
    assert p is None and e is None, "supports() refuses a read or erase key for the chunked kernels"
    return forward(q, k, v, beta, g, h0, a)


def _impl_backward(grad_y, grad_h, q, k, v, beta, g, h0, p, e, a):
    if a.get("algorithm") == "recurrent":
        return delta_recurrent.backward(grad_y, grad_h, q, k, v, beta, g, h0, p, e, a)
    assert p is None and e is None, "supports() refuses a read or erase key for the chunked kernels"
    return (*backward(grad_y, grad_h, q, k, v, beta, g, h0, a), None, None)


def register() -> None:
    """Register the kernels (chunked and recurrent) as the "triton" implementation of seqfuse.delta
    (forward and backward)."""
    register_impl("delta", Impl("triton", supports, _impl_forward, _impl_backward))
