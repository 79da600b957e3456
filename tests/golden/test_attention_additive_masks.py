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
