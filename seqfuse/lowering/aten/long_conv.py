"""seqfuse.long_conv on ATen's FFT and convolution kernels, with the epilogue done in place.

The same math as the reference (``seqfuse/lowering/reference/long_conv.py``), written for
speed on CPU: the spectrum product and the epilogue reuse their buffers, the program's
scale is folded into the kernel's spectrum (H rows instead of B·H), and the skip is one
``addcmul``.  Forward only: gradients come from differentiating the reference.
"""
from __future__ import annotations

import torch

from seqfuse.lowering.reference.long_conv import _conv_direct, fft_size_for


def supports(t: dict, a: dict) -> str | None:
    """Every call the reference handles (the epilogue order is the same)."""
    if not (t["u"].is_floating_point() and t["k"].is_floating_point()):
        return "complex or integer signals"
    return None


def forward(u, k, d, gate, a):
    """y = act(scale·(u ⊛ k)[..., :L] + bias + d·u) · gate."""
    dtype = torch.promote_types(u.dtype, k.dtype)
    for x in (d, gate, a["bias"]):
        if x is not None:
            dtype = torch.promote_types(dtype, x.dtype)
    acc = torch.promote_types(dtype, torch.float32)
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
        y = torch.nn.functional.silu(y)
    if gate is not None:
        g = gate.to(acc)
        y = y.mul_(g) if y.shape == torch.broadcast_shapes(y.shape, g.shape) and y.is_contiguous() else y * g
    return y.to(dtype)
