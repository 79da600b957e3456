"""Lift delta-rule recurrences (DeltaNet, Gated DeltaNet, KDA) to one seqfuse.delta op.

The delta rule's update is linear in the state but not elementwise: a rank-1 correction reads the
state through a contraction with the key,

    S' = α_t ⊙ S                          α_t = exp(g_t): per head (Gated DeltaNet), per key dim (KDA), or 1
    S  = S' + k_t ⊗ β_t (v_t − S'ᵀ k_t)   the write, with the correction  −k_t ⊗ β_t (S'ᵀ k_t)
    y_t = S ᵀ q_t

so the ``loops`` pass, which proves updates elementwise-linear, reports these loops as near misses.
This pass runs before it and claims them.  A Dynamo-unrolled loop is re-rolled (loop_reroll) and
its one carried value's update is evaluated symbolically over the body template as a sum of terms

    num · Π factors · atom,     atom ∈ { S (the previous state),  R = Σ_K (Π inner factors) ⊙ S,  1 }

where every factor is a loop-constant value (a per-step slice, an invariant, or a number) with its
axes mapped onto the state's axes (the *frame*: batch axes, the key axis K, the value axis V;
K is the axis the state is contracted over).  Broadcasting, views, products, sums and the
contraction keep that form; anything else is a near miss naming the operation.  The update is
the delta rule iff it is exactly

    D·S  −  n·β·kc·D_nonK·R(kc·D_K)  +  n·β·kc·v

with one decay D (exp(·) factors and positive numbers along batch and K only, split into the
part D_K along K, which stays inside the contraction, and D_nonK), one key product kc (the same
factors in the correction's contraction and in both outer products), one write strength n·β
(batch axes only) shared by the correction and the input, and values v (no K axis).  The readout
is an einsum of the new state with a constant q over K.  Any other form (a second correction,
a key that differs between the read and the write, a gate along V, a β that differs between the
terms) is a near miss naming the term.

Per-step outputs collected with ``stack`` / ``cat`` or written into a buffer slice by slice and
the final state are replaced by the op's results; loop-constant values used after the loop are
vectorized over time (loop_vectorize).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.fx

from seqfuse.ir.ops import Delta
from seqfuse.passes.loop_linear import PASS_THROUGH, Analysis, leaves
from seqfuse.passes.loop_reroll import Loop, NoLoop, _seed_key, find_runs, group_loops, reroll
from seqfuse.passes.loop_vectorize import Vectorizer, broadcasts_to, known_eq, same_shape
from seqfuse.passes.pattern import CASTS, axis_view, is_op, val
from seqfuse.passes.registry import Pass, PassContext

aten = torch.ops.aten

#: views that only move, insert or drop unit axes of a value (their axes map is followed)
_VIEWS = (aten.unsqueeze, aten.squeeze, aten.transpose, aten.permute, aten.expand, aten.view, aten.reshape,
          aten._unsafe_view, aten.movedim)


class NotDelta(Exception):
    """The loop has a matrix state read through a contraction, but its update is not the delta rule
    (the message names the term)."""


def _name(node) -> str:
    t = node.target
    return f"aten.{t.__name__.split('.')[0]}" if isinstance(t, torch._ops.OpOverload) else str(getattr(t, "__name__", t))


# --- the symbolic form -------------------------------------------------------------------

@dataclass(frozen=True)
class Factor:
    """A loop-constant factor: ``role`` (a template entry ("L", j) or an invariant ("I", node)) raised to
    ``power``, its axes laid on the frame by ``fmap`` (frame axis per axis of its value; None: size 1)."""

    key: tuple
    role: tuple
    power: int
    fmap: tuple

    @property
    def support(self) -> frozenset:
        return frozenset(a for a in self.fmap if a is not None)

    def ident(self):
        return (self.key, self.power, tuple(a for a in self.fmap if a is not None))


def _bag(factors) -> tuple:
    """A multiset of factors in a canonical order (for comparisons)."""
    return tuple(sorted((f.ident() for f in factors), key=repr))


@dataclass
class Term:
    num: float
    factors: tuple          # Factors outside the atom
    atom: object            # "S" | ("R", inner factors) | None (a constant term)


@dataclass
class LinVal:
    """A value linear in the previous state: Σ terms, with ``axes`` the frame axis of each of its axes."""

    axes: tuple
    terms: list


class _Form:
    """The symbolic evaluation of one carried value's update over the loop's body template."""

    def __init__(self, ctx: PassContext, loop: Loop, an: Analysis, k: int):
        self.ctx, self.loop, self.an, self.k = ctx, loop, an, k
        self.tmpl = loop.template[k]
        self.r = val(self.tmpl).dim()
        self.shape = tuple(val(self.tmpl).shape)
        self.kax: int | None = None       # the frame axis the state is contracted over
        self.memo: dict[int, LinVal] = {}
        self.used: set[int] = set()       # template entries the update's evaluation read
        self.tindex = {n: j for j, n in enumerate(loop.template)}

    # -- constant factors ----------------------------------------------------------------
    def factors(self, role, fmap) -> tuple[float, list[Factor]]:
        """(number, factors) of a constant role whose value's axes lie on frame axes ``fmap``."""
        if role[0] == "C":
            x = role[1]
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise NotDelta(f"a coefficient of the update is {x!r}, not a real number")
            return float(x), []
        if role[0] == "L":
            j = role[1]
            node = self.loop.template[j]
            roles = self.loop.roles[j]
            fmap = self._unit_none(node, fmap)
            if roles is None:     # a per-step slice: identified by what it slices
                x, d, form, _ = _seed_key(node)
                return 1.0, [Factor(("seed", x, d, form), role, 1, fmap)]
            args = roles[0][2]
            if is_op(node, aten.mul) and len(args) == 2 and node.target is aten.mul.Tensor:
                n0, f0 = self.factors(args[0], self._align(node, 0, fmap))
                n1, f1 = self.factors(args[1], self._align(node, 1, fmap))
                return n0 * n1, f0 + f1
            if node.target is aten.div.Tensor and not node.kwargs:
                n0, f0 = self.factors(args[0], self._align(node, 0, fmap))
                n1, f1 = self.factors(args[1], self._align(node, 1, fmap))
                if n1 == 0:
                    raise NotDelta("the update divides by zero")
                return n0 / n1, f0 + [Factor(f.key, f.role, -f.power, f.fmap) for f in f1]
            if node.target is aten.neg.default:
                n0, f0 = self.factors(args[0], fmap)
                return -n0, f0
            if is_op(node, *_VIEWS, aten.clone, aten.contiguous, aten.alias):
                base, axes = axis_view(node)
                if base is not node and isinstance(val(base), torch.Tensor):
                    bmap = [None] * val(base).dim()
                    for i, a in enumerate(axes):
                        if a is not None:
                            bmap[a] = fmap[i]
                    if all(m is not None or known_eq(s, 1) for m, s in zip(bmap, val(base).shape)):
                        j2 = self.tindex.get(base)
                        return self.factors(("L", j2) if j2 is not None else ("I", base), tuple(bmap))
            return 1.0, [Factor(("L", j), role, 1, fmap)]
        if role[0] == "I":
            node = role[1]
            v = val(node)
            if not isinstance(v, torch.Tensor):
                raise NotDelta("a coefficient of the update is a symbolic scalar")
            fmap = self._unit_none(node, fmap)
            base, axes = axis_view(node)
            if base is not node and isinstance(val(base), torch.Tensor):
                bmap = [None] * val(base).dim()
                for i, a in enumerate(axes):
                    if a is not None:
                        bmap[a] = fmap[i]
                return 1.0, [Factor(("I", base), ("I", base), 1, self._unit_none(base, tuple(bmap)))]
            return 1.0, [Factor(("I", node), role, 1, fmap)]
        raise NotDelta("a coefficient of the update is a list")

    @staticmethod
    def _unit_none(node, fmap) -> tuple:
        shape = val(node).shape
        return tuple(None if known_eq(s, 1) else a for s, a in zip(shape, fmap))

    def _align(self, node, i, fmap) -> tuple:
        """The frame map of argument i of a broadcasting op whose result lies on ``fmap``."""
        x = node.args[i]
        if not isinstance(x, torch.fx.Node):
            return ()
        r = val(x).dim()
        out = val(node).dim()
        if r > out:
            raise NotDelta("a coefficient broadcasts against a larger value")
        return tuple(fmap[out - r:])

    # -- linear values -------------------------------------------------------------------
    def lin(self, role) -> LinVal | None:
        if role[0] == "P":
            if role[1] != self.k:
                raise NotDelta("the update reads another carried value")
            return LinVal(tuple(range(self.r)), [Term(1.0, (), "S")])
        if role[0] != "L" or not self.an.deps[role[1]]:
            return None
        j = role[1]
        if j not in self.memo:
            self.memo[j] = self._node(j)
            self.used.add(j)
        return self.memo[j]

    def _node(self, j) -> LinVal:
        loop = self.loop
        node = loop.template[j]
        args = loop.roles[j][0][2]
        kwargs = loop.roles[j][1]
        out = val(node)
        if is_op(node, *PASS_THROUGH):
            if any(not self.an.const(r) for r in args[1:]):
                raise NotDelta(f"the state passes through {_name(node)} with a state-dependent argument")
            x = self.lin(args[0])
            if is_op(node, *CASTS) and out.dtype != val(node.args[0]).dtype:
                raise NotDelta(f"the update casts a value read from the state to {out.dtype}")
            return x
        if node.target is aten.mul.Tensor:
            x, y = self.lin(args[0]), self.lin(args[1])
            if x is not None and y is not None:
                raise NotDelta("the update multiplies two values read from the state (not linear)")
            return self._scale(node, args, x, 1, 1) if x is not None else self._scale(node, args, y, 0, 1)
        if node.target is aten.div.Tensor and not node.kwargs:
            x, y = self.lin(args[0]), self.lin(args[1])
            if y is not None:
                raise NotDelta("the update divides by a value read from the state (not linear)")
            return self._scale(node, args, x, 1, -1)
        if node.target in (aten.add.Tensor, aten.sub.Tensor):
            alpha = kwargs.get("alpha", ("C", 1))
            if alpha[0] != "C" or alpha[1] != 1:
                raise NotDelta(f"the update's {_name(node)} scales a term by alpha")
            sign = -1.0 if node.target is aten.sub.Tensor else 1.0
            return self._sum(node, [(args[0], 1.0), (args[1], sign)])
        if node.target is aten.neg.default:
            x = self.lin(args[0])
            return LinVal(x.axes, [Term(-t.num, t.factors, t.atom) for t in x.terms])
        if is_op(node, *_VIEWS):
            if any(not self.an.const(r) for r in args[1:]):
                raise NotDelta(f"the update's {_name(node)} has a state-dependent size")
            return self._view(node, self.lin(args[0]))
        if is_op(node, aten.einsum):
            return self._einsum(node, args)
        raise NotDelta(f"the update applies {_name(node)} to a value read from the state (not the delta rule)")

    def _right(self, node, x: LinVal, arg_i: int) -> tuple:
        """x's axes as laid in ``node``'s result (right-aligned); the result must not add axes to x."""
        out = val(node).dim()
        if out != len(x.axes):
            raise NotDelta(f"the update's {_name(node)} broadcasts a value read from the state to more axes")
        return x.axes

    def _scale(self, node, args, x: LinVal, c_index: int, power: int) -> LinVal:
        axes = self._right(node, x, 1 - c_index)
        c = args[c_index]
        fmap = self._align(node, c_index, axes) if isinstance(node.args[c_index], torch.fx.Node) else ()
        num, fs = self.factors(c, fmap)
        if power < 0:
            if num == 0:
                raise NotDelta("the update divides by zero")
            num, fs = 1.0 / num, [Factor(f.key, f.role, -f.power, f.fmap) for f in fs]
        return LinVal(axes, [Term(t.num * num, t.factors + tuple(fs), t.atom) for t in x.terms])

    def _sum(self, node, parts) -> LinVal:
        out = val(node).dim()
        lins = [(self.lin(r), r, s) for r, s in parts]
        axes = None
        for x, _, _ in lins:
            if x is not None:
                if len(x.axes) != out:
                    raise NotDelta(f"the update's {_name(node)} broadcasts a value read from the state")
                if axes is not None and axes != x.axes:
                    raise NotDelta(f"the update's {_name(node)} adds values read from the state along different axes")
                axes = x.axes
        terms = []
        for (x, r, s), i in zip(lins, range(len(lins))):
            if x is not None:
                terms += [Term(t.num * s, t.factors, t.atom) for t in x.terms]
            else:
                num, fs = self.factors(r, self._align(node, i, axes) if isinstance(node.args[i], torch.fx.Node) else ())
                terms.append(Term(num * s, tuple(fs), None))
        return LinVal(axes, terms)

    def _view(self, node, x: LinVal) -> LinVal:
        out = val(node)
        src = val(node.args[0])
        if is_op(node, aten.expand):
            # broadcasting unit axes of a value read from the state keeps its terms
            if out.dim() != src.dim() or any(not known_eq(a, b) and not known_eq(a, 1)
                                             for a, b in zip(src.shape, out.shape)):
                raise NotDelta("the update expands a value read from the state to more axes")
            return x
        if is_op(node, aten.unsqueeze):
            d = node.args[1] % out.dim()
            axes = list(x.axes)
            axes.insert(d, self._infer(axes, d))
            return LinVal(tuple(axes), x.terms)
        amap = _one_step(node)
        if amap is None:
            raise NotDelta(f"the update reshapes a value read from the state with {_name(node)}")
        axes = []
        for i, a in enumerate(amap):
            if a is None:
                if not known_eq(out.shape[i], 1):
                    raise NotDelta(f"the update broadcasts a value read from the state with {_name(node)}")
                axes.append(None)
            else:
                axes.append(x.axes[a])
        kept = {a for a in amap if a is not None}
        for d in range(src.dim()):
            if d not in kept and not known_eq(src.shape[d], 1):
                raise NotDelta(f"the update reshapes a value read from the state with {_name(node)}")
        for i, a in enumerate(axes):
            if a is None:
                axes[i] = self._infer(axes[:i] + axes[i + 1:], i)
        return LinVal(tuple(axes), x.terms)

    def _infer(self, axes, d) -> int:
        """The frame axis of a unit axis inserted at position d of a value laid on ``axes``."""
        missing = [a for a in range(self.r) if a not in axes]
        if len(missing) == 1:
            return missing[0]
        lo = max([a for a in axes[:d] if a is not None], default=-1)
        hi = min([a for a in axes[d:] if a is not None], default=self.r)
        cands = [a for a in missing if lo < a < hi]
        if len(cands) != 1:
            raise NotDelta("the update lays a value read from the state on axes that are not the state's")
        return cands[0]

    def _einsum(self, node, args) -> LinVal:
        eq = node.args[0].replace(" ", "")
        ops = args[1][2] if args[1][0] == "T" else None
        if "." in eq or "->" not in eq or ops is None or len(ops) != 2:
            raise NotDelta("the update contracts the state with an einsum of other than two operands")
        ins, out = eq.split("->")
        ins = ins.split(",")
        lins = [self.lin(r) for r in ops]
        if all(x is not None for x in lins):
            raise NotDelta("the update contracts the state with itself (not linear)")
        i = 0 if lins[0] is not None else 1
        x, lx, lc, crole = lins[i], ins[i], ins[1 - i], ops[1 - i]
        if len(lx) != len(x.axes) or len(set(lx)) != len(lx) or len(set(lc)) != len(lc):
            raise NotDelta("the update's einsum repeats a letter")
        xs = val(node.args[1][i]).shape
        cs = val(node.args[1][1 - i]).shape
        frame = {c: a for c, a in zip(lx, x.axes)}
        size = {c: s for c, s in zip(lx, xs)}
        for c, s in zip(lc, cs):
            if c in size and not (known_eq(size[c], s) or known_eq(s, 1) or known_eq(size[c], 1)):
                raise NotDelta("the update's einsum operands disagree on a size")
            if c not in size or known_eq(size[c], 1):
                size[c] = s
        for c in lc:
            if c not in lx and c not in out:
                raise NotDelta("the update's einsum sums a constant over an axis of its own")
        summed = [c for c in lx if c not in out and not known_eq(size[c], 1)]
        # output axes: the state's letters keep their frame axes; letters of the constant alone are inferred
        oaxes = [frame.get(c) for c in out]
        for p, c in enumerate(out):
            if oaxes[p] is None:
                oaxes[p] = self._infer(oaxes[:p] + oaxes[p + 1:], p)
                frame[c] = oaxes[p]
        cmap = tuple(None if known_eq(s, 1) else frame.get(c) for c, s in zip(lc, cs))
        if any(a is None and not known_eq(s, 1) for a, s in zip(cmap, cs)):
            raise NotDelta("the update's einsum lays a constant on axes that are not the state's")
        num, cfs = self.factors(crole, cmap)
        if not summed:    # an elementwise product
            return LinVal(tuple(oaxes), [Term(t.num * num, t.factors + tuple(cfs), t.atom) for t in x.terms])
        axes_summed = {frame[c] for c in summed}
        if len(axes_summed) != 1:
            raise NotDelta("the update contracts the state over more than one axis")
        ax = axes_summed.pop()
        if self.kax is None:
            if ax not in (self.r - 2, self.r - 1):
                raise NotDelta("the update contracts the state over a batch axis")
            self.kax = ax
        elif ax != self.kax:
            raise NotDelta("the update contracts the state over both of its last two axes")
        if not any(ax in f.support for f in cfs):
            raise NotDelta("the update sums the state over its key axis without a key")
        terms = []
        for t in x.terms:
            if t.atom != "S":
                raise NotDelta("the update contracts a term that is not the decayed state "
                               "(a correction or an input read again through the key)")
            every = list(t.factors) + list(cfs)
            inner = tuple(f for f in every if ax in f.support)
            outer = tuple(f for f in every if ax not in f.support)
            terms.append(Term(t.num * num, outer, ("R", inner)))
        return LinVal(tuple(oaxes), terms)


# --- the pass ----------------------------------------------------------------------------

@dataclass
class _Plan:
    kax: int
    vax: int
    k: list            # K-spanning factors of the key (both in the read and the write)
    v: list            # the values' factors
    v_num: float
    beta: list         # write strength factors
    beta_num: float
    gate: list         # decay factors
    gate_num: float
    gate_kind: str
    readout: int       # template index of the readout einsum
    q: list            # the readout's constant factors
    q_num: float


def _is_zero(x) -> bool:
    """Whether an initial state is known to be zero (zeros, possibly moved with ``.to``)."""
    while isinstance(x, torch.fx.Node) and (is_op(x, aten.to, aten.clone, aten.contiguous, aten._to_copy)):
        x = x.args[0]
    if x is None:
        return True
    if isinstance(x, (int, float)):
        return x == 0
    return is_op(x, aten.zeros, aten.zeros_like, aten.new_zeros)


def _reroll(graph, group, pos) -> Loop | None:
    """The loop read with updates moved to the step that reads them (a step loop), else with every node
    in the step of its slices (a loop over chunks, whose update reads the chunk's own slices after its
    readout); None when neither reading matches (as the loops pass reads loops)."""
    for move in (True, False):
        try:
            loop = reroll(graph, group, pos, move_updates=move)
        except NoLoop:
            continue
        if not any(loop.roles[k] is None for k in loop.carried):
            return loop
    return None


class DeltaPass(Pass):
    """Find unrolled time loops whose carried update is the delta rule; replace each by one seqfuse.delta."""

    name = "delta"

    def run(self, ctx: PassContext) -> None:
        graph = ctx.graph
        runs = find_runs(graph)
        if not runs:
            return
        pos = {n: i for i, n in enumerate(graph.nodes)}
        changed = False
        for group in group_loops(runs, pos):
            if changed:
                pos = {n: i for i, n in enumerate(graph.nodes)}
            if any(n not in pos for r in group for n in r.nodes):
                continue
            loop = _reroll(graph, group, pos)
            if loop is None:
                continue   # the loops pass reports loops that do not re-roll
            if len(loop.carried) != 1:
                continue
            k = loop.carried[0]
            if loop.roles[k] is None or not isinstance(val(loop.template[k]), torch.Tensor) \
                    or val(loop.template[k]).dim() < 2:
                continue
            an = Analysis(loop)
            try:
                an.update(k)
                continue       # an elementwise-linear update: the loops pass lifts it
            except NoLoop:
                pass
            if not self._reads_state_through_contraction(loop, an, k):
                continue       # not delta-like (tanh(h), h·h, ...): the loops pass reports it
            rewrite = _ChunkRewrite if _ChunkRewrite.applies(loop) else _Rewrite
            try:
                rewrite(ctx, loop, an, k, pos).run()
                changed = True
            except (NotDelta, NoLoop) as e:
                what = "chunked form not lifted: " if rewrite is _ChunkRewrite else ""
                ctx.report.add_near_miss("delta", what + str(e), loop.template[k])
        if changed:
            graph.eliminate_dead_code()
            ctx.gm.recompile()

    @staticmethod
    def _reads_state_through_contraction(loop, an, k) -> bool:
        """A delta-like loop: the carried update itself reads the state through an einsum (a contraction
        over the key), as every spelling of the delta rule does."""
        cone, stack = set(), [k]
        while stack:
            j = stack.pop()
            if j in cone or loop.roles[j] is None:
                continue
            cone.add(j)
            for r in leaves(loop.roles[j]):
                if r[0] == "L" and an.deps[r[1]]:
                    stack.append(r[1])
        return any(is_op(loop.template[j], aten.einsum, aten.matmul, aten.bmm, aten.mm) for j in cone)


class _Rewrite:
    """Prove the delta form of one loop and replace it (nothing is touched before every check passed)."""

    def __init__(self, ctx, loop: Loop, an: Analysis, k: int, pos):
        self.ctx, self.loop, self.an, self.k, self.pos = ctx, loop, an, k, pos
        self.graph = ctx.graph

    # 1. checks ----------------------------------------------------------------------
    def run(self):
        loop, k = self.loop, self.k
        form = self.form = _Form(self.ctx, loop, self.an, k)
        lin = form.lin(("L", k))
        plan = self._plan(form, lin)
        body = loop.body()
        self.body = set(body)
        last = max(body, key=self.pos.__getitem__)
        self.first = min(self.pos[n] for n in body)
        self.last = self.pos[last]
        self.anchor = last.next
        writes = self._buffer_writes(plan)
        uses = self._outside_uses(plan)
        self._only_update_reads_state(plan, writes)
        # 2. the rewrite
        vec = self.vec = Vectorizer(self.graph, loop, self.anchor, self.an.deps)
        final = self._emit(vec, plan)
        vec.replace_outside_uses(uses, writes, {self.k: final}, invariant_writes=False)
        for n in sorted(body, key=self.pos.__getitem__, reverse=True):
            if not n.users:
                self.graph.erase_node(n)

    def _plan(self, form: _Form, lin: LinVal) -> _Plan:
        r = form.r
        if lin.axes != tuple(range(r)):
            raise NotDelta("the new state is laid on other axes than the previous one")
        if form.kax is None:
            raise NotDelta("the update never contracts the state with a key")
        kax = form.kax
        vax = 2 * r - 3 - kax
        decay = [t for t in lin.terms if t.atom == "S"]
        corr = [t for t in lin.terms if isinstance(t.atom, tuple)]
        inp = [t for t in lin.terms if t.atom is None]
        if len(decay) != 1:
            raise NotDelta(f"the new state holds the previous state in {len(decay)} terms (the delta rule: one decay)")
        if len(corr) != 1:
            raise NotDelta(f"the update has {len(corr)} terms read through a contraction with a key "
                           "(the delta rule: one rank-1 correction)")
        if len(inp) != 1:
            raise NotDelta(f"the update has {len(inp)} input terms (the delta rule: one outer product k ⊗ βv)")
        (dec,), (cor,), (inn,) = decay, corr, inp
        gate = list(dec.factors)
        if any(vax in f.support for f in gate):
            raise NotDelta("the state's decay varies along the value axis (the delta rule decays rows of the key axis)")
        gate_k = [f for f in gate if kax in f.support]
        gate_o = [f for f in gate if kax not in f.support]
        inner = list(cor.atom[1])
        rest = _minus(inner, gate_k)
        if rest is None:
            raise NotDelta("the correction reads the state before or without its decay (the delta rule reads α ⊙ S)")
        kc = rest
        if any(vax in f.support for f in kc):
            raise NotDelta("the key the correction reads the state with spans the value axis")
        cor_k = [f for f in cor.factors if kax in f.support]
        cor_o = [f for f in cor.factors if kax not in f.support]
        if _bag(cor_k) != _bag(kc):
            raise NotDelta("the correction's outer product writes another key than the one it reads the state with")
        beta = _minus(cor_o, gate_o)
        if beta is None:
            raise NotDelta("the correction is not decayed like the state (it reads S before the decay)")
        if any(vax in f.support for f in beta):
            raise NotDelta("the correction's write strength β varies along the value axis")
        inp_k = [f for f in inn.factors if kax in f.support]
        inp_o = [f for f in inn.factors if kax not in f.support]
        if _bag(inp_k) != _bag(kc):
            raise NotDelta("the input's outer product writes another key than the correction")
        vfs = _minus(inp_o, beta)
        if vfs is None or not math.isclose(inn.num * dec.num, -cor.num, rel_tol=1e-9):
            raise NotDelta("the input and the correction have different write strengths β "
                           "(the delta rule writes β(v − Sᵀk))")
        if not any(vax in f.support for f in vfs):
            raise NotDelta("the input of the update does not vary along the value axis")
        if dec.num <= 0:
            raise NotDelta("the state's decay has a non-positive constant factor")
        gate_kind = "none" if not gate and dec.num == 1 else ("vector" if gate_k else "scalar")
        for f in gate:
            if self._log_role(f) is None:
                raise NotDelta("the state's decay is not exp(·), sigmoid(·) or a positive constant")
        ro = self._readout(form, kax)
        return _Plan(kax, vax, kc, vfs, 1.0, beta, inn.num, gate, dec.num, gate_kind, *ro)

    def _readout(self, form: _Form, kax):
        """(template index, q factors, q number) of the einsum reading the new state out with a constant q
        over the key axis."""
        loop, an, k = self.loop, self.an, self.k
        found = []
        for j, node in enumerate(loop.template):
            if loop.roles[j] is None or not is_op(node, aten.einsum) or j in form.used or j == k:
                continue
            if not an.deps[j]:
                continue
            ops = loop.roles[j][0][2][1]
            eq = node.args[0].replace(" ", "")
            if ops[0] != "T" or len(ops[2]) != 2 or "." in eq or "->" not in eq:
                continue
            ins, out = eq.split("->")
            ins = ins.split(",")
            for i in (0, 1):
                if self._state_operand(ops[2][i]) and an.const(ops[2][1 - i]):
                    found.append((j, i, ins, out, ops[2][1 - i]))
        if len(found) != 1:
            raise NotDelta("the loop does not read the new state out once with an einsum over the key "
                           f"({len(found)} readouts)")
        j, i, ins, out, crole = found[0]
        ls, lc = ins[i], ins[1 - i]
        if len(ls) != form.r or len(set(ls)) != len(ls):
            raise NotDelta("the readout's einsum does not read the whole state")
        node = loop.template[j]
        qv = val(node.args[1][1 - i])
        qsize = dict(zip(lc, qv.shape))
        extra = [c for c in lc if c not in ls]
        if ls[kax] in out or any(c not in ls and c not in lc for c in out) \
                or any(not known_eq(qsize[c], 1) for c in extra):
            raise NotDelta("the readout does not contract the state with q over the key axis")
        keep = [c for c in ls if c != ls[kax]]
        if [c for c in out if c in ls] != keep:
            raise NotDelta("the readout lays its result out in another order than the state's axes")
        fmap = tuple(None if known_eq(s, 1) else ls.index(c) for c, s in zip(lc, qv.shape))
        num, qfs = form.factors(crole, fmap)
        if not any(kax in f.support for f in qfs):
            raise NotDelta("the readout sums the state over the key axis without a query")
        vax = 2 * form.r - 3 - kax
        if any(vax in f.support for f in qfs):
            raise NotDelta("the query spans the value axis")
        return j, qfs, num

    def _state_operand(self, role) -> bool:
        """Whether a role is the new state itself or an identity copy of it."""
        loop = self.loop
        while role[0] == "L":
            if role[1] == self.k:
                return True
            node = loop.template[role[1]]
            if loop.roles[role[1]] is None or not is_op(node, aten.clone, aten.contiguous, aten.alias) \
                    and not (is_op(node, *CASTS) and val(node).dtype == val(node.args[0]).dtype):
                return False
            role = loop.roles[role[1]][0][2][0]
        return False

    def _log_role(self, f: Factor):
        """("exp" | "sigmoid", role of the exponent, fmap) for a decay factor exp(x) / sigmoid(x), or None."""
        loop = self.loop
        if f.role[0] == "L":
            j = f.role[1]
            node = loop.template[j]
            if loop.roles[j] is None:   # a slice of exp(g) computed before the loop: the same slice of g
                x, d, form, _ = _seed_key(node)
                if not is_op(x, aten.exp, aten.sigmoid) or not isinstance(x.args[0], torch.fx.Node):
                    return None
                if tuple(val(x.args[0]).shape) != tuple(val(x).shape):
                    return None
                return ("exp" if is_op(x, aten.exp) else "sigmoid", ("X", x.args[0], d, form), f.fmap)
            if not is_op(node, aten.exp, aten.sigmoid) or tuple(val(node.args[0]).shape) != tuple(val(node).shape):
                return None
            return ("exp" if is_op(node, aten.exp) else "sigmoid", loop.roles[j][0][2][0], f.fmap)
        node = f.role[1]
        if not is_op(node, aten.exp, aten.sigmoid) or not isinstance(node.args[0], torch.fx.Node) \
                or tuple(val(node.args[0]).shape) != tuple(val(node).shape):
            return None
        return ("exp" if is_op(node, aten.exp) else "sigmoid", ("I", node.args[0]), f.fmap)

    def _buffer_writes(self, plan):
        """Template copy_ entries writing each step's readout into a slice of one buffer: [(j, seed, src role)]."""
        loop, writes = self.loop, []
        written = set()
        for j, node in enumerate(loop.template):
            t = node.target
            if not (isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable):
                continue
            args = loop.roles[j][0][2] if loop.roles[j] else ()
            if not (node.target is aten.copy_.default and args[0][0] == "L" and loop.roles[args[0][1]] is None):
                raise NoLoop(f"the loop body mutates a tensor with {t} (only per-step buffer writes are re-rolled)")
            if any(loop.inst[s][j].users for s in loop.steps):
                raise NoLoop("the result of a per-step buffer write is read")
            writes.append((j, args[0][1], args[1]))
            written.add(args[0][1])
        for j, roles in enumerate(loop.roles):
            if roles is None:
                continue
            for w, r in enumerate(roles[0][2]):
                if r[0] == "L" and r[1] in written and not (loop.template[j].target is aten.copy_.default and w == 0):
                    raise NoLoop("the loop reads the buffer it writes its outputs into")
        for _, s, _ in writes:
            buf = loop.template[s].args[0]
            for u in buf.users:
                if u not in self.body and self.first < self.pos[u] < self.last:
                    raise NoLoop("the output buffer is used inside the loop by code outside the loop body")
        return writes

    def _outside_uses(self, plan):
        loop, uses = self.loop, {}
        for s in loop.steps:
            for j, n in enumerate(loop.inst[s]):
                outs = [u for u in n.users if u not in self.body]
                if not outs:
                    continue
                if any(self.pos[u] <= self.last for u in outs):
                    raise NoLoop("a value of the loop body is used inside the loop by code outside the body")
                if self.an.deps[j] and j != plan.readout and not (j == self.k and s == loop.hi):
                    raise NotDelta("a value computed from the state inside the loop is used after it")
                uses[(s, j)] = outs
        return uses

    def _only_update_reads_state(self, plan, writes):
        """Every state-dependent entry of the body is part of the proven update, the readout (and the
        copies on its way), or a buffer write of the readout."""
        loop, an = self.loop, self.an
        allowed = set(self.form.used) | {self.k, plan.readout} | {j for j, _, _ in writes}
        role = loop.roles[plan.readout][0][2][1]
        for r in role[2]:
            while r[0] == "L" and r[1] != self.k and loop.roles[r[1]] is not None:
                allowed.add(r[1])
                r = loop.roles[r[1]][0][2][0]
        for j, _, src in writes:
            if an.deps[j] and src != ("L", plan.readout):
                raise NotDelta("the loop writes a value computed from the state that is not its readout")
        for j in range(len(loop.template)):
            if an.deps[j] and j not in allowed:
                raise NotDelta(f"the loop computes {_name(loop.template[j])} of the state besides the update "
                               "and its readout")

    # 2. emission --------------------------------------------------------------------
    def _frame(self, vec, factors, num, like_dtype):
        """Π factors · num laid on the frame: (T'|1, *frame sizes or 1)."""
        r = self.form.r
        acc = None
        for f in factors:
            x, is_vec = vec.role(f.role)
            x = self._to_frame(vec, x, is_vec, f.fmap)
            if f.power < 0:
                x = vec.emit(aten.reciprocal.default, (x,))
            elif f.power != 1:
                x = vec.emit(aten.pow.Tensor_Scalar, (x, f.power))
            acc = x if acc is None else vec.emit(aten.mul.Tensor, (acc, x))
        if acc is None:
            return vec.emit(aten.full.default, ([1] * (r + 1), float(num)),
                            {"dtype": like_dtype, "device": val(self.loop.template[self.k]).device})
        return acc if num == 1 else vec.emit(aten.mul.Tensor, (acc, num))

    def _to_frame(self, vec, x, is_vec, fmap):
        """A factor's value (vectorized (T', ...) or invariant) with its axes on the frame (T'|1, r axes)."""
        r = self.form.r
        off = 1 if is_vec else 0
        unit = [i + off for i, a in enumerate(fmap) if a is None]
        if unit:
            x = vec.emit(aten.squeeze.dims, (x, unit))
        present = [a for a in fmap if a is not None]
        order = sorted(range(len(present)), key=present.__getitem__)
        if order != list(range(len(present))):
            x = vec.emit(aten.permute.default, (x, list(range(off)) + [o + off for o in order]))
        present = sorted(present)
        if not is_vec:
            x = vec.emit(aten.unsqueeze.default, (x, 0))
        for a in range(r):
            if a not in present:
                x = vec.emit(aten.unsqueeze.default, (x, a + 1))
        return x

    def _layout(self, vec, x, tail):
        """(T'|1, *batch', *tail') -> (B, T', H, *tail) as the op takes it."""
        batch = list(self.form.shape[:-2])
        shape = [vec.count, *batch, *tail]
        if not same_shape(val(x).shape, shape):
            if not broadcasts_to(val(x).shape, shape):
                raise NoLoop("an operand of the delta op does not provably broadcast to the state's layout")
            x = vec.emit(aten.expand.default, (x, shape))
        nb = len(batch)
        if nb == 0:
            x = vec.emit(aten.unsqueeze.default, (vec.emit(aten.unsqueeze.default, (x, 1)), 1))
        elif nb == 1:
            x = vec.emit(aten.unsqueeze.default, (x, 2))
        elif nb > 2:
            lead = math.prod(batch[:-1])
            lead = lead if isinstance(lead, int) else -1
            x = vec.emit(aten.reshape.default, (x, [vec.count, lead, batch[-1], *tail]))
        return vec.emit(aten.movedim.int, (x, 0, 1))

    def _emit(self, vec, plan: _Plan):
        loop, form = self.loop, self.form
        tmpl = loop.template[self.k]
        D = val(tmpl).dtype
        r = form.r
        kax, vax = plan.kax, plan.vax
        K, V = form.shape[kax], form.shape[vax]
        sel = lambda x, ax: vec.emit(aten.select.int, (x, ax + 1, 0))  # noqa: E731
        # the frame's (K, V) axes -> drop the one the operand does not span
        kv = vec.cast(sel(self._frame(vec, plan.k, 1.0, D), vax), D)              # (T', *batch', K)
        qv = vec.cast(sel(self._frame(vec, plan.q, plan.q_num, D), vax), D)
        vv = vec.cast(sel(self._frame(vec, plan.v, plan.v_num, D), kax), D)       # (T', *batch', V)
        bv = self._frame(vec, plan.beta, plan.beta_num, D)
        bv = vec.cast(sel(sel(bv, r - 1), r - 2), D)                               # (T', *batch')
        kv, qv, vv = self._layout(vec, kv, [K]), self._layout(vec, qv, [K]), self._layout(vec, vv, [V])
        bv = self._layout(vec, bv, [])
        g = None
        if plan.gate_kind != "none":
            total = None
            for f in plan.gate:
                kind, role, fmap = self._log_role(f)
                x, is_vec = vec.role(role)
                x = self._to_frame(vec, x, is_vec, fmap)
                if kind == "sigmoid":
                    x = vec.emit(aten.log_sigmoid.default, (x,))
                if f.power != 1:
                    x = vec.emit(aten.mul.Tensor, (x, f.power))
                total = x if total is None else vec.emit(aten.add.Tensor, (total, x))
            if plan.gate_num != 1:
                lg = math.log(plan.gate_num)
                total = vec.emit(aten.full.default, ([1] * (r + 1), lg), {"dtype": D, "device": val(tmpl).device}) \
                    if total is None else vec.emit(aten.add.Tensor, (total, lg))
            total = vec.cast(sel(total, vax), D)                                   # (T', *batch', K|1)
            if plan.gate_kind == "scalar":
                g = self._layout(vec, vec.emit(aten.select.int, (total, -1, 0)), [])
            else:
                g = self._layout(vec, total, [K])
        h0 = None
        init = loop.init.get(self.k)
        if not _is_zero(init):
            if not isinstance(init, torch.fx.Node):
                h0 = vec.emit(aten.full.default, (list(form.shape), init), {"dtype": D, "device": val(tmpl).device})
            else:
                h0 = init
                if not same_shape(val(h0).shape, form.shape):
                    if not broadcasts_to(val(h0).shape, form.shape):
                        raise NoLoop("the initial state does not provably broadcast to the state's shape")
                    h0 = vec.emit(aten.expand.default, (h0, list(form.shape)))
                h0 = vec.cast(h0, D)
            if kax == r - 1:
                h0 = vec.emit(aten.transpose.int, (h0, -1, -2))
            lead = val(kv).shape[0]
            lead = lead if isinstance(lead, int) else -1
            h0 = vec.emit(aten.reshape.default, (h0, [lead, val(kv).shape[2], K, V]))
        if loop.reverse:   # the op runs forward: flip time in and out
            kv, qv, vv, bv = (vec.emit(aten.flip.default, (t, [1])) for t in (kv, qv, vv, bv))
            g = vec.emit(aten.flip.default, (g, [1])) if g is not None else None
        op = Delta(q=qv, k=kv, v=vv, beta=bv, g=g, h0=h0, gate=plan.gate_kind)
        fake = torch.ops.seqfuse.delta.default(val(qv), val(kv), val(vv), val(bv), val(g) if g is not None else None,
                                               val(h0) if h0 is not None else None, plan.gate_kind, 1.0, 64,
                                               "recurrent", "auto")
        ir = self.ctx.insert_ir(op, self.anchor, loop.inst[loop.hi][self.k])
        ir.meta["val"] = fake
        y = vec.emit(operator.getitem, (ir, 0))                                    # (B, T', H, V)
        if loop.reverse:
            y = vec.emit(aten.flip.default, (y, [1]))
        y = vec.emit(aten.movedim.int, (y, 1, 0))
        ro = loop.template[plan.readout]
        vec.memo[plan.readout] = vec.cast(vec.emit(aten.reshape.default, (y, [vec.count, *val(ro).shape])),
                                          val(ro).dtype)
        h = vec.emit(operator.getitem, (ir, 1))                                    # (B, H, K, V)
        h = vec.emit(aten.reshape.default, (h, [*form.shape[:-2], K, V]))
        if kax == r - 1:
            h = vec.emit(aten.transpose.int, (h, -1, -2))
        return vec.cast(h, D)


# --- the chunked WY form over the chunks --------------------------------------------------

def _solve(node):
    """Whether ``node`` is linalg_solve_triangular(A, B, upper=False, left=True, unitriangular=True)."""
    if node is None or not is_op(node, aten.linalg_solve_triangular):
        return False
    a = dict(zip(("A", "B", "upper", "left", "unitriangular"), node.args))
    a.update(node.kwargs)
    return a.get("upper") is False and a.get("left", True) is True and a.get("unitriangular", False) is True


def _strip(node):
    """(base, axes) through pure axis moves (unsqueeze, expand, transpose, identity copies)."""
    return axis_view(node)


def _unsq_last(node, base_rank_plus=1):
    """x when ``node`` is x with one trailing unit axis (x[..., None]), else None."""
    base, axes = _strip(node)
    r = val(node).dim()
    if isinstance(base, torch.fx.Node) and val(base).dim() == r - 1 and axes == list(range(r - 1)) + [None]:
        return base
    return None


def _mul_pair(node):
    """The two operands of an elementwise aten.mul.Tensor, or None."""
    if node is None or node.target is not aten.mul.Tensor or len(node.args) != 2 or node.kwargs:
        return None
    if not all(isinstance(a, torch.fx.Node) for a in node.args):
        return None
    return node.args


class _ChunkRewrite(_Rewrite):
    """transformers' torch_chunk_gated_delta_rule (Qwen3-Next): the WY / UT form, one loop over chunks of C
    steps carrying the state S (B, H, K, V), with per-chunk tensors laid (B, H, N, C, ·)::

        γ   = cumsum(g_c, -1)                                   (per chunk)
        L   = exp(where(j <= i, γ_i − γ_j, −inf))
        UT  = (kβ_c · k_cᵀ) ⊙ L            NV = solve_unit_lower(UT, vβ_c)   KC = solve_unit_lower(UT, kβ_c ⊙ e^γ)
        IA  = (q_c · k_cᵀ) ⊙ L             Qd = q_c ⊙ e^γ                     Kd = k_c ⊙ e^{γ_C − γ}
        loop:  U = NV_n − KC_n·S,   y_n = Qd_n·S + IA_n·U,   S = e^{γ_C,n}·S + Kd_nᵀ·U

    with kβ_c, vβ_c the chunks of k ⊙ β, v ⊙ β and q_c, k_c those of q, k (reshapes of (B, H, T', ·) tensors).
    That is the delta rule with a scalar gate g over the T' = N·C steps (padding steps included: the
    chunked algorithm is exact for any step), so the loop and its readout become one seqfuse.delta on the
    un-chunked q, k, v, β, g.  Every piece is checked; anything else is a near miss naming the piece."""

    @staticmethod
    def applies(loop) -> bool:
        """A loop over chunks of a WY program: it slices the result of a unit lower-triangular solve."""
        for node, roles in zip(loop.template, loop.roles):
            if roles is None and _solve(_seed_key(node)[0]):
                return True
        return False

    def run(self):
        loop, k = self.loop, self.k
        plan = self._chunk_plan()
        body = loop.body()
        self.body = set(body)
        last = max(body, key=self.pos.__getitem__)
        self.first = min(self.pos[n] for n in body)
        self.last = self.pos[last]
        self.anchor = last.next
        writes = self._buffer_writes(plan)
        uses = self._outside_uses(plan)
        for j in range(len(loop.template)):
            if self.an.deps[j] and j not in plan.allowed and j not in {w for w, _, _ in writes}:
                raise NotDelta(f"the chunk loop computes {_name(loop.template[j])} of the state besides the WY update")
        for j, _, src in writes:
            if self.an.deps[j] and src != ("L", plan.readout):
                raise NotDelta("the chunk loop writes a value computed from the state that is not its readout")
        buffers = [loop.template[seed].args[0] for _, seed, _ in writes]
        tail = self._tail(plan)
        if tail is not None and (len(buffers) != 1 or tail["buf"] is not buffers[0]):
            tail = None
        vec = self.vec = Vectorizer(self.graph, loop, self.anchor, self.an.deps)
        final = self._emit_chunked(vec, plan, extra=1 if tail is not None else 0)
        vec.replace_outside_uses(uses, writes, {self.k: final}, invariant_writes=False)
        if tail is not None:   # the op ran over the last chunk too: its output goes to the buffer's slice
            ys = self._all_chunks
            last = val(ys).shape[2] - 1
            dest = vec.emit(aten.select.int, (tail["buf"], 2, last))
            vec.emit(aten.copy_.default, (dest, vec.emit(aten.select.int, (ys, 2, last))))
            for n in tail["nodes"]:
                self.graph.erase_node(n)
        for n in sorted(body, key=self.pos.__getitem__, reverse=True):
            if not n.users:
                self.graph.erase_node(n)
        for buf in buffers:
            self._detach_buffer(buf)

    def _detach_buffer(self, buf):
        """``zeros_like(NV)`` (the program's output buffer, shaped like the solve's result) as ``zeros(shape)``,
        so the triangular solves and everything before them die with the loop."""
        if not is_op(buf, aten.zeros_like) or not all(isinstance(d, int) for d in val(buf).shape):
            return
        v = val(buf)
        with self.graph.inserting_before(buf):
            z = self.graph.call_function(aten.zeros.default, (list(v.shape),), {"dtype": v.dtype, "device": v.device})
        z.meta.update(buf.meta)
        buf.replace_all_uses_with(z)
        self.graph.erase_node(buf)

    # -- the loop body ---------------------------------------------------------------
    def _t(self, role):
        return self.loop.template[role[1]] if role[0] == "L" else None

    def _args(self, role):
        if role[0] != "L" or self.loop.roles[role[1]] is None:
            return None
        return self.loop.roles[role[1]][0][2]

    def _is_state(self, role) -> bool:
        while role[0] == "L":
            node = self._t(role)
            if not is_op(node, aten.clone, aten.contiguous, aten.alias) or self.loop.roles[role[1]] is None:
                return False
            role = self._args(role)[0]
        return role == ("P", self.k)

    def _seed(self, role, what):
        """(X, chunk axis) of a per-chunk slice X[:, :, n] (a template seed)."""
        if role[0] != "L" or self.loop.roles[role[1]] is not None:
            raise NotDelta(f"{what} is not a slice of a tensor over the chunks")
        x, d, form, _ = _seed_key(self._t(role))
        if form != "select":
            raise NotDelta(f"{what} is not a slice of a tensor over the chunks")
        return x, d

    def _matmul(self, role, what):
        """(A role, B role) of an einsum that is the batched matrix product A·B over the last two axes."""
        node = self._t(role)
        args = self._args(role)
        if node is None or not is_op(node, aten.einsum) or args is None or args[1][0] != "T" or len(args[1][2]) != 2:
            raise NotDelta(f"{what} is not a matrix product")
        eq = node.args[0].replace(" ", "")
        ins, out = eq.split("->")
        la, lb = ins.split(",")
        if not (len(la) == len(lb) == len(out) >= 2 and la[:-2] == lb[:-2] == out[:-2] and la[-1] == lb[-2]
                and out[-2:] == la[-2] + lb[-1] and len(set(la[-2:] + lb[-1])) == 3):
            raise NotDelta(f"{what} is not a matrix product over the last two axes ({eq})")
        return args[1][2][0], args[1][2][1]

    def _matmul_t(self, role, what):
        """(A role, B role) of an einsum that is Aᵀ·B over the last two axes (contracting their rows)."""
        node = self._t(role)
        args = self._args(role)
        if node is None or not is_op(node, aten.einsum) or args is None or args[1][0] != "T" or len(args[1][2]) != 2:
            raise NotDelta(f"{what} is not a matrix product")
        eq = node.args[0].replace(" ", "")
        ins, out = eq.split("->")
        la, lb = ins.split(",")
        if not (len(la) == len(lb) == len(out) >= 2 and la[:-2] == lb[:-2] == out[:-2] and la[-2] == lb[-2]
                and out[-2:] == la[-1] + lb[-1] and len(set(la[-2:] + lb[-1])) == 3):
            raise NotDelta(f"{what} is not a transposed matrix product Aᵀ·B ({eq})")
        return args[1][2][0], args[1][2][1]

    def _chunk_plan(self):
        loop, k = self.loop, self.k
        S = val(loop.template[k])
        if S.dim() != 4 or loop.reverse:
            raise NotDelta("the chunk loop's state is not (B, H, K, V) or the loop runs backwards")
        used = set()
        # S' = S·cd_n + Kd_nᵀ·U
        new = self._args(("L", k))
        if not is_op(loop.template[k], aten.add) or new is None or len(new) != 2 or loop.template[k].kwargs:
            raise NotDelta("the new state is not the decayed state plus a chunk's write")
        for dec_r, wr_r in ((new[0], new[1]), (new[1], new[0])):
            if is_op(self._t(dec_r), aten.mul):
                break
        else:
            raise NotDelta("the new state is not the decayed state plus a chunk's write")
        used |= {k, dec_r[1], wr_r[1]}
        m = self._args(dec_r)
        st = [i for i in (0, 1) if self._is_state(m[i])]
        if len(st) != 1:
            raise NotDelta("the chunk's decay does not multiply the state")
        cd_x, zd = self._seed(m[1 - st[0]], "the chunk's decay")
        kd_r, u_r = self._matmul_t(wr_r, "the chunk's write")
        kd_x, d2 = self._seed(kd_r, "the chunk's write key")
        # U = NV_n − KC_n·S
        u = self._t(u_r)
        ua = self._args(u_r)
        if u is None or u.target is not aten.sub.Tensor or u.kwargs or ua is None:
            raise NotDelta("the chunk's corrections are not NV − KC·S")
        used.add(u_r[1])
        nv_x, d3 = self._seed(ua[0], "the chunk's corrections")
        kc_r, s_r = self._matmul(ua[1], "the chunk's state correction")
        used.add(ua[1][1])
        if not self._is_state(s_r):
            raise NotDelta("the chunk's state correction does not read the state")
        kc_x, d4 = self._seed(kc_r, "the chunk's state correction")
        # the readout y_n = Qd_n·S + IA_n·U (written into a buffer per chunk)
        ro = [j for j, n in enumerate(loop.template) if loop.roles[j] is not None and is_op(n, aten.add)
              and j != k and self.an.deps[j]]
        if len(ro) != 1:
            raise NotDelta("the chunk loop does not read each chunk out once as Qd·S + IA·U")
        ro_j = ro[0]
        ra = self._args(("L", ro_j))
        used.add(ro_j)
        for a_r, b_r in ((ra[0], ra[1]), (ra[1], ra[0])):
            try:
                qd_r, s2 = self._matmul(a_r, "the chunk's read of the state")
                ia_r, u2 = self._matmul(b_r, "the chunk's intra-chunk read")
            except NotDelta:
                continue
            if self._is_state(s2) and u2 == u_r:
                break
        else:
            raise NotDelta("the chunk's output is not Qd·S + IA·U")
        used |= {a_r[1], b_r[1]}
        qd_x, d5 = self._seed(qd_r, "the chunk's query")
        ia_x, d6 = self._seed(ia_r, "the chunk's intra-chunk scores")
        if len({zd, d2, d3, d4, d5, d6}) != 1:
            raise NotDelta("the per-chunk tensors are sliced along different axes")
        allowed = set(used)
        # walk identity copies of the state the products read
        for j, n in enumerate(loop.template):
            if self.an.deps[j] and loop.roles[j] is not None and is_op(n, aten.clone, aten.contiguous, aten.alias) \
                    and self._is_state(("L", j)):
                allowed.add(j)
        x = dict(cd=cd_x, kd=kd_x, nv=nv_x, kc=kc_x, qd=qd_x, ia=ia_x)
        plan = self._prove_constants(x, zd, allowed, ro_j)
        plan.x, plan.entries = x, dict(e1=ua[1][1], u=u_r[1], e2=a_r[1], e3=b_r[1], y=ro_j)
        return plan

    def _tail(self, plan):
        """The nodes of a last chunk left out of the loop because its state update is dead (a program that
        does not return the final state): U = NV_N−1 − KC_N−1·S, y = Qd_N−1·S + IA_N−1·U written into the
        buffer slice N−1, read from the loop's final state S and nothing else.  None when there is no such
        chunk or it differs from the loop's body in any way (it then stays as written, reading the op's
        final state)."""
        loop, t = self.loop, self.loop.template
        S = loop.inst[loop.hi][self.k]
        n_chunks = val(plan.x["nv"]).shape[2]
        last = loop.hi + 1
        if not isinstance(n_chunks, int) or last != n_chunks - 1 or loop.reverse:
            return None
        outside = [u for u in S.users if u not in self.body]
        if len(outside) != 2:
            return None

        def seed(node, name):
            return node.target is aten.select.int and node.args[0] is plan.x[name] and node.args[1] == 2 \
                and node.args[2] in (last, -1)

        def same(node, j, a, b):
            return is_op(node, aten.einsum) and node.args[0] == t[j].args[0] and list(node.args[1]) == [a, b]

        e1 = next((u for u in outside if is_op(u, aten.einsum) and seed(u.args[1][0], "kc")), None)
        e2 = next((u for u in outside if is_op(u, aten.einsum) and seed(u.args[1][0], "qd")), None)
        e = plan.entries
        if e1 is None or e2 is None or not same(e1, e["e1"], e1.args[1][0], S) or \
                not same(e2, e["e2"], e2.args[1][0], S) or len(e1.users) != 1 or len(e2.users) != 1:
            return None
        u = next(iter(e1.users))
        if u.target is not aten.sub.Tensor or u.kwargs or u.args[1] is not e1 or not seed(u.args[0], "nv") \
                or len(u.users) != 1:
            return None
        e3 = next(iter(u.users))
        if not is_op(e3, aten.einsum) or not seed(e3.args[1][0], "ia") or not same(e3, e["e3"], e3.args[1][0], u) \
                or len(e3.users) != 1:
            return None
        y = next(iter(e2.users))
        if y is not next(iter(e3.users)) or not is_op(y, aten.add) or y.kwargs or set(y.args) != {e2, e3} \
                or len(y.users) != 1 or val(y).dtype != val(t[e["y"]]).dtype:
            return None
        copy = next(iter(y.users))
        if copy.target is not aten.copy_.default or copy.args[1] is not y or copy.users:
            return None
        dest = copy.args[0]
        if dest.target is not aten.select.int or dest.args[1] != 2 or dest.args[2] not in (last, -1) \
                or len(dest.users) != 1:
            return None
        return dict(buf=dest.args[0], nodes=[copy, dest, y, e3, u, e2, e1])

    # -- the per-chunk tensors --------------------------------------------------------
    def _prove_constants(self, x, zd, allowed, ro_j):
        if zd != 2:
            raise NotDelta("the chunk axis is not axis 2 of (B, H, N, C, ·) tensors")
        for name in ("kd", "nv", "kc", "qd", "ia"):
            if val(x[name]).dim() != 5:
                raise NotDelta(f"the per-chunk tensor {name} is not (B, H, N, C, ·)")
        # NV = solve(UT, vβ_c), KC = solve(UT, kβ_c ⊙ e^γ) with one UT
        if not _solve(x["nv"]) or not _solve(x["kc"]):
            raise NotDelta("the chunk's corrections are not unit lower-triangular solves")
        ut, vb_c = x["nv"].args[0], x["nv"].args[1]
        if x["kc"].args[0] is not ut:
            raise NotDelta("the two triangular solves have different systems")
        # UT = (kβ_c·k_cᵀ) ⊙ L,  IA = (q_c·k_cᵀ) ⊙ L
        kb_c, k_c, L = self._scores(ut, "the UT system")
        q_c, k_c2, L2 = self._scores(x["ia"], "the intra-chunk scores")
        if k_c2 is not k_c or L2 is not L:
            raise NotDelta("the intra-chunk scores use another key or decay mask than the UT system")
        cum = self._pairwise(L)
        # KC's right side: kβ_c ⊙ e^γ ; Qd = q_c ⊙ e^γ ; Kd = k_c ⊙ e^{γ_C − γ}
        if self._times_exp(x["kc"].args[1], kb_c, cum, "cum") is None:
            raise NotDelta("the decayed keys of the UT transform are not kβ ⊙ exp(cumsum g)")
        if self._times_exp(x["qd"], q_c, cum, "cum") is None:
            raise NotDelta("the chunk's query is not q ⊙ exp(cumsum g)")
        if self._times_exp(x["kd"], k_c, cum, "rest") is None:
            raise NotDelta("the chunk's write key is not k ⊙ exp(γ_last − cumsum g)")
        if not self._chunk_decay(x["cd"], cum):
            raise NotDelta("the chunk's decay is not exp(γ_last)")
        # un-chunk: q_c, k_c = chunks of q, k; kβ_c, vβ_c = chunks of k ⊙ β, v ⊙ β; γ = cumsum of chunks of g
        q = self._unchunk(q_c, "q")
        kk = self._unchunk(k_c, "k")
        g = self._unchunk(cum.args[0], "g")
        kb, vb = self._unchunk(kb_c, "kβ"), self._unchunk(vb_c, "vβ")
        k2, beta = self._times_beta(kb)
        v, beta2 = self._times_beta(vb)
        if k2 is not kk or beta2 is not beta or beta is None:
            raise NotDelta("kβ and vβ are not the key and the values times one β")
        C = val(q_c).shape[3]
        for t, name in ((q, "q"), (kk, "k"), (v, "v")):
            if val(t).dim() != 4:
                raise NotDelta(f"{name} is not (B, H, T, ·) before chunking")
        if val(beta).dim() != 3 or val(g).dim() != 3:
            raise NotDelta("β or g is not (B, H, T) before chunking")
        lead = val(kk).shape[:3]
        if not all(same_shape(val(t).shape[:3], lead) for t in (q, v, beta, g)) or \
                not same_shape(val(q).shape, val(kk).shape):
            raise NotDelta("q, k, v, β, g are not laid over one (B, H, T) before chunking")
        return SimpleNamespace(q=q, k=kk, v=v, beta=beta, g=g, C=C, allowed=allowed, readout=ro_j)

    def _scores(self, node, what):
        """(A, B, L) of (A·Bᵀ over the last axis) ⊙ L."""
        pair = _mul_pair(node)
        if pair is None:
            raise NotDelta(f"{what} is not a product of scores and a decay mask")
        for e, L in (pair, pair[::-1]):
            if is_op(e, aten.einsum) and len(e.args[1]) == 2:
                eq = e.args[0].replace(" ", "")
                ins, out = eq.split("->")
                la, lb = ins.split(",")
                if len(la) == len(lb) == len(out) == 5 and la[:3] == lb[:3] == out[:3] and la[4] == lb[4] \
                        and out[3:] == la[3] + lb[3] and len({la[3], lb[3], la[4]}) == 3:
                    return e.args[1][0], e.args[1][1], L
        raise NotDelta(f"{what} is not (A·Bᵀ) ⊙ L over the chunk positions")

    def _pairwise(self, L):
        """cum when L = exp(where(j <= i, cum_i − cum_j, −inf)) along the last axis of cum (B, H, N, C)."""
        if not is_op(L, aten.exp) or L.args[0].target is not aten.where.ScalarOther:
            raise NotDelta("the decay mask is not exp of a masked difference of cumulative decays")
        keep, diff, fill = L.args[0].args
        if fill != -math.inf:
            raise NotDelta("the decay mask fills with another value than -inf")
        if diff.target is not aten.sub.Tensor or diff.kwargs:
            raise NotDelta("the decay mask is not a difference γ_i − γ_j")
        a, b = diff.args
        ba, axa = _strip(a)
        bb, axb = _strip(b)
        if ba is not bb or not is_op(ba, aten.cumsum) or val(ba).dim() != 4:
            raise NotDelta("the decay mask is not a difference of one cumulative sum")
        if axa != [0, 1, 2, 3, None] or axb != [0, 1, 2, None, 3]:
            raise NotDelta("the decay mask's difference is not γ_i − γ_j (rows minus columns)")
        if ba.args[1] % 4 != 3 or len(ba.args) > 2 or ba.kwargs:
            raise NotDelta("the cumulative decay is not a sum over the chunk positions")
        from seqfuse.passes.pattern import evaluate_shape_only, is_shape_only
        C = val(ba).shape[3]
        if not isinstance(keep, torch.fx.Node) or not is_shape_only(keep) or not isinstance(C, int):
            raise NotDelta("the decay mask's causal mask is not a constant")
        try:
            m = evaluate_shape_only(self.ctx.gm, keep)
        except Exception:
            raise NotDelta("the decay mask's causal mask could not be evaluated") from None
        want = torch.ones(C, C, dtype=torch.bool).tril()
        if m.dtype != torch.bool or tuple(m.shape[-2:]) != (C, C) or not bool((m.reshape(-1, C, C) == want).all()):
            raise NotDelta("the decay mask keeps other positions than j <= i")
        return ba

    def _times_exp(self, node, x, cum, kind):
        """Whether node = x ⊙ exp(e)[..., None] with e = cum ("cum") or cum[..., -1:] − cum ("rest")."""
        pair = _mul_pair(node)
        if pair is None:
            return None
        for a, b in (pair, pair[::-1]):
            if a is not x:
                continue
            e = _unsq_last(b)
            if e is None or not is_op(e, aten.exp) or tuple(val(e).shape) != tuple(val(cum).shape):
                continue
            arg0 = e.args[0]
            if kind == "cum" and arg0 is cum:
                return True
            if kind == "rest" and arg0.target is aten.sub.Tensor and not arg0.kwargs and arg0.args[1] is cum \
                    and self._last(arg0.args[0], cum, keep=True):
                return True
        return None

    def _last(self, node, cum, keep):
        """node = cum[..., -1:] (keep) or cum[..., -1] (select)."""
        if keep and is_op(node, aten.slice) and node.args[0] is cum:
            a = list(node.args) + [None] * (5 - len(node.args))
            d, start, end, step = a[1] % 4, a[2], a[3], a[4] if a[4] is not None else 1
            C = val(cum).shape[3]
            return d == 3 and step == 1 and start in (-1, C - 1) and (end is None or end >= C)
        if not keep and node.target is aten.select.int and node.args[0] is cum:
            return node.args[1] % 4 == 3 and node.args[2] in (-1, val(cum).shape[3] - 1)
        return False

    def _chunk_decay(self, cd, cum) -> bool:
        """cd = exp(cum[..., -1]) laid (B, H, N, 1, 1)."""
        base, axes = _strip(cd)
        return is_op(base, aten.exp) and axes == [0, 1, 2, None, None] and self._last(base.args[0], cum, keep=False)

    def _unchunk(self, node, what):
        """x when ``node`` is x (B, H, T', ·) reshaped to (B, H, N, C, ·) (or (B, H, T') to (B, H, N, C))."""
        if not is_op(node, aten.reshape, aten.view, aten._unsafe_view):
            raise NotDelta(f"the chunks of {what} are not a reshape of a sequence")
        src = node.args[0]
        s, o = val(src).shape, val(node).shape
        if len(o) != len(s) + 1 or not all(known_eq(a, b) for a, b in zip(s[:2], o[:2])) \
                or not known_eq(s[2], o[2] * o[3]) or not all(known_eq(a, b) for a, b in zip(s[3:], o[4:])):
            raise NotDelta(f"the chunks of {what} are not its time axis split into (N, C)")
        return src

    def _times_beta(self, node):
        """(x, β) for node = x ⊙ β[..., None] (x (B, H, T, ·), β (B, H, T)), else (None, None)."""
        pair = _mul_pair(node)
        if pair is None:
            return None, None
        for a, b in (pair, pair[::-1]):
            beta = _unsq_last(b)
            if beta is not None and val(beta).dim() == 3 and val(a).dim() == 4:
                return a, beta
        return None, None

    # -- emission --------------------------------------------------------------------
    def _emit_chunked(self, vec, plan, extra=0):
        loop = self.loop
        tmpl = loop.template[self.k]
        D = val(tmpl).dtype
        # the loop covers chunks 0 … count-1 (a program that does not return the final state leaves the
        # last chunk's state update dead: that chunk stays as written and reads the op's final state)
        if loop.lo != 0 or vec.start != 0:
            raise NotDelta("the chunk loop does not start at the first chunk")
        steps = (vec.count + extra) * plan.C
        whole = known_eq(steps, val(plan.k).shape[2])
        if not whole and not (isinstance(steps, int) and isinstance(val(plan.k).shape[2], int)):
            raise NotDelta("the chunk loop covers a symbolic part of the chunks")
        ops = {}
        for name in ("q", "k", "v", "beta", "g"):
            x = getattr(plan, name)
            if not whole:
                x = vec.emit(aten.slice.Tensor, (x, 2, 0, steps))
            ops[name] = vec.cast(vec.emit(aten.transpose.int, (x, 1, 2)), D)          # (B, T', H, ·)
        h0 = None
        init = loop.init.get(self.k)
        if not _is_zero(init):
            if not isinstance(init, torch.fx.Node) or not same_shape(val(init).shape, val(tmpl).shape):
                raise NotDelta("the initial state is not a (B, H, K, V) tensor")
            h0 = vec.cast(init, D)
        op = Delta(q=ops["q"], k=ops["k"], v=ops["v"], beta=ops["beta"], g=ops["g"], h0=h0, gate="scalar")
        fake = torch.ops.seqfuse.delta.default(*(val(ops[n]) for n in ("q", "k", "v", "beta", "g")),
                                               val(h0) if h0 is not None else None, "scalar", 1.0, 64,
                                               "recurrent", "auto")
        ir = self.ctx.insert_ir(op, self.anchor, loop.inst[loop.hi][self.k])
        ir.meta["val"] = fake
        y = vec.emit(operator.getitem, (ir, 0))                                  # (B, T', H, V)
        y = vec.emit(aten.transpose.int, (y, 1, 2))                              # (B, H, T', V)
        B, H, Tp, V = val(y).shape
        y = vec.emit(aten.reshape.default, (y, [B, H, vec.count + extra, plan.C, V]))   # (B, H, N, C, V)
        ro = loop.template[plan.readout]
        y = self._all_chunks = vec.cast(y, val(ro).dtype)
        if extra:
            y = vec.emit(aten.slice.Tensor, (y, 2, 0, vec.count))
        vec.memo[plan.readout] = vec.emit(aten.movedim.int, (y, 2, 0))
        return vec.cast(vec.emit(operator.getitem, (ir, 1)), D)


def _one_step(node):
    """For one view node: the source axis each result axis reads (None: a new unit axis), or None when the
    view is not a pure move / insertion / removal of unit axes."""
    src = val(node.args[0])
    r = src.dim()
    if is_op(node, aten.transpose):
        perm = list(range(r))
        d0, d1 = node.args[1] % r, node.args[2] % r
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return perm
    if is_op(node, aten.permute):
        return [d % r for d in node.args[1]]
    if node.target is aten.movedim.int:
        perm = [d for d in range(r) if d != node.args[1] % r]
        perm.insert(node.args[2] % r, node.args[1] % r)
        return perm
    if is_op(node, aten.squeeze, aten.view, aten.reshape, aten._unsafe_view):
        out = val(node).shape
        res, i = [], 0
        for d in out:
            while i < r and known_eq(src.shape[i], 1) and not known_eq(d, 1):
                i += 1
            if i < r and known_eq(src.shape[i], d):
                res.append(i)
                i += 1
            elif known_eq(d, 1):
                res.append(None)
            else:
                return None
        while i < r and known_eq(src.shape[i], 1):
            i += 1
        return res if i == r else None
    return None


def _minus(bag, sub):
    """bag − sub as multisets of factors (by identity), or None when sub is not contained in bag."""
    left = list(bag)
    for f in sub:
        for i, g in enumerate(left):
            if g.ident() == f.ident():
                del left[i]
                break
        else:
            return None
    return left
