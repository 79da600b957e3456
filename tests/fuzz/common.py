"""Helpers shared by the family generators: dtypes, sizes, random tensors, poisoning with NaN/inf,
requires_grad subsets."""
from __future__ import annotations

import math
import random

import torch

DTYPES = (torch.float64, torch.float32, torch.float32, torch.bfloat16, torch.float16)


class Maker:
    """Random tensors for one case, drawn from the case's own ``random.Random``."""

    def __init__(self, r: random.Random, dtype: torch.dtype):
        self.r = r
        self.dtype = dtype
        self.g = torch.Generator().manual_seed(r.randrange(2 ** 31))
        self.grad_p = r.choice((0.0, 0.5, 0.8, 1.0, 1.0))

    def _finish(self, x, dtype, grad):
        x = x.to(dtype or self.dtype)
        if grad is None:
            grad = self.r.random() < self.grad_p
        if grad and (x.is_floating_point() or x.is_complex()):
            x.requires_grad_(True)
        return x

    def randn(self, *shape, scale=1.0, dtype=None, grad=None):
        return self._finish(torch.randn(*shape, generator=self.g, dtype=torch.float64) * scale, dtype, grad)

    def uniform(self, lo, hi, *shape, dtype=None, grad=None):
        x = torch.rand(*shape, generator=self.g, dtype=torch.float64) * (hi - lo) + lo
        return self._finish(x, dtype, grad)

    def log_decay(self, *shape, strength=1.0, dtype=None, grad=None):
        """Log-decays ≤ 0: logsigmoid of a normal, scaled."""
        x = torch.nn.functional.logsigmoid(torch.randn(*shape, generator=self.g, dtype=torch.float64)) * strength
        return self._finish(x, dtype, grad)

    def gate(self, *shape, dtype=None, grad=None):
        """Decays in (0, 1)."""
        return self.uniform(0.3, 0.99, *shape, dtype=dtype, grad=grad)


def size(r: random.Random, lo: int, hi: int, special=(1,)) -> int:
    """A size in [lo, hi], often one of the edge values (1, odd, lo, hi)."""
    p = r.random()
    if p < 0.1:
        cands = [s for s in special if lo <= s <= hi]
        if cands:
            return r.choice(cands)
    if p < 0.18:
        return r.choice((lo, hi))
    return r.randint(lo, hi)


def poison(r: random.Random, tensors: list, p: float = 0.12) -> str | None:
    """With probability ``p``, put one NaN / +inf / -inf into one of ``tensors`` (in place, before
    requires_grad is used).  Returns a tag for the case name, or None."""
    cands = [t for t in tensors if isinstance(t, torch.Tensor) and t.numel() > 0
             and (t.is_floating_point() or t.is_complex())]
    if not cands or r.random() >= p:
        return None
    t = r.choice(cands)
    value = r.choice((math.nan, math.nan, math.inf, -math.inf))
    idx = r.randrange(t.numel())
    with torch.no_grad():
        t.view(-1)[idx] = value if not t.is_complex() else complex(value, 0)
    return "nan" if math.isnan(value) else "inf"


def reset(r: random.Random, decays: list, p: float = 0.12) -> str | None:
    """With probability ``p``, put a -inf (a hard reset: exp(-inf) = 0, a document boundary of a packed
    sequence) into one element of one of the log-decay tensors ``decays`` (in place, before
    requires_grad is used).  Programs that form their decays as differences of a cumulative sum
    compute -inf - (-inf) = NaN after it; the others reset exactly.  Returns a tag or None."""
    cands = [t for t in decays if isinstance(t, torch.Tensor) and t.numel() > 0 and t.is_floating_point()]
    if not cands or r.random() >= p:
        return None
    t = r.choice(cands)
    idx = r.randrange(t.numel())
    with torch.no_grad():
        t.view(-1)[idx] = -math.inf
    return "reset"


def tags(*names) -> str | None:
    """The case-name tags that are set, joined with '+', or None."""
    return "+".join(n for n in names if n) or None


def ssd_options(r: random.Random, triton: bool, kind: str) -> dict:
    """Random seqfuse options for an ssd / scan case: forced algorithms, forced runtimes."""
    opts: dict = {}
    if triton:
        opts["runtime"] = "triton"
    else:
        rt = r.choice(("auto", "auto", "auto", "eager", "cpu"))
        if rt != "auto":
            opts["runtime"] = rt
    algos = {"ssd": ("recurrent", "quadratic", "chunked"), "scan": ("recurrent", "chunked"),
             "long_conv": ("fft", "direct")}[kind]
    if r.random() < 0.5:
        opts["algorithm"] = {kind: r.choice(algos)}
    return opts
