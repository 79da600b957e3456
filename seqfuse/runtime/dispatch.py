"""Per-call choice of the implementation that runs an IR op.

Lowering registers, for each IR op kind, its implementations in order of
preference ("triton", then "cpu" -- generated C kernels for sequential recurrences
on CPU --, then "aten", then "eager").  Each implementation says
whether it supports a call (returning None, or the reason it does not), and
the dispatcher runs the first one that does.  The eager reference is always
last and always supports the call.  A fast path that raises falls back to
the eager reference with a warning naming the op and the reason; nothing is
retried silently.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from seqfuse import log
from seqfuse.runtime.counters import count_call, count_fallback
from seqfuse.runtime.values import all_finite

PATHS = ("triton", "cpu", "aten", "eager")
RUNTIME_CHOICES = ("auto", "triton", "cpu", "aten", "eager")


class ProgramRequired(RuntimeError):
    """An op refuses a call that no implementation computes the way the replaced program does: an
    ``ssd`` or ``delta`` lowered with ``finite_only`` given a non-finite log-decay, a
    ``seqfuse::within`` guard given a value outside its range, or a user's op (see
    docs/writing_a_pass.md).  The compiled graph catches it and runs the program as written
    (``seqfuse.compiler.constants.rerunning``); raised outside a compiled graph (an op called
    directly) it reaches the caller with the reason."""


def _capturing(t) -> bool:
    """Whether ``t``'s device is capturing a CUDA graph (reading a value would fail there)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def refuse_or_poison(ok, message: str):
    """The one way an op refuses a call by its values.  ``ok`` is a 0-dim bool tensor computed from
    the call's operands.  Returns None when ``ok`` holds; raises :class:`ProgramRequired` with
    ``message`` when it does not.  While a CUDA graph is being captured no value can be read (the
    read would end the capture), so it returns a 0-dim float32 *poison* instead: 0 when ``ok``
    holds, NaN otherwise, for the op to multiply its results by ``1 + poison`` (:func:`poisoned`;
    every result NaN when refused: loud, never a silently different answer)."""
    if _capturing(ok):
        return torch.where(ok, 0.0, math.nan).to(torch.float32)
    if not bool(ok):
        raise ProgramRequired(message)
    return None


def refuse_nonfinite_decay(kind: str, name: str, decay):
    """:func:`refuse_or_poison` for the log-decay tensor ``decay`` (operand ``name`` of op ``kind``,
    lowered with ``finite_only``): refused when it holds a NaN or an infinity.  One ``aminmax``
    reduction (a device synchronization on CUDA)."""
    if decay is None:
        return None
    return refuse_or_poison(all_finite(decay),
                            f"seqfuse.{kind}: a non-finite log-decay {name} in a program that forms its decays "
                            "as differences (inf - inf = NaN there; this op resets the state exactly)")


def poisoned(results, poison):
    """``results`` (tensors) times ``1 + poison`` (see :func:`refuse_or_poison`), or as they are."""
    if poison is None:
        return results
    return tuple(r * (1 + poison) for r in results)


@dataclass(frozen=True)
class Impl:
    """One implementation of an IR op kind on one path."""

    path: str
    #: (tensors, attrs) -> None if this implementation can run the call, else the reason it can't
    supports: Callable[[dict, dict], str | None]
    forward: Callable[..., Any]
    backward: Callable[..., Any]


_IMPLS: dict[str, dict[str, Impl]] = {}


def register_impl(kind: str, impl: Impl) -> None:
    """Register ``impl`` for IR op ``kind`` (replacing one on the same path)."""
    if impl.path not in PATHS:
        raise ValueError(f"register_impl: path must be one of {PATHS}, got {impl.path!r}")
    _IMPLS.setdefault(kind, {})[impl.path] = impl


def choose(kind: str, runtime: str, tensors: dict, attrs: dict) -> Impl:
    """The implementation to run for this call; records skipped paths' reasons."""
    if runtime not in RUNTIME_CHOICES:
        raise ValueError(f"runtime must be one of {RUNTIME_CHOICES}, got {runtime!r}")
    impls = _IMPLS.get(kind)
    if not impls or "eager" not in impls:
        raise RuntimeError(f"seqfuse: no eager implementation registered for IR op {kind!r}")
    order = [p for p in PATHS if p in impls] if runtime == "auto" else [runtime, "eager"]
    for path in order:
        impl = impls.get(path)
        if impl is None:
            count_fallback(kind, f"{path}: not available")
            if runtime == path:  # an explicit request is never dropped silently
                warnings.warn(f"seqfuse.{kind}: runtime={runtime!r} requested but no {path} implementation "
                              "is available; running the eager reference")
            continue
        reason = impl.supports(tensors, attrs)
        if reason is None and path == "triton" and runtime == "auto" and _on_cpu(tensors):
            # Triton's interpreter (TRITON_INTERPRET=1, which flash-linear-attention's import also wants on a
            # CPU machine) is orders of magnitude slower than any other path: "auto" takes the fastest, so only
            # an explicit runtime="triton" (the kernel tests) runs the kernels on CPU tensors
            reason = "CPU tensors run the kernels interpreted, which only runtime='triton' asks for"
        if reason is None:
            return impl
        count_fallback(kind, f"{path}: {reason}")
        if runtime == path:
            warnings.warn(f"seqfuse.{kind}: runtime={runtime!r} requested but {reason}; running the eager reference")
    return impls["eager"]


def _on_cpu(tensors: dict) -> bool:
    """Whether the call's first tensor operand lives on the CPU."""
    first = next((t for t in tensors.values() if isinstance(t, torch.Tensor)), None)
    return first is not None and first.device.type == "cpu"


def run(kind: str, which: str, runtime: str, tensors: dict, attrs: dict, *args):
    """Run the forward (``which="forward"``) or backward of ``kind`` on the chosen path.

    ``tensors`` and ``attrs`` describe the call (used by ``supports``); ``args``
    are passed to the implementation.  Falls back to eager if a fast path raises.
    """
    impl = choose(kind, runtime, tensors, attrs)
    label = kind if which == "forward" else f"{kind}_backward"
    fn = getattr(impl, which)
    if impl.path == "eager":
        count_call(label, "eager")
        return fn(*args)
    try:
        result = fn(*args)
    except Exception as exc:  # a fast path failing must never fail the model
        reason = f"{impl.path} raised {type(exc).__name__}: {exc}"
        log.runtime.debug("%s: the %s path raised; running the eager reference", label, impl.path, exc_info=True)
        # the warning names the function that failed (``attention_backward`` for a backward)
        warnings.warn(f"seqfuse.{label}: {reason}; falling back to the eager reference")
        count_fallback(kind, reason)
        count_call(label, "eager")
        return getattr(_IMPLS[kind]["eager"], which)(*args)
    count_call(label, impl.path)
    return result
