"""Random linear-recurrence programs in every spelling the docs claim (README "Recognized now",
docs/ir.md): ``ssd_cases`` (matrix states) and ``scan_cases`` (diagonal states).

Loops over time are kept short (T <= 24: Dynamo unrolls them); loop-free forms go longer, across
the algorithms' thresholds and chunk sizes.  Sizes include 1, odd, and lengths that are not a
multiple of any chunk; dtypes fp64 / fp32 / bf16 / fp16; random requires_grad subsets; NaN / inf
inputs; initial states; reversed loops.
"""
from __future__ import annotations

import math
import random
from typing import Iterator

import torch
import torch.nn.functional as F

from .check import Case
from .common import DTYPES, Maker, poison, reset, size, ssd_options, tags


def _case(family, name, fn, inputs, r, seed, triton, expect=None, tag=None, options=None):
    if options is None:
        options = ssd_options(r, triton, family)
    if expect is None:
        # a state with a key or value dim of 1 may be lifted as a scan
        expect = "ssd|scan" if family == "ssd" else "scan"
    return Case(family, name + (f"+{tag}" if tag else ""), fn, tuple(inputs), expect or None, options, seed)


def _sizes(r, triton, loop):
    """(T, batch, heads, key dim, value dim)."""
    if triton:
        hi = 12 if loop else 20
        return size(r, 1, hi, (1, 7, 9)), size(r, 1, 2), size(r, 1, 2), size(r, 1, 4), size(r, 1, 4)
    hi = 24 if loop else 80
    return (size(r, 1, hi, (1, 7, 8, 9, 17, 63, 65)), size(r, 1, 3), size(r, 1, 3), size(r, 1, 6),
            size(r, 1, 6))


# ======================================================================== ssd: loops

class _StepReader:
    """``x[:, :, t]`` as ``reader[t]`` (the same indexing the loops write inline)."""

    def __init__(self, x):
        self.x = x

    def __getitem__(self, t):
        return self.x[:, :, t]


def ssd_loop(r, seed, triton):
    """A matrix-state loop: S = decay ⊙ S + k ⊗ v, o_t = q_t · S, in one of several decay kinds,
    layouts and output styles (stack / preallocated buffer), forward or reversed, h0 or zeros."""
    T, B, H, K, V = _sizes(r, triton, loop=True)
    dt = r.choice(DTYPES)
    m = Maker(r, dt)
    decay = r.choice(("none", "const", "scalar", "vector", "mamba2"))
    reverse = r.random() < 0.2
    use_h0 = r.random() < 0.35
    buffer = r.random() < 0.4
    einsum = r.random() < 0.5
    pieces = r.random() < 0.2      # for q_t, ... in zip(q.unbind(2), ...)-style per-step reads
    q, k, v = m.randn(B, H, T, K), m.randn(B, H, T, K), m.randn(B, H, T, V)
    extra = []
    if decay in ("scalar", "mamba2"):
        extra.append(m.log_decay(B, H, T))
    elif decay == "vector":
        extra.append(m.log_decay(B, H, T, K))
    h0 = m.randn(B, H, K, V) if use_h0 else None
    tag = tags(poison(r, [q, k, v, *extra] + ([h0] if use_h0 else [])), reset(r, extra))

    def fn(q, k, v, *rest):
        g = rest[0] if decay in ("scalar", "vector", "mamba2") else None
        S = rest[-1] if use_h0 else q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1])
        o = torch.zeros_like(v) if buffer else None
        outs = []
        steps = range(q.shape[2] - 1, -1, -1) if reverse else range(q.shape[2])
        if pieces:
            qs, ks, vs = q.unbind(2), k.unbind(2), v.unbind(2)
            gs = g.unbind(2) if g is not None else None
        else:
            qs, ks, vs = (_StepReader(x) for x in (q, k, v))
            gs = _StepReader(g) if g is not None else None
        for t in steps:
            if einsum:
                kv = torch.einsum("bhk,bhv->bhkv", ks[t], vs[t])
            else:
                kv = ks[t][..., :, None] * vs[t][..., None, :]
            if decay == "none":
                S = S + kv
            elif decay == "const":
                S = 0.9 * S + kv
            elif decay == "scalar":
                S = S * gs[t].exp()[..., None, None] + kv
            elif decay == "mamba2":
                S = torch.exp(gs[t])[:, :, None, None] * S + kv
            else:
                S = S * gs[t].exp()[..., None] + kv
            ot = torch.einsum("bhk,bhkv->bhv", qs[t], S) if einsum else (qs[t][..., :, None] * S).sum(-2)
            if buffer:
                o[:, :, t] = ot
            else:
                outs.append(ot)
        if not buffer:
            o = torch.stack(outs[::-1] if reverse else outs, 2)
        return o, S

    name = f"loop_{decay}" + ("_rev" if reverse else "") + ("_h0" if use_h0 else "") + ("_unbind" if pieces else "")
    return _case("ssd", name, fn, [q, k, v, *extra] + ([h0] if use_h0 else []), r, seed, triton, tag=tag, expect="" if T == 1 else None)


def ssd_loop_mamba2(r, seed, triton):
    """Mamba-2's recurrent step (B, C shared by heads), (b, t, h, p) layout, dt = softplus."""
    T, Bn, H, N, P = _sizes(r, triton, loop=True)
    dt_ = r.choice(DTYPES)
    m = Maker(r, dt_)
    x = m.randn(Bn, T, H, P)
    dt = m._finish(F.softplus(m.randn(Bn, T, H, grad=False).double()), None, None)
    A = m.uniform(-2.0, -0.1, H)
    Bm, C = m.randn(Bn, T, N), m.randn(Bn, T, N)
    tag = poison(r, [x, dt, A, Bm, C])

    def fn(x, dt, A, Bm, C):
        dA = torch.exp(dt * A)
        h = x.new_zeros(x.shape[0], x.shape[2], x.shape[3], Bm.shape[-1])
        ys = []
        for t in range(x.shape[1]):
            h = h * dA[:, t, :, None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * Bm[:, t, None, None, :]
            ys.append(torch.einsum("bhpn,bn->bhp", h, C[:, t]))
        return torch.stack(ys, 1), h

    return _case("ssd", "loop_mamba2", fn, [x, dt, A, Bm, C], r, seed, triton, tag=tag, expect="" if T == 1 else None)


# ======================================================================== ssd: loop-free

def _segsum(x):
    t = x.size(-1)
    cs = torch.cumsum(x, dim=-1)
    seg = cs[..., :, None] - cs[..., None, :]
    return seg.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device)), -torch.inf)


def ssd_quadratic(r, seed, triton):
    """(q·kᵀ ∘ M)·v with a ones / γ^(i-j) / exp(segsum) mask in several spellings; strictly causal
    ones ([j < i], with or without an inclusive or RWKV's exclusive segment sum) too."""
    T, B, H, K, V = _sizes(r, triton, loop=False)
    dt = r.choice(DTYPES)
    m = Maker(r, dt)
    style = r.choice(("tril_ones", "tril_method", "masked_fill", "where", "einsum_bthd", "retention_pow",
                      "log_gamma", "segsum4", "hf_segment_sum", "strict_tril", "strict_segsum", "exclusive_segsum"))
    extra = []
    if style == "einsum_bthd":
        q, k, v = m.randn(B, T, H, K), m.randn(B, T, H, K), m.randn(B, T, H, V)
    elif style in ("strict_segsum", "exclusive_segsum"):
        q, k, v = m.randn(B, H, T, K), m.randn(B, H, T, K), m.randn(B, H, T, V)
        extra.append(m.log_decay(B, H, T, strength=r.choice((0.1, 1.0, 3.0))))
    elif style in ("segsum4", "hf_segment_sum"):
        q, k, v = m.randn(B, T, H, K), m.randn(B, T, H, K), m.randn(B, T, H, V)
        extra.append(m.log_decay(B, H, T, strength=r.choice((0.1, 1.0, 3.0))))
    else:
        q, k, v = m.randn(B, H, T, K), m.randn(B, H, T, K), m.randn(B, H, T, V)
        if style == "log_gamma":
            extra.append(m.uniform(-1.0, -0.01, H))
    tag = tags(poison(r, [q, k, v, *extra]), reset(r, extra))

    def fn(q, k, v, *rest):
        if style == "tril_ones":
            t = q.shape[-2]
            return (q @ k.transpose(-1, -2) * torch.tril(torch.ones(t, t, dtype=q.dtype))) @ v
        if style == "tril_method":
            return torch.einsum("bhid,bhjd->bhij", q, k).tril() @ v
        if style == "strict_tril":
            return torch.einsum("bhid,bhjd->bhij", q, k).tril(-1) @ v
        if style in ("strict_segsum", "exclusive_segsum"):
            t, g = q.shape[-2], rest[0]
            gc = g.cumsum(-1)
            e = gc[..., :, None] - gc[..., None, :]
            if style == "exclusive_segsum":
                e = e - g[..., :, None]
            strict = torch.tril(torch.ones(t, t, dtype=torch.bool), -1)
            return (q @ k.mT * torch.exp(e.masked_fill(~strict, -torch.inf))) @ v
        if style == "masked_fill":
            t = q.shape[-2]
            return (q @ k.mT).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), 0.0) @ v
        if style == "where":
            t = q.shape[-2]
            keep = torch.arange(t)[:, None] >= torch.arange(t)[None, :]
            return torch.einsum("bhij,bhjd->bhid", torch.where(keep, q @ k.mT, 0.0), v)
        if style == "einsum_bthd":
            t = q.shape[1]
            s = torch.einsum("bihd,bjhd->bhij", q * q.shape[-1] ** -0.5, k)
            return torch.einsum("bhij,bjhd->bihd", s * torch.tril(torch.ones(t, t, dtype=q.dtype)), v)
        if style == "retention_pow":
            h, t = q.shape[1], q.shape[2]
            gamma = 1 - 2.0 ** (-5.0 - torch.arange(h, dtype=torch.float32))
            n = torch.arange(t, dtype=torch.float32)
            decay = torch.pow(gamma.view(-1, 1, 1), n[:, None] - n[None, :]) * (n[:, None] >= n[None, :])
            return (q @ k.mT * decay.to(q.dtype)) @ v
        if style == "log_gamma":
            t = q.shape[2]
            n = torch.arange(t, dtype=q.dtype)
            decay = torch.exp(rest[0].view(-1, 1, 1) * (n[:, None] - n[None, :])).tril()
            return (q @ k.mT * decay) @ v
        if style == "segsum4":
            L = torch.exp(_segsum(rest[0]))
            return torch.einsum("blhn,bshn,bhls,bshp->blhp", q, k, L, v)
        # transformers' Mamba-2 segment_sum (masked cumsum)
        a = rest[0]
        t = a.size(-1)
        a = a[..., None].expand(*a.size(), t)
        a = a.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool), -1), 0)
        seg = torch.cumsum(a, dim=-2).masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool)), -torch.inf)
        G = torch.einsum("blhn,bshn->blsh", q, k)
        M = G * torch.exp(seg).permute(0, 2, 3, 1)
        return torch.einsum("blsh,bshp->blhp", M, v)

    return _case("ssd", f"quadratic_{style}", fn, [q, k, v, *extra], r, seed, triton, tag=tag,
                 expect="" if T == 1 else None)


def ssd_cumsum(r, seed, triton):
    """Cumulative sums of outer products: y_t = q_t · Σ_{s<=t} k_s ⊗ v_s (or Σ_{s<t}: cumsum - the step)."""
    T, B, H, K, V = _sizes(r, triton, loop=False)
    T = min(T, 40)
    m = Maker(r, r.choice(DTYPES))
    style = r.choice(("broadcast", "einsum_bthd", "exclusive_broadcast", "exclusive_einsum_bthd"))
    if style.endswith("broadcast"):
        q, k, v = m.randn(B, H, T, K), m.randn(B, H, T, K), m.randn(B, H, T, V)
    else:
        q, k, v = m.randn(B, T, H, K), m.randn(B, T, H, K), m.randn(B, T, H, V)
    tag = poison(r, [q, k, v])

    def fn(q, k, v):
        if style.endswith("broadcast"):
            kv = k[..., :, None] * v[..., None, :]
            S = kv.cumsum(2) - kv if style.startswith("exclusive") else kv.cumsum(2)
            return (q[..., None] * S).sum(-2)
        kv = torch.einsum("bthn,bthp->bthnp", k, v)
        S = kv.cumsum(1) - kv if style.startswith("exclusive") else kv.cumsum(1)
        return torch.einsum("bthn,bthnp->bthp", q, S)

    return _case("ssd", f"cumsum_{style}", fn, [q, k, v], r, seed, triton, tag=tag, expect="" if T == 1 else None)


def ssd_chunked_listing(r, seed, triton):
    """The Mamba-2 paper's chunked SSD listing (T a multiple of the chunk Q), with or without h0."""
    Q = r.choice((2, 4, 8))
    nc = size(r, 1, 3 if triton else 6)
    T = Q * nc
    _, B, H, N, P = _sizes(r, triton, loop=False)
    m = Maker(r, r.choice(DTYPES))
    X, A = m.randn(B, T, H, P), m.log_decay(B, T, H, strength=r.choice((0.5, 2.0)))
    Bm, C = m.randn(B, T, H, N), m.randn(B, T, H, N)
    use_h0 = r.random() < 0.5
    h0 = m.randn(B, H, P, N) if use_h0 else None
    tag = tags(poison(r, [X, A, Bm, C] + ([h0] if use_h0 else [])), reset(r, [A]))

    def fn(X, A, Bm, C, *rest):
        b, t = X.shape[:2]
        X, A, Bm, C = (z.reshape(b, t // Q, Q, *z.shape[2:]) for z in (X, A, Bm, C))
        A = A.permute(0, 3, 1, 2)
        A_cumsum = torch.cumsum(A, dim=-1)
        Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, Bm, torch.exp(_segsum(A)), X)
        decay_states = torch.exp(A_cumsum[:, :, :, -1:] - A_cumsum)
        states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bm, decay_states, X)
        first = torch.zeros_like(states[:, :1]) if not rest else rest[0][:, None]
        states = torch.cat([first, states], dim=1)
        decay_chunk = torch.exp(_segsum(F.pad(A_cumsum[:, :, :, -1], (1, 0))))
        new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
        Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, new_states[:, :-1], torch.exp(A_cumsum))
        return (Y_diag + Y_off).reshape(b, t, *Y_off.shape[3:]), new_states[:, -1]

    return _case("ssd", "chunked_listing" + ("_h0" if use_h0 else ""), fn,
                 [X, A, Bm, C] + ([h0] if use_h0 else []), r, seed, triton, tag=tag)


def ssd_chunked_linear_attention(r, seed, triton):
    """Causal linear attention by chunks: exclusive cumsum of per-chunk kᵀv plus the intra-chunk term."""
    Q = r.choice((2, 4, 8))
    T = Q * size(r, 2, 3 if triton else 6)
    _, B, H, D, _ = _sizes(r, triton, loop=False)
    m = Maker(r, r.choice(DTYPES))
    q, k, v = m.randn(B, H, T, D), m.randn(B, H, T, D), m.randn(B, H, T, D)
    tag = poison(r, [q, k, v])

    def fn(q, k, v):
        b, h, t, d = q.shape
        q, k, v = (z.reshape(b, h, t // Q, Q, d) for z in (q * d ** -0.5, k, v))
        kv = (k.transpose(-1, -2) @ v).cumsum(2)
        kv = torch.cat([torch.zeros_like(kv[:, :, :1]), kv[:, :, :-1]], dim=2)
        intra = (q @ k.transpose(-1, -2)).masked_fill(torch.triu(torch.ones(Q, Q, dtype=torch.bool), 1), 0) @ v
        return (q @ kv + intra).reshape(b, h, t, d)

    return _case("ssd", "chunked_linear_attention", fn, [q, k, v], r, seed, triton, tag=tag)


def ssd_chunk_loop(r, seed, triton):
    """Causal linear attention by chunks in a Python loop: the state entering each chunk read out, the
    chunk's masked scores (tril / masked_fill / none: a full-chunk look-alike that must not be one
    recurrence), the state updated after; no decay or a per-chunk one; outputs concatenated or
    written into a buffer; h0 given or zeros."""
    Q = r.choice((2, 3, 4))
    nc = size(r, 1, 3 if triton else 5)
    T = Q * nc
    _, B, H, D, V = _sizes(r, triton, loop=True)
    m = Maker(r, r.choice(DTYPES))
    mask = r.choice(("tril", "tril", "masked_fill", "none"))
    decay, use_h0, buffer = r.random() < 0.3, r.random() < 0.4, r.random() < 0.4
    q, k, v = m.randn(B, H, T, D), m.randn(B, H, T, D), m.randn(B, H, T, V)
    extra = [m.log_decay(B, H, nc)] if decay else []
    h0 = m.randn(B, H, D, V) if use_h0 else None
    tag = poison(r, [q, k, v])

    def fn(q, k, v, *rest):
        b, h, t, d = q.shape
        qc, kc, vc = (z.reshape(b, h, t // Q, Q, z.shape[-1]) for z in (q, k, v))
        g = rest[0] if decay else None
        S = rest[-1] if use_h0 else q.new_zeros(b, h, d, v.shape[-1])
        outs, o = [], torch.zeros_like(vc) if buffer else None
        for i in range(t // Q):
            qi, ki, vi = qc[:, :, i], kc[:, :, i], vc[:, :, i]
            s = qi @ ki.mT
            if mask == "tril":
                s = s.tril()
            elif mask == "masked_fill":
                s = s.masked_fill(torch.triu(torch.ones(Q, Q, dtype=torch.bool), 1), 0)
            y = qi @ S + s @ vi
            if buffer:
                o[:, :, i] = y
            else:
                outs.append(y)
            S = (S * g[:, :, i, None, None].exp() if decay else S) + ki.mT @ vi
        return (o.reshape(b, h, t, -1) if buffer else torch.cat(outs, 2)), S

    name = "chunk_loop" + ("_decay" if decay else "") + ("_h0" if use_h0 else "") + f"_{mask}" + \
        ("_buffer" if buffer else "")
    # decay per chunk beside an undecayed intra-chunk term, or an unmasked chunk: not one recurrence
    expect = "" if decay or mask == "none" or nc == 1 else None
    return _case("ssd", name, fn, [q, k, v, *extra] + ([h0] if use_h0 else []), r, seed, triton, tag=tag,
                 expect=expect)


def ssd_lightning_loop(r, seed, triton):
    """Lightning attention (MiniMax's loop): blocks of B steps read as slices ``x[:, :, iB:iB+B]`` (the
    last block ragged when T is not a multiple of B) or as chunks of a reshape; decays powers of one rate
    s > 0 per head: exp(-s·(i - j)) on the lower triangle, the entry exp(-s·(l + 1)), the chunk states'
    exp(-s·(B - 1 - l)) and the state's exp(-s·B) (the ragged block's own sizes), updated after the
    readout.  ``broken`` offsets one decay by a step: then not one recurrence."""
    Bk = r.choice((2, 3, 4))
    nb = size(r, 1, 3 if triton else 5)
    ragged = r.random() < 0.4
    T = Bk * nb + (r.randint(1, Bk - 1) if ragged else 0)
    _, B, H, D, V = _sizes(r, triton, loop=True)
    m = Maker(r, r.choice(DTYPES))
    style = "slices" if ragged or r.random() < 0.6 else "reshape"
    broken = r.choice((None, None, None, "entry", "states", "block"))
    q, k, v = m.randn(B, H, T, D), m.randn(B, H, T, D), m.randn(B, H, T, V)
    s = (0.05 + torch.rand(H, 1, 1, generator=torch.Generator().manual_seed(seed))).to(q.dtype)
    tag = poison(r, [q, k, v])

    def fn(q, k, v, s):
        b, h, t, d = q.shape
        kv = q.new_zeros(b, h, d, v.shape[-1])
        outs = []
        if style == "reshape":
            qc, kc, vc = (z.reshape(b, h, t // Bk, Bk, z.shape[-1]) for z in (q, k, v))
        for i in range((t + Bk - 1) // Bk):
            n = min(Bk, t - i * Bk)
            if style == "reshape":
                qi, ki, vi = qc[:, :, i], kc[:, :, i], vc[:, :, i]
            else:
                qi, ki, vi = (z[:, :, i * Bk:i * Bk + n] for z in (q, k, v))
            pos = torch.arange(n) + 1
            diag = torch.exp(-s * (pos[:, None] - pos[None, :])).tril()
            q_decay = torch.exp(-s * (pos[:, None] - int(broken == "entry")))
            k_decay = torch.exp(-s * (n - pos[:, None] + int(broken == "states")))
            outs.append((qi * q_decay) @ kv + ((qi @ ki.transpose(-1, -2)) * diag) @ vi)
            kv = kv * torch.exp(-s * (n - int(broken == "block"))) + (ki * k_decay).transpose(-1, -2) @ vi
        return torch.cat(outs, 2)

    name = f"lightning_{style}" + ("_ragged" if ragged else "") + (f"/broken:{broken}" if broken else "")
    # a key or value dim of 1: the masked products are a near miss (c, b and x not told apart)
    return _case("ssd", name, fn, [q, k, v, s], r, seed, triton, tag=tag, expect="" if min(D, V) == 1 else None)


def ssd_channel_decay(r, seed, triton):
    """Σ_n q[i, n]·k[j, n]·exp(G[i, n] - G[j, n]) masked, then ·v: a decay per key channel inside q·k (GLA's,
    RWKV-6's chunked intra-chunk scores), inclusive, strict, or RWKV's exclusive exponent; the mask applied
    after the sum (``tril``, ``masked_fill``) or to the exponent before exp (``-inf``, the stable spelling).
    Look-alikes (BREAKS) must stay unrewritten: the keys' exponent of another cumulative sum, a per-key gate."""
    T, B, H, K, V = _sizes(r, triton, loop=False)
    dt = r.choice(DTYPES)
    m = Maker(r, dt)
    mode = r.choice(("inclusive", "strict", "exclusive"))
    style = r.choice(("after", "stable", "einsum"))
    brk = r.choice((None, None, None, None, "other_cumsum", "key_gate"))
    q, k, v = m.randn(B, H, T, K), m.randn(B, H, T, K), m.randn(B, H, T, V)
    # moderate decays unless the exponent is masked before exp: eager's own exp(G_i - G_j) above the
    # diagonal must not overflow (its gradient there would be inf·0)
    w = m.log_decay(B, H, T, K, strength=r.choice((0.05, 0.3, 3.0) if style == "stable" else (0.05, 0.3)))
    tag = tags(poison(r, [q, k, v, w]), reset(r, [w]))

    def fn(q, k, v, w):
        t = q.shape[-2]
        g = w.cumsum(-2)
        h = (2 * w).cumsum(-2) if brk == "other_cumsum" else g
        e = g[..., :, None, :] - h[..., None, :, :]
        if mode == "exclusive":
            e = e - w[..., :, None, :]
        if brk == "key_gate":
            e = e + w[..., None, :, :]
        keep = torch.tril(torch.ones(t, t, dtype=torch.bool), -1 if mode != "inclusive" else 0)
        if style == "stable":
            e = e.masked_fill(~keep[..., None], -torch.inf)
        if style == "einsum":
            s = torch.einsum("bhin,bhjn,bhijn->bhij", q, k, e.exp())
        else:
            s = (q[..., :, None, :] * k[..., None, :, :] * e.exp()).sum(-1)
        if style != "stable":
            s = s.masked_fill(~keep, 0.0)
        return s @ v

    name = f"channel_decay_{mode}_{style}" + (f"_BREAK_{brk}" if brk else "")
    expect = "" if brk or T == 1 or min(K, V) == 1 else None      # (a unit key or value dim: see ssd_forms)
    return _case("ssd", name, fn, [q, k, v, w], r, seed, triton, tag=tag, expect=expect)


def mlstm_chunkwise(query, key, value, ig, fg, *state, chunk, broken=None, extra=False, ret_state=False,
                    eps=1e-6):
    """xLSTM's chunkwise mLSTM as transformers' ``mlstm_chunkwise_native_autograd`` writes it
    (``mlstm_chunkwise_recurrent_fw_C`` then ``mlstm_chunkwise_parallel_fw_H``, transformers 5.24
    ``models/xlstm/modeling_xlstm.py``, itself the NX-AI mlstm_kernels native kernel), op for op;
    ``state`` a given (C, n, m); ``extra`` also returns the normalizer and the stabilizer (as
    ``mlstm_chunkwise_parallel_fw_H`` does), ``ret_state`` the final (C, n, m) (as
    ``return_last_states=True`` does); ``broken`` changes one piece: "strict_mask" (the
    intra-chunk mask excludes the diagonal), "m_start" (the maximum starts at 1), "gate_sign"
    (A = B[chunk-1] + B + I), "no_state_decay" (the states do not decay), "inter_scale" (the gated
    queries scaled twice)."""
    bs, nh, t, dk = query.shape
    n = t // chunk
    vec_i, vec_f = ig.view(bs, nh, n, chunk), fg.view(bs, nh, n, chunk)
    vec_b = F.logsigmoid(vec_f).cumsum(-1)
    scale = dk ** -0.5
    # the chunk loop (mlstm_chunkwise_recurrent_fw_C)
    c_states = torch.zeros((bs, nh, (n + 1) * dk, value.shape[-1]), dtype=query.dtype)
    n_states = torch.zeros((bs, nh, (n + 1) * dk), dtype=query.dtype)
    m_states = torch.zeros((bs, nh, n + 1), dtype=query.dtype)
    c_k = state[0] if state else torch.zeros((bs, nh, dk, value.shape[-1]), dtype=query.dtype)
    n_k = state[1] if state else torch.zeros((bs, nh, dk), dtype=query.dtype)
    m_k = state[2] if state else torch.zeros((bs, nh, 1), dtype=query.dtype)
    if broken == "m_start":
        m_k = m_k + 1.0
    vec_a = (vec_b[..., -1, None] + vec_b if broken == "gate_sign" else vec_b[..., -1, None] - vec_b) + vec_i
    vec_g = vec_b[..., -1]
    a_max = vec_a.max(-1).values
    m_k = m_k.squeeze(-1)
    for z in range(n):
        c_states[:, :, z * dk:(z + 1) * dk, :] = c_k
        n_states[:, :, z * dk:(z + 1) * dk] = n_k
        m_states[:, :, z] = m_k
        m_next = torch.max(vec_g[:, :, z] + m_k, a_max[:, :, z])
        k_z = key[:, :, z * chunk:(z + 1) * chunk, :]
        v_z = value[:, :, z * chunk:(z + 1) * chunk, :]
        k_gated = k_z * torch.exp(vec_a[:, :, z, :] - m_next[..., None])[:, :, :, None]
        g_bar = torch.exp(vec_g[:, :, z] + m_k - m_next)[:, :, None]
        if broken == "no_state_decay":
            g_bar = torch.ones_like(g_bar)
        c_k = g_bar[..., None] * c_k + k_gated.transpose(-2, -1) @ v_z
        n_k = g_bar * n_k + k_gated.transpose(-2, -1).sum(-1)
        m_k = m_next
    c_states[:, :, -dk:, :] = c_k
    n_states[:, :, -dk:] = n_k
    m_states[:, :, -1] = m_k
    # the intra-chunk form (mlstm_chunkwise_parallel_fw_H)
    c_read = c_states[:, :, :-dk, :].view(bs, nh, n, dk, -1)
    n_read = n_states[:, :, :-dk].view(bs, nh, n, dk)
    m_read = m_states[:, :, :-1]
    q5, k5, v5 = (x.view(bs, nh, n, chunk, x.shape[-1]) for x in (query, key, value))
    ltr = torch.tril(torch.ones((chunk, chunk), dtype=torch.bool), -1 if broken == "strict_mask" else 0)
    log_d = torch.where(ltr, vec_b[:, :, :, :, None] - vec_b[:, :, :, None, :], -float("inf")) + \
        vec_i[:, :, :, None, :]
    m_intra = torch.max(log_d, dim=-1, keepdim=False).values
    b_inter = vec_b + m_read[:, :, :, None]
    m_comb = torch.maximum(b_inter, m_intra)[:, :, :, :, None]
    b_inter = b_inter[:, :, :, :, None]
    scores = (q5 @ k5.transpose(-2, -1)) * scale * torch.exp(log_d - m_comb)
    q_gated = q5 * torch.exp(b_inter - m_comb) * (scale * (2.0 if broken == "inter_scale" else 1.0))
    num = q_gated @ c_read + scores @ v5
    den = q_gated @ n_read.unsqueeze(-1) + scores.sum(dim=-1, keepdim=True)
    den = torch.maximum(torch.abs(den), torch.exp(-m_comb))
    h = (num / (den + eps)).view(bs, nh, t, -1)
    outs = (h, den.reshape(bs, nh, t), m_comb.reshape(bs, nh, t)) if extra else (h,)
    if ret_state:
        outs += (c_states[:, :, -dk:, :], n_states[:, :, -dk:], m_states[:, :, -1:])
    return outs if len(outs) > 1 else h


def _mlstm_operands(r, dtype, B, H, T, K, V, p_given):
    """The mLSTM spellings' operands, drawn from ``r`` in one order: q, k (B, H, T, K), v (B, H, T, V), input
    gates (scale ×1 to ×12: beyond the guard's 20 in some), forget gates (offset 0 / ±2), and with
    probability ``p_given`` a given state (C0, n0, m0), its maximum "moderate" or "high" (30: beyond the
    guard, the call runs the program).  Returns (q, k, v, igate, fgate, state0 (a list, empty when none),
    i_scale, m_given)."""
    m = Maker(r, dtype)
    q, k, v = m.randn(B, H, T, K), m.randn(B, H, T, K), m.randn(B, H, T, V)
    i_scale = r.choice((1.0, 4.0, 8.0, 12.0))
    igate = m.randn(B, H, T, scale=i_scale)
    fgate = m.randn(B, H, T, scale=2.0) + r.choice((0.0, 2.0, -2.0))
    given = r.random() < p_given
    m_given = r.choice(("moderate", "moderate", "high"))
    state0 = [m.randn(B, H, K, V), m.randn(B, H, K),
              torch.full((B, H, 1), 30.0, dtype=dtype) if m_given == "high" else m.randn(B, H, 1, scale=3.0)] \
        if given else []
    return q, k, v, igate, fgate, state0, i_scale, m_given


def ssd_mlstm(r, seed, triton):
    """xLSTM's chunkwise mLSTM, written as transformers' ``mlstm_chunkwise_native_autograd`` writes it
    (``mlstm_chunkwise_recurrent_fw_C`` + ``mlstm_chunkwise_parallel_fw_H``, from the NX-AI mlstm_kernels
    native kernel): a stabilized loop over chunks filling zero-filled state buffers slice by slice, and the
    intra-chunk form that reads them (ssd_stabilized).  Varied: chunk size and count (one chunk: a near
    miss), dtype (fp16 / bf16: left alone), the input gates' scale (beyond the guard's 20: the call runs
    the program), the forget gates' offset, a given initial state (its maximum beyond the guard in some),
    the final state returned, the normalizer and the stabilizer returned too, and broken copies (one
    piece changed) that must stay as written."""
    Q = r.choice((2, 3, 4, 8))
    nc = size(r, 1, 3 if triton else 4)
    T = Q * nc
    _, B, H, K, V = _sizes(r, triton, loop=False)
    dtype = r.choice(DTYPES)
    q, k, v, igate, fgate, state0, i_scale, m_given = _mlstm_operands(r, dtype, B, H, T, K, V, p_given=0.25)
    given = bool(state0)
    extra, ret_state = r.random() < 0.2, r.random() < 0.3
    broken = r.choice((None,) * 8 + ("strict_mask", "m_start", "gate_sign", "no_state_decay", "inter_scale"))
    tag = tags(poison(r, [q, k, v, igate, fgate]), reset(r, [fgate]))
    eps = 1e-6

    def fn(*a):
        return mlstm_chunkwise(*a, chunk=Q, broken=broken, extra=extra, ret_state=ret_state, eps=eps)

    name = "mlstm" + (f"_Q{Q}_nc{nc}") + (f"_given_{m_given}" if given else "") + ("_extra" if extra else "") + \
        ("_state" if ret_state else "") + \
        (f"_i{i_scale:g}" if i_scale > 4 else "") + (f"_broken_{broken}" if broken else "")
    # (one chunk, or a key dim of 1: the contractions fold unit axes, a near miss)
    lifted = dtype in (torch.float32, torch.float64) and nc >= 2 and K >= 2 and not broken
    return _case("ssd", name, fn, [q, k, v, igate, fgate, *state0], r, seed, triton, tag=tag,
                 expect="ssd" if lifted else "")



def _mlstm_step(query, key, value, igate, fgate, cstate, nstate, mstate, eps, dtype_state, broken):
    """One step of xLSTM's recurrent mLSTM as transformers' ``mlstm_recurrent_step_native`` writes it
    (op for op, its shape checks left out); ``broken`` as :func:`mlstm_recurrent`'s."""
    dtype_qkv = query.dtype
    matC_old = cstate.to(dtype=dtype_state)
    vecN_old = nstate.to(dtype=dtype_state)
    scaM_old = mstate.to(dtype=dtype_state)

    batch_size, nh, dhqk = query.shape

    # gates
    scaF_log = torch.nn.functional.logsigmoid(fgate)

    # update rule
    if broken == "m_min":
        scaM_state_new = torch.min(scaF_log + scaM_old, igate)
    else:
        scaM_state_new = torch.max(scaF_log + scaM_old, igate)

    scaF_act = torch.exp(scaF_log + scaM_old - scaM_state_new)
    scaI_act = torch.exp(igate - scaM_state_new)

    vecQ_scaled = query * (dhqk ** (-0.5))
    matC_state_new = scaF_act[:, :, :, None] * matC_old.clone() + scaI_act[:, :, :, None] * (
        key[:, :, :, None] @ value[:, :, None, :]
    )
    if broken == "n_no_igate":
        vecN_state_new = scaF_act * vecN_old.clone() + key
    else:
        vecN_state_new = scaF_act * vecN_old.clone() + scaI_act * key
    vecQ_num = query * 0.3 if broken == "num_scale" else vecQ_scaled
    h_num = vecQ_num[:, :, None, :] @ matC_state_new.to(dtype=dtype_qkv)
    h_num = h_num.squeeze(2).to(dtype=dtype_state)

    qn_dotproduct = vecQ_scaled[:, :, None, :] @ vecN_state_new[:, :, :, None].to(dtype=dtype_qkv)
    qn_dotproduct = qn_dotproduct.squeeze(2)
    max_val = torch.exp(-(scaM_old if broken == "max_old_m" else scaM_state_new))
    if broken == "max_val_scale":
        max_val = max_val * 2
    if broken == "eps_inside":
        h_denom = torch.maximum((qn_dotproduct + eps).abs(), max_val).to(dtype=dtype_state)
    else:
        h_denom = (torch.maximum(qn_dotproduct.abs(), max_val) + eps).to(dtype=dtype_state)
    h = h_num / h_denom

    h = h.to(dtype=dtype_qkv)
    matC_state_new = matC_state_new.to(dtype=dtype_state)
    vecN_state_new = vecN_state_new.to(dtype=dtype_state)
    scaM_state_new = scaM_state_new.to(dtype=dtype_state)
    return h, (matC_state_new, vecN_state_new, scaM_state_new)


def mlstm_recurrent(q, k, v, i_gate, f_gate, c0=None, n0=None, m0=None, return_last_states=False, eps=1e-6,
                    broken=None):
    """xLSTM's recurrent mLSTM as transformers' ``mlstm_recurrent_sequence_native`` (a Python loop over
    time calling ``mlstm_recurrent_step_native``, transformers 5.x ``models/xlstm/modeling_xlstm.py``,
    itself the NX-AI mlstm_kernels native kernel) writes it, op for op, with ``dtype_state`` the
    operands' dtype; (c0, n0, m0) a given state, ``return_last_states`` returns the final one as
    ``(h, (C, n, m))``.  ``broken`` changes one piece of the step: "max_val_scale" (e^{-m}·2 in the
    denominator), "eps_inside" (``max(|qn + eps|, e^{-m})``), "m_min" (the stabilizer updated with a
    minimum), "num_scale" (the numerator's queries scaled by 0.3, the normalizer's by dhqk^-0.5),
    "n_no_igate" (the normalizer adds k without its input gate), "max_old_m" (the denominator's e^{-m} of
    the step's previous maximum)."""
    batch_size, nh, sequence_length, dhqk = q.shape
    dhv = v.shape[-1]
    device = q.device
    dtype_state = q.dtype

    if c0 is not None:
        if n0 is None or m0 is None:
            raise ValueError("Initial states must be provided together.")
        matC_state, vecN_state, vecM_state = (
            c0.to(dtype=dtype_state),
            n0.to(dtype=dtype_state),
            m0.to(dtype=dtype_state),
        )
    else:
        matC_state = torch.zeros((batch_size, nh, dhqk, dhv), dtype=dtype_state, device=device)
        vecN_state = torch.zeros((batch_size, nh, dhqk), dtype=dtype_state, device=device)
        vecM_state = torch.zeros((batch_size, nh, 1), dtype=dtype_state, device=device)

    vecH_list = []
    for t in range(sequence_length):
        vecF_t, vecI_t = f_gate[:, :, t, None], i_gate[:, :, t, None]
        vecQ_t, vecK_t, vecV_t = q[:, :, t, :], k[:, :, t, :], v[:, :, t, :]
        vecH, (matC_state, vecN_state, vecM_state) = _mlstm_step(
            vecQ_t, vecK_t, vecV_t, vecI_t, vecF_t, matC_state, vecN_state, vecM_state, eps, dtype_state, broken)
        vecH_list.append(vecH)

    matH = torch.stack(vecH_list, dim=-2)

    if return_last_states:
        return matH, (matC_state, vecN_state, vecM_state)
    return matH


MLSTM_LOOP_BREAKS = ("max_val_scale", "eps_inside", "m_min", "num_scale", "n_no_igate", "max_old_m")


def ssd_mlstm_loop(r, seed, triton):
    """xLSTM's recurrent mLSTM, written as transformers' ``mlstm_recurrent_sequence_native`` writes it (the
    stabilized step ``mlstm_recurrent_step_native`` in a Python loop over time, unrolled by Dynamo), lifted
    to one ssd and the closed form of its running maximum (mlstm_loop).  Varied: the length (one step: left
    alone), the sizes, the dtype (fp16 / bf16: a near miss), the input gates' scale (beyond the guard's 20:
    the call runs the program), the forget gates' offset, eps, a given initial state (its maximum beyond
    the guard in some), the final state returned, NaN / inf / reset inputs, and broken copies (one piece of
    the step changed) that must stay as written."""
    T = 1 if r.random() < 0.05 else size(r, 2, 12, (2, 3, 12))
    _, B, H, _, _ = _sizes(r, triton, loop=True)
    K, V = size(r, 2, 8, (2, 8)), size(r, 2, 8, (2, 8))
    dtype = r.choice((torch.float64, torch.float64, torch.float32, torch.float32, torch.float32,
                      torch.bfloat16, torch.float16))
    q, k, v, igate, fgate, state0, i_scale, m_given = _mlstm_operands(r, dtype, B, H, T, K, V, p_given=0.3)
    given = bool(state0)
    if given and r.random() < 0.5:
        state0[2].requires_grad_(True)
    ret_state = r.random() < 0.4
    eps = r.choice((1e-6, 1e-6, 1e-6, 1e-4))
    broken = r.choice((None,) * 8 + MLSTM_LOOP_BREAKS)
    tag = tags(poison(r, [q, k, v, igate, fgate, *state0]), reset(r, [fgate]))

    def fn(*a):
        return mlstm_recurrent(*a, return_last_states=ret_state, eps=eps, broken=broken)

    name = f"mlstm_loop_T{T}" + (f"_given_{m_given}" if given else "") + ("_state" if ret_state else "") + \
        (f"_i{i_scale:g}" if i_scale > 4 else "") + (f"_eps{eps:g}" if eps != 1e-6 else "") + \
        (f"_broken_{broken}" if broken else "")
    # (a value beyond a guard, a NaN or a reset still compiles the rewrite: the call runs the program)
    lifted = dtype in (torch.float32, torch.float64) and T >= 2 and not broken
    return _case("ssd", name, fn, [q, k, v, igate, fgate, *state0], r, seed, triton, tag=tag,
                 expect="ssd" if lifted else "")


SSD_SPELLINGS = ((ssd_loop, 4), (ssd_mlstm, 2), (ssd_mlstm_loop, 2), (ssd_loop_mamba2, 1), (ssd_quadratic, 4),
                 (ssd_cumsum, 1), (ssd_chunked_listing, 1), (ssd_chunked_linear_attention, 1), (ssd_chunk_loop, 1),
                 (ssd_lightning_loop, 1), (ssd_channel_decay, 2))


# ======================================================================== scan

def scan_loop(r, seed, triton):
    """h = a_t ⊙ h + b_t over a diagonal state, (B, T, D) layout; gates by sigmoid / exp / given;
    forward or reversed, h0, outputs stacked or written into a buffer, final state returned or not."""
    T, B, _, D, _ = _sizes(r, triton, loop=True)
    m = Maker(r, r.choice(DTYPES))
    gate = r.choice(("given", "exp", "sigmoid"))
    reverse, use_h0, buffer = r.random() < 0.25, r.random() < 0.35, r.random() < 0.4
    ret_h = r.random() < 0.5
    x = m.randn(B, T, D)
    a = m.gate(B, T, D) if gate == "given" else m.log_decay(B, T, D) if gate == "exp" else m.randn(B, T, D)
    h0 = m.randn(B, D) if use_h0 else None
    tag = poison(r, [x, a] + ([h0] if use_h0 else []))

    def fn(x, a, *rest):
        h = rest[0] if use_h0 else x.new_zeros(x.shape[0], x.shape[2])
        o = torch.zeros_like(x) if buffer else None
        outs = []
        steps = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
        for t in steps:
            at = a[:, t] if gate == "given" else a[:, t].exp() if gate == "exp" else torch.sigmoid(a[:, t])
            h = at * h + x[:, t]
            if buffer:
                o[:, t] = h
            else:
                outs.append(h)
        if not buffer:
            o = torch.stack(outs[::-1] if reverse else outs, 1)
        return (o, h) if ret_h else o

    name = f"loop_{gate}" + ("_rev" if reverse else "") + ("_h0" if use_h0 else "")
    return _case("scan", name, fn, [x, a] + ([h0] if use_h0 else []), r, seed, triton, tag=tag, expect="" if T == 1 else None)


def scan_loop_mamba(r, seed, triton):
    """Mamba-1's selective scan (transformers' slow path): exp(Δ·A), Δ·B·x, readout C, D skip, gate."""
    T, Bn, _, N, _ = _sizes(r, triton, loop=True)
    D = size(r, 1, 4 if triton else 6)
    m = Maker(r, r.choice(DTYPES))
    hidden = m.randn(Bn, D, T)
    delta = m._finish(F.softplus(torch.randn(Bn, D, T, generator=m.g, dtype=torch.float64)), None, None)
    A = m.uniform(-2.0, -0.05, D, N)
    Bm, C, Dk, z = m.randn(Bn, T, N), m.randn(Bn, T, N), m.randn(D), m.randn(Bn, D, T)
    tag = poison(r, [hidden, delta, A, Bm, C])
    upcast = r.random() < 0.5

    def fn(hidden, dt, A, B, C, Dk, z):
        batch, dim, seq_len = hidden.shape
        dtype = hidden.dtype
        discrete_A = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
        if upcast:
            # .float() as transformers writes it, but fp64 copies (the oracle) stay fp64
            up = torch.promote_types(dtype, torch.float32)
            deltaB_u = dt[:, :, :, None] * B[:, None, :, :].to(up) * hidden[:, :, :, None].to(up)
            state = torch.zeros(batch, dim, A.shape[1], dtype=up)
        else:
            deltaB_u = dt[:, :, :, None] * B[:, None, :, :] * hidden[:, :, :, None]
            state = hidden.new_zeros(batch, dim, A.shape[1])
        ys = []
        for i in range(seq_len):
            state = discrete_A[:, :, i, :] * state + deltaB_u[:, :, i, :]
            ys.append(torch.matmul(state.to(dtype), C[:, i, :].unsqueeze(-1))[:, :, 0])
        y = torch.stack(ys, dim=-1)
        y = y + hidden * Dk[None, :, None]
        return y * F.silu(z), state

    # one channel (D = 1): the state (B, 1, N) read out over N is as well an ssd with a value dim of 1
    return _case("scan", "loop_mamba" + ("_upcast" if upcast else ""), fn, [hidden, delta, A, Bm, C, Dk, z],
                 r, seed, triton, tag=tag, expect="" if T == 1 else "scan|ssd" if D == 1 else None)


def scan_loop_complex(r, seed, triton):
    """LRU / S4D recurrent mode: a complex diagonal decay, real part read out."""
    T, B, _, N, Din = _sizes(r, triton, loop=True)
    m = Maker(r, r.choice((torch.float32, torch.float64)))
    u = m.randn(B, T, Din)
    nu, theta = m.randn(N, scale=0.5), m.randn(N, scale=0.5)
    Bre, Bim, Cre, Cim = (m.randn(N, Din) for _ in range(4))
    tag = poison(r, [u, Bre, Cre])

    def fn(u, nu, theta, Bre, Bim, Cre, Cim):
        lam = torch.exp(torch.complex(-torch.exp(nu), torch.exp(theta)))
        cdt = lam.dtype
        Bu = torch.einsum("nd,btd->btn", torch.complex(Bre, Bim), u.to(cdt))
        Cc = torch.complex(Cre, Cim)
        h = torch.zeros(u.shape[0], lam.shape[0], dtype=cdt)
        ys = []
        for t in range(u.shape[1]):
            h = lam * h + Bu[:, t]
            ys.append((h @ Cc).real)
        return torch.stack(ys, 1)

    return _case("scan", "loop_lru", fn, [u, nu, theta, Bre, Bim, Cre, Cim], r, seed, triton, tag=tag, expect="" if T == 1 else None)


def scan_bidirectional(r, seed, triton):
    T, B, _, D, _ = _sizes(r, triton, loop=True)
    T = min(T, 16)
    m = Maker(r, r.choice(DTYPES))
    x, g = m.randn(B, T, D), m.randn(B, T, D)
    tag = poison(r, [x, g])

    def fn(x, g):
        hf = x.new_zeros(x.shape[0], x.shape[2])
        hb = x.new_zeros(x.shape[0], x.shape[2])
        fw, bw = [], []
        for t in range(x.shape[1]):
            hf = torch.sigmoid(g[:, t]) * hf + x[:, t]
            fw.append(hf)
        for t in range(x.shape[1] - 1, -1, -1):
            hb = torch.sigmoid(g[:, t]) * hb + x[:, t]
            bw.append(hb)
        return torch.stack(fw, 1) + torch.stack(bw[::-1], 1)

    return _case("scan", "loop_bidirectional", fn, [x, g], r, seed, triton, tag=tag, expect="" if T == 1 else None)


def _linear(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def scan_associative(r, seed, triton):
    """associative_scan(combine_mode="generic") of the linear combine, 1-D to 3-D, any dim, reverse."""
    from torch._higher_order_ops.associative_scan import associative_scan
    m = Maker(r, r.choice(DTYPES))
    nd = r.choice((1, 2, 3))
    T = size(r, 1, 12 if triton else 33, (1, 2, 3, 8, 13))
    shape = [size(r, 1, 4) for _ in range(nd)]
    dim = r.randrange(nd)
    shape[dim] = T
    reverse = r.random() < 0.25
    a, b = m.gate(*shape), m.randn(*shape)
    tag = poison(r, [a, b])

    def fn(a, b):
        return associative_scan(_linear, (a, b), dim=dim, reverse=reverse, combine_mode="generic")[1]

    return _case("scan", f"associative_scan_{nd}d" + ("_rev" if reverse else ""), fn, [a, b], r, seed, triton,
                 tag=tag, expect="" if T == 1 else None)


def _linear_body(h, xs):
    a, b = xs
    h = a * h + b
    return h, h.clone()


def scan_hop(r, seed, triton):
    """torch._higher_order_ops.scan with a linear body, a zero or given initial carry."""
    from torch._higher_order_ops.scan import scan
    T, B, _, D, _ = _sizes(r, triton, loop=False)
    T = min(T, 40)
    m = Maker(r, r.choice(DTYPES))
    a, b = m.gate(T, B, D), m.randn(T, B, D)
    use_h0 = r.random() < 0.5
    h0 = m.randn(B, D) if use_h0 else None
    tag = poison(r, [a, b] + ([h0] if use_h0 else []))

    def fn(a, b, *rest):
        init = rest[0] if rest else torch.zeros_like(b[0])
        hT, hs = scan(_linear_body, init, (a, b))
        return hs, hT

    return _case("scan", "hop_scan" + ("_h0" if use_h0 else ""), fn, [a, b] + ([h0] if use_h0 else []),
                 r, seed, triton, tag=tag, expect="" if T == 1 else None)


def scan_loop_buffer(r, seed, triton):
    """h carried through a buffer written one index ahead of the reads (``h[:, t + 1] = a_t·h[:, t] +
    x_t``), h[:, 0] zeros or a given h0; time axis 1 or last; forward or reversed (``h[:, t] = a_t·h[:,
    t + 1] + x_t``); sometimes two indices ahead (second order: must stay a loop).  No input needs a
    gradient: eager's backward of such a program fails (h[:, t], saved by the product, is overwritten
    through h)."""
    T, B, _, D, _ = _sizes(r, triton, loop=True)
    m = Maker(r, r.choice(DTYPES))
    reverse, use_h0, last_axis = r.random() < 0.25, r.random() < 0.4, r.random() < 0.3
    gap = 2 if r.random() < 0.15 else 1
    ret = r.choice(("states", "all", "last"))
    x, a = m.randn(B, T, D, grad=False), m.gate(B, T, D, grad=False)
    h0 = m.randn(B, D, grad=False) if use_h0 else None
    tag = poison(r, [x, a] + ([h0] if use_h0 else []))

    def fn(x, a, *rest):
        n = x.shape[1]
        shape = (x.shape[0], x.shape[2], n + gap) if last_axis else (x.shape[0], n + gap, x.shape[2])
        h = x.new_zeros(shape)
        at = (lambda t: h[..., t]) if last_axis else (lambda t: h[:, t])

        def put(t, v):
            if last_axis:
                h[..., t] = v
            else:
                h[:, t] = v
        first = n + gap - 1 if reverse else 0
        if use_h0:
            put(first, rest[0])
        for t in (range(n - 1, -1, -1) if reverse else range(n)):
            if reverse:
                put(t, a[:, t] * at(t + gap) + x[:, t])
            else:
                put(t + gap, a[:, t] * at(t) + x[:, t])
        if ret == "all":
            return h
        if ret == "last":
            return at(0) if reverse else at(n + gap - 1)
        return (h[..., :n] if reverse else h[..., gap:]) if last_axis else (h[:, :n] if reverse else h[:, gap:])

    name = "loop_buffer_carried" + ("_rev" if reverse else "") + ("_h0" if use_h0 else "") + \
        ("_last_axis" if last_axis else "") + (f"_gap{gap}" if gap > 1 else "") + f"_{ret}"
    expect = "" if T == 1 or gap > 1 else None
    return _case("scan", name, fn, [x, a] + ([h0] if use_h0 else []), r, seed, triton, tag=tag, expect=expect)


def scan_loop_rwkv4(r, seed, triton):
    """RWKV-4's stabilized WKV loop (transformers' ``rwkv_linear_attention_cpu``, a running maximum M
    carried beside num / den), lifted to two scans in its linear form under value guards.  Varied:
    the keys' cast to fp32 or none (fp16 keys of 8-14 overflow e^k in fp16), keys beyond the guards'
    bounds, the decay given as raw (``-exp(d)``) or as w' (positive ones refused), a -inf w' (a
    reset), M's start (-1e38, -inf, or 0, which is left alone) or a given fp32 state (its maximum
    fresh at -1e30, moderate, or 40: beyond the guard), outputs written into a buffer or stacked, the
    final state returned; and broken copies (one piece changed) that must stay loops."""
    T, B, _, C, _ = _sizes(r, triton, loop=True)
    T = min(T, 16)
    dtype = r.choice(DTYPES)
    m = Maker(r, dtype)
    keys = r.choice(("normal", "normal", "large", "high"))
    k = m.randn(B, T, C, scale=12.0) if keys == "large" else m.uniform(8.0, 14.0, B, T, C) if keys == "high" \
        else m.randn(B, T, C)
    v, first = m.randn(B, T, C), m.randn(C)
    raw = r.random() < 0.7
    d = m.randn(C) if raw else m.uniform(-3.0, 0.2 if r.random() < 0.2 else 0.0, C)
    upcast, buffer, ret_state = r.random() < 0.5, r.random() < 0.6, r.random() < 0.3
    start = r.choice((-1e38, -1e38, -1e38, -math.inf, 0.0))
    # a given state (use_cache=True): fp32 (num, den, max), the max fresh (-1e30), moderate, or beyond
    # the guard's bound of 30 (the call then runs the program)
    given = r.random() < 0.3
    g32 = Maker(r, torch.float32)
    m_given = r.choice(("fresh", "moderate", "moderate", "high"))
    state0 = [g32.randn(B, C), g32.uniform(0.5, 2.0, B, C),
              torch.full((B, C), -1e30) if m_given == "fresh" else
              torch.full((B, C), 40.0) if m_given == "high" else g32.randn(B, C, scale=3.0)] if given else []
    broken = r.choice((None,) * 6 + ("no_first", "mo_from_k", "update_from_mo"))
    tag = tags(poison(r, [k, v, first, d]), None)
    if r.random() < 0.12:                   # a reset: w' = -inf (raw: time_decay = +inf)
        with torch.no_grad():
            d.view(-1)[r.randrange(C)] = math.inf if raw else -math.inf
        tag = tags(tag, "reset")

    def fn(time_decay, time_first, key, value, *state):
        wide = torch.promote_types(key.dtype, torch.float32)
        if state:
            num, den, mx = state
        else:
            num = torch.zeros_like(key[:, 0], dtype=wide if upcast else None)
            den = torch.zeros_like(num)
            mx = torch.zeros_like(num) + start
        w = -torch.exp(time_decay) if raw else time_decay
        out = torch.zeros_like(key)
        outs = []
        for t in range(key.shape[1]):
            kt = key[:, t].to(wide) if upcast else key[:, t]
            vt = value[:, t]
            mo = torch.maximum(mx, kt if broken == "mo_from_k" else kt + time_first)
            e1 = torch.exp(mx - mo)
            e2 = torch.exp((kt if broken == "no_first" else kt + time_first) - mo)
            y = ((e1 * num + e2 * vt) / (e1 * den + e2)).to(out.dtype)
            if buffer:
                out[:, t] = y
            else:
                outs.append(y)
            ms = torch.maximum(mx + w, kt)
            ref = mo if broken == "update_from_mo" else ms
            e1, e2 = torch.exp(mx + w - ref), torch.exp(kt - ref)
            num, den, mx = e1 * num + e2 * vt, e1 * den + e2, ms
        if not buffer:
            out = torch.stack(outs, 1)
        return (out, num, den, mx) if ret_state else out

    name = "loop_rwkv4" + ("_upcast" if upcast else "") + ("" if raw else "_w") + f"_{keys}" + \
        ("_stack" if not buffer else "") + ("_state" if ret_state else "") + \
        (f"_given_{m_given}" if given else "" if start == -1e38 else "_start_inf" if start == -math.inf
         else "_start0") + (f"_broken_{broken}" if broken else "")
    expect = "scan" if T >= 6 and not broken and (given or start != 0.0) else ""
    return _case("scan", name, fn, [d, first, k, v, *state0], r, seed, triton, tag=tag, expect=expect)


SCAN_SPELLINGS = ((scan_loop, 4), (scan_loop_buffer, 1), (scan_loop_mamba, 2), (scan_loop_complex, 1), (scan_bidirectional, 1),
                  (scan_associative, 2), (scan_hop, 1), (scan_loop_rwkv4, 2))


# ======================================================================== generators

def _pick(r, table):
    total = sum(w for _, w in table)
    x = r.random() * total
    for fn, w in table:
        x -= w
        if x < 0:
            return fn
    return table[-1][0]


def _cases(table, rng: random.Random, n: int, triton: bool) -> Iterator[Case]:
    for _ in range(n):
        seed = rng.randrange(2 ** 31)
        r = random.Random(seed)
        yield _pick(r, table)(r, seed, triton)


def ssd_cases(rng: random.Random, n: int, triton: bool) -> Iterator[Case]:
    return _cases(SSD_SPELLINGS, rng, n, triton)


def scan_cases(rng: random.Random, n: int, triton: bool) -> Iterator[Case]:
    return _cases(SCAN_SPELLINGS, rng, n, triton)


def cases(rng: random.Random, n: int, triton: bool) -> Iterator[Case]:
    """ssd and scan cases, alternating."""
    a, b = ssd_cases(rng, (n + 1) // 2, triton), scan_cases(rng, n // 2, triton)
    for x in a:
        yield x
        y = next(b, None)
        if y is not None:
            yield y
