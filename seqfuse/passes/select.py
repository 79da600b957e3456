"""Algorithm selection: a cost model over each IR op's shapes picks how it runs.

Runs after every recognizer (it needs all IR ops) and before lowering.  For
attention there is one algorithm, "fused" (online softmax, no (Lq, Lk) matrix in
memory on the fast paths); long convolutions choose FFT or direct by cost; the
recurrence issue adds quadratic / chunked / recurrent here.
Users force a choice with ``options={"algorithm": {...}}`` once those exist.
"""
from __future__ import annotations

import math

import torch

from seqfuse.ir.ops import Attention, LongConv, ir_of
from seqfuse.passes.pattern import val
from seqfuse.passes.registry import Pass, PassContext

ATTENTION_ALGORITHMS = ("fused",)


def choose_attention(op: Attention) -> str:
    """The attention algorithm for ``op``'s shapes."""
    return "fused"


LONG_CONV_ALGORITHMS = ("fft", "direct")
#: direct convolution costs ~L·Lk multiply-adds, the FFT one ~C·N·log2(N) with N ≈ 2L;
#: C ≈ 15 covers the three transforms and the complex product (measured on CPU)
FFT_COST_CONSTANT = 15.0


def _hint(x) -> int:
    if isinstance(x, torch.SymInt):
        from seqfuse.passes.pattern import concrete_sym
        return concrete_sym(x)
    return int(x)


def choose_long_conv(op: LongConv) -> str:
    """FFT or direct for ``op``: circular convolutions need the FFT; causal ones take the
    cheaper of L·Lk (direct) and C·N·log2 N (FFT) at the example sizes."""
    if not op.causal:
        return "fft"
    length, lk = _hint(val(op.u).shape[-1]), _hint(val(op.k).shape[-1])
    lk = min(lk, length)
    n = 1 << max(1, (length + lk - 2).bit_length())
    return "direct" if length * lk <= FFT_COST_CONSTANT * n * math.log2(n) else "fft"


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
