"""seqfuse's loggers, controlled like torch's own components.

    TORCH_LOGS="seqfuse"  python train.py     # INFO: rewrites, near misses (with reasons)
    TORCH_LOGS="+seqfuse" python train.py     # DEBUG: also the algorithm choices, stage timings,
                                              # runtime paths taken and why faster ones were not
    torch._logging.set_logs(modules={"seqfuse": logging.DEBUG})   # the same from Python

The hierarchy.  One component alone: ``TORCH_LOGS="seqfuse"`` and then
``logging.getLogger("seqfuse.cache").setLevel(logging.DEBUG)``; in ``TORCH_LOGS`` itself, which
torch reads before seqfuse registers anything, only the components that are also modules work
alone (``"+seqfuse.passes"``, ``"+seqfuse.runtime"``):

- ``seqfuse.passes``: what each recognizer rewrote, its near misses and their reasons
- ``seqfuse.select``: the algorithm the cost model chose per IR op
- ``seqfuse.pipeline``: seconds per pipeline stage and downstream compile of each graph
- ``seqfuse.runtime``: the path each IR op ran on (first call per op and path) and fallback reasons
- ``seqfuse.cache``: kernel/config cache hits, misses and writes

Warnings (a fast path that raised, an explicit ``runtime=`` that cannot be honoured, a pipeline
failure) stay ``warnings.warn``: logs are for following decisions, warnings for problems.
"""
from __future__ import annotations

import logging

ROOT = "seqfuse"
NAMES = ("passes", "select", "pipeline", "runtime", "cache")

root = logging.getLogger(ROOT)
passes = logging.getLogger(f"{ROOT}.passes")
select = logging.getLogger(f"{ROOT}.select")
pipeline = logging.getLogger(f"{ROOT}.pipeline")
runtime = logging.getLogger(f"{ROOT}.runtime")
cache = logging.getLogger(f"{ROOT}.cache")


def register_with_torch() -> bool:
    """Make ``seqfuse`` a registered log name of ``torch._logging`` (as ``dynamo`` and ``inductor``
    are), so that ``TORCH_LOGS="seqfuse"`` / ``"+seqfuse"`` and ``torch._logging.set_logs`` control it.
    Idempotent; returns False where this torch has no log registry (nothing else changes)."""
    try:
        from torch._logging._internal import log_registry, register_log
    except ImportError:  # pragma: no cover - torch without the registry
        return False
    # the root only: torch gives every registered name its own handler, so registering the
    # components too would print each of their lines twice (once more through the root's)
    if not log_registry.is_log(ROOT):
        register_log(ROOT, [ROOT])
    return True
