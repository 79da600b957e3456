"""seqfuse: a torch.compile backend for sequence mixers.

    model = torch.compile(model, backend="seqfuse")     # or backend=seqfuse.backend
    print(seqfuse.explain(model, *inputs))

Public API: ``backend`` (the backend callable), ``explain``, ``Options``,
``register_pass`` / ``unregister_pass`` / ``Pass`` / ``PassContext``,
``counters`` / ``reset_counters``, and the ``ir`` and ``passes.pattern`` modules.

``import seqfuse`` registers ``backend="seqfuse"`` with Dynamo (so a checkout on PYTHONPATH works
as well as an installed package, which registers it by entry point), and the ``seqfuse`` log name
with ``torch._logging`` (``TORCH_LOGS="+seqfuse"``).  ``python -m seqfuse`` prints an environment report.
"""
# the single source of the version: pyproject.toml reads it from here (tool.setuptools.dynamic)
__version__ = "0.1.0"

from seqfuse import ir  # noqa: E402
from seqfuse.compiler import (GraphReport, NearMiss, Options, Report, Rewrite, VerificationError,  # noqa: E402
                              explain, seqfuse_backend)
from seqfuse import log as _log  # noqa: E402
from seqfuse.passes import Pass, PassContext, register_pass, registered_passes, unregister_pass  # noqa: E402
from seqfuse.runtime import counters, fallbacks, reset_counters  # noqa: E402

backend = seqfuse_backend


def _register_backend() -> None:
    """Register ``backend="seqfuse"`` with Dynamo unless it is known already.

    An installed seqfuse is also found through its ``torch_dynamo_backends`` entry point: when
    Dynamo has discovered it (``_BACKENDS["seqfuse"]`` is an entry point), ``lookup_backend`` loads
    it -- possibly this very import -- and registers it itself, so registering here too would make
    Dynamo's ``register_backend`` fail with "duplicate name".  Idempotent."""
    from torch._dynamo.backends import registry

    if "seqfuse" in registry._COMPILER_FNS or registry._BACKENDS.get("seqfuse") is not None:
        return
    registry.register_backend(compiler_fn=seqfuse_backend, name="seqfuse")


_register_backend()
_log.register_with_torch()

__all__ = ["backend", "seqfuse_backend", "explain", "Options", "Report", "GraphReport", "Rewrite", "NearMiss",
           "VerificationError", "Pass", "PassContext", "register_pass", "unregister_pass", "registered_passes",
           "counters", "fallbacks", "reset_counters", "ir", "__version__"]
