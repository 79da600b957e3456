"""Pre-dispatch tracing by replay: trace each distinct Dynamo node once, replay it everywhere else.

Dynamo unrolls a Python loop over time into T copies of the loop body, and
``make_fx`` then pays its full per-op tracing cost (~1 ms on CPU) for every copy.
Most of those copies are the same call on tensors of the same shape: the
ATen ops a torch-level call becomes depend only on its target, its constant
arguments and the metadata of its tensor arguments.  So this tracer keys every
Dynamo node by exactly that, traces one representative per key with
``make_fx(pre_dispatch=True)``, and for every other node with the same key
replays the recorded ATen ops.  A replayed node's ``meta["val"]`` is the fake
tensor of the node it was recorded from: the same shape, strides, dtype, device
and requires_grad (all part of the key), though a view's storage offset is the
representative's — passes read metadata, never data or offsets, and the
downstream compiler traces the graph again from real inputs.  (Running each op
on fake tensors instead costs ~80% of a plain trace: measured 19.6 s vs 5.8 s
for this path, on a loaded 2-core machine, Mamba loop at T=512.)

It is only used where it is exact and pays off: static shapes (no symbolic
sizes anywhere), a graph made of plain calls (no higher-order ops, grad-mode or
autocast switches, module calls or constants), and many repeated keys.  Every
other graph is traced by the plain ``make_fx`` path; so is this one if anything
unexpected turns up while replaying (``Unsupported``).  The result is the same
graph the plain path builds, node for node (checked in tests/unit/test_canonicalize.py).
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree

#: graphs with fewer call nodes than this are traced the plain way (replay has a per-key cost)
MIN_NODES = 600
#: ... and so are graphs where more than this fraction of the calls are distinct
MAX_DISTINCT = 0.25
#: Dynamo node metadata carried over to the ATen nodes it becomes (as preserve_node_meta does)
_META_KEYS = ("stack_trace", "nn_module_stack", "source_fn_stack", "recompute", "ac_graph_id")


class Unsupported(Exception):
    """The graph holds something replay does not reproduce exactly; trace it the plain way."""


def _is_static(x) -> bool:
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return False
    if isinstance(x, torch.Tensor):
        return not any(isinstance(s, torch.SymInt) for s in (*x.shape, *x.stride(), x.storage_offset()))
    return True


def _tensor_key(t: torch.Tensor) -> tuple:
    # the storage offset is left out: no pre-dispatch decomposition depends on it, and every
    # step of a loop reads its slice at a different one
    return ("T", tuple(t.shape), tuple(t.stride()), t.dtype, t.device.type, t.requires_grad, t.is_leaf)


_INDEXING = (operator.getitem, operator.setitem)


def _flatten_index(index) -> list:
    """The leaves of an indexing key (slices opened up, so their ints are leaves too)."""
    items = index if isinstance(index, tuple) else (index,)
    out = []
    for x in items:
        if isinstance(x, slice):
            out += ["slice", x.start, x.stop, x.step]
        else:
            out.append(x)
    return out


def _key(node: torch.fx.Node, values: dict) -> tuple[tuple, tuple]:
    """(key, ints): what determines the ATen ops ``node`` traces to — target, constants, tensor
    metadata, which arguments are the same tensor — with the ints of an indexing key (a loop's
    ``x[:, t]``) taken out into ``ints``, so every step of an unrolled loop shares one key."""
    seen: dict[torch.fx.Node, int] = {}       # by node: replayed nodes may share one fake value
    ints: list[int] = []

    def leaf(x):
        if isinstance(x, torch.fx.Node):
            v = values[x]
            if isinstance(v, torch.Tensor):
                if x in seen:
                    return ("same", seen[x])
                seen[x] = len(seen)
                return _tensor_key(v)
            if not _is_static(v) or not isinstance(v, (int, float, bool, type(None), torch.dtype, torch.device)):
                raise Unsupported(f"argument {x.name} is a {type(v).__name__}")
            return ("V", v)
        if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool, torch.Tensor)):
            raise Unsupported("a symbolic or tensor constant argument")
        return ("C", type(x).__name__, repr(x))

    args = node.args
    if node.target in _INDEXING and len(args) >= 2:
        index = []
        for x in _flatten_index(args[1]):
            if type(x) is int:
                ints.append(x)
                index.append(("I",))
            else:
                index.append(leaf(x) if isinstance(x, torch.fx.Node) else ("C", type(x).__name__, repr(x)))
        rest = tuple(leaf(x) for x in pytree.tree_leaves((args[:1], args[2:], node.kwargs)))
        # the differences between the ints are part of the key (``x[:, t:t+1]`` always spans 1),
        # so every int that explains a leaf in the samples explains it in every call (see _fit)
        spans = tuple(i - ints[0] for i in ints)
        return (node.op, node.target, "index", tuple(index), spans, rest), tuple(ints)
    flat, spec = pytree.tree_flatten((args, node.kwargs))
    return (node.op, node.target, str(spec), tuple(leaf(x) for x in flat)), ()


def _plain_target(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return isinstance(node.target, str)
    if node.op != "call_function":
        return False
    t = node.target
    if isinstance(t, torch._ops.HigherOrderOperator) or t in (torch._C._set_grad_enabled,):
        return False
    name = getattr(t, "__name__", "")
    module = getattr(t, "__module__", "") or ""
    return not (name.startswith("_enter_") or name.startswith("_exit_") or "autocast" in name
                or module.startswith("torch._higher_order_ops") or module.startswith("torch.amp"))


def _structural(node: torch.fx.Node, values: dict) -> bool:
    """``node`` picks an element of a tuple/list result (split, chunk, unbind): no op of its own."""
    return node.target is operator.getitem and not isinstance(values[node.args[0]], torch.Tensor)


def eligible(gm: torch.fx.GraphModule) -> bool:
    """Whether ``gm`` is large, repetitive and plain enough for replay (cheap: metadata only)."""
    calls = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    if len(calls) < MIN_NODES or not all(_plain_target(n) for n in calls):
        return False
    values = {}
    for n in gm.graph.nodes:
        values[n] = n.meta.get("example_value")
        if not pytree.tree_all(_is_static, values[n]):
            return False
    keys = set()
    try:
        for n in calls:
            if not _structural(n, values):
                keys.add(_key(n, values)[0])
    except Unsupported:
        return False
    return len(keys) <= MAX_DISTINCT * len(calls)


def _record(node: torch.fx.Node, fake: dict, mode: FakeTensorMode) -> torch.fx.Graph:
    """make_fx one Dynamo node on fake tensors: the ATen ops it becomes, as a small graph
    whose placeholders are the node's tensor arguments in pytree order."""
    nodes, spec = pytree.tree_flatten((node.args, node.kwargs))
    flat = [fake[x] if isinstance(x, torch.fx.Node) else x for x in nodes]
    where = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]
    target, op = node.target, node.op
    # distinct argument nodes must be distinct tensors to make_fx (replayed nodes share fake
    # values): give a repeated value to a second node as a fresh tensor of the same metadata
    owner: dict[int, torch.fx.Node] = {}
    for i in where:
        v = flat[i]
        if owner.setdefault(id(v), nodes[i]) is not nodes[i]:
            with mode:
                copy = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)
            flat[i] = copy.requires_grad_(v.requires_grad)

    def call(*tensors):
        leaves = list(flat)
        for i, t in zip(where, tensors):
            leaves[i] = t
        args, kwargs = pytree.tree_unflatten(leaves, spec)
        if op == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        return target(*args, **kwargs)

    with mode:
        traced = make_fx(call, pre_dispatch=True)(*[flat[i] for i in where])
    for n in traced.graph.nodes:
        if n.op == "get_attr":
            raise Unsupported(f"{node.name} traces to a constant ({n.target})")
        if n.op == "call_function" and not (isinstance(n.target, torch._ops.OpOverload)
                                            or n.target is operator.getitem):
            raise Unsupported(f"{node.name} traces to {n.target}")
    return traced.graph


#: samples of an indexing key recorded before its ints are turned into a template
SAMPLES = 3


def _ops(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function"]


def _fit(samples: list[tuple[tuple, torch.fx.Graph]]) -> dict | None:
    """From recordings of one indexing key at different ints, the map (op #, leaf #) ->
    (which int, offset) such that every recording's varying leaf equals ints[j] + offset;
    fitted on the first two samples and checked on the rest.  None if no such map exists."""
    (ints0, g0), (ints1, g1) = samples[0], samples[1]
    ops0, ops1 = _ops(g0), _ops(g1)
    if len(ops0) != len(ops1):
        return None
    template = {}
    for k, (a, b) in enumerate(zip(ops0, ops1)):
        la, lb = pytree.tree_leaves((a.args, a.kwargs)), pytree.tree_leaves((b.args, b.kwargs))
        if a.target != b.target or len(la) != len(lb):
            return None
        for i, (x, y) in enumerate(zip(la, lb)):
            if isinstance(x, torch.fx.Node) or x == y:
                continue
            if type(x) is not int or type(y) is not int:
                return None
            fits = [j for j in range(len(ints0)) if x - ints0[j] == y - ints1[j]]
            if not fits:
                return None
            template[(k, i)] = (fits[0], x - ints0[fits[0]])
    for ints, g in samples[2:]:
        ops = _ops(g)
        if len(ops) != len(ops0):
            return None
        for k, (a, b) in enumerate(zip(ops0, ops)):
            la, lb = pytree.tree_leaves((a.args, a.kwargs)), pytree.tree_leaves((b.args, b.kwargs))
            if a.target != b.target or len(la) != len(lb):
                return None
            for i, (x, y) in enumerate(zip(la, lb)):
                if isinstance(x, torch.fx.Node):
                    continue
                want = ints[template[(k, i)][0]] + template[(k, i)][1] if (k, i) in template else x
                if y != want:
                    return None
    return template


def _replay(recorded: torch.fx.Graph, graph: torch.fx.Graph, inputs: list, meta: dict,
            template: dict | None = None, ints: tuple = ()) -> Any:
    """Append the recorded ops to ``graph`` reading ``inputs`` (new nodes); returns the output
    structure with new nodes in it.  With a ``template``, the leaves it names take this
    call's ``ints`` (see :func:`_fit`)."""
    env: dict[torch.fx.Node, Any] = {}
    placeholders = iter(inputs)
    out = None
    k = -1
    for n in recorded.nodes:
        if n.op == "placeholder":
            env[n] = next(placeholders)
        elif n.op == "output":
            out = pytree.tree_map(lambda x: env[x] if isinstance(x, torch.fx.Node) else x, n.args[0])
        else:
            k += 1
            leaves, spec = pytree.tree_flatten((n.args, n.kwargs))
            if template:
                leaves = [ints[template[(k, i)][0]] + template[(k, i)][1] if (k, i) in template else x
                          for i, x in enumerate(leaves)]
            args, kwargs = pytree.tree_unflatten([env[x] if isinstance(x, torch.fx.Node) else x for x in leaves],
                                                 spec)
            # named as make_fx names them, so both tracers print the same graph
            name = (graph._target_to_str(n.target.overloadpacket.__name__)
                    if isinstance(n.target, torch._ops.OpOverload) else None)
            new = graph.create_node("call_function", n.target, args, kwargs, name=name)
            new.meta.update(meta)
            new.meta["val"] = n.meta["val"]   # see the module docstring: shared, metadata only
            env[n] = new
    return out


def trace_by_replay(gm: torch.fx.GraphModule, values: list, mode: FakeTensorMode) -> torch.fx.GraphModule:
    """Pre-dispatch ATen graph of ``gm`` (see the module docstring); raises Unsupported where
    the plain tracer must be used instead."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, Any] = {}          # Dynamo node -> new node / structure of new nodes
    fake: dict[torch.fx.Node, Any] = {}         # Dynamo node -> its fake value (for keys)
    recorded: dict[tuple, torch.fx.Graph] = {}  # (key, ints) -> its ATen ops
    samples: dict[tuple, list] = {}             # indexing key -> recordings at distinct ints
    templates: dict[tuple, tuple] = {}          # indexing key -> (recording, template) (see _fit)
    inputs = iter(values)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            v = next(inputs)
            new = graph.placeholder(node.name)
            new.meta["val"] = v
            env[node], fake[node] = new, v
            continue
        if node.op == "output":
            graph.output(pytree.tree_map(lambda x: env[x] if isinstance(x, torch.fx.Node) else x, node.args[0]))
            continue
        if not _plain_target(node):
            raise Unsupported(f"{node.name}: {node.op} {node.target}")
        if _structural(node, fake):
            env[node] = env[node.args[0]][node.args[1]]
            fake[node] = fake[node.args[0]][node.args[1]]
            continue
        key, ints = _key(node, fake)
        new_args = [env[x] for x in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(x, torch.fx.Node)
                    and isinstance(fake[x], torch.Tensor)]
        meta = {k: node.meta[k] for k in _META_KEYS if k in node.meta}
        if (key, ints) in recorded:           # this exact call was traced before
            out = _replay(recorded[key, ints], graph, new_args, meta)
        elif key in templates:                # an indexing call whose template is known
            base, template = templates[key]
            out = _replay(base, graph, new_args, meta, template, ints)
        else:
            g = recorded[key, ints] = _record(node, fake, mode)
            out = _replay(g, graph, new_args, meta)
            if ints:
                samples.setdefault(key, []).append((ints, g))
                if len(samples[key]) == SAMPLES:
                    fitted = _fit(samples[key])
                    if fitted is None:
                        raise Unsupported(f"{node.name}: its ATen ops do not follow its index")
                    templates[key] = (samples[key][0][1], fitted)
        env[node] = out
        fake[node] = pytree.tree_map(lambda x: x.meta["val"] if isinstance(x, torch.fx.Node) else x, out)
    gm_new = torch.fx.GraphModule(gm, graph)
    return gm_new
