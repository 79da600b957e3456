"""Random long-convolution programs in the spellings docs/ir.md claims: FFT convolutions
``irfft(rfft(u, n=N) * rfft(k, n=N))[..., :L]`` (any norm, scalings, complex fft, fixed or
computed N, shared / per-channel / per-batch kernels, shorter kernels, circular), with a D skip
and a gate, and causal depthwise conv1d (padding K-1 and slice, or a left F.pad), bias, SiLU."""
from __future__ import annotations

import math
import random
from typing import Iterator

import torch
import torch.nn.functional as F

from .check import Case
from .common import DTYPES, Maker, poison, size, ssd_options


def fft_conv(r, seed, triton):
    B, H = size(r, 1, 3), size(r, 1, 4)
    L = size(r, 0 if r.random() < 0.05 else 1, 24 if triton else 96, (0, 1, 2, 7, 31, 33, 64, 65))
    kshape_kind = r.choice(("per_channel", "per_channel", "shared", "per_batch", "short"))
    Lk = L if kshape_kind != "short" else size(r, 1, max(1, L), (1, 3))
    kshape = {"per_channel": (H, Lk), "shared": (Lk,), "per_batch": (B, H, Lk), "short": (H, Lk)}[kshape_kind]
    dt = r.choice((torch.float64, torch.float32, torch.float32, torch.bfloat16))
    m = Maker(r, dt)
    u, k = m.randn(B, H, L), m.randn(*kshape, scale=1 / math.sqrt(max(Lk, 1)))
    style = r.choice(("default", "kernel_scale", "output_scale", "ortho", "complex", "next_pow2", "exact",
                      "fixed_n", "circular", "zero_padded"))
    skip, gate = r.random() < 0.4, r.random() < 0.3
    extra = []
    if skip:
        extra.append(m.randn(H))
    if gate:
        extra.append(m.randn(B, H, L))
    tag = poison(r, [u, k, *extra])
    fixed_n = r.choice((8, 16, 64))
    def fn(u, k, *rest):
        length = u.shape[-1]
        upcast = u.dtype in (torch.bfloat16, torch.float16)   # fp64 copies (the oracle) stay fp64
        uu, kk = (u.float(), k.float()) if upcast else (u, k)
        if style in ("default", "kernel_scale", "output_scale", "ortho", "complex", "zero_padded"):
            n = 2 * length
        elif style == "next_pow2":
            n = 1 << max(length + k.shape[-1] - 2, 0).bit_length()
        elif style == "exact":
            n = max(length + k.shape[-1] - 1, 1)
        elif style == "fixed_n":
            n = fixed_n
        else:
            n = max(length, 1)
        if style == "kernel_scale":
            y = torch.fft.irfft(torch.fft.rfft(uu, n=n) * (torch.fft.rfft(kk, n=n) / n), n=n, norm="forward")
        elif style == "output_scale":
            y = torch.fft.irfft(torch.fft.rfft(uu, n=n) * torch.fft.rfft(kk, n=n), n=n, norm="forward") / n
        elif style == "ortho":
            y = torch.fft.irfft(torch.fft.rfft(uu, n=n, norm="ortho") * torch.fft.rfft(kk, n=n, norm="ortho"),
                                n=n, norm="ortho") * math.sqrt(n)
        elif style == "complex":
            y = torch.fft.ifft(torch.fft.fft(uu, n=n) * torch.fft.fft(kk, n=n)).real
        elif style == "zero_padded":    # the FFT size given by padding with zeros instead of n
            y = torch.fft.irfft(torch.fft.rfft(F.pad(uu, (0, n - length))) * torch.fft.rfft(F.pad(kk, (0, n - kk.shape[-1]))),
                                n=n)
        else:
            y = torch.fft.irfft(torch.fft.rfft(uu, n=n) * torch.fft.rfft(kk, n=n), n=n)
        y = y[..., :length]
        i = 0
        if skip:
            y = y + uu * rest[i].float().unsqueeze(-1) if upcast else y + u * rest[i].unsqueeze(-1)
            i += 1
        if gate:
            y = y * (rest[i].float() if upcast else rest[i])
        return y.to(u.dtype)

    name = f"fft_{style}_{kshape_kind}" + ("_skip" if skip else "") + ("_gate" if gate else "")
    # a fixed n shorter than the signal truncates it: a near miss, not a convolution
    expect = None if (style == "fixed_n" and fixed_n < L) or L == 0 else "long_conv"
    return Case("long_conv", name + (f"+{tag}" if tag else ""), fn, tuple([u, k, *extra]), expect,
                ssd_options(r, triton, "long_conv"), seed)


def conv1d(r, seed, triton):
    B, C = size(r, 1, 3), size(r, 1, 5)
    L = size(r, 1, 24 if triton else 80, (1, 2, 3, 7, 33))
    K = size(r, 1, 16, (1, 2, 4))
    dt = r.choice(DTYPES)
    if dt is torch.float16:
        # eager's own fp16 depthwise conv1d on CPU hangs (torch 2.13: groups 2, kernel 16, length 39 never
        # returns; seqfuse's paths compute in fp32): the oracle run cannot be had
        dt = torch.bfloat16
    m = Maker(r, dt)
    # "transposed": Mamba's and Gated DeltaNet's layout, a (B, L, C) projection read as (B, C, L) and the result
    # transposed back (the direct convolution and its backward then run in that memory order); "sliced":
    # Mamba-2's, the projection wider than C and its columns 1 .. C read
    layout = r.choice(("plain", "plain", "transposed", "sliced"))
    transposed = layout != "plain"
    x = m.randn(*((B, L, C + 3) if layout == "sliced" else (B, L, C) if transposed else (B, C, L)))
    w = m.randn(C, 1, K, scale=1 / math.sqrt(K))
    style = r.choice(("pad_slice", "left_pad"))
    use_bias, silu, gate = r.random() < 0.5, r.random() < 0.5, r.random() < 0.3
    extra = []
    if use_bias:
        extra.append(m.randn(C))
    if gate:
        extra.append(m.randn(*((B, L, C) if transposed else (B, C, L))))
    tag = poison(r, [x, w, *extra])

    def fn(x, w, *rest):
        bias = rest[0] if use_bias else None
        if transposed:
            u = x[..., 1:1 + w.shape[0]] if layout == "sliced" else x
            return conv(u.transpose(1, 2), w, bias, rest[-1].transpose(1, 2) if gate else None).transpose(1, 2)
        return conv(x, w, bias, rest[-1] if gate else None)

    def conv(x, w, bias, g):
        if style == "pad_slice":
            y = F.conv1d(x, w, bias, padding=w.shape[-1] - 1, groups=x.shape[1])[..., :x.shape[-1]]
        else:
            y = F.conv1d(F.pad(x, (w.shape[-1] - 1, 0)), w, bias, groups=x.shape[1])
        if silu:
            y = F.silu(y)
        if g is not None:
            y = y * g
        return y

    name = f"conv1d_{style}" + ("" if layout == "plain" else f"_{layout}") + ("_bias" if use_bias else "") \
        + ("_silu" if silu else "") + ("_gate" if gate else "")
    # a kernel of one tap is a pointwise scaling, an ordinary convolution (LongConvPass.min_direct_kernel)
    return Case("long_conv", name + (f"+{tag}" if tag else ""), fn, tuple([x, w, *extra]),
                "long_conv" if K > 1 else None, ssd_options(r, triton, "long_conv"), seed)


SPELLINGS = ((fft_conv, 3), (conv1d, 1))


def cases(rng: random.Random, n: int, triton: bool) -> Iterator[Case]:
    for _ in range(n):
        seed = rng.randrange(2 ** 31)
        r = random.Random(seed)
        total = sum(w for _, w in SPELLINGS)
        x = r.random() * total
        for fn, w in SPELLINGS:
            x -= w
            if x < 0:
                break
        yield fn(r, seed, triton)
