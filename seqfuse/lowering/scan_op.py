"""seqfuse::scan as a torch.library custom op: fake impl, autograd, runtime dispatch.

    seqfuse::scan(a, b, c?, h0?, reverse, algorithm, runtime, dt?, u?, readout_dtype?) -> (y, h)
    seqfuse::scan_backward(grad_y, grad_h, a, b, c?, h0?, reverse, algorithm, runtime, needs, dt?, u?,
                           readout_dtype?) -> (da, db, dc, dh0, ddt, du)

a, b, c, dt, u are broadcastable to (*R, T, N) (stride-0 views welcome), h0 to (*R, N); a, b,
h0 may be complex (then y and h are complex).  With dt and/or u the call is the discretized
form: the step's decay is exp(dt ⊙ a) (when dt is given) and its input b ⊙ dt ⊙ u (see
seqfuse.ir.ops.Scan).  y is (*R, T) with a readout c, else (*R, T, N); h (*R, N) is the last
state computed.  With ``readout_dtype`` the readout reads the states rounded to that dtype and y
is in promote(readout_dtype, c.dtype) (``y_dtype``).  The algorithm ("recurrent", "chunked") is set by passes/select; "auto" is
refused.

Implementations register with the dispatcher (seqfuse.runtime) as
``Impl(path, supports, forward, backward)`` with
``forward(a, b, c, h0, dt, u, attrs) -> (y, h)`` and
``backward(grad_y, grad_h, a, b, c, h0, dt, u, attrs) -> (da, db, dc, dh0, ddt, du)``,
attrs = {"reverse", "algorithm", "readout_dtype"} (+ "needs": six bools, for the backward).  Every
path rounds the states for the readout (the C kernel refuses fp16 where the compiler has no
_Float16; the eager reference then runs the call).  A path whose kernels
only run the plain recurrence lifts them with
:func:`seqfuse.lowering.reference.scan.with_discretization` (which materializes the factors).
Gradients come in the operand's own shape and dtype (or None where not needed).  Complex
gradients follow PyTorch's convention (conjugate Wirtinger): for h = a·h' + b, da = dh·conj(h').
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from seqfuse.lowering.autograd import as_result
from seqfuse.ir.ops import READOUT_DTYPES
from seqfuse.lowering.reference.scan import ALGORITHMS, check_discretization, out_dtype, scan_backward_reference, \
    scan_reference, scan_shape, with_discretization, y_dtype
from seqfuse.runtime import Impl, register_impl, run


_OPERANDS = ("a", "b", "c", "h0", "dt", "u")


def _check(a, b, c, h0, dt, u, reverse, algorithm, readout_dtype=None):
    scan_shape(a, b, c, h0, dt, u)  # raises naming the operands that do not broadcast
    check_discretization(a, dt, u)
    if readout_dtype is not None and (c is None or readout_dtype not in READOUT_DTYPES):
        raise ValueError(f"seqfuse.scan: readout_dtype must be one of {READOUT_DTYPES} and needs a readout c, "
                         f"got {readout_dtype!r} with c {'absent' if c is None else 'given'}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"seqfuse.scan: algorithm must be one of {ALGORITHMS} (passes/select sets it), "
                         f"got {algorithm!r}")
    if not isinstance(reverse, bool):
        raise ValueError(f"seqfuse.scan: reverse must be a bool, got {reverse!r}")


def _empty_results(a, b, c, h0, dt=None, u=None, readout_dtype=None):
    full = scan_shape(a, b, c, h0, dt, u)
    dtype = out_dtype(a, b, c, h0, dt, u)
    y_shape = full[:-1] if c is not None else full
    return (a.new_empty(y_shape, dtype=y_dtype(dtype, c, readout_dtype)),
            a.new_empty((*full[:-2], full[-1]), dtype=dtype))


@torch.library.custom_op("seqfuse::scan", mutates_args=())
def scan(a: Tensor, b: Tensor, c: Optional[Tensor], h0: Optional[Tensor], reverse: bool, algorithm: str,
         runtime: str, dt: Optional[Tensor] = None, u: Optional[Tensor] = None,
         readout_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """A diagonal linear recurrence along axis -2; see seqfuse.ir.ops.Scan.  Returns (y, final state)."""
    _check(a, b, c, h0, dt, u, reverse, algorithm, readout_dtype)
    attrs = dict(reverse=reverse, algorithm=algorithm, readout_dtype=readout_dtype)
    ops = (a, b, c, h0, dt, u)
    y, h = run("scan", "forward", runtime, dict(zip(_OPERANDS, ops)), attrs, *ops, attrs)
    ey, eh = _empty_results(*ops, readout_dtype)
    y = as_result(y, ey, ops)
    # the last state is often a view of the states (a 1-D / 2-D scan's y and h share a layout):
    # outputs may alias neither the inputs nor each other
    return y, as_result(h, eh, (*ops, y))


@scan.register_fake
def _(a, b, c, h0, reverse, algorithm, runtime, dt=None, u=None, readout_dtype=None):
    _check(a, b, c, h0, dt, u, reverse, algorithm, readout_dtype)
    return _empty_results(a, b, c, h0, dt, u, readout_dtype)


@torch.library.custom_op("seqfuse::scan_backward", mutates_args=())
def scan_backward(grad_y: Tensor, grad_h: Tensor, a: Tensor, b: Tensor, c: Optional[Tensor], h0: Optional[Tensor],
                  reverse: bool, algorithm: str, runtime: str, needs: list[bool], dt: Optional[Tensor] = None,
                  u: Optional[Tensor] = None, readout_dtype: Optional[torch.dtype] = None
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (da, db, dc, dh0, ddt, du) of seqfuse::scan given the gradients of y and of the final
    state; empty where ``needs`` (six bools) is False."""
    attrs = dict(reverse=reverse, algorithm=algorithm, needs=list(needs), readout_dtype=readout_dtype)
    ops = (a, b, c, h0, dt, u)
    grads = run("scan", "backward", runtime, dict(zip(_OPERANDS, ops)), attrs, grad_y, grad_h, *ops, attrs)
    out = []
    for t, g, n in zip(ops, grads, needs):
        if not n or t is None:
            out.append(a.new_empty(0))
        elif g is None:
            out.append(torch.zeros_like(t))
        else:
            out.append(as_result(g if t.is_complex() or not g.is_complex() else g.real, torch.empty_like(t),
                                 (grad_y, grad_h, *ops, *out)))
    return tuple(out)


@scan_backward.register_fake
def _(grad_y, grad_h, a, b, c, h0, reverse, algorithm, runtime, needs, dt=None, u=None, readout_dtype=None):
    return tuple(torch.empty_like(t) if (n and t is not None) else a.new_empty(0)
                 for t, n in zip((a, b, c, h0, dt, u), needs))


def _setup_context(ctx, inputs, output):
    a, b, c, h0, reverse, algorithm, runtime, dt, u, readout_dtype = inputs
    ctx.attrs, ctx.runtime, ctx.readout_dtype = (reverse, algorithm), runtime, readout_dtype
    ctx.save_for_backward(a, b, c, h0, dt, u)


#: the positions of a, b, c, h0, dt, u among seqfuse::scan's inputs (for needs_input_grad)
_INPUT_INDEX = (0, 1, 2, 3, 7, 8)


def _backward(ctx, grad_y, grad_h):
    a, b, c, h0, dt, u = ops = ctx.saved_tensors
    given = len(ctx.needs_input_grad)  # dt and u count only when the caller passed them
    needs = [i < given and bool(ctx.needs_input_grad[i]) and t is not None for i, t in zip(_INPUT_INDEX, ops)]
    y_like, h_like = _empty_results(*ops, ctx.readout_dtype)
    grad_y = torch.zeros_like(y_like) if grad_y is None else grad_y.contiguous()
    grad_h = torch.zeros_like(h_like) if grad_h is None else grad_h.contiguous()
    grads = torch.ops.seqfuse.scan_backward(grad_y, grad_h, a, b, c, h0, *ctx.attrs, ctx.runtime, needs, dt, u,
                                            ctx.readout_dtype)
    da, db, dc, dh0, ddt, du = (g if n else None for g, n in zip(grads, needs))
    return (da, db, dc, dh0, None, None, None, ddt, du, None)[:given]


scan.register_autograd(_backward, setup_context=_setup_context)


def _reference_forward(a, b, c, h0, attrs):
    return scan_reference(a, b, c, h0, reverse=attrs["reverse"], algorithm=attrs["algorithm"],
                          readout_dtype=attrs.get("readout_dtype"))


def _reference_backward(grad_y, grad_h, a, b, c, h0, attrs):
    return scan_backward_reference(grad_y, grad_h, a, b, c, h0, reverse=attrs["reverse"],
                                   algorithm=attrs["algorithm"], needs=attrs["needs"],
                                   readout_dtype=attrs.get("readout_dtype"))


register_impl("scan", Impl("eager", lambda t, a: None, *with_discretization(_reference_forward, _reference_backward)))
# the generated C kernels ("cpu" path: the recurrent algorithm), tried before the eager reference;
# their ``supports`` refuses a call they cannot run (no C compiler, a state too large, ...)
import seqfuse.lowering.cpu  # noqa: E402,F401
from seqfuse.lowering.triton import scan as _triton_scan  # noqa: E402,F401  (registers the "triton" path; its supports() refuses what it cannot run)
