"""FileCheck on the graph right after the scan_tree pass (dump stage "scan_tree"): torch's generic
associative_scan tree of the linear combine becomes one seqfuse.scan; anything else stays."""

import torch
from torch._higher_order_ops.associative_scan import associative_scan

from fc import graph_after, run_filecheck
from seqfuse.compiler.canonicalize import trace_pre_dispatch
from seqfuse.compiler.report import GraphReport
from seqfuse.ir import format_graph
from seqfuse.passes import PassContext
from seqfuse.passes.scan_tree import ScanTreePass

aten = torch.ops.aten


def after_pass(fn, *args, tmp_path, stage="scan_tree"):
    return graph_after(fn, *args, tmp_path=tmp_path, stage=stage)[0]


def linear(left, right):
    return left[0] * right[0], right[0] * left[1] + right[1]


def quadratic(left, right):
    return left[0] * right[0], left[1] * right[0] + right[1] * right[1]


def states(a, b, dim, combine=linear):
    return associative_scan(combine, (a, b), dim=dim, combine_mode="generic")[1]


def test_linear_combine_is_one_scan(tmp_path):
    # the time axis (0 after associative_scan's movedim) moves to -2 and back; no slice, cat,
    # stack or pad of the tree is left
    text = after_pass(lambda a, b: states(a, b, 1), torch.rand(2, 5, 3), torch.randn(2, 5, 3), tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK: %[[A:[a-z_0-9]+]] = aten.movedim.int(%l_a_, 1, 0) : f32[5, 2, 3]
        CHECK: %[[B:[a-z_0-9]+]] = aten.movedim.int(%l_b_, 1, 0) : f32[5, 2, 3]
        CHECK: %[[PA:[a-z_0-9]+]] = aten.permute(%[[A]], [1, 0, 2]) : f32[2, 5, 3]
        CHECK: %[[PB:[a-z_0-9]+]] = aten.permute(%[[B]], [1, 0, 2]) : f32[2, 5, 3]
        CHECK: %scan = seqfuse.scan(%[[PA]], %[[PB]]) {reverse=false, algo=auto} : (f32[2, 5, 3], f32[2, 3])
        CHECK: %[[Y:[a-z_0-9]+]] = getitem(%scan, 0) : f32[2, 5, 3]
        CHECK: %[[O:[a-z_0-9]+]] = aten.permute(%[[Y]], [1, 0, 2]) : f32[5, 2, 3]
        CHECK: aten.movedim.int(%[[O]], 0, 1) : f32[2, 5, 3]
        CHECK-NOT: aten.slice
        CHECK-NOT: aten.cat
        CHECK-NOT: aten.stack
        CHECK-NOT: aten.pad
    """)


def test_mamba_layout_scans_along_dim_2(tmp_path):
    # (batch, channels, T, state) scanned along dim 2: (T, batch, channels, state) -> (batch, channels, T, state)
    text = after_pass(lambda a, b: states(a, b, 2), torch.rand(2, 4, 6, 3), torch.randn(2, 4, 6, 3), tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK: %[[PA:[a-z_0-9]+]] = aten.permute(%{{[a-z_0-9]+}}, [1, 2, 0, 3]) : f32[2, 4, 6, 3]
        CHECK: %scan = seqfuse.scan(%[[PA]], %{{[a-z_0-9]+}}) {reverse=false, algo=auto} : (f32[2, 4, 6, 3], f32[2, 4, 3])
        CHECK: aten.permute(%{{[a-z_0-9]+}}, [2, 0, 1, 3]) : f32[6, 2, 4, 3]
        CHECK-NOT: aten.slice
    """)


def test_nonlinear_combine_is_left_alone(tmp_path):
    # a·b + b·b is not the composition of two linear steps: the tree stays as it is
    text = after_pass(lambda a, b: states(a, b, 1, quadratic), torch.rand(2, 6, 3), torch.randn(2, 6, 3),
                      tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-NOT: seqfuse.scan
        CHECK: aten.slice.Tensor(%{{[a-z_0-9]+}}, 0, 0, -1, 2)
        CHECK: aten.stack
    """)


def canonical(fn, *args):
    """The canonical graph seqfuse's passes see (pre-dispatch ATen, vmaps removed, dead code gone)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    traced = trace_pre_dispatch(*graphs[0])
    traced.graph.eliminate_dead_code()
    traced.recompile()
    return traced


def run_pass(gm):
    report = GraphReport()
    ScanTreePass().run(PassContext(gm, report))
    return format_graph(gm.graph), report


def test_untampered_tree_is_rewritten():
    # the control for the next test: the same graph, run through the pass directly
    gm = canonical(lambda a, b: states(a, b, 1), torch.rand(2, 7, 3), torch.randn(2, 7, 3))
    text, report = run_pass(gm)
    assert not report.near_misses
    run_filecheck(text, "CHECK: seqfuse.scan(\nCHECK-NOT: aten.cat")


def test_tampered_tree_is_a_near_miss():
    # the top level's cat([x[0:1], even]) turned into cat([even, x[0:1]]): the same shapes, the
    # same first-level combine, but not generic_associative_scan's computation any more; the
    # node-for-node comparison with the reference finds it and nothing is rewritten
    gm = canonical(lambda a, b: states(a, b, 1), torch.rand(2, 7, 3), torch.randn(2, 7, 3))
    cats = [n for n in gm.graph.nodes if n.target is aten.cat.default]
    assert cats
    last = cats[-1]
    last.args = (list(reversed(last.args[0])),) + tuple(last.args[1:])
    gm.recompile()
    text, report = run_pass(gm)
    run_filecheck(text, "CHECK-NOT: seqfuse.scan\nCHECK: aten.cat")
    assert [m.kind for m in report.near_misses] == ["scan"], report.near_misses
    assert "differs from torch's generic_associative_scan" in report.near_misses[0].reason
