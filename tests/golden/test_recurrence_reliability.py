"""Reliability regressions of the ssd / scan / long_conv ops found by the differential fuzzer
(tests/fuzz): each compiled program equals eager (outputs, gradients, NaN / inf positions by
the rule of docs/reliability.md) and the report shows the rewrite."""
import math

import pytest
import torch
from torch._higher_order_ops.associative_scan import associative_scan

from helpers import check_against_eager


def _linear(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


# --- issue 13 / defect 12: associative_scan 1-D / 2-D with algorithm={"scan": "chunked"} -------
# The chunked (and the eager recurrent) reference returned the last state as a view of the
# states: for a 1-D / 2-D scan the view has the result's own layout, so the custom op returned
# two aliasing outputs (RuntimeError from torch.library's aliasing check).

@pytest.mark.parametrize("shape,dim", [((11,), 0), ((3, 9), 1), ((9, 3), 0), ((1,), 0)])
@pytest.mark.parametrize("options", [{"algorithm": {"scan": "chunked"}},
                                     {"algorithm": {"scan": "recurrent"}, "runtime": "eager"}])
def test_associative_scan_low_rank_forced_algorithm(shape, dim, options):
    a = torch.rand(*shape).mul(0.5).add(0.5).requires_grad_()
    b = torch.randn(*shape, requires_grad=True)

    def fn(a, b):
        return associative_scan(_linear, (a, b), dim=dim, combine_mode="generic")[1]

    report = check_against_eager(fn, a, b, options=options)
    if shape[dim] > 1:
        assert report.count("scan") == 1, str(report)
        assert f"algo={options['algorithm']['scan']}" in report.rewrites[0].ir, report.rewrites[0].ir


# --- issue 13 / defect 11: an FFT conv with a fixed n on a length-0 signal -------------------
# The program works (an empty result); the direct algorithm (chosen for kernels of at most 64
# taps, here 0) reshaped an empty signal to (-1, 1, 0): "cannot reshape tensor of 0 elements".

def fft_conv_fixed_n(u, k):
    n = 8
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :u.shape[-1]]


@pytest.mark.parametrize("L,Lk", [(0, 0), (0, 3), (5, 0)])
@pytest.mark.parametrize("options", [{}, {"runtime": "eager"}, {"algorithm": {"long_conv": "direct"}},
                                     {"algorithm": {"long_conv": "fft"}},
                                     {"algorithm": {"long_conv": "direct"}, "runtime": "eager"}])
def test_fft_conv_fixed_n_empty_signal_or_kernel(L, Lk, options):
    u = torch.randn(2, 3, L, requires_grad=True)
    k = torch.randn(3, Lk, requires_grad=True)
    report = check_against_eager(fft_conv_fixed_n, u, k, options=options)
    assert report.count("long_conv") == 1, str(report)


# --- fuzzer finding: the eager ssd backward (quadratic / recurrent) when only c, or only d,
# needs a gradient: the final state does not depend on it, and differentiating the reference
# again through (y, h) raised "element 1 of tensors does not require grad".

def masked_fill_linear_attention(q, k, v):
    t = q.shape[-2]
    return (q @ k.mT).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), 0.0) @ v


@pytest.mark.parametrize("algo,runtime", [("quadratic", "auto"), ("recurrent", "eager")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ssd_eager_backward_when_only_c_needs_a_gradient(algo, runtime, dtype):
    q = torch.randn(1, 3, 9, 4, dtype=dtype, requires_grad=True)
    k, v = torch.randn(1, 3, 9, 4, dtype=dtype), torch.randn(1, 3, 9, 5, dtype=dtype)
    report = check_against_eager(masked_fill_linear_attention, q, k, v,
                                 options={"algorithm": {"ssd": algo}, "runtime": runtime})
    assert report.count("ssd") == 1 and f"algo={algo}" in report.rewrites[0].ir, str(report)
