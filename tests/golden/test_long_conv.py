"""Long convolutions in the spellings papers and libraries use: each compiled with seqfuse
equals eager (outputs and gradients) and the report shows one seqfuse.long_conv with the
expected attributes; near misses are left alone with their reason."""
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import check_against_eager

B, H, L = 2, 4, 16


def inputs(*shapes):
    return [torch.randn(*s, requires_grad=True) for s in shapes]


# --- FFT convolutions ------------------------------------------------------------

def fft_kernel_side_scale(u, k):
    n = 2 * u.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * (torch.fft.rfft(k, n=n) / n), n=n, norm="forward")[..., :u.shape[-1]]


def fft_output_side_scale(u, k):
    n = 2 * u.shape[-1]
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n, norm="forward") / n
    return y[..., :u.shape[-1]]


def fft_default_norm(u, k):
    n = 2 * u.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :u.shape[-1]]


def fft_ortho(u, k):
    n = 2 * u.shape[-1]
    uf, kf = torch.fft.rfft(u, n=n, norm="ortho"), torch.fft.rfft(k, n=n, norm="ortho")
    return torch.fft.irfft(uf * kf, n=n, norm="ortho")[..., :u.shape[-1]] * math.sqrt(n)


def fft_complex(u, k):
    n = 2 * u.shape[-1]
    return torch.fft.ifft(torch.fft.fft(u, n=n) * torch.fft.fft(k, n=n)).real[..., :u.shape[-1]]


def fft_next_pow2(u, k):
    n = 1 << (2 * u.shape[-1] - 2).bit_length()     # next power of two ≥ L + Lk - 1
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :u.shape[-1]]


def fft_exact_size(u, k):
    n = u.shape[-1] + k.shape[-1] - 1                 # the smallest size without wrap-around
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :u.shape[-1]]


def fft_shared_kernel(u, k1):
    n = 2 * u.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k1, n=n), n=n)[..., :u.shape[-1]]


@pytest.mark.parametrize("fn,kshape", [
    (fft_kernel_side_scale, (H, L)), (fft_output_side_scale, (H, L)), (fft_default_norm, (H, L)),
    (fft_ortho, (H, L)), (fft_complex, (H, L)), (fft_next_pow2, (H, L)), (fft_exact_size, (H, L)),
    (fft_shared_kernel, (L,)), (fft_default_norm, (B, H, L)), (fft_default_norm, (H, 5)),
])
def test_fft_convolution_spellings(fn, kshape):
    u, k = inputs((B, H, L), kshape)
    report = check_against_eager(fn, u, k)
    assert report.count("long_conv") == 1, str(report)
    ir = report.rewrites[0].ir
    assert "causal=true" in ir and "scale=1.0" in ir, ir


def hyena_operator(u, k, D, v):
    """Hyena order-2 step as its reference code writes it: gated FFT conv with D skip."""
    seqlen = u.shape[-1]
    fft_size = 2 * seqlen
    k_f = torch.fft.rfft(k, n=fft_size) / fft_size
    u_f = torch.fft.rfft(u.to(dtype=k.dtype), n=fft_size)
    y = torch.fft.irfft(u_f * k_f, n=fft_size, norm="forward")[..., :seqlen]
    out = y + u * D.unsqueeze(-1)
    return (v * out).to(dtype=u.dtype)


def test_hyena_gated_conv_folds_skip_and_gate():
    u, k, D, v = inputs((B, H, L), (H, L), (H,), (B, H, L))
    report = check_against_eager(hyena_operator, u, k, D, v)
    assert report.count("long_conv") == 1
    ir = report.rewrites[0].ir
    assert "d=%" in ir and "gate=%" in ir, ir


def s4d_kernel(log_dt, A_re, A_im, C, length):
    """S4D's Vandermonde kernel K[h, l] = 2·Re(Σ_n C·(exp(dtA)-1)/A · exp(dtA·l)), computed in the graph."""
    dt = torch.exp(log_dt)
    A = torch.complex(-torch.exp(A_re), A_im)
    dtA = A * dt.unsqueeze(-1)
    Cc = C * (torch.exp(dtA) - 1.0) / A
    vand = dtA.unsqueeze(-1) * torch.arange(length)
    return 2 * torch.einsum("hn,hnl->hl", Cc, torch.exp(vand)).real


def s4d_layer(u, log_dt, A_re, A_im, C_re, C_im, D):
    length = u.shape[-1]
    k = s4d_kernel(log_dt, A_re, A_im, torch.complex(C_re, C_im), length)
    k_f = torch.fft.rfft(k, n=2 * length)
    u_f = torch.fft.rfft(u, n=2 * length)
    y = torch.fft.irfft(u_f * k_f, n=2 * length)[..., :length]
    return y + u * D.unsqueeze(-1)


def test_s4d_convolution_mode_keeps_kernel_generation_in_graph():
    N = 4
    u, log_dt, A_re, A_im, C_re, C_im, D = inputs((B, H, L), (H,), (H, N), (H, N), (H, N), (H, N), (H,))
    report = check_against_eager(s4d_layer, u, log_dt, A_re, A_im, C_re, C_im, D)
    assert report.count("long_conv") == 1
    assert "d=%" in report.rewrites[0].ir


def circular(u, k):
    n = u.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)


def test_circular_convolution():
    u, k = inputs((B, H, L), (H, L))
    report = check_against_eager(circular, u, k)
    assert report.count("long_conv") == 1
    assert "causal=false" in report.rewrites[0].ir and "algo=fft" in report.rewrites[0].ir


def test_dynamic_length_no_recompile():
    from torch._dynamo.utils import counters
    counters.clear()
    f = torch.compile(fft_kernel_side_scale, backend="seqfuse", dynamic=True)
    for length in (16, 24, 40):
        u, k = torch.randn(B, H, length), torch.randn(H, length)
        torch.testing.assert_close(f(u, k), fft_kernel_side_scale(u, k), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1


# --- direct convolutions ------------------------------------------------------

class MambaConv(torch.nn.Module):
    """Mamba's causal depthwise conv1d: padding K-1 on both sides, sliced back to L, then SiLU."""

    def __init__(self, channels=H, kernel=4, bias=True):
        super().__init__()
        self.conv1d = torch.nn.Conv1d(channels, channels, kernel, groups=channels, padding=kernel - 1, bias=bias)

    def forward(self, x):
        return F.silu(self.conv1d(x)[..., :x.shape[-1]])


class LeftPadConv(torch.nn.Module):
    """Causal conv written as an explicit left pad, then a valid depthwise conv1d."""

    def __init__(self, channels=H, kernel=8):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(channels, 1, kernel))

    def forward(self, x, gate):
        return F.silu(F.conv1d(F.pad(x, (self.w.shape[-1] - 1, 0)), self.w, groups=x.shape[1])) * gate


def test_mamba_short_conv_is_direct_with_bias_and_activation():
    (x,) = inputs((B, H, L))
    report = check_against_eager(MambaConv(), x)
    assert report.count("long_conv") == 1
    ir = report.rewrites[0].ir
    assert "algo=direct" in ir and "bias=%" in ir and "activation=silu" in ir, ir


def test_left_pad_long_conv_folds_activation_and_gate():
    x, gate = inputs((B, H, L), (B, H, L))
    report = check_against_eager(LeftPadConv(), x, gate)
    ir = report.rewrites[0].ir
    assert report.count("long_conv") == 1 and "activation=silu" in ir and "gate=%" in ir, ir


def test_cost_model_picks_fft_for_long_kernels():
    u, k = torch.randn(1, 2, 1024), torch.randn(2, 1024)
    report = check_against_eager(fft_default_norm, u, k, grads=False)
    assert "algo=fft" in report.rewrites[0].ir


# --- near misses: left alone, still equal to eager -------------------------------

def fft_truncating(u, k):
    # an FFT shorter than the signal truncates it: not a convolution of u
    n = u.shape[-1] // 2
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)


def spectrum_times_parameter(u, kf):
    # the kernel is given as a spectrum, not as a signal: the IR takes signals
    n = 2 * u.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * kf, n=n)[..., :u.shape[-1]]


def conv_not_sliced(x, w):
    # padding on both sides without the slice: a centred (non-causal) convolution
    return F.conv1d(x, w, padding=w.shape[-1] - 1, groups=x.shape[1])


@pytest.mark.parametrize("fn,shapes,reason", [
    (fft_truncating, ((B, H, L), (H, L)), "smaller than the signal"),
    (spectrum_times_parameter, ((B, H, L), (H, L + 1)), "not an"),
    (conv_not_sliced, ((B, H, L), (H, 1, 4)), "not sliced back to causal"),
])
def test_near_misses(fn, shapes, reason):
    args = inputs(*shapes)
    if fn is spectrum_times_parameter:
        args[1] = torch.randn(H, L + 1, dtype=torch.complex64, requires_grad=True)
    report = check_against_eager(fn, *args)
    assert report.count("long_conv") == 0
    assert any(reason in m.reason for m in report.near_misses), [m.reason for m in report.near_misses]


def fftconv_ref(u, k, D):
    """H3's reference fftconv (without its optional gelu and dropout)."""
    seqlen = u.shape[-1]
    fft_size = 2 * seqlen
    k_f = torch.fft.rfft(k, n=fft_size) / fft_size
    u_f = torch.fft.rfft(u.to(dtype=k.dtype), n=fft_size)
    y = torch.fft.irfft(u_f * k_f, n=fft_size, norm="forward")[..., :seqlen]
    out = y + u * D.unsqueeze(-1)
    return out.to(dtype=u.dtype)


class H3Layer(torch.nn.Module):
    """H3: q·SSM_diag(SSM_shift(k)·v), both SSMs in convolution mode."""

    def __init__(self, d_model=H, length=L, n_state=4):
        super().__init__()
        self.in_proj = torch.nn.Linear(d_model, 3 * d_model)
        self.out_proj = torch.nn.Linear(d_model, d_model)
        self.shift_kernel = torch.nn.Parameter(torch.randn(d_model, n_state) / n_state)  # a short shift SSM
        self.log_dt = torch.nn.Parameter(torch.rand(d_model).log())
        self.A_re = torch.nn.Parameter(torch.randn(d_model, n_state) * 0.1)
        self.A_im = torch.nn.Parameter(torch.randn(d_model, n_state))
        self.C_re = torch.nn.Parameter(torch.randn(d_model, n_state))
        self.C_im = torch.nn.Parameter(torch.randn(d_model, n_state))
        self.D_shift = torch.nn.Parameter(torch.randn(d_model))
        self.D_diag = torch.nn.Parameter(torch.randn(d_model))

    def forward(self, x):  # x: (B, L, d) -> (B, L, d)
        q, k, v = self.in_proj(x).transpose(1, 2).chunk(3, dim=1)
        length = x.shape[1]
        shift = F.pad(self.shift_kernel, (0, length - self.shift_kernel.shape[-1]))
        k = fftconv_ref(k, shift, self.D_shift)
        diag = s4d_kernel(self.log_dt, self.A_re, self.A_im, torch.complex(self.C_re, self.C_im), length)
        y = q * fftconv_ref(k * v, diag, self.D_diag)
        return self.out_proj(y.transpose(1, 2))


def test_h3_layer_has_two_long_convs():
    (x,) = inputs((B, L, H))
    report = check_against_eager(H3Layer(), x)
    assert report.count("long_conv") == 2, str(report)
    assert "gate=%" in report.rewrites[1].ir


def test_cost_model_threshold():
    from seqfuse.passes.select import DIRECT_MAX_KERNEL
    u = torch.randn(1, 2, 4 * DIRECT_MAX_KERNEL)
    short = check_against_eager(fft_default_norm, u, torch.randn(2, DIRECT_MAX_KERNEL), grads=False)
    long = check_against_eager(fft_default_norm, u, torch.randn(2, DIRECT_MAX_KERNEL + 1), grads=False)
    assert "algo=direct" in short.rewrites[0].ir and "algo=fft" in long.rewrites[0].ir


# --- a kernel as long as the signal, under dynamic shapes -----------------------------------

def conv1d_full_length(u, k):
    """Causal depthwise conv1d with a kernel as long as the signal: pad L - 1 on the left."""
    return F.conv1d(F.pad(u, (u.shape[-1] - 1, 0)), k.flip(-1)[:, None, :], groups=u.shape[1])


def test_conv1d_with_a_symbolic_kernel_length_is_lifted():
    # dynamic=True: the kernel length is a symbol, and the padding is provably that symbol - 1 (silent
    # before: a symbolic kernel length returned early, with no near miss)
    u, k = inputs((B, H, 19), (H, 19))
    with torch.no_grad():
        k.mul_(0.2)
    report = check_against_eager(conv1d_full_length, u, k, dynamic=True)
    assert report.count("long_conv") == 1 and "causal=true" in report.rewrites[0].ir, str(report)


def test_conv1d_whose_padding_is_not_provably_causal_is_a_near_miss():
    # the padding is the signal's length - 1 and the kernel has a length of its own: causal only where
    # they agree, which no guard says
    u, k = inputs((B, H, 19), (H, 12))

    def f(u, k):
        return F.conv1d(F.pad(u, (u.shape[-1] - 1, 0)), k.flip(-1)[:, None, :], groups=u.shape[1])
    report = check_against_eager(f, u, k, dynamic=True)
    misses = [m.reason for m in report.near_misses if m.kind == "long_conv"]
    assert report.count("long_conv") == 0 and len(misses) == 1 and "not provably causal" in misses[0], str(report)


def fft_conv_padded(u, k):
    """The FFT size given by zero padding instead of n: rfft(pad(u, (0, L))) is rfft(u, n=2L)."""
    L = u.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(F.pad(u, (0, L))) * torch.fft.rfft(F.pad(k, (0, L))))[..., :L]


@pytest.mark.parametrize("dynamic", [False, True])
def test_fft_size_given_by_zero_padding(dynamic):
    # a near miss before ("a forward FFT without an explicit size n")
    u, k = inputs((B, H, L), (H, L))
    report = check_against_eager(fft_conv_padded, u, k, dynamic=dynamic)
    assert report.count("long_conv") == 1 and "causal=true" in report.rewrites[0].ir, str(report)


def test_fft_of_a_signal_padded_on_the_left_keeps_the_padded_signal():
    # zeros before the signal shift it: not the signal at a larger FFT size, but a signal of length 2L of
    # its own, convolved circularly (and equal to eager)
    u, k = inputs((B, H, L), (H, L))

    def f(u, k):
        n = u.shape[-1]
        return torch.fft.irfft(torch.fft.rfft(F.pad(u, (n, 0))) * torch.fft.rfft(k, n=2 * n))[..., :n]
    report = check_against_eager(f, u, k)
    assert report.count("long_conv") == 1, str(report)
    ir = report.rewrites[0].ir
    assert "long_conv(%pad" in ir and "causal=false" in ir and f"fft_size={2 * L}" in ir, ir


class TransposedShortConv(torch.nn.Module):
    """Qwen3-Next's / Mamba's layer layout: a projection (B, L, C) read transposed by the causal depthwise
    conv1d, then transposed back."""

    def __init__(self, channels=6, kernel=4):
        super().__init__()
        self.conv1d = torch.nn.Conv1d(channels, channels, kernel, groups=channels, padding=kernel - 1, bias=False)

    def forward(self, x):
        y = F.silu(self.conv1d(x.transpose(1, 2))[..., :x.shape[1]])
        return y.transpose(1, 2) * 2


@pytest.mark.parametrize("downstream,dynamic", [("inductor", False), ("inductor", True), ("aot_eager", False)])
def test_a_transposed_signal_gives_a_result_laid_like_it(downstream, dynamic):
    # the direct convolution reads the (B, L, C) memory in place and its result is laid the same way, in the
    # fake value too: inductor's generated code checks every extern result's strides (a mismatch raises)
    (x,) = inputs((2, 24, 6))
    m = TransposedShortConv()
    report = check_against_eager(m, x, options={"downstream": downstream}, dynamic=dynamic)
    assert report.count("long_conv") == 1, str(report)
    from seqfuse.lowering.long_conv_op import _result_transposed
    u = x.detach().transpose(1, 2)
    assert _result_transposed(u, u.shape) and not _result_transposed(u.contiguous(), u.shape)
    y = torch.ops.seqfuse.long_conv(u, m.conv1d.weight.detach()[:, 0], None, None, None, True, 0, 1.0, "none",
                                    "direct", "auto")
    assert y.stride() == u.stride()
    assert torch.allclose(y, torch.ops.seqfuse.long_conv(u.contiguous(), m.conv1d.weight.detach()[:, 0], None,
                                                         None, None, True, 0, 1.0, "none", "direct", "auto"))


class SplitShortConv(torch.nn.Module):
    """Mamba-2's layout: one input projection (B, L, gate + C + dt) split, the middle columns read transposed by
    the causal depthwise conv1d (with bias and SiLU), transposed back and gated by the first columns."""

    def __init__(self, hidden=5, channels=6, kernel=4):
        super().__init__()
        self.channels = channels
        self.in_proj = torch.nn.Linear(hidden, 2 * channels + 3)
        self.conv1d = torch.nn.Conv1d(channels, channels, kernel, groups=channels, padding=kernel - 1)

    def forward(self, x):
        gate, xbc, dt = self.in_proj(x).split([self.channels, self.channels, 3], dim=-1)
        y = F.silu(self.conv1d(xbc.transpose(1, 2))[..., :x.shape[1]]).transpose(1, 2)
        return y * gate + dt.sum(-1, keepdim=True)


@pytest.mark.parametrize("downstream,dynamic", [("inductor", False), ("inductor", True), ("aot_eager", False)])
def test_a_column_slice_of_a_projection_is_convolved_in_its_row_order(downstream, dynamic):
    # the conv1d reads a split of the projection (stride 1 along channels, 2C + 3 along time): the direct
    # convolution copies whole rows once and lays its result and du (B, L, C); the fake values alike
    (x,) = inputs((2, 24, 5))
    report = check_against_eager(SplitShortConv(), x, options={"downstream": downstream}, dynamic=dynamic)
    assert report.count("long_conv") == 1, str(report)
    assert "activation=silu" in report.rewrites[0].ir, report.rewrites[0].ir
    from seqfuse.lowering.long_conv_op import _result_transposed
    u = torch.randn(2, 24, 15)[..., 6:12].transpose(1, 2)
    assert _result_transposed(u, u.shape) and not _result_transposed(u.contiguous(), u.shape)
