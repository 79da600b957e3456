"""The cost model (passes/select): every IR op left at algorithm="auto" gets a known algorithm."""
import torch
import torch.fx

import seqfuse
from seqfuse.compiler.report import GraphReport
from seqfuse.ir import Attention, format_op, ir_of
from seqfuse.passes import PassContext, SelectPass
from seqfuse.passes.select import ATTENTION_ALGORITHMS, choose_attention


def graph_with_attention(*algorithms):
    g = torch.fx.Graph()
    q = g.placeholder("q")
    q.meta["val"] = torch.empty(2, 4, 16, 8, device="meta")
    nodes = []
    for algo in algorithms:
        node = g.call_function(seqfuse.ir.ir_marker, (q, q, q))
        node.meta["seqfuse_ir"] = Attention(q=q, k=q, v=q, mask="causal", algorithm=algo)
        node.meta["val"] = q.meta["val"]
        nodes.append(node)
    g.output(tuple(nodes))
    return torch.fx.GraphModule(torch.nn.Module(), g), nodes


def test_choose_attention_returns_a_known_algorithm():
    gm, (node,) = graph_with_attention("auto")
    assert choose_attention(ir_of(node)) in ATTENTION_ALGORITHMS


def test_select_fills_auto_and_keeps_explicit_choices():
    gm, (auto, forced) = graph_with_attention("auto", "custom")
    report = GraphReport()
    SelectPass().run(PassContext(gm, report))
    assert ir_of(auto).algorithm in ATTENTION_ALGORITHMS
    assert ir_of(forced).algorithm == "custom"  # a choice made earlier is not overridden
    assert format_op(ir_of(auto)).endswith(f"algo={ir_of(auto).algorithm}}}")
    assert report.rewrites == [] and report.near_misses == []  # selection is not a rewrite


def test_compiled_attention_reports_the_selected_algorithm():
    def f(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v

    report = seqfuse.explain(f, *(torch.randn(1, 2, 8, 4) for _ in range(3)), options={"downstream": "eager"})
    (rewrite,) = report.rewrites
    assert rewrite.algorithm in ATTENTION_ALGORITHMS and rewrite.algorithm != "auto"
    assert rewrite.ir.endswith(f"algo={rewrite.algorithm}}}")
