"""A call an op refuses (seqfuse.runtime.ProgramRequired) runs the graph as written; and
seqfuse.compiler.constants.mutates: which Dynamo graphs write into their inputs in place (a graph an
op refused cannot be run again as written after such a write), and which only write tensors they create."""
import pytest
import torch

import seqfuse
from seqfuse.compiler.constants import mutates


def dynamo_graph(fn, *args):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    (gm,) = graphs
    return gm


def add_(x, buf):
    buf.add_(1)
    return x * 2


def setitem(x, buf):
    buf[0] = x.sum()
    return x * 2


def iadd(x, buf):
    buf += 1
    return x * 2


def through_a_view(x, buf):
    buf.view(-1)[:2].mul_(2)
    return x * 2


def copy_into(x, buf):
    buf.copy_(x)
    return x * 2


def own_tensor(x, buf):
    y = x.clone()
    y[0] = 0
    y.mul_(2)
    z = torch.zeros_like(x)
    z += x
    return y + z + buf


@pytest.mark.parametrize("fn,want", [(add_, True), (setitem, True), (iadd, True), (through_a_view, True),
                                     (copy_into, True), (own_tensor, False)])
def test_mutates_sees_writes_into_inputs_only(fn, want):
    x, buf = torch.randn(4), torch.zeros(4)
    assert mutates(dynamo_graph(fn, x, buf)) is want


@torch.library.custom_op("seqfuse_test::picky_tanh", mutates_args=())
def picky_tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh, refusing (before any work) a call with an element beyond ±5."""
    from seqfuse.runtime import ProgramRequired
    if bool((x.abs() > 5).any()):
        raise ProgramRequired("seqfuse_test.picky_tanh: an element beyond ±5")
    return torch.tanh(x) + 1.0          # + 1: the op's result is told apart from the program's


@picky_tanh.register_fake
def _(x):
    return torch.empty_like(x)


class PickyTanh(seqfuse.Pass):
    """aten.tanh(x) -> seqfuse_test.picky_tanh(x) - 1."""
    name = "test_picky_tanh"

    def run(self, ctx):
        for node in list(ctx.graph.nodes):
            if node.target is torch.ops.aten.tanh.default:
                with ctx.graph.inserting_before(node):
                    op = ctx.graph.call_function(torch.ops.seqfuse_test.picky_tanh.default, (node.args[0],))
                    out = ctx.graph.call_function(torch.ops.aten.sub.Tensor, (op, 1.0))
                op.meta.update(node.meta)
                out.meta.update(node.meta)
                node.replace_all_uses_with(out)
                ctx.graph.erase_node(node)
                ctx.report.add_rewrite("tanh", f"%{op.name} = picky_tanh", op)


def test_an_op_that_refuses_a_call_makes_it_run_the_program(recwarn):
    # any op in a compiled graph may raise ProgramRequired before doing any work: that call runs the graph
    # without seqfuse's rewrites (counted under "graph"), the others keep the op
    p = seqfuse.register_pass(PickyTanh())
    try:
        compiled = torch.compile(lambda x: torch.tanh(x) * 2, backend="seqfuse", options={"downstream": "eager"})
        seqfuse.reset_counters()
        small, large = torch.randn(8), torch.randn(8) * 10
        large[0] = 20.0
        assert torch.allclose(compiled(small), torch.tanh(small) * 2)
        assert seqfuse.fallbacks().get("graph") is None
        assert torch.equal(compiled(large), torch.tanh(large) * 2)
        assert sum(seqfuse.fallbacks()["graph"].values()) == 1
        assert any("picky_tanh: an element beyond" in str(w.message) for w in recwarn)
    finally:
        seqfuse.unregister_pass(p.name)
