"""seqfuse: a torch.compile backend for sequence mixers.

    model = torch.compile(model, backend="seqfuse")
    print(seqfuse.explain(model, *inputs))

Public API: ``backend`` (the backend callable), ``explain``, ``Options``,
``register_pass`` / ``unregister_pass`` / ``Pass`` / ``PassContext``,
``counters`` / ``reset_counters``, and the ``ir`` and ``passes.pattern`` modules.
"""
from seqfuse import ir
from seqfuse.compiler import (GraphReport, NearMiss, Options, Report, Rewrite, VerificationError, explain,
                              seqfuse_backend)
from seqfuse.passes import Pass, PassContext, register_pass, registered_passes, unregister_pass
from seqfuse.runtime import counters, fallbacks, reset_counters

backend = seqfuse_backend

__version__ = "0.1.0"

__all__ = ["backend", "seqfuse_backend", "explain", "Options", "Report", "GraphReport", "Rewrite", "NearMiss",
           "VerificationError", "Pass", "PassContext", "register_pass", "unregister_pass", "registered_passes",
           "counters", "fallbacks", "reset_counters", "ir"]
