"""Additive finite-fill masks (transformers 5 eager: ``where(keep, 0, finfo.min)`` added to the
scores): when such a bias may be replaced by the structural mask it encodes, for one call.

The program computes ``s + fill`` at masked positions, not a replacement; these tests pin the
run-time rule ``seqfuse.ir.masks.finite_fill_is_structural`` that a fused path must pass before
dropping the bias, against the program's own arithmetic.
"""
import math

import pytest
import torch

from seqfuse.ir.masks import finite_fill_is_structural, position_mask


def _program(q, k, scale, keep, dtype):
    """What transformers' eager attention computes: softmax(fp32)(q·kᵀ·scale + where(keep, 0, finfo.min))."""
    fill = torch.finfo(dtype).min
    s = (q @ k.transpose(-1, -2)) * scale
    bias = torch.where(keep, torch.tensor(0.0, dtype=dtype), torch.tensor(fill, dtype=dtype))
    return torch.softmax(s + bias, dim=-1, dtype=torch.float32)


def _structural(q, k, scale, keep):
    """The same scores with the mask replacing them (what a fused kernel with mask=causal/window does)."""
    s = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(s.masked_fill(~keep, -math.inf), dim=-1, dtype=torch.float32)


def _why(q, k, scale, dtype):
    return finite_fill_is_structural(scale, q.shape[-1], q.abs().max().item(), k.abs().max().item(),
                                     torch.finfo(dtype).min, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask,window", [("causal", 0), ("window", 3)])
def test_accepted_calls_equal_the_program_exactly(dtype, mask, window):
    # bounded finite scores, every row keeps a key: the rule accepts and the results are bitwise equal
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(2, 3, 9, 16, generator=g) * 4).to(dtype)
    k = (torch.randn(2, 3, 9, 16, generator=g) * 4).to(dtype)
    keep = position_mask(9, 9, mask, 0, window)
    assert _why(q, k, 0.25, dtype) is None
    assert torch.equal(_program(q, k, 0.25, keep, dtype), _structural(q, k, 0.25, keep))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_scores_are_refused(bad):
    # s + fill stays NaN where the score is NaN or +inf: the mask would drop it
    q = torch.randn(1, 1, 4, 8).abs() + 0.1   # positive, so an inf key gives s = +inf
    k = torch.randn(1, 1, 4, 8)
    k[0, 0, 3, 0] = bad                      # a masked key for rows 0..2 under causal
    keep = position_mask(4, 4, "causal")
    why = _why(q, k, 0.5, torch.float32)
    assert why is not None and "not finite" in why
    prog, struct = _program(q, k, 0.5, keep, torch.float32), _structural(q, k, 0.5, keep)
    assert prog[0, 0, 0].isnan().all() and not struct[0, 0, 0].isnan().any()


def test_huge_scores_are_refused_fp16():
    # fp16: fill = -65504; a masked score of +33000 beside a kept one of -33000 wins the softmax
    q = torch.tensor([[[[181.0], [181.0]]]], dtype=torch.float16)
    k = torch.tensor([[[[-181.0], [181.0]]]], dtype=torch.float16)  # s = ±32761 with scale 1
    keep = position_mask(2, 2, "causal")
    why = _why(q, k, 1.0, torch.float16)
    assert why is not None and "bound" in why
    prog, struct = _program(q, k, 1.0, keep, torch.float16), _structural(q, k, 1.0, keep)
    assert struct[0, 0, 0, 0] == 1 and prog[0, 0, 0, 1] > 0.5   # the program lets the masked key through


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rounding_margin_in_16_bit(dtype):
    # just inside the bound the program still gives the masked keys exactly 0; well past it, refused
    fill = torch.finfo(dtype).min
    # B = |fill|/5 is accepted (fill + 2B stays far below exp's underflow), B = |fill| is not
    assert finite_fill_is_structural(1.0, 1, (abs(fill) / 5) ** 0.5, (abs(fill) / 5) ** 0.5, fill, dtype) is None
    assert finite_fill_is_structural(1.0, 1, abs(fill) ** 0.5, abs(fill) ** 0.5, fill, dtype) is not None
    small = 30.0
    q = torch.full((1, 1, 3, 1), small ** 0.5, dtype=dtype)
    k = torch.tensor([-1.0, 1.0, 1.0], dtype=dtype).reshape(1, 1, 3, 1) * small ** 0.5
    keep = position_mask(3, 3, "causal")
    assert _why(q, k, 1.0, dtype) is None
    assert torch.equal(_program(q, k, 1.0, keep, dtype), _structural(q, k, 1.0, keep))


def test_fully_masked_row_differs():
    # the rule covers scores only: a row with no kept key is uniform in the program, so the
    # caller must also prove every row keeps a key (left padding makes such rows)
    q, k = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    keep = position_mask(3, 3, "causal") & torch.tensor([False, True, True])
    assert _why(q, k, 0.5, torch.float32) is None
    prog, struct = _program(q, k, 0.5, keep, torch.float32), _structural(q, k, 0.5, keep)
    assert torch.allclose(prog[0, 0, 0], torch.full((3,), 1 / 3)) and struct[0, 0, 0].isnan().all()


def test_small_fill_needs_the_margin_fp32():
    # fill -1e4 (older transformers) in fp32: scores of ±6000 fit fp32 easily but a masked one wins
    q = torch.tensor([[[[77.46], [77.46]]]])
    k = torch.tensor([[[[-77.46], [77.46]]]])              # s ≈ ±6000
    why = finite_fill_is_structural(1.0, 1, 77.46, 77.46, -1e4, torch.float32)
    assert why is not None and "too close" in why
    keep = position_mask(2, 2, "causal")
    s = q @ k.transpose(-1, -2)
    prog = torch.softmax(s + torch.where(keep, 0.0, -1e4), dim=-1)
    assert prog[0, 0, 0, 1] > 0.5 and _structural(q, k, 1.0, keep)[0, 0, 0, 1] == 0
    assert finite_fill_is_structural(1.0, 1, 5.0, 5.0, -1e4, torch.float32) is None


# --- the attention pass: where(keep, 0, fill) restates the structural mask (bias_mask) -------------
#
# transformers 5's eager attention adds where(position comparisons & padding lookup, 0, finfo.min)
# to the scores.  The op keeps that bias as its operand and records the mask it restates
# (mask=causal|window, the padding lookup as keep, bias_mask=true); each call runs the structural
# mask (no bias, masked tiles skipped) only where the rule above holds and no row is fully masked,
# else the bias as the program adds it, counted in seqfuse.fallbacks().  Outputs and every
# gradient equal eager either way.

import os  # noqa: E402
import sys  # noqa: E402

import seqfuse  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import check_against_eager  # noqa: E402

_AS_BIAS = "the additive mask runs as a bias"


class _LM(torch.nn.Module):
    """(input_ids, attention_mask?) -> logits of a tiny transformers causal LM, eager attention."""

    def __init__(self, arch: str, **extra):
        super().__init__()
        import transformers
        cfg = getattr(transformers, f"{arch}Config")(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager", **extra)
        self.lm = getattr(transformers, f"{arch}ForCausalLM")(cfg).train()

    def forward(self, ids, attention_mask=None):
        return self.lm(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits


def _mask_run(model, *inputs, dynamic=None):
    """check_against_eager (logits and every parameter gradient), one attention op whose printed IR
    is returned, and the attention fallback reasons of the forward and backward calls."""
    seqfuse.reset_counters()
    report = check_against_eager(model, *inputs, dynamic=dynamic)
    ops = [r.ir for r in report.rewrites if r.kind == "attention"]
    assert len(ops) == 1, str(report)
    return ops[0], list(seqfuse.fallbacks().get("attention", {}))


def _ids(seed=0, B=2, L=12):
    return torch.randint(0, 64, (B, L), generator=torch.Generator().manual_seed(seed))


def test_llama_causal_mask_runs_as_the_causal_mask():
    torch.manual_seed(0)
    ir, reasons = _mask_run(_LM("Llama"), _ids())
    assert "bias=%" in ir and "mask=causal, diag=0" in ir and "bias_mask=true" in ir and "keep=" not in ir, ir
    assert not [r for r in reasons if _AS_BIAS in r], reasons


def test_mistral_sliding_window_is_recovered():
    # transformers' sliding_window_overlay (kv > q - W) & causal: Mistral's window survives as window=4
    torch.manual_seed(0)
    ir, reasons = _mask_run(_LM("Mistral", sliding_window=4), _ids())
    assert "mask=window, diag=0, window=4" in ir and "bias_mask=true" in ir, ir
    assert not [r for r in reasons if _AS_BIAS in r], reasons


def test_right_padding_becomes_a_key_mask():
    torch.manual_seed(0)
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, 9:] = 0        # every row still keeps its first key
    ir, reasons = _mask_run(_LM("Llama"), _ids(), am)
    assert "mask=causal" in ir and "keep=%" in ir and "bias_mask=true" in ir, ir
    assert not [r for r in reasons if _AS_BIAS in r], reasons


def test_left_padding_fully_masked_rows_run_the_bias():
    # rows 0-2 of the second sequence keep no key: the program's softmax of all-finfo.min scores is
    # uniform over every key there (a structural mask would give NaN or 0), so those calls add the bias
    torch.manual_seed(0)
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, :3] = 0
    ir, reasons = _mask_run(_LM("Llama"), _ids(), am)
    assert "bias_mask=true" in ir, ir
    assert any("a row keeps no key" in r and _AS_BIAS in r for r in reasons), reasons


def _fill_program(q, k, v, fill):
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    i = torch.arange(q.shape[-2])
    causal = i[None, :] <= i[:, None]
    s = s + torch.where(causal, torch.zeros((), dtype=q.dtype), fill)
    return torch.softmax(s, dim=-1) @ v


def _qkv(scale=1.0, L=10):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(2, 3, L, 8, generator=g) * scale).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("fill,scale,why", [
    (-3.4028234663852886e+38, 1.0, None),     # finfo.min: the mask runs
    (-60.0, 1.0, "too close to |fill|"),      # exp(s - 60 - rowmax) is not 0: the program keeps those keys
    (-1e4, 30.0, "too close to |fill|"),      # scores of ~10^3 reach the fill
])
def test_fill_rule_decides_each_call(fill, scale, why):
    report = check_against_eager(lambda q, k, v: _fill_program(q, k, v, fill), *_qkv(scale))
    ir = [r.ir for r in report.rewrites if r.kind == "attention"]
    assert len(ir) == 1 and "mask=causal" in ir[0] and "bias_mask=true" in ir[0], str(report)
    reasons = [r for r in report.fallbacks.get("attention", {}) if _AS_BIAS in r]
    assert (not reasons) if why is None else any(why in r for r in reasons), reasons


def test_nan_in_q_keeps_the_program_nan_rows():
    q, k, v = _qkv()
    with torch.no_grad():
        q[0, 1, 4, 2] = float("nan")
    fn = lambda q, k, v: _fill_program(q, k, v, torch.finfo(torch.float32).min)  # noqa: E731
    ref = fn(q, k, v)
    report = seqfuse.explain(fn, q, k, v, options={"downstream": "aot_eager"})
    assert torch.equal(torch.isnan(report.output), torch.isnan(ref))
    assert torch.allclose(report.output.nan_to_num(), ref.nan_to_num(), rtol=1e-5, atol=1e-6)
    assert any("not finite" in r for r in report.fallbacks.get("attention", {})), str(report)


def test_dynamic_lengths_keep_the_structure():
    report = check_against_eager(lambda q, k, v: _fill_program(q, k, v, torch.finfo(torch.float32).min),
                                 *_qkv(L=9), dynamic=True)
    ir = [r.ir for r in report.rewrites if r.kind == "attention"]
    assert len(ir) == 1 and "mask=causal, diag=0" in ir[0] and "bias_mask=true" in ir[0], str(report)


def test_fp64_program_runs_the_mask():
    # fp64 scores: the call's row norms are taken in fp64 (an fp32 norm of fp64 rows raised; found by
    # `python -m tests.fuzz --family attention --n 150 --seed 11`, case 101)
    q, k, v = [t.detach().double().requires_grad_() for t in _qkv()]
    report = check_against_eager(lambda q, k, v: _fill_program(q, k, v, torch.finfo(torch.float64).min), q, k, v)
    ir = [r.ir for r in report.rewrites if r.kind == "attention"]
    assert len(ir) == 1 and "bias_mask=true" in ir[0], str(report)
    assert not [r for r in report.fallbacks.get("attention", {}) if _AS_BIAS in r], str(report)


@pytest.mark.parametrize("where", ["v", "grad_out"])
def test_non_finite_v_or_grad_keeps_the_programs_nan_gradients(where):
    # an inf in a value row, or a NaN in the output gradient: the program's 0·inf / 0·NaN at masked
    # scores reaches dk through the bias (NaN), where a structural mask would give 0 (found by
    # `python -m tests.fuzz --family attention --n 400 --seed 12`, case 30): such a call runs the bias
    q, k, v = _qkv()
    g = torch.randn(2, 3, 10, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if where == "v":
            v[1, 2, 9, 3] = float("inf")     # the last key: masked for every query but the last
        else:
            g[1, 2, 0, 3] = float("nan")     # the first query: every key but the first is masked
    fn = lambda q, k, v: _fill_program(q, k, v, torch.finfo(torch.float32).min)  # noqa: E731
    ref = fn(q, k, v)
    want = torch.autograd.grad(ref, (q, k, v), g)
    seqfuse.reset_counters()
    report = seqfuse.explain(fn, q, k, v, options={"downstream": "aot_eager"})
    got = torch.autograd.grad(report.output, (q, k, v), g)
    assert "bias_mask=true" in report.rewrites[0].ir, str(report)
    for x, y in zip((report.output, *got), (ref, *want)):
        assert torch.equal(torch.isnan(x), torch.isnan(y)) and torch.equal(torch.isinf(x), torch.isinf(y))
        assert torch.allclose(x.nan_to_num(0, 0, 0), y.nan_to_num(0, 0, 0), rtol=1e-5, atol=1e-6)
    assert torch.isnan(want[1]).any()   # the case is the one it claims: NaN in dk from masked positions
    assert any("not finite" in r for r in seqfuse.fallbacks().get("attention", {})), seqfuse.fallbacks()
