"""The pass registry: registration errors, user passes running after the built-ins, and their reports."""
import inspect
import math
import operator

import pytest
import torch

import seqfuse
from seqfuse.ir import ir_of
from seqfuse.passes import registered_passes
from seqfuse.passes.pattern import is_op
from helpers import check_against_eager

aten = torch.ops.aten


class TanhFinder(seqfuse.Pass):
    """Records a rewrite for every tanh and a near miss for every sigmoid; changes nothing.
    Also notes which IR ops existed when it ran."""

    name = "test_tanh_finder"

    def __init__(self):
        self.runs = 0
        self.ir_seen = []

    def run(self, ctx):
        self.runs += 1
        assert isinstance(ctx.gm, torch.fx.GraphModule) and ctx.options.downstream == "eager"
        for node in ctx.graph.nodes:
            if ir_of(node) is not None:
                self.ir_seen.append(ir_of(node).kind)
            if is_op(node, aten.tanh):
                ctx.report.add_rewrite("tanh", f"%{node.name} = user.tanh(%{node.args[0].name})", node)
            elif is_op(node, aten.sigmoid):
                ctx.report.add_near_miss("tanh", "a sigmoid, not a tanh", node)


@pytest.fixture
def finder():
    p = seqfuse.register_pass(TanhFinder())
    try:
        yield p
    finally:
        seqfuse.unregister_pass(p.name)
    assert p.name not in [q.name for q in registered_passes()]


def model(q, k, v):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    o = torch.softmax(s, dim=-1) @ v
    h = torch.tanh(o)  # TANH
    return h + torch.sigmoid(o)  # SIGMOID


def line_of(marker):
    lines, start = inspect.getsourcelines(model)
    return start + next(i for i, t in enumerate(lines) if marker in t)


def qkv():
    return [torch.randn(2, 2, 8, 4, requires_grad=True) for _ in range(3)]


def test_builtins_are_registered_first():
    names = [p.name for p in registered_passes()]
    assert names[:15] == ["ssd_stabilized", "mlstm_loop", "loop_map", "delta_blocks", "delta", "triangular", "loops",
                          "attention", "long_conv", "toeplitz", "ssd_chunks", "ssd_forms", "scan_tree", "scan_readout", "scan_discretize"]
    assert all(isinstance(p, seqfuse.Pass) for p in registered_passes())


def test_register_errors():
    with pytest.raises(TypeError, match="got the class TanhFinder; call it first"):
        seqfuse.register_pass(TanhFinder)

    class Nameless(seqfuse.Pass):
        def run(self, ctx):
            pass

    with pytest.raises(TypeError, match="non-empty name"):
        seqfuse.register_pass(Nameless())
    with pytest.raises(TypeError, match="instance of seqfuse.passes.Pass"):
        seqfuse.register_pass(lambda ctx: None)

    class Shadow(seqfuse.Pass):
        name = "attention"

        def run(self, ctx):
            pass

    with pytest.raises(ValueError, match="a pass named 'attention' is already registered"):
        seqfuse.register_pass(Shadow())
    # the built-in is untouched
    assert [type(p).__name__ for p in registered_passes() if p.name == "attention"] == ["AttentionPass"]
    with pytest.raises(KeyError, match="no pass named 'nope'"):
        seqfuse.unregister_pass("nope")


def test_duplicate_user_pass_and_replace(finder):
    with pytest.raises(ValueError, match="already registered"):
        seqfuse.register_pass(TanhFinder())
    other = TanhFinder()
    assert seqfuse.register_pass(other, replace=True) is other
    assert [p for p in registered_passes() if p.name == finder.name] == [other]


def test_user_pass_runs_after_builtins_and_reports(finder):
    names = [p.name for p in registered_passes()]
    assert names.index("test_tanh_finder") > names.index("attention")
    report = check_against_eager(model, *qkv(), options={"downstream": "eager"})
    assert finder.runs == 1
    assert finder.ir_seen == ["attention"]  # the built-in recognizer had already run
    assert report.count("attention") == 1 and report.count("tanh") == 1
    tanh = [r for r in report.rewrites if r.kind == "tanh"][0]
    assert tanh.ir == "%tanh = user.tanh(%attention)"
    assert tanh.location == f"test_registry.py:{line_of('TANH')} in model"
    assert tanh.algorithm == "-"
    (miss,) = report.near_misses
    assert (miss.kind, miss.reason) == ("tanh", "a sigmoid, not a tanh")
    assert miss.location == f"test_registry.py:{line_of('SIGMOID')} in model"
    assert "user.tanh" in str(report) and "a sigmoid, not a tanh" in str(report)


def test_user_pass_can_be_disabled(finder):
    report = check_against_eager(model, *qkv(), options={"downstream": "eager", "passes": {finder.name: False}})
    assert finder.runs == 0 and report.count("tanh") == 0 and report.count("attention") == 1


def test_disabled_by_default_pass_runs_only_when_enabled():
    class OptIn(TanhFinder):
        name = "test_opt_in"
        enabled_by_default = False

    p = seqfuse.register_pass(OptIn())
    try:
        check_against_eager(model, *qkv(), options={"downstream": "eager"}, grads=False)
        assert p.runs == 0
        torch._dynamo.reset()
        report = check_against_eager(model, *qkv(), options={"downstream": "eager", "passes": {p.name: True}},
                                     grads=False)
        assert p.runs == 1 and report.count("tanh") == 1
    finally:
        seqfuse.unregister_pass(p.name)


def test_only_listed_passes_run(finder):
    report = check_against_eager(model, *qkv(), options={"downstream": "eager", "passes": [finder.name]})
    assert finder.runs == 1 and finder.ir_seen == []
    assert report.count("attention") == 0 and report.count("tanh") == 1


def test_user_pass_can_rewrite_the_graph():
    """A user pass that edits the graph (tanh -> a hand-written equivalent) keeps the program correct."""
    class TanhAsSigmoid(seqfuse.Pass):
        name = "test_tanh_as_sigmoid"

        def run(self, ctx):
            for node in list(ctx.graph.nodes):
                if is_op(node, aten.tanh):
                    x = node.args[0]
                    with ctx.graph.inserting_before(node):
                        two_x = ctx.graph.call_function(aten.mul.Tensor, (x, 2.0))
                        sig = ctx.graph.call_function(aten.sigmoid.default, (two_x,))
                        new = ctx.graph.call_function(aten.sub.Tensor, (ctx.graph.call_function(
                            aten.mul.Tensor, (sig, 2.0)), 1.0))
                    new.meta.update(node.meta)
                    node.replace_all_uses_with(new)
                    ctx.graph.erase_node(node)
                    ctx.report.add_rewrite("tanh", "tanh(x) = 2·sigmoid(2x) - 1", new)
            ctx.gm.recompile()

    seqfuse.register_pass(TanhAsSigmoid())
    try:
        q, k, v = qkv()
        report = check_against_eager(model, q, k, v, options={"downstream": "eager"})
        assert report.count("tanh") == 1
    finally:
        seqfuse.unregister_pass("test_tanh_as_sigmoid")


def test_a_pass_that_breaks_the_node_list_fails_the_pipeline_not_the_downstream_compile():
    # a node inserted before an erased one is linked forward only: Graph.lint passes, but AOTAutograd's
    # interpreter (which frees values by a backward walk) later fails with "referenced nonexistent value"
    from seqfuse.compiler.pipeline import check_links

    def f(x):
        return (x.sin() + 1).cos()

    gm = torch.fx.symbolic_trace(f)
    check_links(gm.graph, "none")
    add = next(n for n in gm.graph.nodes if n.target is operator.add)
    add.replace_all_uses_with(add.args[0])
    gm.graph.erase_node(add)
    with gm.graph.inserting_before(add):      # the erased node as the insertion point
        gm.graph.call_function(torch.neg, (next(iter(gm.graph.nodes)),))
    gm.graph.lint()                           # lint does not see it
    with pytest.raises(RuntimeError, match="pass 'broken' left the graph's node list broken"):
        check_links(gm.graph, "broken")
