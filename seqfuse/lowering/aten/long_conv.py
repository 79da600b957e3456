"""seqfuse.long_conv on ATen's FFT and convolution kernels, with the epilogue done in place.

The same math as the reference (``seqfuse/lowering/reference/long_conv.py``), written for
speed on CPU: the spectrum product and the epilogue reuse their buffers, the program's
scale is folded into the kernel's spectrum (H rows instead of B·H), and the skip is one
``addcmul``.

The backward is written out for the direct causal convolution of a transposed signal (u (B, C, L) laid
(B, L, C), or a column slice of such a projection: the short causal conv1d of Mamba, Mamba-2 and Gated
DeltaNet layers), where every tensor stays in that memory order: differentiating the reference there
runs SiLU's and the convolution's backward on operands laid two ways (≈10x slower on CPU).  Other calls
return None and the caller differentiates the reference.
"""
from __future__ import annotations

import torch

from seqfuse.lowering.reference.long_conv import _conv_direct, _per_channel, channels_inner, fft_size_for, \
    laid_transposed, transposed_empty


def supports(t: dict, a: dict) -> str | None:
    """Every call the reference handles (the epilogue order is the same)."""
    if not (t["u"].is_floating_point() and t["k"].is_floating_point()):
        return "complex or integer signals"
    return None


def _dtypes(u, k, d, gate, bias):
    """(the result's dtype: the operands' promoted, the accumulation dtype: that and fp32 promoted)."""
    dtype = torch.promote_types(u.dtype, k.dtype)
    for x in (d, gate, bias):
        if x is not None:
            dtype = torch.promote_types(dtype, x.dtype)
    return dtype, torch.promote_types(dtype, torch.float32)


def forward(u, k, d, gate, a):
    """y = act(scale·(u ⊛ k)[..., :L] + bias + d·u) · gate."""
    dtype, acc = _dtypes(u, k, d, gate, a["bias"])
    uf, kf, length = u.to(acc), k.to(acc), u.shape[-1]
    # 1. the convolution, the program's scale folded into the (smaller) kernel side
    if a["causal"] and a["algorithm"] == "direct":
        y = _conv_direct(uf, kf)
        if a["scale"] != 1.0:
            y.mul_(a["scale"])
    else:
        if a["causal"]:
            kf = kf[..., :length]
            n = fft_size_for(length, kf.shape[-1])
        else:
            n = int(a["fft_size"])
        spec = torch.fft.rfft(kf, n=n)
        if a["scale"] != 1.0:
            spec.mul_(a["scale"])
        prod = torch.fft.rfft(uf, n=n)
        prod = prod.mul_(spec) if prod.shape == torch.broadcast_shapes(prod.shape, spec.shape) else prod * spec
        y = torch.fft.irfft(prod, n=n)[..., :length]
    # 2. bias and skip, 3. activation, 4. gate — in place where the shapes allow
    if a["bias"] is not None:
        y = y + a["bias"].to(acc)
    if d is not None:
        y = torch.addcmul(y, uf, d.to(acc))
    if a["activation"] == "silu":
        y = torch.nn.functional.silu(y, inplace=True)   # y is this call's own buffer
    if gate is not None:
        g = gate.to(acc)
        y = y.mul_(g) if y.shape == torch.broadcast_shapes(y.shape, g.shape) and y.is_contiguous() else y * g
    return y.to(dtype)


def writes_backward(grad_shape, u, k, a) -> bool:
    """Whether :func:`backward` computes this call's gradients: causal, direct, u (B, C, L) keeping each step's
    channels adjacent (``channels_inner``) with one kernel per channel, and the result of u's shape (the
    epilogue operands broadcast into it)."""
    return (a["causal"] and a["algorithm"] == "direct" and u.numel() > 0 and k.shape[-1] > 0
            and _per_channel(u, k, u.shape[:-1]) and channels_inner(u) and tuple(grad_shape) == tuple(u.shape))


def backward(grad, u, k, d, gate, a):
    """[du, dk, dd, dgate, dbias] of :func:`forward` for upstream ``grad`` (None where ``a["needs"][i]`` is
    False), or None when :func:`writes_backward` refuses the call.  Recomputes z = scale·(u ⊛ k) + bias + d·u
    (one channels-last conv2d), then, all in u's memory order: dz = act'(z)·grad·gate, du = scale·(dz ⋆ k)
    + d·dz (a conv2d with the kernel unflipped, padded on the right), dk[s] = scale·Σ_{b,t} dz[t]·u[t−s]."""
    bias = a["bias"]
    if not writes_backward(grad.shape, u, k, a):
        return None
    needs = [bool(n) and x is not None for n, x in zip(a["needs"], (u, k, d, gate, bias))]
    acc = _dtypes(u, k, d, gate, bias)[1]
    # u in acc, laid (B, L, C) densely: one copy (of whole rows) for a column slice, read by every step below
    uf = u if u.dtype == acc and laid_transposed(u) else transposed_empty(u, acc).copy_(u)
    kf = k.to(acc)
    C, length = u.shape[1], u.shape[-1]
    lk = k.shape[-1]
    g = grad.to(acc)
    if not laid_transposed(g):   # lay the gradient (B, L, C) (one copy) rather than mix two orders
        g = transposed_empty(uf).copy_(g)
    z = _conv_direct(uf, kf)
    if a["scale"] != 1.0:
        z.mul_(a["scale"])
    if bias is not None:
        z.add_(bias.to(acc))
    if d is not None:
        z.addcmul_(uf, d.to(acc))
    silu = a["activation"] == "silu"
    dgate = None
    if needs[3]:
        h = torch.nn.functional.silu(z) if silu else z
        dgate = (g * h).sum_to_size(gate.shape).to(gate.dtype)
    dh = g * gate.to(acc) if gate is not None else g
    dz = torch.ops.aten.silu_backward(dh, z) if silu else dh
    dbias = dz.sum_to_size(bias.shape).to(bias.dtype) if needs[4] else None
    dd = (dz * uf).sum_to_size(d.shape).to(d.dtype) if needs[2] else None
    dc = dz * a["scale"] if a["scale"] != 1.0 else dz   # the gradient of the convolution's output
    du = dk = None
    if needs[0]:
        w = kf.reshape(C, 1, 1, lk)
        corr = torch.nn.functional.conv2d(dc.unsqueeze(2), w, padding=(0, lk - 1), groups=C)
        corr = corr[..., lk - 1:].squeeze(2)    # du[t] = Σ_s k[s]·dc[t+s]
        du = transposed_empty(uf)
        torch.addcmul(corr, dz, d.to(acc), out=du) if d is not None else du.copy_(corr)
        du = du.to(u.dtype)
    if needs[1]:
        dk = kf.new_zeros(C, lk)
        for s in range(min(lk, length)):
            dk[:, s] = (dc[..., s:] * uf[..., :length - s]).sum((0, 2))
        dk = dk.reshape(k.shape).to(k.dtype)
    return [du, dk, dd, dgate, dbias]
