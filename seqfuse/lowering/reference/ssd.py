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


def _masked_exp(seg, causal):
    """exp(seg) where ``causal`` (s <= t), else 0: the mask goes on the exponent *before* exp (-inf
    above the diagonal), so the positive sums of the upper triangle are never exponentiated."""
    return torch.exp(torch.where(causal, seg, torch.full_like(seg, -torch.inf)))


class CumLogDecay:
    """Cumulative log-decays that keep a log-decay of -inf (exp(-inf) = 0: the state is reset, as a
    program's loop computes it) exact: the sum of the finite ones and the count of the -inf ones,
    so that a segment sum is -inf when a reset lies inside it instead of -inf - (-inf) = NaN."""

    def __init__(self, a, dim):
        neg = a == -torch.inf
        self.fin = torch.where(neg, torch.zeros((), dtype=a.dtype, device=a.device), a).cumsum(dim)
        self.cnt = neg.to(torch.int32).cumsum(dim)

    def map(self, f):
        out = CumLogDecay.__new__(CumLogDecay)
        out.fin, out.cnt = f(self.fin), f(self.cnt)
        return out

    def total(self):
        """the cumulative sums themselves (from the start)"""
        return torch.where(self.cnt > 0, -torch.inf, self.fin)

    def minus(self, other):
        """self - other: the sum of the log-decays after ``other``'s position up to ``self``'s"""
        return torch.where(self.cnt > other.cnt, -torch.inf, self.fin - other.fin)


def _heads_first(x, b, c, a):
    """(B, T, H, ·) -> (B, H, T, ·) contiguous, so that every contraction below is a batched
    matmul over (B, H[, K]) with no hidden copies; a (B, T, H) -> (B, H, T)."""
    x, b, c = (t.transpose(1, 2).contiguous() for t in (x, b, c))
    a = a.transpose(1, 2).contiguous() if a is not None else x.new_zeros(x.shape[:3])
    return x, b, c, a


def ssd_quadratic(x, b, c, a=None, d=None, h0=None, *, decay="scalar", chunk=64):
    """y = (L ∘ C·Bᵀ)·X over the whole sequence, L[t, s] = exp(a_{s+1} + … + a_t) for s <= t.
    Memory O(T²·H) (O(T²·H·N) for vector decay): the choice for short sequences."""
    x, b, c, a, h0, dtype = _prepare(x, b, c, a, d, h0, decay)
    vector = decay == "vector"
    x_skip = x                                 # (B, T, H, P), for the skip
    x, b, c, a = _heads_first(x, b, c, a)      # x (B, H, T, P); b, c (B, H, T, N); a (B, H, T[, N])
    T = x.shape[2]
    # 1. inclusive cumulative log-decay cum_t = a_0 + … + a_t, summed in fp64 so that the difference
    #    of two large sums keeps its digits (cast to the working dtype after step 2)
    #    (a log-decay of -inf, a reset, kept exact by CumLogDecay)
    cum = CumLogDecay(a.double(), 2)
    # 2. segment sums seg[t, s] = cum_t - cum_s = a_{s+1} + … + a_t; the mask (s <= t) on the exponent,
    #    then L = exp(seg): (B, H, T, S), or (B, H, T, S, N) for vector decay
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    seg = cum.map(lambda t: t[:, :, :, None]).minus(cum.map(lambda t: t[:, :, None, :])).to(x.dtype)
    if vector:
        L = _masked_exp(seg, causal[:, :, None])
        # 3. scores[t, s] = Σ_n c_t[n]·L[t, s, n]·b_s[n]  (the exponent per key dim, inside the contraction)
        scores = (c[:, :, :, None] * L * b[:, :, None, :]).sum(-1)
    else:
        L = _masked_exp(seg, causal)
        # 3. scores[t, s] = (c_t · b_s)·L[t, s]
        scores = (c @ b.transpose(-1, -2)) * L
    # 4. y_t = Σ_{s<=t} scores[t, s]·x_s                                    (B, H, T, P)
    y = scores @ x
    # 5. the final state: every input decayed to the end, w_s = exp(cum_{T-1} - cum_s) (<= 1 for decays)
    last = cum.map(lambda t: t[:, :, -1:])
    w = torch.exp(last.minus(cum).to(x.dtype))
    h = (x * w[..., None] if not vector else x).transpose(-1, -2) @ (b * w if vector else b)   # (B, H, P, N)
    # 6. the initial state decayed to every step: y_t += exp(cum_t)·(h0 · c_t); h += exp(cum_{T-1})·h0
    if h0 is not None:
        decay_t, decay_end = torch.exp(cum.total().to(x.dtype)), torch.exp(last.total().to(x.dtype))  # (B, H, T[, N]), (B, H, 1[, N])
        if vector:
            y = y + (c * decay_t) @ h0.transpose(-1, -2)
            h = h + h0 * decay_end
        else:
            y = y + (c @ h0.transpose(-1, -2)) * decay_t[..., None]
            h = h + h0 * decay_end[..., None]
    y = _skip(y.transpose(1, 2), x_skip, d)
    return y.to(dtype), h.to(dtype)


def _chunk_decays(As, vector):
    """The decays of the chunked algorithm from the chunked log-decays ``As`` (B, H, K, Q[, N]).

    The cumulative sums from each chunk's start are summed in fp64 and every exponent (a difference
    of two of them) is taken there too, then cast to the working dtype before exp: with strong
    decays |cum| grows to hundreds inside a chunk and an fp32 difference cum_l - cum_s would lose
    the digits of a short segment (the program's stable segsum sums (s, l] directly).  A log-decay of
    -inf (a reset) is kept exact by CumLogDecay.  Returns (cum, last, L, w, E, chunk_decay)::

        cum[k, l] = a_{kQ} + … + a_{kQ+l} (a CumLogDecay, fp64)    last[k] = cum[k, Q-1]
        L[k, l, s] = exp(cum_l - cum_s) for s <= l, else 0   (B, H, K, L, S[, N])
        w[k, s] = exp(last - cum_s)   E[k, l] = exp(cum_l)   chunk_decay[k] = exp(last)  (B, H, K, 1[, N])
    """
    dtype = As.dtype
    Q = As.shape[3]
    cum = CumLogDecay(As.double(), 3)                 # (B, H, K, Q[, N])
    last = cum.map(lambda t: t[:, :, :, -1:])  # (B, H, K, 1[, N])
    causal = torch.ones(Q, Q, dtype=torch.bool, device=As.device).tril()
    if vector:
        seg = cum.map(lambda t: t[:, :, :, :, None]).minus(cum.map(lambda t: t[:, :, :, None, :]))
        L = _masked_exp(seg.to(dtype), causal[:, :, None])
    else:
        seg = cum.map(lambda t: t[..., :, None]).minus(cum.map(lambda t: t[..., None, :]))
        L = _masked_exp(seg.to(dtype), causal)
    w = torch.exp(last.minus(cum).to(dtype))
    E = torch.exp(cum.total().to(dtype))
    chunk_decay = torch.exp(last.total().to(dtype))
    return cum, last, L, w, E, chunk_decay


def ssd_chunked(x, b, c, a=None, d=None, h0=None, *, decay="scalar", chunk=64):
    """The chunked (Mamba-2 SSD) algorithm: the quadratic form inside chunks of ``chunk`` steps,
    the recurrence between them.  Matmul-bound, O(T·Q) memory (O(T·Q·N) for vector decay); every
    exponent is a sum of log-decays relative to a chunk start, so it stays stable for long
    sequences."""
    x, b, c, a, h0, dtype = _prepare(x, b, c, a, d, h0, decay)
    vector = decay == "vector"
    x_skip = x                                 # (B, T, H, P), for the skip
    x, b, c, a = _heads_first(x, b, c, a)      # x (B, H, T, P); b, c (B, H, T, N); a (B, H, T[, N])
    B, H, T, P = x.shape
    N = b.shape[-1]
    if T == 0:
        h = h0 if h0 is not None else x.new_zeros(B, H, P, N)
        return x_skip.new_zeros(B, 0, H, P, dtype=dtype), h.to(dtype)
    Q = max(1, min(int(chunk), T))
    K = -(-T // Q)

    # 1. pad T to K·Q with steps that change nothing (x = b = c = 0, a = 0) and split it into
    #    chunks: (B, H, K, Q, ·) with k the chunk and l (query) / s (key) the step inside it
    def split(t):
        pad = K * Q - T
        if pad:
            t = torch.cat([t, t.new_zeros(B, H, pad, *t.shape[3:])], dim=2)
        return t.reshape(B, H, K, Q, *t.shape[3:])
    xs, bs, cs, As = split(x), split(b), split(c), split(a)
    # 2. cumulative log-decay from each chunk's start, cum[k, l] = a_{kQ} + … + a_{kQ+l}, and the
    #    decay over a whole chunk, last[k] = cum[k, Q-1]; summed in fp64 (see _chunk_decays)
    cum, last, L, w, E, chunk_decay = _chunk_decays(As, vector)
    # 3. inside each chunk, the quadratic form: y_diag[l] = Σ_{s<=l} (c_l · L[l, s] · b_s)·x_s with
    #    L[l, s] = exp(cum_l - cum_s), masked on the exponent
    if vector:  # the pairwise exponent on (Q, Q, N) tiles
        scores = (cs[:, :, :, :, None] * L * bs[:, :, :, None, :]).sum(-1)      # (B, H, K, L, S)
    else:
        scores = (cs @ bs.transpose(-1, -2)) * L                                # (B, H, K, L, S)
    y_diag = scores @ xs                                                        # (B, H, K, L, P)
    # 4. what each chunk adds to the state, decayed to the chunk's end, w_s = exp(last - cum_s):
    #    states[k] = Σ_s x_s ⊗ (w_s·b_s)                                          (B, H, K, P, N)
    states = xs.transpose(-1, -2) @ (bs * w) if vector else (xs * w[..., None]).transpose(-1, -2) @ bs
    # 5. pass the state across chunks (the one loop): S_in[k] enters chunk k, S_in[0] = h0
    S = h0 if h0 is not None else x.new_zeros(B, H, P, N)
    entering = []
    for k in range(K):
        entering.append(S)
        g = chunk_decay[:, :, k] if vector else chunk_decay[:, :, k, :, None]
        S = g * S + states[:, :, k]
    S_in = torch.stack(entering, dim=2)        # (B, H, K, P, N)
    # 6. the entering state read out inside the chunk: y_off[l] = exp(cum_l)·(S_in · c_l)
    if vector:
        y_off = (cs * E) @ S_in.transpose(-1, -2)
    else:
        y_off = (cs @ S_in.transpose(-1, -2)) * E[..., None]
    # 7. y = intra + inter, without the padding, back to (B, T, H, P); the skip
    y = (y_diag + y_off).reshape(B, H, K * Q, P)[:, :, :T].transpose(1, 2)
    y = _skip(y, x_skip, d)
    return y.to(dtype), S.to(dtype)


def _reduce_to(grad, like):
    """The gradient of an operand that ``_prepare`` broadcast, summed back to its shape and dtype."""
    if grad is None or like is None:
        return None
    return grad.sum_to_size(like.shape).to(like.dtype)


def ssd_chunked_backward(grad_y, grad_h, x, b, c, a=None, d=None, h0=None, *, decay="scalar", chunk=64,
                         needs=(True,) * 6):
    """Gradients (dx, db, dc, da, dd, dh0) of ``ssd_chunked`` given those of y (B, T, H, P) and of
    the final state (B, H, P, N), each in its operand's shape and dtype (None where ``needs`` is
    False or the operand is absent).  The forward's steps in reverse order; the pass over chunks
    becomes the adjoint recurrence dS_in[k] = readout_k + exp(last_k)·dS_in[k+1]."""
    operands = (x, b, c, a, d, h0)
    x_, b_, c_, a_, h0_, _ = _prepare(x, b, c, a, d, h0, decay)
    vector = decay == "vector"
    B, T, H, P = x_.shape
    N = b_.shape[-1]
    dy = grad_y.to(x_.dtype).expand(B, T, H, P)
    xs, bs, cs, As = _heads_first(x_, b_, c_, a_)
    dys = dy.transpose(1, 2).contiguous()
    Q = max(1, min(int(chunk), max(T, 1)))
    K = -(-T // Q)

    def split(t):
        pad = K * Q - T
        if pad:
            t = torch.cat([t, t.new_zeros(B, H, pad, *t.shape[3:])], dim=2)
        return t.reshape(B, H, K, Q, *t.shape[3:])
    xs, bs, cs, As, dys = (split(t) for t in (xs, bs, cs, As, dys))
    # forward steps 2-6 again (the cheap parts; nothing (T, T)-sized is kept)
    _, _, L, w, E, chunk_decay = _chunk_decays(As, vector)
    if vector:
        scores = (cs[:, :, :, :, None] * L * bs[:, :, :, None, :]).sum(-1)
        states = xs.transpose(-1, -2) @ (bs * w)
    else:
        G = cs @ bs.transpose(-1, -2)
        scores = G * L
        states = (xs * w[..., None]).transpose(-1, -2) @ bs
    S = h0_ if h0_ is not None else x_.new_zeros(B, H, P, N)
    entering = []
    for k in range(K):
        entering.append(S)
        g = chunk_decay[:, :, k] if vector else chunk_decay[:, :, k, :, None]
        S = g * S + states[:, :, k]
    S_in = torch.stack(entering, dim=2)        # (B, H, K, P, N)

    # 6'. the carried state's readout, y_off = (c ⊙ E)·S_inᵀ (vector) or (c·S_inᵀ) ⊙ E (scalar)
    if vector:
        dcE = dys @ S_in                                          # (B, H, K, Q, N)
        dS_read = dys.transpose(-1, -2) @ (cs * E)                # (B, H, K, P, N)
        dcs = dcE * E
        dcum = dcE * cs * E
    else:
        Z = cs @ S_in.transpose(-1, -2)                           # (B, H, K, Q, P)
        dZ = dys * E[..., None]
        dcs = dZ @ S_in
        dS_read = dZ.transpose(-1, -2) @ cs
        dcum = (dys * Z).sum(-1) * E
    # the log-decay gradient gathers three kinds of terms (da_t for t inside chunk k):
    #   dcum_l, the gradient of cum_l itself (E = exp(cum_l)): Σ_{l>=t} dcum_l
    #   dlast, the gradient of last (chunk_decay):               dlast, at every t
    #   the gradients of the differences last - cum_s (w) and cum_l - cum_s (L), which depend on
    #   a_t for s < t (<= l): summed over exactly those (s, l) below, never as a difference of two
    #   cumulative sums (with strong decays they are large and cancel to a small result)
    # 3'. inside the chunks, y_diag = scores·x
    dscores = dys @ xs.transpose(-1, -2)                          # (B, H, K, L, S)
    dxs = scores.transpose(-1, -2) @ dys
    if vector:
        T1 = dscores[..., None] * L                               # (B, H, K, L, S, N)
        dcs = dcs + (T1 * bs[:, :, :, None, :]).sum(-2)
        dbs = (T1 * cs[:, :, :, :, None]).sum(-3)
        dseg = T1 * cs[:, :, :, :, None] * bs[:, :, :, None, :]
    else:
        dG = dscores * L
        dcs = dcs + dG @ bs
        dbs = dG.transpose(-1, -2) @ cs
        dseg = dscores * G * L                                    # zero above the diagonal (L = 0 there)
    # seg[l, s] = a_{s+1} + … + a_l: da_t += Σ_{l>=t} Σ_{s<t} dseg[l, s] (exclusive prefix over s,
    # then the rows l >= t), in fp64 so that the sum of a whole tile keeps the small terms' digits
    dseg = dseg.double()
    if vector:
        dseg = dseg.movedim(-1, 3)                                # (B, H, K, N, L, S)
    before = dseg.cumsum(-1) - dseg                               # [l, t] = Σ_{s<t} dseg[l, s]
    rows = torch.ones(Q, Q, dtype=torch.bool, device=x_.device).tril()   # [l, t]: l >= t
    dA_seg = torch.where(rows, before, torch.zeros((), dtype=before.dtype, device=before.device)).sum(-2)
    dA_seg = dA_seg.movedim(3, -1) if vector else dA_seg          # (B, H, K, Q[, N])
    # 5'. the pass over chunks, backwards: dS enters chunk k+1; grad_h is the state after the last
    dS = grad_h.to(x_.dtype).expand(B, H, P, N)
    dstates, dlast_decay = [None] * K, [None] * K
    for k in reversed(range(K)):
        dstates[k] = dS
        g = chunk_decay[:, :, k] if vector else chunk_decay[:, :, k, :, None]
        dlast_decay[k] = (dS * S_in[:, :, k]).sum(-2, keepdim=True) if vector else \
            (dS * S_in[:, :, k]).sum((-1, -2))[..., None]
        dS = dS_read[:, :, k] + g * dS
    dh0 = dS
    dstates = torch.stack(dstates, dim=2)                         # (B, H, K, P, N)
    dlast = torch.stack(dlast_decay, dim=2) * chunk_decay         # (B, H, K, 1[, N])
    # 4'. the chunk states, states = xᵀ·(b ⊙ w) (vector) or (x ⊙ w)ᵀ·b (scalar)
    if vector:
        bw = bs * w
        dxs = dxs + bw @ dstates.transpose(-1, -2)
        dbw = xs @ dstates                                        # (B, H, K, Q, N)
        dbs = dbs + dbw * w
        dw = dbw * bs
    else:
        dxw = bs @ dstates.transpose(-1, -2)                      # (B, H, K, Q, P)
        dbs = dbs + (xs * w[..., None]) @ dstates
        dxs = dxs + dxw * w[..., None]
        dw = (dxw * xs).sum(-1)
    # w_s = exp(a_{s+1} + … + a_{Q-1}): da_t += Σ_{s<t} dw_s·w_s (an exclusive prefix sum)
    dww = (dw * w).double()
    dA_w = dww.cumsum(3) - dww
    # 2'. last = cum[Q-1]; cum = cumsum(a): da_t = Σ_{l>=t} dcum_l + dlast + the differences' terms
    dA = dcum.double().flip(3).cumsum(3).flip(3) + dlast.double() + dA_w + dA_seg
    dA = dA.to(dcum.dtype)

    # 1'. unpad, back to (B, T, H, ·); the skip
    def unsplit(t):
        return t.reshape(B, H, K * Q, *t.shape[4:])[:, :, :T].transpose(1, 2)
    dx, db, dc, da = unsplit(dxs), unsplit(dbs), unsplit(dcs), unsplit(dA)
    dd = None
    if d is not None:
        dd_full = (dy * x_).sum((0, 1))                           # (H, P)
        dd = dd_full.sum(-1) if d.dim() == 1 else dd_full
        dx = dx + dy * (d.to(dx.dtype)[:, None] if d.dim() == 1 else d.to(dx.dtype))
    grads = (dx, db, dc, da if a is not None else None, dd, dh0 if h0 is not None else None)
    return tuple(_reduce_to(g, t) if n else None for g, t, n in zip(grads, operands, needs))


def ssd_reference(x, b, c, a=None, d=None, h0=None, *, decay="scalar", chunk=64, algorithm="chunked"):
    """(y, h) of seqfuse.ssd computed by ``algorithm`` ("recurrent", "quadratic" or "chunked")."""
    fn = _BY_NAME.get(algorithm)
    if fn is None:
        raise ValueError(f"seqfuse.ssd: algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    return fn(x, b, c, a, d, h0, decay=decay, chunk=chunk)


_BY_NAME = {"recurrent": ssd_recurrent, "quadratic": ssd_quadratic, "chunked": ssd_chunked}
