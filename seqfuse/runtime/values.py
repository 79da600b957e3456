"""Whole-tensor value checks for the runtime: one reduction per tensor, no device synchronization.

The fast paths refuse calls by their values (a NaN or inf operand, a guard's range).  Each check
here reads its tensor once through ``torch.aminmax`` (which propagates NaN: the minimum and the
maximum are NaN when any element is) and returns a 0-dim bool tensor on the tensor's device, so a
caller can combine several checks and synchronize once (``bool(...)``), or hand the tensor to
:func:`seqfuse.runtime.refuse_or_poison`, which never reads it while a CUDA graph is being
captured.  ``(x >= lo) & (x <= hi)`` followed by ``.all()`` made three full-size temporaries and
four passes; ``isfinite(x).all()`` two passes (measured on CPU, 262k fp32 elements, 1 thread:
0.38 ms and 0.57 ms against 0.03 ms for one aminmax).

An empty tensor passes every check; an integer or bool tensor is finite.  Complex tensors are
checked on their real and imaginary parts.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def _range(x: Tensor) -> tuple[Tensor, Tensor] | None:
    """(min, max) of ``x``'s elements as 0-dim tensors (NaN when any element is NaN), or None when
    ``x`` is empty."""
    if x.numel() == 0:
        return None
    if x.is_complex():
        x = torch.view_as_real(x)
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    return torch.aminmax(x)


def _true(x: Tensor) -> Tensor:
    return torch.ones((), dtype=torch.bool, device=x.device)


def all_within(x: Tensor, lo: float, hi: float) -> Tensor:
    """Whether every element of ``x`` is in the closed range [lo, hi] (False for a NaN): a 0-dim
    bool tensor on ``x``'s device."""
    r = _range(x)
    if r is None:
        return _true(x)
    lo_x, hi_x = r
    return (lo_x >= lo) & (hi_x <= hi)


def all_finite(*tensors: Tensor | None) -> Tensor:
    """Whether every element of the given tensors (None entries skipped) is finite: a 0-dim bool
    tensor on the first tensor's device (True when no tensor is given)."""
    ok = None
    for x in tensors:
        if x is None:
            continue
        r = _range(x) if x.is_floating_point() or x.is_complex() else None
        one = _true(x) if r is None else (r[0] > -math.inf) & (r[1] < math.inf)
        ok = one if ok is None else ok & one.to(ok.device)
    return ok if ok is not None else torch.ones((), dtype=torch.bool)


def below_pos_inf(x: Tensor) -> Tensor:
    """Whether ``x`` holds neither a NaN nor a +inf (-inf allowed: a log-decay's exact reset): a
    0-dim bool tensor on ``x``'s device."""
    r = _range(x)
    if r is None:
        return _true(x)
    return r[1] < math.inf
