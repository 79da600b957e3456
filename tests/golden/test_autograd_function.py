"""Custom ``torch.autograd.Function``s keep the backward their author wrote.

Dynamo captures ``Fn.apply`` as one ``autograd_function_apply`` node holding the forward and
backward bodies; the pre-dispatch re-trace (compiler/canonicalize.py) must keep it one opaque
node.  Tracing through it (make_fx does, by default) keeps the forward and drops the custom
backward: autograd then differentiates the forward's ops, or nothing at all (transformers'
Bloom ``GeLUFunction``, RecurrentGemma's ``SqrtBoundDerivative``).

Each Function below has a backward that is *not* the derivative of its forward, so a
compile that differentiates the forward instead gives different gradients.
"""
from __future__ import annotations

import math

import pytest
import torch

import seqfuse
from helpers import check_against_eager


class ScaledGrad(torch.autograd.Function):
    """Forward x * 2; backward g * 7 * x (deliberately not the derivative of the forward)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 2

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 7 * x


class StraightThroughRound(torch.autograd.Function):
    """round(x) with the identity as its gradient (a straight-through estimator: the
    forward's own derivative is zero almost everywhere)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class TwoOutputs(torch.autograd.Function):
    """(x * y, argmax mask) with a non-differentiable second output and a custom backward."""

    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x, y)
        out = x * y
        idx = (out == out.amax(-1, keepdim=True)).to(out.dtype)
        ctx.mark_non_differentiable(idx)
        return out, idx

    @staticmethod
    def backward(ctx, g, _):
        x, y = ctx.saved_tensors
        return g * y * 3, g * x


@pytest.mark.parametrize("downstream", ["eager", "aot_eager", "inductor"])
def test_custom_backward_is_kept(downstream):
    def f(x, w):
        return ScaledGrad.apply(x @ w).tanh()

    x, w = torch.randn(3, 4), torch.randn(4, 5, requires_grad=True)
    report = check_against_eager(f, x, w, options={"downstream": downstream})
    assert not report.near_misses, str(report)


def test_straight_through_estimator_gets_its_gradient():
    def f(x):
        return StraightThroughRound.apply(x * 3).sin()

    x = torch.randn(6, 5, requires_grad=True)
    check_against_eager(f, x)
    # the estimator's gradient is not zero (tracing through round would give zeros)
    got = torch.autograd.grad(torch.compile(f, backend="seqfuse")(x).sum(), x)[0]
    assert got.abs().sum() > 0


def test_non_differentiable_output_and_two_inputs():
    def f(x, y):
        out, idx = TwoOutputs.apply(x, y.exp())
        return out * (1 + idx)

    x, y = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    check_against_eager(f, x, y)


def test_function_around_attention_keeps_both():
    """The mixer outside the Function is still found; the Function's backward is kept."""

    def f(q, k, v):
        L = q.shape[-2]
        s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        causal = torch.ones(L, L, dtype=torch.bool).triu(1)
        p = s.masked_fill(causal, float("-inf")).softmax(-1)
        return ScaledGrad.apply(p @ v)

    q, k, v = (torch.randn(2, 3, 8, 4, requires_grad=True) for _ in range(3))
    report = check_against_eager(f, q, k, v)
    assert report.count("attention") == 1, str(report)


def test_function_in_unrolled_loop_keeps_backward():
    """A Function applied at every step of a time loop (the graph Dynamo unrolls is large and
    repetitive, the shape the replay tracer is made for; it must not drop the Function)."""

    def f(x, a):
        h = torch.zeros_like(x[:, 0])
        ys = []
        for t in range(x.shape[1]):
            h = a[:, t] * h + ScaledGrad.apply(x[:, t])
            ys.append(h)
        return torch.stack(ys, 1)

    x = torch.randn(2, 40, 8, requires_grad=True)
    a = torch.rand(2, 40, 8, requires_grad=True)
    check_against_eager(f, x, a)


def test_graph_keeps_the_function_opaque():
    """The re-traced graph holds one autograd_function_apply node and none of its body's ops."""
    from seqfuse.compiler.canonicalize import trace_pre_dispatch

    seen = []

    def backend(gm, example_inputs):
        seen.append(trace_pre_dispatch(gm, example_inputs))
        return gm.forward

    def f(x):
        return ScaledGrad.apply(x.sin())

    torch.compile(f, backend=backend)(torch.randn(3, requires_grad=True))
    (traced,) = seen
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.higher_order.autograd_function_apply) == 1, traced.graph
    # the forward's x * 2 is inside the Function's body, not in the graph
    assert torch.ops.aten.mul.Tensor not in targets, traced.graph
    assert seqfuse  # imported for the backend registration
