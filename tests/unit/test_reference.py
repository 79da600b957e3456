"""The attention reference against the formula written out directly, and the ATen (SDPA)
implementation against the reference wherever its ``supports`` accepts the call."""
import math

import pytest
import torch

from helpers import BOUND, rel_err
from seqfuse.lowering.aten import attention as aten_attention
from seqfuse.lowering.aten.attention import attention_sdpa, supports
from seqfuse.lowering.reference.attention import attention_reference

NEG_INF = -math.inf
DEFAULTS = dict(scale=None, mask="none", diag=0, window=0, fill=NEG_INF, bias_after_mask=False, gqa_groups=1,
                softcap=None, dropout=0.0)


def direct(q, k, v, bias=None, keep=None, *, scale=None, mask="none", diag=0, window=0, fill=NEG_INF,
           bias_after_mask=False, gqa_groups=1, softcap=None, dropout=0.0):
    """The math of seqfuse.attention in fp64, written element-wise where the reference uses helpers."""
    assert dropout == 0.0
    q, k, v = q.double(), k.double(), v.double()
    lq, lk = q.shape[-2], k.shape[-2]
    if gqa_groups > 1:  # query head h reads kv head h // g
        heads = torch.arange(q.shape[-3]) // gqa_groups
        k, v = k.index_select(-3, heads), v.index_select(-3, heads)
    c = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("...id,...jd->...ij", q, k) * c
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    allowed = torch.ones(lq, lk, dtype=torch.bool)
    for i in range(lq):
        for j in range(lk):
            if mask in ("causal", "window") and j > i + diag:
                allowed[i, j] = False
            if mask == "window" and j <= i + diag - window:
                allowed[i, j] = False
    if keep is not None:
        allowed = allowed & keep
    b = torch.zeros(()) if bias is None else bias.double()
    if not bias_after_mask:
        s = torch.where(allowed, s + b, torch.full((), fill, dtype=torch.float64))
    else:
        s = torch.where(allowed, s, torch.full((), fill, dtype=torch.float64)) + b
    e = torch.exp(s - s.amax(-1, keepdim=True))
    p = e / e.sum(-1, keepdim=True)
    return torch.einsum("...ij,...je->...ie", p, v)


def close(out, ref, bound):
    """Same NaN positions (rows a mask empties), and relative RMS error below ``bound`` elsewhere."""
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(out), nan)
    e = rel_err(out[~nan], ref[~nan])
    assert e < bound, f"relative error {e:.3g} >= {bound:g}"


def inputs(b=2, h=4, lq=8, lk=8, d=16, dv=16, hkv=None, dtype=torch.float32, bias_shape=None, keep_shape=None,
           seed=0):
    g = torch.Generator().manual_seed(seed)
    hkv = hkv or h
    q = torch.randn(b, h, lq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, lk, dv, generator=g).to(dtype)
    bias = torch.randn(*bias_shape, generator=g) if bias_shape else None
    keep = None
    if keep_shape:
        keep = torch.rand(*keep_shape, generator=g) < 0.7
        keep[..., 0] = True  # no row left empty by the tensor mask
    return q, k, v, bias, keep


# name -> (input kwargs, attribute kwargs)
CASES = {
    "plain": ({}, {}),
    "scale": ({}, dict(scale=0.3)),
    "causal": ({}, dict(mask="causal")),
    "causal_diag_neg": ({}, dict(mask="causal", diag=-2)),            # first two rows empty -> NaN
    "causal_diag_neg_finite": ({}, dict(mask="causal", diag=-2, fill=-1e9)),
    "causal_diag_pos": ({}, dict(mask="causal", diag=3)),
    "window": ({}, dict(mask="window", window=3)),
    "window_diag": ({}, dict(mask="window", diag=2, window=4)),
    "causal_lq_lt_lk": (dict(lq=5, lk=11), dict(mask="causal", diag=6)),
    "causal_lq_gt_lk": (dict(lq=11, lk=5), dict(mask="causal")),
    "window_lq_ne_lk": (dict(lq=6, lk=10), dict(mask="window", diag=4, window=3)),
    "keep": (dict(keep_shape=(2, 1, 1, 8)), {}),
    "keep_full": (dict(keep_shape=(2, 4, 8, 8)), dict(mask="causal")),
    "bias": (dict(bias_shape=(1, 4, 8, 8)), dict(scale=0.5)),
    "bias_causal": (dict(bias_shape=(8, 8)), dict(mask="causal")),
    "bias_before_finite_fill": (dict(bias_shape=(2, 4, 8, 8), keep_shape=(2, 1, 1, 8)),
                                dict(mask="causal", fill=-3.0)),
    "bias_after_finite_fill": (dict(bias_shape=(2, 4, 8, 8), keep_shape=(2, 1, 1, 8)),
                               dict(mask="causal", fill=-3.0, bias_after_mask=True)),
    "finite_fill_very_negative": ({}, dict(mask="causal", fill=-1e9)),
    "softcap": ({}, dict(scale=1.0, softcap=2.0)),
    "gqa2": (dict(hkv=2), dict(gqa_groups=2, mask="causal")),
    "mqa": (dict(hkv=1), dict(gqa_groups=4)),
    "dv_ne_d": (dict(dv=5, lk=12), {}),
    "fp16": (dict(dtype=torch.float16), dict(mask="causal")),
    "bf16": (dict(dtype=torch.bfloat16, bias_shape=(8, 8)), dict(mask="window", window=3)),
    "fp16_gqa_softcap": (dict(dtype=torch.float16, hkv=2), dict(gqa_groups=2, softcap=5.0)),
}


def _bound(dtype):
    # the reference accumulates in fp32 and rounds its output to the input dtype
    return BOUND[torch.float32] if dtype == torch.float32 else BOUND[dtype]


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_matches_formula(name):
    kw, attrs = CASES[name]
    q, k, v, bias, keep = inputs(**kw)
    a = {**DEFAULTS, **attrs}
    out = attention_reference(q, k, v, bias, keep, **a)
    assert out.dtype == v.dtype
    assert out.shape == (*q.shape[:-1], v.shape[-1])
    close(out, direct(q, k, v, bias, keep, **a), _bound(q.dtype))


def test_rank3_inputs():
    q, k, v = torch.randn(3, 7, 8), torch.randn(3, 9, 8), torch.randn(3, 9, 4)
    close(attention_reference(q, k, v, mask="causal", diag=1), direct(q, k, v, mask="causal", diag=1), 1e-5)


def test_attributes_have_an_effect():
    """Guard against a formula that ignores an attribute: each changes the result."""
    q, k, v, bias, keep = inputs(bias_shape=(2, 4, 8, 8), keep_shape=(2, 1, 1, 8))
    base = attention_reference(q, k, v, bias, keep, mask="causal", fill=-3.0)
    for change in (dict(bias_after_mask=True), dict(scale=0.1), dict(softcap=0.5), dict(fill=-30.0),
                   dict(diag=1), dict(mask="window", window=2)):
        other = attention_reference(q, k, v, bias, keep, **{**dict(mask="causal", fill=-3.0), **change})
        assert rel_err(other, base) > 1e-3, change


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v, _, _ = inputs(d=16)
    close(attention_reference(q, k, v), attention_reference(q, k, v, scale=0.25), 1e-7)


# --- the aten implementation -------------------------------------------------------

def _tensors(q, k, v, bias, keep):
    return dict(q=q, k=k, v=v, bias=bias, keep=keep)


@pytest.mark.parametrize("name", sorted(CASES))
def test_sdpa_matches_reference_where_supported(name):
    kw, attrs = CASES[name]
    q, k, v, bias, keep = inputs(**kw)
    a = {**DEFAULTS, **attrs}
    reason = supports(_tensors(q, k, v, bias, keep), a)
    if reason is not None:
        assert isinstance(reason, str) and reason
        pytest.skip(f"aten refuses: {reason}")
    out = attention_sdpa(q, k, v, bias, keep, **a)
    assert out.dtype == v.dtype and out.shape == (*q.shape[:-1], v.shape[-1])
    close(out, attention_reference(q, k, v, bias, keep, **a), _bound(q.dtype))


@pytest.mark.parametrize("name", sorted(CASES))
def test_aten_forward_and_backward_match_reference(name):
    """The CPU flash path: (out, lse) forward and the fused backward, against the reference
    and autograd through it."""
    kw, attrs = CASES[name]
    q, k, v, bias, keep = inputs(**kw)
    a = {**DEFAULTS, **attrs}
    if supports(_tensors(q, k, v, bias, keep), a) is not None:
        pytest.skip("aten refuses")
    bound = _bound(q.dtype)
    out, lse = aten_attention.forward(q, k, v, bias, keep, a)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    ref, ref_lse = attention_reference(*leaves, bias, keep, return_lse=True, **a)
    assert out.shape == ref.shape and lse.shape == q.shape[:-1] and lse.dtype == torch.float32
    close(out, ref, bound)
    close(lse, ref_lse, bound)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, leaves, g)
    got = aten_attention.backward(g, q, k, v, bias, keep, out, lse, a)
    for i, (x, w) in enumerate(zip(got, want)):
        assert x.shape == w.shape, f"gradient {i}"
        close(x, w, bound)


def test_sdpa_accepts_the_common_cases():
    """The fast path must not refuse what it exists for (else the comparison above tests nothing)."""
    for name in ("plain", "scale", "causal", "causal_diag_pos", "window", "window_diag", "causal_lq_lt_lk",
                 "keep", "bias", "bias_causal", "gqa2", "mqa", "fp16", "bf16", "finite_fill_very_negative"):
        kw, attrs = CASES[name]
        q, k, v, bias, keep = inputs(**kw)
        if bias is not None and bias.dtype != q.dtype:
            # the kernel adds the bias in q's dtype: a wider bias (the program adds it in fp32) is refused
            reason = supports(_tensors(q, k, v, bias, keep), {**DEFAULTS, **attrs})
            assert reason is not None and "bias dtype" in reason, (name, reason)
            bias = bias.to(q.dtype)
        assert supports(_tensors(q, k, v, bias, keep), {**DEFAULTS, **attrs}) is None, name


@pytest.mark.parametrize("kw, attrs, words", [
    ({}, dict(dropout=0.1), "dropout"),
    ({}, dict(softcap=30.0), "softcap"),
    (dict(keep_shape=(2, 1, 1, 8)), dict(fill=-1e9), "fill"),               # finite fill with a tensor mask
    ({}, dict(mask="causal", fill=-3.0), "fill"),                            # finite fill that is not -inf-like
    ({}, dict(mask="causal", diag=-1), "rows empty"),                        # row 0 has no key
    (dict(lq=12, lk=5), dict(mask="window", window=2), "rows empty"),        # the window slides past the keys
    ({}, dict(mask="window", diag=-3, window=2), "rows empty"),
    (dict(dtype=torch.float64), {}, "dtypes"),
    (dict(dv=5, lk=12), {}, "value head dim"),                               # the CPU flash kernel needs Dv = D
])
def test_supports_refuses_with_a_reason(kw, attrs, words):
    q, k, v, bias, keep = inputs(**kw)
    reason = supports(_tensors(q, k, v, bias, keep), {**DEFAULTS, **attrs})
    assert isinstance(reason, str) and words in reason


def test_supports_refuses_gqa_on_rank3():
    q, k, v = torch.randn(4, 8, 16), torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    assert "GQA" in supports(_tensors(q, k, v, None, None), {**DEFAULTS, "gqa_groups": 2})


def test_sdpa_refuses_a_row_emptied_by_a_mask_tensor():
    """The fused kernels return 0 for an emptied row, the program NaN: such calls go to the reference."""
    q, k, v, _, _ = inputs()
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[3] = False
    assert "leaves a row empty" in supports(_tensors(q, k, v, None, keep), DEFAULTS)
    bias = torch.zeros(8, 8)
    bias[5] = float("-inf")
    assert "leaves a row empty" in supports(_tensors(q, k, v, bias, None), DEFAULTS)
    keep[3] = True
    assert supports(_tensors(q, k, v, None, keep), DEFAULTS) is None


def test_long_conv_reference_kernel_longer_than_signal():
    """Causal: taps at lags ≥ L never reach the first L outputs, on both algorithms."""
    from seqfuse.lowering.reference.long_conv import long_conv_reference
    u, k = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(3, 20, dtype=torch.float64)
    t = torch.arange(16)
    lag = t[:, None] - t[None, :]
    toeplitz = torch.where(lag >= 0, k[:, lag.clamp(min=0)], torch.zeros((), dtype=k.dtype))  # (3, 16, 16)
    want = torch.einsum("hts,bhs->bht", toeplitz, u)
    for algorithm in ("fft", "direct"):
        got = long_conv_reference(u, k, algorithm=algorithm)
        assert (got - want).abs().max() < 1e-10, algorithm


@pytest.mark.parametrize("B,kshape", [(1, (6, 4)), (3, (6, 4)), (2, (1, 6, 3))])
def test_long_conv_direct_on_a_transposed_signal_reads_it_in_place(B, kshape):
    """u (B, C, L) laid (B, L, C) in memory (a transposed projection): the direct convolution runs as a
    channels-last conv2d over that memory; the same values and gradients as on a contiguous copy, and
    the Toeplitz sum, whatever the layout."""
    from seqfuse.lowering.reference.long_conv import _per_channel, laid_transposed, long_conv_reference
    x = torch.randn(B, 16, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(*kshape, dtype=torch.float64, requires_grad=True)
    u = x.transpose(1, 2)
    assert _per_channel(u, k, u.shape[:-1]) and laid_transposed(u) and not laid_transposed(u.contiguous())
    got = long_conv_reference(u, k, algorithm="direct")
    want = long_conv_reference(u.contiguous(), k, algorithm="direct")
    t = torch.arange(16)
    lag = t[:, None] - t[None, :]
    kk = k.reshape(6, -1)
    kp = torch.cat([kk, kk.new_zeros(6, 16)], -1)
    toeplitz = torch.where(lag >= 0, kp[:, lag.clamp(min=0)], torch.zeros((), dtype=k.dtype))
    assert (got - torch.einsum("hts,bhs->bht", toeplitz, u)).abs().max() < 1e-10
    assert (got - want).abs().max() < 1e-12
    g = torch.randn_like(got)
    assert all(torch.allclose(a, b) for a, b in zip(torch.autograd.grad(got, (x, k), g),
                                                    torch.autograd.grad(want, (x, k), g)))
