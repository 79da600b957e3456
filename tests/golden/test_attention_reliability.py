"""Attention reliability: calls a fast path cannot compute exactly are refused (the reason is in
``seqfuse.fallbacks()``), rewrites that cannot be proven equal to the program are near misses, and
the compiled program gives eager's outputs, NaN positions, gradients and errors (issue 13).

Each test compares with eager directly (values, NaN positions, dtypes, gradients) and checks the
report: which path ran, or the near miss."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import seqfuse
from seqfuse.runtime.counters import counters, fallbacks

BOUND = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _clone(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().clone().requires_grad_(x.requires_grad)
    return x


def compare(fn, *inputs, options=None, bound=None):
    """Run ``fn`` eagerly and through seqfuse; outputs and gradients must agree (NaN at the same
    positions, values within ``bound`` relative RMS elsewhere).  Returns the report."""
    options = dict(options or {})
    options.setdefault("downstream", "aot_eager")
    ref_in, cmp_in = [_clone(x) for x in inputs], [_clone(x) for x in inputs]
    ref = fn(*ref_in)
    report = seqfuse.explain(fn, *cmp_in, options=options)
    out = report.output
    pairs = [("output", out, ref)]
    leaves = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.requires_grad]
    if leaves:
        g = torch.randn_like(ref, dtype=torch.float64).to(ref.dtype)
        rg = torch.autograd.grad(ref, [ref_in[i] for i in leaves], g, allow_unused=True)
        cg = torch.autograd.grad(out, [cmp_in[i] for i in leaves], g, allow_unused=True)
        pairs += [(f"grad {i}", c, r) for i, c, r in zip(leaves, cg, rg)]
    for name, got, want in pairs:
        assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, want.dtype, got.shape)
        assert torch.equal(got.isnan(), want.isnan()), f"{name}: NaN positions differ"
        assert torch.equal(got.isinf(), want.isinf()), f"{name}: inf positions differ"
        fin = want.isfinite()
        if fin.any():
            w, gt = want[fin].double(), got[fin].double()
            err = (gt - w).norm().item() / max(w.norm().item(), 1e-30)
            assert err <= (bound or BOUND[want.dtype]), f"{name}: relative error {err:.3g}"
    return report


def ran(path: str, kind: str = "attention") -> int:
    return counters().get(kind, {}).get(path, 0)


def refused(text: str) -> bool:
    return any(text in reason for reason in fallbacks().get("attention", {}))


def causal_attention(q, k, v):
    L = q.shape[-2]
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    s = s.masked_fill(torch.triu(torch.ones(L, k.shape[-2], dtype=torch.bool), 1), float("-inf"))
    return s.softmax(-1) @ v


def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


# --- 1. a sliced head dim on the CPU flash kernel ------------------------------------------

def sliced_inside(q, k, v):
    # the op reads views whose last axis has stride 2
    return causal_attention(q[..., ::2], k[..., ::2], v[..., ::2])


def sliced_inside_sdpa(q, k, v):
    return F.scaled_dot_product_attention(q[..., ::2], k[..., ::2], v[..., ::2], is_causal=True)


@pytest.mark.parametrize("fn", [sliced_inside, sliced_inside_sdpa])
def test_strided_head_dim_on_the_flash_kernel(fn):
    q, k, v = (torch.randn(2, 3, 9, 32, requires_grad=True) for _ in range(3))
    report = compare(fn, q, k, v)
    assert report.count("attention") == 1
    assert ran("aten") == 1 and ran("aten", "attention_backward") == 1


def test_flash_inputs_get_unit_stride():
    from seqfuse.lowering.aten import attention as aten_attention
    q, k, v = (torch.randn(1, 2, 8, 8)[..., ::2] for _ in range(3))
    a = dict(scale=None, mask="causal", diag=0, window=0, fill=-math.inf, bias_after_mask=False, gqa_groups=1,
             softcap=None, dropout=0.0, empty_rows="nan")
    out, _ = aten_attention.forward(q, k, v, None, None, a)
    ref = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), is_causal=True)
    torch.testing.assert_close(out, ref)


# --- 2. causal attention with a scale <= 0 ----------------------------------------------------

@pytest.mark.parametrize("c", [-0.5, 0.0])
def test_causal_non_positive_scale(c):
    def fn(q, k, v):
        L = q.shape[-2]
        s = (q @ k.mT) * c
        return s.masked_fill(torch.triu(torch.ones(L, L, dtype=torch.bool), 1), float("-inf")).softmax(-1) @ v
    q, k, v = (torch.randn(1, 2, 6, 4, requires_grad=True) for _ in range(3))
    report = compare(fn, q, k, v)
    assert report.count("attention") == 1
    assert refused("is not positive")


# --- 3. 16-bit fills and biases round as in the program ---------------------------------------

def bf16_fill_and_padding(q, k, v, m):
    s = q @ k.mT * 0.5
    L = q.shape[-2]
    s = s.masked_fill(torch.triu(torch.ones(L, L, dtype=torch.bool), 1), -1e4)
    s = s + (1 - m[:, None, None, :].to(s.dtype)) * -1e4
    return s.softmax(-1) @ v


def fp16_finfo_padding(q, k, v, m):
    s = q @ k.mT * 0.5
    s = s + (1 - m[:, None, None, :]) * torch.finfo(torch.float16).min
    return s.softmax(-1) @ v


@pytest.mark.parametrize("runtime", ["auto", "eager"])
def test_bf16_fill_and_padding_bias_round_as_the_program(runtime):
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 2, 6, 4, dtype=torch.bfloat16) * 3 for _ in range(3))
    m = torch.ones(2, 6, dtype=torch.bfloat16)
    m[1, 3:] = 0
    report = compare(bf16_fill_and_padding, q, k, v, m, options={"runtime": runtime})
    assert report.count("attention") == 1
    assert "fill=-9984.0" in report.rewrites[0].ir  # -1e4 as bf16 holds it


@pytest.mark.parametrize("runtime", ["auto", "aten", "eager"])
def test_fp16_finfo_min_padding_with_a_fully_padded_row(runtime):
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 2, 6, 4, dtype=torch.float16) for _ in range(3))
    m = torch.ones(2, 6, dtype=torch.float16)
    m[1] = 0
    report = compare(fp16_finfo_padding, q, k, v, m, options={"runtime": runtime})
    assert report.count("attention") == 1
    if runtime != "eager":
        assert refused("the program rounds s + bias")


def test_bf16_padding_bias_keeps_the_fast_path_on_ordinary_rows():
    torch.manual_seed(5)
    q, k, v = (torch.randn(2, 2, 6, 8, dtype=torch.bfloat16) for _ in range(3))
    m = torch.ones(2, 6, dtype=torch.bfloat16)
    m[1, 4:] = 0

    def fn(q, k, v, m):
        s = q @ k.mT * 0.35
        s = s + (1 - m[:, None, None, :]) * torch.finfo(torch.bfloat16).min
        return s.softmax(-1) @ v
    compare(fn, q, k, v, m)
    assert ran("aten") == 1


# --- 4 / 6. NaN and inf inputs -----------------------------------------------------------------

def padded_attention(q, k, v, keep):
    s = q @ k.mT * 0.5
    return s.masked_fill(~keep[:, None, None, :], float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("where", ["q", "k0", "v_masked"])
def test_nan_propagates_as_in_the_program(where):
    q, k, v = (torch.randn(1, 1, 4, 4) for _ in range(3))
    if where == "q":
        q[0, 0, 1, 2] = math.nan
    elif where == "k0":
        k[0, 0, 0, 1] = math.nan
    else:
        v[0, 0, 3, 0] = math.nan  # only row 3 attends key 3, but 0·NaN reaches every row's column 0
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    report = compare(causal_attention, q, k, v)
    assert report.count("attention") == 1
    assert refused("NaN or inf")


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_nonfinite_masked_out_key_does_not_poison(value):
    q, k, v = (torch.randn(2, 2, 5, 4) for _ in range(3))
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[0, 4] = False
    k[0, 1, 4, 0] = value
    report = compare(padded_attention, q, k, v, keep)
    assert report.count("attention") == 1
    assert refused("NaN or inf")


def additive_causal(q, k, v):
    L = q.shape[-2]
    s = q @ k.mT * 0.5
    return (s + torch.full((L, L), float("-inf")).triu(1)).softmax(-1) @ v


def test_additive_mask_propagates_nan_at_masked_keys():
    # s + (-inf) is NaN where s is NaN: every row reads the NaN key through the additive mask
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    k[0, 0, 3, 1] = math.nan
    report = compare(additive_causal, q, k, v)
    assert report.count("attention") == 1


def test_nan_bias_is_refused_by_the_fast_paths():
    def fn(q, k, v, b):
        return (q @ k.mT * 0.5 + b).softmax(-1) @ v
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    b = torch.zeros(5, 5)
    b[2, 3] = math.nan
    compare(fn, q, k, v, b)
    assert refused("bias holds a NaN")


# --- 5. fp64 programs that take the softmax in fp32 --------------------------------------------

def fp64_softmax_in_fp32(q, k, v, m):
    s = q @ k.mT * 0.5 + (1 - m[:, None, None, :]) * torch.finfo(torch.float64).min
    return F.softmax(s, -1, dtype=torch.float32).to(q.dtype) @ v


def test_narrowing_softmax_dtype_is_a_near_miss():
    q, k, v = (torch.randn(2, 2, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    m = torch.ones(2, 6, dtype=torch.float64)
    m[1] = 0
    report = compare(fp64_softmax_in_fp32, q, k, v, m)
    assert report.count("attention") == 0
    assert any("narrows the scores" in n.reason for n in report.near_misses)


def test_narrowing_cast_of_the_scores_is_a_near_miss():
    def fn(q, k, v):
        s = (q @ k.mT * 0.5).float()
        return s.softmax(-1).to(q.dtype) @ v
    q, k, v = (torch.randn(2, 2, 6, 4, dtype=torch.float64) for _ in range(3))
    report = compare(fn, q, k, v)
    assert report.count("attention") == 0
    assert any("narrowed" in n.reason for n in report.near_misses)


def test_widening_softmax_dtype_is_still_attention():
    def fn(q, k, v):
        s = q @ k.mT * 0.5
        return F.softmax(s, -1, dtype=torch.float32).to(q.dtype) @ v
    q, k, v = (torch.randn(2, 2, 6, 8, dtype=torch.bfloat16) for _ in range(3))
    report = compare(fn, q, k, v)
    assert report.count("attention") == 1


# --- 10. empty sequences ------------------------------------------------------------------------

@pytest.mark.parametrize("lq,lk", [(0, 4), (3, 0), (0, 0)])
@pytest.mark.parametrize("spelling", ["hand", "sdpa"])
def test_empty_sequences(lq, lk, spelling):
    q = torch.randn(1, 2, lq, 4, requires_grad=True)
    k, v = (torch.randn(1, 2, lk, 4, requires_grad=True) for _ in range(2))

    def hand(q, k, v):
        return (q @ k.mT * 0.5).softmax(-1) @ v
    fn = hand if spelling == "hand" else (lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
    compare(fn, q, k, v)
    assert ran("aten") == 0


# --- 13. a fill the scores' dtype cannot hold -----------------------------------------------

def test_fp16_masked_fill_that_overflows_still_raises():
    def fn(q, k, v):
        L = q.shape[-2]
        s = q @ k.mT
        return s.masked_fill(torch.triu(torch.ones(L, L, dtype=torch.bool), 1), -1e9).softmax(-1) @ v
    q, k, v = (torch.randn(1, 1, 4, 4, dtype=torch.float16) for _ in range(3))
    with pytest.raises(Exception, match="cannot be converted"):
        fn(q, k, v)
    with pytest.raises(Exception, match="cannot be converted"):
        seqfuse.explain(fn, q, k, v, options={"downstream": "aot_eager"})


def test_fp16_where_with_an_overflowing_fill_is_minus_inf():
    def fn(q, k, v):
        L = q.shape[-2]
        s = q @ k.mT
        return torch.where(torch.tril(torch.ones(L, L, dtype=torch.bool)), s, -1e9).softmax(-1) @ v
    q, k, v = (torch.randn(1, 1, 4, 4, dtype=torch.float16) for _ in range(3))
    report = compare(fn, q, k, v)
    assert report.count("attention") == 1
    assert "fill=-inf" in report.rewrites[0].ir


# --- found by the fuzzer ---------------------------------------------------------------------------

@pytest.mark.parametrize("lq,lk", [(10, 7), (1, 22)])
def test_sdpa_is_causal_with_different_lengths_is_left_to_sdpa(lq, lk):
    # SDPA's is_causal with Lq != Lk follows its own kernels' rules (NaN rows on CPU for Lq > Lk)
    q = torch.randn(2, 2, lq, 3, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, lk, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    report = compare(sdpa_causal, q, k, v)
    assert report.count("attention") == 0
    assert any("is_causal" in n.reason for n in report.near_misses)


def test_bf16_nan_rows_as_the_programs_gemm_spreads_them():
    # CPU bf16 GEMMs spread a NaN row of p to the row packed with it: the program's NaN positions
    # (outputs and gradients) are the contract, so with NaN inputs the reference multiplies in bf16
    torch.manual_seed(11)
    q, k = torch.randn(1, 1, 41, 8, dtype=torch.bfloat16), torch.randn(1, 1, 53, 8, dtype=torch.bfloat16)
    v = torch.randn(1, 1, 53, 7, dtype=torch.bfloat16)
    q[0, 0, 4, 5] = math.nan
    keep = torch.zeros(1, 53, dtype=torch.bool)
    keep[0, :20] = True

    def fn(q, k, v, keep):
        s = (q @ k.mT * 0.35).masked_fill(~keep[:, None, None, :], float("-inf"))
        return F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v
    v.requires_grad_()
    report = compare(fn, q, k, v, keep)
    assert report.count("attention") == 1


@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_sdpa_with_nonfinite_keys_follows_sdpa(value):
    # SDPA's own kernels decide where a NaN / inf reaches (outputs and gradients): the eager path of
    # a lifted SDPA call with such inputs runs SDPA
    torch.manual_seed(12)
    q = torch.randn(1, 4, 32, 8, requires_grad=True)
    k, v = torch.randn(1, 2, 62, 8), torch.randn(1, 2, 62, 8, requires_grad=True)
    k[0, 1, 7, 3] = value
    k.requires_grad_()
    report = compare(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), q, k, v)
    assert report.count("attention") == 1
    assert refused("NaN or inf")


def test_sdpa_shape_only_mask_stays_a_tensor():
    def fn(q, k, v):
        l = q.shape[-2]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(l, l, dtype=torch.bool).tril())
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    k[0, 0, 5, 0] = math.nan  # masked for rows 0..4 by SDPA's additive mask: NaN there anyway
    report = compare(fn, q, k, v)
    assert "keep=%" in report.rewrites[0].ir


def test_bf16_finite_fill_then_bias_on_a_fully_masked_row_on_triton():
    # fill + bias rounds to bf16 on a row the causal mask empties (KV-cache offset < 0): every key
    # sits at round(-9984 + b), which the triton kernels (fp32) would not reproduce: refused
    pytest.importorskip("triton")
    import os

    def fn(q, k, v, b):
        lq, lk = q.shape[-2], k.shape[-2]
        s = (q @ k.mT * 0.5).masked_fill(torch.triu(torch.ones(lq, lk, dtype=torch.bool), -1), -1e4)
        return (s + b).softmax(-1) @ v
    torch.manual_seed(13)
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.bfloat16) for _ in range(3))
    b = (torch.randn(5, 5) * 8).to(torch.bfloat16)
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        compare(fn, q, k, v, b, options={"runtime": "triton"})
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


@pytest.mark.parametrize("b,d", [(1, 8), (2, 1)])
def test_bmm_with_a_batch_or_head_dim_of_one(b, d):
    # canonicalization folds a size-1 batch (or head dim) into the contraction as an axis summed by
    # one operand alone: attention all the same (was a near miss: "the value contraction is not p·v")
    def fn(q, k, v):
        bb, h, lq, dd = q.shape
        s = torch.bmm(q.reshape(bb * h, lq, dd), k.reshape(bb * h, k.shape[-2], dd).transpose(1, 2)) * 0.3
        s = s.masked_fill(torch.triu(torch.ones(lq, lq, dtype=torch.bool), 1), float("-inf"))
        o = torch.bmm(s.softmax(-1), v.reshape(-1, v.shape[-2], v.shape[-1]))
        return o.reshape(q.shape[0], -1, lq, v.shape[-1])
    q, k, v = (torch.randn(b, 4, 19, d, requires_grad=True) for _ in range(3))
    report = compare(fn, q, k, v)
    assert report.count("attention") == 1, report.near_misses


def _large_scores(q, k, v):
    L = q.shape[-2]
    s = torch.matmul(q, k.transpose(-2, -1)) / 0.5
    s = torch.where(torch.tril(torch.ones(L, L, dtype=torch.bool)), s, float("-inf"))
    return F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


@pytest.mark.parametrize("runtime", ["auto", "triton"])
def test_backward_with_scores_of_a_thousand(runtime, monkeypatch):
    # rows whose log-sum-exp is ~10³: P = exp(s - lse) from the fp32 lse is off by 2^-24·|lse| in a
    # whole row (dv 10x eager's error on the flash backward): refused there, exact stats on triton
    from fuzz.check import Case, run_case
    if runtime == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        shape = (1, 2, 20, 16)
    else:
        shape = (1, 2, 65, 64)
    g = torch.Generator().manual_seed(960)
    q = (torch.randn(*shape, generator=g) * 30).requires_grad_()
    k, v = (torch.randn(*shape, generator=g).requires_grad_() for _ in range(2))
    outcome = run_case(Case("attention", "large_scores", _large_scores, (q, k, v), "attention",
                            {"runtime": runtime}, 960))
    assert outcome.status == "ok", outcome.detail
    if runtime == "auto":
        assert refused("row log-sum-exp")


@pytest.mark.parametrize("runtime", ["aten", "triton"])
@pytest.mark.parametrize("scale", [-0.2, 0.0])
def test_sdpa_is_causal_with_a_non_positive_scale_is_what_sdpa_returns(scale, runtime, monkeypatch):
    # SDPA's own CPU kernel gives NaN rows for is_causal with scale <= 0 (item 2's kernel defect):
    # the program is what SDPA returns, so the lifted call runs SDPA itself there (the triton
    # kernels too refuse it: fuzzer seed 91 attention #229, bf16, finite rows where SDPA has NaN)
    if runtime == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = (torch.randn(2, 2, 14, 4, requires_grad=True) for _ in range(3))
    report = compare(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale),
                     q, k, v, options={"runtime": runtime})
    assert report.count("attention") == 1
    assert refused("is_causal with scale <= 0" if runtime == "triton" else "is not positive")


def _causal_sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _softcap_finite_fill_fp32_softmax(q, k, v):
    lq, lk = q.shape[-2], k.shape[-2]
    s = 30.0 * torch.tanh((q @ k.mT) / 30.0)
    s = s.masked_fill(torch.triu(torch.ones(lq, lk, dtype=torch.bool), 1 + lk - lq), -1e4)
    return F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


_HEAD_DIM_ONE = {
    # fuzzer seed 71, attention #24 (triton): dQ 0.045 vs eager's 0.0046
    "bf16_causal": (_causal_sdpa, torch.bfloat16, 2103368691, (1, 1, 8, 1), (1, 1, 8, 1), [
        [0.373, 0.6641, -0.7148, -0.6445, 1.4531, 2.3125, -0.2031, 1.0469],
        [1.9141, 1.0, -0.3574, 0.6523, 0.8633, 0.5938, -1.2266, -1.0234],
        [0.3145, -0.2812, 0.166, 1.9219, 1.0156, -0.9688, 1.0156, -0.207]]),
    # fuzzer seed 31, attention #10 (triton): dK 0.023 vs eager's 0.00026
    "fp16_softcap_fill": (_softcap_finite_fill_fp32_softmax, torch.float16, 301018820, (2, 1, 8, 1), (2, 1, 3, 1), [
        [42.4375, 31.734375, 37.84375, -14.40625, -18.5, -25.125, 0.44775390625, 3.66015625, -25.25, 23.234375,
         15.8203125, -23.015625, -9.734375, 12.4140625, -11.40625, 67.5625],
        [1.03515625, -3.25390625, 1.0947265625, -0.218994140625, 0.76416015625, -0.314208984375],
        [1.244140625, 1.40234375, -0.4453125, -0.5810546875, 0.61572265625, 0.1630859375]]),
}


@pytest.mark.parametrize("name", sorted(_HEAD_DIM_ONE))
def test_triton_backward_with_head_dim_one_takes_delta_from_the_probabilities(name, monkeypatch):
    # Δ = rowsum(dO ∘ O) off a 16-bit output carries O's rounding, and with one value channel nothing
    # averages it: dQ / dK came out 10-90x eager's error.  The dQ kernel computes Δ = Σ_j P_ij dP_ij
    # from the fp32 probabilities for value head dims below 16.
    pytest.importorskip("triton")
    from fuzz.check import Case, run_case
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fn, dtype, seed, qshape, kshape, values = _HEAD_DIM_ONE[name]
    q, k, v = (torch.tensor(x, dtype=dtype).reshape(s).requires_grad_()
               for x, s in zip(values, (qshape, kshape, kshape)))
    outcome = run_case(Case("attention", name, fn, (q, k, v), "attention", {"runtime": "triton"}, seed))
    assert outcome.status == "ok", outcome.detail
    assert "'attention_backward': {'triton': 1}" in outcome.detail, outcome.detail


# --- inputs the CPU flash kernel takes once folded to 4-D (issue 15: 5-D GQA ran the reference) ----

def _gqa_5d(q, k, v):
    # (B, Hkv, G, L, D) queries against (B, Hkv, 1, L, D) keys / values broadcast over the group axis
    b, h, lq, d = q.shape
    q5 = q.reshape(b, 2, h // 2, lq, d)
    s = q5 @ k[:, :, None].mT * 0.125
    s = s.masked_fill(torch.ones(lq, k.shape[-2], dtype=torch.bool).triu(1), float("-inf"))
    return (s.softmax(-1) @ v[:, :, None]).reshape(b, h, lq, v.shape[-1])


def _kv_shared_by_the_batch(q, k, v):
    s = q @ k.mT * 0.2
    return s.softmax(-1) @ v


@pytest.mark.parametrize("fn,kv_shape", [(_gqa_5d, (2, 2, 33, 16)), (_kv_shared_by_the_batch, (1, 4, 33, 16))])
def test_cpu_flash_kernel_takes_folded_batch_axes(fn, kv_shape):
    torch.manual_seed(14)
    q = torch.randn(2, 4, 33, 16, requires_grad=True)
    k, v = (torch.randn(kv_shape, requires_grad=True) for _ in range(2))
    report = compare(fn, q, k, v)
    assert report.count("attention") == 1
    assert counters()["attention"]["aten"] == 1 and counters()["attention_backward"]["aten"] == 1, counters()


def test_triton_fp32_backward_with_head_dim_one_runs_the_reference(monkeypatch):
    # fuzzer seed 101 attention #21: a causal row with p = (5e-4, 0.9995) and one value channel;
    # the flash backward's dP − Δ cancels in fp32 (dQ 4.2e-4 against eager's 1.5e-7)
    pytest.importorskip("triton")
    from fuzz.check import Case, run_case
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def fn(q, k, v):
        lq, lk = q.shape[-2], k.shape[-2]
        s = torch.matmul(q, k.mT).masked_fill(torch.triu(torch.ones(lq, lk, dtype=torch.bool), 1), -65504.0)
        return F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v
    q = torch.tensor([-19.11688232421875, -46.06162643432617, -33.63309860229492, -14.181985855102539])
    k = torch.tensor([-0.2933899760246277, -0.4573638141155243, -0.5734003782272339, 0.4496689438819885])
    v = torch.tensor([0.42924150824546814, -0.8657845854759216, 1.6782853603363037, 0.08542138338088989])
    q, k, v = (x.reshape(2, 1, 2, 1).requires_grad_() for x in (q, k, v))
    outcome = run_case(Case("attention", "fp32_head_dim_one", fn, (q, k, v), "attention", {"runtime": "triton"},
                            54152247))
    assert outcome.status == "ok", outcome.detail
    assert "'attention': {'triton': 1}" in outcome.detail and "'attention_backward': {'eager': 1}" in outcome.detail


def test_cpu_fp32_flash_backward_with_head_dim_three_runs_the_reference():
    # fuzzer seed 121 attention #188: a window of 2 over 3 positions with large queries (near one-hot
    # rows) and 3 value channels: the flash backward's dP − Δ cancels (dk 1.9e-5 vs eager's 1.6e-6)
    from fuzz.check import Case, run_case

    def fn(q, k, v):
        s = (q @ k.transpose(-2, -1)) * 0.5773502691896257
        i, j = torch.arange(3)[:, None], torch.arange(3)[None, :]
        return s.masked_fill((j > i) | (j <= i - 2), float("-inf")).softmax(-1) @ v
    q = torch.tensor([18.588449478149414, 37.570465087890625, -24.29387855529785, 3.3913424015045166,
                      -10.98724365234375, 34.46799087524414, -4.382644176483154, -54.21438980102539,
                      8.844949722290039, 57.396705627441406, -4.911733150482178, -7.971248149871826,
                      -22.629884719848633, -25.658079147338867, 36.34135818481445, 9.818921089172363,
                      17.804656982421875, 27.77827262878418]).reshape(2, 1, 3, 3)
    k = torch.tensor([0.33606719970703125, -0.7880393266677856, -0.2351764589548111, -0.3987824618816376,
                      -0.338924378156662, -0.18219803273677826, -0.7910298705101013, -0.2712622880935669,
                      -1.0302000045776367, -0.7441954612731934, -0.9725040197372437, 0.07779210805892944,
                      1.6228301525115967, -1.023932933807373, 0.6983858346939087, 0.5915952920913696,
                      -1.270911693572998, -0.3008372485637665]).reshape(2, 1, 3, 3).requires_grad_()
    v = torch.tensor([-1.4141345024108887, 0.0659499391913414, -0.11072476953268051, -0.31580761075019836,
                      -1.5018666982650757, -1.6462193727493286, -1.6401188373565674, 1.3499950170516968,
                      0.9886354804039001, 0.35227712988853455, -0.2308603674173355, 0.9993019700050354,
                      0.28180795907974243, 1.8757606744766235, -0.5429700016975403, -0.04324808344244957,
                      0.5152457356452942, -0.07228325307369232]).reshape(2, 1, 3, 3).requires_grad_()
    outcome = run_case(Case("attention", "window_head_dim_three", fn, (q, k, v), "attention", {}, 84928557))
    assert outcome.status == "ok", outcome.detail
    assert "'attention': {'aten': 1}" in outcome.detail and "'attention_backward': {'eager': 1}" in outcome.detail
