"""Attention normalized after the value contraction: ``exp(s - max(s)) @ v / Σ exp(s - max(s))``.

flash-linear-attention's reference ``naive_parallel_attn(..., sink_bias=s)`` divides the unnormalized
contraction by its denominator (which adds the sink's ``exp(c - m)``), and flash-attention style
reference code normalizes lazily the same way without a sink.  Canonicalization reads both as a softmax
(with a sink: the gpt-oss ``softmax(cat([s, c]))[..., :-1]``), so each is one ``seqfuse.attention``.
Every test checks the report (the rewrite, its sink, or the near miss that names why a form is left
alone) and the numbers: outputs and every input's gradient against eager.
"""
from __future__ import annotations

import pytest
import torch

from helpers import check_against_eager, check_nans_against_eager

AOT = {"downstream": "aot_eager"}
NEG_INF = float("-inf")


def _attention_ir(report) -> list[str]:
    return [r.ir for r in report.rewrites if r.kind == "attention"]


def _misses(report) -> list[str]:
    return [m.reason for m in report.near_misses if m.kind == "attention"]


def assert_rewritten(report, sink: bool, extra: str = "") -> None:
    """One attention rewrite, with a sink operand exactly when ``sink``, no near miss."""
    irs = _attention_ir(report)
    assert len(irs) == 1 and not _misses(report), str(report)
    assert ("sink=" in irs[0]) == sink, irs[0]
    assert extra in irs[0], irs[0]


def assert_left_alone(report, reason: str) -> None:
    """No attention rewrite, and a near miss whose reason mentions ``reason``."""
    assert report.count("attention") == 0, str(report)
    assert any(reason in m for m in _misses(report)), f"no near miss mentioning {reason!r}: {_misses(report)}"


# --- flash-linear-attention's reference with a sink ------------------------------------------

def _fla_inputs(sink_grad: bool, b=2, t=9, hq=6, h=3, d=8):
    torch.manual_seed(0)
    q = torch.randn(b, t, hq, d, requires_grad=True)
    k, v = (torch.randn(b, t, h, d, requires_grad=True) for _ in range(2))
    return q, k, v, torch.randn(hq, requires_grad=sink_grad)


@pytest.mark.parametrize("sink_grad", [True, False], ids=["sink_grad", "sink_constant"])
@pytest.mark.parametrize("window,mask", [(None, "mask=causal"), (3, "mask=window")], ids=["causal", "window"])
def test_fla_naive_parallel_attn_with_sink(window, mask, sink_grad):
    # GQA (HQ=6 query heads over H=3), causal or windowed; both results (the output and max_logits, which
    # reads the max the rewrite leaves in place) and every gradient, the sink's included when it has one
    naive = pytest.importorskip("fla.ops.attn.naive").naive_parallel_attn

    def f(q, k, v, s):
        return naive(q, k, v, window_size=window, sink_bias=s)
    report = check_against_eager(f, *_fla_inputs(sink_grad), options=AOT)
    assert_rewritten(report, sink=True, extra=mask)
    assert "gqa_groups=2" in _attention_ir(report)[0]


def test_fla_naive_parallel_attn_with_sink_dynamic_shapes():
    # symbolic sizes: the sink's column is broadcast to the scores' rows with sym_size sizes
    naive = pytest.importorskip("fla.ops.attn.naive").naive_parallel_attn

    def f(q, k, v, s):
        return naive(q, k, v, sink_bias=s)[0]
    report = check_against_eager(f, *_fla_inputs(True, t=11), options=AOT, dynamic=True)
    assert_rewritten(report, sink=True)


# --- hand-written lazy normalization ---------------------------------------------------------

def _qkv(b=2, h=3, t=7, d=8, seed=1):
    torch.manual_seed(seed)
    return [torch.randn(b, h, t, d, requires_grad=True) for _ in range(3)]


def lazy_matmul_keepdim(q, k, v):
    s = q @ k.mT * 0.3
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return (e @ v) / e.sum(-1, keepdim=True)


def lazy_matmul_flat(q, k, v):
    s = q @ k.mT * 0.3
    e = torch.exp(s - s.max(-1).values[..., None])
    return (e @ v) / e.sum(-1)[..., None]


def lazy_einsum_flat_bqhd(q, k, v):
    # the output in (B, T, H, D): the denominator moved onto its rows by a transpose
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.3
    e = (s - s.max(dim=-1, keepdim=True).values.detach()).exp()
    o = torch.einsum("bhqk,bhkd->bqhd", e, v)
    return o / e.sum(-1).transpose(1, 2).unsqueeze(-1)


def lazy_einsum_causal_keepdim(q, k, v):
    t = q.shape[-2]
    s = torch.einsum("bhqd,bhkd->bhqk", q, k).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), NEG_INF)
    e = torch.exp(s - torch.amax(s, -1, keepdim=True))
    return torch.einsum("bhqk,bhkd->bhqd", e, v) / torch.sum(e, -1, keepdim=True)


def lazy_bmm_heads_merged(q, k, v):
    # (B·H, L, ·) by reshapes, bmm: with B = 1 the value contraction also sums a size-1 batch letter (no sum)
    b, h, t, d = q.shape
    s = torch.bmm(q.reshape(-1, t, d), k.reshape(-1, t, d).transpose(1, 2)) * 0.3
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return (torch.bmm(e, v.reshape(-1, t, v.shape[-1])) / e.sum(-1, keepdim=True)).reshape(b, h, t, -1)


@pytest.mark.parametrize("fn,mask", [(lazy_matmul_keepdim, "mask=none"), (lazy_matmul_flat, "mask=none"),
                                     (lazy_einsum_flat_bqhd, "mask=none"), (lazy_einsum_causal_keepdim, "mask=causal")],
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_lazy_normalization_spellings(fn, mask):
    report = check_against_eager(fn, *_qkv(), options=AOT)
    assert_rewritten(report, sink=False, extra=mask)


@pytest.mark.parametrize("b", [1, 2])
def test_lazy_normalization_over_merged_heads(b):
    report = check_against_eager(lazy_bmm_heads_merged, *_qkv(b=b), options=AOT)
    assert_rewritten(report, sink=False, extra="mask=none")


def test_exponentials_also_returned_keep_their_values():
    # e is an output too: the rewrite reads softmax(s), e itself stays what the program computed
    def f(q, k, v):
        s = q @ k.mT * 0.3
        e = torch.exp(s - s.amax(-1, keepdim=True))
        return (e @ v) / e.sum(-1, keepdim=True), e
    report = check_against_eager(f, *_qkv(), options=AOT)
    assert_rewritten(report, sink=False)


# --- sinks written by hand: a constant logit and a parameter --------------------------------

def _with_logit(q, k, v, c):
    s = q @ k.mT * 0.3
    m = torch.maximum(s.amax(-1, keepdim=True), c)
    e = torch.exp(s - m)
    return (e @ v) / (e.sum(-1, keepdim=True) + torch.exp(c - m))


def sink_constant(q, k, v):
    # a per-head constant built in the program (no input, no gradient)
    return _with_logit(q, k, v, torch.full((3, 1, 1), 0.5))


def sink_scalar_constant(q, k, v):
    return _with_logit(q, k, v, torch.tensor(0.25))


def sink_parameter(q, k, v, sink):
    return _with_logit(q, k, v, sink[:, None, None])


def sink_spelled_twice(q, k, v, sink):
    # the logit's view written out in the max and again in the denominator: two nodes of one value
    s = q @ k.mT * 0.3
    m = torch.maximum(s.amax(-1, keepdim=True), sink[:, None, None])
    e = torch.exp(s - m)
    return (e @ v) / (e.sum(-1, keepdim=True) + torch.exp(sink[:, None, None] - m))


def _param():
    return torch.randn(3, requires_grad=True)


@pytest.mark.parametrize("fn,extra", [(sink_constant, ()), (sink_scalar_constant, ()), (sink_parameter, (_param,)),
                                      (sink_spelled_twice, (_param,))],
                         ids=lambda x: getattr(x, "__name__", ""))
def test_hand_written_sink(fn, extra):
    report = check_against_eager(fn, *_qkv(), *[make() for make in extra], options=AOT)
    assert_rewritten(report, sink=True)


# --- forms left alone: not the softmax's arithmetic ----------------------------------------

def max_over_queries(q, k, v):
    # the max over the query axis varies along the keys: not a shift of each row
    s = q @ k.mT * 0.3
    e = torch.exp(s - s.amax(-2, keepdim=True))
    return (e @ v) / e.sum(-1, keepdim=True)


def no_max_subtracted(q, k, v):
    # exp(s) overflows where softmax does not (s = 100 in fp32)
    e = torch.exp(q @ k.mT * 0.3)
    return (e @ v) / e.sum(-1, keepdim=True)


def normalized_over_queries(q, k, v):
    # the denominator sums over the query axis: columns, not the rows the contraction sums
    s = q @ k.mT * 0.3
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return (e @ v) / e.sum(-2, keepdim=True).mT


def rows_misplaced(q, k, v):
    # (B, H, T) denominator divided into a (B, T, H, D) output without moving H and T: it broadcasts
    # only because H == T, and divides row (h, t) by the denominator of row (t, h)
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.3
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return torch.einsum("bhqk,bhkd->bqhd", e, v) / e.sum(-1)[..., None]


def sink_missing_from_max(q, k, v, c):
    # exp(c - m) with m the row max alone: exp(c - m) overflows where the sink softmax does not
    s = q @ k.mT * 0.3
    m = s.amax(-1, keepdim=True)
    e = torch.exp(s - m)
    return (e @ v) / (e.sum(-1, keepdim=True) + torch.exp(c[:, None, None] - m))


def exponentials_regrouped(q, k, v):
    # e reaches a bmm over merged batch and heads through a reshape, which is not followed
    b, h, t, d = q.shape
    s = q @ k.mT * 0.3
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return torch.bmm(e.reshape(b * h, t, t), v.reshape(b * h, t, d)) / e.sum(-1, keepdim=True).reshape(b * h, t, 1)


def denominator_regrouped(q, k, v):
    # flattened and split again: the same rows here, but a reshape that merges axes is not read
    s = q @ k.mT * 0.3
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return (e @ v) / e.sum(-1).flatten().view(*s.shape[:-1], 1)


def denominator_detached(q, k, v):
    # no gradient through the denominator: not softmax's gradient
    s = q @ k.mT * 0.3
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return (e @ v) / e.sum(-1, keepdim=True).detach()


NEGATIVES = [
    (max_over_queries, (), "not their max over the key axis"),
    (no_max_subtracted, (), "without its row max subtracted"),
    (normalized_over_queries, (), "not over their last axis alone"),
    (rows_misplaced, (), "not laid onto the output's rows"),
    (sink_missing_from_max, (lambda: torch.randn(5, requires_grad=True),), "the denominator adds a term"),
    (exponentials_regrouped, (), "the exponentials reach the contraction with the values through aten.reshape"),
    (denominator_regrouped, (), "the denominator reaches the division through aten.view"),
    (denominator_detached, (), "the denominator reaches the division through aten.detach"),
]


@pytest.mark.parametrize("fn,extra,reason", NEGATIVES, ids=[c[0].__name__ for c in NEGATIVES])
def test_left_alone_with_a_near_miss(fn, extra, reason):
    report = check_against_eager(fn, *_qkv(b=2, h=5, t=5), *[make() for make in extra], options=AOT)
    assert_left_alone(report, reason)



def test_no_max_subtracted_overflows_as_eager_does():
    # scores near 100: exp(s) is inf, eager's rows are NaN; read as softmax they would be finite
    def f(q, k, v):
        e = torch.exp(q @ k.mT * 40)
        return (e @ v) / e.sum(-1, keepdim=True)
    report, _ = check_nans_against_eager(f, _qkv(), AOT)
    assert_left_alone(report, "without its row max subtracted")
    assert report.output.isnan().any()


def test_float16_is_left_alone():
    # the unnormalized e @ v can overflow float16 where softmax(s) @ v does not
    q, k, v = (x.detach().half().requires_grad_() for x in _qkv())
    report = check_against_eager(lazy_matmul_keepdim, q, k, v, options=AOT)
    assert_left_alone(report, "float16")


# --- fully masked rows: NaN (no sink) or 0 (a sink) exactly where eager has them ---------------

def _keep_with_empty_rows(t=6):
    keep = torch.ones(t, t, dtype=torch.bool).tril()
    keep[2] = False          # a query that sees no key
    return keep


def lazy_with_mask(q, k, v, keep):
    s = (q @ k.mT * 0.3).masked_fill(~keep, NEG_INF)
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return (e @ v) / e.sum(-1, keepdim=True)


def fla_with_mask(q, k, v, keep, sink):
    s = (q @ k.mT * 0.3).masked_fill(~keep, NEG_INF)
    c = sink[None, :, None]
    m = torch.maximum(s.max(-1).values, c)
    e = torch.exp(s - m[..., None])
    return torch.einsum("bhqk,bhkd->bqhd", e, v) / (e.sum(-1) + torch.exp(c - m)).permute(0, 2, 1)[..., None]


@pytest.mark.parametrize("sink", [False, True], ids=["nan_rows", "sink_zero_rows"])
def test_fully_masked_rows_match_eager(sink):
    q, k, v = _qkv(t=6)
    keep = _keep_with_empty_rows()
    if sink:
        report, _ = check_nans_against_eager(fla_with_mask, [q, k, v, keep, torch.randn(3, requires_grad=True)], AOT)
    else:
        report, _ = check_nans_against_eager(lazy_with_mask, [q, k, v, keep], AOT)
    assert_rewritten(report, sink=sink)
    row = report.output[:, 2] if sink else report.output[:, :, 2]     # query 2 in (B, T, H, D) / (B, H, T, D)
    assert (row == 0).all() if sink else row.isnan().all(), row
