"""Algorithm selection: a cost model over each IR op's shapes picks how it runs.

Runs after every recognizer (it needs all IR ops) and before lowering.  For
attention there is one algorithm, "fused" (online softmax, no (Lq, Lk) matrix in
memory on the fast paths); long convolutions choose FFT or direct by cost; the
recurrence issue adds quadratic / chunked / recurrent here.
Users force a choice with ``options={"algorithm": {...}}`` once those exist.
"""
from __future__ import annotations

import torch

from seqfuse.ir.ops import Attention, LongConv, ir_of
from seqfuse.passes.pattern import val
from seqfuse.passes.registry import Pass, PassContext

ATTENTION_ALGORITHMS = ("fused",)


def choose_attention(op: Attention) -> str:
    """The attention algorithm for ``op``'s shapes."""
    return "fused"


LONG_CONV_ALGORITHMS = ("fft", "direct")
#: kernels up to this length run the direct algorithm; longer ones the FFT.  Measured with the
#: eager references on CPU (B·H = 256 rows, L = 256…4096): direct wins up to Lk ≈ 64-128, the
#: FFT from there on (at Lk = 256 it is 1.1x–40x faster).
DIRECT_MAX_KERNEL = 64


def _hint(x) -> int:
    if isinstance(x, torch.SymInt):
        from seqfuse.passes.pattern import concrete_sym
        return concrete_sym(x)
    return int(x)


def choose_long_conv(op: LongConv) -> str:
    """FFT or direct for ``op``: circular convolutions need the FFT; causal ones with a kernel
    of at most DIRECT_MAX_KERNEL taps (at the example sizes) run direct."""
    if not op.causal:
        return "fft"
    lk = min(_hint(val(op.k).shape[-1]), _hint(val(op.u).shape[-1]))
    return "direct" if lk <= DIRECT_MAX_KERNEL else "fft"


class SelectPass(Pass):
    """Set ``algorithm`` on every IR op left at "auto"."""

    name = "select"

    def run(self, ctx: PassContext) -> None:
        for node in ctx.graph.nodes:
            op = ir_of(node)
            if isinstance(op, Attention) and op.algorithm == "auto":
                op.algorithm = choose_attention(op)
            elif isinstance(op, LongConv) and op.algorithm == "auto":
                op.algorithm = choose_long_conv(op)
