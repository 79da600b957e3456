"""Algorithm selection: a cost model over each IR op's shapes picks how it runs.

Runs after every recognizer (it needs all IR ops) and before lowering.  For
attention there is one algorithm today, "fused" (online-softmax, no (Lq, Lk)
matrix in memory on the fast paths); the recurrence and long-convolution
issues add the quadratic / chunked / recurrent and FFT / direct choices here.
Users force a choice with ``options={"algorithm": {...}}`` once those exist.
"""
from __future__ import annotations

from seqfuse.ir.ops import Attention, ir_of
from seqfuse.passes.registry import Pass, PassContext

ATTENTION_ALGORITHMS = ("fused",)


def choose_attention(op: Attention) -> str:
    """The attention algorithm for ``op``'s shapes."""
    return "fused"


class SelectPass(Pass):
    """Set ``algorithm`` on every IR op left at "auto"."""

    name = "select"

    def run(self, ctx: PassContext) -> None:
        for node in ctx.graph.nodes:
            op = ir_of(node)
            if isinstance(op, Attention) and op.algorithm == "auto":
                op.algorithm = choose_attention(op)
