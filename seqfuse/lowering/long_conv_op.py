"""seqfuse::long_conv as a torch.library custom op: fake impl, autograd, runtime dispatch.

    seqfuse::long_conv(u, k, d?, gate?, causal, fft_size, scale, activation, algorithm, runtime) -> y
    seqfuse::long_conv_backward(grad_y, u, k, d?, gate?, <attributes>, runtime, needs) -> (du, dk, dd, dgate)

Implementations register with the dispatcher; today the eager reference
(torch.fft, or conv1d for the direct algorithm) runs on every device.
Gradients the caller does not need come back as empty tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from seqfuse.lowering.autograd import recompute_grads
from seqfuse.lowering.reference.long_conv import long_conv_reference
from seqfuse.runtime import Impl, register_impl, run

ATTR_NAMES = ("causal", "fft_size", "scale", "activation", "algorithm")


def _out_dtype(u, k, d, gate):
    dtype = torch.promote_types(u.dtype, k.dtype)
    for x in (d, gate):
        if x is not None:
            dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _out_shape(u, k, d, gate):
    shape = torch.broadcast_shapes(u.shape, (*k.shape[:-1], u.shape[-1]))
    for x in (d, gate):
        if x is not None:
            shape = torch.broadcast_shapes(shape, x.shape)
    return shape


@torch.library.custom_op("seqfuse::long_conv", mutates_args=())
def long_conv(u: Tensor, k: Tensor, d: Optional[Tensor], gate: Optional[Tensor], causal: bool, fft_size: int,
              scale: float, activation: str, algorithm: str, runtime: str) -> Tensor:
    """Long convolution with skip, activation and gate; see seqfuse.ir.ops.LongConv."""
    a = dict(causal=causal, fft_size=fft_size, scale=scale, activation=activation, algorithm=algorithm)
    y = run("long_conv", "forward", runtime, dict(u=u, k=k, d=d, gate=gate), a, u, k, d, gate, a)
    return y.expand(_out_shape(u, k, d, gate)).contiguous()


@long_conv.register_fake
def _(u, k, d, gate, causal, fft_size, scale, activation, algorithm, runtime):
    return u.new_empty(_out_shape(u, k, d, gate), dtype=_out_dtype(u, k, d, gate))


@torch.library.custom_op("seqfuse::long_conv_backward", mutates_args=())
def long_conv_backward(grad: Tensor, u: Tensor, k: Tensor, d: Optional[Tensor], gate: Optional[Tensor],
                       causal: bool, fft_size: int, scale: float, activation: str, algorithm: str, runtime: str,
                       needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (du, dk, dd, dgate) of seqfuse::long_conv; empty where ``needs`` is False."""
    a = dict(causal=causal, fft_size=fft_size, scale=scale, activation=activation, algorithm=algorithm,
             needs=list(needs))
    grads = run("long_conv", "backward", runtime, dict(u=u, k=k, d=d, gate=gate), a, grad, u, k, d, gate, a)
    like = lambda x, g: torch.empty_like(x).copy_(g) if g is not None else u.new_empty(0)  # noqa: E731
    return tuple(like(x, g) for x, g in zip((u, k, d, gate), grads))


@long_conv_backward.register_fake
def _(grad, u, k, d, gate, causal, fft_size, scale, activation, algorithm, runtime, needs):
    return tuple(torch.empty_like(x) if (n and x is not None) else u.new_empty(0)
                 for x, n in zip((u, k, d, gate), needs))


def _setup_context(ctx, inputs, output):
    u, k, d, gate, *attrs, runtime = inputs
    ctx.attrs, ctx.runtime = attrs, runtime
    ctx.save_for_backward(u, k, d, gate)


def _backward(ctx, grad):
    u, k, d, gate = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[i]) and x is not None for i, x in enumerate((u, k, d, gate))]
    grads = torch.ops.seqfuse.long_conv_backward(grad.contiguous(), u, k, d, gate, *ctx.attrs, ctx.runtime, needs)
    return (*[g if n else None for g, n in zip(grads, needs)], *([None] * (len(ctx.attrs) + 1)))


long_conv.register_autograd(_backward, setup_context=_setup_context)


def _reference_forward(u, k, d, gate, a):
    return long_conv_reference(u, k, d, gate, **{n: a[n] for n in ATTR_NAMES})


def _reference_backward(grad, u, k, d, gate, a):
    fn = lambda u_, k_, d_, g_: long_conv_reference(u_, k_, d_, g_, **{n: a[n] for n in ATTR_NAMES})  # noqa: E731
    return recompute_grads(fn, grad, [u, k, d, gate], a["needs"])


register_impl("long_conv", Impl("eager", lambda t, a: None, _reference_forward, _reference_backward))
from seqfuse.lowering.triton import long_conv as triton_long_conv; triton_long_conv.register()  # noqa: E402,E702
