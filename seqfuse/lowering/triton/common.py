"""What every Triton lowering needs to know before it may run: is triton installed, may
this device run it (CUDA, or CPU under TRITON_INTERPRET=1), can the interpreter run here,
and were the kernels built for the mode in force now."""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os

import torch


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _release(dist: str) -> tuple[int, ...]:
    """(major, minor) of an installed distribution, (0, 0) if unknown."""
    try:
        parts = importlib.metadata.version(dist).split(".")[:2]
        return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return (0, 0)


@functools.lru_cache(maxsize=None)
def interpreter_problem() -> str | None:
    """Why the Triton interpreter cannot run here, or None."""
    if importlib.util.find_spec("numpy") is None:
        return "TRITON_INTERPRET is set but the triton interpreter needs numpy, which is not installed"
    numpy_v, triton_v = _release("numpy"), _release("triton")
    if numpy_v >= (2, 4) and triton_v <= (3, 6):
        # numpy 2.4 made int() of a 1-element array an error; triton 3.6's interpreter relies on it
        return f"the triton {'.'.join(map(str, triton_v))} interpreter needs numpy < 2.4"
    return None


def interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def availability(device: torch.device, kernels_module) -> str | None:
    """None when Triton kernels may run on ``device`` now, else the reason.

    ``kernels_module`` is the lowering's kernel module if already imported (else None):
    ``@triton.jit`` fixes the interpreter/compiled mode at import, so a later change of
    TRITON_INTERPRET makes those kernels unusable in this process.
    """
    if not triton_installed():
        return "triton is not installed"
    interpret = interpret_requested()
    if device.type == "cpu" and not interpret:
        return "tensors are on cpu and TRITON_INTERPRET is not set"
    if device.type not in ("cpu", "cuda"):
        return f"tensors are on {device.type}"
    if interpret and interpreter_problem():
        return interpreter_problem()
    if kernels_module is not None and kernels_module.INTERPRETED != interpret:
        built = "the interpreter" if kernels_module.INTERPRETED else "compilation"
        return f"the triton kernels were built for {built} before TRITON_INTERPRET changed"
    return None
