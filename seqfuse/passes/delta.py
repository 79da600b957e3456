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

    D·S  −  n·β·ec·D_nonK·R(pc·D_K)  +  n·β·kc·v        (the correction reads α ⊙ S)
    D·S  −  n·β·ec·R(pc)             +  n·β·kc·v        (it reads S before the decay: read="previous")

with one decay D (exp(·) factors and positive numbers along batch and K only, split into the
part D_K along K, which stays inside the contraction, and D_nonK), the written key kc of the input,
a read key pc in the correction's contraction and an erase key ec (with its own number) in the
correction's outer product — each kc itself (the delta rule) or the op's p / e (Comba, GDN-2: a read
key; IPLR, DPLR, RWKV-7: an erase key too) — one write strength n·β (batch axes only) shared by the
correction and the input, and values v (no K axis).  An outer product of two constants (``v @ kᵀ`` of
views) is its two factors, and so is a key matrix contracted with the state when it is one (RWKV-7's
``state @ (a ⊗ b)``: a's factors read inside the contraction, b's written along the key axis again); a cast
to the dtype a constant has is the constant.  The readout is an einsum of the new state with a constant q
over K.  Any other form (a second correction, a part of the decay in the correction, a key matrix that is
not an outer product or was rounded before a cast, a gate along V, a β that differs between the terms) is
a near miss naming the term.

A loop carrying other values beside the state is lifted when none of their updates reads the state
(_split_independent: fla's preconditioned gated delta rule, whose ATK scan scales the written key): their
values are values of each step for the state's update, the op reads them stacked over the steps, and
their loop stays in the graph for the loops pass.

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
from seqfuse.passes.loop_reroll import (Loop, NoLoop, _seed_key, check_buffer_reads, find_runs, group_loops,
                                        reads_shape_only, reroll)
from seqfuse.passes.loop_vectorize import Vectorizer, broadcasts_to, known_eq, same_shape
from seqfuse.passes.pattern import CASTS, IDENTITIES, axis_view, is_op, known_int, mutates, op_name, val, written
from seqfuse.passes.registry import Pass, PassContext
from seqfuse.passes.triangular import NotForwardSubstitution, forward_whole_write, is_eye, mask_is, prove, whole_write

aten = torch.ops.aten

#: views that only move, insert or drop unit axes of a value (their axes map is followed)
_VIEWS = (aten.unsqueeze, aten.squeeze, aten.transpose, aten.permute, aten.expand, aten.view, aten.reshape,
          aten._unsafe_view, aten.movedim)


#: the carried index of a loop of one chunk whose state update is dead (nothing carries; the state S is read)
_NO_UPDATE = -1
#: the write key and decay of such a chunk: not in the program, not checked (the readout does not read them)
_DEAD = ("dead",)


#: the frame label, while its factors are read, of a key matrix's axis that the contraction writes along the
#: state's key axis (``state @ (a ⊗ b)``: b's axis); see _Form._einsum
_KEY_OUT = "key_out"


class NotDelta(Exception):
    """The loop has a matrix state read through a contraction, but its update is not the delta rule
    (the message names the term)."""


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
            if is_op(node, *CASTS) and isinstance(node.args[0], torch.fx.Node) \
                    and val(node.args[0]).dtype == val(node).dtype:
                return self.factors(args[0], fmap)   # a cast to the dtype it has (``.float()`` of an fp32 value)
            outer = self._outer_product(node, args, fmap)
            if outer is not None:
                return outer
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

    def _outer_product(self, node, args, fmap):
        """(number, factors) of an einsum of two constants that sums no axis of size other than 1 (an outer
        product, as ``v.view(.., N, 1) @ k.view(.., 1, N)`` writes one): the factors of each operand, each
        on the frame axes of its letters; None for any other node."""
        # args: the einsum's (equation, operand list) roles; a list's role is ("T", ·, (roles of its items))
        if not is_op(node, aten.einsum) or len(args) < 2 or not isinstance(args[1], tuple) or args[1][0] != "T" \
                or len(args[1][2]) != 2:
            return None
        eq = node.args[0].replace(" ", "")
        if "." in eq or "->" not in eq:
            return None
        ins, out = eq.split("->")
        ins = ins.split(",")
        if len(out) != len(fmap) or any(len(set(x)) != len(x) for x in ins):
            return None
        num, fs = 1.0, []
        for letters, x, role in zip(ins, node.args[1], args[1][2]):
            shape = val(x).shape
            if len(letters) != len(shape) or any(c not in out and not known_eq(d, 1) for c, d in zip(letters, shape)):
                return None
            n, f = self.factors(role, tuple(fmap[out.index(c)] if c in out else None for c in letters))
            num, fs = num * n, fs + f
        return num, fs

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
                raise NotDelta(f"the state passes through {op_name(node)} with a state-dependent argument")
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
                raise NotDelta(f"the update's {op_name(node)} scales a term by alpha")
            sign = -1.0 if node.target is aten.sub.Tensor else 1.0
            return self._sum(node, [(args[0], 1.0), (args[1], sign)])
        if node.target is aten.neg.default:
            x = self.lin(args[0])
            return LinVal(x.axes, [Term(-t.num, t.factors, t.atom) for t in x.terms])
        if is_op(node, *_VIEWS):
            if any(not self.an.const(r) for r in args[1:]):
                raise NotDelta(f"the update's {op_name(node)} has a state-dependent size")
            return self._view(node, self.lin(args[0]))
        if is_op(node, aten.einsum):
            return self._einsum(node, args)
        if _Form.mul_sum(loop, self.an, j) is not None:
            return self._sum_axis(node, args)
        raise NotDelta(f"the update applies {op_name(node)} to a value read from the state (not the delta rule)")

    @staticmethod
    def mul_sum(loop, an, j):
        """The summed axis when template entry j is sum(x ⊙ c, dim) of a state-derived x (3 or more axes) and a
        constant c over one of x's last two axes (a contraction spelled as a product and a sum, as with
        keepdim=True, which canonicalization leaves as written); else None."""
        node = loop.template[j]
        if node.target is not aten.sum.dim_IntList or loop.roles[j] is None or not an.deps[j]:
            return None
        x = node.args[0]
        dims = node.args[1] if len(node.args) > 1 else None
        if not isinstance(x, torch.fx.Node) or x.target is not aten.mul.Tensor or not isinstance(dims, (list, tuple)) \
                or len(dims) != 1 or node.kwargs.get("dtype") is not None or val(x).dim() < 3:
            return None
        d = dims[0] % val(x).dim()
        return d if d >= val(x).dim() - 2 else None

    def _sum_axis(self, node, args) -> LinVal:
        """sum(x ⊙ c, d): a contraction of the (decayed) state over frame axis x.axes[d] with the factors of c."""
        x = self.lin(args[0])
        d = node.args[1][0] % len(x.axes)
        keep = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
        ax = x.axes[d]
        if self.kax is None:
            if ax not in (self.r - 2, self.r - 1):
                raise NotDelta("the update contracts the state over a batch axis")
            self.kax = ax
        elif ax != self.kax:
            raise NotDelta("the update contracts the state over both of its last two axes")
        terms = []
        for t in x.terms:
            if t.atom != "S":
                raise NotDelta("the update contracts a term that is not the decayed state "
                               "(a correction or an input read again through the key)")
            inner = tuple(f for f in t.factors if ax in f.support)
            if not inner:
                raise NotDelta("the update sums the state over its key axis without a key")
            outer = tuple(f for f in t.factors if ax not in f.support)
            terms.append(Term(t.num, outer, ("R", inner)))
        axes = x.axes if keep else x.axes[:d] + x.axes[d + 1:]
        return LinVal(tuple(axes), terms)

    def _right(self, node, x: LinVal, arg_i: int) -> tuple:
        """x's axes as laid in ``node``'s result (right-aligned); the result must not add axes to x."""
        out = val(node).dim()
        if out != len(x.axes):
            raise NotDelta(f"the update's {op_name(node)} broadcasts a value read from the state to more axes")
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
                    raise NotDelta(f"the update's {op_name(node)} broadcasts a value read from the state")
                if axes is not None and axes != x.axes:
                    raise NotDelta(f"the update's {op_name(node)} adds values read from the state along different axes")
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
            raise NotDelta(f"the update reshapes a value read from the state with {op_name(node)}")
        axes = []
        for i, a in enumerate(amap):
            if a is None:
                if not known_eq(out.shape[i], 1):
                    raise NotDelta(f"the update broadcasts a value read from the state with {op_name(node)}")
                axes.append(None)
            else:
                axes.append(x.axes[a])
        kept = {a for a in amap if a is not None}
        for d in range(src.dim()):
            if d not in kept and not known_eq(src.shape[d], 1):
                raise NotDelta(f"the update reshapes a value read from the state with {op_name(node)}")
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
        # a letter of the constant alone that lands on the summed axis (``state @ (a ⊗ b)``, a key matrix
        # contracted with the state): its factors are laid on _KEY_OUT, kept apart from those inside the sum
        summed_axes = {frame[c] for c in summed}
        cmap = tuple(None if known_eq(s, 1) else
                     (_KEY_OUT if c in out and c not in lx and frame.get(c) in summed_axes else frame.get(c))
                     for c, s in zip(lc, cs))
        if any(a is None and not known_eq(s, 1) for a, s in zip(cmap, cs)):
            raise NotDelta("the update's einsum lays a constant on axes that are not the state's")
        num, cfs = self.factors(crole, cmap)
        if not summed:    # an elementwise product
            return LinVal(tuple(oaxes), [Term(t.num * num, t.factors + tuple(cfs), t.atom) for t in x.terms])
        if len(summed_axes) != 1:
            raise NotDelta("the update contracts the state over more than one axis")
        ax = summed_axes.pop()
        # the key matrix's factors along its output letter: outside the contraction, on the key axis again
        written = []
        for f in cfs:
            if _KEY_OUT in f.support:
                if ax in f.support:
                    node = self.loop.template[f.role[1]] if f.role[0] == "L" else f.role[1]
                    if is_op(node, *CASTS) and isinstance(node.args[0], torch.fx.Node):
                        raise NotDelta(f"the update contracts the state with a key matrix cast to {val(node).dtype} "
                                       f"after it was formed in {val(node.args[0]).dtype} (seqfuse would form it "
                                       f"without that rounding)")
                    raise NotDelta("the update contracts the state with a key matrix that is not an outer product "
                                   "of two keys (a ⊗ b: one read along the state's key axis, one written along it)")
                written.append(Factor(f.key, f.role, f.power, tuple(ax if a == _KEY_OUT else a for a in f.fmap)))
        cfs = [f for f in cfs if _KEY_OUT not in f.support]
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
            outer = tuple(f for f in every if ax not in f.support) + tuple(written)
            terms.append(Term(t.num * num, outer, ("R", inner)))
        return LinVal(tuple(oaxes), terms)


# --- the pass ----------------------------------------------------------------------------

@dataclass
class _Plan:
    kax: int
    vax: int
    k: list            # K-spanning factors of the key the state is written with
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
    p: list | None = None   # the factors of the key the correction reads the state with, when not k's
    e: list | None = None   # the factors of the key the correction erases along, when not k (times e_num)
    e_num: float = 1.0
    read: str = "decayed"   # the state the correction reads: α ⊙ S, or S before the decay ("previous")


def _is_zero(x) -> bool:
    """Whether an initial state is known to be zero (zeros, possibly moved with ``.to``)."""
    while isinstance(x, torch.fx.Node) and (is_op(x, aten.to, aten.clone, aten.contiguous, aten._to_copy)):
        x = x.args[0]
    if x is None:
        return True
    if isinstance(x, (int, float)):
        return x == 0
    return is_op(x, aten.zeros, aten.zeros_like, aten.new_zeros)


def _reroll(graph, group, pos, why: list | None = None) -> Loop | None:
    """The loop read with updates moved to the step that reads them (a step loop), else with every node
    in the step of its slices (a loop over chunks, whose update reads the chunk's own slices after its
    readout); None when neither reading matches (as the loops pass reads loops).  ``why`` collects the
    loop finder's reason for the second reading (the one that reads loops over chunks)."""
    for move in (True, False):
        try:
            loop = reroll(graph, group, pos, move_updates=move)
        except NoLoop as e:
            if why is not None and not move:
                why.append(str(e))
            continue
        if not any(loop.roles[k] is None for k in loop.carried):
            return loop
    return None


def _first_chunk_loop(graph, N: int, lo: int, hi: int, pos: dict) -> Loop:
    """The first chunk of a chunked program over N = 1 or 2 chunks read as a loop of one step (the loop
    finder needs two matching steps; with two chunks the second one's state update is dead when the final
    state is not returned, so the steps differ).

    Seeds are the slices X[:, :, 0] of tensors over the N chunks (axis 2); the step is every node that reads
    one (transitively) and no slice X[:, :, 1] of the second chunk (which stays after the loop, as a longer
    loop's last chunk does).  The carried value is the step's new state S' = D·S + W (a (B, H, K, V) sum),
    and its previous value S the one value from before the step that S' adds or decays and that the step
    also contracts; its reads become reads of the carried value, with S as the initial value.  With one
    step that is exact whatever S is: what the step computes is proven on the template as for any loop.
    Nodes after S' that read it (the program's final state, already after the loop) are not in the step.
    Only nodes at graph positions in (lo, hi) belong to this program (its system's solve, the next one's)."""
    seeds = {}
    for node in graph.nodes:
        if not lo < pos[node] < hi:
            continue
        key = _seed_key(node)
        if key is not None and key[1] == 2 and key[2] == "select" and key[3] < N and val(key[0]).dim() >= 3 \
                and known_eq(val(key[0]).shape[2], N):
            seeds[node] = key[3]
    if not any(i == 0 for i in seeds.values()):
        raise NoLoop("no slice of the first chunk")
    label: dict = {}
    for node in graph.nodes:
        if node.op == "output":
            break
        if node in seeds:
            label[node] = seeds[node]
        else:
            s = max((label.get(a, -1) for a in node.all_input_nodes), default=-1)
            if s >= 0:
                label[node] = s
    step = [n for n in graph.nodes if label.get(n) == 0 and pos[n] < hi]
    inside = set(step)
    # the new state: a (B, H, K, V) sum of the step, one of whose terms is S or S times a factor, with S from
    # before the step, 4-d, of the sum's shape, and also contracted by the step (KC·S)
    found = []
    for n in step:
        if n.target not in (aten.add.Tensor,) or n.kwargs or len(n.args) != 2 or not isinstance(val(n), torch.Tensor) \
                or val(n).dim() != 4:
            continue
        for t in n.args:
            cands = [t] if isinstance(t, torch.fx.Node) and t not in inside else \
                [a for a in t.args if isinstance(a, torch.fx.Node) and a not in inside] \
                if isinstance(t, torch.fx.Node) and t.target is aten.mul.Tensor else []
            for S in cands:
                if isinstance(val(S), torch.Tensor) and tuple(val(S).shape) == tuple(val(n).shape) and \
                        any(u in inside and is_op(u, aten.einsum) for u in S.users):
                    found.append((n, S))
    if not found and N == 1:
        return _read_only_chunk_loop(step, seeds, label)
    if len({n for n, _ in found}) != 1 or len({S for _, S in found}) != 1:
        raise NoLoop("no single new state D·S + W with S from before the chunk" if not found else
                     "several candidates for the chunk's new state")
    new, S = found[0]
    after = {new}
    for n in step[step.index(new) + 1:]:
        if any(a in after for a in n.all_input_nodes):
            after.add(n)
    template = [n for n in step if n is new or n not in after]
    index = {n: j for j, n in enumerate(template)}
    k = index[new]

    def role(a):
        if isinstance(a, (list, tuple)):
            return ("T", type(a), tuple(role(e) for e in a))
        if isinstance(a, torch.fx.Node):
            if a is S:
                return ("P", k)
            if a in index:
                return ("L", index[a])
            if a in label:
                raise NoLoop("the first chunk reads a value of the second")
            return ("I", a)
        return ("C", a)
    loop = Loop([], False, 0, 0)
    loop.template = template
    for n in template:
        loop.roles.append(None if n in seeds else (role(tuple(n.args)), {kk: role(v) for kk, v in n.kwargs.items()}))
    loop.inst = {0: template}
    loop.init = {k: S}
    loop.lo = loop.hi = 0
    loop.carried = [k]
    return loop


def _read_only_chunk_loop(step, seeds, label) -> Loop:
    """One chunk whose state update is dead (the final state is not returned): a loop of one step that
    carries nothing (carried index _NO_UPDATE) and reads the state S, the one 4-d value from before the
    step that two matrix products of the step read (KC·S and Qd·S)."""
    inside = set(step)
    cands = {a for n in step if is_op(n, aten.einsum) and len(n.args[1]) == 2 for a in n.args[1]
             if isinstance(a, torch.fx.Node) and a not in inside and isinstance(val(a), torch.Tensor)
             and val(a).dim() == 4}
    cands = {S for S in cands if sum(1 for u in S.users if u in inside and is_op(u, aten.einsum)) == 2}
    if len(cands) != 1:
        raise NoLoop("no single new state D·S + W with S from before the chunk, nor one state it only reads")
    (S,) = cands
    index = {n: j for j, n in enumerate(step)}

    def role(a):
        if isinstance(a, (list, tuple)):
            return ("T", type(a), tuple(role(e) for e in a))
        if isinstance(a, torch.fx.Node):
            if a is S:
                return ("P", _NO_UPDATE)
            if a in index:
                return ("L", index[a])
            if a in label:
                raise NoLoop("the chunk reads a value computed after it")
            return ("I", a)
        return ("C", a)
    loop = Loop([], False, 0, 0)
    loop.template = step
    for n in step:
        loop.roles.append(None if n in seeds else (role(tuple(n.args)), {kk: role(v) for kk, v in n.kwargs.items()}))
    loop.inst = {0: step}
    loop.init = {_NO_UPDATE: S}
    return loop


def _erase_created(rewrite, graph) -> None:
    """Erase the nodes a chunk proof inserted (``_Chunked.created``) that nothing reads."""
    for n in reversed(getattr(getattr(rewrite, "cx", None), "created", [])):
        if not getattr(n, "_erased", False) and not n.users:   # (dead-code elimination may have taken it)
            graph.erase_node(n)


def _last_index(index, size) -> bool:
    """Whether ``index`` (an int) is the last position of an axis of ``size`` (int, or symbolic but pinned by
    the program's guards): -1 or size - 1.  Adds no guard."""
    n = known_int(size)
    return isinstance(index, int) and (index == -1 or (n is not None and index == n - 1))


def chunked_from(node):
    """x when ``node`` is a reshape of x (B, H, T', ·) that splits its time axis into chunks (B, H, N, C, ·)
    (or x (B, H, T') into (B, H, N, C)), else None."""
    if not is_op(node, aten.reshape, aten.view, aten._unsafe_view):
        return None
    src = node.args[0]
    s, o = val(src).shape, val(node).shape
    if len(o) != len(s) + 1 or len(s) < 3 or not all(known_eq(a, b) for a, b in zip(s[:2], o[:2])) \
            or not known_eq(s[2], o[2] * o[3]) or not all(known_eq(a, b) for a, b in zip(s[3:], o[4:])):
        return None
    return src


def erase_dead_inverse(graph, N, nodes) -> None:
    """Erase a forward substitution (``nodes``: N's row writes, their reads and views, T = N + I) once
    nothing else reads N: its in-place writes would keep it, and everything before it, alive through
    dead-code elimination."""
    pos = {n: i for i, n in enumerate(graph.nodes)}
    if N not in pos:
        return
    closure, stack = set(), [N]
    while stack:
        for u in stack.pop().users:
            if u not in closure:
                closure.add(u)
                stack.append(u)
    if not closure <= nodes:
        return
    for n in sorted(closure, key=pos.__getitem__, reverse=True):
        graph.erase_node(n)


class DeltaPass(Pass):
    """Find unrolled time loops whose carried update is the delta rule; replace each by one seqfuse.delta."""

    name = "delta"

    def run(self, ctx: PassContext) -> None:
        graph = ctx.graph
        self._reported = False     # a delta near miss was recorded for this graph
        self._unrolled = []        # (group of runs, the loop finder's reason) of loops that did not re-roll
        runs = find_runs(graph)
        if not runs:
            self._short_wy(ctx)
            return
        pos = {n: i for i, n in enumerate(graph.nodes)}
        changed = False
        for group in group_loops(runs, pos):
            if changed:
                pos = {n: i for i, n in enumerate(graph.nodes)}
            if any(n not in pos for r in group for n in r.nodes):
                continue
            why = []
            loop = _reroll(graph, group, pos, why)
            if loop is None:
                self._unrolled.append((group, why[0] if why else "its steps differ"))
                continue   # the loops pass reports loops that do not re-roll
            kept = frozenset()
            if len(loop.carried) != 1:
                split = _split_independent(loop)
                if split is None:
                    self._coupled_near_miss(ctx, loop)
                    continue
                k, an, kept = split
            else:
                k = loop.carried[0]
                if not _matrix_state(loop, k):
                    continue
                an = Analysis(loop)
            try:
                an.update(k)
                continue       # an elementwise-linear update: the loops pass lifts it
            except NoLoop:
                pass
            if not self._reads_state_through_contraction(loop, an, k):
                continue       # not delta-like (tanh(h), h·h, ...): the loops pass reports it
            rewrite = _ChunkRewrite if not kept and _ChunkRewrite.applies(loop) else _Rewrite
            r = rewrite(ctx, loop, an, k, pos, kept)
            try:
                r.run()
                changed = True
            except (NotDelta, NoLoop) as e:
                _erase_created(r, graph)
                what = "chunked form not lifted: " if rewrite is _ChunkRewrite else ""
                ctx.report.add_near_miss("delta", what + str(e), loop.template[k])
                self._reported = True
        if changed:
            graph.eliminate_dead_code()
            ctx.gm.recompile()
        if not self._reported:     # (after the dead-code elimination: lifted programs' systems are gone)
            self._short_wy(ctx)

    def _short_wy(self, ctx):
        """A chunked WY program over one or two chunks, whose loop the loop finder does not re-roll (one
        step; or two where the last chunk's state update is dead): its first chunk read as a loop of one step
        (_first_chunk_loop) and lifted like a longer one, the second chunk, if any, as the tail that reads
        the op's final state.  Otherwise (or when a piece does not fit) a near miss naming why."""
        systems = self._short_wy_systems(ctx)
        changed = False
        for i, (solve, system) in enumerate(systems):
            if getattr(solve, "_erased", False):
                continue
            # this program's chunks: after its system is solved, before the next program's is (each layer of a
            # model is one chunked program; one chunk of each is read on its own)
            end = next((n for n, _ in systems[i + 1:] if not getattr(n, "_erased", False)), None)
            changed |= self._short_wy_one(ctx, solve, system, end)
        if changed:
            ctx.graph.eliminate_dead_code()
            ctx.gm.recompile()

    def _short_wy_one(self, ctx, solve, system, end) -> bool:
        """_short_wy for the program whose system ``solve`` solves, its chunks before ``end`` (None: the
        graph's end).  Whether it was lifted."""
        why = "whose loop over chunks has too few steps to be re-rolled"
        N = val(system).shape[2]
        pinned = known_int(N)           # symbolic, but pinned by the program's guards (Dynamo unrolled its loop)
        N = N if pinned is None else pinned
        if not isinstance(N, int):
            why = "over a symbolic number of chunks (dynamic shapes), which the loop over chunks is not proven to cover"
        elif N >= 3:
            # the loop over chunks (slices X[:, :, n] of tensors over the N chunks) did not re-roll: say why
            reasons = [r for group, r in self._unrolled if any(
                run.family[1] == 2 and val(run.family[0]).dim() >= 4 and known_eq(val(run.family[0]).shape[2], N)
                for run in group)]
            if not reasons and not self._read_per_chunk(solve, N):
                return False    # a solve over chunks that no loop reads chunk by chunk: not a WY program
            why = "whose loop over chunks was not re-rolled" + (f" ({reasons[0]})" if reasons else "")
        if isinstance(N, int) and N in (1, 2):
            try:
                pos = {n: i for i, n in enumerate(ctx.graph.nodes)}
                loop = _first_chunk_loop(ctx.graph, N, pos[solve], pos[end] if end is not None else len(pos), pos)
                if not _ChunkRewrite.applies(loop):
                    raise NotDelta("its first chunk does not read the UT system's solution")
                k = loop.carried[0] if loop.carried else _NO_UPDATE
                rewrite = _ChunkRewrite(ctx, loop, Analysis(loop), k, pos)
                try:
                    rewrite.run()
                finally:
                    _erase_created(rewrite, ctx.graph)
            except (NotDelta, NoLoop) as e:
                why = f"over {N} chunk(s), read as a loop of one chunk: {e}"
            else:
                return True
        if self._softmax_after(solve):
            why += "; its scores go through a softmax (PaTH attention's Householder transforms, not a linear " \
                   "recurrence the delta op computes)"
        ctx.report.add_near_miss("delta", "chunked form not lifted: a WY program (a UT system over chunks) "
                                 + why, solve)
        return False

    @staticmethod
    def _softmax_after(solve, depth=40) -> bool:
        """Whether a softmax reads a value computed from ``solve`` (within ``depth`` ops; a value written
        into a buffer in place flows on to the buffer's readers)."""
        frontier, seen = [solve], {solve}
        for _ in range(depth):
            nxt = []
            for n in frontier:
                users = list(n.users)
                if n.op == "call_function" and n.args and isinstance(n.args[0], torch.fx.Node) \
                        and mutates(n, n.args[0]):
                    base = n.args[0]
                    while is_op(base, *_VIEWS, aten.slice, aten.select) and isinstance(base.args[0], torch.fx.Node):
                        base = base.args[0]
                    users.append(base)
                for u in users:
                    if u in seen:
                        continue
                    if is_op(u, aten._softmax, aten.softmax, aten._safe_softmax):
                        return True
                    seen.add(u)
                    nxt.append(u)
            frontier = nxt
        return False

    @staticmethod
    def _read_per_chunk(solve, N, depth=8) -> bool:
        """Whether a value computed from ``solve`` (within ``depth`` ops) is sliced one chunk at a time,
        ``select(x, 2, n)`` of an (B, H, N, ·) tensor: the reads of a loop over the chunks."""
        frontier, seen = [solve], {solve}
        for _ in range(depth):
            nxt = []
            for n in frontier:
                for u in n.users:
                    if u in seen:
                        continue
                    seen.add(u)
                    if u.target is aten.select.int and u.args[1] == 2 and isinstance(val(u.args[0]), torch.Tensor) \
                            and val(u.args[0]).dim() >= 4 and known_eq(val(u.args[0]).shape[2], N):
                        return True
                    nxt.append(u)
            frontier = nxt
        return False

    @staticmethod
    def _short_wy_systems(ctx) -> list:
        """The UT systems over chunks (B, H, N, C, C) still solved after the pass (a unit lower-triangular solve
        or an in-place forward substitution) whose loops were neither lifted nor reported: chunked WY
        programs over too few chunks for the loop finder (one or two here).  [(the first solve of each
        system, the system)] in graph order."""
        found, seen = [], set()
        for node in ctx.graph.nodes:
            if _solve(node):
                system = node.args[0]
            elif node.target is aten.add.Tensor and is_eye(node.args[1]) and \
                    isinstance(node.args[0], torch.fx.Node) and written(node.args[0]):
                system = node.args[0]
            else:
                continue
            if isinstance(system, torch.fx.Node) and val(system).dim() == 5 and system not in seen:
                seen.add(system)
                found.append((node, system))
        return found

    def _coupled_near_miss(self, ctx, loop):
        """A loop carrying several values, one of them a (B, H, K, V)-like state whose update reads it through
        a contraction (TTT's weights beside their bias, a state with a normalizer): not the delta rule, which
        carries one state; the near miss names the first term that does not fit, or the coupling."""
        an = Analysis(loop)
        for k in loop.carried:
            if loop.roles[k] is None or not isinstance(val(loop.template[k]), torch.Tensor) \
                    or val(loop.template[k]).dim() < 3 or not self._reads_state_through_contraction(loop, an, k):
                continue
            reason = f"the loop carries {len(loop.carried)} values (the delta rule carries one state)"
            try:
                _Form(ctx, loop, an, k).lin(("L", k))
            except (NotDelta, NoLoop) as e:
                reason = str(e) + f"; the loop carries {len(loop.carried)} values (the delta rule carries one state)"
            ctx.report.add_near_miss("delta", reason, loop.template[k])
            self._reported = True
            return

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
        return any(is_op(loop.template[j], aten.einsum, aten.matmul, aten.bmm, aten.mm) or
                   _Form.mul_sum(loop, an, j) is not None for j in cone)


def _matrix_state(loop, k) -> bool:
    """Whether carried value k is a state the delta rule could carry (a tensor of rank 2 or more)."""
    return loop.roles[k] is not None and isinstance(val(loop.template[k]), torch.Tensor) \
        and val(loop.template[k]).dim() >= 2


def _split_independent(loop):
    """(k, analysis, kept) for a loop carrying several values of which one, k, is a matrix state read
    through a contraction and no other carried value's update reads k (the preconditioned gated delta
    rule's ATK scan A_t = α_t A_{t-1} + β_t k_t², which scales the written key by a function of A_t):
    the others are then values of each step for k's update.  ``analysis`` counts them as loop constants;
    ``kept`` are the template entries computed from them, which stay in the graph (their steps are
    stacked where the op reads them).  None when no carried value is such a state."""
    an = Analysis(loop)
    for k in loop.carried:
        others = frozenset(c for c in loop.carried if c != k)
        if not _matrix_state(loop, k) or any(k in an.deps[c] for c in others):
            continue
        split = Analysis(loop)
        split.deps = [d - others for d in an.deps]
        if DeltaPass._reads_state_through_contraction(loop, split, k):
            return k, split, frozenset(j for j, d in enumerate(an.deps) if d & others and k not in d)
    return None


class _Rewrite:
    """Prove the delta form of one loop and replace it (nothing is touched before every check passed)."""

    def __init__(self, ctx, loop: Loop, an: Analysis, k: int, pos, kept: frozenset = frozenset()):
        self.ctx, self.loop, self.an, self.k, self.pos = ctx, loop, an, k, pos
        self.graph = ctx.graph
        self.post: set = set()     # template entries that only re-lay the readout (see _post_readout)
        #: template entries computed from the loop's other carried values (see _split_independent): they stay
        #: in the graph as they are, the op reads their steps stacked
        self.kept = kept

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
        self.post = self._post_readout(plan)
        writes = self._buffer_writes(plan)
        uses = self._outside_uses(plan)
        self._only_update_reads_state(plan, writes)
        # 2. the rewrite
        vec = self.vec = Vectorizer(self.graph, loop, self.anchor, self.an.deps)
        vec.kept = self.kept
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
        cor_k = [f for f in cor.factors if kax in f.support]
        cor_o = [f for f in cor.factors if kax not in f.support]
        # which state the correction reads: α ⊙ S (the decay's factors inside its contraction and on it), or
        # S before the decay (none of them there: DPLR, RWKV-7); a part of the decay is a near miss
        rest, beta, read, e_num = _minus(inner, gate_k), _minus(cor_o, gate_o), "decayed", -cor.num / dec.num
        if rest is None or beta is None:
            keys = {f.key for f in gate}
            if any(f.key in keys for f in inner + list(cor.factors)):
                raise NotDelta("the correction reads the state with a part of its decay (the delta rule reads "
                               "α ⊙ S, DPLR S)")
            rest, beta, read, e_num = inner, cor_o, "previous", -cor.num
        if any(vax in f.support for f in rest):
            raise NotDelta("the key the correction reads the state with spans the value axis")
        if not cor_k:
            raise NotDelta("the correction writes along no key of its own (a key matrix contracted with the state, "
                           "as in S @ (x ⊗ y), is not split into its read and erase vectors)")
        if any(vax in f.support for f in cor_k):
            raise NotDelta("the key the correction writes along spans the value axis")
        if any(vax in f.support for f in beta):
            raise NotDelta("the correction's write strength β varies along the value axis")
        inp_k = [f for f in inn.factors if kax in f.support]
        inp_o = [f for f in inn.factors if kax not in f.support]
        if not inp_k or any(vax in f.support for f in inp_k):
            raise NotDelta("the input's outer product writes along no key, or along one that spans the value axis")
        kc = inp_k
        vfs = _minus(inp_o, beta)
        if vfs is None:
            raise NotDelta("the input and the correction have different write strengths β "
                           "(the delta rule writes β(v − Sᵀk))")
        # the op writes β k ⊗ v and erases β e ⊗ (Rᵀ p): p the read key, e the erase key (k when they are
        # the written key: the delta rule)
        p = None if _bag(rest) == _bag(kc) else rest
        e_num /= inn.num
        e = None if _bag(cor_k) == _bag(kc) and math.isclose(e_num, 1.0, rel_tol=1e-9) else cor_k
        if not any(vax in f.support for f in vfs):
            raise NotDelta("the input of the update does not vary along the value axis")
        if dec.num <= 0:
            raise NotDelta("the state's decay has a non-positive constant factor")
        gate_kind = "none" if not gate and dec.num == 1 else ("vector" if gate_k else "scalar")
        for f in gate:
            if self._log_role(f) is None:
                raise NotDelta("the state's decay is not exp(·), sigmoid(·) or a positive constant")
        ro = self._readout(form, kax)
        return _Plan(kax, vax, kc, vfs, 1.0, beta, inn.num, gate, dec.num, gate_kind, *ro, p=p, e=e, e_num=e_num,
                     read=read)

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
            if is_op(node, aten.reshape, aten.view, aten._unsafe_view) and loop.roles[j][0][2][0][0] == "L":
                # a reshape of exp(x) (a decay laid over merged batch axes): the same reshape of x
                inner = self._log_role(Factor(f.key, loop.roles[j][0][2][0], f.power, f.fmap))
                if inner is None or inner[1][0] == "RS":
                    return None
                return (inner[0], ("RS", inner[1], tuple(val(node).shape)), f.fmap)
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
        for j, node in enumerate(loop.template):
            t = node.target
            if not (isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable):
                continue
            args = loop.roles[j][0][2] if loop.roles[j] else ()
            if isinstance(self, _ChunkRewrite) and node.target is aten.masked_fill_.Scalar and args \
                    and args[0][0] == "L" \
                    and loop.roles[args[0][1]] is not None and len(node.args[0].users) == 1:
                continue   # fills a temporary of the step in place (read as out of place by _Chunked)
            if not (node.target is aten.copy_.default and args[0][0] == "L" and loop.roles[args[0][1]] is None):
                raise NoLoop(f"the loop body mutates a tensor with {t} (only per-step buffer writes are re-rolled)")
            if any(loop.inst[s][j].users for s in loop.steps):
                raise NoLoop("the result of a per-step buffer write is read")
            writes.append((j, args[0][1], args[1]))
        check_buffer_reads(loop, writes, self.body, self.pos, self.first, self.last)
        return writes

    def _outside_uses(self, plan):
        loop, uses = self.loop, {}
        for s in loop.steps:
            for j, n in enumerate(loop.inst[s]):
                outs = [u for u in n.users if u not in self.body and not reads_shape_only(u, n)]
                if not outs or j in self.kept:      # a kept entry's nodes stay: their readers need nothing
                    continue
                if any(self.pos[u] <= self.last for u in outs):
                    raise NoLoop("a value of the loop body is used inside the loop by code outside the body")
                if self.an.deps[j] and j != plan.readout and j not in self.post and not (j == self.k and s == loop.hi):
                    raise NotDelta("a value computed from the state inside the loop is used after it")
                uses[(s, j)] = outs
        return uses

    def _post_readout(self, plan) -> set:
        """Template entries that only re-lay the readout (views, reshapes, copies and casts of it, other
        arguments loop-constant): vectorized from the op's output when read after the loop."""
        loop, post, grew = self.loop, set(), True
        while grew:
            grew = False
            for j, node in enumerate(loop.template):
                if j in post or loop.roles[j] is None or not self.an.deps[j] or \
                        not is_op(node, *_VIEWS, aten.clone, aten.contiguous, aten.alias, *CASTS):
                    continue
                args = loop.roles[j][0][2]
                if args and args[0][0] == "L" and (args[0][1] == plan.readout or args[0][1] in post) \
                        and all(self.an.const(r) for r in args[1:]):
                    post.add(j)
                    grew = True
        return post

    def _only_update_reads_state(self, plan, writes):
        """Every state-dependent entry of the body is part of the proven update, the readout (and the
        copies on its way), or a buffer write of the readout."""
        loop, an = self.loop, self.an
        allowed = set(self.form.used) | {self.k, plan.readout} | {j for j, _, _ in writes} | self.post
        role = loop.roles[plan.readout][0][2][1]
        for r in role[2]:
            while r[0] == "L" and r[1] != self.k and loop.roles[r[1]] is not None:
                allowed.add(r[1])
                r = loop.roles[r[1]][0][2][0]
        for j, _, src in writes:   # the readout, or a view of it (RWKV-7's (state @ r).view(B, H, N))
            if an.deps[j] and src != ("L", plan.readout) and not (src[0] == "L" and src[1] in self.post):
                raise NotDelta("the loop writes a value computed from the state that is not its readout")
        for j in range(len(loop.template)):
            if an.deps[j] and j not in allowed:
                raise NotDelta(f"the loop computes {op_name(loop.template[j])} of the state besides the update "
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
        pv = ev = None
        if plan.p is not None:   # the read key, laid out like k
            pv = self._layout(vec, vec.cast(sel(self._frame(vec, plan.p, 1.0, D), vax), D), [K])
        if plan.e is not None:   # the erase key, laid out like k
            ev = self._layout(vec, vec.cast(sel(self._frame(vec, plan.e, plan.e_num, D), vax), D), [K])
        bv = self._layout(vec, bv, [])
        g = None
        if plan.gate_kind != "none":
            total = None
            for f in plan.gate:
                kind, role, fmap = self._log_role(f)
                if role[0] == "RS":     # the exponent laid as the decay: reshape it the same way
                    x, is_vec = vec.role(role[1])
                    x = vec.emit(aten.reshape.default, (x, ([vec.count] if is_vec else []) + list(role[2])))
                else:
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
            pv = vec.emit(aten.flip.default, (pv, [1])) if pv is not None else None
            ev = vec.emit(aten.flip.default, (ev, [1])) if ev is not None else None
        op = Delta(q=qv, k=kv, v=vv, beta=bv, g=g, h0=h0, p=pv, e=ev, gate=plan.gate_kind, read=plan.read)
        fake = torch.ops.seqfuse.delta.default(*(val(x) if x is not None else None for x in (qv, kv, vv, bv, g, h0)),
                                               plan.gate_kind, 1.0, 64, "recurrent", "auto", False,
                                               *(val(x) if x is not None else None for x in (pv, ev)), plan.read)
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


def _fold_moves(t, letters):
    """(tree, letters) of an einsum operand: an ("ax", x, axes, shape) tree that only permutes x's axes
    becomes x with the letters permuted (x's axis axes[i] carries letters[i]); else as is."""
    if t[0] != "ax" or None in t[2] or sorted(t[2]) != list(range(len(letters))):
        return t, letters
    out = [""] * len(letters)
    for i, a in enumerate(t[2]):
        out[a] = letters[i]
    return t[1], "".join(out)


def _one_move(node) -> list | None:
    """The axes of ``node``'s input that ``node`` reads (as pattern.axis_view, one op only) for a transpose,
    permute or unsqueeze; None for anything else."""
    src = node.args[0]
    r = val(src).dim()
    if node.target is aten.transpose.int:
        perm = list(range(r))
        d0, d1 = node.args[1] % r, node.args[2] % r
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return perm
    if node.target is aten.permute.default:
        return [d % r for d in node.args[1]]
    if node.target is aten.unsqueeze.default:
        d = node.args[1] % (r + 1)
        return list(range(d)) + [None] + list(range(d, r))
    return None


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


# --- per-chunk values as canonical trees ------------------------------------------------

_EXPR_OPS = {aten.mul.Tensor: "mul", aten.add.Tensor: "add", aten.sub.Tensor: "sub", aten.neg.default: "neg",
             aten.exp.default: "exp"}


def _canon_eq(ins: list[str], out: str) -> str:
    """An einsum equation with its letters renamed in order of first appearance."""
    names: dict[str, str] = {}
    for c in "".join(ins) + out:
        names.setdefault(c, chr(ord("a") + len(names)))
    return ",".join("".join(names[c] for c in s) for s in ins) + "->" + "".join(names[c] for c in out)


_MM = "abcd,abde->abce"     # A·B over the last two axes of (B, H, ·, ·) chunk values
_MMT = "abcd,abed->abce"    # A·Bᵀ
#: the batch indices (B, H) of one chunk's index forms (index_form)
_B = ("b0", "b1")


class _Chunked:
    """One chunk's values of a loop over chunks as canonical trees in the chunk's frame (the chunk axis
    removed), so that a piece of the WY form compares equal however it is spelled: computed over all chunks
    before the loop and sliced per chunk (transformers), or computed in the loop from per-chunk slices (fla).

    Trees: ("leaf", node) a tensor over all chunks (B, H, N, C, ·) taken as given (a reshape into chunks, a
    cumulative sum); ("inv", node) a loop-invariant without a chunk axis (eye); ("mask", shape, values) a
    boolean mask built from sizes alone (its evaluated value, so equal masks compare equal); ("num", x);
    (op, *children) for mul / add (children sorted) / sub / neg / exp; ("where", cond, x, fill);
    ("tril", x, diagonal); ("not", cond); ("ax", x, axes, shape) a pure axis move of x (axes as in
    pattern.axis_view, shape the result's sizes), moved outside exp; ("last", x) x at the last position of
    its last axis; ("ein", equation, a, b) a two-operand einsum (letters canonical); ("utinv", M) the inverse
    (I + strictly_lower(M))⁻¹, read from a unit lower-triangular solve or a forward substitution;
    ("apply", U, b) = U·b.  Equal trees are equal values: each node's value follows from its children's."""

    def __init__(self, ctx, loop, an, body):
        self.ctx, self.loop, self.an, self.body = ctx, loop, an, body
        self.tindex = {n: j for j, n in enumerate(loop.template)}
        self.memo: dict = {}
        self.inverses: list = []    # forward-substitution bases proven (erased with the loop when dead)
        self.tail = None            # (last chunk, node positions, loop start) while reading the last chunk
        self.masks: dict = {}       # evaluated shape-only masks
        self.created: list = []     # unit-chunk reshapes inserted while reading one chunk (_unit_chunk)

    def after(self, node, last, pos, start, what):
        """The tree of a value computed after the loop for its last chunk ``last`` (from slices X[:, :, last]
        of tensors over all chunks and invariants defined before the loop), in the chunk's frame."""
        saved, self.tail = self.tail, (last, pos, start)
        try:
            return self._after(node, what)
        finally:
            self.tail = saved

    def _after(self, node, what):
        last, pos, start = self.tail
        if node.target is aten.select.int and isinstance(node.args[0], torch.fx.Node) \
                and isinstance(val(node.args[0]), torch.Tensor) and val(node.args[0]).dim() >= 3 \
                and node.args[1] % val(node.args[0]).dim() == 2 and node.args[2] in (last, -1):
            if node.args[2] == -1 and val(node.args[0]).shape[2] != last + 1:
                raise NotDelta(f"{what} slices another chunk")
            return self.whole(node.args[0], what)
        if node in self.body or node.op != "call_function":
            if node in self.body:
                raise NotDelta(f"{what} reads a value of the loop")
            return self.inv(node)
        from seqfuse.passes.pattern import is_shape_only
        if pos.get(node, -1) < start or is_shape_only(node):
            return self.inv(node)
        return self._tree(node, None, what)

    # -- entry points ------------------------------------------------------------------
    def role(self, role, what):
        """The tree of a state-independent role of the loop body (a template entry or an invariant)."""
        if role[0] == "L":
            return self.local(self.loop.template[role[1]], what)
        if role[0] == "I":
            return self.inv(role[1])
        if role[0] == "C" and isinstance(role[1], (int, float)) and not isinstance(role[1], bool):
            return ("num", float(role[1]))
        raise NotDelta(f"{what} is not a tensor of the chunk")

    def local(self, node, what):
        """The tree of a template node (one chunk's value computed in the loop, or a per-chunk slice)."""
        j = self.tindex.get(node)
        if j is None:
            if node in self.body:
                raise NotDelta(f"{what} reads a value of another chunk")
            return self.inv(node)
        if self.an.deps[j]:
            raise NotDelta(f"{what} depends on the state")
        if self.loop.roles[j] is None:           # a per-chunk slice X[:, :, n] of a tensor over all chunks
            key = _seed_key(node)
            if key is None or key[2] != "select" or key[1] != 2:
                raise NotDelta(f"{what} is not a slice of a tensor over the chunks along axis 2")
            return self.whole(key[0], what)
        return self._tree(node, None, what)

    def whole(self, node, what, axis=2):
        """The tree of a tensor over all chunks (chunk axis ``axis``, 2 unless a vectorized column build moved
        it), in one chunk's frame (the tensor without its chunk axis)."""
        if not isinstance(val(node), torch.Tensor) or val(node).dim() < max(3, axis + 1):
            raise NotDelta(f"{what} is not a tensor over the chunks")
        if (node, axis) not in self.memo:
            self.memo[(node, axis)] = self._tree(node, axis, what)
        return self.memo[(node, axis)]

    def inv(self, node):
        """The tree of a loop invariant: ("mask", shape, values) for a small boolean mask built from sizes
        alone (evaluated), else ("inv", node)."""
        from seqfuse.passes.pattern import evaluate_shape_only, is_shape_only
        v = val(node) if isinstance(node, torch.fx.Node) else None
        if isinstance(v, torch.Tensor) and v.dtype == torch.bool and all(isinstance(d, int) for d in v.shape) \
                and v.numel() <= 1 << 16 and node.op == "call_function" and is_shape_only(node):
            if node not in self.masks:
                try:
                    m = evaluate_shape_only(self.ctx.gm, node)
                    self.masks[node] = ("mask", tuple(m.shape), tuple(bool(b) for b in m.reshape(-1).tolist()))
                except Exception:
                    self.masks[node] = ("inv", node)
            return self.masks[node]
        return ("inv", node)

    # -- building ------------------------------------------------------------------------
    def _arg(self, x, chunked, out_rank, what, n=None):
        """The tree of an argument ``x`` of an op whose result has rank ``out_rank``, chunk axis ``chunked``
        (None: one chunk's value) of size ``n``."""
        if not isinstance(x, torch.fx.Node):
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise NotDelta(f"{what} has a non-numeric argument")
            return ("num", float(x))
        v = val(x)
        if not isinstance(v, torch.Tensor):
            raise NotDelta(f"{what} has a symbolic argument")
        if chunked is not None:
            lead = out_rank - v.dim()           # x's axes are the result's last v.dim() axes
            if lead <= chunked and v.dim() > chunked - lead \
                    and known_eq(v.shape[chunked - lead], n):
                return self.whole(x, what, chunked - lead)
            if lead > chunked:                  # does not reach the chunk axis: the same value in every chunk
                return self.inv(x)
            raise NotDelta(f"{what} broadcasts a tensor against the chunk axis")
        t = self._after(x, what) if self.tail is not None else None
        if t is not None and t[0] != "inv":
            return t
        if t is None and x in self.tindex:
            return self.local(x, what)
        if t is None and x in self.body:
            raise NotDelta(f"{what} reads a value of another chunk")
        if v.dim() <= out_rank - 2:
            return self.inv(x)
        raise NotDelta(f"{what} reads a loop invariant laid over the chunk's batch axes")

    def _input(self, x, chunked, what):
        """The tree of the input of a view or slice (any rank) that keeps the chunk axis where it is."""
        if chunked is not None:
            return self.whole(x, what, chunked)
        if self.tail is not None:
            return self._after(x, what)
        if x in self.tindex:
            return self.local(x, what)
        if x in self.body:
            raise NotDelta(f"{what} reads a value of another chunk")
        return self.inv(x)

    def _shape(self, node, chunked):
        s = list(val(node).shape)
        if chunked is not None:
            del s[chunked]
        return tuple(str(d) for d in s)

    def _tree(self, node, chunked, what):
        R = val(node).dim()
        n = val(node).shape[chunked] if chunked is not None else None
        arg = lambda x: self._arg(x, chunked, R, what, n)  # noqa: E731
        if written(node):
            src = whole_write(node)
            if src is None:
                raise NotDelta(f"{what} reads a tensor written in place")
            return self._tree(src, chunked, what)
        if is_op(node, *IDENTITIES) or (is_op(node, *CASTS) and val(node).dtype == val(node.args[0]).dtype) \
                or (node.target is aten.repeat_interleave.self_int and node.args[1] == 1):
            return arg(node.args[0])
        name = _EXPR_OPS.get(node.target)
        if name is not None:
            if node.kwargs.get("alpha", 1) != 1:
                raise NotDelta(f"{what} scales a term by alpha")
            if name == "add" and is_eye(node.args[1]) and isinstance(node.args[0], torch.fx.Node) \
                    and written(node.args[0]):
                return self._forward_substitution(node.args[0], node.args[1], chunked, what)
            kids = [arg(a) for a in node.args]
            if name == "exp" and kids[0][0] == "ax":       # exp(x[..., None]) = exp(x)[..., None]
                x, axes, shape = kids[0][1:]
                return ("ax", ("exp", x), axes, shape)
            if name in ("mul", "add"):
                kids.sort(key=repr)
            return (name, *kids)
        if node.target is aten.where.ScalarOther:
            return ("where", arg(node.args[0]), arg(node.args[1]), node.args[2])
        if node.target in (aten.masked_fill.Scalar, aten.masked_fill_.Scalar):
            # masked_fill_ only on a temporary of the loop body read by nothing else (it reads as out of place)
            if node.target is aten.masked_fill_.Scalar and (chunked is not None or len(node.args[0].users) != 1):
                raise NotDelta(f"{what} fills a tensor in place that is read elsewhere")
            c = arg(node.args[1])
            c = ("mask", c[1], tuple(not b for b in c[2])) if c[0] == "mask" else ("not", c)
            return ("where", c, arg(node.args[0]), node.args[2])
        if node.target is aten.logical_not.default:
            c = arg(node.args[0])
            if c[0] == "mask":
                return ("mask", c[1], tuple(not b for b in c[2]))
            return ("not", c)
        if is_op(node, aten.tril):
            d = node.args[1] if len(node.args) > 1 else node.kwargs.get("diagonal", 0)
            return ("tril", arg(node.args[0]), d)
        if node.target is aten.select.int and isinstance(node.args[1], int):
            rx = val(node.args[0]).dim()
            d = node.args[1] % rx
            if d >= rx - 2 and not (chunked is not None and d <= chunked) \
                    and _last_index(node.args[2], val(node.args[0]).shape[d]):
                return ("last" if d == rx - 1 else "last2", self._input(node.args[0], chunked, what))
        keep = self._keeps_last(node) if node.target is aten.slice.Tensor else None
        if keep is not None and not (chunked is not None and keep <= chunked):
            axes = list(range(R - (0 if chunked is None else 1) - 1))
            axes.insert(len(axes) if keep == R - 1 else len(axes) - 1, None)
            return ("ax", ("last" if keep == R - 1 else "last2", self._input(node.args[0], chunked, what)),
                    tuple(axes), self._shape(node, chunked))
        if is_op(node, aten.einsum) and len(node.args[1]) == 2:
            return self._einsum(node, chunked, what)
        if _solve(node) and chunked == 2:
            return ("apply", ("utinv", self.whole(node.args[0], what)), self.whole(node.args[1], what))
        base, axes = axis_view(node)
        if chunked == 2 and base is not node and (len(axes) < 3 or axes[2] is None) and R >= 3 \
                and known_eq(val(node).shape[2], 1):
            # one chunk: the reshape into chunks inserts a unit chunk axis, which the whole chain of axis moves
            # reads as created; the reshape is the leaf, a move after it is read one step at a time
            if is_op(node, aten.reshape, aten.view, aten._unsafe_view):
                return ("leaf", node)
            base, axes = node.args[0], _one_move(node)
        if base is not node and isinstance(base, torch.fx.Node) and isinstance(val(base), torch.Tensor):
            b = val(base).dim()
            if chunked is not None:
                # the chunk axis may move (a vectorized column build lays the columns first): the base's
                # tree with its own chunk axis, the frame's axes renumbered without it on both sides
                src = axes[chunked] if axes is not None and len(axes) > chunked else None
                if chunked == 2 and src is not None and src != 2 and is_op(base, aten.reshape, aten.view) \
                        and val(base.args[0]).dim() < b:
                    return ("leaf", node)     # chunks laid (B, N, C, H, ·) moved to (B, H, N, C, ·): _unchunk
                if src is None:
                    raise NotDelta(f"{what} moves the chunk axis")
                axes = [None if a is None else (a if a < src else a - 1) for a in axes[:chunked] + axes[chunked + 1:]]
                inner = self.whole(base, what, src)
            else:
                inner = self._input(base, None, what)
            if inner[0] == "ax":                      # compose two axis moves
                axes = [None if a is None else inner[2][a] for a in axes]
                inner = inner[1]
            shape = self._shape(node, chunked)
            if axes == list(range(len(axes))) and len(axes) == (b if chunked is None else b - 1):
                return inner
            return ("ax", inner, tuple(axes), shape)
        if chunked == 2:
            return ("leaf", node)
        if chunked is not None:
            raise NotDelta(f"{what} moves the chunk axis (to {chunked}) around {op_name(node)}")
        raise NotDelta(f"{what} computes {op_name(node)} in the loop (not a piece of the WY form)")

    def _keeps_last(self, node):
        """The axis d when node = x[..., -1:] along one of x's last two axes d (keeping it), else None."""
        x = node.args[0]
        a = list(node.args) + [None] * (5 - len(node.args))
        r = val(x).dim()
        d, start, end, step = a[1] % r, a[2], a[3], a[4] if a[4] is not None else 1
        C = known_int(val(x).shape[d])
        ok = d >= r - 2 and step == 1 and C is not None and _last_index(start, C) \
            and (end is None or (isinstance(end, int) and end >= C))
        return d if ok else None

    def _einsum(self, node, chunked, what):
        eq = node.args[0].replace(" ", "")
        if "." in eq or "->" not in eq:
            raise NotDelta(f"{what} is an einsum with an ellipsis")
        ins, out = eq.split("->")
        ins = ins.split(",")
        a, b = node.args[1]
        if chunked == 2 and len(out) >= 3 and known_eq(val(node).shape[2], 1):
            (a, ins[0]), (b, ins[1]) = (self._unit_chunk(node, x, s, out) for x, s in ((a, ins[0]), (b, ins[1])))
        if chunked is not None:
            # the chunk letter is a batch letter of both operands (at any position: a vectorized column build
            # lays it elsewhere), read with each operand's own chunk axis
            c = out[chunked] if len(out) > chunked else None
            if c is None or out.count(c) != 1 or any(s.count(c) != 1 for s in ins) or \
                    any(val(x).dim() != len(s) for x, s in zip((a, b), ins)):
                raise NotDelta(f"{what} is an einsum that mixes the chunks")
            ta, tb = self.whole(a, what, ins[0].index(c)), self.whole(b, what, ins[1].index(c))
            ins, out = [s.replace(c, "") for s in ins], out.replace(c, "")
            if chunked == 2 and known_eq(val(node).shape[2], 1):
                # one chunk: an operand's transpose the contraction normalizer left in place (it folded the
                # unit chunk axis instead) folds into the operand's letters
                (ta, ins[0]), (tb, ins[1]) = (_fold_moves(t, s_) for t, s_ in ((ta, ins[0]), (tb, ins[1])))
        else:
            ta = self._arg(a, None, len(ins[0]), what)
            tb = self._arg(b, None, len(ins[1]), what)
        eq = _canon_eq(ins, out)
        if eq == _MM and ta[0] == "utinv":
            return ("apply", ta, tb)
        return ("ein", eq, ta, tb)

    def _unit_chunk(self, node, x, s, out):
        """(operand, letters) of an einsum ``node`` over one chunk whose operand ``x`` lost the unit chunk axis
        (the contraction normalizer folds the reshape (B, H, C, ·) -> (B, H, 1, C, ·) into the einsum): the
        program's own reshape of x that inserts the unit axis at 2, with the chunk letter at 2; when the
        normalizer left no such reshape, one inserted before ``node`` (in ``created``: erased by the caller
        unless the rewrite reads it); else as is."""
        c = out[2]
        if c in s or len(s) < 2 or s[:2] != out[:2] or not isinstance(val(x), torch.Tensor) or val(x).dim() != len(s):
            return x, s
        want = list(val(x).shape[:2]) + [1] + list(val(x).shape[2:])
        for u in x.users:
            if is_op(u, aten.reshape, aten.view, aten._unsafe_view) and u.args[0] is x \
                    and same_shape(val(u).shape, want):
                return u, s[:2] + c + s[2:]
        if not all(isinstance(d, int) for d in want) or getattr(val(x), "fake_mode", None) is None:
            return x, s
        graph = self.ctx.graph
        with graph.inserting_before(node):
            u = graph.call_function(aten.reshape.default, (x, want))
        with val(x).fake_mode:
            u.meta["val"] = aten.reshape.default(val(x), want)
        self.created.append(u)
        return u, s[:2] + c + s[2:]

    # -- the forward substitution ------------------------------------------------------------
    def _forward_substitution(self, N, eye, chunked, what):
        """("utinv", M) for T = N + I, N = −strictly_lower(M) (B, H, Nc, C, C) rewritten in place row by row
        (triangular.prove): T = (I + strictly_lower(M))⁻¹."""
        if chunked != 2 or val(N).dim() != 5:
            raise NotDelta(f"{what}: the forward substitution is not over (B, H, N, C, C) chunks")
        try:
            fs = prove(self.ctx, N, eye)
        except NotForwardSubstitution as e:
            raise NotDelta(f"{what}: {e}") from None
        self.inverses.append((N, fs.nodes))
        return ("utinv", self.whole(fs.M, what))


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
        """A loop over chunks of a WY program: it slices the result of a unit lower-triangular solve, or of a
        product with the inverse built by forward substitution (T + I, T written in place)."""
        for node, roles in zip(loop.template, loop.roles):
            if roles is not None:
                continue
            x = (_seed_key(node) or (None,))[0]
            if _solve(x):
                return True
            if is_op(x, aten.einsum) and len(x.args[1]) == 2:
                a = x.args[1][0]
                if a.target is aten.mul.Tensor and isinstance(a.args[0], torch.fx.Node):
                    a = a.args[0]      # (T + I)·diag(β): fla's β folded into the inverse as a column scale
                if a.target is aten.add.Tensor and is_eye(a.args[1]) and \
                        isinstance(a.args[0], torch.fx.Node) and written(a.args[0]):
                    return True
        return False

    def run(self):
        loop = self.loop
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
                raise NotDelta(f"the chunk loop computes {op_name(loop.template[j])} of the state besides the WY update")
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
            last = known_int(val(ys).shape[2]) - 1
            dest = vec.emit(aten.select.int, (tail["buf"], 2, last))
            vec.emit(aten.copy_.default, (dest, vec.emit(aten.select.int, (ys, 2, last))))
            for n in tail["nodes"]:
                self.graph.erase_node(n)
            ia = tail["ia"]     # the last chunk's scores masked in place (fla): impure, so erased here
            if ia.target is aten.masked_fill_.Scalar and not ia.users:
                self.graph.erase_node(ia)
        for n in sorted(body, key=self.pos.__getitem__, reverse=True):
            if not n.users:
                self.graph.erase_node(n)
        for buf in buffers:
            self._detach_buffer(buf)
        if self.cx.inverses:
            self.graph.eliminate_dead_code()
        for N, nodes in self.cx.inverses:
            erase_dead_inverse(self.graph, N, nodes)

    def _detach_buffer(self, buf):
        """``zeros_like(NV)`` (the program's output buffer, shaped like the solve's result) as ``zeros(shape)``,
        so the triangular solves and everything before them die with the loop."""
        if not is_op(buf, aten.zeros_like):
            return
        shape = [known_int(d) for d in val(buf).shape]   # (sizes pinned by the guards under dynamic shapes)
        if None in shape:
            return
        v = val(buf)
        with self.graph.inserting_before(buf):
            z = self.graph.call_function(aten.zeros.default, (shape,), {"dtype": v.dtype, "device": v.device})
        z.meta.update(buf.meta)
        buf.replace_all_uses_with(z)
        self.graph.erase_node(buf)
        forward_whole_write(self.graph, z)    # written over all of it by the op's output: read that instead

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
        S = val(loop.template[k] if k != _NO_UPDATE else loop.init[k])
        if S.dim() != 4 or loop.reverse:
            raise NotDelta("the chunk loop's state is not (B, H, K, V) or the loop runs backwards")
        used = set()
        cx = self.cx = _Chunked(self.ctx, loop, self.an, set(loop.body()))
        self._made = {}             # nodes _created inserts (in cx.created), by op and arguments
        seeds = {}

        def piece(role, name, what):
            """The tree of a per-chunk piece; the tensor over all chunks when the loop slices it (for _tail)."""
            if role[0] == "L" and loop.roles[role[1]] is None:
                key = _seed_key(self._t(role))
                seeds[name] = key[0] if key is not None and key[1] == 2 and key[2] == "select" else None
            else:
                seeds[name] = None
            return cx.role(role, what)
        if k == _NO_UPDATE:   # one chunk whose state update is dead: U = NV − KC·S is the one difference
            subs = [j for j, n in enumerate(loop.template) if loop.roles[j] is not None and self.an.deps[j]
                    and n.target is aten.sub.Tensor]
            if len(subs) != 1:
                raise NotDelta("the chunk's corrections are not NV − KC·S")
            cd = kd = _DEAD
            u_r = ("L", subs[0])
        else:
            cd, kd, u_r = self._update_plan(piece, used)
        # U = NV_n − KC_n·S
        u = self._t(u_r)
        ua = self._args(u_r)
        if u is None or u.target is not aten.sub.Tensor or u.kwargs or ua is None:
            raise NotDelta("the chunk's corrections are not NV − KC·S")
        used.add(u_r[1])
        nv = piece(ua[0], "nv", "the chunk's corrections")
        kc_r, s_r = self._matmul(ua[1], "the chunk's state correction")
        used.add(ua[1][1])
        if not self._is_state(s_r):
            raise NotDelta("the chunk's state correction does not read the state")
        kc = piece(kc_r, "kc", "the chunk's state correction")
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
        qd = piece(qd_r, "qd", "the chunk's query")
        ia = piece(ia_r, "ia", "the chunk's intra-chunk scores")
        allowed = set(used)
        # walk identity copies of the state the products read
        for j, n in enumerate(loop.template):
            if self.an.deps[j] and loop.roles[j] is not None and is_op(n, aten.clone, aten.contiguous, aten.alias) \
                    and self._is_state(("L", j)):
                allowed.add(j)
        plan = self._prove_wy(dict(cd=cd, kd=kd, nv=nv, kc=kc, qd=qd, ia=ia), allowed, ro_j)
        plan.x, plan.entries = seeds, dict(e1=ua[1][1], u=u_r[1], e2=a_r[1], e3=b_r[1], y=ro_j)
        plan.trees = dict(nv=nv, kc=kc, qd=qd, ia=ia)
        return plan

    def _update_plan(self, piece, used):
        """(cd, kd, U's role) of the new state S' = S·cd_n + Kd_nᵀ·U (no decay: S' = S + Kd_nᵀ·U, cd None)."""
        loop, k = self.loop, self.k
        new = self._args(("L", k))
        if not is_op(loop.template[k], aten.add) or new is None or len(new) != 2 or loop.template[k].kwargs:
            raise NotDelta("the new state is not the decayed state plus a chunk's write")
        for dec_r, wr_r in ((new[0], new[1]), (new[1], new[0])):
            if is_op(self._t(dec_r), aten.mul) or self._is_state(dec_r):
                break
        else:
            raise NotDelta("the new state is not the decayed state plus a chunk's write")
        used |= {k, wr_r[1]}
        if self._is_state(dec_r):
            cd = None
            if dec_r[0] == "L":
                used.add(dec_r[1])
        else:
            used.add(dec_r[1])
            m = self._args(dec_r)
            st = [i for i in (0, 1) if self._is_state(m[i])]
            if len(st) != 1:
                raise NotDelta("the chunk's decay does not multiply the state")
            cd = piece(m[1 - st[0]], "cd", "the chunk's decay")
        kd_r, u_r = self._matmul_t(wr_r, "the chunk's write")
        kd = piece(kd_r, "kd", "the chunk's write key")
        return cd, kd, u_r

    def _tail(self, plan):
        """The nodes of a last chunk left out of the loop because its state update is dead (a program that
        does not return the final state): U = NV_N−1 − KC_N−1·S, y = Qd_N−1·S + IA_N−1·U written into the
        buffer slice N−1, read from the loop's final state S and nothing else.  None when there is no such
        chunk or it differs from the loop's body in any way (it then stays as written, reading the op's
        final state)."""
        loop, t = self.loop, self.loop.template
        if self.k == _NO_UPDATE:
            return None
        S = loop.inst[loop.hi][self.k]
        C = known_int(plan.C)       # under dynamic shapes both are pinned by the guards (the loop was unrolled)
        n_chunks = known_int(val(plan.k).shape[2] // C) if C else None
        if n_chunks is None or loop.reverse or loop.hi + 1 != n_chunks - 1:
            return None
        last = loop.hi + 1
        outside = [u for u in S.users if u not in self.body]
        if len(outside) != 2:
            return None

        def same(node, j, b):
            return is_op(node, aten.einsum) and node.args[0] == t[j].args[0] and len(node.args[1]) == 2 \
                and node.args[1][1] is b

        e = plan.entries
        for e1, e2 in (outside, outside[::-1]):
            if same(e1, e["e1"], S) and same(e2, e["e2"], S) and len(e1.users) == 1 and len(e2.users) == 1 \
                    and next(iter(e1.users)).target is aten.sub.Tensor:    # e1: the correction KC·S
                break
        else:
            return None
        u = next(iter(e1.users))
        if u.target is not aten.sub.Tensor or u.kwargs or u.args[1] is not e1 or len(u.users) != 1:
            return None
        e3 = next(iter(u.users))
        if not same(e3, e["e3"], u) or len(e3.users) != 1:
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
        # the last chunk's pieces (sliced at `last` or computed after the loop) are the loop's pieces
        pieces = dict(kc=e1.args[1][0], qd=e2.args[1][0], nv=u.args[0], ia=e3.args[1][0])
        try:
            for name, node in pieces.items():
                if self.cx.after(node, last, self.pos, self.first, "the last chunk") != plan.trees[name]:
                    return None
        except NotDelta:
            return None
        return dict(buf=dest.args[0], nodes=[copy, dest, y, e3, u, e2, e1], ia=pieces["ia"])

    # -- the per-chunk tensors --------------------------------------------------------
    def _prove_wy(self, x, allowed, ro_j):
        """The per-chunk pieces (trees of _Chunked) are those of the WY / UT form of the delta rule; returns the
        plan (q, k, v, β, g over (B, H, T'), the chunk size C).  ``x["cd"]`` None: no decay (DeltaNet)."""
        nv, kc = x["nv"], x["kc"]
        vector = self._vector_system(nv)
        if vector is not None:
            return self._prove_vector(x, allowed, ro_j, *vector)
        if nv[0] != "apply" or kc[0] != "apply":
            raise NotDelta("the chunk's corrections are not products with the UT inverse "
                           "(a unit lower-triangular solve or a forward substitution)")
        U, vb_c = nv[1], nv[2]
        if kc[1] != U:
            raise NotDelta("the two triangular solves have different systems")
        M = U[1]
        dead = x["cd"] is _DEAD     # no state update: a decay shows in the system's mask alone
        gated = x["cd"] is not None if not dead else M[0] == "mul"
        # UT = (kβ_c·k_cᵀ) ⊙ L  (no decay: kβ_c·k_cᵀ); a decay per key channel went to _prove_vector
        cum = L = None
        if gated:
            sc, L = self._scores_tree(M, "the UT system")
            cum = self._decay_mask(L)
        else:
            sc = M
        kb_c, k_c = self._mmt(sc, "the UT system")
        # IA = (q_c·k_cᵀ) ⊙ L, masked to j <= i (the mask optional after a decay mask, required without one)
        ia, masked = x["ia"], False
        if ia[0] == "where" and ia[3] == 0 and self._leaf_c(k_c) is not None and \
                mask_is(self.ctx, ia[1], self._leaf_c(k_c), "lower"):
            ia, masked = ia[2], True
        if gated:
            sc2, L2 = self._scores_tree(ia, "the intra-chunk scores")
        else:
            if not masked:
                raise NotDelta("the intra-chunk scores are not masked to j <= i")
            sc2, L2 = ia, None
        q_c, k_c2 = self._mmt(sc2, "the intra-chunk scores")
        if k_c2 != k_c or L2 != L:
            raise NotDelta("the intra-chunk scores use another key or decay mask than the UT system")
        if gated:
            # KC's right side: kβ_c ⊙ e^γ ; Qd = q_c ⊙ e^γ ; Kd = k_c ⊙ e^{γ_C − γ} ; cd = e^{γ_C}
            if not self._times_col(kc[2], kb_c, ("exp", cum)):
                raise NotDelta("the decayed keys of the UT transform are not kβ ⊙ exp(cumsum g)")
            if not self._times_col(x["qd"], q_c, ("exp", cum)):
                raise NotDelta("the chunk's query is not q ⊙ exp(cumsum g)")
            kd = x["kd"]
            rest = [t for t in kd[1:] if t != k_c] if kd[0] == "mul" else []
            e = rest[0] if len(rest) == 1 and rest[0][0] == "ax" and rest[0][2] == (0, 1, 2, None) else None
            d = e[1][1] if e is not None and e[1][0] == "exp" else None
            if not dead and (d is None or d[0] != "sub" or d[2] != cum
                             or d[1][:3] != ("ax", ("last", cum), (0, 1, None))):
                raise NotDelta("the chunk's write key is not k ⊙ exp(γ_last − cumsum g)")
            cd = x["cd"]
            if not dead and (cd[0] != "ax" or cd[1] != ("exp", ("last", cum)) or cd[2] != (0, 1, None, None)):
                raise NotDelta("the chunk's decay is not exp(γ_last)")
        else:
            if kc[2] != kb_c:
                raise NotDelta("the keys of the UT transform are not kβ (without a decay)")
            if x["qd"] != q_c:
                raise NotDelta("the chunk's query is not the q of its scores (without a decay)")
            if not dead and x["kd"] != k_c:
                raise NotDelta("the chunk's write key is not the k of its scores (without a decay)")
        # un-chunk: q_c, k_c = chunks of q, k; kβ_c, vβ_c = chunks of k ⊙ β, v ⊙ β; γ = cumsum of chunks of g
        q = self._unchunk(self._leaf(q_c, "q"), "q")
        kk = self._unchunk(self._leaf(k_c, "k"), "k")
        kb = self._unchunk(self._leaf(kb_c, "kβ"), "kβ")
        vb = self._unchunk(self._leaf(vb_c, "vβ"), "vβ")
        g = None
        if gated:
            cs = self._leaf(cum, "the cumulative decay")
            if not is_op(cs, aten.cumsum) or val(cs).dim() != 4 or cs.args[1] % 4 != 3 or len(cs.args) > 2 \
                    or cs.kwargs:
                raise NotDelta("the cumulative decay is not a sum over the chunk positions")
            g = self._drop_unit(cs.args[0])
            if g is None:
                g = self._unchunk(cs.args[0], "g")
        k2, beta = self._times_beta(kb)
        v, beta2 = self._times_beta(vb)
        if k2 is not kk or beta2 is not beta or beta is None:
            raise NotDelta("kβ and vβ are not the key and the values times one β")
        C = val(self._leaf(q_c, "q")).shape[3]
        for t, name in ((q, "q"), (kk, "k"), (v, "v")):
            if val(t).dim() != 4:
                raise NotDelta(f"{name} is not (B, H, T, ·) before chunking")
        if val(beta).dim() != 3 or (g is not None and val(g).dim() != 3):
            raise NotDelta("β or g is not (B, H, T) before chunking")
        lead = val(kk).shape[:3]
        if not all(same_shape(val(t).shape[:3], lead) for t in (q, v, beta) + ((g,) if g is not None else ())) \
                or not same_shape(val(q).shape, val(kk).shape):
            raise NotDelta("q, k, v, β, g are not laid over one (B, H, T) before chunking")
        gate = "scalar" if gated else "none"
        return SimpleNamespace(q=q, k=kk, v=v, beta=beta, g=g, C=C, allowed=allowed, readout=ro_j, gate=gate)

    # -- the per-channel (KDA) form, read through index forms -------------------------------------
    @staticmethod
    def _applied(t):
        """(U, X, row scales) when the tree t is U·X with U = ("utinv", M) the UT inverse, possibly scaled by
        columns, (U·diag(β))·X = U·(β ⊙ X) (fla folds β into the inverse): the row scales of X are those
        (B, H, C) trees; else None."""
        if t[0] == "apply" and t[1][0] == "utinv":
            return t[1], t[2], ()
        if t[0] != "ein" or t[1] != _MM:
            return None
        a, x = t[2], t[3]
        if a[0] == "utinv":
            return a, x, ()
        if a[0] != "mul":
            return None
        us = [k for k in a[1:] if k[0] == "utinv"]
        cols = [k for k in a[1:] if k[0] != "utinv"]
        if len(us) != 1 or not all(k[0] == "ax" and k[2] == (0, 1, None, 2) for k in cols):
            return None
        return us[0], x, tuple(k[1] for k in cols)

    def _vector_system(self, nv):
        """(``_applied(nv)``, the index form of its system below the diagonal) when the system has a
        per-channel decay (its exponent indexed by the key channel), else None."""
        from seqfuse.passes.index_form import NoForm, form
        app = self._applied(nv)
        if app is None:
            return None
        try:
            p = form(self.ctx, app[0][1], _B + ("i", "j"), "strict_lower")
        except NoForm:
            return None
        per_channel = len(p.bound) == 1 and any(f[0] == "exp" and any(p.bound[0] in a[2] for a, _ in f[1][1])
                                                for f in p.factors)
        return (app, p) if per_channel else None

    def _scores_form(self, p, what):
        """(γ leaf, k_c leaf, (coef, row factors)) of a product-sum Σ_d rows_i,d · k_j,d · exp(γ_i,d − γ_j,d),
        the row factors indexed by (b0, b1, i, @0) or (b0, b1, i)."""
        B = _B
        if len(p.bound) != 1:
            raise NotDelta(f"{what} is not a sum over the key channels")
        d = p.bound[0]
        exps = [f for f in p.factors if f[0] == "exp"]
        if len(exps) != 1 or exps[0][1][0] != 0.0 or len(exps[0][1][1]) != 2:
            raise NotDelta(f"{what}: its decay is not exp(γ_i − γ_j) per key channel")
        (a1, c1), (a2, c2) = exps[0][1][1]
        if c1 < 0:
            (a1, c1), (a2, c2) = (a2, c2), (a1, c1)
        gamma = a1[1]
        if (c1, c2) != (1.0, -1.0) or a2[1] != gamma or a1[2] != B + ("i", d) or a2[2] != B + ("j", d) \
                or gamma[0] != "leaf" or val(gamma[1]).dim() != 5:
            raise NotDelta(f"{what}: its decay is not exp(γ_i − γ_j) of one cumulative sum per key channel")
        cols = [f for f in p.factors if f[0] == "at" and "j" in f[2]]
        rows = [f for f in p.factors if f[0] == "at" and "j" not in f[2]]
        if len(cols) + len(rows) + 1 != len(p.factors) or len(cols) != 1 or cols[0][2] != B + ("j", d) \
                or cols[0][1][0] != "leaf" or not rows \
                or not all(f[2] in (B + ("i", d), B + ("i",)) and f[1][0] == "leaf" for f in rows):
            raise NotDelta(f"{what} is not Σ_K (row pieces)_i ⊙ k_j ⊙ exp(γ_i − γ_j)")
        return gamma, cols[0][1], (p.coef, tuple(sorted(rows, key=repr)))

    def _row_form(self, t, scales, what):
        """The index form of a (B, H, C, ·) tree times row scales (B, H, C), indices (b0, b1, i, @0)."""
        from seqfuse.passes.index_form import NoForm, P, canonical, form, product
        B = _B
        try:
            p = form(self.ctx, t, B + ("i", "@0"))
        except NoForm as e:
            raise NotDelta(f"{what}: {e}") from None
        extra = [P(1.0, (), (("at", sc, B + ("i",)),)) for sc in scales]
        return canonical(product([p] + extra))

    def _pieces(self, coef_rows, what, k_leaf=None):
        """(x, β) (B, H, T, ·), (B, H, T) before chunking of row pieces: the chunks of x ⊙ β[..., None] (one
        leaf, coefficient 1) or a leaf x_c (``k_leaf`` when given) and a leaf β_c."""
        coef, rows = coef_rows
        if coef != 1.0:
            raise NotDelta(f"{what} scales its rows by a number")
        if not all(f[0] == "at" and f[1][0] == "leaf" and f[2] in (_B + ("i", "@0"), _B + ("i",)) for f in rows):
            raise NotDelta(f"{what} are not chunks laid (B, H, N, C, ·) and (B, H, N, C)")
        if len(rows) == 1 and len(rows[0][2]) == 4:
            x, beta = self._times_beta(self._unchunk(rows[0][1][1], what))
            if x is None:
                raise NotDelta(f"{what} is not x ⊙ β")
            return x, beta
        xs = [f for f in rows if len(f[2]) == 4]
        bs = [f for f in rows if len(f[2]) == 3]
        if len(xs) != 1 or len(bs) != 1 or (k_leaf is not None and xs[0][1] != k_leaf):
            raise NotDelta(f"{what} is not x ⊙ β")
        return self._unchunk(xs[0][1][1], what), self._unchunk(bs[0][1][1], "β")

    def _prove_vector(self, x, allowed, ro_j, applied, pm):
        """The KDA plan (a decay per key channel) from index forms of the pieces: the UT system
        Σ_K kβ_i ⊙ k_j ⊙ exp(γ_i − γ_j) below the diagonal, the scores Σ_K q_i ⊙ k_j ⊙ exp(γ_i − γ_j) on and
        below it and zero above, KC = U·(kβ ⊙ e^γ), NV = U·vβ, Qd = q ⊙ e^γ, Kd, cd as in ``_prove_wy``; β as
        a column scale of U is a row scale of its right side (fla), the query's scale a number.  ``applied``,
        ``pm``: NV read by ``_applied`` and U's system below the diagonal (``_vector_system``)."""
        from seqfuse.passes.index_form import ZERO, NoForm, form
        B = _B
        dead = x["cd"] is _DEAD
        (U, X_nv, s_nv), kc = applied, self._applied(x["kc"])
        if kc is None or kc[0] != U:
            raise NotDelta("the two triangular solves have different systems")
        _, X_kc, s_kc = kc
        try:
            upper = form(self.ctx, x["ia"], B + ("i", "j"), "strict_upper")
            pi = form(self.ctx, x["ia"], B + ("i", "j"), "lower")
        except NoForm as e:
            raise NotDelta(f"the UT system or the intra-chunk scores: {e}") from None
        gamma, k_c, kb_rows = self._scores_form(pm, "the UT system")
        if upper != ZERO:
            raise NotDelta("the intra-chunk scores are not zero above the diagonal")
        gamma2, k_c2, q_rows = self._scores_form(pi, "the intra-chunk scores")
        if gamma2 != gamma or k_c2 != k_c:
            raise NotDelta("the intra-chunk scores use another key or decay mask than the UT system")
        e_gamma = ("exp", (0.0, ((("at", gamma, B + ("i", "@0")), 1.0),)))
        p_kc = self._row_form(X_kc, s_kc, "the decayed keys of the UT transform")
        if p_kc.bound or p_kc.coef != kb_rows[0] or \
                tuple(sorted(p_kc.factors, key=repr)) != tuple(sorted(kb_rows[1] + (e_gamma,), key=repr)):
            raise NotDelta("the decayed keys of the UT transform are not kβ ⊙ exp(cumsum g)")
        p_qd = self._row_form(x["qd"], (), "the chunk's query")
        if p_qd.bound or p_qd.coef != q_rows[0] or \
                tuple(sorted(p_qd.factors, key=repr)) != tuple(sorted(q_rows[1] + (e_gamma,), key=repr)):
            raise NotDelta("the chunk's query is not q ⊙ exp(cumsum g)")
        p_nv = self._row_form(X_nv, s_nv, "the chunk's values")
        if p_nv.bound or any(f[0] != "at" for f in p_nv.factors):
            raise NotDelta("the chunk's values are not vβ")
        cum = gamma
        kd = x["kd"]
        rest = [t for t in kd[1:] if t != k_c] if kd[0] == "mul" else []
        d = rest[0][1] if len(rest) == 1 and rest[0][0] == "exp" else None
        if not dead and (d is None or d[0] != "sub" or d[2] != cum
                         or d[1][:3] != ("ax", ("last2", cum), (0, 1, None, 2))):
            raise NotDelta("the chunk's write key is not k ⊙ exp(γ_last − cumsum g)")
        cd = x["cd"]
        if not dead and (cd[0] != "ax" or cd[1] != ("exp", ("last2", cum)) or cd[2] != (0, 1, 2, None)):
            raise NotDelta("the chunk's decay is not exp(γ_last) along the key axis")
        kk = self._unchunk(k_c[1], "k")
        k2, beta = self._pieces(kb_rows, "the UT system's rows", k_leaf=k_c)
        v, beta2 = self._pieces((p_nv.coef, tuple(sorted(p_nv.factors, key=repr))), "the chunk's values")
        if k2 is not kk or beta2 is not beta or beta is None:
            raise NotDelta("kβ and vβ are not the key and the values times one β")
        qs = list(q_rows[1])
        if len(qs) != 1 or qs[0][2] != B + ("i", "@0"):
            raise NotDelta("the intra-chunk scores' rows are not one query")
        q = self._unchunk(qs[0][1][1], "q")
        cs = cum[1]
        if not is_op(cs, aten.cumsum) or cs.args[1] % 5 != 3 or len(cs.args) > 2 or cs.kwargs:
            raise NotDelta("the cumulative decay is not a sum over the chunk positions")
        g = self._unchunk(cs.args[0], "g")
        C = val(k_c[1]).shape[3]
        for t, name in ((q, "q"), (kk, "k"), (v, "v"), (g, "g")):
            if val(t).dim() != 4:
                raise NotDelta(f"{name} is not (B, H, T, ·) before chunking")
        if val(beta).dim() != 3:
            raise NotDelta("β is not (B, H, T) before chunking")
        if not known_eq(val(g).shape[3], val(kk).shape[3]):
            raise NotDelta("the per-channel decay does not span the key axis")
        lead = val(kk).shape[:3]
        if not all(same_shape(val(t).shape[:3], lead) for t in (q, v, beta, g)) \
                or not same_shape(val(q).shape, val(kk).shape):
            raise NotDelta("q, k, v, β, g are not laid over one (B, H, T) before chunking")
        return SimpleNamespace(q=q, k=kk, v=v, beta=beta, g=g, C=C, allowed=allowed, readout=ro_j, gate="vector",
                               q_scale=q_rows[0])

    @staticmethod
    def _leaf(t, what):
        if t[0] != "leaf":
            raise NotDelta(f"the chunks of {what} are not a tensor over the chunks")
        return t[1]

    @staticmethod
    def _leaf_c(t):
        """The chunk size C of a leaf (B, H, N, C, ·), else None."""
        return val(t[1]).shape[3] if t[0] == "leaf" and val(t[1]).dim() == 5 else None

    @staticmethod
    def _scores_tree(t, what):
        """(scores, L) of a tree (A·Bᵀ) ⊙ L."""
        if t[0] == "mul":
            for e, L in ((t[1], t[2]), (t[2], t[1])):
                if e[0] == "ein" and e[1] == _MMT:
                    return e, L
        raise NotDelta(f"{what} is not a product of scores and a decay mask")

    @staticmethod
    def _mmt(t, what):
        if t[0] != "ein" or t[1] != _MMT:
            raise NotDelta(f"{what} is not (A·Bᵀ) over the chunk positions")
        return t[2], t[3]

    @staticmethod
    def _times_col(t, x, inner) -> bool:
        """Whether t = x ⊙ inner[..., None]."""
        if t[0] != "mul":
            return False
        for a, b in ((t[1], t[2]), (t[2], t[1])):
            if a == x and b[0] == "ax" and b[1] == inner and b[2] == (0, 1, 2, None):
                return True
        return False

    def _decay_mask(self, L):
        """The cumulative decay γ (a leaf (B, H, N, C)) when L = exp(γ_i − γ_j) for j <= i, 0 above:
        exp(where(j <= i, γ_i − γ_j, −inf)) or tril(exp(tril(γ_i − γ_j)))."""
        if L[0] == "exp" and L[1][0] == "where" and L[1][3] == -math.inf:
            diff, cond = L[1][2], L[1][1]
        elif L[0] == "tril" and L[2] == 0 and L[1][0] == "exp" and L[1][1][0] == "tril" and L[1][1][2] == 0:
            diff, cond = L[1][1][1], None
        else:
            raise NotDelta("the decay mask is not exp of a masked difference of cumulative decays")
        if diff[0] != "sub" or diff[1][0] != "ax" or diff[2][0] != "ax" or diff[1][1] != diff[2][1]:
            raise NotDelta("the decay mask is not a difference of one cumulative sum")
        cum = diff[1][1]
        if diff[1][2] != (0, 1, 2, None) or diff[2][2] != (0, 1, None, 2):
            raise NotDelta("the decay mask's difference is not γ_i − γ_j (rows minus columns)")
        if cum[0] != "leaf" or val(cum[1]).dim() != 4 or known_int(val(cum[1]).shape[3]) is None:
            raise NotDelta("the decay mask is not a difference of one cumulative sum")
        if cond is not None and not mask_is(self.ctx, cond, known_int(val(cum[1]).shape[3]), "lower"):
            raise NotDelta("the decay mask keeps other positions than j <= i")
        return cum

    def _drop_unit(self, node):
        """g (B, H, T') when ``node`` is g's chunks spelled with a unit axis, squeeze(reshape(g[..., None],
        (B, H, N, C, 1)), -1) (fla's rearrange of decay[..., None]); else None."""
        if node.target in (aten.squeeze.dim, aten.squeeze.dims) and val(node.args[0]).dim() == 5 and \
                [d % 5 for d in (node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]])] == [4]:
            base, axes = node.args[0], [0, 1, 2, 3]
        else:
            base, axes = axis_view(node)
        if base is node or not is_op(base, aten.reshape, aten.view, aten._unsafe_view) or val(base).dim() != 5 \
                or axes != [0, 1, 2, 3] or not known_eq(val(base).shape[4], 1):
            return None
        src, sax = axis_view(base.args[0])
        if val(base.args[0]).dim() != 4 or sax != [0, 1, 2, None] or val(src).dim() != 3:
            return None
        s, o = val(src).shape, val(base).shape
        if not (known_eq(s[0], o[0]) and known_eq(s[1], o[1]) and known_eq(s[2], o[2] * o[3])):
            return None
        return src

    def _unchunk(self, node, what):
        """x when ``node`` is x (B, H, T', ·) reshaped to (B, H, N, C, ·) (or (B, H, T') to (B, H, N, C)); for
        chunks of x (B, T', H, ·) laid (B, N, C, H, ·) and moved to (B, H, N, C, ·) (fla's rearrange
        'b (n c) h ... -> b h n c ...'), x's transpose (B, H, T', ·), a node inserted here (in ``created``)."""
        while is_op(node, *IDENTITIES) or (is_op(node, *CASTS) and val(node).dtype == val(node.args[0]).dtype):
            node = node.args[0]
        if is_op(node, *CASTS) and val(node).device == val(node.args[0]).device:
            # the chunks cast (fla's .to(torch.float)): the same cast of the sequence, elementwise, so exact
            inner = self._unchunk(node.args[0], what)
            return self._created(aten._to_copy.default, (inner,), node, {"dtype": val(node).dtype})
        if is_op(node, aten.permute) and is_op(node.args[0], aten.reshape, aten.view):
            r = val(node).dim()
            src = node.args[0].args[0]
            s, o = val(src).shape, val(node.args[0]).shape
            if [d % r for d in node.args[1]] == [0, 3, 1, 2] + list(range(4, r)) and len(o) == len(s) + 1 \
                    and known_eq(s[0], o[0]) and known_eq(s[1], o[1] * o[2]) \
                    and all(known_eq(a, b) for a, b in zip(s[2:], o[3:])):
                return self._created(aten.transpose.int, (src, 1, 2), node.args[0])
            raise NotDelta(f"the chunks of {what} are not its time axis split into (N, C)")
        if node.target is aten.repeat_interleave.self_int and len(node.args) == 3 and node.args[2] == 1 \
                and isinstance(node.args[1], int) and not node.kwargs:
            # query / key heads repeated for grouped value heads (fla's GVA): the same repeat before chunking
            inner = self._unchunk(node.args[0], what)
            return self._created(aten.repeat_interleave.self_int, (inner, node.args[1], 1), node)
        if not is_op(node, aten.reshape, aten.view, aten._unsafe_view):
            raise NotDelta(f"the chunks of {what} are not a reshape of a sequence")
        src = chunked_from(node)
        if src is None:
            raise NotDelta(f"the chunks of {what} are not its time axis split into (N, C)")
        return src

    def _created(self, op, args, before, kwargs=None):
        """op(*args, **kwargs), inserted before ``before`` (once per op and arguments; erased when the rewrite
        fails)."""
        memo, kwargs = self._made, kwargs or {}
        key = (op, args, tuple(sorted(kwargs.items())))
        if key not in memo:
            graph = self.ctx.graph
            with graph.inserting_before(before):
                t = graph.call_function(op, args, kwargs)
            with val(args[0]).fake_mode:
                t.meta["val"] = op(val(args[0]), *args[1:], **kwargs)
            self.cx.created.append(t)
            memo[key] = t
        return memo[key]

    @staticmethod
    def _times_beta(node):
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
        if self.k == _NO_UPDATE:    # the state is only read: its dtype is the readout's, its shape (B, H, K, V)
            tmpl = loop.template[plan.readout]
            D = val(tmpl).dtype
            kv = val(plan.k).shape[:2] + (val(plan.k).shape[3], val(plan.v).shape[3])
            S0 = loop.init[self.k]
            if not isinstance(S0, torch.fx.Node) or val(S0).dtype != D or not same_shape(val(S0).shape, kv):
                raise NotDelta("the state the chunk reads is not a (B, H, K, V) tensor of the readout's dtype")
        else:
            tmpl = loop.template[self.k]
            D = val(tmpl).dtype
            kv = val(tmpl).shape
        # the loop covers chunks 0 … count-1 (a program that does not return the final state leaves the
        # last chunk's state update dead: that chunk stays as written and reads the op's final state)
        if loop.lo != 0 or vec.start != 0:
            raise NotDelta("the chunk loop does not start at the first chunk")
        steps = (vec.count + extra) * plan.C
        # under dynamic shapes Dynamo unrolled the loop for the guarded chunk count, so the chunk size, and
        # the steps the loop covers, are pinned to one value even where the padded length stays symbolic
        pinned = known_int(steps)
        steps = steps if pinned is None else pinned
        whole = known_eq(steps, val(plan.k).shape[2])
        if not whole and not isinstance(steps, int):
            raise NotDelta("the chunk loop covers a symbolic part of the chunks")
        ops = {"g": None}
        for name in ("q", "k", "v", "beta", "g"):
            x = getattr(plan, name)
            if x is None:
                continue
            if not whole:
                x = vec.emit(aten.slice.Tensor, (x, 2, 0, steps))
            ops[name] = vec.cast(vec.emit(aten.transpose.int, (x, 1, 2)), D)          # (B, T', H, ·)
        if getattr(plan, "q_scale", 1.0) != 1.0:      # the query's scale, applied where the program applies it
            ops["q"] = vec.emit(aten.mul.Tensor, (ops["q"], plan.q_scale))
        h0 = None
        init = loop.init.get(self.k)
        if not _is_zero(init):
            if not isinstance(init, torch.fx.Node) or not same_shape(val(init).shape, kv):
                raise NotDelta("the initial state is not a (B, H, K, V) tensor")
            h0 = vec.cast(init, D)
        gate = plan.gate
        # the chunked forms decay by exp(γ_i - γ_j) and exp(γ_last - γ) of a cumulative sum γ: differences
        op = Delta(q=ops["q"], k=ops["k"], v=ops["v"], beta=ops["beta"], g=ops["g"], h0=h0, gate=gate,
                   finite_only=ops["g"] is not None)
        fake = torch.ops.seqfuse.delta.default(*(val(ops[n]) for n in ("q", "k", "v", "beta")),
                                               val(ops["g"]) if ops["g"] is not None else None,
                                               val(h0) if h0 is not None else None, gate, 1.0, 64,
                                               "recurrent", "auto")
        ir = self.ctx.insert_ir(op, self.anchor, loop.inst[loop.hi][self.k] if self.k != _NO_UPDATE else tmpl)
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
