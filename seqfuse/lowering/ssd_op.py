"""seqfuse::ssd as a torch.library custom op: fake impl, autograd, runtime dispatch.

    seqfuse::ssd(x, b, c, a?, d?, h0?, decay, chunk, algorithm, runtime, finite_only=False) -> (y, h)
    seqfuse::ssd_backward(grad_y, grad_h, x, b, c, a?, d?, h0?, decay, chunk, algorithm, runtime, needs)
        -> (dx, db, dc, da, dd, dh0)

Both results carry gradients: y (B, T, H, P) and the final state h (B, H, P, N).  The
algorithm ("recurrent", "quadratic", "chunked") is set by passes/select; "auto" is refused.
With ``finite_only`` (the IR attribute: the op equals the replaced program only while a is finite,
e.g. a program that forms its decays as differences of a cumulative sum), a call whose ``a`` is not
finite raises ``seqfuse.runtime.ProgramRequired`` before any work (one ``isfinite`` reduction of a,
a device synchronization on CUDA; while a CUDA graph is captured, no sync: the results come out all
NaN instead): every algorithm here resets the state exactly at a -inf
log-decay where such a program computes -inf - (-inf) = NaN, so the compiled graph runs the
program as written instead (seqfuse.compiler.constants.rerunning).

Implementations register with the dispatcher (seqfuse.runtime) as
``Impl(path, supports, forward, backward)`` with
``forward(x, b, c, a, d, h0, attrs) -> (y, h)`` and
``backward(grad_y, grad_h, x, b, c, a, d, h0, attrs) -> (dx, db, dc, da, dd, dh0)``,
attrs = {"decay", "chunk", "algorithm"} (+ "needs": six bools, for the backward).
Gradients the caller does not need may be None; the op returns them as empty tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from seqfuse.lowering.autograd import as_result, recompute_grads
from seqfuse.lowering.reference.ssd import ALGORITHMS, check_ssd_args, out_dtype, ssd_chunked_backward, ssd_reference, \
    ssd_shapes
from seqfuse.runtime import Impl, all_finite, poisoned, refuse_nonfinite_decay, register_impl, run


def _check(x, b, c, a, d, h0, decay, chunk, algorithm):
    check_ssd_args(x, b, c, a, d, h0, decay)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"seqfuse.ssd: algorithm must be one of {ALGORITHMS} (passes/select sets it), "
                         f"got {algorithm!r}")
    if not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"seqfuse.ssd: chunk must be a positive int, got {chunk!r}")


def _attrs(decay, chunk, algorithm, **more):
    return dict(decay=decay, chunk=chunk, algorithm=algorithm, **more)


def _empty_results(x, b, c, h0):
    B, T, H, P, N = ssd_shapes(x, b, c, h0)
    dtype = out_dtype(x, b, c)
    return x.new_empty((B, T, H, P), dtype=dtype), x.new_empty((B, H, P, N), dtype=dtype)


@torch.library.custom_op("seqfuse::ssd", mutates_args=())
def ssd(x: Tensor, b: Tensor, c: Tensor, a: Optional[Tensor], d: Optional[Tensor], h0: Optional[Tensor],
        decay: str, chunk: int, algorithm: str, runtime: str, finite_only: bool = False) -> tuple[Tensor, Tensor]:
    """A matrix-state linear recurrence; see seqfuse.ir.ops.SSD.  Returns (y, final state).
    Raises ProgramRequired when ``finite_only`` and ``a`` is not finite (see the module docstring)."""
    _check(x, b, c, a, d, h0, decay, chunk, algorithm)
    poison = refuse_nonfinite_decay("ssd", "a", a) if finite_only else None
    attrs = _attrs(decay, chunk, algorithm)
    y, h = run("ssd", "forward", runtime, dict(x=x, b=b, c=c, a=a, d=d, h0=h0), attrs, x, b, c, a, d, h0, attrs)
    y, h = poisoned((y, h), poison)
    ey, eh = _empty_results(x, b, c, h0)
    y = as_result(y, ey, (x, b, c, a, d, h0))
    return y, as_result(h, eh, (x, b, c, a, d, h0, y))  # outputs may not alias each other either


@ssd.register_fake
def _(x, b, c, a, d, h0, decay, chunk, algorithm, runtime, finite_only=False):
    _check(x, b, c, a, d, h0, decay, chunk, algorithm)
    return _empty_results(x, b, c, h0)


_OPERANDS = ("x", "b", "c", "a", "d", "h0")


@torch.library.custom_op("seqfuse::ssd_backward", mutates_args=())
def ssd_backward(grad_y: Tensor, grad_h: Tensor, x: Tensor, b: Tensor, c: Tensor, a: Optional[Tensor],
                 d: Optional[Tensor], h0: Optional[Tensor], decay: str, chunk: int, algorithm: str, runtime: str,
                 needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx, db, dc, da, dd, dh0) of seqfuse::ssd given the gradients of y and of the final
    state; empty where ``needs`` is False."""
    attrs = _attrs(decay, chunk, algorithm, needs=list(needs))
    tensors = dict(zip(_OPERANDS, (x, b, c, a, d, h0)))
    grads = run("ssd", "backward", runtime, tensors, attrs, grad_y, grad_h, x, b, c, a, d, h0, attrs)
    out = []
    for t, g, n in zip((x, b, c, a, d, h0), grads, needs):   # results alias no input and no other result
        out.append(as_result(g, torch.empty_like(t), (grad_y, grad_h, x, b, c, a, d, h0, *out))
                   if (n and t is not None and g is not None) else
                   (torch.zeros_like(t) if (n and t is not None) else x.new_empty(0)))
    return tuple(out)


@ssd_backward.register_fake
def _(grad_y, grad_h, x, b, c, a, d, h0, decay, chunk, algorithm, runtime, needs):
    return tuple(torch.empty_like(t) if (n and t is not None) else x.new_empty(0)
                 for t, n in zip((x, b, c, a, d, h0), needs))


def _setup_context(ctx, inputs, output):
    x, b, c, a, d, h0, decay, chunk, algorithm, runtime = inputs[:10]   # finite_only: checked by the forward
    ctx.attrs, ctx.runtime, ctx.n_inputs = (decay, chunk, algorithm), runtime, len(inputs)
    ctx.save_for_backward(x, b, c, a, d, h0)


def _backward(ctx, grad_y, grad_h):
    x, b, c, a, d, h0 = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[i]) and t is not None for i, t in enumerate((x, b, c, a, d, h0))]
    y_like, h_like = _empty_results(x, b, c, h0)
    grad_y = torch.zeros_like(y_like) if grad_y is None else grad_y.contiguous()
    grad_h = torch.zeros_like(h_like) if grad_h is None else grad_h.contiguous()
    grads = torch.ops.seqfuse.ssd_backward(grad_y, grad_h, x, b, c, a, d, h0, *ctx.attrs, ctx.runtime, needs)
    return (*[g if n else None for g, n in zip(grads, needs)], *([None] * (ctx.n_inputs - 6)))


ssd.register_autograd(_backward, setup_context=_setup_context)


def _reference_forward(x, b, c, a, d, h0, attrs):
    return ssd_reference(x, b, c, a, d, h0, decay=attrs["decay"], chunk=attrs["chunk"], algorithm=attrs["algorithm"])


def _reference_backward(grad_y, grad_h, x, b, c, a, d, h0, attrs):
    finite = bool(all_finite(grad_y, grad_h, x, b, c, a, d, h0))
    if attrs["algorithm"] == "chunked" and finite:  # the chunked algorithm's own adjoint, written out
        return ssd_chunked_backward(grad_y, grad_h, x, b, c, a, d, h0, decay=attrs["decay"], chunk=attrs["chunk"],
                                    needs=attrs["needs"])
    if not finite:
        # an inf input at a reset step (exp(-inf) = 0): the adjoints' cumulative sums meet inf - inf
        # (NaN) where the program's loop has a finite gradient; the recurrence differentiated step
        # by step keeps the program's NaN rules (docs/reliability.md, "NaN and inf")
        attrs = dict(attrs, algorithm="recurrent")

    # the others (short sequences): the adjoint by differentiating the reference again, through
    # Σ <out, grad_out> over the results that depend on a wanted operand (the final state does not
    # depend on c, nor on d: autograd.grad refuses a result without a graph)
    def fn(*operands):
        outs = ssd_reference(*operands, decay=attrs["decay"], chunk=attrs["chunk"], algorithm=attrs["algorithm"])
        terms = [(o * g.to(o.dtype)).sum() for o, g in zip(outs, (grad_y, grad_h)) if o.requires_grad]
        return sum(terms[1:], terms[0]) if terms else outs[0].sum()
    return recompute_grads(fn, None, [x, b, c, a, d, h0], attrs["needs"])


register_impl("ssd", Impl("eager", lambda t, a: None, _reference_forward, _reference_backward))
# the generated C kernels ("cpu" path: the recurrent algorithm), tried before the eager reference;
# their ``supports`` refuses a call they cannot run (no C compiler, a state too large, ...)
import seqfuse.lowering.cpu  # noqa: E402,F401
from seqfuse.lowering.triton import ssd as _triton_ssd  # noqa: E402,F401  (registers the "triton" path: the chunked forward kernel; its supports() refuses what it cannot run)
