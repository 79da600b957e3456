"""Remove ``torch.vmap`` levels from a Dynamo graph where batching is provably a no-op.

Dynamo inlines ``torch.vmap(f)(xs)`` as

    _vmap_increment_nesting(n, randomness)
    x' = _add_batch_dim(x, in_dim, level)          # one per batched input
    ... the ops of f on the batched x' ...
    y = _remove_batch_dim(y', level, n, out_dim)   # one per output
    _vmap_decrement_nesting()

(``associative_scan(combine_mode="generic")`` does this once per combine call).  ``make_fx``
cannot re-trace those calls faithfully, so a graph holding them is refused (see
``canonicalize.Untraceable``).  Batching is the identity on physical tensors when

1. every op of f is elementwise (a fixed list below) with positional arguments that are
   batched values of this level or Python numbers (no captured tensors, no keyword arguments),
2. every batched input has the same physical shape (so the same logical shape: no
   broadcasting, which would align logical axes differently from physical ones) and all
   are batched at one axis d, and every output is unbatched at that same d,
3. batched values are only read inside the level (by its ops and its ``_remove_batch_dim``),

because then f on the physical tensors computes, at every index, the op on the same
elements: ``vmap(f, d, d)(xs) == f(xs)``.  Such a level is removed: ``_add_batch_dim`` and
``_remove_batch_dim`` are replaced by their argument, the nesting calls are erased.  Any
other level is left as it is (and the graph then stays refused, with the reason).
"""
from __future__ import annotations

import operator

import torch
import torch.fx
from torch._functorch import predispatch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from seqfuse.passes.pattern import ancestors

_INCREMENT = predispatch._vmap_increment_nesting
_DECREMENT = predispatch._vmap_decrement_nesting
_ADD = predispatch._add_batch_dim
_REMOVE = predispatch._remove_batch_dim
_LAZY = predispatch.lazy_load_decompositions

#: elementwise targets: every output element depends only on the inputs' elements at its index
_ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.exp, torch.log, torch.tanh,
    torch.sigmoid, torch.maximum, torch.minimum, torch.abs, torch.sqrt, torch.rsqrt,
    torch.log1p, torch.expm1, torch.reciprocal,
}
_ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "neg", "exp", "log", "tanh", "sigmoid", "maximum", "minimum",
    "abs", "sqrt", "rsqrt", "log1p", "expm1", "reciprocal", "__add__", "__radd__", "__sub__",
    "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__", "__neg__",
}


class NotNoOp(Exception):
    """A vmap level whose batching is not provably the identity; the message says why."""

    def __init__(self, reason: str, node: torch.fx.Node):
        super().__init__(reason)
        self.node = node


def _value(node: torch.fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


def _elementwise(node: torch.fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_FUNCTIONS
    return node.op == "call_method" and node.target in _ELEMENTWISE_METHODS


def _same_shape(x, y) -> bool:
    return len(x.shape) == len(y.shape) and all(statically_known_true(a == b) for a, b in zip(x.shape, y.shape))


def _level(nodes: list, start: int) -> tuple[int, list[torch.fx.Node]]:
    """The nodes of the vmap level opened at ``nodes[start]`` up to its decrement (exclusive),
    and the decrement's index; raises NotNoOp for a nested or unclosed level."""
    for k in range(start + 1, len(nodes)):
        n = nodes[k]
        if n.op == "call_function" and n.target is _INCREMENT:
            raise NotNoOp("a nested vmap", n)
        if n.op == "call_function" and n.target is _DECREMENT:
            return k, nodes[start + 1:k]
    raise NotNoOp("a vmap level that is never closed", nodes[start])


def _check_level(opening: torch.fx.Node, body: list) -> tuple[list, list, list]:
    """(add_batch_dim nodes, elementwise nodes, remove_batch_dim nodes) of a level whose
    batching is the identity (module docstring, conditions 1-3); raises NotNoOp otherwise."""
    adds, ops, removes = [], [], []
    for n in body:
        if n.op == "call_function" and n.target is _ADD:
            adds.append(n)
        elif n.op == "call_function" and n.target is _REMOVE:
            removes.append(n)
        elif n.op == "call_function" and n.target is _LAZY:
            continue
        elif _elementwise(n):
            ops.append(n)
        else:
            name = getattr(n.target, "__name__", str(n.target))
            raise NotNoOp(f"the vmapped function calls {name}, which is not elementwise", n)
    if not adds:
        raise NotNoOp("a vmap level without batched inputs", opening)
    level = adds[0].args[2]
    dims = {n.args[1] for n in adds}
    if len(dims) != 1 or not all(isinstance(n.args[0], torch.fx.Node) and n.args[2] == level for n in adds):
        raise NotNoOp("the vmapped inputs are batched at different axes", adds[0])
    dim = dims.pop()
    first = _value(adds[0].args[0])
    for n in adds:
        v = _value(n.args[0])
        if not isinstance(v, torch.Tensor) or first is None or not _same_shape(v, first):
            raise NotNoOp("the vmapped inputs differ in shape (they would broadcast)", n)
    batched = set(adds)
    for n in ops:
        if n.kwargs:
            raise NotNoOp("an elementwise op with keyword arguments inside vmap", n)
        for a in n.args:
            if isinstance(a, torch.fx.Node):
                if a not in batched:
                    raise NotNoOp("the vmapped function reads a tensor that is not batched", n)
            elif not isinstance(a, (int, float, bool)):
                raise NotNoOp("an elementwise op with a non-scalar constant argument inside vmap", n)
        if not any(isinstance(a, torch.fx.Node) for a in n.args):
            raise NotNoOp("an op inside vmap that reads no batched tensor", n)
        batched.add(n)
    inside = set(body)
    for n in removes:
        src, lvl, _size, out_dim = n.args
        if src not in batched or lvl != level or out_dim != dim:
            raise NotNoOp("a vmap output that is not a batched value at the input's batch axis", n)
    for n in batched:
        if any(u not in inside for u in n.users):
            raise NotNoOp("a batched value is used outside its vmap level", n)
    return adds, ops, removes


def _refresh(node: torch.fx.Node) -> None:
    """Recompute an elementwise node's Dynamo example value on the physical (unbatched) inputs."""
    args = [_value(a) if isinstance(a, torch.fx.Node) else a for a in node.args]
    fakes = [a for a in args if isinstance(a, torch.Tensor)]
    mode = getattr(fakes[0], "fake_mode", None) if fakes else None
    if mode is None:
        node.meta.pop("example_value", None)
        return
    with mode:
        if node.op == "call_method":
            out = getattr(args[0], node.target)(*args[1:])
        else:
            out = node.target(*args)
    node.meta["example_value"] = out


def has_vmap(gm: torch.fx.GraphModule) -> bool:
    """Whether ``gm`` (a Dynamo graph) opens a vmap level."""
    return any(n.op == "call_function" and n.target is _INCREMENT for n in gm.graph.nodes)


def remove_noop_vmaps(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of Dynamo graph ``gm`` with every vmap level removed, if each one's batching is
    the identity (module docstring); ``gm`` itself is not changed.

    Raises NotNoOp (reason and node) at the first level that is not provably a no-op.
    """
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    nodes = list(graph.nodes)
    k = 0
    while k < len(nodes):
        n = nodes[k]
        if n.op == "call_function" and n.target is _DECREMENT:
            raise NotNoOp("a vmap level closed without being opened", n)
        if not (n.op == "call_function" and n.target is _INCREMENT):
            k += 1
            continue
        end, body = _level(nodes, k)
        adds, ops, removes = _check_level(n, body)
        for a in adds:
            a.replace_all_uses_with(a.args[0])
        for op in ops:
            _refresh(op)
        for r in removes:
            r.replace_all_uses_with(r.args[0])
        for dead in [*removes, *reversed(adds), nodes[end], *[b for b in body if b.target is _LAZY], n]:
            graph.erase_node(dead)
        k = end + 1
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target is _LAZY and not n.users:
            graph.erase_node(n)
    return torch.fx.GraphModule(gm, graph)


#: the largest value a folded level may produce (elements): FlexAttention's block indices are far smaller
MAX_FOLDED = 1 << 22
#: the name prefix of the constants a folded level leaves (read by the re-trace as tensor literals)
FOLDED = "_seqfuse_folded_"


def fold_shape_only_vmaps(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, int]:
    """(a copy of Dynamo graph ``gm`` in which every outermost vmap level that reads none of the graph's
    inputs is computed now and its results used outside it become constants, the number of levels
    folded); ``gm`` itself is returned, unchanged, when there is none.

    FlexAttention builds its block mask this way, from sizes alone (``create_block_mask`` vmaps the
    mask function over rows and heads, and even a call without a block mask makes an empty one).  Such
    a level's value follows from the shapes Dynamo compiled the graph for, which it guards on, so
    computing it once at compile time is exact; the rest of the graph can then be re-traced.  A level
    is left alone if it, or anything it reads, reads an input of the graph (a size included: dynamic
    shapes), draws random numbers, or writes a tensor made outside it."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    nodes = list(graph.nodes)
    spans, depth, start = [], 0, 0
    for k, n in enumerate(nodes):
        if n.op == "call_function" and n.target is _INCREMENT:
            start = k if depth == 0 else start
            depth += 1
        elif n.op == "call_function" and n.target is _DECREMENT:
            depth -= 1
            if depth < 0:
                return gm, 0
            if depth == 0:
                spans.append((start, k))
    root = torch.fx.GraphModule(gm, graph)
    folded = 0
    for i, j in spans:
        region = nodes[i:j + 1]
        values = _fold(root, region, {n: k for k, n in enumerate(graph.nodes)})
        if values is None:
            continue
        inside = set(region)
        for node, value in values.items():
            name = f"{FOLDED}{folded}_{node.name}"
            root.register_buffer(name, value, persistent=False)
            with graph.inserting_before(nodes[i]):
                const = graph.get_attr(name)
            const.meta.update(node.meta)
            for user in [u for u in node.users if u not in inside]:
                user.replace_input_with(node, const)
        for n in reversed(region):
            graph.erase_node(n)
        folded += 1
    if not folded:
        return gm, 0
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target is _LAZY and not n.users:
            graph.erase_node(n)
    root.recompile()
    return root, folded


def _fold(root: torch.fx.GraphModule, region: list, order: dict) -> dict | None:
    """The values of the nodes of ``region`` (one outermost vmap level) read outside it, computed now,
    or None if the level may not be folded (see :func:`fold_shape_only_vmaps`)."""
    inside = set(region)
    outputs = [n for n in region if any(u not in inside for u in n.users)]
    reads = set().union(*(ancestors(n, stop=inside) for n in region))   # what it reads from outside it
    for n in [*reads, *region]:
        if n.op in ("placeholder", "output") or (n.op == "call_function" and _random(n)):
            return None
        written = _written(n)
        if written is not None and written not in inside:
            return None
    if not outputs:
        return None
    sub = torch.fx.Graph()
    env: dict = {}
    for n in sorted(reads, key=order.__getitem__) + region:
        env[n] = sub.node_copy(n, lambda x: env[x])
    sub.output(tuple(env[o] for o in outputs))
    try:
        with torch.no_grad():
            results = torch.fx.GraphModule(root, sub)()
    except Exception:  # noqa: BLE001 - then the level stays, and the graph is refused as before
        return None
    if not all(isinstance(r, torch.Tensor) and r.numel() <= MAX_FOLDED for r in results):
        return None
    return dict(zip(outputs, results))


_RANDOM = {torch.rand, torch.randn, torch.randint, torch.randperm, torch.bernoulli, torch.normal,
           torch.rand_like, torch.randn_like, torch.randint_like, torch.multinomial, torch.nn.functional.dropout}


def _random(node: torch.fx.Node) -> bool:
    return node.target in _RANDOM


def _written(node: torch.fx.Node):
    """The tensor ``node`` writes in place (``x[i] = v``, ``x.add_(y)``, ``out=``), or None."""
    if node.op == "call_function" and node.target is operator.setitem:
        return node.args[0]
    if node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__") and node.args:
        return node.args[0]
    out = node.kwargs.get("out") if node.op in ("call_function", "call_method") else None
    return out if isinstance(out, torch.fx.Node) else None
