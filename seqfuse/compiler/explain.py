"""``seqfuse.explain``: compile with seqfuse, run once, and report what happened."""
from __future__ import annotations

import functools

import torch

from seqfuse.compiler.backend import seqfuse_backend
from seqfuse.compiler.options import Options
from seqfuse.compiler.report import Report, collecting
from seqfuse.passes import enabled_passes
from seqfuse.runtime.counters import counters, fallbacks


def _diff(after: dict, before: dict) -> dict:
    out = {}
    for kind, paths in after.items():
        d = {p: n - before.get(kind, {}).get(p, 0) for p, n in paths.items()}
        if any(d.values()):
            out[kind] = d
    return out


def explain(fn, *args, options: dict | None = None, dynamic: bool | None = None, **kwargs) -> Report:
    """Compile ``fn`` (a function or ``nn.Module``) with ``backend="seqfuse"``, call it once
    with ``*args, **kwargs``, and return the :class:`~seqfuse.compiler.report.Report`:
    rewrites, near misses and the runtime paths the call took.

    ``options`` are the backend options (validated first); ``dynamic`` is passed
    to ``torch.compile``.  The compile is fresh: earlier compiles of ``fn``
    with other backends are not reused.
    """
    if not callable(fn):
        raise TypeError(f"explain(fn, ...): fn must be a function or nn.Module, got {type(fn).__name__}")
    enabled_passes(Options.from_dict(options).passes)  # fail early, naming the bad option or pass
    backend = functools.partial(seqfuse_backend, options=options)
    compiled = torch.compile(fn, backend=backend, dynamic=dynamic)
    report = Report()
    before_calls, before_fb = counters(), fallbacks()
    with collecting(report):
        report.output = compiled(*args, **kwargs)
    report.runtime = _diff(counters(), before_calls)
    report.fallbacks = _diff(fallbacks(), before_fb)
    return report
