"""Reference implementations of seqfuse.delta: the eager fallback and the test oracle.

The delta rule (DeltaNet, Gated DeltaNet, KDA), per batch b and head h, with the state S_t a
(K, V) matrix (see seqfuse.ir.ops.Delta)::

    S_t = α_t ⊙ S_{t-1}                                   α_t = exp(g_t): none / per head / per key dim
    S_t = S_t + k_t ⊗ β_t (v_t − S_tᵀ k_t)                 the delta-rule correction and write
        = (I − β_t k_t k_tᵀ) · diag(α_t) · S_{t-1} + β_t k_t ⊗ v_t
    y_t = scale · S_tᵀ q_t                                 S_{-1} = h0, or 0

With a read key p (Comba, GDN-2) the correction reads the state with p: u_t = β_t (v_t − S_tᵀ p_t), and
S_t = (I − β_t k_t p_tᵀ) · diag(α_t) · S_{t-1} + β_t k_t ⊗ v_t; p = None reads with k.

Shapes: q, k (B, T, H, K); v (B, T, H, V); beta (B, T, H); g (B, T, H) for gate="scalar",
(B, T, H, K) for gate="vector" (a log-decay per key dim, multiplying the rows of S), None for
gate="none"; h0 (B, H, K, V); p (B, T, H, K).  Every algorithm returns (y (B, T, H, V), h (B, H, K, V)) in the
promoted dtype of the operands, accumulating in fp32 (fp64 stays fp64).

Einsum dims: b batch, h head, c / i / j position (in a chunk), n chunk, k key dim, v value dim.
"""
from __future__ import annotations

import torch

from seqfuse.lowering.reference.ssd import CumLogDecay

ALGORITHMS = ("recurrent", "chunked")
GATES = ("none", "scalar", "vector")


def check_delta_args(q, k, v, beta, g, h0, gate: str, p=None) -> None:
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
    if p is not None and tuple(p.shape) != tuple(k.shape):
        raise ValueError(f"seqfuse.delta: the read key p must have k's shape (B, T, H, K) = {tuple(k.shape)}, "
                         f"got {tuple(p.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v), ("beta", beta), ("g", g), ("h0", h0), ("p", p)):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"seqfuse.delta: {name} must be real floating point, got {t.dtype}")


def out_dtype(q, k, v, beta, g=None, h0=None, p=None) -> torch.dtype:
    """The dtype of y and h: the promoted dtype of every given operand."""
    dtype = q.dtype
    for t in (k, v, beta, g, h0, p):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _prepare(q, k, v, beta, g, h0, gate, p):
    check_delta_args(q, k, v, beta, g, h0, gate, p)
    dtype = out_dtype(q, k, v, beta, g, h0, p)
    acc = torch.promote_types(dtype, torch.float32)   # fp32 accumulation, fp64 stays fp64
    cast = lambda t: None if t is None else t.to(acc)  # noqa: E731
    return cast(q), cast(k), cast(v), cast(beta), cast(g), cast(h0), cast(p if p is not None else k), dtype


def delta_recurrent(q, k, v, beta, g=None, h0=None, *, gate="scalar", scale=1.0, chunk=64, p=None):
    """The recurrence step by step: the oracle, and the algorithm of short sequences."""
    q, k, v, beta, g, h0, p, dtype = _prepare(q, k, v, beta, g, h0, gate, p)
    B, T, H, K = k.shape
    V = v.shape[-1]
    S = h0.clone() if h0 is not None else q.new_zeros(B, H, K, V)
    ys = []
    for t in range(T):
        # 1. decay: α_t = exp(g_t), one factor per head or one per key dim (a row of S)
        if gate == "scalar":
            S = S * g[:, t].exp()[:, :, None, None]
        elif gate == "vector":
            S = S * g[:, t].exp()[:, :, :, None]
        # 2. the delta-rule correction: u_t = β_t (v_t − S_tᵀ p_t)   (p = k without a read key)
        k_t = k[:, t]
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, p[:, t]))
        # 3. the write: S_t += k_t ⊗ u_t
        S = S + k_t[:, :, :, None] * u[:, :, None, :]
        # 4. the readout: y_t = scale · S_tᵀ q_t
        ys.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]) * scale)
    y = torch.stack(ys, dim=1) if ys else v.new_zeros(B, 0, H, V)
    return y.to(dtype), S.to(dtype)


def delta_chunked(q, k, v, beta, g=None, h0=None, *, gate="scalar", scale=1.0, chunk=64, p=None):
    """The chunked WY / UT algorithm (DeltaNet, Gated DeltaNet papers): within a chunk of C steps the
    C corrections u_i solve one unit lower-triangular system, the rest is batched matmuls; one pass over
    the chunks carries the state.  With γ_i = g_0 + … + g_i inside a chunk (per key dim for a vector gate)
    and S0 the state entering it::

        (I + A) U = β ⊙ V − (β e^γ ⊙ P) S0        A[i, j] = β_i Σ_k p_i k_j e^{γ_i − γ_j}   (j < i)
        y_i = S0ᵀ (e^{γ_i} ⊙ q_i) + Σ_{j ≤ i} (Σ_k q_i k_j e^{γ_i − γ_j}) u_j
        S_C = e^{γ_C} ⊙ S0 + Σ_j (e^{γ_C − γ_j} ⊙ k_j) ⊗ u_j

    Every exponent is a difference γ_i − γ_j with j ≤ i (masked to -inf above the diagonal before exp),
    or relative to the chunk start, so strong decays never overflow.  P is the read key (K without one)."""
    q, k, v, beta, g, h0, p, dtype = _prepare(q, k, v, beta, g, h0, gate, p)
    B, T, H, K = k.shape
    V = v.shape[-1]
    C = max(1, min(int(chunk), T)) if T else 1
    pad = (-T) % C
    N = (T + pad) // C

    def chunks(x):  # (B, T, H, *) -> (B, H, N, C, *), zero-padded: a padded step leaves the state alone
        x = x.transpose(1, 2)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
        return x.reshape(B, H, N, C, *x.shape[3:])

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


def delta_reference(q, k, v, beta, g=None, h0=None, *, gate="scalar", scale=1.0, chunk=64, algorithm="chunked",
                    p=None):
    """(y, h) of seqfuse.delta with the named algorithm ("recurrent" or "chunked"); p: the read key."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"seqfuse.delta: algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    fn = delta_recurrent if algorithm == "recurrent" else delta_chunked
    return fn(q, k, v, beta, g, h0, gate=gate, scale=scale, chunk=chunk, p=p)
