"""``associative_scan(combine_mode="generic")`` inlined by Dynamo -> seqfuse.scan.

In generic mode torch runs ``generic_associative_scan`` (torch/_higher_order_ops/associative_scan.py)
in Python: an odd/even recursion of step-2 slices along axis 0 of the leaves, the combine
applied to neighbours, ``cat`` and an interleave (``stack`` + ``flatten`` + ``pad`` + ``slice``).
Once canonicalization has removed its no-op vmap levels (seqfuse.compiler.vmap), that is a
tree of plain ATen ops.  It becomes one op when it is proven to be the scan:

1. Leaves: nodes X read as ``slice(X, 0, 0, -1, 2)`` and ``slice(X, 0, 1, None, 2)`` (the
   first level's left and right neighbours).
2. Combine: the pointwise ops computed from those slices alone (taking in the leaves whose
   first-level slices they also read).  It must be over two leaves with two results (or one:
   a's product is dead code when only b's result of a length-2 scan is used; it is then taken
   as a_l·a_r, which the comparison in 3 checks wherever it is read), and be
   (a_l·a_r, a_r·b_l + b_r), the composition of two steps of h -> a·h + b, for some order of
   leaves and results                                          # ssd_forms.linear_combine
3. Region: torch's own ``generic_associative_scan`` with that combine is traced with make_fx at
   the leaves' shapes; the user's graph must compute b's result node for node the same way
   (same ATen targets, same constant arguments, normalized to the op schemas, the same
   data flow from the leaves), so it equals that reference computation.  The reference scans
   with an associative combine, so b's result is h_t = a_t ⊙ h_{t-1} + b_t, h_{-1} = 0:
                                                              # -> scan(a, b) (axis 0 moves to -2)
Any difference is a near miss (kind "scan") and the graph is left as it is.  Only b's result is
replaced; a's (the cumulative product of a) stays computed by its part of the tree if it is
used.  A scan of length 1 has no tree (torch returns the leaves), so there is nothing to
replace.  A symbolic length (dynamic=True) is the length the program's guards pin it to, when they
do (``pattern.known_int``: the tree's halvings and their parities hold at one value of the symbol's
range; the sizes the tree computes from it match the reference's there), else a near miss (the
tree's shape depends on its value).
"""
from __future__ import annotations

import operator
import re

import torch
import torch.fx
from torch._higher_order_ops.associative_scan import generic_associative_scan
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.operator_schemas import normalize_function

from seqfuse.ir.ops import Scan
from seqfuse.passes.pattern import emit_before, known_int, val
from seqfuse.passes.registry import Pass, PassContext
from seqfuse.passes.ssd_forms import linear_combine

aten = torch.ops.aten
_FRAME = re.compile(r'  File "([^"]+)", line \d+, in \S+\n(?:    .*\n)*')


class NoTree(Exception):
    """The region is not provably generic_associative_scan of the linear combine (the reason)."""


def _slice_of(node) -> tuple | None:
    """(source, dim, start, end, step) of an ``aten.slice.Tensor`` node, defaults filled; else None."""
    if not isinstance(node, torch.fx.Node) or node.target is not aten.slice.Tensor:
        return None
    a = node.args + (None,) * (5 - len(node.args))
    kw = node.kwargs
    src = a[0]
    dim = kw.get("dim", a[1] if len(node.args) > 1 else 0)
    start = kw.get("start", a[2])
    end = kw.get("end", a[3])
    step = kw.get("step", a[4] if len(node.args) > 4 else 1)
    return src, dim, start, end, step


def first_level(x: torch.fx.Node) -> tuple | None:
    """The first level's neighbour slices of leaf ``x``: (x[0:-1:2], x[1::2]) along axis 0, or None
    when it has neither (one may be missing: a slice only dead code read is gone)."""
    left = right = None
    for u in x.users:
        s = _slice_of(u)
        if s is None or s[0] is not x or s[1] != 0 or s[4] != 2:
            continue
        if (s[2], s[3]) == (0, -1) and left is None:
            left = u
        elif s[2] == 1 and s[3] is None and right is None:
            right = u
    return (left, right) if left is not None or right is not None else None


#: the non-pointwise ops generic_associative_scan emits (slices, the even level's cat, the interleave)
_STRUCTURAL = {aten.slice.Tensor, aten.cat.default, aten.stack.default, aten.flatten.using_ints, aten.pad.default,
               aten.constant_pad_nd.default, aten.view.default, aten.reshape.default}


def _flat_nodes(x) -> list:
    out = []
    torch.fx.node.map_arg(x, out.append)
    return out


def _pointwise(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and \
        torch.Tag.pointwise in node.target.tags


def _tensor_args(node: torch.fx.Node) -> list:
    return [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, torch.fx.Node)]


def combine_region(leaf: torch.fx.Node):
    """(leaves, {slice: (leaf, side)}, combine nodes in graph order, results) of the first-level
    combine that reads leaf's neighbour slices (module docstring, step 2)."""
    leaves, slices = [], {}

    def add_leaf(x):
        pair = first_level(x)
        leaves.append(x)
        for s, side in zip(pair, "lr"):
            if s is not None:
                slices[s] = (x, side)
        return [s for s in pair if s is not None]

    queue = add_leaf(leaf)
    body: set = set()
    while queue:
        n = queue.pop()
        for u in list(n.users):
            if u in body or not _pointwise(u):
                continue
            new_leaves = []
            for a in _tensor_args(u):
                if a in body or a in slices:
                    continue
                s = _slice_of(a)
                if s is not None and isinstance(s[0], torch.fx.Node) and s[0] not in leaves and \
                        first_level(s[0]) is not None and a in first_level(s[0]):
                    new_leaves.append(s[0])
                    continue
                break
            else:
                for x in new_leaves:
                    if x not in leaves:
                        queue += add_leaf(x)
                body.add(u)
                queue.append(u)
    order = [n for n in leaf.graph.nodes if n in body]
    results = [n for n in order if any(u not in body for u in n.users)]
    return leaves, slices, order, results


def _combine_module(gm, slices, order, a, b, out_a, out_b) -> torch.fx.GraphModule:
    """The combine as a graph ((a_l, b_l), (a_r, b_r)) -> (out_a, out_b).

    ``out_a`` None: the program never uses a's result of the first level (a length-2 scan
    reads only b's), so it is taken to be a_l·a_r: the reference then needs it nowhere either,
    or the comparison fails."""
    g = torch.fx.Graph()
    env, phs = {}, {}
    side = {v: k for k, v in slices.items()}
    for name, key in (("a_l", (a, "l")), ("b_l", (b, "l")), ("a_r", (a, "r")), ("b_r", (b, "r"))):
        phs[name] = g.placeholder(name)
        if key in side:
            env[side[key]] = phs[name]
    for n in order:
        env[n] = g.node_copy(n, lambda x: env[x])
    prod = env[out_a] if out_a is not None else g.call_function(aten.mul.Tensor, (phs["a_l"], phs["a_r"]))
    g.output((prod, env[out_b]))
    return torch.fx.GraphModule(gm, g)


def _normalized(node: torch.fx.Node) -> dict | None:
    if isinstance(node.target, torch._ops.OpOverload):
        try:
            pair = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
        except Exception:
            return None
        if pair is not None:
            return dict(pair.kwargs)
    return None


class _Matcher:
    """Whether a user node computes the same value as a reference node: same target, same
    constants, arguments matched recursively, placeholders bound to the leaves."""

    def __init__(self, bound: dict):
        self.map = dict(bound)

    def node(self, r: torch.fx.Node, u) -> bool:
        if not isinstance(u, torch.fx.Node):
            return False
        if r in self.map:
            return self.map[r] is u
        if r.op != "call_function" or u.op != "call_function" or r.target is not u.target:
            return False
        ra, ua = _normalized(r), _normalized(u)
        if ra is None or ua is None:
            ra, ua = (list(r.args), dict(r.kwargs)), (list(u.args), dict(u.kwargs))
        if not self.value(ra, ua):
            return False
        self.map[r] = u
        return True

    def value(self, r, u) -> bool:
        if isinstance(r, torch.fx.Node):
            return self.node(r, u)
        if isinstance(r, (list, tuple)):
            return isinstance(u, (list, tuple)) and len(r) == len(u) and all(self.value(x, y) for x, y in zip(r, u))
        if isinstance(r, dict):
            return isinstance(u, dict) and r.keys() == u.keys() and all(self.value(r[k], u[k]) for k in r)
        if isinstance(u, torch.fx.Node) and type(r) is int:
            return known_int(val(u)) == r      # a size computed from a symbolic length the guards pin
        if isinstance(u, torch.fx.Node) or type(r) is not type(u):
            return False
        return r == u


def _user_trace(trace: str | None) -> str | None:
    """The stack trace without its innermost frames inside torch (the user's call of associative_scan)."""
    if not trace:
        return trace
    frames = list(_FRAME.finditer(trace))
    keep = len(frames)
    while keep > 1 and "/torch/" in frames[keep - 1].group(1):
        keep -= 1
    return trace[:frames[keep - 1].end()] if frames else trace


class ScanTreePass(Pass):
    """Recognize torch's generic associative_scan tree of the linear combine as one seqfuse.scan."""

    name = "scan_tree"

    def run(self, ctx: PassContext) -> None:
        """Try every leaf of a step-2 slice pair (once per tree); rewrite proven trees, report the rest."""
        seen: set = set()
        changed = False
        for node in list(ctx.graph.nodes):
            if node.graph is not ctx.graph or node in seen or first_level(node) is None:
                continue
            try:
                changed |= self._tree(ctx, node, seen)
            except NoTree as e:
                ctx.report.add_near_miss("scan", str(e), node)
        if changed:
            ctx.graph.eliminate_dead_code()
            ctx.gm.recompile()

    def _tree(self, ctx: PassContext, leaf: torch.fx.Node, seen: set) -> bool:
        leaves, slices, order, results = combine_region(leaf)
        region = self._forward(leaves)
        seen.update(leaves)
        seen.update(region)
        if not order or not any(n.target is aten.stack.default for n in region):
            return False                         # step-2 slices without a combine or an interleave: not a tree
        if len(leaves) != 2 or len(results) not in (1, 2):
            raise NoTree(f"a generic associative_scan over {len(leaves)} leaves whose combine has "
                         f"{len(results)} results, not the pair (a, b) of a linear recurrence")
        combine = None
        for a, b in (leaves, leaves[::-1]):
            for out_a, out_b in ((results, results[::-1]) if len(results) == 2 else ((None, results[0]),)):
                gm = _combine_module(ctx.gm, slices, order, a, b, out_a, out_b)
                if linear_combine(gm):
                    combine = gm
                    break
            if combine is not None:
                break
        if combine is None:
            raise NoTree("the generic associative_scan combine_fn is not (a_l·a_r, a_r·b_l + b_r), "
                         "the composition of two linear recurrence steps")
        va, vb = val(a), val(b)
        if list(va.shape) != list(vb.shape) or va.dtype != vb.dtype or not (va.is_floating_point() or va.is_complex()):
            raise NoTree("the scanned a and b differ in shape or dtype")
        if known_int(va.shape[0]) is None:     # (a symbolic length the guards pin to one value is that value)
            raise NoTree("the scanned length is symbolic (the tree's shape depends on it)")
        ref = self._reference(combine, va, vb)
        ph = [n for n in ref.graph.nodes if n.op == "placeholder"]
        ref_b = next(n for n in ref.graph.nodes if n.op == "output").args[0][1]
        if not isinstance(ref_b, torch.fx.Node) or ref_b.op == "placeholder":
            return False
        found = []
        for u in region:
            if u.op == "call_function" and u.target is ref_b.target and _Matcher({ph[0]: a, ph[1]: b}).node(ref_b, u):
                found.append(u)
        if not found:
            raise NoTree("the region differs from torch's generic_associative_scan of its own combine "
                         "at these shapes (not provably the scan)")
        self._emit(ctx, a, b, found)
        return True

    @staticmethod
    def _forward(leaves) -> list:
        """The tree-shaped nodes computed from the leaves alone, in graph order (the candidates for
        the scan's result): slices, pointwise ops, cat and the interleave whose tensor arguments
        are all leaves or such nodes."""
        reach, stack, inside = set(), list(leaves), set(leaves)
        while stack:
            n = stack.pop()
            for u in n.users:
                if u in reach or u.op != "call_function" or not (_pointwise(u) or u.target in _STRUCTURAL):
                    continue
                # (sizes computed from a symbolic length are arguments, not data: not required inside)
                if all(a in inside or isinstance(val(a), torch.SymInt) for a in _flat_nodes((u.args, u.kwargs))):
                    reach.add(u)
                    inside.add(u)
                    stack.append(u)
        return [n for n in leaves[0].graph.nodes if n in reach]

    @staticmethod
    def _reference(combine: torch.fx.GraphModule, va, vb) -> torch.fx.GraphModule:
        """make_fx of torch's generic_associative_scan with ``combine`` on fresh static fake tensors
        shaped like the leaves (a symbolic size takes its hint: tracing on the graph's own fake
        mode would add guards to the user's shape environment)."""
        def step(*args):
            return list(combine(*args))

        def reference(a, b):
            return generic_associative_scan(step, [a, b], dim=0)

        shape = []
        for s in va.shape:
            if isinstance(s, torch.SymInt):
                if not s.node.has_hint():
                    raise NoTree("a leaf size without a hint")
                s = int(s.node.hint)
            shape.append(s)
        with FakeTensorMode():
            a, b = (torch.empty(shape, dtype=v.dtype, device=v.device) for v in (va, vb))
            return make_fx(reference, pre_dispatch=True)(a, b)

    def _emit(self, ctx: PassContext, a, b, found) -> None:
        """scan(a, b) over axis 0 of the leaves (moved to -2), replacing every node in ``found``."""
        graph = ctx.graph
        first = next(n for n in graph.nodes if n in found)
        va = val(a)
        r = va.dim()

        def emit(target, args):
            return emit_before(graph, first, target, args, first)

        if r == 1:                              # (T,) -> (T, 1): a single state
            a, b = emit(aten.unsqueeze.default, (a, -1)), emit(aten.unsqueeze.default, (b, -1))
        rr = max(r, 2)
        perm = list(range(1, rr - 1)) + [0, rr - 1]       # (T, *R, N) -> (*R, T, N)
        if perm != list(range(rr)):
            a, b = emit(aten.permute.default, (a, perm)), emit(aten.permute.default, (b, perm))
        op = Scan(a=a, b=b)
        ir = ctx.insert_ir(op, first, first)
        ir.meta["stack_trace"] = _user_trace(first.meta.get("stack_trace"))
        ir.meta["val"] = (val(a).new_empty(val(a).shape), val(a).new_empty((*val(a).shape[:-2], val(a).shape[-1])))
        y = emit(operator.getitem, (ir, 0))
        back = [rr - 2] + list(range(rr - 2)) + [rr - 1]   # (*R, T, N) -> (T, *R, N)
        if back != list(range(rr)):
            y = emit(aten.permute.default, (y, back))
        if r == 1:
            y = emit(aten.squeeze.dims, (y, [-1]))
        for u in found:
            u.replace_all_uses_with(y)
