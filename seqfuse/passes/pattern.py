"""Pattern helpers shared by the built-in recognizers and users' passes.

They read the canonical graph (pre-dispatch ATen, contractions as
``aten.einsum``, masks as ``aten.where``): what an argument is, whether a value
is a compile-time constant, whether it depends only on tensor sizes, how a
view chain maps axes back to its base tensor.
"""
from __future__ import annotations

import operator
from typing import Any, Iterable

import torch
import torch.fx

from seqfuse.passes.constants import read_constant, snapshot_of

aten = torch.ops.aten

# Ops that only cast: the value is the same number in another dtype.
CASTS = (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default)
# Ops that return their input unchanged (as a new tensor or view), gradients included.  Not
# ``detach``: the same value, but no gradient flows through it, so a rewrite that looked through
# it would give the detached tensor a gradient (a silent wrong answer in training).
IDENTITIES = (aten.clone.default, aten.contiguous.default, aten.alias.default, aten.lift_fresh_copy.default)


def is_op(node: Any, *targets) -> bool:
    """Whether ``node`` is a call of one of ``targets`` (OpOverloads or OpOverloadPackets)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    t = node.target
    packet = getattr(t, "overloadpacket", None)
    return any(t is x or packet is x for x in targets)


def op_name(node: torch.fx.Node) -> str:
    """``aten.<op>`` for an ATen call (no overload), else the target's name (for near-miss reasons)."""
    t = node.target
    return f"aten.{t.__name__.split('.')[0]}" if isinstance(t, torch._ops.OpOverload) else str(getattr(t, "__name__", t))


def arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` (or keyword ``name``) of ``node``, else ``default``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def val(node: Any) -> Any:
    """The (fake) value a node computes, or the literal itself."""
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else node


def rank(node: torch.fx.Node) -> int | None:
    v = val(node)
    return v.dim() if isinstance(v, torch.Tensor) else None


def only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    """The single user of ``node``, or None when it has zero or several."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def constant_value(x: Any, gm: torch.fx.GraphModule | None = None) -> float | int | bool | None:
    """The Python number ``x`` stands for, if it is known at compile time.

    Literals, 0-dim constant tensors (``torch.tensor(c)``, ``torch.full([], c)``,
    ``scalar_tensor``), and casts/copies of those.  Symbolic sizes are not constants.
    """
    if isinstance(x, bool) or isinstance(x, (int, float)):
        return x
    if not isinstance(x, torch.fx.Node):
        return None
    if x.op == "get_attr" and gm is not None:
        t = getattr(gm, x.target, None)
        return t.item() if isinstance(t, torch.Tensor) and t.numel() == 1 else None
    if is_op(x, *IDENTITIES, *CASTS, aten.detach, aten.detach_):    # a constant has no gradient
        return constant_value(x.args[0], gm)
    if is_op(x, aten.scalar_tensor):
        return constant_value(x.args[0], gm)
    if is_op(x, aten.full) and len(x.args[0]) == 0:
        return constant_value(x.args[1], gm)
    return None


def is_scalar(x: Any, gm: torch.fx.GraphModule | None = None) -> bool:
    """A Python number, a symbolic scalar, or a one-element constant tensor."""
    if isinstance(x, (int, float)):
        return True
    v = val(x)
    if isinstance(v, (torch.SymInt, torch.SymFloat, int, float)):
        return True
    return constant_value(x, gm) is not None


_FILLS = {aten.zeros_like: 0.0, aten.zeros: 0.0, aten.new_zeros: 0.0, aten.ones_like: 1.0, aten.ones: 1.0,
          aten.new_ones: 1.0}


def fill_constant(node):
    """The one number every element of ``node`` holds, when its value follows from a fill and
    scalar arithmetic alone (``zeros_like(x) - 1e38``: x's size only), else None."""
    if not isinstance(node, torch.fx.Node):
        return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None
    for target, value in _FILLS.items():
        if is_op(node, target):
            return value
    if is_op(node, aten.full, aten.full_like, aten.new_full):
        return fill_constant(node.args[1])
    if is_op(node, aten.add, aten.sub, aten.mul) and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1:
        a, b = fill_constant(node.args[0]), fill_constant(node.args[1])
        if a is None or b is None:
            return None
        return a + b if is_op(node, aten.add) else a - b if is_op(node, aten.sub) else a * b
    return None


def ancestors(node: torch.fx.Node, stop=()) -> set[torch.fx.Node]:
    """Every node ``node`` transitively reads (itself excluded), not reading past, nor counting, the
    nodes in ``stop``."""
    seen, stack = set(), list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen and n not in stop:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def needed_after(values: Iterable[Any], before: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes among ``values`` and everything they transitively read that come after ``before`` in
    its graph, in graph order (``before`` itself included when they read it): what must move to compute
    ``values`` ahead of ``before``."""
    order = {n: k for k, n in enumerate(before.graph.nodes)}
    start = order[before]
    need, todo = set(), [v for v in values if isinstance(v, torch.fx.Node)]
    while todo:
        n = todo.pop()
        if n in need or order[n] < start:
            continue
        need.add(n)
        todo.extend(n.all_input_nodes)
    return sorted(need, key=order.__getitem__)


def depends_on(node: Any, targets: Iterable[torch.fx.Node]) -> bool:
    """Whether ``node`` reads any of ``targets``."""
    if not isinstance(node, torch.fx.Node):
        return False
    targets = set(targets)
    return node in targets or bool(ancestors(node) & targets)


def is_shape_only(node: torch.fx.Node, constants: bool = False) -> bool:
    """Whether ``node``'s value follows from tensor sizes and constants alone
    (no tensor input, parameter or buffer is read): masks built from arange/ones/triu.

    ``constants=True`` also accepts the module buffers the compiler snapshotted
    (:mod:`seqfuse.passes.constants`: nanoGPT's ``tril`` mask buffer); evaluating such a node
    makes the buffers it reads value guards of the graph."""
    for n in [node, *ancestors(node)]:
        v = val(n)
        if n.op == "placeholder" and isinstance(v, torch.Tensor):
            if constants and snapshot_of(n) is not None:
                continue
            return False
        if n.op == "get_attr":
            return False
        if is_op(n, aten.rand, aten.randn, aten.randint, aten.bernoulli, aten.dropout, aten.empty,
                 aten.empty_like, aten.rand_like, aten.randn_like):
            return False
    return True


def evaluate_shape_only(gm: torch.fx.GraphModule, node: torch.fx.Node, sizes: dict | None = None) -> torch.Tensor:
    """Run the subgraph computing ``node`` (which must be shape-only) on real tensors.

    Symbolic sizes are replaced by ``sizes[symbol_name]`` when given, else by their
    hints (the sizes of the example inputs); no shape guard is added.  A guardable constant
    (``is_shape_only(node, constants=True)``) is read from its snapshot and becomes a value guard.
    """
    needed = ancestors(node) | {node}
    env: dict[torch.fx.Node, Any] = {}

    def concrete(x):
        if isinstance(x, torch.fx.Node):
            return env[x]
        if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return concrete_sym(x, sizes)
        if isinstance(x, (list, tuple)):
            return type(x)(concrete(e) for e in x)
        return x

    for n in gm.graph.nodes:
        if n not in needed:
            continue
        if n.op == "placeholder":
            env[n] = read_constant(n) if snapshot_of(n) is not None else concrete(val(n))
        elif n.op == "call_function":
            args = concrete(n.args)
            kwargs = {k: concrete(v) for k, v in n.kwargs.items()}
            env[n] = n.target(*args, **kwargs)
        else:
            raise ValueError(f"evaluate_shape_only: {n.format_node()} is not shape-only")
    return env[node]


def guard_exprs(env) -> list:
    """The expressions of every guard and deferred runtime assert Dynamo recorded on shape environment ``env``."""
    exprs = [g.expr for g in getattr(env, "guards", ())]
    return exprs + [r.expr for rs in getattr(env, "deferred_runtime_asserts", {}).values() for r in rs]


def guards_hold(env, sizes: dict, exprs: list | None = None) -> bool:
    """Whether every guard and deferred runtime assert that Dynamo recorded on the shape environment
    ``env`` (``exprs``: ``guard_exprs(env)``, when the caller has them) holds with its symbols (by name)
    set to ``sizes`` (the others to their hints): the compiled graph only ever runs at such sizes.
    False when one cannot be evaluated (a division by zero)."""
    hints = getattr(env, "backed_var_to_val", None) or env.var_to_val
    for expr in (guard_exprs(env) if exprs is None else exprs):
        subs = {sym: sizes.get(str(sym), hints.get(sym)) for sym in expr.free_symbols}
        if any(v is None for v in subs.values()):
            return False
        try:
            if not bool(expr.xreplace(subs)):
                return False
        except (ZeroDivisionError, TypeError, ValueError):
            return False
    return True


#: the widest value range of a size's symbol that known_int enumerates against the guards
PINNED_RANGE = 256


def _tied_symbols(sym, exprs) -> set:
    """``sym`` and the symbols guards make equal to it (Eq(s, r): the lengths of two inputs marked dynamic)."""
    import sympy
    tied, changed = {sym}, True
    while changed:
        changed = False
        for e in exprs:
            if isinstance(e, sympy.Eq) and all(isinstance(a, sympy.Symbol) for a in e.args) and \
                    set(e.args) & tied and not set(e.args) <= tied:
                tied |= set(e.args)
                changed = True
    return tied


def _allowed_values(env, sym, exprs) -> list | None:
    """The values of size symbol ``sym`` within its proven range at which every guard in ``exprs`` that
    reads only ``sym`` and the symbols tied to it holds (None: the range is unbounded or holds
    PINNED_RANGE values or more).  A guard that also reads another symbol (the batch in a stride) is
    left out: it could only rule out more values, so leaving it out over-approximates the values the
    symbol may take (evaluating it at the other symbol's hint would not be sound).  Memoized on ``env``
    per symbol and guard count: every size of one symbol shares the enumeration."""
    memo = env.__dict__.setdefault("_seqfuse_allowed", {})
    key = (len(exprs), sym)
    if key not in memo:
        vr = env.var_to_range.get(sym)
        try:
            lo, hi = int(vr.lower), int(vr.upper)
        except (AttributeError, TypeError, ValueError, OverflowError):      # an unbounded range
            lo = hi = None
        values = None
        if lo is not None and hi - lo < PINNED_RANGE:
            tied = _tied_symbols(sym, exprs)
            own = [e for e in exprs if e.free_symbols <= tied]
            values = [v for v in range(lo, hi + 1) if guards_hold(env, {str(t): v for t in tied}, own)]
        memo[key] = values
    return memo[key]


def known_int(x) -> int | None:
    """``x`` as an int when it is one, or a symbolic size the program's guards pin to one value (Dynamo
    specialized it: the chunk size read back from a reshape of a padded sequence, the length a
    recursion on sizes unrolled for); None otherwise.  Proven by the shape environment
    (``statically_known_true(x == hint)``), else, for a size of one symbol whose proven value range
    holds at most PINNED_RANGE values, by evaluating at each of them every guard that reads no other
    symbol (a guard coupling it to another symbol is left out: it could only rule out more values):
    x must equal its hint wherever they all hold.  Adds no guard."""
    if isinstance(x, int):
        return x
    if not isinstance(x, torch.SymInt):
        return None
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    hint = x.node.hint
    if not isinstance(hint, int):
        return None
    if statically_known_true(x == hint):
        return hint
    expr, env = x.node.expr, x.node.shape_env
    if len(expr.free_symbols) != 1:
        return None
    # memo on the environment itself (an id would be reused by a later one), until it gains a guard
    memo = env.__dict__.setdefault("_seqfuse_pinned", {})
    exprs = guard_exprs(env)
    key = (len(exprs), str(expr))
    if key not in memo:
        sym, = expr.free_symbols
        values = _allowed_values(env, sym, exprs)
        memo[key] = values is not None and all(int(expr.xreplace({sym: v})) == hint for v in values)
    return hint if memo[key] else None


def concrete_sym(x, sizes: dict | None = None):
    """The value of a symbolic scalar with its symbols set to ``sizes[name]`` where given,
    else to their example values (hints).  Adds no guard."""
    node = x.node
    env = node.shape_env
    expr = node.expr
    hints = getattr(env, "backed_var_to_val", None) or env.var_to_val
    subs = {}
    for sym in expr.free_symbols:
        name = str(sym)
        if sizes and name in sizes:
            subs[sym] = sizes[name]
        else:
            subs[sym] = hints[sym]
    value = expr.xreplace(subs)
    if isinstance(x, torch.SymInt):
        return int(value)
    if isinstance(x, torch.SymBool):
        return bool(value)
    return float(value)


def _alias_arg(u, n):
    """The alias annotation of the argument through which op node ``u`` reads ``n`` (None: none, or ``n``
    is not an argument of a schema op)."""
    t = u.target
    if u.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
        return None
    for a, x in zip(t._schema.arguments, u.args):
        if x is n and a.alias_info is not None:
            return a.alias_info
    return None


def mutates(u, n) -> bool:
    """Whether node ``u`` writes ``n`` in place (copy_, add_, masked_fill_, index_put_, …)."""
    info = _alias_arg(u, n)
    return info is not None and info.is_write


def written(node) -> bool:
    """Whether ``node`` or a view of it (through any chain of views) is written in place by any op."""
    return any(writes_through(u, node) for u in node.users)


def writes_through(u, n) -> bool:
    """Whether op node ``u``, a user of ``n``, writes ``n`` in place or is a view of it (at any depth)
    that some op writes; an op without a schema (but ``getitem``) counts as writing it."""
    info = _alias_arg(u, n)
    if info is None:
        if u.target is aten._unsafe_view.default:
            return written(u)       # a view whose schema does not say so
        # an op without a schema reads it: it may write or alias it
        return u.op == "call_function" and not isinstance(u.target, torch._ops.OpOverload) \
            and u.target is not operator.getitem
    # a write, or a view (select, slice, unsqueeze, view, permute, …) whose writes count
    return info.is_write or written(u)


#: fresh buffers a program fills in place, and the views through which it writes them
_FRESH_BUFFERS = (aten.empty, aten.empty_like, aten.new_empty, aten.zeros, aten.zeros_like, aten.new_zeros)
_BUFFER_VIEWS = (aten.reshape, aten.view, aten._unsafe_view, aten.slice, aten.select, aten.alias, aten.unsqueeze)


def erase_write_only(graph: torch.fx.Graph) -> None:
    """Erase fresh buffers that are only written (their views and in-place writes read by nothing, the
    buffer not returned): the attention matrix delta_rule_parallel also fills, or the state buffers of
    mLSTM's chunk loop, once an op replaced what read them.  Their in-place writes would keep them, and
    what they read, alive through dead-code elimination."""
    for node in list(graph.nodes):
        if getattr(node, "_erased", False) or not is_op(node, *_FRESH_BUFFERS):
            continue
        closure, stack, ok = [], [node], True
        while stack and ok:
            n = stack.pop()
            for u in n.users:
                if u in closure:
                    continue
                if is_op(u, *_BUFFER_VIEWS) and u.args[0] is n:
                    closure.append(u)
                    stack.append(u)
                elif u.op == "call_function" and mutates(u, n) and not u.users:
                    closure.append(u)
                else:
                    ok = False
                    break
        if ok and closure:
            pos = {n: i for i, n in enumerate(graph.nodes)}
            for n in sorted(closure, key=pos.__getitem__, reverse=True):
                graph.erase_node(n)
            if not node.users:
                graph.erase_node(node)


def same_expr(a: Any, b: Any, depth: int = 12) -> bool:
    """Whether ``a`` and ``b`` compute the same value: the same node, equal constants, or the same
    deterministic op applied to arguments that are the same expressions (``-s`` written twice in a
    program is two nodes of one value).  Up to ``depth`` ops deep; anything deeper is not the same."""
    if a is b:
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_expr(x, y, depth) for x, y in zip(a, b))
    if not isinstance(a, torch.fx.Node) or not isinstance(b, torch.fx.Node):
        return not isinstance(a, torch.fx.Node) and not isinstance(b, torch.fx.Node) and \
            type(a) is type(b) and _same(a, b) is True
    if depth == 0 or a.op != "call_function" or b.op != "call_function" or a.target is not b.target:
        return False
    t = a.target
    if not isinstance(t, torch._ops.OpOverload) or t._schema.is_mutable or \
            torch.Tag.nondeterministic_seeded in t.tags:
        return False
    return len(a.args) == len(b.args) and a.kwargs.keys() == b.kwargs.keys() and \
        all(same_expr(x, y, depth - 1) for x, y in zip(a.args, b.args)) and \
        all(same_expr(a.kwargs[k], b.kwargs[k], depth - 1) for k in a.kwargs)


def _same(a, b) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    return statically_known_true(a == b) if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt) else a == b


def axis_view(node: torch.fx.Node, broadcast: bool = False) -> tuple[torch.fx.Node, list[int | None]]:
    """Follow a chain of pure axis moves back to its base tensor.

    Returns (base, axes) where ``axes[i]`` is the axis of ``base`` that axis ``i``
    of ``node`` reads, or None for an axis the chain created (size 1, or
    broadcast by ``expand``).  With ``broadcast=True`` an axis that ``expand``
    broadcasts from a size-1 axis of the base maps to that axis (it reads
    element 0 of it) instead of None.  Folds transpose, permute, mT, movedim,
    unsqueeze, expand, identity copies, and view/reshape that only add or drop
    size-1 axes.
    """
    base, axes = node, list(range(rank(node) or 0))
    while isinstance(base, torch.fx.Node) and base.op == "call_function":
        src = base.args[0] if base.args else None
        r = rank(src) if isinstance(src, torch.fx.Node) else None
        if r is None:
            break
        if is_op(base, aten.transpose, aten.swapaxes):
            d0, d1 = base.args[1] % r, base.args[2] % r
            perm = list(range(r))
            perm[d0], perm[d1] = perm[d1], perm[d0]
        elif is_op(base, aten.permute):
            perm = [d % r for d in base.args[1]]
        elif is_op(base, aten.t):
            perm = list(range(r))[::-1]
        elif (is_op(base, aten.mT) or (is_op(base, aten.mH, aten.adjoint) and not val(src).is_complex())) and r >= 2:
            perm = list(range(r - 2)) + [r - 1, r - 2]
        elif base.target is aten.movedim.int:
            perm = [d for d in range(r) if d != base.args[1] % r]
            perm.insert(base.args[2] % r, base.args[1] % r)
        elif is_op(base, aten.unsqueeze):
            d = base.args[1] % (r + 1)
            perm = list(range(d)) + [None] + list(range(d, r))
        elif is_op(base, aten.expand):
            new = len(base.args[1]) - r
            src_shape = val(src).shape
            perm = [None] * new + [None if (not broadcast and not _same(src_shape[i], val(base).shape[new + i])
                                            and _same(src_shape[i], 1)) else i for i in range(r)]
            if any(p is None and not _same(src_shape[i - new], 1) for i, p in enumerate(perm) if i >= new):
                break
        elif is_op(base, *IDENTITIES) and not is_op(base, aten.lift_fresh_copy):
            perm = list(range(r))
        elif is_op(base, aten.view, aten.reshape, aten._unsafe_view):
            perm = _unit_axis_map(val(src).shape, val(base).shape)
            if perm is None:
                break
        else:
            break
        axes = [None if a is None else perm[a] for a in axes]
        base = src
    return base, axes


def _unit_axis_map(src_shape, dst_shape) -> list[int | None] | None:
    """For a reshape that only inserts/removes size-1 axes: dst axis -> src axis (None if new)."""
    out, i = [], 0
    for d in dst_shape:
        while i < len(src_shape) and _same(src_shape[i], 1) and not _same(d, 1):
            i += 1  # a dropped size-1 source axis
        if i < len(src_shape) and _same(src_shape[i], d):
            out.append(i)
            i += 1
        elif _same(d, 1):
            out.append(None)
        else:
            return None
    while i < len(src_shape) and _same(src_shape[i], 1):
        i += 1
    return out if i == len(src_shape) else None


def copy_meta(dst: torch.fx.Node, src: torch.fx.Node, with_val: bool = False) -> torch.fx.Node:
    """Give ``dst`` the source location (and optionally value) metadata of ``src``."""
    for k in ("stack_trace", "nn_module_stack", "source_fn_stack") + (("val",) if with_val else ()):
        if k in src.meta:
            dst.meta[k] = src.meta[k]
    return dst


def fake_of(x: Any) -> Any:
    """``x`` with every node (inside lists, tuples and dicts too) replaced by its fake value."""
    if isinstance(x, torch.fx.Node):
        return val(x)
    if isinstance(x, (list, tuple)):
        return type(x)(fake_of(e) for e in x)
    if isinstance(x, dict):
        return {k: fake_of(v) for k, v in x.items()}
    return x


def fake_call(target, args: tuple, kwargs: dict | None = None) -> Any:
    """``target`` run on the fake values of ``args`` / ``kwargs`` (nodes replaced by their values), inside
    their fake mode: an op whose decomposition makes a tensor of its own (``where.ScalarOther`` wraps its
    scalar) would otherwise mix that real tensor with fake ones and raise."""
    args, kwargs = fake_of(args), fake_of(dict(kwargs or {}))
    found: list = []
    torch.utils._pytree.tree_map(lambda x: found.append(x.fake_mode) if hasattr(x, "fake_mode") else None,
                                 (args, kwargs))
    if not found:
        return target(*args, **kwargs)
    with found[0]:
        return target(*args, **kwargs)


def emit_before(graph: torch.fx.Graph, before: torch.fx.Node, target, args: tuple,
                like: torch.fx.Node) -> torch.fx.Node:
    """Insert ``target(*args)`` before ``before``, its fake value computed from the arguments'
    (nodes inside lists included), with ``like``'s source location."""
    with graph.inserting_before(before):
        node = graph.call_function(target, args)
    node.meta["val"] = fake_call(target, args)
    return copy_meta(node, like)


def sym_product(graph: torch.fx.Graph, factors: list, before: torch.fx.Node):
    """Multiply scale factors: numbers fold to a float; symbolic ones become graph nodes.

    Each factor is (value, invert) where value is a number or a node holding a
    symbolic scalar.  Returns a float, or a node computing the product.
    """
    const, nodes = 1.0, []
    for value, invert in factors:
        if isinstance(value, torch.fx.Node):
            nodes.append((value, invert))
        else:
            const = const / value if invert else const * value
    if not nodes:
        return const
    with graph.inserting_before(before):
        acc = const
        for node, invert in nodes:
            acc = graph.call_function(operator.truediv if invert else operator.mul, (acc, node))
            a, b = (val(acc.args[0]), val(node))
            acc.meta["val"] = (a / b) if invert else (a * b)
    return acc


def readout_rounding(state_dtype: torch.dtype, chain) -> torch.dtype | None:
    """The one dtype that casts ``chain`` (the dtypes a value of ``state_dtype`` is cast to, in
    order) round it to, or None when none narrows it: what a scan's ``readout_dtype`` must be for
    its readout to read the states as the program does.  Raises ValueError when the casts round
    in a way one rounding cannot stand for (two narrower dtypes such as fp16 then bf16, or a state
    that is not fp32 / fp64)."""
    def bits(d):
        return torch.finfo(d).bits if d.is_floating_point else None

    narrow = []
    for d in chain:
        if d == state_dtype:
            continue
        if bits(d) is None or bits(state_dtype) is None:
            raise ValueError(f"a cast of the {state_dtype} states to {d}")
        if bits(d) <= bits(state_dtype):  # fewer bits, or as many in another format
            narrow.append(d)
    if not narrow:
        return None
    if len(set(narrow)) > 1 or state_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the {state_dtype} states are rounded to {' then '.join(map(str, narrow))} "
                         f"(not one rounding)")
    return narrow[0]
