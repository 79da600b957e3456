"""``seqfuse.explain``: compile with seqfuse, run once, and report what happened."""
from __future__ import annotations

import functools
import time

import torch

from seqfuse.compiler.backend import seqfuse_backend
from seqfuse.compiler.options import Options
from seqfuse.compiler.report import Report, collecting
from seqfuse.passes import enabled_passes
from seqfuse.runtime.counters import counting

# Dynamo's own timers (torch._dynamo.utils.compilation_time_metrics): the whole frame compile,
# and the part of it spent in the backend (seqfuse + downstream)
_DYNAMO_TOTAL, _DYNAMO_BACKEND = "_compile.compile_inner", "OutputGraph.call_user_compiler"


def _dynamo_metrics() -> dict[str, float] | None:
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:  # pragma: no cover
        return None
    return {k: sum(compilation_time_metrics.get(k, ())) for k in (_DYNAMO_TOTAL, _DYNAMO_BACKEND)}


def _compile_seconds(report: Report, first_call: float, before: dict | None, after: dict | None) -> dict:
    seqfuse_s = sum(report.seconds.values())
    downstream = sum(g.downstream_seconds for g in report.graphs)
    dynamo = None
    if before is not None and after is not None and after[_DYNAMO_TOTAL] > before[_DYNAMO_TOTAL]:
        # Dynamo's frame compiles, minus the time its backend calls (seqfuse + downstream) took
        dynamo = max(0.0, (after[_DYNAMO_TOTAL] - before[_DYNAMO_TOTAL])
                     - (after[_DYNAMO_BACKEND] - before[_DYNAMO_BACKEND]))
    return {"first_call": first_call, "dynamo": dynamo, "seqfuse": seqfuse_s, "downstream": downstream}


def explain(fn, *args, options: dict | None = None, dynamic: bool | None = None, **kwargs) -> Report:
    """Compile ``fn`` (a function or ``nn.Module``) with ``backend="seqfuse"``, call it once
    with ``*args, **kwargs``, and return the :class:`~seqfuse.compiler.report.Report`:
    rewrites, near misses, the runtime paths the call took, and where the compile time went
    (``report.compile_seconds``: Dynamo, seqfuse, the downstream compiler).

    ``options`` are the backend options (validated first); ``dynamic`` is passed
    to ``torch.compile``.  The compile is fresh: earlier compiles of ``fn``
    with other backends are not reused.  Thread-safe: the report holds only what this
    call compiled and ran, whatever other threads compile meanwhile.
    """
    if not callable(fn):
        raise TypeError(f"explain(fn, ...): fn must be a function or nn.Module, got {type(fn).__name__}")
    enabled_passes(Options.from_dict(options).passes)  # fail early, naming the bad option or pass
    backend = functools.partial(seqfuse_backend, options=options)
    compiled = torch.compile(fn, backend=backend, dynamic=dynamic)
    report = Report()
    before = _dynamo_metrics()
    with collecting(report), counting() as tally:
        start = time.perf_counter()
        report.output = compiled(*args, **kwargs)
        first_call = time.perf_counter() - start
    report.compile_seconds = _compile_seconds(report, first_call, before, _dynamo_metrics())
    report.runtime = {k: v for k, v in tally.counters().items() if any(v.values())}
    report.fallbacks = tally.fallbacks()
    return report
