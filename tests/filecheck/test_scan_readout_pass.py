"""FileCheck on the graph right after the scan_readout pass (dump stage "scan_readout"): a scan whose
states are only contracted with c (and whose last state is read) takes c as its readout, and no
einsum of the (*R, T, N) states is left; other uses leave the scan without a readout."""
import operator

import torch
from torch._higher_order_ops.associative_scan import associative_scan

from fc import graph_after, run_filecheck
from seqfuse.compiler.report import GraphReport
from seqfuse.ir import format_graph
from seqfuse.ir.ops import Scan
from seqfuse.lowering.lower import lower_graph
from seqfuse.lowering.reference.scan import scan_reference
from seqfuse.passes import PassContext
from seqfuse.passes.scan_readout import ScanReadoutPass
from seqfuse.passes.select import SelectPass

aten = torch.ops.aten


def after_pass(fn, *args, tmp_path, stage="scan_readout"):
    return graph_after(fn, *args, tmp_path=tmp_path, stage=stage)[0]


def linear(left, right):
    return left[0] * right[0], right[0] * left[1] + right[1]


def states(a, b):
    return associative_scan(linear, (a, b), dim=2, combine_mode="generic")[1]


def hf_mamba(a, b, C):
    h = states(a, b)
    y = torch.matmul(h.transpose(1, 2).to(torch.float32), C.unsqueeze(-1))
    return y.squeeze(-1).transpose(1, 2), h[:, :, -1]


def test_hf_mamba_readout_folds_into_the_scan(tmp_path):
    # C (2, 7, 3) becomes c' (2, 1, 7, 3) (broadcast over the channels); the scan's y (2, 5, 7)
    # replaces the matmul in its (batch, T, channels, 1) layout, its final state the last-state select
    text = after_pass(hf_mamba, torch.rand(2, 5, 7, 3), torch.randn(2, 5, 7, 3), torch.randn(2, 7, 3),
                      tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK: %[[C:[a-z_0-9]+]] = aten.unsqueeze(%{{[a-z_0-9]+}}, 1) : f32[2, 1, 7, 3]
        CHECK: %[[S:[a-z_0-9]+]] = seqfuse.scan(%{{[a-z_0-9]+}}, %{{[a-z_0-9]+}}, c=%[[C]]) {reverse=false, algo=auto} : (f32[2, 5, 7], f32[2, 5, 3])
        CHECK: %[[Y:[a-z_0-9]+]] = getitem(%[[S]], 0) : f32[2, 5, 7]
        CHECK: %[[H:[a-z_0-9]+]] = getitem(%[[S]], 1) : f32[2, 5, 3]
        CHECK: aten.permute(%[[Y]], [0, 2, 1]) : f32[2, 7, 5]
        CHECK-NOT: aten.einsum
        CHECK-NOT: f32[2, 5, 7, 3]
        CHECK-NOT: aten.select
        CHECK: return ({{.*}}, %[[H]])
    """)


def test_states_also_returned_keep_the_einsum(tmp_path):
    # the states are an output: they must be materialized, the scan keeps no readout
    def fn(a, b, C):
        h = states(a, b)
        return torch.einsum("bdtn,btn->bdt", h, C), h

    text = after_pass(fn, torch.rand(2, 5, 7, 3), torch.randn(2, 5, 7, 3), torch.randn(2, 7, 3), tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK: seqfuse.scan(%{{[a-z_0-9]+}}, %{{[a-z_0-9]+}}) {reverse=false, algo=auto} : (f32[2, 5, 7, 3], f32[2, 5, 3])
        CHECK: aten.einsum
    """)


# --- a reverse scan IR op (as the loop pass emits it), built by hand ------------------

def scan_graph(reverse, use):
    """A graph: y, h = scan(a, b) {reverse}; returns use(graph, y) (a, b (2, 5, 6, 3), c (2, 6, 3))."""
    a = torch.rand(2, 5, 6, 3) * 0.5 + 0.5
    b, c = torch.randn(2, 5, 6, 3), torch.randn(2, 6, 3)
    g = torch.fx.Graph()
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    ctx = PassContext(gm, GraphReport())
    pa, pb, pc = g.placeholder("a"), g.placeholder("b"), g.placeholder("c")
    for p, t in ((pa, a), (pb, b), (pc, c)):
        p.meta["val"] = t
    out = g.output(None)
    ir = ctx.insert_ir(Scan(a=pa, b=pb, reverse=reverse), out, pa)
    ir.meta["val"] = (torch.empty(2, 5, 6, 3), torch.empty(2, 5, 3))

    def emit(target, *args):
        with g.inserting_before(out):
            n = g.call_function(target, args)
        n.meta["val"] = target(*torch.fx.node.map_arg(args, lambda x: x.meta["val"]))
        return n

    y = emit(operator.getitem, ir, 0)
    out.args = (tuple(use(emit, y, pc)),)
    gm.recompile()
    return gm, ctx, (a, b, c)


def run_readout(gm, ctx):
    ScanReadoutPass().run(ctx)
    return format_graph(gm.graph)


def test_reverse_scan_reads_its_final_state_at_t0():
    # reverse: the last state computed is h[.., 0, :]; the folded graph runs and equals the reference
    def use(emit, y, c):
        return emit(aten.einsum.default, "bdtn,btn->bdt", [y, c]), emit(aten.select.int, y, 2, 0)

    gm, ctx, (a, b, c) = scan_graph(True, use)
    text = run_readout(gm, ctx)
    run_filecheck(text, """
        CHECK: seqfuse.scan(%a, %b, c=%{{[a-z_0-9]+}}) {reverse=true, algo=auto} : (f32[2, 5, 6], f32[2, 5, 3])
        CHECK-NOT: aten.einsum
        CHECK-NOT: aten.select
    """)
    SelectPass().run(ctx)
    lower_graph(gm)
    gm.recompile()
    y, h = gm(a, b, c)
    hs, h_ref = scan_reference(a, b, reverse=True)
    torch.testing.assert_close(y, torch.einsum("bdtn,btn->bdt", hs, c))
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(h, hs[:, :, 0])


def test_reverse_scan_read_at_t_minus_1_is_not_its_final_state():
    # in a reverse scan h[.., T-1, :] is the first state computed: no fold
    def use(emit, y, c):
        return emit(aten.einsum.default, "bdtn,btn->bdt", [y, c]), emit(aten.select.int, y, 2, -1)

    gm, ctx, _ = scan_graph(True, use)
    run_filecheck(run_readout(gm, ctx), """
        CHECK: seqfuse.scan(%a, %b) {reverse=true, algo=auto}
        CHECK: aten.einsum
    """)


def test_detached_states_are_not_folded():
    # gradients must not flow through a detach: the einsum of detached states stays
    def use(emit, y, c):
        return (emit(aten.einsum.default, "bdtn,btn->bdt", [emit(aten.detach.default, y), c]),)

    gm, ctx, _ = scan_graph(False, use)
    run_filecheck(run_readout(gm, ctx), """
        CHECK: seqfuse.scan(%a, %b) {reverse=false, algo=auto}
        CHECK: aten.detach
        CHECK: aten.einsum
    """)


def test_control_same_graph_without_detach_is_folded():
    # the control for the test above
    def use(emit, y, c):
        return (emit(aten.einsum.default, "bdtn,btn->bdt", [y, c]),)

    gm, ctx, _ = scan_graph(False, use)
    run_filecheck(run_readout(gm, ctx), """
        CHECK: seqfuse.scan(%a, %b, c=%{{[a-z_0-9]+}}) {reverse=false, algo=auto} : (f32[2, 5, 6], f32[2, 5, 3])
        CHECK-NOT: aten.einsum
    """)
