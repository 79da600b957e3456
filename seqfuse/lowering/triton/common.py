"""What every Triton lowering needs to know before it may run: is triton installed, may
this device run it (CUDA, or CPU under TRITON_INTERPRET=1), can the interpreter run here,
and were the kernels built for the mode in force now."""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os

import math

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


class KernelModule:
    """A lowering's kernel module (``KernelModule("scan_kernels")()``), imported on the first call:
    ``@triton.jit`` fixes the interpreter/compiled mode when the module is imported, so importing it with
    seqfuse would fix it before a user sets TRITON_INTERPRET."""

    def __init__(self, name: str):
        self.name = name
        self.module = None      # the module once imported

    def __call__(self):
        if self.module is None:
            self.module = importlib.import_module(f"seqfuse.lowering.triton.{self.name}")
        return self.module

    def availability(self, device: torch.device) -> str | None:
        """:func:`availability` for these kernels: None when they may run on ``device`` now, else why not."""
        return availability(device, self.module)


def next_pow2(n: int) -> int:
    """The smallest power of two at least ``n`` (1 for n <= 1): a block size that covers n."""
    return 1 << max(0, (int(n) - 1).bit_length())


class Rows:
    """The batch dims ``lead`` of a call, coalesced to at most three (S0, S1, S2).

    Adjacent dims merge when every operand in ``views`` (each expanded to (*lead, T),
    stride 0 on broadcast dims) steps through them as one; ``strides(x)`` gives an
    operand's three row strides.  A contiguous (*lead, T) buffer fits any coalescing."""

    def __init__(self, lead, views):
        self.lead = tuple(lead)
        self.count = math.prod(self.lead)
        groups: list[list[int]] = []
        for i, n in enumerate(self.lead):
            if n == 1:
                continue
            if groups and all(v.stride(groups[-1][-1]) == v.stride(i) * n for v in views):
                groups[-1].append(i)
            else:
                groups.append([i])
        self.groups = groups

    @property
    def ok(self) -> bool:
        return len(self.groups) <= 3

    @property
    def sizes(self) -> tuple[int, int, int]:
        s = [math.prod(self.lead[i] for i in g) for g in self.groups]
        return tuple([1] * (3 - len(s)) + s)

    def strides(self, x: torch.Tensor) -> tuple[int, int, int]:
        st = []
        for g in self.groups:
            for i, j in zip(g, g[1:]):
                assert x.stride(i) == x.stride(j) * self.lead[j], "operand does not fit the row coalescing"
            st.append(x.stride(g[-1]))
        return tuple([0] * (3 - len(st)) + st)
