"""Reference implementations of seqfuse.delta: the eager fallback and the test oracle.

The delta rule (DeltaNet, Gated DeltaNet, KDA), per batch b and head h, with the state S_t a
(K, V) matrix (see seqfuse.ir.ops.Delta)::

    S_t = α_t ⊙ S_{t-1}                                   α_t = exp(g_t): none / per head / per key dim
    S_t = S_t + k_t ⊗ β_t (v_t − S_tᵀ k_t)                 the delta-rule correction and write
        = (I − β_t k_t k_tᵀ) · diag(α_t) · S_{t-1} + β_t k_t ⊗ v_t
    y_t = scale · S_tᵀ q_t                                 S_{-1} = h0, or 0

With a read key p (Comba, GDN-2) the correction reads the state with p: u_t = β_t (v_t − S_tᵀ p_t), and
S_t = (I − β_t k_t p_tᵀ) · diag(α_t) · S_{t-1} + β_t k_t ⊗ v_t; p = None reads with k.  With an erase key e
(IPLR, DPLR, RWKV-7) the correction writes along e instead of k, and with read="previous" it reads the
state before this step's decay (DPLR, RWKV-7); R_t is α_t ⊙ S_{t-1} ("decayed") or S_{t-1} ("previous")::

    S_t = α_t ⊙ S_{t-1} + β_t k_t ⊗ v_t − β_t e_t ⊗ (R_tᵀ p_t)      = (diag(α_t) − β_t e_t p_tᵀ [diag(α_t)]) S_{t-1} + …

Shapes: q, k (B, T, H, K); v (B, T, H, V); beta (B, T, H); g (B, T, H) for gate="scalar",
(B, T, H, K) for gate="vector" (a log-decay per key dim, multiplying the rows of S), None for
gate="none"; h0 (B, H, K, V); p, e (B, T, H, K).  Every algorithm returns (y (B, T, H, V), h (B, H, K, V)) in the
promoted dtype of the operands, accumulating in fp32 (fp64 stays fp64).

Einsum dims: b batch, h head, c / i / j position (in a chunk), n chunk, k key dim, v value dim.
"""
from __future__ import annotations

import torch

from seqfuse.lowering.reference.ssd import CumLogDecay

ALGORITHMS = ("recurrent", "chunked")
GATES = ("none", "scalar", "vector")
READS = ("decayed", "previous")


def check_delta_args(q, k, v, beta, g, h0, gate: str, p=None, e=None, read="decayed") -> None:
    """Raise ValueError naming the argument whose shape or dtype does not fit the delta contract."""
    if gate not in GATES:
        raise ValueError(f"seqfuse.delta: gate must be one of {GATES}, got {gate!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"seqfuse.delta: {name} must be (B, T, H, {'V' if name == 'v' else 'K'}), "
                             f"got shape {tuple(t.shape)}")
    if tuple(q.shape) != tuple(k.shape):
        raise ValueError(f"seqfuse.delta: q and k must have the same shape (B, T, H, K), got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    B, T, H, K = k.shape
    if tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"seqfuse.delta: v must be (B, T, H, V) = ({B}, {T}, {H}, V), got {tuple(v.shape)}")
    if tuple(beta.shape) != (B, T, H):
        raise ValueError(f"seqfuse.delta: beta must be (B, T, H) = {(B, T, H)}, got {tuple(beta.shape)}")
    want = {"none": None, "scalar": (B, T, H), "vector": (B, T, H, K)}[gate]
    got = None if g is None else tuple(g.shape)
    if got != want:
        raise ValueError(f"seqfuse.delta: gate={gate!r} needs g = {want}, got {got}")
    if h0 is not None and tuple(h0.shape) != (B, H, K, v.shape[3]):
        raise ValueError(f"seqfuse.delta: h0 must be (B, H, K, V) = {(B, H, K, v.shape[3])}, "
                         f"got {tuple(h0.shape)}")
    for name, t in (("read key p", p), ("erase key e", e)):
        if t is not None and tuple(t.shape) != tuple(k.shape):
            raise ValueError(f"seqfuse.delta: the {name} must have k's shape (B, T, H, K) = {tuple(k.shape)}, "
                             f"got {tuple(t.shape)}")
    if read not in READS:
        raise ValueError(f"seqfuse.delta: read must be one of {READS}, got {read!r}")
    for name, t in (("q", q), ("k", k), ("v", v), ("beta", beta), ("g", g), ("h0", h0), ("p", p), ("e", e)):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"seqfuse.delta: {name} must be real floating point, got {t.dtype}")


def out_dtype(q, k, v, beta, g=None, h0=None, p=None, e=None) -> torch.dtype:
    """The dtype of y and h: the promoted dtype of every given operand."""
    dtype = q.dtype
    for t in (k, v, beta, g, h0, p, e):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _prepare(q, k, v, beta, g, h0, gate, p, e=None, read="decayed"):
    check_delta_args(q, k, v, beta, g, h0, gate, p, e, read)
    dtype = out_dtype(q, k, v, beta, g, h0, p, e)
    acc = torch.promote_types(dtype, torch.float32)   # fp32 accumulation, fp64 stays fp64
    cast = lambda t: None if t is None else t.to(acc)  # noqa: E731
    return cast(q), cast(k), cast(v), cast(beta), cast(g), cast(h0), cast(p if p is not None else k), cast(e), dtype


def _chunking(k, chunk):
    """(C, N, chunks) for chunks of ``chunk`` steps (at most T) over k's (B, T, H, K) sequence: ``chunks(x)``
    lays a (B, T, H, *) operand out as (B, H, N, C, *), zero-padded (a padded step leaves the state alone)."""
    B, T, H, _ = k.shape
    C = max(1, min(int(chunk), T)) if T else 1
    pad = (-T) % C
    N = (T + pad) // C

    def chunks(x):
        x = x.transpose(1, 2)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
        return x.reshape(B, H, N, C, *x.shape[3:])
    return C, N, chunks


def delta_recurrent(q, k, v, beta, g=None, h0=None, *, gate="scalar", scale=1.0, chunk=64, p=None, e=None,
                    read="decayed"):
    """The recurrence step by step: the oracle, and the algorithm of short sequences."""
    q, k, v, beta, g, h0, p, e, dtype = _prepare(q, k, v, beta, g, h0, gate, p, e, read)
    B, T, H, K = k.shape
    V = v.shape[-1]
    S = h0.clone() if h0 is not None else q.new_zeros(B, H, K, V)
    ys = []
    for t in range(T):
        prev = S
        # 1. decay: α_t = exp(g_t), one factor per head or one per key dim (a row of S)
        if gate == "scalar":
            S = S * g[:, t].exp()[:, :, None, None]
        elif gate == "vector":
            S = S * g[:, t].exp()[:, :, :, None]
        # 2. the correction read: c_t = R_tᵀ p_t, R_t the decayed state (or the previous one)
        k_t = k[:, t]
        c = torch.einsum("bhkv,bhk->bhv", S if read == "decayed" else prev, p[:, t])
        if e is None:
            # 3. the delta rule's write: S_t += k_t ⊗ β_t (v_t − c_t)   (p = k without a read key)
            u = beta[:, t, :, None] * (v[:, t] - c)
            S = S + k_t[:, :, :, None] * u[:, :, None, :]
        else:
            # 3. the input along k_t, the correction along the erase key e_t
            b = beta[:, t, :, None, None]
            S = S + b * (k_t[:, :, :, None] * v[:, t, :, None, :] - e[:, t, :, :, None] * c[:, :, None, :])
        # 4. the readout: y_t = scale · S_tᵀ q_t
        ys.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]) * scale)
    y = torch.stack(ys, dim=1) if ys else v.new_zeros(B, 0, H, V)
    return y.to(dtype), S.to(dtype)


def delta_chunked(q, k, v, beta, g=None, h0=None, *, gate="scalar", scale=1.0, chunk=64, p=None, e=None,
                  read="decayed"):
    """The chunked WY / UT algorithm (DeltaNet, Gated DeltaNet papers): within a chunk of C steps the
    C corrections u_i solve one unit lower-triangular system, the rest is batched matmuls; one pass over
    the chunks carries the state.  With γ_i = g_0 + … + g_i inside a chunk (per key dim for a vector gate)
    and S0 the state entering it::

        (I + A) U = β ⊙ V − (β e^γ ⊙ P) S0        A[i, j] = β_i Σ_k p_i k_j e^{γ_i − γ_j}   (j < i)
        y_i = S0ᵀ (e^{γ_i} ⊙ q_i) + Σ_{j ≤ i} (Σ_k q_i k_j e^{γ_i − γ_j}) u_j
        S_C = e^{γ_C} ⊙ S0 + Σ_j (e^{γ_C − γ_j} ⊙ k_j) ⊗ u_j

    Every exponent is a difference γ_i − γ_j with j ≤ i (masked to -inf above the diagonal before exp),
    or relative to the chunk start, so strong decays never overflow.  P is the read key (K without one).
    With an erase key or read="previous": :func:`_chunked_general`."""
    if e is not None or read != "decayed":
        return _chunked_general(q, k, v, beta, g, h0, gate=gate, scale=scale, chunk=chunk, p=p, e=e, read=read)
    q, k, v, beta, g, h0, p, _, dtype = _prepare(q, k, v, beta, g, h0, gate, p)
    B, T, H, K = k.shape
    V = v.shape[-1]
    C, N, chunks = _chunking(k, chunk)

    qc, kc, vc, bc = chunks(q * scale), chunks(k), chunks(v), chunks(beta)
    pc = kc if p is k else chunks(p)
    # 1. cumulative log-decays inside each chunk: γ (B, H, N, C) or (B, H, N, C, K); a log-decay of -inf
    #    (a reset) kept exact: every difference γ_i − γ_j is -inf when a reset lies in (j, i], never NaN
    cum = CumLogDecay(chunks(g) if gate != "none" else q.new_zeros(B, H, N, C), 3)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()     # j <= i
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)   # j < i
    # 2. the intra-chunk matrices: A (strict) and the readout scores QK (j <= i), decays included
    if gate == "vector":
        A = q.new_empty(B, H, N, C, C)
        QK = q.new_empty(B, H, N, C, C)
        for n in range(N):   # (C, C, K) exponent tile per chunk: bounded memory
            diff = cum.map(lambda t: t[:, :, n, :, None, :]).minus(cum.map(lambda t: t[:, :, n, None, :, :]))
            E = torch.where(causal[:, :, None], diff, float("-inf")).exp()   # (B, H, i, j, K)
            A[:, :, n] = torch.einsum("bhik,bhjk,bhijk->bhij", pc[:, :, n], kc[:, :, n], E)
            QK[:, :, n] = torch.einsum("bhik,bhjk,bhijk->bhij", qc[:, :, n], kc[:, :, n], E)
        A = A * strict
    else:
        diff = cum.map(lambda t: t[..., :, None]).minus(cum.map(lambda t: t[..., None, :]))
        L = torch.where(causal, diff, float("-inf")).exp()  # (B, H, N, i, j)
        A = torch.einsum("bhnik,bhnjk->bhnij", pc, kc) * L * strict
        QK = torch.einsum("bhnik,bhnjk->bhnij", qc, kc) * L
    A = A * bc[..., :, None]
    eye = torch.eye(C, dtype=A.dtype, device=A.device)
    # 3. the UT transform: U0 = (I + A)⁻¹ β V,  W = (I + A)⁻¹ (β e^γ ⊙ P)
    last = cum.map(lambda t: t[:, :, :, -1:])                      # γ_C: (B, H, N, 1[, K])
    gam, rest, last = cum.total(), last.minus(cum), last.total()
    if gate == "vector":
        eg, eg_rest, carry = gam.exp(), rest.exp(), last.exp().transpose(-1, -2)  # carry (B, H, N, K, 1)
    else:
        eg, eg_rest, carry = gam.exp()[..., None], rest.exp()[..., None], last.exp()[..., None]  # (.., 1, 1)
    U0 = torch.linalg.solve_triangular(eye + A, bc[..., None] * vc, upper=False, unitriangular=True)
    W = torch.linalg.solve_triangular(eye + A, bc[..., None] * eg * pc, upper=False, unitriangular=True)
    # 4. what the state entering a chunk contributes: read by e^γ ⊙ q, carried by e^{γ_C}, e^{γ_C − γ} ⊙ k
    q_dec, k_dec = qc * eg, kc * eg_rest
    # 5. one pass over the chunks carrying the state
    S = h0 if h0 is not None else q.new_zeros(B, H, K, V)
    ys = []
    for n in range(N):
        U = U0[:, :, n] - W[:, :, n] @ S
        ys.append(q_dec[:, :, n] @ S + QK[:, :, n] @ U)
        S = S * carry[:, :, n] + k_dec[:, :, n].transpose(-1, -2) @ U
    y = torch.stack(ys, dim=2).reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2) if N else v.new_zeros(B, 0, H, V)
    return y.to(dtype), S.to(dtype)


def _chunked_general(q, k, v, beta, g, h0, *, gate, scale, chunk, p, e, read):
    """The chunked form with an erase key e (k without one) and / or a read of the state before the step's
    decay.  The corrections c_i = R_iᵀ p_i of a chunk (R_i = e^{g_i} ⊙ S_{i-1}, or S_{i-1}) solve

        (I + A_e) C = A_k (β ⊙ V) + (e^{ρ} ⊙ P) S0      A_x[i, j] = β_j^{[x=e]} Σ_k p_i x_j e^{ρ_i − γ_j}  (j < i)

    with γ_i = g_0 + … + g_i and ρ_i = γ_i ("decayed") or γ_{i-1} ("previous", γ_{-1} = 0); then
    y_i = S0ᵀ(e^{γ_i} ⊙ q_i) + Σ_{j≤i} (q_i·(e^{γ_i−γ_j} ⊙ k_j)) β_j v_j − (q_i·(e^{γ_i−γ_j} ⊙ e_j)) β_j c_j and
    S_C = e^{γ_C} ⊙ S0 + Σ_j (e^{γ_C−γ_j} ⊙ k_j) ⊗ β_j v_j − (e^{γ_C−γ_j} ⊙ e_j) ⊗ β_j c_j.  e^{ρ_i − γ_j} for
    "previous" is the row i − 1 of e^{γ_i − γ_j} (the same exact differences, shifted: no -inf − -inf)."""
    q, k, v, beta, g, h0, p, e, dtype = _prepare(q, k, v, beta, g, h0, gate, p, e, read)
    e = k if e is None else e
    B, T, H, K = k.shape
    V = v.shape[-1]
    C, N, chunks = _chunking(k, chunk)

    qc, kc, vc, bc, pc, ec = chunks(q * scale), chunks(k), chunks(v), chunks(beta), chunks(p), chunks(e)
    gk = chunks(g) if gate != "none" else q.new_zeros(B, H, N, C)
    if gate != "vector":
        gk = gk[..., None].expand(B, H, N, C, K)       # one exponent per key dim: the same code for every gate
    cum = CumLogDecay(gk, 3)                                                # γ (B, H, N, C, K)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()    # j <= i
    diff = cum.map(lambda t: t[:, :, :, :, None, :]).minus(cum.map(lambda t: t[:, :, :, None, :, :]))
    E = torch.where(causal[:, :, None], diff, float("-inf")).exp()        # e^{γ_i − γ_j} (B, H, N, i, j, K)
    gam = cum.total()
    eg = gam.exp()                                                          # e^{γ_i}
    if read == "previous":   # e^{ρ_i − γ_j} = e^{γ_{i-1} − γ_j}: row i − 1; e^{ρ_i} = e^{γ_{i-1}}, 1 at i = 0
        Er = torch.cat([torch.zeros_like(E[:, :, :, :1]), E[:, :, :, :-1]], dim=3)
        er = torch.cat([torch.ones_like(eg[:, :, :, :1]), eg[:, :, :, :-1]], dim=3)
    else:
        Er, er = E, eg
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    Ae = torch.einsum("bhnik,bhnjk,bhnijk->bhnij", pc, ec * bc[..., None], Er) * strict
    Ak = torch.einsum("bhnik,bhnjk,bhnijk->bhnij", pc, kc, Er) * strict
    QK = torch.einsum("bhnik,bhnjk,bhnijk->bhnij", qc, kc, E)             # j <= i (E is masked)
    QE = torch.einsum("bhnik,bhnjk,bhnijk->bhnij", qc, ec, E)
    eye = torch.eye(C, dtype=Ae.dtype, device=Ae.device)
    bv = bc[..., None] * vc
    C0 = torch.linalg.solve_triangular(eye + Ae, Ak @ bv, upper=False, unitriangular=True)
    Wc = torch.linalg.solve_triangular(eye + Ae, er * pc, upper=False, unitriangular=True)
    last = cum.map(lambda t: t[:, :, :, -1:])
    rest = last.minus(cum).exp()                                            # e^{γ_C − γ_j} (B, H, N, C, K)
    carry = last.total().exp().transpose(-1, -2)                           # e^{γ_C} (B, H, N, K, 1)
    q_dec, k_dec, e_dec = qc * eg, kc * rest, ec * rest
    S = h0 if h0 is not None else q.new_zeros(B, H, K, V)
    ys = []
    for n in range(N):
        Cn = C0[:, :, n] + Wc[:, :, n] @ S                                  # the corrections (B, H, C, V)
        bcn = bc[:, :, n, :, None] * Cn
        ys.append(q_dec[:, :, n] @ S + QK[:, :, n] @ bv[:, :, n] - QE[:, :, n] @ bcn)
        S = S * carry[:, :, n] + k_dec[:, :, n].transpose(-1, -2) @ bv[:, :, n] - e_dec[:, :, n].transpose(-1, -2) @ bcn
    y = torch.stack(ys, dim=2).reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2) if N else v.new_zeros(B, 0, H, V)
    return y.to(dtype), S.to(dtype)


def delta_reference(q, k, v, beta, g=None, h0=None, *, gate="scalar", scale=1.0, chunk=64, algorithm="chunked",
                    p=None, e=None, read="decayed"):
    """(y, h) of seqfuse.delta with the named algorithm ("recurrent" or "chunked"); p: the read key, e: the
    erase key, read: which state the correction reads."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"seqfuse.delta: algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    fn = delta_recurrent if algorithm == "recurrent" else delta_chunked
    return fn(q, k, v, beta, g, h0, gate=gate, scale=scale, chunk=chunk, p=p, e=e, read=read)
