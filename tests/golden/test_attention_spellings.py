"""Golden tests: softmax attention written many ways becomes one ``seqfuse.attention``.

Every case compiles the function with ``backend="seqfuse"``, compares outputs
and the gradients of q, k, v (and parameters) with eager within the per-dtype
bound of ``helpers.BOUND``, and checks that the report shows exactly one
attention rewrite carrying the attributes that spelling implies.

Most cases run the rest of the graph with downstream "eager" (cheapest to
compile; the comparison then sees seqfuse's numerics only); dropout, SDPA,
dynamic shapes, low precision, GQA, biases with gradients and the module go
through AOT autograd (downstream "aot_eager"), as training does.
"""
import math
import re

import pytest
import torch
import torch.nn.functional as F

import seqfuse
from helpers import BOUND, check_against_eager, rel_err
from seqfuse.compiler.report import Report, collecting

B, H, L, D = 2, 4, 16, 8
EAGER = {"downstream": "eager"}
AOT = {"downstream": "aot_eager"}
NEG_INF = float("-inf")


def qkv(b=B, h=H, lq=L, lk=None, d=D, hkv=None, dtype=torch.float32, layout="bhld"):
    """q, k, v requiring grad; (B, H, L, D) or, with layout="blhd", (B, L, H, D)."""
    lk = lq if lk is None else lk
    hkv = h if hkv is None else hkv
    shapes = [(b, h, lq, d), (b, hkv, lk, d), (b, hkv, lk, d)]
    if layout == "blhd":
        shapes = [(s[0], s[2], s[1], s[3]) for s in shapes]
    return [torch.randn(*s, dtype=dtype).requires_grad_() for s in shapes]


def check(fn, *inputs, expect=(), options=EAGER, **kwargs):
    """check_against_eager, then: one attention rewrite, no near miss, ``expect`` substrings in its IR."""
    report = check_against_eager(fn, *inputs, options=options, **kwargs)
    assert report.count("attention") == 1, str(report)
    assert not report.near_misses, str(report)
    ir = report.rewrites[0].ir
    for s in expect:
        assert s in ir, f"{s!r} not in {ir}"
    return report


def scale_of(report) -> float:
    return float(re.search(r"scale=([-0-9.e]+)", report.rewrites[0].ir).group(1))


def causal_bool(lq, lk=None):
    """True where key j is in query i's future (the positions a causal mask removes)."""
    lk = lq if lk is None else lk
    return torch.triu(torch.ones(lq, lk, dtype=torch.bool), diagonal=lk - lq + 1)


# --- contractions: matmul / @ / bmm / einsum / broadcast-multiply + sum ------------

def by_matmul(q, k, v):
    s = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return torch.matmul(torch.softmax(s, dim=-1), v)


def by_at(q, k, v):
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    return s.softmax(-1) @ v


def by_bmm(q, k, v):
    b, h, l, d = q.shape
    q3, k3, v3 = (x.reshape(b * h, l, d) for x in (q, k, v))
    s = torch.bmm(q3, k3.transpose(1, 2)) / math.sqrt(d)
    return torch.bmm(torch.softmax(s, -1), v3).reshape(b, h, l, d)


def by_baddbmm(q, k, v):
    b, h, l, d = q.shape
    q3, k3, v3 = (x.reshape(b * h, l, d) for x in (q, k, v))
    s = torch.baddbmm(torch.empty(b * h, l, l), q3, k3.transpose(1, 2), beta=0.0, alpha=d ** -0.5)
    return torch.bmm(torch.softmax(s, -1), v3).reshape(b, h, l, d)


def by_einsum(q, k, v):
    s = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("bhij,bhjd->bhid", s.softmax(-1), v)


def by_broadcast_sum(q, k, v):
    s = (q[:, :, :, None, :] * k[:, :, None, :, :]).sum(-1) * q.shape[-1] ** -0.5
    p = s.softmax(-1)
    return (p[..., None] * v[:, :, None, :, :]).sum(-2)


def by_mT(q, k, v):
    return torch.softmax(q @ k.mT * q.shape[-1] ** -0.5, -1) @ v


def by_movedim(q, k, v):
    return torch.softmax(torch.matmul(q, k.movedim(-1, -2)) * q.shape[-1] ** -0.5, -1) @ v


@pytest.mark.parametrize("fn", [by_matmul, by_at, by_bmm, by_baddbmm, by_einsum, by_broadcast_sum, by_mT, by_movedim],
                         ids=lambda f: f.__name__)
def test_contraction_spellings(fn):
    report = check(fn, *qkv(), expect=["mask=none", "gqa_groups=1", "dropout=0.0", "softcap=none"])
    assert scale_of(report) == pytest.approx(D ** -0.5, rel=1e-12)
    if fn not in (by_bmm, by_baddbmm):  # the transposes are folded: the op reads the inputs
        assert "seqfuse.attention(%l_q_, %l_k_, %l_v_)" in report.rewrites[0].ir


def test_broadcast_sum_over_an_expanded_axis_keeps_its_size():
    # canonicalization regression: folding x.expand(...) into an einsum must not turn a sum
    # over the n broadcast copies into a sum over the single stored one (a factor n lost)
    def f(x, y):
        return (x.expand(2, 5, 3) * y[:, None, :]).sum(1)
    x, y = torch.randn(2, 1, 3, requires_grad=True), torch.randn(2, 3, requires_grad=True)
    report = check_against_eager(f, x, y, options=AOT)
    assert report.count("attention") == 0


# --- scale: on the scores (mul, div), on q or k, on both, after a -inf mask ---------

def scale_mul(q, k, v):
    return torch.softmax((q @ k.transpose(-2, -1)) * 0.125, -1) @ v


def scale_div(q, k, v):
    return torch.softmax((q @ k.transpose(-2, -1)) / 8.0, -1) @ v


def scale_q(q, k, v):
    q = q * 0.125
    return torch.softmax(q @ k.transpose(-2, -1), -1) @ v


def scale_k_div(q, k, v):
    return torch.softmax(q @ (k / 8.0).transpose(-2, -1), -1) @ v


def scale_both(q, k, v):
    d = q.shape[-1]
    q, k = q * d ** -0.25, k * d ** -0.25
    return torch.softmax(q @ k.transpose(-2, -1), -1) @ v


def scale_after_neg_inf_mask(q, k, v):
    # -inf · c = -inf for c > 0: scaling after a -inf mask is the same attention
    l = q.shape[-2]
    s = (q @ k.transpose(-2, -1)).masked_fill(causal_bool(l), NEG_INF)
    return torch.softmax(s * 0.125, -1) @ v


@pytest.mark.parametrize("fn,scale", [(scale_mul, 0.125), (scale_div, 0.125), (scale_q, 0.125),
                                      (scale_k_div, 0.125), (scale_both, D ** -0.5),
                                      (scale_after_neg_inf_mask, 0.125)], ids=lambda x: getattr(x, "__name__", ""))
def test_scale_spellings(fn, scale):
    report = check(fn, *qkv())
    assert scale_of(report) == pytest.approx(scale, rel=1e-12)
    # the scale folded into the op: q and k are the raw inputs
    assert "seqfuse.attention(%l_q_, %l_k_, %l_v_)" in report.rewrites[0].ir


# --- softmax dtype: in the input dtype, upcast and cast back --------------------------

def softmax_plain(q, k, v):
    l = q.shape[-2]
    s = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(causal_bool(l), NEG_INF)
    return torch.softmax(s, -1) @ v


def softmax_upcast(q, k, v):
    l = q.shape[-2]
    s = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(causal_bool(l), NEG_INF)
    return torch.softmax(s.float(), -1).to(q.dtype) @ v


def softmax_dtype_arg(q, k, v):
    l = q.shape[-2]
    s = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(causal_bool(l), NEG_INF)
    return F.softmax(s, -1, dtype=torch.float32).to(q.dtype) @ v


@pytest.mark.parametrize("fn,dtype", [(softmax_plain, torch.float16), (softmax_upcast, torch.float32),
                                      (softmax_upcast, torch.bfloat16), (softmax_dtype_arg, torch.float32),
                                      (softmax_dtype_arg, torch.float16)],
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_softmax_dtype_spellings(fn, dtype):
    # the op computes in fp32 and returns v's dtype: within helpers.BOUND[dtype] of eager
    report = check(fn, *qkv(dtype=dtype), expect=["mask=causal", "diag=0"])
    assert report.output.dtype == dtype


# --- softmax written out -------------------------------------------------------------

def softmax_by_amax(q, k, v):
    s = q @ k.mT / math.sqrt(q.shape[-1])
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True) @ v


def softmax_by_max_values_detached(q, k, v):
    s = (q @ k.mT / math.sqrt(q.shape[-1])).masked_fill(causal_bool(q.shape[-2]), NEG_INF)
    e = (s - s.max(dim=-1, keepdim=True).values.detach()).exp()
    return (e / e.sum(dim=-1, keepdim=True)) @ v


@pytest.mark.parametrize("fn,expect", [(softmax_by_amax, "mask=none"), (softmax_by_max_values_detached, "mask=causal")],
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_softmax_written_out(fn, expect):
    # exp(s - max) / sum: softmax itself (silent before: neither rewritten nor a near miss)
    check(fn, *qkv(), expect=[expect], options=AOT)


def test_softmax_written_out_without_the_max_is_left_alone():
    # exp(s) / sum(exp(s)) overflows where softmax does not (s = 100 in fp32): not rewritten, a near miss
    def f(q, k, v):
        e = torch.exp(q @ k.mT)
        return e / e.sum(-1, keepdim=True) @ v
    report = check_against_eager(f, *qkv(), options=AOT)
    misses = [m.reason for m in report.near_misses if m.kind == "attention"]
    assert report.count("attention") == 0 and len(misses) == 1 and "row max" in misses[0], str(report)


# --- causal masks: triu / tril / arange / where / additive --------------------------

def causal_triu(q, k, v):
    l = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.triu(torch.ones(l, l, dtype=torch.bool), 1), NEG_INF)
    return s.softmax(-1) @ v


def causal_tril_eq0(q, k, v):
    l = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.tril(torch.ones(l, l)) == 0, NEG_INF)
    return s.softmax(-1) @ v


def causal_arange(q, k, v):
    l = q.shape[-2]
    i, j = torch.arange(l)[:, None], torch.arange(l)[None, :]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return s.masked_fill(j > i, NEG_INF).softmax(-1) @ v


def causal_where_scalar(q, k, v):
    l = q.shape[-2]
    keep = torch.tril(torch.ones(l, l, dtype=torch.bool))
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.where(keep, s, NEG_INF).softmax(-1) @ v


def causal_where_tensor(q, k, v):
    l = q.shape[-2]
    keep = torch.tril(torch.ones(l, l, dtype=torch.bool))
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.where(keep, s, torch.tensor(NEG_INF)).softmax(-1) @ v


def causal_where_fill_first(q, k, v):
    l = q.shape[-2]
    future = causal_bool(l)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.where(future, NEG_INF, s).softmax(-1) @ v


def causal_additive(q, k, v):
    l = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s + torch.triu(torch.full((l, l), NEG_INF), 1)
    return s.softmax(-1) @ v


def causal_expanded(q, k, v):
    # the mask expanded to (B, H, L, L): the same pattern for every batch entry and head
    b, h, l, _ = q.shape
    keep = torch.tril(torch.ones(l, l, dtype=torch.bool))[None, None].expand(b, h, l, l)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return s.masked_fill(~keep, NEG_INF).softmax(-1) @ v


def causal_finfo_min_fill(q, k, v):
    # a finite fill: kept as fill=..., every row keeps its diagonal so nothing degenerates
    l = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s.masked_fill(causal_bool(l), torch.finfo(s.dtype).min)
    return s.softmax(-1) @ v


@pytest.mark.parametrize("fn", [causal_triu, causal_tril_eq0, causal_arange, causal_where_scalar, causal_where_tensor,
                                causal_where_fill_first, causal_expanded], ids=lambda f: f.__name__)
def test_causal_mask_spellings(fn):
    report = check(fn, *qkv(), expect=["mask=causal", "diag=0", "fill=-inf"])
    ir = report.rewrites[0].ir
    assert "keep=" not in ir and "bias=" not in ir, ir  # structural, no tensor mask left


def test_additive_causal_mask_stays_a_bias():
    # s + (-inf) is NaN where a NaN or inf in q or k makes the score NaN or +inf; a structural mask
    # replaces masked scores, so the additive mask stays the op's bias
    report = check(causal_additive, *qkv(), expect=["mask=none", "fill=-inf"])
    assert "bias=" in report.rewrites[0].ir


def test_causal_with_finite_fill():
    check(causal_finfo_min_fill, *qkv(), expect=["mask=causal", "fill=-3.4028234663852886e+38"])


# --- sliding window ------------------------------------------------------------------

def window_arange(q, k, v, w=4):
    l = q.shape[-2]
    i, j = torch.arange(l)[:, None], torch.arange(l)[None, :]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return s.masked_fill(~((i - j >= 0) & (i - j < w)), NEG_INF).softmax(-1) @ v


def window_triu_tril(q, k, v, w=4):
    l = q.shape[-2]
    ones = torch.ones(l, l, dtype=torch.bool)
    band = torch.tril(ones) & torch.triu(ones, -(w - 1))
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.where(band, s, NEG_INF).softmax(-1) @ v


@pytest.mark.parametrize("fn", [window_arange, window_triu_tril], ids=lambda f: f.__name__)
def test_sliding_window(fn):
    check(fn, *qkv(), expect=["mask=window", "diag=0", "window=4"])


# --- masks that stay tensors: key padding (bool), padding bias (float) ----------------

def key_padding_bool(q, k, v, m):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return s.masked_fill(~m[:, None, None, :], NEG_INF).softmax(-1) @ v


def padding_bias_hf(q, k, v, m):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return (s + (1.0 - m[:, None, None, :]) * -10000.0).softmax(-1) @ v


def padding_bias_finfo(q, k, v, m):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return (s + (1.0 - m[:, None, None, :]) * torch.finfo(q.dtype).min).softmax(-1) @ v


def padding_bias_subtracted(q, k, v, m):
    # s - b is s + (-b)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return (s - 10000.0 * (1.0 - m[:, None, None, :])).softmax(-1) @ v


def padding_bias_and_causal(q, k, v, m):
    l = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s.masked_fill(causal_bool(l), NEG_INF) + (1.0 - m[:, None, None, :]) * -10000.0
    return s.softmax(-1) @ v


def padding_mask():
    m = torch.ones(B, L)
    m[0, -5:] = 0  # right padding: every row keeps at least one key
    return m


def test_key_padding_bool_mask():
    check(key_padding_bool, *qkv(), padding_mask().bool(), expect=["keep=%", "mask=none", "fill=-inf"])


@pytest.mark.parametrize("fn", [padding_bias_hf, padding_bias_finfo, padding_bias_subtracted],
                         ids=lambda f: f.__name__)
def test_additive_padding_bias(fn):
    check(fn, *qkv(), padding_mask(), expect=["bias=%", "mask=none"])


def test_padding_bias_with_causal():
    check(padding_bias_and_causal, *qkv(), padding_mask(), expect=["bias=%", "mask=causal"])


def test_additive_causal_mask_with_a_finite_fill_padding_mask():
    # s + triu(-inf) then masked_fill(pad, -1e4): a fully padded row keeps its -inf future keys
    # at -inf (softmax spreads over its padded past only), so the additive mask must not merge
    # into a structural mask that would share the -1e4 fill
    def f(q, k, v, keep):
        l = q.shape[-2]
        s = q @ k.transpose(-2, -1) * 0.125 + torch.triu(torch.full((l, l), NEG_INF), 1)
        return s.masked_fill(~keep[:, None, None, :], -1e4).softmax(-1) @ v
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[0, :3] = False  # left padding: rows 0..2 of batch 0 see only padded keys
    check(f, *qkv(), keep, expect=["bias=%", "keep=%", "mask=none", "fill=-10000.0"])


def test_additive_mask_of_another_dtype_is_promoted():
    # s + bool_mask adds 0/1 (type promotion): the op's bias is that mask in the scores' dtype
    def f(q, k, v, m):
        return torch.softmax(q @ k.transpose(-2, -1) + m[:, None, None, :], -1) @ v
    check(f, *qkv(), padding_mask().bool(), expect=["bias=%"])


def test_learned_bias_gets_its_gradient():
    # an arbitrary (B, 1, L, L) float bias that requires grad (a learned relative-position bias)
    def f(q, k, v, bias):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.125 + bias, -1) @ v
    check(f, *qkv(), torch.randn(B, 1, L, L, requires_grad=True), expect=["bias=%l_bias_"], options=AOT)


def test_key_prefix_mask_from_aranges_stays_a_tensor_mask():
    # keys j < 5 for every query row: shape-only, but not causal (a (1, L) mask, broadcast over rows)
    def f(q, k, v):
        l = q.shape[-2]
        s = q @ k.transpose(-2, -1)
        return s.masked_fill(torch.arange(l)[None, :] >= 5, NEG_INF).softmax(-1) @ v
    check(f, *qkv(), expect=["keep=%", "mask=none"])


def test_per_head_window_stays_a_tensor_mask():
    # a different window per head is shape-only but not one positional mask for every head
    def f(q, k, v):
        l = q.shape[-2]
        i, j = torch.arange(l)[:, None], torch.arange(l)[None, :]
        w = 2 * torch.arange(1, q.shape[1] + 1)[:, None, None]
        s = q @ k.transpose(-2, -1) * 0.125
        return s.masked_fill(~((j <= i) & (i - j < w)), NEG_INF).softmax(-1) @ v
    check(f, *qkv(), expect=["keep=%", "mask=none"])


def hf_gpt2(q, k, v, attention_mask):
    """The HF GPT-2 eager attention: where(causal, s, finfo.min), then the padding bias."""
    l = q.shape[-2]
    s = q @ k.transpose(-2, -1) / torch.full([], v.size(-1) ** 0.5, dtype=q.dtype)
    causal = torch.tril(torch.ones(l, l, dtype=torch.bool)).view(1, 1, l, l)
    s = torch.where(causal, s, torch.full([], torch.finfo(s.dtype).min, dtype=s.dtype))
    s = s + attention_mask
    return torch.softmax(s, dim=-1) @ v


def hf_bias(padding):
    return (1.0 - padding[:, None, None, :]) * torch.finfo(torch.float32).min


def test_hf_gpt2_right_padding():
    check(hf_gpt2, *qkv(), hf_bias(padding_mask()),
          expect=["bias=%", "mask=causal", "fill=-3.4028234663852886e+38", "bias_after_mask=true"], options=AOT)


def test_hf_gpt2_left_padding_degenerate_rows():
    padding = torch.ones(B, L)
    padding[0, :3] = 0  # rows 0..2 of batch 0 see only padded keys
    check(hf_gpt2, *qkv(), hf_bias(padding), expect=["mask=causal", "bias_after_mask=true"], options=AOT)


def test_hf_gpt2_left_padding_degenerate_rows_on_the_reference():
    padding = torch.ones(B, L)
    padding[0, :3] = 0
    check(hf_gpt2, *qkv(), hf_bias(padding), expect=["mask=causal", "bias_after_mask=true"],
          options={**AOT, "runtime": "eager"})


# --- GQA / MQA -----------------------------------------------------------------------

def gqa_repeat_interleave(q, k, v):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, -1) @ v


def gqa_expand_reshape(q, k, v):
    b, hkv, l, d = k.shape
    g = q.shape[1] // hkv
    k = k[:, :, None].expand(b, hkv, g, l, d).reshape(b, hkv * g, l, d)
    v = v[:, :, None].expand(b, hkv, g, l, d).reshape(b, hkv * g, l, d)
    return torch.softmax(q @ k.transpose(-2, -1) * d ** -0.5, -1) @ v


def gqa_causal_einsum(q, k, v):
    l = q.shape[-2]
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    s = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("bhij,bhjd->bhid", s.masked_fill(causal_bool(l), NEG_INF).softmax(-1), v)


def mqa_broadcast(q, k, v):
    # k, v of one head broadcast by matmul over q's heads
    return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, -1) @ v


def mqa_expand(q, k, v):
    k, v = k.expand(-1, q.shape[1], -1, -1), v.expand(-1, q.shape[1], -1, -1)
    return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, -1) @ v


@pytest.mark.parametrize("fn,hkv", [(gqa_repeat_interleave, 2), (gqa_expand_reshape, 2), (gqa_causal_einsum, 2),
                                    (gqa_repeat_interleave, 1), (mqa_broadcast, 1), (mqa_expand, 1)],
                         ids=["repeat_interleave", "expand_reshape", "causal_einsum", "mqa_repeat_interleave",
                              "mqa_broadcast", "mqa_expand"])
def test_gqa(fn, hkv):
    report = check(fn, *qkv(hkv=hkv), expect=[f"gqa_groups={H // hkv}"], options=AOT)
    # the op reads the unrepeated k and v
    assert "seqfuse.attention(%l_q_, %l_k_, %l_v_)" in report.rewrites[0].ir


def test_tiled_heads_are_not_gqa():
    # k.repeat(1, g, 1, 1) tiles the heads (head h reads kv head h % Hkv, not h // g): the op
    # must keep the repeated tensors and gqa_groups=1
    def f(q, k, v):
        k, v = k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1)
        return torch.softmax(q @ k.transpose(-2, -1) * 0.125, -1) @ v
    report = check(f, *qkv(hkv=2), expect=["gqa_groups=1"], options=AOT)
    assert "%l_k_," not in report.rewrites[0].ir


def test_only_k_repeated_is_not_gqa():
    def f(q, k, v):
        k = k.repeat_interleave(2, dim=1)
        return torch.softmax(q @ k.transpose(-2, -1) * 0.125, -1) @ v
    q, k, _ = qkv(hkv=2)
    check(f, q, k, torch.randn(B, H, L, D, requires_grad=True), expect=["gqa_groups=1"])


# --- dropout on the probabilities ----------------------------------------------------

def dropout_fn(q, k, v):
    p = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, -1)
    return F.dropout(p, 0.1, training=True) @ v


def dropout_upcast(q, k, v):
    l = q.shape[-2]
    s = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).masked_fill(causal_bool(l), NEG_INF)
    p = torch.softmax(s.float(), -1).to(q.dtype)
    return F.dropout(p, 0.1, training=True) @ v


@pytest.mark.parametrize("fn,dtype", [(dropout_fn, torch.float32), (dropout_upcast, torch.float32),
                                      (dropout_upcast, torch.bfloat16)], ids=["plain", "upcast", "upcast_bf16"])
def test_dropout_matches_eager_rng(fn, dtype):
    inputs = qkv(dtype=dtype)
    check(fn, *inputs, expect=["dropout=0.1"], options=AOT)
    # the comparison is sensitive to the dropout mask: another seed gives another answer
    torch.manual_seed(1234)
    same = fn(*inputs)
    torch.manual_seed(4321)
    other = fn(*inputs)
    assert rel_err(other, same) > 10 * BOUND[dtype]


def test_dropout_before_and_after_attention_share_the_rng_stream():
    # the attention's dropout draws exactly what F.dropout draws, so the dropouts after it
    # (and before it) in the same graph see the same generator state as in eager
    def f(q, k, v):
        q = F.dropout(q, 0.2, training=True)
        o = dropout_fn(q, k, v)
        return F.dropout(o, 0.3, training=True)
    check(f, *qkv(), expect=["dropout=0.1"], options=AOT)


def test_two_identical_dropout_attentions_draw_two_masks():
    # R-Drop style: the same attention twice in one graph must see two independent masks
    def f(q, k, v):
        return dropout_fn(q, k, v) - dropout_fn(q, k, v)
    report = check_against_eager(f, *qkv(), options=AOT)
    assert report.count("attention") == 2 and all("dropout=0.1" in r.ir for r in report.rewrites), str(report)


def test_dropout_module_train_and_eval():
    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = torch.nn.Dropout(0.25)

        def forward(self, q, k, v):
            return self.drop(torch.softmax(q @ k.transpose(-2, -1) * 0.125, -1)) @ v
    m = Attn()
    check(m.train(), *qkv(), expect=["dropout=0.25"], options=AOT)
    torch._dynamo.reset()
    check(m.eval(), *qkv(), expect=["dropout=0.0"], options=AOT)


# --- layouts: BLHD (einsum or transposes), scores in other axis orders ---------------

def blhd_einsum(q, k, v):
    s = torch.einsum("blhd,bmhd->bhlm", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("bhlm,bmhd->blhd", s.softmax(-1), v)


def blhd_transpose(q, k, v):
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    o = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, -1) @ v
    return o.transpose(1, 2)


def blhd_scores_bqhk_causal(q, k, v):
    # scores laid out (B, Lq, H, Lk): the causal mask must follow the same layout
    l = q.shape[1]
    s = torch.einsum("bqhd,bkhd->bqhk", q, k) * q.shape[-1] ** -0.5
    s = s.masked_fill(causal_bool(l)[:, None, :], NEG_INF)
    return torch.einsum("bqhk,bkhd->bqhd", s.softmax(-1), v)


def blhd_module_view(q, k, v):
    b, l, h, d = q.shape
    x = [t.reshape(b, l, h * d).view(b, l, h, d).permute(0, 2, 1, 3) for t in (q, k, v)]
    o = F.softmax(x[0] @ x[1].transpose(2, 3) / math.sqrt(d), dim=-1) @ x[2]
    return o.permute(0, 2, 1, 3).reshape(b, l, h * d)


@pytest.mark.parametrize("fn", [blhd_einsum, blhd_transpose, blhd_scores_bqhk_causal, blhd_module_view],
                         ids=lambda f: f.__name__)
def test_blhd_layout(fn):
    report = check(fn, *qkv(layout="blhd"))
    assert ("mask=causal" in report.rewrites[0].ir) == (fn is blhd_scores_bqhk_causal)


def test_keys_first_scores_with_bias_and_causal_mask():
    # s[j, i] = k·q with the softmax over the query-independent axis -2 (the keys): the bias and
    # the mask are laid out (Lk, Lq) and must be transposed for the op's (Lq, Lk)
    def f(q, k, v, bias):
        l = q.shape[-2]
        s = torch.einsum("bhjd,bhid->bhji", k, q) * 0.125 + bias
        s = s.masked_fill(causal_bool(l).T, NEG_INF)
        return torch.einsum("bhji,bhjd->bhid", s.softmax(-2), v)
    check(f, *qkv(), torch.randn(L, L), expect=["mask=causal", "bias=%"], options=AOT)


# --- F.scaled_dot_product_attention ----------------------------------------------------

def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_bool_mask(q, k, v, m):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m[:, None, None, :].bool())


def sdpa_float_mask(q, k, v, m):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(1.0 - m[:, None, None, :]) * -10000.0)


def sdpa_shape_only_mask(q, k, v):
    l = q.shape[-2]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(l, l, dtype=torch.bool).tril())


def sdpa_scale(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, scale=0.2)


@pytest.mark.parametrize("fn,extra,expect", [
    (sdpa_causal, False, ["mask=causal", "scale=none"]),
    (sdpa_bool_mask, True, ["keep=%", "mask=none"]),
    (sdpa_float_mask, True, ["bias=%", "mask=none"]),
    (sdpa_shape_only_mask, False, ["keep=%", "mask=none"]),  # SDPA adds its mask: NaN semantics
    (sdpa_scale, False, ["scale=0.2", "mask=none"]),
], ids=["is_causal", "bool_mask", "float_mask", "shape_only_mask", "scale"])
def test_sdpa(fn, extra, expect):
    args = qkv() + ([padding_mask()] if extra else [])
    check(fn, *args, expect=expect, options=AOT)


def test_sdpa_enable_gqa():
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    check(f, *qkv(hkv=2), expect=["gqa_groups=2", "mask=causal"], options=AOT)


def test_sdpa_fully_masked_row_on_the_reference():
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[0] = False  # batch 0 attends to nothing
    check(sdpa_bool_mask, *qkv(), keep.float(), expect=["keep=%"], options={**AOT, "runtime": "eager"})


def test_sdpa_dropout():
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
    check(f, *qkv(), expect=["dropout=0.1"], options=AOT)


# --- dynamic sequence length -----------------------------------------------------------

def dyn_causal(q, k, v):
    l = q.shape[-2]
    i = torch.arange(l, device=q.device)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return s.masked_fill(i[None, :] > i[:, None], NEG_INF).softmax(-1) @ v


def dyn_window_triu(q, k, v):
    l = q.shape[-2]
    s = torch.einsum("bhid,bhjd->bhij", q, k) * 0.125
    s = s + torch.triu(torch.full((l, l), NEG_INF), 1) + torch.tril(torch.full((l, l), NEG_INF), -4)
    return s.softmax(-1) @ v


# an additive -inf window stays the op's bias (NaN semantics of s + (-inf)), computed per length
@pytest.mark.parametrize("fn,expect", [(dyn_causal, "mask=causal"), (dyn_window_triu, "bias=%")],
                         ids=["causal_arange", "window_additive"])
def test_dynamic_sequence_length_compiles_once(fn, expect):
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return seqfuse.backend(gm, example_inputs, options=AOT)

    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(fn, backend=counting, dynamic=True)
    report = Report()
    with collecting(report):
        for l in (12, 17, 23):  # lengths unequal to B, H, D: no duck-sized specialization
            inputs = qkv(lq=l)
            ref_in = [x.detach().clone().requires_grad_() for x in inputs]
            out, ref = compiled(*inputs), fn(*ref_in)
            g = torch.randn_like(ref)
            got = torch.autograd.grad(out, inputs, g)
            want = torch.autograd.grad(ref, ref_in, g)
            assert rel_err(out, ref) < BOUND[torch.float32], l
            for a, b in zip(got, want):
                assert rel_err(a, b) < BOUND[torch.float32], l
    assert len(graphs) == 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert report.count("attention") == 1 and not report.near_misses, str(report)
    assert expect in report.rewrites[0].ir


# --- fp16 / bf16 ------------------------------------------------------------------------

@pytest.mark.parametrize("fn,hkv,expect,dtype", [
    (causal_triu, H, "mask=causal", torch.float16),
    (causal_triu, H, "mask=causal", torch.bfloat16),
    (gqa_repeat_interleave, 2, "gqa_groups=2", torch.bfloat16),
    (sdpa_causal, H, "mask=causal", torch.float16),
], ids=["causal-fp16", "causal-bf16", "gqa-bf16", "sdpa-fp16"])
def test_low_precision(fn, hkv, expect, dtype):
    report = check(fn, *qkv(hkv=hkv, dtype=dtype), expect=[expect], options=AOT)
    assert report.output.dtype == dtype


# --- causal with Lq != Lk (bottom-right aligned: a query block at the end of the keys) --

def causal_rect_triu(q, k, v):
    lq, lk = q.shape[-2], k.shape[-2]
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    s = s.masked_fill(torch.triu(torch.ones(lq, lk, dtype=torch.bool), diagonal=lk - lq + 1), NEG_INF)
    return s.softmax(-1) @ v


def causal_rect_arange(q, k, v):
    lq, lk = q.shape[-2], k.shape[-2]
    i, j = torch.arange(lq)[:, None] + (lk - lq), torch.arange(lk)[None, :]
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    return torch.where(j <= i, s, NEG_INF).softmax(-1) @ v


@pytest.mark.parametrize("fn", [causal_rect_triu, causal_rect_arange], ids=lambda f: f.__name__)
def test_causal_lq_ne_lk(fn):
    check(fn, *qkv(lq=6, lk=L), expect=["mask=causal", f"diag={L - 6}"])


# --- soft-capping ---------------------------------------------------------------------

def softcap_div(q, k, v):
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    return torch.softmax(30.0 * torch.tanh(s / 30.0), -1) @ v


def softcap_mul_causal(q, k, v):
    l = q.shape[-2]
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    s = torch.tanh(s * (1 / 30.0)) * 30.0
    return torch.softmax(s.masked_fill(causal_bool(l), NEG_INF), -1) @ v


@pytest.mark.parametrize("fn", [softcap_div, softcap_mul_causal], ids=lambda f: f.__name__)
def test_softcap(fn):
    # small inputs scaled up so the cap is reached
    q, k, v = (x.detach().mul(4.0).requires_grad_() for x in qkv())
    check(fn, q, k, v, expect=["softcap=30.0"])


# --- a whole module: projections, heads, causal, parameter gradients --------------------

class CausalSelfAttention(torch.nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(torch.tril(torch.ones(t, t)).view(1, 1, t, t) == 0, NEG_INF)
        y = F.softmax(att, dim=-1) @ v
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


def test_module_with_parameters():
    check(CausalSelfAttention(), torch.randn(B, 12, 32, requires_grad=True), expect=["mask=causal"], options=AOT)



def test_attention_output_feeds_the_next_attention_directly():
    # the second op's q is the first op's result (chained IR nodes)
    def f(q, k, v):
        a = torch.softmax(q @ k.transpose(-2, -1) * 0.125, -1) @ v
        return torch.softmax(a @ k.transpose(-2, -1) * 0.125, -1) @ v
    report = check_against_eager(f, *qkv(), options=EAGER)
    assert report.count("attention") == 2
