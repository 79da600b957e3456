"""Reference implementations of seqfuse.scan: the eager fallback and the test oracle.

A diagonal linear recurrence along the time axis (axis -2), see seqfuse.ir.ops.Scan::

    h_t = a_t ⊙ h_{t-1} + b_t                  h_t: (*R, N), h_{-1} = h0 or 0
    y_t = Σ_n c_t[n] · h_t[n]   with a readout c, else y_t = h_t

Shapes: a, b, c broadcastable to (*R, T, N) (stride-0 views such as an ``expand`` are fine);
h0 broadcastable to (*R, N).  a, b, h0 may be complex (LRU).  Returns (y, h): y (*R, T) with a
readout, else (*R, T, N); h (*R, N), the last state computed (t = 0 when ``reverse``); both in
the promoted dtype of a, b, c (and h0, dt, u), computed in fp32 / complex64 at least (fp64
stays fp64).

The discretized form (optional real dt, u broadcastable to (*R, T, N)) is the recurrence with
a_t ← exp(dt_t ⊙ a_t) (when dt is given) and b_t ← b_t ⊙ dt_t ⊙ u_t: :func:`discretize` forms
those factors, :func:`discretize_backward` takes their gradients back to a, b, dt, u, and
:func:`with_discretization` lifts an implementation of the plain recurrence to the whole
contract by materializing them (the paths whose kernels do not form them in registers).
"""
from __future__ import annotations

import torch

from seqfuse.ir.ops import scan_y_dtype

ALGORITHMS = ("recurrent", "chunked")


def scan_shape(a, b, c=None, h0=None, dt=None, u=None):
    """The full (*R, T, N) shape of a scan call."""
    if a.dim() < 2 or b.dim() < 2:
        raise ValueError(f"seqfuse.scan: a and b need (…, T, N) axes, got shapes {tuple(a.shape)}, "
                         f"{tuple(b.shape)}")
    shapes = [a.shape, b.shape]
    for name, t in (("c", c), ("dt", dt), ("u", u)):
        if t is not None:
            if t.dim() < 2:
                raise ValueError(f"seqfuse.scan: {name} needs (…, T, N) axes, got shape {tuple(t.shape)}")
            shapes.append(t.shape)
    try:
        full = torch.broadcast_shapes(*shapes)
        if h0 is not None:
            if h0.dim() < 1:
                raise RuntimeError("h0 has no state axis")
            full = torch.broadcast_shapes(full, (*h0.shape[:-1], 1, h0.shape[-1]))
    except RuntimeError as exc:
        shown = ", ".join(f"{n} {None if t is None else tuple(t.shape)}"
                          for n, t in (("a", a), ("b", b), ("c", c), ("h0", h0), ("dt", dt), ("u", u))
                          if t is not None or n in ("c", "h0"))
        raise ValueError(f"seqfuse.scan: {shown} do not broadcast to (*R, T, N): {exc}") from None
    return full


def out_dtype(a, b, c=None, h0=None, dt=None, u=None) -> torch.dtype:
    """The promoted dtype of the operands (a complex a, b or h0 makes complex results)."""
    dtype = torch.promote_types(a.dtype, b.dtype)
    for t in (c, h0, dt, u):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def check_discretization(a, dt, u) -> None:
    """Raise ValueError unless dt and u are real and, with dt, a (the log-decays) is real."""
    for name, t in (("dt", dt), ("u", u)):
        if t is not None and t.is_complex():
            raise ValueError(f"seqfuse.scan: {name} must be real, got {t.dtype}")
    if dt is not None and a.is_complex():
        raise ValueError(f"seqfuse.scan: with dt, a holds real log-decays; got {a.dtype}")


def discretize(a, b, dt=None, u=None):
    """The plain recurrence's (decay, input) of a discretized call: (exp(dt ⊙ a) or a, b ⊙ dt ⊙ u),
    broadcast products (not expanded), in fp32 at least (the dtype the kernels compute in)."""
    if dt is None and u is None:
        return a, b
    acc = _acc_dtype(a, b, dt, u)
    if dt is not None:
        a = torch.exp(a.to(acc) * dt.to(acc))
    b = b.to(acc)
    for f in (dt, u):
        if f is not None:
            b = b * f.to(acc)
    return a, b


def discretize_backward(d_decay, d_input, a, b, dt, u, needs):
    """Gradients (da, db, ddt, du) (None where ``needs`` (four bools) is False) of
    :func:`discretize` given those of the decay and the input (either may be None: zero), each
    summed to its operand's shape, in its dtype."""
    acc = _acc_dtype(a, b, dt, u)
    a_, b_ = a.to(acc), b.to(acc)
    dt_ = dt.to(acc) if dt is not None else None
    u_ = u.to(acc) if u is not None else None
    decay = torch.exp(a_ * dt_) if (dt is not None and d_decay is not None) else None

    def prod(*fs):
        out = None
        for f in fs:
            if f is not None:
                out = f if out is None else out * f
        return out

    da = db = ddt = du = None
    if needs[0] and d_decay is not None:
        da = d_decay.to(acc) * decay * dt_ if dt is not None else d_decay.to(acc)
    if needs[1] and d_input is not None:
        db = prod(d_input.to(acc), dt_, u_)
    if needs[2] and dt is not None:
        parts = []
        if d_decay is not None:
            parts.append(d_decay.to(acc) * decay * a_)
        if d_input is not None:
            parts.append(prod(d_input.to(acc), b_, u_))
        ddt = sum(parts[1:], parts[0]) if parts else None
    if needs[3] and u is not None and d_input is not None:
        du = prod(d_input.to(acc), b_, dt_)
    out = []
    for g, like, n in zip((da, db, ddt, du), (a, b, dt, u), needs):
        if not n or like is None:
            out.append(None)
        elif g is None:
            out.append(torch.zeros_like(like))
        else:
            out.append(_reduce_to(g, like))
    return tuple(out)


def with_discretization(forward, backward):
    """(forward6, backward6) of the whole scan contract from an implementation of the plain one:
    ``forward(a, b, c, h0, attrs)`` and ``backward(grad_y, grad_h, a, b, c, h0, attrs) -> (da, db,
    dc, dh0)`` (attrs["needs"]: four bools).  With dt or u the decays and inputs are materialized
    by :func:`discretize` (full (*R, T, N) products) and their gradients taken back by
    :func:`discretize_backward`; without them the calls pass straight through."""

    def forward6(a, b, c, h0, dt, u, attrs):
        a2, b2 = discretize(a, b, dt, u)
        return forward(a2, b2, c, h0, attrs)

    def backward6(grad_y, grad_h, a, b, c, h0, dt, u, attrs):
        needs = list(attrs["needs"]) + [False] * (6 - len(attrs["needs"]))
        if dt is None and u is None:
            da, db, dc, dh0 = backward(grad_y, grad_h, a, b, c, h0, dict(attrs, needs=needs[:4]))
            return da, db, dc, dh0, None, None
        a2, b2 = discretize(a, b, dt, u)
        need_decay = needs[0] or (needs[4] and dt is not None)
        need_input = needs[1] or needs[4] or needs[5]
        d_decay, d_input, dc, dh0 = backward(grad_y, grad_h, a2, b2, c, h0,
                                             dict(attrs, needs=[need_decay, need_input, needs[2], needs[3]]))
        da, db, ddt, du = discretize_backward(d_decay, d_input, a, b, dt, u,
                                              (needs[0], needs[1], needs[4], needs[5]))
        return da, db, dc, dh0, ddt, du

    return forward6, backward6


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


def y_dtype(dtype: torch.dtype, c=None, readout_dtype=None) -> torch.dtype:
    """The dtype of y: the operands' promoted ``dtype``, or with states rounded to
    ``readout_dtype`` before the readout, promote(readout_dtype, c.dtype)."""
    return scan_y_dtype(dtype, None if c is None else c.dtype, readout_dtype)


def rounded(hs, readout_dtype):
    """The states as the readout reads them: rounded to ``readout_dtype`` (None: as they are), in
    their own dtype again."""
    return hs if readout_dtype is None else hs.to(readout_dtype).to(hs.dtype)


def _readout(hs, c, dtype, readout_dtype=None):
    """y = Σ_n c·round(h) (or h itself), in y's dtype."""
    if c is None:
        return hs.to(dtype)
    acc = torch.promote_types(hs.dtype, c.dtype)
    return (rounded(hs, readout_dtype).to(acc) * c.to(acc)).sum(-1).to(y_dtype(dtype, c, readout_dtype))


def scan_states_recurrent(a, b, h0):
    """All states h_t, (*R, T, N), of the forward recurrence, step by step; a, b full-shaped."""
    T = a.shape[-2]
    h, hs = h0, []
    for t in range(T):
        h = a[..., t, :] * h + b[..., t, :]
        hs.append(h)
    return torch.stack(hs, dim=-2) if hs else a.new_zeros(a.shape)


def scan_reference(a, b, c=None, h0=None, *, dt=None, u=None, reverse=False, algorithm="recurrent", chunk=64,
                   readout_dtype=None):
    """(y, h) of seqfuse.scan computed by ``algorithm`` ("recurrent" or "chunked"); with dt / u the
    discretized form (:func:`discretize`); with ``readout_dtype`` the states are rounded to it
    before the readout (:func:`rounded`, :func:`y_dtype`)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"seqfuse.scan: algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    check_discretization(a, dt, u)
    dtype = out_dtype(a, b, c, h0, dt, u)
    a, b = discretize(a, b, dt, u)
    a_, b_, h0_ = _prepare(a, b, c, h0)
    if reverse:  # a reverse scan is the forward scan of the time-flipped sequence
        a_, b_ = a_.flip(-2), b_.flip(-2)
    hs = scan_states(a_, b_, h0_, algorithm, chunk)
    h = hs[..., -1, :] if hs.shape[-2] > 0 else h0_
    if reverse:
        hs = hs.flip(-2)
    return _readout(hs, c, dtype, readout_dtype), h.to(dtype)


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
                            chunk=64, needs=(True, True, True, True), readout_dtype=None):
    """Gradients (da, db, dc, dh0) of scan_reference, each in its operand's shape and dtype (None
    where ``needs`` is False), by the adjoint recurrence: the reverse scan

        g_t = ∂y_t/∂h_t·grad_y_t + conj(a_{t+1})·g_{t+1},   g_{T-1} also gets grad_h

    then da_t = g_t·conj(h_{t-1}), db_t = g_t, dh0 = conj(a_0)·g_0, dc_t = grad_y_t·conj(h_t).
    With ``readout_dtype`` the program's readout read the states rounded to it, so as autograd
    through its cast would: dc_t uses the rounded h_t, and the gradient reaching h_t through the
    readout, grad_y_t·c_t, is rounded to ``readout_dtype`` too.
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
    direct = gy.unsqueeze(-1).to(hs.dtype) * c_.conj().to(hs.dtype) if c_ is not None else gy
    if c_ is not None:   # the program's readout read rounded states: their gradient is rounded too
        direct = rounded(direct, readout_dtype)
    direct = direct.expand(hs.shape)
    # 3. the adjoint: a reverse scan with the conjugated decays shifted by one step
    a_next = torch.cat([a_[..., 1:, :].conj(), a_.new_ones(*a_.shape[:-2], 1, a_.shape[-1])], dim=-2)
    g = scan_states(a_next.flip(-2), direct.flip(-2), grad_h.expand(h0_.shape), algorithm, chunk).flip(-2)
    # 4. the operands' gradients
    da = g * h_prev.conj() if needs[0] else None
    db = g if needs[1] else None
    dc = gy.unsqueeze(-1) * rounded(hs, readout_dtype).conj() if (c is not None and needs[2]) else None
    dh0 = None
    if h0 is not None and needs[3]:
        dh0 = a_[..., 0, :].conj() * g[..., 0, :] if T > 0 else grad_h
    if reverse:
        da, db, dc = (t.flip(-2) if t is not None else None for t in (da, db, dc))
    return _reduce_to(da, a), _reduce_to(db, b), _reduce_to(dc, c), _reduce_to(dh0, h0)
