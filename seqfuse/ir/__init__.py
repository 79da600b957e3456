"""The seqfuse IR: op declarations, printer and verifier."""
from seqfuse.ir.ops import KINDS, OP_CLASSES, Attention, IROp, LongConv, Scan, SSD, ir_marker, ir_of
from seqfuse.ir.printer import format_graph, format_node, format_op
from seqfuse.ir.verifier import IRVerificationError, verify_graph, verify_op

__all__ = ["KINDS", "OP_CLASSES", "Attention", "IROp", "LongConv", "Scan", "SSD", "ir_marker", "ir_of",
           "format_graph", "format_node", "format_op", "IRVerificationError", "verify_graph", "verify_op"]
