"""Golden tests: regions that look like attention but are not the op's math stay unmatched.

Each case must compile to the same outputs and gradients as eager, the report
must count no attention rewrite, and it must record a near miss whose reason
names what broke the match.  The comment on each case says why matching it
would change the program's meaning.
"""
import pytest
import torch

from helpers import check_against_eager

B, H, L, D = 2, 4, 16, 8
OPTS = {"downstream": "eager"}
NEG_INF = float("-inf")


def qkv():
    return [torch.randn(B, H, L, D, requires_grad=True) for _ in range(3)]


def future(l):
    return torch.triu(torch.ones(l, l, dtype=torch.bool), 1)


def check_near_miss(fn, *inputs, reason: str):
    report = check_against_eager(fn, *inputs, options=OPTS)
    assert report.count("attention") == 0, str(report)
    reasons = [m.reason for m in report.near_misses if m.kind == "attention"]
    assert any(reason in r for r in reasons), f"no near miss mentioning {reason!r}: {reasons}"
    return report


# The probabilities are an output too: the op never materializes them, so fusing would
# have to recompute p anyway and the program would lose nothing but gain a second softmax.
def probabilities_returned(q, k, v):
    p = torch.softmax(q @ k.transpose(-2, -1) * 0.125, -1)
    return p @ v, p


# The probabilities feed a second op inside the graph (an entropy term of the output).
def probabilities_reused(q, k, v):
    p = torch.softmax(q @ k.transpose(-2, -1) * 0.125, -1)
    return p @ v + (p * p).sum(-1, keepdim=True)


# Softmax over the query axis (dim=-2) normalizes columns: Σ_i p[i, j] = 1, not attention's rows.
def softmax_over_queries(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) * 0.125, dim=-2) @ v


# Softmax over the head axis mixes heads: each (i, j) is normalized across heads.
def softmax_over_heads(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) * 0.125, dim=1) @ v


# The mask reads the scores themselves (s < 0): it is data-dependent, not a fixed pattern
# the op could apply before knowing the scores.
def mask_from_scores(q, k, v):
    s = q @ k.transpose(-2, -1) * 0.125
    return torch.softmax(s.masked_fill(s < 0, NEG_INF), -1) @ v


# The same through an additive mask built from the scores.
def additive_mask_from_scores(q, k, v):
    s = q @ k.transpose(-2, -1) * 0.125
    return torch.softmax(s + (s < 0).float() * -1e4, -1) @ v


# relu between scores and softmax: softmax(relu(s)) is not softmax(s) under any mask or scale.
def relu_on_scores(q, k, v):
    return torch.softmax(torch.relu(q @ k.transpose(-2, -1) * 0.125), -1) @ v


# Scaling after a finite-fill mask scales the fill too (-1e4 · 0.5 = -5e3): the op applies
# its scale before the mask, so the fill it would use differs from the program's.
def scale_after_finite_fill(q, k, v):
    s = (q @ k.transpose(-2, -1)).masked_fill(future(q.shape[-2]), -1e4)
    return torch.softmax(s * 0.5, -1) @ v


# Two masks with different fills: the op has one fill value for every masked position.
def two_fills(q, k, v, keep):
    s = (q @ k.transpose(-2, -1) * 0.125).masked_fill(future(q.shape[-2]), NEG_INF)
    return torch.softmax(s.masked_fill(~keep[:, None, None, :], -1e4), -1) @ v


# Soft-capping after a -inf mask: tanh(-inf) = -1, so "masked" keys get probability; the op
# caps before masking.
def softcap_after_mask(q, k, v):
    s = (q @ k.transpose(-2, -1) * 0.125).masked_fill(future(q.shape[-2]), NEG_INF)
    return torch.softmax(20.0 * torch.tanh(s / 20.0), -1) @ v


# The fill comes from a tensor: the op's fill is a compile-time attribute.
def tensor_fill(q, k, v, fill):
    s = (q @ k.transpose(-2, -1) * 0.125).masked_fill(future(q.shape[-2]), fill)
    return torch.softmax(s, -1) @ v


# A per-head temperature tensor multiplies the scores: the op's scale is one number.
def per_head_temperature(q, k, v, t):
    return torch.softmax(q @ k.transpose(-2, -1) * t, -1) @ v


# Scores summed over heads as well as features ("bhid,bhjd->bij"): not q·kᵀ per head.
def scores_summed_over_heads(q, k, v):
    s = torch.einsum("bhid,bhjd->bij", q, k) * 0.125
    return torch.einsum("bij,bhjd->bhid", s.softmax(-1), v)


# The probabilities are renormalized differently after the softmax (zeroing keys without
# renormalizing): p·v of the modified p is not attention's output.
def probabilities_masked_after_softmax(q, k, v, keep):
    p = torch.softmax(q @ k.transpose(-2, -1) * 0.125, -1)
    return p.masked_fill(~keep[:, None, None, :], 0.0) @ v


# bias - s negates the scores: softmax(-s) with the bias is another function of q·kᵀ.
def scores_subtracted_from_bias(q, k, v, bias):
    return torch.softmax(bias - q @ k.transpose(-2, -1) * 0.125, -1) @ v


# The exponentials are normalized by hand with an extra constant in the denominator
# (softmax "plus one"): the softmax node is absent, the sum differs.
def softmax_plus_one(q, k, v):
    s = q @ k.transpose(-2, -1) * 0.125
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return (e / (1.0 + e.sum(-1, keepdim=True))) @ v


def padding_keep():
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[0, -5:] = False
    return keep


CASES = [
    (probabilities_returned, (), "the probabilities are used 2 times: also as an output of the graph"),
    (probabilities_reused, (), "the probabilities are used 2 times (returned or reused)"),
    (softmax_over_queries, (), "the value contraction does not sum over the softmax axis"),
    (softmax_over_heads, (), "the softmax axis is shared by both operands"),
    (mask_from_scores, (), "the mask depends on the attention scores"),
    (additive_mask_from_scores, (), "the additive mask depends on the attention scores"),
    (relu_on_scores, (), "aten.relu between the scores and the softmax"),
    (scale_after_finite_fill, (), "scaled after a mask with a finite fill"),
    (two_fills, (padding_keep,), "two masks with different fill values"),
    (softcap_after_mask, (), "a soft-cap after a bias, a mask"),
    (tensor_fill, (lambda: torch.tensor(-1e4),), "fill value is not a compile-time constant"),
    (per_head_temperature, (lambda: torch.rand(1, H, 1, 1) + 0.5,), "the scores are multiplied by a tensor"),
    (scores_summed_over_heads, (), "the scores sum over 2 axes"),
    (probabilities_masked_after_softmax, (padding_keep,), "the probabilities feed aten.where"),
    (scores_subtracted_from_bias, (lambda: torch.randn(L, L),), "the scores are subtracted from a tensor"),
]


@pytest.mark.parametrize("fn,extra,reason", CASES, ids=[c[0].__name__ for c in CASES])
def test_not_attention(fn, extra, reason):
    check_near_miss(fn, *qkv(), *[make() for make in extra], reason=reason)


def test_hand_written_softmax_plus_one_is_left_alone():
    # no softmax node at all: nothing to match, and nothing to report
    report = check_against_eager(softmax_plus_one, *qkv(), options=OPTS)
    assert report.count("attention") == 0 and not report.near_misses, str(report)


def test_router_softmax_is_not_a_near_miss():
    # a softmax that is not attention at all (a gate over experts: a linear layer, then top-k
    # routing weights) is not even a near miss
    gate = torch.nn.Linear(D, 4)

    def f(x):
        return torch.softmax(gate(x), -1).topk(2, dim=-1).values
    report = check_against_eager(f, torch.randn(B, L, D, requires_grad=True), options=OPTS)
    assert report.count("attention") == 0 and not report.near_misses, str(report)


def test_score_dependent_mask_next_to_a_real_attention():
    # one graph, two softmaxes: the real attention matches, the score-masked one does not
    def f(q, k, v):
        a = torch.softmax((q @ k.transpose(-2, -1) * 0.125).masked_fill(future(q.shape[-2]), NEG_INF), -1) @ v
        return a + mask_from_scores(q, k, v)
    report = check_against_eager(f, *qkv(), options=OPTS)
    assert report.count("attention") == 1, str(report)
    assert "mask=causal" in report.rewrites[0].ir
    assert [m.reason for m in report.near_misses] == ["the mask depends on the attention scores"]
