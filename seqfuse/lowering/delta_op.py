"""seqfuse::delta as a torch.library custom op: fake impl, autograd, runtime dispatch.

    seqfuse::delta(q, k, v, beta, g?, h0?, gate, scale, chunk, algorithm, runtime, finite_only=False, p?, e?,
                   read="decayed") -> (y, h)
    seqfuse::delta_backward(grad_y, grad_h, q, k, v, beta, g?, h0?, gate, scale, chunk, algorithm, runtime,
                            needs, p?, e?, read="decayed") -> (dq, dk, dv, dbeta, dg, dh0, dp, de)

q, k (B, T, H, K); v (B, T, H, V); beta (B, T, H); g (B, T, H) for gate "scalar", (B, T, H, K) for
"vector", None for "none"; h0 (B, H, K, V); p (B, T, H, K) the read key (None: k); e (B, T, H, K) the
erase key (None: k); read "decayed" | "previous" (see seqfuse.ir.ops.Delta).  Both results carry gradients: y (B, T, H, V) and the
final state h (B, H, K, V), in the promoted dtype of the operands.  The algorithm ("recurrent",
"chunked") is set by passes/select; "auto" is refused.  With ``finite_only`` (the IR attribute: the
replaced program forms its decays as differences of a cumulative sum: fla's and transformers' chunked
forms), a call whose g is not finite raises ``seqfuse.runtime.ProgramRequired`` before any work, and
the compiled graph runs the program as written (see seqfuse.lowering.ssd_op).

Implementations register with the dispatcher (seqfuse.runtime) as
``Impl(path, supports, forward, backward)`` with
``forward(q, k, v, beta, g, h0, p, e, attrs) -> (y, h)`` and
``backward(grad_y, grad_h, q, k, v, beta, g, h0, p, e, attrs) -> (dq, dk, dv, dbeta, dg, dh0, dp, de)``,
attrs = {"gate", "scale", "chunk", "algorithm", "read"} (+ "needs": eight bools, for the backward).  A read
key p, an erase key e or read="previous" runs on the eager reference, the C kernel (recurrent, CPU) and
the Triton step-loop kernels (recurrent); the Triton chunked kernels refuse such a call.
Gradients the caller does not need may be None; the op returns them as empty tensors.

The eager backward differentiates the chunked reference again (inside the op, under
``autograd_inside_op``): it computes the same function as the recurrent one, and its autograd
graph holds O(T·(C + K + V)) values per head plus one state per chunk, where differentiating the
step loop would keep T states.  Sequences of at most ``RECURRENT_BACKWARD_MAX_T`` steps
differentiate the recurrence itself.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from seqfuse.lowering.autograd import as_result, recompute_grads
from seqfuse.lowering.reference.delta import ALGORITHMS, check_delta_args, delta_reference, out_dtype
from seqfuse.runtime import Impl, poisoned, refuse_nonfinite_decay, register_impl, run

_OPERANDS = ("q", "k", "v", "beta", "g", "h0", "p", "e")
#: the positions of q, k, v, beta, g, h0, p, e among seqfuse::delta's inputs (for needs_input_grad)
_INPUT_INDEX = (0, 1, 2, 3, 4, 5, 12, 13)
#: up to this many steps the eager backward differentiates the step loop; beyond, the chunked form
RECURRENT_BACKWARD_MAX_T = 16


def _check(q, k, v, beta, g, h0, gate, scale, chunk, algorithm, p=None, e=None, read="decayed"):
    check_delta_args(q, k, v, beta, g, h0, gate, p, e, read)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"seqfuse.delta: algorithm must be one of {ALGORITHMS} (passes/select sets it), "
                         f"got {algorithm!r}")
    if not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"seqfuse.delta: chunk must be a positive int, got {chunk!r}")


def _attrs(gate, scale, chunk, algorithm, **more):
    return dict(gate=gate, scale=float(scale), chunk=chunk, algorithm=algorithm, **more)


def _empty_results(q, k, v, beta, g, h0, p=None, e=None):
    B, T, H, K = k.shape
    V = v.shape[3]
    dtype = out_dtype(q, k, v, beta, g, h0, p, e)
    return q.new_empty((B, T, H, V), dtype=dtype), q.new_empty((B, H, K, V), dtype=dtype)


@torch.library.custom_op("seqfuse::delta", mutates_args=())
def delta(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Optional[Tensor], h0: Optional[Tensor], gate: str,
          scale: float, chunk: int, algorithm: str, runtime: str, finite_only: bool = False,
          p: Optional[Tensor] = None, e: Optional[Tensor] = None, read: str = "decayed") -> tuple[Tensor, Tensor]:
    """The delta rule; see seqfuse.ir.ops.Delta.  Returns (y, final state).  Raises ProgramRequired
    when ``finite_only`` and ``g`` is not finite (see the module docstring)."""
    _check(q, k, v, beta, g, h0, gate, scale, chunk, algorithm, p, e, read)
    poison = refuse_nonfinite_decay("delta", "g", g) if finite_only else None
    attrs = _attrs(gate, scale, chunk, algorithm, read=read)
    ops = (q, k, v, beta, g, h0, p, e)
    y, h = run("delta", "forward", runtime, dict(zip(_OPERANDS, ops)), attrs, *ops, attrs)
    y, h = poisoned((y, h), poison)
    ey, eh = _empty_results(*ops)
    return as_result(y, ey, ops), as_result(h, eh, ops)


@delta.register_fake
def _(q, k, v, beta, g, h0, gate, scale, chunk, algorithm, runtime, finite_only=False, p=None, e=None,
      read="decayed"):
    _check(q, k, v, beta, g, h0, gate, scale, chunk, algorithm, p, e, read)
    return _empty_results(q, k, v, beta, g, h0, p, e)


@torch.library.custom_op("seqfuse::delta_backward", mutates_args=())
def delta_backward(grad_y: Tensor, grad_h: Tensor, q: Tensor, k: Tensor, v: Tensor, beta: Tensor,
                   g: Optional[Tensor], h0: Optional[Tensor], gate: str, scale: float, chunk: int, algorithm: str,
                   runtime: str, needs: list[bool], p: Optional[Tensor] = None, e: Optional[Tensor] = None,
                   read: str = "decayed") -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv, dbeta, dg, dh0, dp, de) of seqfuse::delta given the gradients of y and of the
    final state; empty where ``needs`` (eight bools) is False."""
    attrs = _attrs(gate, scale, chunk, algorithm, needs=list(needs), read=read)
    ops = (q, k, v, beta, g, h0, p, e)
    grads = run("delta", "backward", runtime, dict(zip(_OPERANDS, ops)), attrs, grad_y, grad_h, *ops, attrs)
    inputs = (grad_y, grad_h, *ops)
    return tuple(as_result(gr, torch.empty_like(t), inputs) if (n and t is not None and gr is not None) else
                 (torch.zeros_like(t) if (n and t is not None) else q.new_empty(0))
                 for t, gr, n in zip(ops, grads, needs))


@delta_backward.register_fake
def _(grad_y, grad_h, q, k, v, beta, g, h0, gate, scale, chunk, algorithm, runtime, needs, p=None, e=None,
      read="decayed"):
    return tuple(torch.empty_like(t) if (n and t is not None) else q.new_empty(0)
                 for t, n in zip((q, k, v, beta, g, h0, p, e), needs))


def _setup_context(ctx, inputs, output):
    # every argument of the schema, defaults filled in; finite_only concerns the forward only
    q, k, v, beta, g, h0, gate, scale, chunk, algorithm, runtime, _finite_only, p, e, read = inputs
    ctx.attrs, ctx.runtime, ctx.read = (gate, scale, chunk, algorithm), runtime, read
    ctx.save_for_backward(q, k, v, beta, g, h0, p, e)


def _backward(ctx, grad_y, grad_h):
    ops = ctx.saved_tensors
    given = len(ctx.needs_input_grad)   # the arguments the caller passed: p and e count only when given
    needs = [i < given and bool(ctx.needs_input_grad[i]) and t is not None for i, t in zip(_INPUT_INDEX, ops)]
    y_like, h_like = _empty_results(*ops)
    grad_y = torch.zeros_like(y_like) if grad_y is None else grad_y.contiguous()
    grad_h = torch.zeros_like(h_like) if grad_h is None else grad_h.contiguous()
    grads = torch.ops.seqfuse.delta_backward(grad_y, grad_h, *ops[:6], *ctx.attrs, ctx.runtime, needs, *ops[6:],
                                             ctx.read)
    dq, dk, dv, dbeta, dg, dh0, dp, de = (gr if n else None for gr, n in zip(grads, needs))
    return (dq, dk, dv, dbeta, dg, dh0, None, None, None, None, None, None, dp, de, None)[:given]


delta.register_autograd(_backward, setup_context=_setup_context)


def _reference_forward(q, k, v, beta, g, h0, p, e, attrs):
    return delta_reference(q, k, v, beta, g, h0, gate=attrs["gate"], scale=attrs["scale"], chunk=attrs["chunk"],
                           algorithm=attrs["algorithm"], p=p, e=e, read=attrs.get("read", "decayed"))


def _reference_backward(grad_y, grad_h, q, k, v, beta, g, h0, p, e, attrs):
    # the adjoint by differentiating a reference again: the step loop for short sequences, else the
    # chunked form (the same function; its autograd graph does not keep a state per step)
    algorithm = "recurrent" if k.shape[1] <= RECURRENT_BACKWARD_MAX_T else "chunked"

    def fn(q, k, v, beta, g, h0, p, e):
        return delta_reference(q, k, v, beta, g, h0, gate=attrs["gate"], scale=attrs["scale"], chunk=attrs["chunk"],
                               algorithm=algorithm, p=p, e=e, read=attrs.get("read", "decayed"))
    return recompute_grads(fn, (grad_y, grad_h), [q, k, v, beta, g, h0, p, e], attrs["needs"])


register_impl("delta", Impl("eager", lambda t, a: None, _reference_forward, _reference_backward))
# the generated C kernel ("cpu" path: the recurrent algorithm), tried before the eager reference; its
# ``supports`` refuses a call it cannot run (no C compiler, the chunked algorithm, K or V > MAX_D, ...)
from seqfuse.lowering.cpu import delta as _cpu_delta  # noqa: E402

_cpu_delta.register()

# the Triton chunked and step-loop forward and backward (CUDA, or CPU under TRITON_INTERPRET=1).  Its
# ``supports`` refuses p / e / read="previous" for the chunked algorithm, NaN / inf operands, ...
from seqfuse.lowering.triton import delta as _triton_delta  # noqa: E402

_triton_delta.register()
