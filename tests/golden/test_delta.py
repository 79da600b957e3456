"""Delta-rule recurrences as the libraries write them (fla's naive recurrent DeltaNet / Gated DeltaNet /
KDA, transformers' Qwen3-Next torch path) compiled with seqfuse: each loop becomes one seqfuse.delta
and equals eager (outputs, final state, every gradient); updates that are not the delta rule are
near misses naming the term, and run unchanged."""
import pytest
import torch
import torch.nn.functional as F

import seqfuse

from delta_spellings import rwkv7_demo_seq, rwkv7_loop
from helpers import check_against_eager, check_nans_against_eager

fla_gdn = pytest.importorskip("fla.ops.gated_delta_rule.naive")
fla_kda = pytest.importorskip("fla.ops.kda.naive")
fla_delta = pytest.importorskip("fla.ops.delta_rule.naive")
qwen3_next = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")

#: transformers' torch path under the hub-kernel wrapper (which dispatches to fla's triton kernels)
torch_recurrent_gated_delta_rule = qwen3_next.torch_recurrent_gated_delta_rule.__wrapped__


def operands(B=2, T=7, H=3, K=4, V=5, gate="scalar", h0=True, HK=None):
    HK = HK or H
    q = torch.randn(B, T, HK, K)
    k = F.normalize(torch.randn(B, T, HK, K), dim=-1)
    v = torch.randn(B, T, H, V)
    beta = torch.rand(B, T, H)
    g = -torch.rand(B, T, H, K) if gate == "vector" else -torch.rand(B, T, H)
    s = torch.randn(B, H, K, V) if h0 else None
    return [x.requires_grad_() if x is not None else None for x in (q, k, v, beta, g, s)]


def only_delta(report, gate):
    assert report.count("delta") == 1, str(report)
    assert report.count("scan") == report.count("ssd") == 0, str(report)
    assert not [m for m in report.near_misses if m.kind in ("delta", "scan")], str(report)
    (ir,) = [r.ir for r in report.rewrites if r.kind == "delta"]
    assert f"gate={gate}" in ir, ir
    return ir


@pytest.mark.parametrize("algo", ["recurrent", "chunked"])
def test_fla_naive_recurrent_gated_delta_rule(algo, monkeypatch):
    # on CPU select picks the C kernel's recurrent algorithm; without it (a state too large for the kernel,
    # here faked) a long sequence gets the chunked WY form
    if algo == "chunked":
        import seqfuse.passes.select as select
        monkeypatch.setattr(select, "CPU_DELTA_MAX_D", 0)

    def fn(q, k, v, beta, g, h0):
        return fla_gdn.naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True)
    report = check_against_eager(fn, *operands(T=40))
    ir = only_delta(report, "scalar")
    assert "h0=%" in ir and f"algo={algo}" in ir, ir


def test_fla_gated_delta_rule_without_initial_state():
    def fn(q, k, v, beta, g):
        return fla_gdn.naive_recurrent_gated_delta_rule(q, k, v, beta, g, output_final_state=True)
    report = check_against_eager(fn, *operands(h0=False)[:5])
    assert "h0=" not in only_delta(report, "scalar")


def test_transformers_torch_recurrent_gated_delta_rule_with_l2norm_and_grouped_heads():
    # Qwen3-Next's decode path: 2 value heads per key head (repeat_interleave), q/k L2-normalized in fp32
    def fn(q, k, v, beta, g, h0):
        return torch_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                use_qk_l2norm_in_kernel=True)
    report = check_against_eager(fn, *operands(H=4, HK=2))
    only_delta(report, "scalar")


@pytest.mark.parametrize("T", [6, 20])
def test_fla_naive_recurrent_kda(T, monkeypatch):
    if T == 20:   # the chunked form of a vector gate (see above)
        import seqfuse.passes.select as select
        monkeypatch.setattr(select, "CPU_DELTA_MAX_D", 0)

    # Kimi Linear: a decay per key dim, β on the key side of the outer product, grouped value heads
    def fn(q, k, v, beta, g, h0):
        return fla_kda.naive_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    report = check_against_eager(fn, *operands(T=T, H=4, HK=2, gate="vector"))
    only_delta(report, "vector")


def test_fla_delta_rule_recurrence():
    # DeltaNet: no decay, (B, H, T, ·) layout, β broadcast by the program
    def fn(q, k, v, beta, h0):
        return fla_delta.delta_rule_recurrence(q, k, v, beta, initial_state=h0)
    q, k, v, beta, _, h0 = operands()
    t = lambda x: x.detach().transpose(1, 2).contiguous().requires_grad_()  # noqa: E731
    report = check_against_eager(fn, t(q), t(k), t(v), t(beta), h0)
    only_delta(report, "none")


# --- other spellings of the same math ------------------------------------------------------

def delta_rank1_terms(q, k, v, beta, g):
    """S·diag(α)·(I − β k kᵀ) + β v kᵀ written with the state laid (V, K), the correction and the input
    as separate terms, per-step outputs stacked."""
    B, T, H, K = k.shape
    S = q.new_zeros(B, H, v.shape[-1], K)
    ys = []
    for t in range(T):
        k_t, b_t = k[:, t], beta[:, t, :, None, None]
        S = S * torch.exp(g[:, t])[..., None, None]
        Sk = torch.einsum("bhvk,bhk->bhv", S, k_t)
        S = S - b_t * Sk[..., :, None] * k_t[..., None, :] + b_t * v[:, t, :, :, None] * k_t[..., None, :]
        ys.append(S @ q[:, t, :, :, None])
    return torch.stack(ys, dim=1)[..., 0], S


def test_value_by_key_state_with_separate_correction_and_input_terms():
    q, k, v, beta, g, _ = operands()
    report = check_against_eager(delta_rank1_terms, q, k, v, beta, g)
    only_delta(report, "scalar")


def sigmoid_gate_reversed(q, k, v, beta, a):
    """A sigmoid decay (a positive gate whose log is logsigmoid) and a loop run from the last step."""
    B, T, H, K = k.shape
    S = torch.zeros(B, H, K, v.shape[-1])
    o = torch.zeros_like(v)
    for t in reversed(range(T)):
        S = S * torch.sigmoid(a[:, t])[..., None, None]
        u = (v[:, t] - (S * k[:, t, ..., None]).sum(-2)) * beta[:, t, :, None]
        S = S + k[:, t, ..., None] * u[..., None, :]
        o[:, t] = (S * q[:, t, ..., None]).sum(-2)
    return o, S


def test_sigmoid_gate_and_reversed_loop():
    q, k, v, beta, g, _ = operands()
    report = check_against_eager(sigmoid_gate_reversed, q, k, v, beta, g.detach().neg().requires_grad_())
    only_delta(report, "scalar")


# --- near misses: not the delta rule, left as written ---------------------------------------

def delta_variant(q, k, v, beta, g, variant):
    B, T, H, K = k.shape
    S = torch.zeros(B, H, K, v.shape[-1])
    o = torch.zeros_like(v)
    for t in range(T):
        k_t, q_t, b_t = k[:, t], q[:, t], beta[:, t, :, None]
        prev = S
        S = S * g[:, t].exp()[..., None, None]
        kv = torch.einsum("bhkv,bhk->bhv", S, k_t)
        if variant == "tanh":          # a nonlinear correction
            u = torch.tanh(v[:, t] - kv) * b_t
        elif variant == "half_erase":  # the correction at half the input's strength: an erase key 0.5·k
            u = v[:, t] * b_t - kv * b_t * 0.5
        elif variant == "beta_squared":   # the correction with β², the input with β: no shared β
            u = v[:, t] * b_t - kv * b_t * b_t
        else:
            u = (v[:, t] - kv) * b_t
        if variant == "input_other_key":   # the correction erases along k, the input writes along q: e = k
            S = S + k_t[..., None] * (-kv * b_t)[..., None, :] + q_t[..., None] * (v[:, t] * b_t)[..., None, :]
        elif variant == "before_decay":    # the correction reads the state before the step's decay
            S = S + k_t[..., None] * (-torch.einsum("bhkv,bhk->bhv", prev, k_t) * b_t + v[:, t] * b_t)[..., None, :]
        else:
            write = q_t if variant == "read_key" else k_t   # reads with k, writes along q: k is the read key
            S = S + write[..., None] * u[..., None, :]
        if variant == "value_gate":    # a decay along the value axis
            S = S * g[:, t].exp()[..., None, None] * torch.linspace(0.5, 1.0, S.shape[-1])
        o[:, t] = torch.einsum("bhkv,bhk->bhv", S, q_t)
    return o, S


@pytest.mark.parametrize("variant,reason", [
    ("tanh", "applies aten.tanh"),
    ("beta_squared", "different write strengths"),
    ("value_gate", "value axis"),
])
def test_near_misses_name_the_term(variant, reason):
    q, k, v, beta, g, _ = operands()
    report = check_against_eager(lambda *a: delta_variant(*a, variant), q, k, v, beta, g)
    assert report.count("delta") == 0, str(report)
    reasons = [m.reason for m in report.near_misses if m.kind == "delta"]
    assert len(reasons) == 1 and reason in reasons[0], str(report)


# --- the chunked WY form --------------------------------------------------------------------

torch_chunk_gated_delta_rule = qwen3_next.torch_chunk_gated_delta_rule.__wrapped__


@pytest.mark.parametrize("T,h0,l2", [(20, True, True), (16, False, False)])   # padded to 5 chunks / 4 exact
def test_transformers_torch_chunk_gated_delta_rule(T, h0, l2):
    # Qwen3-Next's prefill / training path: the UT transform by triangular solves, a loop over chunks
    def fn(q, k, v, beta, g, *h):
        return torch_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=4, initial_state=h[0] if h else None,
                                            output_final_state=True, use_qk_l2norm_in_kernel=l2)
    ops = operands(T=T, H=4, HK=2, h0=h0)
    if not l2:   # without the normalization the keys must be small for the recurrence to stay bounded
        ops[1] = (ops[1].detach() * 0.5).requires_grad_()
    report = check_against_eager(fn, *[x for x in ops if x is not None])
    ir = only_delta(report, "scalar")
    assert ("h0=%" in ir) == h0, ir


@pytest.mark.parametrize("chunked", [True, False])
def test_a_minus_inf_gate_runs_the_chunked_program_as_written(chunked):
    # the chunked form decays by exp(γ_i - γ_j) of a cumulative sum: -inf - (-inf) = NaN after a -inf
    # log-decay, where the op resets the state exactly; it carries finite_only=true and refuses such a
    # call, and the graph runs as written (NaN positions, outputs and gradients the program's).  The
    # recurrent form multiplies by exp(g_t) step by step: exact in the program too, no mark, no fallback
    def fn(q, k, v, beta, g, h):
        if chunked:
            return torch_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=4, initial_state=h,
                                                output_final_state=True, use_qk_l2norm_in_kernel=True)
        return torch_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h, output_final_state=True,
                                                use_qk_l2norm_in_kernel=True)
    ops = operands(T=12, H=2)
    g = ops[4].detach().clone()
    g[1, 6, 0] = -torch.inf
    ops[4] = g.requires_grad_()
    report, _ = check_nans_against_eager(fn, ops, {})
    ir = only_delta(report, "scalar")
    assert ("finite_only=true" in ir) == chunked, ir
    assert sum(report.fallbacks.get("graph", {}).values()) == int(chunked), report.fallbacks
    assert bool(report.output[0].isnan().any()) == chunked


def chunk_variant(q, k, v, beta, g, variant):
    """torch_chunk_gated_delta_rule's body (chunk 4, no padding) with one piece changed."""
    B, T, H, K = k.shape
    C = 4
    q, k, v, beta, g = (x.transpose(1, 2).float() for x in (q, k, v, beta, g))
    q = q * K ** -0.5
    v_beta, k_beta = v * beta[..., None], k * beta[..., None]
    q, k, k_beta, v_beta = (x.reshape(B, H, -1, C, x.shape[-1]) for x in (q, k, k_beta, v_beta))
    g = g.reshape(B, H, -1, C).cumsum(-1)
    upper = torch.ones(C, C, dtype=torch.bool).triu(1 if variant != "mask" else 0)
    L = (g[..., :, None] - g[..., None, :]).masked_fill(upper, float("-inf")).exp()
    ut = (k_beta @ k.transpose(-1, -2)) * L
    new_values = torch.linalg.solve_triangular(ut, v_beta, upper=False, unitriangular=True)
    kd = k_beta * g.exp()[..., None] if variant != "no_decay" else k_beta
    k_cumdecay = torch.linalg.solve_triangular(ut, kd, upper=False, unitriangular=True)
    S = torch.zeros(B, H, K, v.shape[-1])
    out = torch.zeros_like(new_values)
    attn = (q @ k.transpose(-1, -2)) * L
    q = q * g.exp()[..., None]
    k = k * (g[..., -1:] - g).exp()[..., None]
    chunk_decay = g[..., -1].exp()[..., None, None]
    for i in range(T // C):
        v_new = new_values[:, :, i] - k_cumdecay[:, :, i] @ S
        out[:, :, i] = q[:, :, i] @ S + attn[:, :, i] @ v_new
        S = S * chunk_decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ v_new
    return out.reshape(B, H, T, -1).transpose(1, 2), S


@pytest.mark.parametrize("variant,reason", [
    ("mask", "keeps other positions than j <= i"),                    # the diagonal masked too
    ("no_decay", "decayed keys of the UT transform"),                 # kβ not decayed by e^γ
])
def test_chunked_near_misses_name_the_piece(variant, reason):
    q, k, v, beta, g, _ = operands(T=16)
    report = check_against_eager(lambda *a: chunk_variant(*a, variant), q, k, v, beta, g)
    assert report.count("delta") == 0, str(report)
    reasons = [m.reason for m in report.near_misses if m.kind == "delta"]
    assert len(reasons) == 1 and reason in reasons[0], str(report)


def test_chunked_spelling_of_the_listing_is_lifted():
    q, k, v, beta, g, _ = operands(T=16)
    report = check_against_eager(lambda *a: chunk_variant(*a, "none"), q, k, v, beta, g)
    only_delta(report, "scalar")


def test_chunked_without_the_final_state_is_one_op_over_every_chunk():
    # output_final_state=False: the last chunk's state update is dead, so the loop re-rolls over the chunks
    # before it; the last chunk is proven to be one more step of the loop and the op covers it too
    def fn(q, k, v, beta, g, h0):
        return torch_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=4, initial_state=h0,
                                            use_qk_l2norm_in_kernel=True)[0]
    report = check_against_eager(fn, *operands(T=18))
    only_delta(report, "scalar")


# --- fla's chunked naive functions: the UT inverse by forward substitution, pieces computed in the loop ----

@pytest.mark.parametrize("T,h0,final", [(14, True, True), (16, False, False),   # padded to 4 chunks / 4 exact
                                         (4, True, False)])                     # one chunk
def test_fla_naive_chunk_gated_delta_rule(T, h0, final):
    # fla builds (I + strictly_lower(kβ·kᵀ ⊙ L))⁻¹ by forward substitution written in place row by row, its
    # decay mask as tril(exp(tril(γ_i − γ_j))), and computes q ⊙ e^γ, the masked scores and the decayed write
    # key inside the loop over chunks
    def fn(q, k, v, beta, g, *s):
        o, S = fla_gdn.naive_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=4, initial_state=s[0] if s else None,
                                                    output_final_state=final)
        return (o, S) if final else o
    report = check_against_eager(fn, *[x for x in operands(T=T, h0=h0) if x is not None])
    ir = only_delta(report, "scalar")
    assert ("h0=%" in ir) == h0, ir


@pytest.mark.parametrize("T", [16, 4])
def test_fla_delta_rule_chunkwise(T):
    # DeltaNet's chunked form: no decay, (B, H, T, ·) layout, the forward substitution sums over whole rows
    # (the entries j >= i are the masked zeros), the intra-chunk scores masked in place in the loop
    def fn(q, k, v, beta):
        return fla_delta.delta_rule_chunkwise(q, k, v, beta, chunk_size=4)
    q, k, v, beta, _, _ = operands(T=T)
    t = lambda x: x.detach().transpose(1, 2).contiguous().requires_grad_()  # noqa: E731
    report = check_against_eager(fn, t(q), t(k), t(v), t(beta))
    only_delta(report, "none")


def forward_substitution_variant(q, k, v, beta, g, variant):
    """chunk_variant's program with the UT inverse built as transformers' export branch of
    torch_chunk_gated_delta_rule builds it: −tril(UT, −1), then each row updated from clones of the rows
    before it, then + I and two products."""
    B, T, H, K = k.shape
    C = 4
    q, k, v, beta, g = (x.transpose(1, 2).float() for x in (q, k, v, beta, g))
    q = q * K ** -0.5
    v_beta, k_beta = v * beta[..., None], k * beta[..., None]
    q, k, k_beta, v_beta = (x.reshape(B, H, -1, C, x.shape[-1]) for x in (q, k, k_beta, v_beta))
    g = g.reshape(B, H, -1, C).cumsum(-1)
    upper = torch.ones(C, C, dtype=torch.bool).triu(1)
    L = (g[..., :, None] - g[..., None, :]).masked_fill(upper, float("-inf")).exp()
    ut = -((k_beta @ k.transpose(-1, -2)) * L).tril(-1)
    for i in range(1, C):
        row = ut[..., i, :i].clone()
        sub = ut[..., :i, :i].clone()
        ut[..., i, :i] = row + (row.unsqueeze(-1) * sub).sum(-2) if variant != "sign" else \
            row - (row.unsqueeze(-1) * sub).sum(-2)
    ut = ut + torch.eye(C)
    new_values, k_cumdecay = ut @ v_beta, ut @ (k_beta * g.exp()[..., None])
    S = torch.zeros(B, H, K, v.shape[-1])
    out = torch.zeros_like(new_values)
    attn = (q @ k.transpose(-1, -2)) * L
    q = q * g.exp()[..., None]
    k = k * (g[..., -1:] - g).exp()[..., None]
    for i in range(T // C):
        v_new = new_values[:, :, i] - k_cumdecay[:, :, i] @ S
        out[:, :, i] = q[:, :, i] @ S + attn[:, :, i] @ v_new
        S = S * g[:, :, i, -1].exp()[..., None, None] + k[:, :, i].transpose(-1, -2) @ v_new
    return out.reshape(B, H, T, -1).transpose(1, 2), S


def test_forward_substitution_with_cloned_rows_is_lifted():
    report = check_against_eager(lambda *a: forward_substitution_variant(*a, "none"), *operands(T=16)[:5])
    only_delta(report, "scalar")


def test_forward_substitution_with_a_wrong_sign_is_a_near_miss():
    # row − Σ instead of row + Σ: not the inverse of the unit lower-triangular system
    report = check_against_eager(lambda *a: forward_substitution_variant(*a, "sign"), *operands(T=16)[:5],
                                 options={"downstream": "eager"})
    assert report.count("delta") == 0, str(report)
    reasons = [m.reason for m in report.near_misses if m.kind == "delta"]
    assert len(reasons) == 1 and "row 1 is not its old value plus a sum" in reasons[0], str(report)


# --- fla's neighbours of the delta rule: near misses naming the term, run unchanged --------------------------

def _comba(T=7):
    # Comba reads the state with p and writes with k: S' = α S − β k ⊗ (Sᵀ p) + β k ⊗ v
    comba = pytest.importorskip("fla.ops.comba.naive")
    q, k, v, beta, g, h0 = operands(T=T)
    p = F.normalize(torch.randn_like(k), dim=-1).requires_grad_()

    def fn(q, k, v, p, beta, g, h0):
        return comba.naive_recurrent_comba(q, k, v, p, beta, g, initial_state=h0, output_final_state=True)
    return fn, (q, k, v, p, beta, g, h0)


def _dplr():
    # DPLR: S' = S ⊙ e^{g} + β ⊗ (Sᵀ α) + k ⊗ v with the low-rank term read from the undecayed state and free α, β
    dplr = pytest.importorskip("fla.ops.generalized_delta_rule.dplr.naive")
    B, H, T, K, V = 2, 3, 6, 4, 5
    q, k = torch.randn(B, H, T, K), F.normalize(torch.randn(B, H, T, K), dim=-1)
    a, b = -F.normalize(torch.randn(B, H, T, K), dim=-1), F.normalize(torch.randn(B, H, T, K), dim=-1) * 0.5
    v, gk, h0 = torch.randn(B, H, T, V), -torch.rand(B, H, T, K), torch.randn(B, H, K, V)

    def fn(q, k, v, a, b, gk, h0):
        return dplr.dplr_recurrence(q, k, v, a, b, gk, initial_state=h0)
    return fn, tuple(x.requires_grad_() for x in (q, k, v, a, b, gk, h0))


def _ttt():
    # TTT-Linear: weights and bias carried together, updated by the gradient of a layer-normed reconstruction
    ttt = pytest.importorskip("fla.ops.ttt.naive")
    B, H, D, BT = 2, 3, 4, 2
    T = 3 * BT
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D) * 0.5, torch.randn(B, H, T, D)
    w, b, eta = torch.randn(H, D), torch.randn(H, D), torch.rand(B, H, T) * 0.1
    h0, hb0 = torch.randn(B, H, D, D) * 0.1, torch.randn(B, H, 1, D) * 0.1

    def fn(q, k, v, w, b, eta, h0, hb0):
        return ttt.ttt_linear(q.clone(), k, v, w, b, eta, 0.5, 1e-6, BT, h0, hb0, True)
    return fn, tuple(x.requires_grad_() for x in (q, k, v, w, b, eta, h0, hb0))


def _path_attention():
    # PaTH attention: a UT system over chunks of Householder vectors w, but the transformed scores go through a
    # softmax (fla's naive_path_attn): no linear recurrence
    path = pytest.importorskip("fla.ops.path_attn.naive")
    B, T, H, D = 1, 24, 2, 4
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, H, D), torch.randn(B, T, H, D)
    w, beta, g = F.normalize(torch.randn(B, T, H, D), dim=-1), torch.rand(B, T, H) * 2, -torch.rand(B, T, H)

    def fn(q, k, v, w, beta, g):
        return path.naive_path_attn(q, k, v, w, beta, g, scale=D ** -0.5, chunk_size=8)
    return fn, tuple(x.requires_grad_() for x in (q, k, v, w, beta, g))


def _iplr():
    # IPLR: S' = S + β ⊗ (Sᵀ α) + k ⊗ v, the low-rank term erasing along β, not along the written key k
    iplr = pytest.importorskip("fla.ops.generalized_delta_rule.iplr.naive")
    B, H, T, K, V = 2, 3, 6, 4, 5
    q, k = torch.randn(B, H, T, K), F.normalize(torch.randn(B, H, T, K), dim=-1)
    a = F.normalize(torch.randn(B, H, T, K), dim=-1)
    v, h0 = torch.randn(B, H, T, V), torch.randn(B, H, K, V)
    b = (a * torch.rand(B, H, T, 1)).detach()

    def fn(q, k, v, a, b, h0):
        return iplr.iplr_recurrence(q, k, v, -a, b, initial_state=h0)
    return fn, tuple(x.requires_grad_() for x in (q, k, v, a, b, h0))


@pytest.mark.parametrize("case,reason", [
    (_ttt, "the loop carries 2 values"),
    (_path_attention, "its scores go through a softmax"),
])
def test_ttt_path_are_near_misses_naming_the_term(case, reason):
    fn, args = case()
    report = check_against_eager(fn, *args)
    assert report.count("delta") == 0, str(report)
    reasons = [m.reason for m in report.near_misses if m.kind == "delta"]
    assert len(reasons) == 1 and reason in reasons[0], str(report)


# --- a read key: the correction reads the state with p, the writes use k (the op's optional p) ---------------

def _gdn2():
    # GDN-2: S' = (I − k (b ⊙ k)ᵀ) diag(e^g) S + k ⊗ (w ⊙ v): a vector decay, an erase gate b on the key axis and
    # a write gate w on the value axis; the read key is b ⊙ k, the values w ⊙ v, β = 1
    gdn2 = pytest.importorskip("fla.ops.gdn2.naive")
    q, k, v, _, g, h0 = operands(gate="vector")
    b, w = torch.rand_like(k).requires_grad_(), torch.rand_like(v).requires_grad_()

    def fn(q, k, v, g, b, w, h0):
        return gdn2.naive_recurrent_gdn2(q, k, v, g, b, w, initial_state=h0, output_final_state=True)
    return fn, (q, k, v, g, b, w, h0), "vector"


def _loop(variant):
    # the hand-written delta rule with one term changed (delta_variant)
    def case():
        q, k, v, beta, g, _ = operands()
        return (lambda *a: delta_variant(*a, variant)), (q, k, v, beta, g), "scalar"
    return case


def _comba_case():
    fn, args = _comba()
    return fn, args, "scalar"


def _iplr_case():
    fn, args = _iplr()
    return fn, args, "none"


def _dplr_case():
    fn, args = _dplr()
    return fn, args, "vector"


@pytest.mark.parametrize("case,operands_,read", [
    (_comba_case, "p=%", None),                     # reads with p, erases and writes along k
    (_gdn2, "p=%", None),                           # reads with b ⊙ k
    (_loop("read_key"), "p=%", None),               # reads with k, erases and writes along q
    (_loop("input_other_key"), "e=%", None),        # reads and erases with k, writes along q
    (_loop("half_erase"), "e=%", None),             # erases along 0.5·k
    (_loop("before_decay"), None, "read=previous"),  # reads the state before the step's decay
    (_iplr_case, "e=%", None),                      # reads with α, erases along β, writes along k
    (_dplr_case, "e=%", "read=previous"),           # IPLR with a decay per key channel, read before it
], ids=["fla_comba", "fla_gdn2", "loop_read_key", "loop_input_key", "loop_half_erase", "loop_before_decay",
        "fla_iplr", "fla_dplr"])
def test_a_generalized_correction_is_one_delta_op(case, operands_, read):
    # the op's read key p, erase key e and read="previous": every output and gradient equals eager's
    fn, args, gate = case()
    report = check_against_eager(fn, *args)
    ir = only_delta(report, gate)
    if operands_:
        assert operands_ in ir, ir
    assert ("read=previous" in ir) == (read is not None), ir


def _rwkv7_operands(T):
    B, H, N = 2, 3, 6
    r, w, k, v = (torch.randn(B, T, H, N) for _ in range(4))
    kk = F.normalize(torch.randn(B, T, H, N), dim=-1)
    a = torch.sigmoid(torch.randn(B, T, H, N))
    return [x.requires_grad_() for x in (r, w, k, v)], kk, a


@pytest.mark.parametrize("T,algo", [(12, None), (40, None), (40, "chunked")])
def test_rwkv7_reference_loop_is_one_delta_op(T, algo):
    # the RWKV-7 transition diag(w) − κ̂ (κ̂ ⊙ a)ᵀ read before the decay: p = −κ̂, e = κ̂ ⊙ a, read=previous; on
    # CPU the C kernel's step loop (select's choice) or, forced, the chunked form (the eager reference)
    (r, w, k, v), kk, a = _rwkv7_operands(T)
    kk.requires_grad_()

    def fn(r, w, k, v, kk):
        return rwkv7_loop(r, w, k, v, -kk, kk * a)
    seqfuse.reset_counters()
    report = check_against_eager(fn, r, w, k, v, kk, options={"algorithm": {"delta": algo}} if algo else None)
    ir = only_delta(report, "vector")
    assert "read=previous" in ir and "p=%" in ir and "e=%" in ir and f"algo={algo or 'recurrent'}" in ir, ir
    counts = seqfuse.counters()
    path = "eager" if algo else "cpu"
    assert counts["delta"][path] >= 1 and counts["delta_backward"][path] >= 1, counts


@pytest.mark.parametrize("T", [9, 30])
def test_rwkv7_with_the_key_matrix_formed_first_is_one_delta_op(T):
    # state @ (a ⊗ b): the key matrix is an outer product, a read inside the contraction, b written along the
    # key axis again: the same op as (state @ a) @ b
    (r, w, k, v), kk, a = _rwkv7_operands(T)
    kk.requires_grad_()
    report = check_against_eager(lambda r, w, k, v, kk: rwkv7_loop(r, w, k, v, -kk, kk * a, key_matrix=True),
                                 r, w, k, v, kk)
    ir = only_delta(report, "vector")
    assert "read=previous" in ir and "p=%" in ir and "e=%" in ir, ir


def _rwkv7_demo_operands(T, dtype):
    H, N = 2, 8
    r, w, k, v = (torch.randn(T, H * N, dtype=dtype) for _ in range(4))
    kk = F.normalize(torch.randn(T, H, N), dim=-1).view(T, H * N).to(dtype)
    a = torch.sigmoid(torch.randn(T, H * N)).to(dtype)
    return [x.requires_grad_() for x in (r, w, k, v, kk, a, 0.1 * torch.randn(H, N, N))]


def test_rwkv7_demo_sequence_mode_in_fp32_is_one_delta_op():
    # the demo's spelling with every row fp32 (the CPU fp32 strategy): its .float() casts are the values
    report = check_against_eager(rwkv7_demo_seq, *_rwkv7_demo_operands(12, torch.float32))
    ir = only_delta(report, "vector")
    assert "read=previous" in ir and "p=%" in ir and "e=%" in ir and "h0=%" in ir, ir


def test_rwkv7_demo_sequence_mode_in_bf16_is_a_near_miss_naming_the_cast():
    # bf16 rows: the key matrix is rounded to bf16 entry by entry, then cast to fp32; the op would form it
    # without that rounding, so the loop stays as written
    report = check_against_eager(rwkv7_demo_seq, *_rwkv7_demo_operands(8, torch.bfloat16))
    assert report.count("delta") == 0, str(report)
    reasons = [m.reason for m in report.near_misses if m.kind == "delta"]
    assert len(reasons) == 1 and "key matrix cast to torch.float32 after it was formed in torch.bfloat16" in reasons[0]


def test_a_key_matrix_that_is_not_an_outer_product_is_a_near_miss():
    # state @ M_t with M_t a full (N, N) matrix per step: no read key and erase key to split it into
    (r, w, k, v), kk, a = _rwkv7_operands(8)
    B, T, H, N = r.shape
    M = (0.1 * torch.randn(B, T, H, N, N)).requires_grad_()

    def fn(r, w, k, v, M):
        w = torch.exp(-torch.exp(w))
        state = torch.zeros(B, H, N, N)
        out = []
        for t in range(T):
            state = state * w[:, t, :, None, :] + state @ M[:, t] + v[:, t, :, :, None] @ k[:, t, :, None, :]
            out.append((state @ r[:, t, :, :, None])[..., 0])
        return torch.stack(out, 1), state
    report = check_against_eager(fn, r, w, k, v, M)
    assert report.count("delta") == 0, str(report)
    reasons = [m.reason for m in report.near_misses if m.kind == "delta"]
    assert len(reasons) == 1 and "key matrix that is not an outer product" in reasons[0], str(report)


def test_comba_as_fla_kernels_define_it_reads_before_the_decay():
    # fla's fused_recurrent Comba kernel reads the state with p before the step's decay (its naive recurrent
    # reference reads after it; the two differ): one op with p and read=previous, run by the C kernel
    q, k, v, beta, g, h0 = operands(T=20)
    p = F.normalize(torch.randn_like(k), dim=-1).requires_grad_()

    def fn(q, k, v, p, beta, g, h0):
        S, ys = h0, []
        for t in range(q.shape[1]):
            u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, p[:, t]))
            S = S * g[:, t].exp()[..., None, None] + k[:, t, :, :, None] * u[:, :, None, :]
            ys.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
        return torch.stack(ys, 1), S
    seqfuse.reset_counters()
    report = check_against_eager(fn, q, k, v, p, beta, g, h0)
    ir = only_delta(report, "scalar")
    assert "p=%" in ir and "e=%" not in ir and "read=previous" in ir and "algo=recurrent" in ir, ir
    assert seqfuse.counters()["delta_backward"]["cpu"] >= 1


def test_a_read_key_runs_the_c_kernel_on_cpu():
    # the C kernel's generalized step reads the state with p: select gives a long sequence the step loop on CPU
    fn, args = _comba(T=40)
    seqfuse.reset_counters()
    report = check_against_eager(fn, *args)
    ir = only_delta(report, "scalar")
    assert "algo=recurrent" in ir and "p=%" in ir, ir
    counts = seqfuse.counters()
    assert counts["delta"]["cpu"] >= 1 and counts["delta"]["eager"] == 0, counts
    assert counts["delta_backward"]["cpu"] >= 1 and counts["delta_backward"]["eager"] == 0, counts


@pytest.mark.parametrize("T,final", [(14, True), (3, False)])   # padded to 4 chunks / 1 chunk
def test_kimi_linear_chunked_kda(T, final):
    # Kimi Linear's chunk_kimi_delta_attention (transformers): a decay per key channel, the UT system and the
    # intra-chunk scores Σ_K kβ_i ⊙ k_j ⊙ L_ij with L (·, C, C, K), the forward substitution in place
    kimi = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    f = kimi.chunk_kimi_delta_attention
    while hasattr(f, "__wrapped__"):
        f = f.__wrapped__

    def fn(q, k, v, beta, g, h0):
        o, S = f(q, k, v, g, beta, chunk_size=4, initial_state=h0, output_final_state=final,
                 use_qk_l2norm_in_kernel=True)
        return (o, S) if final else o
    report = check_against_eager(fn, *operands(T=T, gate="vector"))
    only_delta(report, "vector")


def bmm_value_key_state(q, k, v, beta, g):
    """The delta rule on a (B·H, V, K) state with torch.bmm, heads merged into the batch by reshapes (the
    decay too: a reshape of exp(g)), each step's readout reshaped back before it is stacked."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    S = torch.zeros(B * H, V, K)
    ys = []
    for t in range(T):
        kt, qt = k[:, t].reshape(-1, K, 1), q[:, t].reshape(-1, K, 1)
        vt, bt, at = v[:, t].reshape(-1, V, 1), beta[:, t].reshape(-1, 1, 1), g[:, t].exp().reshape(-1, 1, 1)
        S = S * at
        S = S + torch.bmm(bt * (vt - torch.bmm(S, kt)), kt.transpose(1, 2))
        ys.append(torch.bmm(S, qt).reshape(B, H, V))
    return torch.stack(ys, 1), S


def test_bmm_spelling_with_merged_heads():
    report = check_against_eager(bmm_value_key_state, *operands()[:5])
    only_delta(report, "scalar")


@pytest.mark.parametrize("T,h0,final", [(8, False, False), (7, True, False), (8, True, True),   # 2 chunks of 4
                                         (4, False, True), (3, True, True), (4, True, False),  # 1 chunk
                                         (2, False, False)])
def test_a_chunked_program_over_one_or_two_chunks_is_one_op(T, h0, final):
    # too few chunks for the loop finder (two steps that differ when the last chunk's state update is dead; one
    # step): the first chunk is read as a loop of one step, the second, if any, as the tail after it; one
    # chunk that does not return its final state is a step that only reads the state
    def fn(q, k, v, beta, g, *s):
        o, S = torch_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=4, initial_state=s[0] if s else None,
                                            output_final_state=final)
        return (o, S) if final else o
    report = check_against_eager(fn, *[x for x in operands(T=T, h0=h0) if x is not None])
    ir = only_delta(report, "scalar")
    assert ("h0=%" in ir) == h0, ir


@pytest.mark.parametrize("T,T2", [(4, 4), (8, 8), (12, 4)])
def test_two_short_chunked_programs_in_one_graph_are_two_ops(T, T2):
    # two layers over one (two) chunks: each program's chunks are read on their own (between its system's
    # solve and the next one's), so each is one op; (12, 4): a loop over 3 chunks lifted, then one chunk
    def fn(q, k, v, beta, g):
        o = torch_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=4)[0]
        return torch_chunk_gated_delta_rule(q[:, :T2], k[:, :T2], o[:, :T2] * 0.5, g[:, :T2], beta[:, :T2],
                                            chunk_size=4)[0]
    report = check_against_eager(fn, *operands(T=T)[:5])
    assert report.count("delta") == 2 and not [m for m in report.near_misses if m.kind == "delta"], str(report)


@pytest.mark.parametrize("variant,reason", [
    ("mask", "keeps other positions than j <= i"),
    ("no_decay", "decayed keys of the UT transform"),
])
@pytest.mark.parametrize("final", [True, False])
def test_one_chunk_near_misses_name_the_piece(variant, reason, final):
    # the one-chunk reading proves the same pieces as a loop over chunks (final False: the state is only read)
    q, k, v, beta, g, _ = operands(T=4)
    report = check_against_eager(lambda *a: chunk_variant(*a, variant)[slice(None) if final else 0], q, k, v, beta, g)
    assert report.count("delta") == 0, str(report)
    reasons = [m.reason for m in report.near_misses if m.kind == "delta"]
    assert len(reasons) == 1 and reason in reasons[0] and "over 1 chunk(s)" in reasons[0], str(report)


def test_default_chunk_size_over_one_then_two_chunks_in_one_process():
    # the probe of issue 16: Qwen3-Next's chunk size 64 at T = 64 then 128 compiled one after the other; the
    # second compile of the same code is Dynamo's automatic-dynamic one (T symbolic). Each call equals eager
    # (outputs, every gradient). downstream="eager": plain torch.compile(backend="aot_eager") itself fails on
    # that recompile at T = 128 ("view size is not compatible ... Use .reshape"), without seqfuse
    def fn(q, k, v, beta, g):
        return torch_chunk_gated_delta_rule(q, k, v, g, beta)[0]
    for T in (64, 128):   # (T = 100 after them: one more dynamic compile, 5 s, the same code path)
        report = check_against_eager(fn, *operands(B=1, T=T, H=2, K=4, V=4)[:5], options={"downstream": "eager"})
        reasons = [m.reason for m in report.near_misses if m.kind == "delta"]
        if T == 64:   # one chunk, static: one op.  At 128 the chunk count is pinned by Dynamo's guards (the
            # two-chunk reading runs), but each of the five inputs has its own symbolic length, which the program
            # ties together only through padded sums the proof does not read (a model's q, k, v, β, g come from
            # one hidden state: tests/models/test_delta_models.py lifts those): a near miss of the 2-chunk reading
            only_delta(report, "scalar")
        else:
            assert report.count("delta") == 0 and len(reasons) == 1 and "over 2 chunk(s)" in reasons[0], \
                str(report)


@pytest.mark.parametrize("T,HK,h0,final,dtype", [(12, None, True, True, torch.float32),
                                                  (16, None, False, False, torch.float32),
                                                  (8, 1, True, True, torch.float32),
                                                  (8, None, True, True, torch.bfloat16)],
                         ids=["h0_final", "output_only", "gva", "bf16_inputs"])
def test_fla_naive_chunk_kda(T, HK, h0, final, dtype):
    # fla's chunked KDA: the chunks laid (B, N, C, H, ·) by rearrange and moved to (B, H, N, C, ·); the UT
    # system built column by column (exp(γ_c − γ_i) unmasked, masked afterwards, β per row) and each chunk's
    # scores in a loop over columns nested in the loop over chunks (both vectorized by loop_map, the buffers
    # they fill read as values); β folded into the inverse as a column scale; the query's scale in its chunks;
    # grouped value heads by repeat_interleave; inputs of another dtype cast to fp32 in the chunks (the op
    # reads the sequence cast the same way).  One delta op with the per-channel gate
    def fn(q, k, v, beta, g, *s):
        o, S = fla_kda.naive_chunk_kda(q, k, v, g, beta, chunk_size=4, initial_state=s[0] if s else None,
                                       output_final_state=final)
        return (o, S) if final else o
    ops = [x if x is None else x.detach().to(dtype).requires_grad_()
           for x in operands(B=1, T=T, H=2, K=3, V=2, gate="vector", HK=HK, h0=h0)]
    report = check_against_eager(fn, *[x for x in ops if x is not None])
    ir = only_delta(report, "vector")
    assert ("h0=%" in ir) == h0, ir


def test_fla_naive_chunk_kda_with_another_decay_in_the_scores_is_a_near_miss():
    # the intra-chunk scores decayed by exp(2·(γ_c − γ_j)), not the UT system's exp(γ_c − γ_j): not KDA;
    # the near miss names the scores, and the program runs as written
    import inspect
    src = inspect.getsource(fla_kda.naive_chunk_kda)
    bad = src.replace("q_i * (g_i - g_j).exp()", "q_i * (2 * g_i - 2 * g_j).exp()")
    assert bad != src
    namespace = dict(vars(fla_kda))
    exec(compile(bad, fla_kda.__file__, "exec"), namespace)   # noqa: S102 - fla's own function, one piece changed

    def fn(q, k, v, beta, g, h0):
        return namespace["naive_chunk_kda"](q, k, v, g, beta, chunk_size=4, initial_state=h0,
                                            output_final_state=True)
    report = check_against_eager(fn, *operands(B=1, T=12, H=1, K=2, V=2, gate="vector"))
    assert report.count("delta") == 0, str(report)
    reasons = [m.reason for m in report.near_misses if m.kind == "delta"]
    assert len(reasons) == 1 and "intra-chunk scores" in reasons[0], str(report)
