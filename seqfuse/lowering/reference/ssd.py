"""Reference implementations of seqfuse.ssd: the eager fallback and the test oracle.

Per batch b and head h, with the state S_t a (P, N) matrix (see seqfuse.ir.ops.SSD)::

    S_t = exp(a_t) ⊙ S_{t-1} + x_t ⊗ b_t        (S_{-1} = h0, or 0)
    y_t = S_t · c_t  (+ d ⊙ x_t)

Shapes: x (B, T, H, P); b, c (B, T, H, N); a (B, T, H) for decay="scalar", (B, T, H, N) for
decay="vector" (a gate per key dim n, multiplying S along N), None for decay="none";
d (H,) (or (H, P)); h0 (B, H, P, N).  Every algorithm returns (y (B, T, H, P), h (B, H, P, N))
in the promoted dtype of x, b, c, accumulating in fp32 (fp64 stays fp64).

Einsum dims: b batch, t/s time (query/key), h head, p value dim, n state (key) dim.
"""
from __future__ import annotations

import torch
from torch import Tensor

ALGORITHMS = ("recurrent", "quadratic", "chunked")
DECAYS = ("none", "scalar", "vector")


def check_ssd_args(x, b, c, a, d, h0, decay: str) -> None:
    """Raise ValueError naming the argument whose shape does not fit the ssd contract."""
    if decay not in DECAYS:
        raise ValueError(f"seqfuse.ssd: decay must be one of {DECAYS}, got {decay!r}")
    if x.dim() != 4:
        raise ValueError(f"seqfuse.ssd: x must be (B, T, H, P), got shape {tuple(x.shape)}")
    for name, t in (("b", b), ("c", c)):
        if t.dim() != 4:
            raise ValueError(f"seqfuse.ssd: {name} must be (B, T, H, N), got shape {tuple(t.shape)}")
    want = {"none": None, "scalar": 3, "vector": 4}[decay]
    got = None if a is None else a.dim()
    if got != want:
        shape = {"none": "None", "scalar": "(B, T, H)", "vector": "(B, T, H, N)"}[decay]
        raise ValueError(f"seqfuse.ssd: decay={decay!r} needs a = {shape}, got "
                         f"{None if a is None else tuple(a.shape)}")
    if h0 is not None and h0.dim() != 4:
        raise ValueError(f"seqfuse.ssd: h0 must be (B, H, P, N), got shape {tuple(h0.shape)}")
    if d is not None and d.dim() not in (1, 2):
        raise ValueError(f"seqfuse.ssd: d must be (H,) or (H, P), got shape {tuple(d.shape)}")


def ssd_shapes(x, b, c, h0=None):
    """(B, T, H, P, N) of an ssd call (b, c and h0 may broadcast against x)."""
    bb, t, h = torch.broadcast_shapes(x.shape[:3], b.shape[:3], c.shape[:3])
    n = torch.broadcast_shapes(b.shape[3:], c.shape[3:])[0]
    if h0 is not None:
        bb, h = torch.broadcast_shapes((bb, h), h0.shape[:2])
    return bb, t, h, x.shape[3], n


def out_dtype(x, b, c) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x.dtype, b.dtype), c.dtype)


def _prepare(x, b, c, a, d, h0, decay):
    """Cast to the accumulation dtype and broadcast b, c, a to full shapes."""
    check_ssd_args(x, b, c, a, d, h0, decay)
    dtype = out_dtype(x, b, c)
    acc = torch.promote_types(dtype, torch.float32)  # fp32 accumulation, fp64 stays fp64
    B, T, H, P, N = ssd_shapes(x, b, c, h0)
    x = x.to(acc).expand(B, T, H, P)
    b, c = b.to(acc).expand(B, T, H, N), c.to(acc).expand(B, T, H, N)
    if a is not None:
        a = a.to(acc).expand((B, T, H) if decay == "scalar" else (B, T, H, N))
    if h0 is not None:
        h0 = h0.to(acc).expand(B, H, P, N)
    return x, b, c, a, h0, dtype


def _skip(y, x, d):
    """y + d ⊙ x with d (H,) or (H, P)."""
    if d is None:
        return y
    d = d.to(y.dtype)
    return y + x * (d[:, None] if d.dim() == 1 else d)


def ssd_recurrent(x, b, c, a=None, d=None, h0=None, *, decay="scalar", chunk=64):
    """The recurrence step by step (the oracle; also the choice for tiny T)."""
    x, b, c, a, h0, dtype = _prepare(x, b, c, a, d, h0, decay)
    B, T, H, P = x.shape
    N = b.shape[-1]
    S = h0 if h0 is not None else x.new_zeros(B, H, P, N)
    ys = []
    for t in range(T):
        # 1. decay the state: a scalar per head, or a gate per key dim n
        if decay == "scalar":
            S = torch.exp(a[:, t])[:, :, None, None] * S
        elif decay == "vector":
            S = torch.exp(a[:, t])[:, :, None, :] * S
        # 2. write: S += x_t ⊗ b_t
        S = S + torch.einsum("bhp,bhn->bhpn", x[:, t], b[:, t])
        # 3. read: y_t = S_t · c_t
        ys.append(torch.einsum("bhpn,bhn->bhp", S, c[:, t]))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(B, 0, H, P)
    y = _skip(y, x, d)
    return y.to(dtype), S.to(dtype)


def ssd_reference(x, b, c, a=None, d=None, h0=None, *, decay="scalar", chunk=64, algorithm="chunked"):
    """(y, h) of seqfuse.ssd computed by ``algorithm`` ("recurrent", "quadratic" or "chunked")."""
    fn = _BY_NAME.get(algorithm)
    if fn is None:
        raise ValueError(f"seqfuse.ssd: algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    return fn(x, b, c, a, d, h0, decay=decay, chunk=chunk)


_BY_NAME = {"recurrent": ssd_recurrent, "quadratic": ssd_recurrent, "chunked": ssd_recurrent}
