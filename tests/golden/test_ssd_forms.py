"""Loop-free faces of linear recurrences: each compiled with seqfuse equals eager (outputs and
gradients) and the report shows one seqfuse.ssd with the expected decay; near misses are left
alone with their reason."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch._higher_order_ops.associative_scan import associative_scan_op
from torch._higher_order_ops.scan import scan

from helpers import check_against_eager

fla_retention = pytest.importorskip("fla.ops.retention.naive")
fla_simple_gla = pytest.importorskip("fla.ops.simple_gla.naive")
fla_linear_attn = pytest.importorskip("fla.ops.linear_attn.naive")
hf_mamba2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")

B, H, T, D = 2, 3, 8, 4


def inputs(*shapes):
    return [torch.randn(*s, requires_grad=True) for s in shapes]


def log_gates(*shape):
    return F.logsigmoid(torch.randn(*shape)).requires_grad_()


def assert_one_ssd(report, decay):
    assert report.count("ssd") == 1, str(report)
    ir = report.rewrites[0].ir
    assert f"decay={decay}" in ir, ir
    return ir


# --- 1. causal linear attention, quadratic form: (q·kᵀ ∘ [j<=i])·v -------------------

def tril_ones_matmul(q, k, v):
    t = q.shape[-2]
    return (q @ k.transpose(-1, -2) * torch.tril(torch.ones(t, t))) @ v


def scores_tril(q, k, v):
    return torch.einsum("bhid,bhjd->bhij", q, k).tril() @ v


def masked_fill_upper(q, k, v):
    t = q.shape[-2]
    s = q @ k.transpose(-1, -2)
    return s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), 0.0) @ v


def where_keep(q, k, v):
    t = q.shape[-2]
    keep = torch.arange(t)[:, None] >= torch.arange(t)[None, :]
    s = torch.where(keep, q @ k.mT, 0.0)
    return torch.einsum("bhij,bhjd->bhid", s, v)


def scaled_q_bthd(q, k, v):
    # (B, T, H, D) layout, scale on q, einsum spelling
    t = q.shape[1]
    s = torch.einsum("bihd,bjhd->bhij", q * q.shape[-1] ** -0.5, k)
    return torch.einsum("bhij,bjhd->bihd", s * torch.tril(torch.ones(t, t)), v)


def scaled_scores(q, k, v):
    return ((q @ k.mT) / math.sqrt(q.shape[-1])).tril() @ v


@pytest.mark.parametrize("fn,layout", [
    (tril_ones_matmul, "bhtd"), (scores_tril, "bhtd"), (masked_fill_upper, "bhtd"), (where_keep, "bhtd"),
    (scaled_q_bthd, "bthd"), (scaled_scores, "bhtd"), (scores_tril, "shared_k"), (tril_ones_matmul, "td"),
])
def test_causal_linear_attention_spellings(fn, layout):
    shape = (B, T, H, D) if layout == "bthd" else (T, D) if layout == "td" else (B, H, T, D)
    kshape = (B, 1, T, D) if layout == "shared_k" else shape     # one key head shared by every query head
    report = check_against_eager(fn, *inputs(shape, kshape, shape))
    assert_one_ssd(report, "none")


def normalized_linear_attention(q, k, v):
    # o = (q·kᵀ ∘ tril)·v / (q·cumsum(k)): the numerator is the ssd, the normalizer stays
    q, k = F.elu(q) + 1, F.elu(k) + 1
    num = (q @ k.mT).tril() @ v
    den = (q * k.cumsum(-2)).sum(-1, keepdim=True)
    return num / den


def test_normalized_linear_attention_numerator():
    report = check_against_eager(normalized_linear_attention, *inputs(*[(B, H, T, D)] * 3))
    assert_one_ssd(report, "none")


# --- RetNet: γ^(i-j)·[i>=j] with a constant γ per head -> decay=scalar, a = log γ ------

def test_fla_naive_retention():
    report = check_against_eager(fla_retention.naive_retention, *inputs(*[(B, H, T, D)] * 3))
    assert_one_ssd(report, "scalar")


def retention_pow(q, k, v):
    h, t = q.shape[1], q.shape[2]
    gamma = 1 - 2.0 ** (-5.0 - torch.arange(h, dtype=torch.float32))
    n = torch.arange(t, dtype=torch.float32)
    decay = torch.pow(gamma.view(-1, 1, 1), n[:, None] - n[None, :]) * (n[:, None] >= n[None, :])
    return (q @ k.mT * decay) @ v


def retention_learned_log_decay(q, k, v, log_gamma):
    # exp(w·(i - j)) with w a learned per-head log-decay: any real w is a valid log γ
    t = q.shape[2]
    n = torch.arange(t, dtype=q.dtype)
    decay = torch.exp(log_gamma.view(-1, 1, 1) * (n[:, None] - n[None, :])).tril()
    return (q @ k.mT * decay) @ v


def test_retention_pow_spelling():
    report = check_against_eager(retention_pow, *inputs(*[(B, H, T, D)] * 3))
    assert_one_ssd(report, "scalar")


def test_retention_learned_log_decay():
    q, k, v = inputs(*[(B, H, T, D)] * 3)
    log_gamma = (-torch.rand(H)).requires_grad_()
    report = check_against_eager(retention_learned_log_decay, q, k, v, log_gamma)
    assert_one_ssd(report, "scalar")


def retention_one_based_positions(q, k, v, log_gamma):
    # MiniMax's decay_factors spelling: positions counted from 1, so each carries a constant +1
    # that cancels in (i + 1) - (j + 1)
    t = q.shape[2]
    r = torch.arange(t) + 1
    e = log_gamma.view(-1, 1, 1) * (r[:, None] - r[None, :])
    return (q @ k.mT * torch.exp(e).tril()) @ v


def retention_offset_exponent(q, k, v, log_gamma):
    # exp(w·(i - j) + 0.5): a constant factor e^0.5 on the whole mask, not a decay
    t = q.shape[2]
    n = torch.arange(t, dtype=q.dtype)
    e = log_gamma.view(-1, 1, 1) * (n[:, None] - n[None, :]) + 0.5
    return (q @ k.mT * torch.exp(e).tril()) @ v


def test_one_based_positions_are_a_power_decay():
    q, k, v = inputs(*[(B, H, T, D)] * 3)
    log_gamma = (-torch.rand(H)).requires_grad_()
    report = check_against_eager(retention_one_based_positions, q, k, v, log_gamma)
    assert_one_ssd(report, "scalar")


def test_a_constant_offset_that_does_not_cancel_is_a_near_miss():
    q, k, v = inputs(*[(B, H, T, D)] * 3)
    log_gamma = (-torch.rand(H)).requires_grad_()
    report = check_against_eager(retention_offset_exponent, q, k, v, log_gamma)
    assert report.count("ssd") == 0, str(report)
    assert any("constant offset" in m.reason for m in report.near_misses), str(report)


# --- exp(segsum(a)): simple GLA, Mamba-2 attention form -> decay=scalar, a = per-step log decay

def fla_simple_gla_o(q, k, v, g):
    return fla_simple_gla.naive_parallel_simple_gla(q, k, v, g)[0]


def test_fla_naive_parallel_simple_gla():
    q, k, v = inputs(*[(B, T, H, D)] * 3)
    report = check_against_eager(fla_simple_gla_o, q, k, v, log_gates(B, T, H))
    assert_one_ssd(report, "scalar")


def hf_mamba2_attention_form(C, Bm, x, A):
    """The quadratic (diagonal-block) term of transformers' Mamba-2 torch_forward, on one chunk."""
    L = torch.exp(hf_mamba2.segment_sum(A))                                   # (b, h, l, s)
    G = torch.einsum("blhn,bshn->blsh", C, Bm)
    M = G * L.permute(0, 2, 3, 1)
    return torch.einsum("blsh,bshp->blhp", M, x)


def test_hf_mamba2_segment_sum_form():
    C, Bm, x = inputs((B, T, H, D), (B, T, H, D), (B, T, H, 5))
    A = (-torch.rand(B, H, T)).requires_grad_()
    report = check_against_eager(hf_mamba2_attention_form, C, Bm, x, A)
    assert_one_ssd(report, "scalar")


def segsum(x):
    # the naive segment sum cs_i - cs_j (not the listing's stable masked-cumsum form: test_ssd_stable_segsum.py)
    t = x.size(-1)
    x_cumsum = torch.cumsum(x, dim=-1)
    x_segsum = x_cumsum[..., :, None] - x_cumsum[..., None, :]
    mask = torch.tril(torch.ones(t, t, dtype=torch.bool), diagonal=0)
    return x_segsum.masked_fill(~mask, -torch.inf)


def ssd_minimal_quadratic(X, A, Bm, C):
    """The SSD paper's listing, one chunk: Y = einsum(C, B, L = exp(segsum(A)), X) in one 4-operand einsum
    (with the naive segsum above)."""
    L = torch.exp(segsum(A.permute(0, 2, 1)))
    return torch.einsum("blhn,bshn,bhls,bshp->blhp", C, Bm, L, X)


def test_ssd_minimal_four_operand_einsum():
    X, Bm, C = inputs((B, T, H, 5), (B, T, H, D), (B, T, H, D))
    A = (-torch.rand(B, T, H)).requires_grad_()
    report = check_against_eager(ssd_minimal_quadratic, X, A, Bm, C)
    assert_one_ssd(report, "scalar")


def chunked_intra_chunk(X, A, Bm, C, chunk=4):
    """The diagonal blocks of the chunked SSD: the chunk index becomes a batch axis of the ssd."""
    X, A, Bm, C = (t.reshape(t.shape[0], -1, chunk, *t.shape[2:]) for t in (X, A, Bm, C))
    L = torch.exp(segsum(A.permute(0, 3, 1, 2)))                    # (b, h, c, l, s)
    return torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, Bm, L, X)


def test_chunked_intra_chunk_term_is_an_ssd_over_chunks():
    X, Bm, C = inputs((B, T, H, 5), (B, T, H, D), (B, T, H, D))
    A = (-torch.rand(B, T, H)).requires_grad_()
    report = check_against_eager(chunked_intra_chunk, X, A, Bm, C)
    assert_one_ssd(report, "scalar")


def test_fla_naive_chunk_linear_attn_intra_chunk_term():
    # T = 64 is one chunk of the reference's 64: the intra-chunk (q·kᵀ).masked_fill_(triu(1), 0)·v is
    # an ssd over (b, h, chunk) (with several chunks the whole program is one ssd: test_ssd_chunks.py)
    args = inputs(*[(1, 64, 2, D)] * 3)
    report = check_against_eager(fla_linear_attn.naive_chunk_linear_attn, *args)
    assert_one_ssd(report, "none")


# --- 2. cumulative-sum forms: y_t = q_t · Σ_{s<=t} k_s ⊗ v_s -------------------------

def cumsum_broadcast(q, k, v):
    return (q[..., None] * (k[..., :, None] * v[..., None, :]).cumsum(2)).sum(-2)


def cumsum_einsum_bthd(q, k, v):
    S = torch.einsum("bthn,bthp->bthnp", k, v).cumsum(1)
    return torch.einsum("bthn,bthnp->bthp", q, S)


def cumsum_factored_exp_decay(q, k, v, g):
    # exp(G_t)·exp(-G_s) stays factored into c and b: ssd(decay=none) on those operands equals eager
    # exactly (extracting a = g would differ where exp(-G) overflows)
    G = g.cumsum(2)
    qe, ke = q * G.exp()[..., None], k * (-G).exp()[..., None]
    return (qe[..., None] * (ke[..., :, None] * v[..., None, :]).cumsum(2)).sum(-2)


def cumsum_factored_cumprod(q, k, v, g):
    # q_t·P_t and k_s / P_s (P = cumprod of gates): kept factored, as eager computes it; a scalar
    # decay a = log g would not be provably equal (k / P overflows once P underflows)
    P = g.cumprod(2)
    return (q[..., None] * P[..., None, None] * ((k / P[..., None])[..., :, None] * v[..., None, :]).cumsum(2)).sum(-2)


def exclusive_cumsum_broadcast(q, k, v):
    # Σ_{s<t} k_s ⊗ v_s = cumsum(k ⊗ v) - k ⊗ v: the strictly causal form (keys and values one step later)
    kv = k[..., :, None] * v[..., None, :]
    return (q[..., None] * (kv.cumsum(2) - kv)).sum(-2)


def exclusive_cumsum_einsum_bthd(q, k, v):
    kv = torch.einsum("bthn,bthp->bthnp", k, v)
    return torch.einsum("bthn,bthnp->bthp", q, torch.cumsum(kv, dim=1) - kv)


@pytest.mark.parametrize("fn,layout", [(cumsum_broadcast, "bhtd"), (cumsum_einsum_bthd, "bthd"),
                                       (cumsum_factored_exp_decay, "gated"), (cumsum_factored_cumprod, "gates"),
                                       (exclusive_cumsum_broadcast, "bhtd"), (exclusive_cumsum_einsum_bthd, "bthd")])
def test_cumsum_forms(fn, layout):
    shape = (B, T, H, D) if layout == "bthd" else (B, H, T, D)
    args = inputs(shape, shape, shape)
    if layout == "gated":
        args.append(F.logsigmoid(torch.randn(B, H, T)).requires_grad_())
    elif layout == "gates":
        args.append((0.5 + 0.5 * torch.rand(B, H, T)).requires_grad_())
    report = check_against_eager(fn, *args)
    assert_one_ssd(report, "none")


def plain_cumsum(x):
    return x.cumsum(1) * 2


def test_plain_cumsum_is_left_alone():
    report = check_against_eager(plain_cumsum, *inputs((B, T, H)))
    assert report.count("ssd") == 0 and not report.near_misses, str(report)


# --- 3. higher-order scans: torch._higher_order_ops.scan with a linear body -> seqfuse.scan

def _linear_body(h, xs):
    a, b = xs
    h = a * h + b                                    # h_t = a_t ⊙ h_{t-1} + b_t
    return h, h.clone()


def hop_scans(a, b, h0):
    # a zero initial carry (dropped: the op starts from 0) and a given one, whose final state is used too
    _, hs = scan(_linear_body, torch.zeros_like(b[0]), (a, b))
    hT, hs0 = scan(_linear_body, h0, (a, b))
    return hs, hs0, hT


def _tanh_body(h, xs):
    a, b = xs
    h = torch.tanh(a * h + b)
    return h, h.clone()


def hop_scan_nonlinear(a, b):
    return scan(_tanh_body, torch.zeros_like(b[0]), (a, b))[1]


def test_hop_scan_linear_body():
    a, b = torch.rand(T, B, D, requires_grad=True), torch.randn(T, B, D, requires_grad=True)
    report = check_against_eager(hop_scans, a, b, torch.randn(B, D, requires_grad=True))
    assert report.count("scan") == 2, str(report)
    assert "h0=" not in report.rewrites[0].ir and "h0=" in report.rewrites[1].ir, str(report)


def test_hop_scan_nonlinear_body_is_a_near_miss():
    a, b = torch.rand(T, B, D, requires_grad=True), torch.randn(T, B, D, requires_grad=True)
    report = check_against_eager(hop_scan_nonlinear, a, b)
    assert report.count("scan") == 0
    assert any("not the linear recurrence" in m.reason for m in report.near_misses), str(report)


def _linear_combine(a_left, b_left, a_right, b_right):
    return a_left * a_right, a_right * b_left + b_right      # two steps h -> a·h + b, left first


def _reversed_combine(a_left, b_left, a_right, b_right):
    return a_left * a_right, a_left * b_right + b_left       # the composition in the other order


def assoc_scan_hop(a, b, combine=_linear_combine):
    # what associative_scan(combine_fn, (a, b), dim=2, combine_mode="pointwise") (HF Mamba's CUDA path)
    # hands to Dynamo: the scanned axis moved to 0, then the higher-order op.  On CPU the "generic"
    # mode is inlined by Dynamo instead (a vmapped odd/even recursion, no higher-order op).
    _, h = associative_scan_op(combine, (a.movedim(2, 0), b.movedim(2, 0)), ())
    return h.movedim(0, 2)


def _loop(a, b):
    h, out = torch.zeros_like(b[:, :, 0]), []
    for t in range(a.shape[2]):
        h = a[:, :, t] * h + b[:, :, t]
        out.append(h)
    return torch.stack(out, 2)


def test_associative_scan_hop_linear_combine():
    a, b = torch.rand(B, H, T, D, requires_grad=True), torch.randn(B, H, T, D, requires_grad=True)
    report = check_against_eager(assoc_scan_hop, a, b, grads=False)
    assert report.count("scan") == 1, str(report)
    # gradients against the loop: torch 2.13's eager autograd of the bare associative_scan_op
    # disagrees with the loop on da, so eager is not the oracle here
    torch._dynamo.reset()
    f = torch.compile(assoc_scan_hop, backend="seqfuse", options={"downstream": "aot_eager"})
    g = torch.randn(B, H, T, D)
    got = torch.autograd.grad(f(a, b), (a, b), g)
    want = torch.autograd.grad(_loop(a, b), (a, b), g)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_associative_scan_hop_reversed_combine_is_a_near_miss():
    a, b = torch.rand(B, H, T, D), torch.randn(B, H, T, D)
    report = check_against_eager(lambda a, b: assoc_scan_hop(a, b, _reversed_combine), a, b, grads=False)
    assert report.count("scan") == 0
    assert any("combine_fn is not" in m.reason for m in report.near_misses), str(report)


# --- dynamic length: one graph for three lengths ---------------------------------------

def masked_cumsum_segsum(C, Bm, x, A):
    # segsum(A)[i, j] = Σ_{j<s<=i} A_s as a cumsum over i of A_i masked to j < i, then -inf above the diagonal
    t = A.shape[-1]
    strict = torch.ones(t, t, dtype=torch.bool).tril(-1)
    seg = torch.where(strict, A[..., :, None].expand(*A.shape, t), 0.0).cumsum(-2)
    L = seg.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf")).exp()
    return torch.einsum("blhn,bshn,bhls,bshp->blhp", C, Bm, L, x)


def test_dynamic_length_one_graph():
    # exp(segsum(g)) with a symbolic length: one graph serves three lengths, and each call runs the ssd op
    from torch._dynamo.utils import counters
    import seqfuse
    counters.clear()
    seqfuse.reset_counters()
    f = torch.compile(masked_cumsum_segsum, backend="seqfuse", dynamic=True, options={"downstream": "aot_eager"})
    for t in (8, 13, 21):
        C, Bm, x, A = torch.randn(B, t, H, D), torch.randn(B, t, H, D), torch.randn(B, t, H, 5), -torch.rand(B, H, t)
        torch.testing.assert_close(f(C, Bm, x, A), masked_cumsum_segsum(C, Bm, x, A), rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(seqfuse.counters().get("ssd", {}).values()) == 3, seqfuse.counters()


# --- strictly causal forms: y_t reads the state before step t (S_{t-1}) ------------------
# [j < i] is the inclusive form of the keys and values one step later (b'_s = b_{s-1}, x'_s = x_{s-1},
# zero at s = 0); an inclusive segment sum exp(a_{j+1} + … + a_i) leaves the step a_{j+1} to x'
# (x'_s = x_{s-1}·exp(a_s)); RWKV's exclusive exp(a_{j+1} + … + a_{i-1}) shifts a as well.

def strictly_lower(q, k, v):
    return (q @ k.mT).tril(-1) @ v


def strictly_lower_segsum(q, k, v, g):            # [j < i]·exp(G_i - G_j), (B, H, T) gates
    t = q.shape[-2]
    gc = g.cumsum(-1)
    decay = torch.exp(gc[..., :, None] - gc[..., None, :])
    return (q @ k.mT * decay.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(-1), 0.0)) @ v


def strictly_lower_power(q, k, v):                # [j < i]·γ^(i-j), γ per head (retention's spelling)
    t = q.shape[-2]
    n = torch.arange(t, dtype=q.dtype)
    gamma = 1 - 2.0 ** (-5 - torch.arange(q.shape[1], dtype=q.dtype))
    decay = torch.exp(torch.log(gamma)[:, None, None] * (n[:, None] - n[None, :]))
    return (q @ k.mT * decay.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(-1), 0.0)) @ v


def exclusive_segsum(q, k, v, g):                 # RWKV-6's intra-chunk exponent G_i - g_i - G_j
    t = q.shape[-2]
    gc = g.cumsum(-1)
    decay = torch.exp(gc[..., :, None] - g[..., :, None] - gc[..., None, :])
    return (q @ k.mT * decay.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(-1), 0.0)) @ v


def exclusive_segsum_inclusive_mask(q, k, v, g):  # exp(-g_i) on the diagonal: not a decay
    t = q.shape[-2]
    gc = g.cumsum(-1)
    decay = torch.exp(gc[..., :, None] - g[..., :, None] - gc[..., None, :])
    return (q @ k.mT * decay.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), 0.0)) @ v


@pytest.mark.parametrize("fn,decay,gates", [(strictly_lower, "none", False), (strictly_lower_segsum, "scalar", True),
                                            (strictly_lower_power, "scalar", False),
                                            (exclusive_segsum, "scalar", True)])
@pytest.mark.parametrize("t", [2, 9])
def test_strictly_causal_forms(fn, decay, gates, t):
    args = inputs((B, H, t, D), (B, H, t, D), (B, H, t, D))
    if gates:
        args.append(log_gates(B, H, t))
    report = check_against_eager(fn, *args)
    assert_one_ssd(report, decay)
    assert not [m for m in report.near_misses if m.kind == "ssd"], str(report)


def test_strictly_causal_dynamic_length_one_graph():
    report = check_against_eager(exclusive_segsum, *inputs((B, H, 12, D), (B, H, 12, D), (B, H, 12, D)),
                                 log_gates(B, H, 12), dynamic=True)
    assert_one_ssd(report, "scalar")


def test_exclusive_segsum_with_the_diagonal_is_a_near_miss():
    report = check_against_eager(exclusive_segsum_inclusive_mask, *inputs((B, H, T, D), (B, H, T, D), (B, H, T, D)),
                                 log_gates(B, H, T))
    assert report.count("ssd") == 0, str(report)
    assert any("exclusive segment sum" in m.reason for m in report.near_misses if m.kind == "ssd"), str(report)


# --- near misses and non-matches: left alone, still equal to eager ----------------------

def sliding_window(q, k, v):
    t = q.shape[-2]
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    return (q @ k.mT * ((j <= i) & (j > i - 3))) @ v


def scores_returned(q, k, v):
    s = (q @ k.mT).tril()
    return s @ v, s


def fla_simple_gla_with_scores(q, k, v, g):
    return fla_simple_gla.naive_parallel_simple_gla(q, k, v, g)


def unproven_decay_base(q, k, v, gamma):
    t = q.shape[2]
    n = torch.arange(t, dtype=q.dtype)
    decay = torch.pow(gamma.view(-1, 1, 1), n[:, None] - n[None, :]).tril()
    return (q @ k.mT * decay) @ v


@pytest.mark.parametrize("fn,extra,reason", [
    (sliding_window, None, "window"),
    (scores_returned, None, "also returned"),
    (fla_simple_gla_with_scores, "gla", "also returned"),
    (unproven_decay_base, "gamma", "not proven"),
])
def test_near_misses(fn, extra, reason):
    shape = (B, T, H, D) if extra == "gla" else (B, H, T, D)
    args = inputs(shape, shape, shape)
    if extra == "gla":
        args.append(log_gates(B, T, H))
    elif extra == "gamma":
        args.append(torch.rand(H).requires_grad_())
    report = check_against_eager(fn, *args)
    assert report.count("ssd") == 0, str(report)
    assert any(reason in m.reason for m in report.near_misses if m.kind == "ssd"), \
        [m.reason for m in report.near_misses]


def softmax_attention(q, k, v):
    t = q.shape[-2]
    s = (q @ k.mT).masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    return s.softmax(-1) @ v


def non_causal(q, k, v):
    return (q @ k.mT) @ v


def full_ones_mask(q, k, v):
    t = q.shape[-2]
    return (q @ k.mT * torch.ones(t, t)) @ v


@pytest.mark.parametrize("fn", [softmax_attention, non_causal, full_ones_mask])
def test_not_a_recurrence_is_left_alone_silently(fn):
    report = check_against_eager(fn, *inputs(*[(B, H, T, D)] * 3))
    assert report.count("ssd") == 0, str(report)
    assert not [m for m in report.near_misses if m.kind == "ssd"], [m.reason for m in report.near_misses]
    if fn is softmax_attention:
        assert report.count("attention") == 1
