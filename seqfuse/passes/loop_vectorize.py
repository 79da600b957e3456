"""Vectorizing a re-rolled loop body over time.

``Vectorizer.vec(j)`` builds, once and on whole tensors, the value of template entry j at
every matched step, stacked along a new leading time axis in index order:
shape (T', *shape_j).  Seeds ``select(X, d, i)`` become ``X`` with axis d moved to the
front; elementwise ops get their time-carrying operands padded with unit axes so that
broadcasting is unchanged; axis arguments of views, reductions and einsums shift by one (an
einsum gains a time letter).  Carried values come from the IR op that replaced the loop.
A constant entry that has no rule is stacked from its per-step nodes (correct, larger).
"""
from __future__ import annotations

import operator
import string

import torch
import torch.fx

from seqfuse.passes.loop_reroll import Loop, NoLoop, _seed_key
from seqfuse.passes.loop_linear import PASS_THROUGH
from seqfuse.passes.pattern import copy_meta, is_op, op_name, val

aten = torch.ops.aten

_EXTRA_POINTWISE = (aten.real, aten.imag, aten.conj, aten.conj_physical, aten.view_as_real, aten.view_as_complex,
                    aten.where)
_DIM1 = (aten.unsqueeze, aten.select, aten.slice, aten.narrow)
_REDUCTIONS = (aten.sum, aten.mean, aten.amax, aten.amin, aten.prod)
_MULTI = (aten.chunk, aten.split, aten.split_with_sizes, aten.unbind)


def known_eq(a, b) -> bool:
    """Whether two sizes are equal for every value of their symbols (never guards: a symbolic
    size that is not provably equal counts as different)."""
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import statically_known_true
        return bool(statically_known_true(a == b))
    return a == b


def same_shape(a, b) -> bool:
    """Whether two shapes are provably equal, axis by axis."""
    a, b = list(a), list(b)
    return len(a) == len(b) and all(known_eq(x, y) for x, y in zip(a, b))


def broadcasts_to(shape, target) -> bool:
    """Whether ``shape`` provably broadcasts to exactly ``target`` (each axis 1 or equal)."""
    shape, target = list(shape), list(target)
    if len(shape) > len(target):
        return False
    return all(known_eq(s, 1) or known_eq(s, t) for s, t in zip(shape[::-1], target[::-1]))


def _pointwise(node) -> bool:
    t = node.target
    return (isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags) or \
        is_op(node, *PASS_THROUGH, *_EXTRA_POINTWISE)


def explicit_equation(eq: str, ranks: list[int]) -> str | None:
    """``eq`` with spaces dropped and each ``...`` spelled out in fresh letters, aligned from the right
    as einsum broadcasts them (``'... c d, ... d -> ... c'`` over ranks (5, 4) is
    ``'abecd,abed->abec'``-like); None for an implicit output or a malformed equation."""
    eq = eq.replace(" ", "")
    if "->" not in eq:
        return None
    ins, out = eq.split("->")
    ins = ins.split(",")
    if len(ins) != len(ranks) or any(s.count("...") > 1 for s in ins + [out]):
        return None
    if "..." not in eq:
        return eq
    widths = [r - len(s.replace("...", "")) if "..." in s else 0 for s, r in zip(ins, ranks)]
    if any(w < 0 for w in widths):
        return None
    fresh = [c for c in string.ascii_letters if c not in eq]
    n = max(widths)
    if n > len(fresh):
        return None
    ell = "".join(fresh[:n])
    ins = [s.replace("...", ell[n - w:]) for s, w in zip(ins, widths)]
    return ",".join(ins) + "->" + out.replace("...", ell)


def can_vectorize(node: torch.fx.Node) -> bool:
    """Whether ``node`` has a vectorization rule (checked before the graph is touched)."""
    if node.target is operator.getitem:
        return is_op(node.args[0], *_MULTI)
    if is_op(node, aten.view_as_real, aten.view_as_complex):
        return True
    if _pointwise(node):
        return True
    if node.target is aten.movedim.int:
        return True
    if is_op(node, aten.tril, aten.triu):      # on the last two axes: a leading step axis changes nothing
        return val(node.args[0]).dim() >= 2
    if is_op(node, *_DIM1, aten.squeeze, aten.permute, aten.transpose, aten.expand, aten.view, aten.reshape,
             aten._unsafe_view, aten.einsum, *_MULTI):
        return not (is_op(node, aten.squeeze) and node.target is aten.squeeze.default)
    if is_op(node, *_REDUCTIONS):
        d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return d is not None and not (isinstance(d, (list, tuple)) and len(d) == 0)
    return False


class Vectorizer:
    """Builds vectorized values before ``anchor``; ``states[k]`` / ``prev[k]`` are provided by the caller."""

    def __init__(self, graph: torch.fx.Graph, loop: Loop, anchor: torch.fx.Node, deps):
        self.graph, self.loop, self.anchor, self.deps = graph, loop, anchor, deps
        self.memo: dict[int, torch.fx.Node] = {}
        self.states: dict[int, torch.fx.Node] = {}     # carried k -> (T', *S) all states
        self.prev_memo: dict[int, torch.fx.Node] = {}
        self.start, self.count = loop.vec_range()
        self.where = loop.template[0]
        self.fake_mode = val(self.where).fake_mode
        self.sizes: dict | None = None     # symbolic expression -> a sym_size node that holds it
        #: refuse (NoLoop) instead of stacking a value from its per-step nodes (a map loop gains nothing then)
        self.strict = False
        #: template entries computed from carried values the caller leaves in the graph (another state of the
        #: loop that the rewritten one does not feed): vectorized by stacking their per-step nodes, always
        self.kept: frozenset = frozenset()

    # --- the loop's values outside it -------------------------------------------------
    def replace_outside_uses(self, uses: dict, writes: list, finals: dict, invariant_writes: bool = True) -> None:
        """Rewire what outside the loop read its step values: the last step of a carried value in
        ``finals`` reads that node (the op's final state), a ``stack`` / ``cat`` of every step
        becomes the whole vector, any other read a ``select`` of it; each buffer write
        ``buf[..., i] = value`` of ``writes`` becomes one copy into the slice of all steps.  With
        ``invariant_writes`` False, a buffer write of a loop-invariant value is refused."""
        loop, done = self.loop, set()
        for (s, j), users in uses.items():
            for u in users:
                if u in done:
                    continue
                if j in loop.carried and s == loop.hi and j in finals:
                    u.replace_input_with(loop.inst[s][j], finals[j])
                    continue
                whole = self.collection(u, j)
                if whole is not None:
                    u.replace_all_uses_with(whole)
                    done.add(u)
                    if u is self.anchor:    # what is emitted later goes before the node after it
                        self.anchor = u.next
                    self.graph.erase_node(u)
                    continue
                x = self.emit(aten.select.int, (self.vec(j), 0, loop.index(s) - self.start))
                u.replace_input_with(loop.inst[s][j], x)
        for j, seed, src in writes:
            node = loop.template[seed]
            buf, d = node.args[0], node.args[1] % val(node.args[0]).dim()
            value, is_vec = self.role(src)
            if not is_vec and not invariant_writes:
                raise NoLoop("a buffer write of an invariant value")
            k = loop.offsets.get(_seed_key(node)[:3], 0)     # a write one index ahead of the reads
            dest = self.emit(aten.slice.Tensor, (buf, d, self.start + k, self.start + k + self.count))
            rank = val(buf).dim() if node.target is aten.slice.Tensor else val(buf).dim() - 1
            value = self.emit(aten.movedim.int, (self.pad(value, rank + 1), 0, d))
            if node.target is aten.slice.Tensor:
                value = self.emit(aten.squeeze.dim, (value, d + 1))
            self.emit(aten.copy_.default, (dest, value))

    def collection(self, u, j):
        """The whole of ``stack(list)`` / ``cat(list)`` when the list is entry j at every step, in step order."""
        loop = self.loop
        if not is_op(u, aten.stack, aten.cat) or not isinstance(u.args[0], (list, tuple)):
            return None
        items = list(u.args[0])
        want = [loop.inst[s][j] for s in loop.steps]
        if items != want and items != want[::-1]:
            return None
        v = self.vec(j)
        d = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim", 0)
        if loop.reverse == (items == want):   # the list runs by decreasing index
            v = self.emit(aten.flip.default, (v, [0]))
        r = val(loop.template[j]).dim()
        if is_op(u, aten.stack):
            out = self.emit(aten.movedim.int, (v, 0, d % (r + 1)))
        else:
            d = d % r
            out = self.emit(aten.flatten.using_ints, (self.emit(aten.movedim.int, (v, 0, d)), d, d + 1))
        return self.cast(out, val(u).dtype)

    # --- symbolic sizes -------------------------------------------------------------
    def size(self, s):
        """``s`` as a graph argument: an int as is; a symbolic size as ``aten.sym_size.int(x, d)`` of
        a tensor outside the loop body, before the anchor, whose axis d has exactly that expression
        (NoLoop if none has)."""
        if not isinstance(s, torch.SymInt):
            return s
        expr = s.node.expr
        if expr.is_number:
            return int(expr)
        if self.sizes is None:
            self.sizes = {}
            body = set(self.loop.body())    # erased by the rewrite: never a size's source
            for node in self.graph.nodes:
                if node is self.anchor:
                    break
                v = val(node)
                if node in body:
                    continue
                if not isinstance(v, torch.Tensor):
                    continue
                for d, e in enumerate(v.shape):
                    if isinstance(e, torch.SymInt):
                        self.sizes.setdefault(e.node.expr, (node, d))
        found = self.sizes.get(expr)
        if found is None:
            raise NoLoop(f"a size of the rewrite is the symbolic expression {expr}, not the size of a tensor axis")
        if isinstance(found, tuple):
            with self.graph.inserting_before(self.anchor):
                node = self.graph.call_function(aten.sym_size.int, found)
            node.meta["val"] = val(found[0]).shape[found[1]]
            copy_meta(node, self.where)
            self.sizes[expr] = found = node
        return found

    def _sizes(self, x):
        if isinstance(x, (list, tuple)):
            return type(x)(self._sizes(e) for e in x)
        return self.size(x)

    # --- emitting -----------------------------------------------------------------
    def emit(self, target, args, kwargs=None) -> torch.fx.Node:
        """A new node before the anchor, with its fake value computed from its arguments'."""
        kwargs = kwargs or {}
        same = self._fold(target, args)
        if same is not None:
            return same
        args, kwargs = self._sizes(tuple(args)), {k: self._sizes(v) for k, v in kwargs.items()}
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, tuple(args), kwargs)
        fake = lambda x: val(x) if isinstance(x, torch.fx.Node) else x  # noqa: E731
        tmap = lambda x: type(x)(tmap(e) for e in x) if isinstance(x, (list, tuple)) else fake(x)  # noqa: E731
        with self.fake_mode:
            node.meta["val"] = target(*tmap(tuple(args)), **{k: tmap(v) for k, v in kwargs.items()})
        copy_meta(node, self.where)
        return node

    @staticmethod
    def _fold(target, args):
        """The argument itself for a move that undoes the one before it (keeps the graph readable)."""
        x = args[0] if args else None
        if not isinstance(x, torch.fx.Node) or not isinstance(val(x), torch.Tensor):
            return None
        r = val(x).dim()
        if target is aten.reshape.default and same_shape(val(x).shape, args[1]):
            return x                                       # reshape to its own shape
        if target is aten.movedim.int:
            a, b = args[1] % r, args[2] % r
            if a == b:
                return x
            if x.target is aten.movedim.int and x.args[1] % r == b and x.args[2] % r == a:
                return x.args[0]                           # movedim(movedim(y, a, b), b, a) = y
        if target is aten.select.int and x.target is aten.unsqueeze.default and args[2] == 0 \
                and x.args[1] % r == args[1] % r:
            return x.args[0]                               # select(unsqueeze(y, d), d, 0) = y
        return None

    def pad(self, x: torch.fx.Node, rank: int, at: int = 1) -> torch.fx.Node:
        """Unit axes inserted at ``at`` until ``x`` has ``rank`` axes."""
        while val(x).dim() < rank:
            x = self.emit(aten.unsqueeze.default, (x, at))
        return x

    def cast(self, x: torch.fx.Node, dtype) -> torch.fx.Node:
        return x if val(x).dtype == dtype else self.emit(aten.to.dtype, (x, dtype))

    def timed_invariant(self, x, rank: int) -> torch.fx.Node:
        """An invariant per-step value as a (1, ...) vectorized one of per-step rank ``rank``."""
        return self.emit(aten.unsqueeze.default, (self.pad(x, rank, 0), 0))

    # --- roles ----------------------------------------------------------------------
    def role(self, r):
        """(value, vectorized?) of an argument role."""
        kind = r[0]
        if kind == "T":
            items = [self.role(e) for e in r[2]]
            if any(v for _, v in items):
                raise NoLoop("a list argument of a step mixes steps")
            return r[1](x for x, _ in items), False
        if kind == "L":
            return self.vec(r[1]), True
        if kind == "P":
            return self.prev(r[1]), True
        if kind == "X":    # ("X", base, dim, form): base sliced like a seed, vectorized
            return self._slices(r[1], r[2], r[3]), True
        return r[1], False

    def prev(self, k: int) -> torch.fx.Node:
        """The carried value k as read by each step: the state of the step before, in index order."""
        if k in self.prev_memo:
            return self.prev_memo[k]
        states = self.states[k]
        n = self.count
        init = self.loop.init.get(k)
        tmpl = self.loop.template[k]
        first = self.emit(aten.select.int, (states, 0, 0))
        if isinstance(init, torch.fx.Node):
            h0 = self.cast(self.emit(aten.expand.default, (init, list(val(first).shape))), val(first).dtype)
        elif init is None or init == 0:
            h0 = self.emit(aten.zeros_like.default, (first,))
        else:
            h0 = self.emit(aten.full_like.default, (first, init))
        h0 = self.emit(aten.unsqueeze.default, (h0, 0))
        if self.loop.reverse:  # index i reads the state of index i + 1
            rest = self.emit(aten.slice.Tensor, (states, 0, 1, n))
            out = self.emit(aten.cat.default, ([rest, h0], 0))
        else:
            rest = self.emit(aten.slice.Tensor, (states, 0, 0, n - 1))
            out = self.emit(aten.cat.default, ([h0, rest], 0))
        del tmpl
        self.prev_memo[k] = out
        return out

    # --- entries ----------------------------------------------------------------------
    def vec(self, j: int) -> torch.fx.Node:
        if j in self.memo:
            return self.memo[j]
        loop = self.loop
        node = loop.template[j]
        if j in self.states:
            out = self.states[j]
        elif j in self.kept:
            out = self._stack_steps(j)
        elif loop.roles[j] is None:
            out = self._seed(node)
        else:
            where, self.where = self.where, node   # the vectorized nodes keep the entry's source line
            try:
                out = self._rule(j, node) if can_vectorize(node) else None
                if out is None:
                    if self.deps[j]:
                        raise NoLoop(f"cannot vectorize {node.target} applied to the state")
                    out = self._stacked(j)
            finally:
                self.where = where
        self.memo[j] = out
        return out

    def _seed(self, node):
        x, d = node.args[0], node.args[1] % val(node.args[0]).dim()
        return self._slices(x, d, "slice" if node.target is aten.slice.Tensor else "select")

    def _slices(self, x, d, form):
        out = self.emit(aten.movedim.int, (x, d, 0)) if d else x
        if self.start != 0 or not known_eq(self.count, val(x).shape[d]):
            out = self.emit(aten.slice.Tensor, (out, 0, self.start, self.start + self.count))
        if form == "slice":
            out = self.emit(aten.unsqueeze.default, (out, d + 1))
        return out

    def _stacked(self, j):
        if self.strict:
            raise NoLoop(f"no vectorization rule for {op_name(self.loop.template[j])} in the loop body")
        return self._stack_steps(j)

    def _stack_steps(self, j):
        """Entry j's per-step nodes stacked along a new leading time axis, in index order."""
        loop = self.loop
        nodes = [loop.inst[s][j] for s in loop.steps]
        if loop.reverse:
            nodes.reverse()
        return self.emit(aten.stack.default, (nodes, 0))

    def _rule(self, j, node):
        loop = self.loop
        args_r, kwargs_r = loop.roles[j]
        if is_op(node, aten.einsum):
            if args_r[2][1][0] != "T":
                return None
            eq = explicit_equation(node.args[0], [val(x).dim() for x in node.args[1]])
            if eq is None:
                return None
            ins, out = eq.split("->")
            t = next(c for c in string.ascii_letters if c not in eq)
            ops = [self.role(r) for r in args_r[2][1][2]]
            ins = [t + s if v else s for s, (_, v) in zip(ins.split(","), ops)]
            return self.emit(node.target, (",".join(ins) + "->" + t + out, [x for x, _ in ops]))
        items = [self.role(r) for r in args_r[2]]
        kw = {k: self.role(r)[0] for k, r in kwargs_r.items()}
        args = [x for x, _ in items]
        out_val = val(node)
        if node.target is operator.getitem:
            return self.emit(operator.getitem, (args[0], args[1]))
        rank_in = lambda i: val(node.args[i]).dim()  # noqa: E731
        if _pointwise(node):
            r = out_val.dim() if isinstance(out_val, torch.Tensor) else 0
            args = [self.pad(x, r + 1) if v else x for x, v in items]
            if is_op(node, aten.view_as_real):
                return self.emit(node.target, tuple(args), kw)
            if is_op(node, aten.view_as_complex):
                return self.emit(node.target, tuple(args), kw)
            return self.emit(node.target, tuple(args), kw)
        x = args[0]
        if is_op(node, aten.tril, aten.triu):
            return self.emit(node.target, (x, *args[1:]), kw) if items[0][1] else None
        if is_op(node, aten.unsqueeze):
            return self.emit(node.target, (x, args[1] % out_val.dim() + 1))
        if is_op(node, aten.select, aten.slice, aten.narrow, aten.squeeze) and node.target is not aten.squeeze.dims:
            rest = list(args[1:])
            rest[0] = rest[0] % rank_in(0) + 1
            return self.emit(node.target, (x, *rest), kw)
        if node.target is aten.squeeze.dims:
            return self.emit(node.target, (x, [d % rank_in(0) + 1 for d in args[1]]))
        if node.target is aten.movedim.int:
            r = rank_in(0)
            return self.emit(node.target, (x, args[1] % r + 1, args[2] % r + 1))
        if is_op(node, aten.permute):
            return self.emit(node.target, (x, [0] + [d % rank_in(0) + 1 for d in args[1]]))
        if is_op(node, aten.transpose):
            r = rank_in(0)
            return self.emit(node.target, (x, args[1] % r + 1, args[2] % r + 1))
        if is_op(node, aten.expand):
            sizes = list(args[1])
            x = self.pad(x, len(sizes) + 1)
            return self.emit(node.target, (x, [-1] + sizes))
        if is_op(node, aten.view, aten.reshape, aten._unsafe_view):
            shape = list(out_val.shape)
            if not all(isinstance(s, int) for s in shape):
                if any(isinstance(s, int) and s == -1 for s in args[1]):
                    return None
                shape = list(args[1])
            return self.emit(aten.reshape.default, (x, [self.count] + shape))
        if is_op(node, *_REDUCTIONS):
            r = rank_in(0)
            d = args[1]
            dims = [e % r + 1 for e in d] if isinstance(d, (list, tuple)) else d % r + 1
            return self.emit(node.target, (x, dims, *args[2:]), kw)
        if is_op(node, *_MULTI):
            r = rank_in(0)
            if is_op(node, aten.unbind):
                return self.emit(node.target, (x, args[1] % r + 1 if len(args) > 1 else 1))
            d = args[2] if len(args) > 2 else kw.pop("dim", 0)
            return self.emit(node.target, (x, args[1], d % r + 1), kw)
        return None

    def align(self, x, vectorized: bool, letters: str, target: str) -> torch.fx.Node:
        """A per-step operand with einsum ``letters`` as a value broadcastable to ``target`` letters
        (summing size-1 letters not in target, inserting unit axes), vectorized (T', ...) if ``vectorized``."""
        present = "".join(c for c in target if c in letters)
        if vectorized:
            t = next(c for c in string.ascii_letters if c not in letters + target)
            if letters != present:
                x = self.emit(aten.einsum.default, (f"{t}{letters}->{t}{present}", [x]))
        elif letters != present:
            x = self.emit(aten.einsum.default, (f"{letters}->{present}", [x]))
        off = 1 if vectorized else 0
        for i, c in enumerate(target):
            if c not in letters:
                x = self.emit(aten.unsqueeze.default, (x, i + off))
        return x
