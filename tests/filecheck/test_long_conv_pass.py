"""FileCheck on the graph right after the long_conv pass (dump stage "long_conv")."""

import torch
import torch.nn.functional as F

from fc import graph_after, run_filecheck


def after_pass(fn, *args, tmp_path, stage="long_conv"):
    return graph_after(fn, *args, tmp_path=tmp_path, stage=stage)[0]


def gated_fft_conv(u, k, D, v):
    n = 2 * u.shape[-1]
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n) / n, n=n, norm="forward")[..., :u.shape[-1]]
    return v * (y + u * D.unsqueeze(-1))


def test_gated_fft_conv_becomes_one_op(tmp_path):
    text = after_pass(gated_fft_conv, torch.randn(2, 4, 16), torch.randn(4, 16), torch.randn(4),
                      torch.randn(2, 4, 16), tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK: %long_conv = seqfuse.long_conv(%l_u_, %l_k_, d=%{{.*}}, gate=%l_v_) {causal=true, fft_size=32, scale=1.0
        CHECK-NOT: fft_rfft
        CHECK-NOT: fft_irfft
        CHECK: return (%long_conv)
    """)


def wrapped_fft(u, k):
    # N = L: a circular convolution, still one op but not causal
    n = u.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)


def test_circular_fft_conv(tmp_path):
    text = after_pass(wrapped_fft, torch.randn(2, 4, 16), torch.randn(4, 16), tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK: seqfuse.long_conv(%l_u_, %l_k_) {causal=false, fft_size=16
    """)


def causal_conv1d(x, w):
    return F.silu(F.conv1d(F.pad(x, (w.shape[-1] - 1, 0)), w, groups=x.shape[1]))


def test_causal_conv1d_flips_the_kernel(tmp_path):
    text = after_pass(causal_conv1d, torch.randn(2, 4, 16), torch.randn(4, 1, 4), tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK: %[[FLIP:[a-z_0-9]+]] = aten.flip(%{{.*}}, [-1])
        CHECK: seqfuse.long_conv(%l_x_, %[[FLIP]]) {causal=true, fft_size=0, scale=1.0, activation=silu
        CHECK-NOT: aten.conv1d
    """)


def truncating_fft(u, k):
    # must not match: an FFT shorter than the signal drops samples, so this is no convolution of u
    n = u.shape[-1] // 2
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)


def test_truncating_fft_is_left_alone(tmp_path):
    text = after_pass(truncating_fft, torch.randn(2, 4, 16), torch.randn(4, 16), tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-NOT: seqfuse.long_conv
        CHECK: aten.fft_irfft
    """)
