"""Reference implementation of seqfuse.long_conv: the eager fallback and the test oracle."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def fft_size_for(length: int, kernel_length: int) -> int:
    """The smallest power of two N ≥ L + Lk - 1: an FFT of that size computes the
    causal (linear) convolution without wrap-around."""
    n = 1
    while n < max(length + kernel_length - 1, length):  # an empty kernel still needs L outputs
        n *= 2
    return n


def _conv_fft(u, k, n):
    # y = IFFT(FFT(u) · FFT(k)), both zero-padded to n, first L samples
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :u.shape[-1]]


def _conv_direct(u, k):
    # y[t] = Σ_s k[s]·u[t-s]: a depthwise conv1d over the left-padded input with the kernel flipped
    length, lk = u.shape[-1], k.shape[-1]
    lead = torch.broadcast_shapes(u.shape[:-1], k.shape[:-1])
    if length == 0 or lk == 0 or 0 in lead:
        # an empty signal or kernel: no term to sum (conv1d cannot take 0-sized axes); the empty
        # sums keep the result differentiable (zero gradients)
        return u.new_zeros(*lead, length) + (u[..., :0].sum() + k[..., :0].sum())
    if _per_channel(u, k, lead) and channels_inner(u):
        # u (B, C, L) laid as (B, L, C) in memory (a transposed projection, as causal conv1d layers read it): a
        # depthwise conv2d over (B, C, 1, L) reads that memory in place as NHWC (no transposing copy, 20x
        # faster on CPU at C = 1024, L = 2048); the same sums (their rounding may differ in the last bit).
        # A column slice of such a projection (Mamba-2 convolves a split of its input projection) is first
        # copied to that dense layout: a copy of whole rows, not a transpose
        if not laid_transposed(u):
            u = transposed_empty(u).copy_(u)
        C = u.shape[1]
        w = k.reshape(C, lk).flip(-1).reshape(C, 1, 1, lk)
        return F.conv2d(u.unsqueeze(2), w, padding=(0, lk - 1), groups=C)[..., :length].squeeze(2)
    u = u.expand(*lead, length).reshape(-1, 1, length)
    k = k.expand(*lead, lk).reshape(-1, 1, lk)
    y = F.conv1d(F.pad(u, (lk - 1, 0)).reshape(1, -1, length + lk - 1), k.flip(-1), groups=k.shape[0])
    return y.reshape(*lead, length)


def laid_transposed(u) -> bool:
    """Whether u (B, C, L), C > 1, L > 1, is laid (B, L, C) in memory (a transposed projection).  Decided on
    sizes and strides alone, provably where they are symbolic (no guard): the long_conv op lays its result
    (and its fake value) like such a u."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true as known
    if u.dim() != 3:
        return False
    B, C, L = u.shape
    return all(known(c) for c in (C > 1, L > 1, u.stride(1) == 1, u.stride(2) == C)) \
        and (known(B == 1) or known(u.stride(0) == C * L))


def channels_inner(u) -> bool:
    """Whether u (B, C, L), C > 1, L > 1, keeps each step's C channels adjacent in memory (stride 1 along C, at
    least C along L): ``laid_transposed``, or a column slice of a transposed projection (Mamba-2's conv1d reads
    a split of its input projection).  Decided as ``laid_transposed`` is (provably, no guard)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true as known
    if u.dim() != 3:
        return False
    _, C, L = u.shape
    return all(known(c) for c in (C > 1, L > 1, u.stride(1) == 1, u.stride(2) >= C))


def transposed_empty(u, dtype=None):
    """An empty tensor of u's shape (B, C, L) laid (B, L, C) densely: ``empty_like(u)`` when u is
    ``laid_transposed`` (its own strides), else a fresh (B, L, C) buffer transposed."""
    if laid_transposed(u):
        return torch.empty_like(u, dtype=dtype)
    B, C, L = u.shape
    return u.new_empty((B, L, C), dtype=dtype).transpose(1, 2)


def _per_channel(u, k, lead) -> bool:
    """Whether u is (B, C, L) with one kernel per channel (k (C, Lk) or (1, C, Lk)) shared by the batch."""
    return u.dim() == 3 and tuple(lead) == tuple(u.shape[:-1]) \
        and (k.dim() == 2 or (k.dim() == 3 and k.shape[0] == 1)) and k.shape[-2] == u.shape[1]


def long_conv_reference(u, k, d=None, gate=None, *, bias=None, causal=True, fft_size=0, scale=1.0,
                        activation="none", algorithm="fft"):
    """y = act(scale·(u ⊛ k)[..., :L] + bias + d·u) · gate, computed in fp32 (fp64 for fp64 inputs).

    Shapes: u (*B, L); k broadcastable to (*B, Lk); d broadcastable to u; gate
    broadcastable to y.  causal: linear convolution (``algorithm`` "fft" or
    "direct"); otherwise circular convolution of size ``fft_size``.  Returns y
    in the dtype of u (promoted with k, d and gate).
    """
    dtype = torch.promote_types(u.dtype, k.dtype)
    acc = torch.promote_types(dtype, torch.float32)  # fp32 accumulation, fp64 stays fp64
    uf, kf = u.to(acc), k.to(acc)
    # 1. the convolution
    if not causal:
        y = _conv_fft(uf, kf, int(fft_size))
    elif algorithm == "direct":
        y = _conv_direct(uf, kf)
    else:
        kf = kf[..., :u.shape[-1]]  # taps at lags ≥ L never reach the first L outputs
        y = _conv_fft(uf, kf, fft_size_for(u.shape[-1], kf.shape[-1]))
    # 2. the program's normalization
    if scale != 1.0:
        y = y * scale
    # 3. bias, skip connection
    if bias is not None:
        y = y + bias.to(acc)
        dtype = torch.promote_types(dtype, bias.dtype)
    if d is not None:
        y = y + uf * d.to(acc)
        dtype = torch.promote_types(dtype, d.dtype)
    # 4. activation, then gate
    if activation == "silu":
        y = F.silu(y)
    if gate is not None:
        y = y * gate.to(acc)
        dtype = torch.promote_types(dtype, gate.dtype)
    return y.to(dtype)
