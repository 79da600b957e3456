"""seqfuse::long_conv as a torch.library custom op: fake impl, autograd, runtime dispatch.

    seqfuse::long_conv(u, k, d?, gate?, bias?, causal, fft_size, scale, activation, algorithm, runtime) -> y
    seqfuse::long_conv_backward(grad_y, u, k, d?, gate?, bias?, <attributes>, runtime, needs)
        -> (du, dk, dd, dgate, dbias)

Implementations see the optional conv ``bias`` as ``attrs["bias"]``; one that does not
fuse it refuses calls that have one in its ``supports`` (the Triton kernels do).

Implementations register with the dispatcher: the Triton kernels (CUDA), the ATen
path (torch.fft / conv1d with the epilogue in place; the CPU fast path) and the
eager reference.
Gradients the caller does not need come back as empty tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from seqfuse.lowering.aten import long_conv as aten_long_conv
from seqfuse.lowering.autograd import as_result, recompute_grads
from seqfuse.lowering.reference.long_conv import channels_inner, laid_transposed, long_conv_reference, \
    transposed_empty
from seqfuse.runtime import Impl, register_impl, run

ATTR_NAMES = ("causal", "fft_size", "scale", "activation", "algorithm")


def _out_dtype(u, k, d, gate, bias=None):
    dtype = torch.promote_types(u.dtype, k.dtype)
    for x in (d, gate, bias):
        if x is not None:
            dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _out_shape(u, k, d, gate, bias=None):
    shape = torch.broadcast_shapes(u.shape, (*k.shape[:-1], u.shape[-1]))
    for x in (d, gate, bias):
        if x is not None:
            shape = torch.broadcast_shapes(shape, x.shape)
    return shape


def _result_transposed(u, shape) -> bool:
    """Whether the result is laid (B, L, C) (``transposed_empty(u)``): u (B, C, L) keeps each step's channels
    adjacent (``channels_inner``: a transposed projection, as causal conv1d layers read it, which the direct
    convolution reads in place, or a column slice of one) and the result has u's shape.  Provable on sizes
    and strides alone, so the fake value and the real one are laid alike; the program then reads the result
    back as (B, L, C) without a copy."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true as known
    return len(shape) == 3 and channels_inner(u) and all(known(a == b) for a, b in zip(shape, u.shape))


def _grad_like(x, u):
    """An empty gradient for operand ``x``: laid like the result (``transposed_empty``) for a channels-inner
    signal ``u`` (the gradient of a column slice then lands in the projection's order), else like ``x``."""
    return transposed_empty(u) if x is u and channels_inner(u) else torch.empty_like(x)


@torch.library.custom_op("seqfuse::long_conv", mutates_args=())
def long_conv(u: Tensor, k: Tensor, d: Optional[Tensor], gate: Optional[Tensor], bias: Optional[Tensor],
              causal: bool, fft_size: int, scale: float, activation: str, algorithm: str, runtime: str) -> Tensor:
    """Long convolution with bias, skip, activation and gate; see seqfuse.ir.ops.LongConv."""
    a = dict(causal=causal, fft_size=fft_size, scale=scale, activation=activation, algorithm=algorithm, bias=bias)
    y = run("long_conv", "forward", runtime, dict(u=u, k=k, d=d, gate=gate, bias=bias), a, u, k, d, gate, a)
    shape = _out_shape(u, k, d, gate, bias)
    if _result_transposed(u, shape):
        like = transposed_empty(u, y.dtype)
        if tuple(y.shape) == tuple(shape) and y.stride()[1:] == like.stride()[1:] \
                and (shape[0] == 1 or y.stride(0) == like.stride(0)):
            # laid so already (one batch row: its stride is free) -- e.g. the first L columns of the direct
            # convolution's padded result: the fake value's strides over the same memory, no copy
            return y.as_strided(like.shape, like.stride(), y.storage_offset())
        return like.copy_(y.expand(shape))
    return y.expand(shape).contiguous()


@long_conv.register_fake
def _(u, k, d, gate, bias, causal, fft_size, scale, activation, algorithm, runtime):
    shape, dtype = _out_shape(u, k, d, gate, bias), _out_dtype(u, k, d, gate, bias)
    return transposed_empty(u, dtype) if _result_transposed(u, shape) else u.new_empty(shape, dtype=dtype)


@torch.library.custom_op("seqfuse::long_conv_backward", mutates_args=())
def long_conv_backward(grad: Tensor, u: Tensor, k: Tensor, d: Optional[Tensor], gate: Optional[Tensor],
                       bias: Optional[Tensor], causal: bool, fft_size: int, scale: float, activation: str, algorithm: str, runtime: str,
                       needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (du, dk, dd, dgate, dbias) of seqfuse::long_conv; empty where ``needs`` is False."""
    a = dict(causal=causal, fft_size=fft_size, scale=scale, activation=activation, algorithm=algorithm,
             needs=list(needs), bias=bias)
    grads = list(run("long_conv", "backward", runtime, dict(u=u, k=k, d=d, gate=gate, bias=bias), a,
                     grad, u, k, d, gate, a))
    grads += [None] * (5 - len(grads))  # implementations without a bias return four gradients
    inputs = (grad, u, k, d, gate, bias)
    return tuple(as_result(g, _grad_like(x, u), inputs) if g is not None else u.new_empty(0)
                 for x, g in zip((u, k, d, gate, bias), grads))


@long_conv_backward.register_fake
def _(grad, u, k, d, gate, bias, causal, fft_size, scale, activation, algorithm, runtime, needs):
    return tuple(_grad_like(x, u) if (n and x is not None) else u.new_empty(0)
                 for x, n in zip((u, k, d, gate, bias), needs))


def _setup_context(ctx, inputs, output):
    u, k, d, gate, bias, *attrs, runtime = inputs
    ctx.attrs, ctx.runtime = attrs, runtime
    ctx.save_for_backward(u, k, d, gate, bias)


def _backward(ctx, grad):
    u, k, d, gate, bias = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[i]) and x is not None for i, x in enumerate((u, k, d, gate, bias))]
    # a gradient laid like a transposed u stays so (the implementations read strides; a copy would mix layouts)
    grad = grad if grad.shape == u.shape and channels_inner(u) and laid_transposed(grad) else grad.contiguous()
    grads = torch.ops.seqfuse.long_conv_backward(grad, u, k, d, gate, bias, *ctx.attrs, ctx.runtime, needs)
    return (*[g if n else None for g, n in zip(grads, needs)], *([None] * (len(ctx.attrs) + 1)))


long_conv.register_autograd(_backward, setup_context=_setup_context)


def _reference_forward(u, k, d, gate, a):
    return long_conv_reference(u, k, d, gate, bias=a["bias"], **{n: a[n] for n in ATTR_NAMES})


def _reference_backward(grad, u, k, d, gate, a):
    def fn(u_, k_, d_, g_, b_):
        return long_conv_reference(u_, k_, d_, g_, bias=b_, **{n: a[n] for n in ATTR_NAMES})
    return recompute_grads(fn, grad, [u, k, d, gate, a["bias"]], a["needs"])


register_impl("long_conv", Impl("eager", lambda t, a: None, _reference_forward, _reference_backward))
def _aten_backward(grad, u, k, d, gate, a):
    grads = aten_long_conv.backward(grad, u, k, d, gate, a)
    return grads if grads is not None else _reference_backward(grad, u, k, d, gate, a)


register_impl("long_conv", Impl("aten", aten_long_conv.supports, aten_long_conv.forward, _aten_backward))
# the generated Triton kernels, tried first (its ``supports`` refuses when triton cannot run the call)
from seqfuse.lowering.triton import long_conv as triton_long_conv  # noqa: E402

triton_long_conv.register()
