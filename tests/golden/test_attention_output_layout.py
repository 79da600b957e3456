"""The attention op's output layout (``out_transposed``): (B, L, H, Dv) memory when the program only
transposes the (B, H, L, Dv) output back and makes it contiguous, so that copy is free; the program's
contiguous layout wherever a consumer could see the memory order (dropout draws in memory order).

Each case checks the attribute in the report and outputs and gradients against eager through AOT
autograd (the downstream compile sees the op's fake strides, as inductor does).
"""
import pytest
import torch
import torch.nn.functional as F

from helpers import check_against_eager

B, H, L, D = 2, 3, 10, 8
AOT = {"downstream": "aot_eager"}


def qkv():
    # the usual model layout: (B, L, H, D) projections seen as (B, H, L, D)
    return [torch.randn(B, L, H, D).transpose(1, 2).detach().requires_grad_() for _ in range(3)]


def attend(q, k, v):
    s = (q @ k.transpose(-1, -2)) * D ** -0.5
    s = s.masked_fill(torch.triu(torch.ones(L, L, dtype=torch.bool), 1), float("-inf"))
    return torch.softmax(s, -1) @ v


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _ir(fn, *inputs):
    report = check_against_eager(fn, *inputs, options=AOT)
    assert report.count("attention") == 1, str(report)
    return report.rewrites[0].ir


@pytest.mark.parametrize("inner", [attend, sdpa], ids=["softmax", "sdpa"])
@pytest.mark.parametrize("tail", ["reshape", "contiguous", "contiguous_view", "two_readers"])
def test_transposed_back_and_copied_output_is_produced_transposed(inner, tail):
    def f(q, k, v):
        o = inner(q, k, v).transpose(1, 2)
        if tail == "reshape":
            return o.reshape(B, L, H * D)
        if tail == "contiguous":
            return o.contiguous() * 2
        if tail == "contiguous_view":
            return o.contiguous().view(B, L, H * D)
        return o.reshape(B, L, H * D) + o.contiguous().view(B, L, H * D)
    assert "out_transposed=true" in _ir(f, *qkv())


@pytest.mark.parametrize("tail", ["dropout", "transposed_elementwise", "other_reader", "permuted_other_axes",
                                  "clone_preserve"])
def test_output_whose_memory_order_a_consumer_sees_stays_contiguous(tail):
    def f(q, k, v):
        o = attend(q, k, v)
        if tail == "dropout":
            torch.manual_seed(7)   # the same draws in eager and compiled: equal only in the same memory order
            return F.dropout(o, 0.5, training=True).transpose(1, 2).reshape(B, L, H * D)
        if tail == "transposed_elementwise":
            return (o.transpose(1, 2) * 2).reshape(B, L, H * D)
        if tail == "other_reader":
            return o.transpose(1, 2).reshape(B, L, H * D) + o.sum()
        if tail == "permuted_other_axes":
            return o.transpose(2, 3).reshape(B, H, L * D)
        return o.transpose(1, 2).clone().reshape(B, L, H * D)
    assert "out_transposed" not in _ir(f, *qkv())


def test_dropout_after_the_reshape_draws_the_programs_mask():
    # the reshaped output is contiguous either way: a dropout on it draws what eager draws
    def f(q, k, v):
        o = attend(q, k, v).transpose(1, 2).reshape(B, L, H * D)
        return F.dropout(o, 0.5, training=True)

    def seeded(q, k, v):
        torch.manual_seed(3)
        return f(q, k, v)
    assert "out_transposed=true" in _ir(seeded, *qkv())


def test_sdpa_output_keeps_the_programs_blhd_layout_under_dropout():
    # SDPA over transposed inputs returns (B, L, H, D) memory in the program (ATen's flash kernels):
    # the op returns the same, so a dropout on the transposed output draws what eager draws
    def f(q, k, v):
        torch.manual_seed(5)
        return F.dropout(sdpa(q, k, v).transpose(1, 2), 0.5, training=True)
    assert "out_transposed=true" in _ir(f, *qkv())
