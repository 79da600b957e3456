"""The gate of issue 15: no candidate rejected without a near miss.  Small programs that contain an
einsum chain, a tril-masked product, a cumulative sum or a time loop are each either rewritten
(one seqfuse.ssd / seqfuse.scan) or leave a near miss that names its reason; the report is walked
for every one of them, and each program equals eager (outputs and all gradients) either way.

Programs: ``einsum(...).tril() @ v`` at T = 2 (rewritten), cumsum linear attention at
T = 64 (einsum and broadcast spellings, rewritten), the chunked SSD listing at T = 40 (5 chunks of 8,
rewritten), a Python loop h = a·h + x (a scan), the strictly lower triangle and the exclusive cumulative
sum (rewritten: the keys and values one step later), that loop at T = 2 and 3 (rewritten), and masked products that are not a forward
recurrence (an upper triangle, a band, relu or a cube of the scores, a reversed cumulative sum: near
misses; some were silent before; a key or value dim of 1, silent before too)."""
import pytest
import torch

from helpers import check_against_eager
from golden.test_ssd_chunks import ssd_listing


def tril_scores(q, k, v):
    return torch.einsum("bhid,bhjd->bhij", q, k).tril() @ v


def strict_scores(q, k, v):
    return torch.einsum("bhid,bhjd->bhij", q, k).tril(-1) @ v


def upper_scores(q, k, v):                       # anti-causal: the op runs forward in time
    return torch.einsum("bhid,bhjd->bhij", q, k).triu() @ v


def band_scores(q, k, v):                        # a window of two steps
    return torch.einsum("bhid,bhjd->bhij", q, k).tril().triu(-1) @ v


def relu_scores(q, k, v):                        # not linear in q·kᵀ
    return torch.relu(torch.einsum("bhid,bhjd->bhij", q, k)).tril() @ v


def squared_scores(q, k, v):
    return (torch.einsum("bhid,bhjd->bhij", q, k) ** 2).tril() @ v


def cubed_scores(q, k, v):
    return (torch.einsum("bhid,bhjd->bhij", q, k) ** 3).tril() @ v


def cumsum_linear_attention(q, k, v):
    kv = torch.cumsum(torch.einsum("bhtd,bhte->bhtde", k, v), dim=2)
    return torch.einsum("bhtd,bhtde->bhte", q, kv)


def cumsum_linear_attention_broadcast(q, k, v):
    kv = torch.cumsum(k[..., :, None] * v[..., None, :], dim=2)
    return (q[..., :, None] * kv).sum(-2)


def reversed_cumsum(q, k, v):                    # Σ_{s >= t}: a backward recurrence
    kv = torch.cumsum(torch.einsum("bhtd,bhte->bhtde", k, v).flip(2), dim=2).flip(2)
    return torch.einsum("bhtd,bhtde->bhte", q, kv)


def exclusive_cumsum(q, k, v):                   # Σ_{s < t}
    kv = torch.einsum("bhtd,bhte->bhtde", k, v)
    return torch.einsum("bhtd,bhtde->bhte", q, torch.cumsum(kv, dim=2) - kv)


def loop(a, x):
    h = torch.zeros_like(x[:, 0])
    ys = []
    for t in range(x.shape[1]):
        h = a[:, t] * h + x[:, t]
        ys.append(h)
    return torch.stack(ys, 1)


def qkv(t, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, t, 4, generator=g).requires_grad_() for _ in range(3)]


def listing_inputs(t):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(1, t, 2, 4, generator=g).requires_grad_(), (-torch.rand(1, t, 2, generator=g)).requires_grad_(),
            torch.randn(1, t, 2, 3, generator=g).requires_grad_(), torch.randn(1, t, 2, 3, generator=g).requires_grad_()]


def loop_inputs(t=8):
    g = torch.Generator().manual_seed(2)
    return [torch.rand(2, t, 3, generator=g).requires_grad_(), torch.randn(2, t, 3, generator=g).requires_grad_()]


# (program, inputs, the rewrite it must become, or None and a phrase of its near miss)
PROGRAMS = {
    "tril_T2": (tril_scores, lambda: qkv(2), "ssd", None),
    "cumsum_T64": (cumsum_linear_attention, lambda: qkv(64), "ssd", None),
    "cumsum_broadcast_T64": (cumsum_linear_attention_broadcast, lambda: qkv(64), "ssd", None),
    "ssd_listing_T40": (ssd_listing, lambda: listing_inputs(40), "ssd", None),
    "loop_T8": (loop, loop_inputs, "scan", None),
    "loop_T2": (loop, lambda: loop_inputs(2), "scan", None),    # silent before (zeros_like(x[:, 0]) in step 0)
    "loop_T3": (loop, lambda: loop_inputs(3), "scan", None),
    "strict_T3": (strict_scores, lambda: qkv(3), "ssd", None),         # y_t reads S_{t-1}: keys one step later
    "upper_T3": (upper_scores, lambda: qkv(3), None, "triu"),
    "band_T3": (band_scores, lambda: qkv(3), None, "triu"),
    "relu_T16": (relu_scores, lambda: qkv(16), None, "relu"),
    "square_T16": (squared_scores, lambda: qkv(16), "ssd", None),      # (q·k)² = vec(q⊗q)·vec(k⊗k)
    "cube_T16": (cubed_scores, lambda: qkv(16), None, "degree 3"),
    "reversed_cumsum_T16": (reversed_cumsum, lambda: qkv(16), None, "flip"),
    "exclusive_cumsum_T16": (exclusive_cumsum, lambda: qkv(16), "ssd", None),  # Σ_{s<t}: strictly causal
}


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_rewritten_or_a_near_miss_with_its_reason(name):
    fn, make, kind, phrase = PROGRAMS[name]
    report = check_against_eager(fn, *make())
    misses = [m for m in report.near_misses if m.kind in ("ssd", "scan")]
    # the walk: every candidate is rewritten or leaves a near miss with a reason
    assert report.rewrites or misses, f"{name}: neither rewritten nor a near miss\n{report}"
    assert all(m.reason.strip() for m in misses), str(report)
    if kind is not None:
        assert report.count(kind) == 1 and not misses, str(report)
    else:
        assert report.count("ssd") == 0 and report.count("scan") == 0, str(report)
        assert any(phrase in m.reason for m in misses), [m.reason for m in misses]


def tril_ones_scores(q, k, v):
    t = q.shape[-2]
    return (q @ k.transpose(-1, -2) * torch.tril(torch.ones(t, t, dtype=q.dtype))) @ v


def masked_fill_scores(q, k, v):
    t = q.shape[-2]
    return (q @ k.mT).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), 0.0) @ v


@pytest.mark.parametrize("K,V", [(1, 3), (3, 1)], ids=["key_dim_1", "value_dim_1"])
@pytest.mark.parametrize("fn", [tril_ones_scores, masked_fill_scores, cumsum_linear_attention,
                                cumsum_linear_attention_broadcast])
def test_a_size_1_feature_axis_is_a_near_miss(fn, K, V):
    # a key or value dim of 1 reads as a broadcast, so the recognizer cannot tell c, b and x apart: not
    # lifted, and no longer silent (the fuzzer found 18 such programs in 120)
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(1, 2, 12, K, generator=g).requires_grad_() for _ in range(2))
    v = torch.randn(1, 2, 12, V, generator=g).requires_grad_()
    report = check_against_eager(fn, q, k, v)
    misses = [m.reason for m in report.near_misses if m.kind == "ssd"]
    assert report.count("ssd") == 0 and len(misses) == 1 and "size-1 feature axis" in misses[0], str(report)


def strict_segsum_scores(q, k, v, g):
    t = q.shape[-2]
    gc = g.cumsum(-1)
    e = (gc[..., :, None] - gc[..., None, :]).masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool), -1), -torch.inf)
    return (q @ k.mT * torch.exp(e)) @ v


def one_einsum_segsum(q, k, v, g):               # c, b, the mask and x in one contraction
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    t = g.shape[-1]
    gc = g.cumsum(-1)
    L = torch.exp((gc[..., :, None] - gc[..., None, :]).masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool)), -torch.inf))
    return torch.einsum("blhn,bshn,bhls,bshp->blhp", q, k, L, v)


def permuted_segsum_mask(q, k, v, g):            # transformers' Mamba-2: the mask laid (b, l, s, h)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    t = g.shape[-1]
    a = g[..., None].expand(*g.shape, t).masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool), -1), 0)
    seg = torch.cumsum(a, dim=-2).masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool)), -torch.inf)
    M = torch.einsum("blhn,bshn->blsh", q, k) * torch.exp(seg).permute(0, 2, 3, 1)
    return torch.einsum("blsh,bshp->blhp", M, v)


def compared_positions_pow(q, k, v, g):          # retention: γ^(i-j)·[i >= j] with the mask a comparison
    t = q.shape[-2]
    n = torch.arange(t, dtype=torch.float32)
    decay = torch.pow(torch.full((q.shape[1], 1, 1), 0.9), n[:, None] - n[None, :]) * (n[:, None] >= n[None, :])
    return (q @ k.mT * decay) @ v


@pytest.mark.parametrize("K,V", [(1, 3), (3, 1)], ids=["key_dim_1", "value_dim_1"])
@pytest.mark.parametrize("fn", [strict_segsum_scores, one_einsum_segsum, permuted_segsum_mask, compared_positions_pow])
def test_a_size_1_feature_axis_beside_a_decay_mask_is_a_near_miss(fn, K, V):
    # the mask is a side input of the scores' product (exp of a masked segment sum, a comparison of
    # positions) or an operand of the one contraction: the fuzzer found these silent (seed 71)
    g = torch.Generator().manual_seed(4)
    q, k = (torch.randn(1, 2, 10, K, generator=g).requires_grad_() for _ in range(2))
    v = torch.randn(1, 2, 10, V, generator=g).requires_grad_()
    a = (-torch.rand(1, 2, 10, generator=g)).requires_grad_()
    report = check_against_eager(fn, q, k, v, a)
    misses = [m.reason for m in report.near_misses if m.kind == "ssd"]
    assert report.count("ssd") == 0 and len(misses) == 1 and "size-1 feature axis" in misses[0], str(report)


@pytest.mark.parametrize("shape", [dict(N=1, P=4), dict(N=4, P=1)], ids=["state_dim_1", "head_dim_1"])
def test_chunked_listing_with_a_size_1_feature_axis_is_a_near_miss(shape):
    g = torch.Generator().manual_seed(5)
    b, t, h = 2, 16, 2
    X = torch.randn(b, t, h, shape["P"], generator=g).requires_grad_()
    A = (-torch.rand(b, t, h, generator=g)).requires_grad_()
    Bm, C = (torch.randn(b, t, h, shape["N"], generator=g).requires_grad_() for _ in range(2))
    report = check_against_eager(ssd_listing, X, A, Bm, C)
    misses = [m.reason for m in report.near_misses if m.kind == "ssd"]
    assert report.count("ssd") == 0 and misses and all("size-1 feature axis" in m for m in misses), str(report)


def test_single_step_product_is_not_a_candidate():
    # T = 1: tril of a 1x1 score matrix keeps everything, the program is two matmuls (no recurrence,
    # no near-miss noise)
    report = check_against_eager(tril_scores, *qkv(1))
    assert report.count("ssd") == 0 and not [m for m in report.near_misses if m.kind == "ssd"], str(report)


def test_softmax_scores_are_attention_not_a_recurrence():
    # a masked product through softmax is the attention pass's: the gate leaves no ssd near miss
    def attn(q, k, v):
        s = torch.einsum("bhid,bhjd->bhij", q, k).tril()
        return torch.relu(torch.softmax(s, -1)) @ v
    report = check_against_eager(attn, *qkv(8))
    assert not [m for m in report.near_misses if m.kind == "ssd"], str(report)
