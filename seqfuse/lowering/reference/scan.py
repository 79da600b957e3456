"""Reference implementations of seqfuse.scan: the eager fallback and the test oracle.

A diagonal linear recurrence along the time axis (axis -2), see seqfuse.ir.ops.Scan::

    h_t = a_t ⊙ h_{t-1} + b_t                  h_t: (*R, N), h_{-1} = h0 or 0
    y_t = Σ_n c_t[n] · h_t[n]   with a readout c, else y_t = h_t

Shapes: a, b, c broadcastable to (*R, T, N) (stride-0 views such as an ``expand`` are fine);
h0 broadcastable to (*R, N).  a, b, h0 may be complex (LRU).  Returns (y, h): y (*R, T) with a
readout, else (*R, T, N); h (*R, N), the last state computed (t = 0 when ``reverse``); both in
the promoted dtype of a, b, c (and h0), computed in fp32 / complex64 at least (fp64 stays fp64).
"""
from __future__ import annotations

import torch

ALGORITHMS = ("recurrent", "chunked")


def scan_shape(a, b, c=None, h0=None):
    """The full (*R, T, N) shape of a scan call."""
    if a.dim() < 2 or b.dim() < 2:
        raise ValueError(f"seqfuse.scan: a and b need (…, T, N) axes, got shapes {tuple(a.shape)}, "
                         f"{tuple(b.shape)}")
    shapes = [a.shape, b.shape]
    if c is not None:
        if c.dim() < 2:
            raise ValueError(f"seqfuse.scan: c needs (…, T, N) axes, got shape {tuple(c.shape)}")
        shapes.append(c.shape)
    try:
        full = torch.broadcast_shapes(*shapes)
        if h0 is not None:
            if h0.dim() < 1:
                raise RuntimeError("h0 has no state axis")
            full = torch.broadcast_shapes(full, (*h0.shape[:-1], 1, h0.shape[-1]))
    except RuntimeError as exc:
        raise ValueError(f"seqfuse.scan: a {tuple(a.shape)}, b {tuple(b.shape)}, "
                         f"c {None if c is None else tuple(c.shape)}, h0 {None if h0 is None else tuple(h0.shape)} "
                         f"do not broadcast to (*R, T, N): {exc}") from None
    return full


def out_dtype(a, b, c=None, h0=None) -> torch.dtype:
    """The promoted dtype of a, b, c (and h0: a complex initial state makes complex results)."""
    dtype = torch.promote_types(a.dtype, b.dtype)
    for t in (c, h0):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _acc_dtype(*tensors) -> torch.dtype:
    """fp32 (complex64) accumulation at least; fp64 / complex128 stay."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _prepare(a, b, c, h0):
    full = scan_shape(a, b, c, h0)
    acc = _acc_dtype(a, b, c, h0)
    a, b = a.to(acc).expand(full), b.to(acc).expand(full)
    state = (*full[:-2], full[-1])
    h0 = h0.to(acc).expand(state) if h0 is not None else a.new_zeros(state)
    return a, b, h0


def _readout(hs, c, dtype):
    """y = Σ_n c·h (or h itself), in the output dtype."""
    if c is None:
        return hs.to(dtype)
    acc = torch.promote_types(hs.dtype, c.dtype)
    return (hs.to(acc) * c.to(acc)).sum(-1).to(dtype)


def scan_states_recurrent(a, b, h0):
    """All states h_t, (*R, T, N), of the forward recurrence, step by step; a, b full-shaped."""
    T = a.shape[-2]
    h, hs = h0, []
    for t in range(T):
        h = a[..., t, :] * h + b[..., t, :]
        hs.append(h)
    return torch.stack(hs, dim=-2) if hs else a.new_zeros(a.shape)


def scan_reference(a, b, c=None, h0=None, *, reverse=False, algorithm="recurrent", chunk=64):
    """(y, h) of seqfuse.scan computed by ``algorithm`` ("recurrent" or "chunked")."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"seqfuse.scan: algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    dtype = out_dtype(a, b, c, h0)
    a_, b_, h0_ = _prepare(a, b, c, h0)
    if reverse:  # a reverse scan is the forward scan of the time-flipped sequence
        a_, b_ = a_.flip(-2), b_.flip(-2)
    hs = scan_states(a_, b_, h0_, algorithm, chunk)
    h = hs[..., -1, :] if hs.shape[-2] > 0 else h0_
    if reverse:
        hs = hs.flip(-2)
    return _readout(hs, c, dtype), h.to(dtype)


def scan_states_chunked(a, b, h0, chunk=64):
    """All states h_t, (*R, T, N): a log-depth scan inside every chunk (all chunks at once), then
    one pass over the chunks carrying the state.  Products only (no logs): negative and complex
    a are fine."""
    *R, T, N = a.shape
    Q = max(1, min(int(chunk), T))
    K = -(-T // Q)
    # 1. pad the time axis with identity steps (a = 1, b = 0) and split it: (*R, K, Q, N)
    pad = K * Q - T
    if pad:
        a = torch.cat([a, a.new_ones(*R, pad, N)], dim=-2)
        b = torch.cat([b, b.new_zeros(*R, pad, N)], dim=-2)
    A, Bc = a.reshape(*R, K, Q, N), b.reshape(*R, K, Q, N)
    # 2. Hillis–Steele doubling: after offset o, (A_i, B_i) is the composition of steps i-2o+1 … i
    #    of the chunk, as the map h -> A_i·h + B_i; (A2, B2)∘(A1, B1) = (A2·A1, A2·B1 + B2)
    o = 1
    while o < Q:
        Bc = torch.cat([Bc[..., :o, :], A[..., o:, :] * Bc[..., :-o, :] + Bc[..., o:, :]], dim=-2)
        A = torch.cat([A[..., :o, :], A[..., o:, :] * A[..., :-o, :]], dim=-2)
        o *= 2
    # 3. carry the state across chunks: h_in[k] enters chunk k
    h, carries = h0.to(torch.promote_types(h0.dtype, Bc.dtype)), []
    for k in range(K):
        carries.append(h)
        h = A[..., k, -1, :] * h + Bc[..., k, -1, :]
    h_in = torch.stack(carries, dim=-2)  # (*R, K, N)
    # 4. every state from its chunk's prefix map and the carried state
    hs = A * h_in[..., None, :] + Bc
    return hs.reshape(*R, K * Q, N)[..., :T, :]


def scan_states(a, b, h0, algorithm="recurrent", chunk=64):
    """All forward states (*R, T, N) for full-shaped a, b and h0 (*R, N), by ``algorithm``."""
    if algorithm == "chunked" and a.shape[-2] > 0:
        return scan_states_chunked(a, b, h0, chunk)
    return scan_states_recurrent(a, b, h0)


def _reduce_to(grad, like):
    """A gradient of a broadcast operand, summed back to its shape; real for a real operand."""
    if grad is None or like is None:
        return None
    grad = grad.sum_to_size(like.shape)
    if grad.is_complex() and not like.is_complex():
        grad = grad.real
    return grad.to(like.dtype)


def scan_backward_reference(grad_y, grad_h, a, b, c=None, h0=None, *, reverse=False, algorithm="recurrent",
                            chunk=64, needs=(True, True, True, True)):
    """Gradients (da, db, dc, dh0) of scan_reference, each in its operand's shape and dtype (None
    where ``needs`` is False), by the adjoint recurrence: the reverse scan

        g_t = ∂y_t/∂h_t·grad_y_t + conj(a_{t+1})·g_{t+1},   g_{T-1} also gets grad_h

    then da_t = g_t·conj(h_{t-1}), db_t = g_t, dh0 = conj(a_0)·g_0, dc_t = grad_y_t·conj(h_t).
    """
    a_, b_, h0_ = _prepare(a, b, c, h0)
    T = a_.shape[-2]
    gy = grad_y
    c_ = c
    if reverse:  # differentiate the forward scan of the flipped sequence, flip the gradients back
        a_, b_ = a_.flip(-2), b_.flip(-2)
        gy = gy.flip(-1 if c is not None else -2)
        c_ = c.flip(-2) if c is not None else None
    # 1. the forward states h_t and h_{t-1}
    hs = scan_states(a_, b_, h0_, algorithm, chunk)
    h_prev = torch.cat([h0_.unsqueeze(-2).to(hs.dtype), hs[..., :-1, :]], dim=-2)
    # 2. the gradient reaching each h_t through its own readout
    direct = gy.unsqueeze(-1) * c_.conj() if c_ is not None else gy
    direct = direct.expand(hs.shape)
    # 3. the adjoint: a reverse scan with the conjugated decays shifted by one step
    a_next = torch.cat([a_[..., 1:, :].conj(), a_.new_ones(*a_.shape[:-2], 1, a_.shape[-1])], dim=-2)
    g = scan_states(a_next.flip(-2), direct.flip(-2), grad_h.expand(h0_.shape), algorithm, chunk).flip(-2)
    # 4. the operands' gradients
    da = g * h_prev.conj() if needs[0] else None
    db = g if needs[1] else None
    dc = gy.unsqueeze(-1) * hs.conj() if (c is not None and needs[2]) else None
    dh0 = None
    if h0 is not None and needs[3]:
        dh0 = a_[..., 0, :].conj() * g[..., 0, :] if T > 0 else grad_h
    if reverse:
        da, db, dc = (t.flip(-2) if t is not None else None for t in (da, db, dc))
    return _reduce_to(da, a), _reduce_to(db, b), _reduce_to(dc, c), _reduce_to(dh0, h0)
