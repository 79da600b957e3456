"""seqfuse.compiler.checkpoint: inlining Dynamo's checkpoint calls, and tagging what the rewrites emit."""
from __future__ import annotations

import functools
import operator

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from seqfuse.compiler import checkpoint as ck

RECOMPUTE = CheckpointPolicy.PREFER_RECOMPUTE


def _dynamo_graph(fn, *xs) -> torch.fx.GraphModule:
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm
    torch._dynamo.reset()
    torch.compile(fn, backend=backend)(*xs)
    assert len(graphs) == 1
    return graphs[0]


def _two_regions(x, w):
    def f(y):
        return torch.tanh(y @ w).sin()
    a = checkpoint(f, x, use_reentrant=False)
    b = checkpoint(f, a, use_reentrant=False)
    return (a + b).cos()


def test_inlined_regions_are_tagged_per_region_and_the_original_is_kept():
    x, w = torch.randn(4, 4, requires_grad=True), torch.randn(4, 4, requires_grad=True)
    gm = _dynamo_graph(_two_regions, x, w)
    new, opaque = ck.inline_checkpoints(gm)
    assert not opaque
    assert not ck.has_checkpoints(new)
    assert ck.has_checkpoints(gm), "the caller's graph (compiled unchanged on failure) was changed"
    calls = [n for n in new.graph.nodes if n.op in ("call_function", "call_method")]
    ids = [n.meta.get("ac_graph_id") for n in calls if n.meta.get("recompute") == RECOMPUTE]
    # matmul, tanh, sin in each region; the add and cos after them are outside
    assert len(ids) == 6 and len(set(ids)) == 2 and ids[:3] == [ids[0]] * 3, ids
    assert all("recompute" not in n.meta for n in calls[-2:])
    torch.testing.assert_close(new(x, w)[0], _two_regions(x, w))


def test_in_place_calls_without_users_are_kept():
    def fn(x):
        def f(y):
            z = y * 2
            z.add_(1)
            return z
        return checkpoint(f, x, use_reentrant=False)

    x = torch.randn(3, requires_grad=True)
    new, _ = ck.inline_checkpoints(_dynamo_graph(fn, x))
    assert any(n.target == "add_" for n in new.graph.nodes), new.graph
    torch.testing.assert_close(new(x)[0], x * 2 + 1)


def test_selective_region_stays_a_call_with_a_policy_that_saves_random_calls():
    """A selective region is not inlined: it stays a call whose body is a copy carrying the user's
    policy wrapped in RewriteAwarePolicy (the caller's body keeps the bare one)."""
    policy = functools.partial(create_selective_checkpoint_contexts, lambda *a, **k: CheckpointPolicy.PREFER_RECOMPUTE)

    def fn(x):
        return checkpoint(torch.sin, x, use_reentrant=False, context_fn=policy) + 1

    gm = _dynamo_graph(fn, torch.randn(3, requires_grad=True))
    new, opaque = ck.inline_checkpoints(gm)
    assert not opaque and ck.has_checkpoints(new)
    (call,) = [n for n in new.graph.nodes if ck.is_checkpoint(n)]
    body = getattr(new, call.args[0].target)
    wrapped = body.meta["_checkpoint_context_fn"]
    original = getattr(gm, call.args[0].target).meta["_checkpoint_context_fn"]   # Dynamo's copy of policy
    assert not isinstance(original, ck.RewriteAwarePolicy) and original.args == policy.args
    assert isinstance(wrapped, ck.RewriteAwarePolicy) and wrapped.context_fn is original
    assert all("recompute" not in n.meta for n in new.graph.nodes)   # nothing inlined, nothing tagged
    # the wrapped policy: a seqfuse call with dropout is saved; the rest is the user's answer
    forward, _ = wrapped()
    attention = torch.ops.seqfuse.attention.default
    dropout = [a.name for a in attention._schema.arguments].index("dropout")

    def ask(p):   # the policy reads the dropout argument alone
        return forward.policy_fn(None, attention, *([None] * dropout), p)
    assert ask(0.25) == CheckpointPolicy.MUST_SAVE
    assert ask(0.0) == CheckpointPolicy.PREFER_RECOMPUTE
    assert forward.policy_fn(None, torch.ops.aten.sin.default, torch.ones(1)) == CheckpointPolicy.PREFER_RECOMPUTE


def test_a_policy_saving_sdpa_saves_the_fused_attention():
    """RewriteAwarePolicy: a fused attention the policy would recompute by default is asked about as
    ATen's attention kernels; a policy naming one of them saves it.  An explicit answer about the fused
    op itself (MUST_RECOMPUTE) stands, and other ops are not asked about twice."""
    sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    attention, mm = torch.ops.seqfuse.attention.default, torch.ops.aten.mm.default
    asked = []

    def policy(ctx, op, *args, **kwargs):
        asked.append(op)
        if op is sdpa:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.MUST_RECOMPUTE if op is mm else CheckpointPolicy.PREFER_RECOMPUTE

    def forbids(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_RECOMPUTE if op is attention else CheckpointPolicy.MUST_SAVE

    def answer(p, op):
        forward, _ = ck.RewriteAwarePolicy(functools.partial(create_selective_checkpoint_contexts, p))()
        return forward.policy_fn(None, op, torch.ones(1), dropout=0.0)
    assert answer(policy, attention) == CheckpointPolicy.MUST_SAVE
    assert sdpa in asked
    asked.clear()
    assert answer(policy, mm) == CheckpointPolicy.MUST_RECOMPUTE and asked == [mm]
    assert answer(forbids, attention) == CheckpointPolicy.MUST_RECOMPUTE
    assert answer(lambda *a, **k: CheckpointPolicy.PREFER_RECOMPUTE, attention) == CheckpointPolicy.PREFER_RECOMPUTE


def _graph(region_of: dict):
    """x -> a -> b -> c -> out, with the regions ``region_of`` (name -> region or None) as marked."""
    g = torch.fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.sin, (x,), name="a")
    b = g.call_function(torch.cos, (a,), name="b")
    c = g.call_function(torch.tanh, (b,), name="c")
    g.output(c)
    for n in (a, b, c):
        if region_of.get(n.name) is not None:
            n.meta["recompute"], n.meta["ac_graph_id"] = RECOMPUTE, region_of[n.name]
    return g, a, b, c


def _emit_after(g, node, name, target=torch.exp):
    with g.inserting_after(node):
        new = g.call_function(target, (node,), name=name)
    return new


def test_retag_between_nodes_of_one_region():
    g, a, b, c = _graph({"a": 1, "b": 1, "c": 1})
    originals = ck.mark_regions(g)
    assert originals
    new = _emit_after(g, a, "new")
    b.replace_input_with(a, new)
    assert ck.retag(g, originals) == 1
    assert (new.meta["recompute"], new.meta["ac_graph_id"]) == (RECOMPUTE, 1)
    assert all(not any(k.startswith("seqfuse") for k in n.meta) for n in g.nodes)   # no record left behind


def test_retag_leaves_a_run_across_a_region_boundary_untagged():
    g, a, b, c = _graph({"a": 1, "c": None, "b": None})
    originals = ck.mark_regions(g)
    new = _emit_after(g, a, "new")
    b.replace_input_with(a, new)
    assert ck.retag(g, originals) == 0 and "recompute" not in new.meta


def test_retag_by_inputs_and_readers_when_the_neighbours_differ():
    """A run whose inputs and readers all lie in one region is in it, though the original node just
    before it is outside (here ``b``: the run sits between b and c)."""
    g, a, b, c = _graph({"a": 2, "b": None, "c": 2})
    originals = ck.mark_regions(g)
    with g.inserting_after(b):
        new = g.call_function(torch.exp, (a,), name="new")
    c.replace_input_with(b, new)
    assert ck.retag(g, originals) == 1 and new.meta["ac_graph_id"] == 2


def test_random_seqfuse_calls_are_never_tagged():
    g, a, b, c = _graph({"a": 1, "b": 1, "c": 1})
    originals = ck.mark_regions(g)
    op = torch.ops.seqfuse.attention.default
    args = [a, a, a, None, None, None, "causal", 0, 0, float("-inf"), False, 1, None, 0.1, "nan", 0, "auto"]
    with g.inserting_after(a):
        attn = g.call_function(op, tuple(args), name="attn")
    with g.inserting_after(attn):
        out = g.call_function(operator.getitem, (attn, 0), name="out")
    b.replace_input_with(a, out)
    assert ck.draws_random(attn)
    ck.retag(g, originals)
    assert "recompute" not in attn.meta and out.meta["ac_graph_id"] == 1
    args[13] = 0.0
    attn.args = tuple(args)
    assert not ck.draws_random(attn)


def test_signature_follows_the_tags_not_the_region_ids():
    assert ck.signature(_graph({})[0]) == ""
    one = ck.signature(_graph({"a": 5, "b": 5})[0])
    assert one and one == ck.signature(_graph({"a": 9, "b": 9})[0])
    assert one != ck.signature(_graph({"a": 5, "b": 6})[0])
    assert one != ck.signature(_graph({"a": 5})[0])


def test_shape_only_inputs_are_built_inside_the_body():
    """sink_shape_only_inputs: a mask built from arange alone is rebuilt in the body and dropped from
    the call, and so is one built from it (``flip``, which then reads the first one's copy); an input
    that reads a tensor of the caller stays one."""
    aten = torch.ops.aten
    body_graph = torch.fx.Graph()
    bx, bkeep, bpad, bflip = (body_graph.placeholder(n) for n in ("x", "keep", "pad", "flip"))
    body_graph.output((body_graph.call_function(aten.where.self, (bkeep, bx, bpad)),
                       body_graph.call_function(aten.where.self, (bflip, bx, bpad))))
    body = torch.fx.GraphModule(torch.nn.Module(), body_graph)

    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.randn(4, 4)
    i = g.call_function(aten.arange.default, (4,))
    i.meta["val"] = torch.arange(4)
    col = g.call_function(aten.unsqueeze.default, (i, 1))
    col.meta["val"] = torch.arange(4)[:, None]
    keep = g.call_function(aten.ge.Tensor, (col, i))
    keep.meta["val"] = col.meta["val"] >= i.meta["val"]
    flip = g.call_function(aten.bitwise_not.default, (keep,))
    flip.meta["val"] = ~keep.meta["val"]
    pad = g.call_function(aten.mul.Tensor, (x, 0.5))   # reads x: not shape-only
    pad.meta["val"] = x.meta["val"] * 0.5
    root = torch.nn.Module()
    root.body = body
    attr = g.get_attr("body")
    call = g.call_function(torch.ops.higher_order.tag_activation_checkpoint, (attr, x, keep, pad, flip))
    g.output((call,))
    parent = torch.fx.GraphModule(root, g)
    call = next(n for n in parent.graph.nodes if n.target is torch.ops.higher_order.tag_activation_checkpoint)

    xs = torch.randn(4, 4)
    mask = torch.arange(4)[:, None] >= torch.arange(4)
    expected = body(xs, mask, xs * 0.5, ~mask)
    assert ck.sink_shape_only_inputs(parent, call, body) == 2
    assert call.args[1:] == (x, pad)
    assert [n.name for n in body.graph.nodes if n.op == "placeholder"] == ["x", "pad"]
    assert sum(n.target is aten.arange.default for n in body.graph.nodes) == 1   # flip reads keep's copy
    body.graph.lint()
    torch.testing.assert_close(body(xs, xs * 0.5), expected)
