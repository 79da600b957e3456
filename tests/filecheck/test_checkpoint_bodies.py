"""FileCheck on a selective checkpoint region (``context_fn``): the call stays, its body is rewritten in
place (dump stages ``wrap_body0.*``), and a mask built from shapes alone is built inside the body."""
import math

import torch
from torch.utils.checkpoint import checkpoint

from fc import graph_after, run_filecheck
from helpers import check_against_eager, selective_checkpointing


def causal_attention(q, k, v):
    n = q.shape[-2]
    i = torch.arange(n)
    keep = i[:, None] >= i[None, :]       # built outside the region, as transformers does

    def region(q, k, v, keep):
        s = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~keep, float("-inf"))
        return torch.relu(s.softmax(-1) @ v)
    return checkpoint(region, q, k, v, keep, use_reentrant=False, context_fn=selective_checkpointing)


def _inputs():
    torch.manual_seed(0)
    return [torch.randn(2, 3, 12, 8, requires_grad=True) for _ in range(3)]


def test_body_after_the_attention_pass(tmp_path):
    text, report = graph_after(causal_attention, *_inputs(), tmp_path=tmp_path, stage="wrap_body0.attention")
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK: seqfuse.attention({{.*}}) {scale=0.3535{{[0-9]*}}, mask=causal
        CHECK-NOT: aten.softmax
        CHECK: aten.relu
    """)
    assert [r.kind for r in report.rewrites] == ["attention"], report


def test_call_after_lowering(tmp_path):
    """The mask is no longer an argument of the call: the body builds it."""
    text, _ = graph_after(causal_attention, *_inputs(), tmp_path=tmp_path, stage="lowered")
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK-NOT: aten.arange
        CHECK: tag_activation_checkpoint(%wrap_body0, %l_k_, %l_q_, %l_v_, use_reentrant=false)
    """)


def test_numbers():
    report = check_against_eager(causal_attention, *_inputs())
    assert [r.kind for r in report.rewrites] == ["attention"], report
