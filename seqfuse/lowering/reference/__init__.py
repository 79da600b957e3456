"""Readable, fp32-accumulating reference implementations of the IR ops (eager fallback, test oracle)."""
from seqfuse.lowering.reference.attention import attention_reference
from seqfuse.lowering.reference.delta import delta_reference
from seqfuse.lowering.reference.scan import scan_reference
from seqfuse.lowering.reference.ssd import ssd_reference

__all__ = ["attention_reference", "delta_reference", "scan_reference", "ssd_reference"]
