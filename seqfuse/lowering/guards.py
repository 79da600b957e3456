"""seqfuse::within: a value guard inside a compiled graph.

    seqfuse::within(x, lo, hi) -> x' (a copy of x)

A rewrite that equals the program only while some values stay in a range (an unstabilized form of a
stabilized recurrence: ``exp(k)`` for keys that the program never exponentiates on their own) reads
those values through ``within``.  A call with an element outside ``[lo, hi]`` (a NaN included)
raises ``seqfuse.runtime.ProgramRequired`` before any work, and the compiled graph runs the program
as written (seqfuse.compiler.constants.rerunning).  The result is a copy (a custom op's result may
not alias its input); its gradient is the incoming gradient.  One range reduction per call (a
device synchronization on CUDA).  While a CUDA graph is being captured no value can be read; the
copy is then multiplied by ``1 + poison`` (NaN when refused: every value NaN, loud), the same
mechanism as the ``finite_only`` check (seqfuse.runtime.refuse_or_poison).
"""
from __future__ import annotations

import torch
from torch import Tensor

from seqfuse.runtime import all_within, poisoned, refuse_or_poison


@torch.library.custom_op("seqfuse::within", mutates_args=())
def within(x: Tensor, lo: float, hi: float) -> Tensor:
    """A copy of ``x``; raises ProgramRequired when an element is outside [lo, hi] or NaN (under
    CUDA graph capture: the copy is all NaN then, see the module docstring)."""
    poison = refuse_or_poison(all_within(x, lo, hi),
                              f"seqfuse.within: a value outside [{lo:g}, {hi:g}] (or NaN) where the rewritten "
                              "form equals the program only inside that range")
    return poisoned((x.clone(),), poison)[0]


@within.register_fake
def _(x, lo, hi):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    pass


def _backward(ctx, grad):
    return grad, None, None


within.register_autograd(_backward, setup_context=_setup_context)
