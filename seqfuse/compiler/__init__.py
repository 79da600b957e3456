"""The compiler: backend entry, options, canonicalization, pipeline, report, explain."""
from seqfuse.compiler.backend import seqfuse_backend
from seqfuse.compiler.explain import explain
from seqfuse.compiler.options import Options
from seqfuse.compiler.report import GraphReport, NearMiss, Report, Rewrite
from seqfuse.compiler.verify import VerificationError

__all__ = ["seqfuse_backend", "explain", "Options", "GraphReport", "NearMiss", "Report", "Rewrite",
           "VerificationError"]
