"""Readable, fp32-accumulating reference implementations of the IR ops (eager fallback, test oracle)."""
from seqfuse.lowering.reference.attention import attention_reference

__all__ = ["attention_reference"]
