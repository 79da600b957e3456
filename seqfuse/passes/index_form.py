"""Index form of a chunk's value: what a tree of ``delta._Chunked`` computes, written with named indices.

The same per-chunk matrix is spelled many ways: transformers' chunked KDA computes the UT system as an
einsum over ``kβ[..., :, None, :] * k[..., None, :, :] * exp(where(j <= i, γ_i - γ_j, -inf))``; flash-
linear-attention builds it column by column (vectorized by ``loop_map`` into an einsum whose column index
comes first, moved last afterwards) as ``Σ_d k_c,d · exp(γ_c,d − γ_i,d) · k_i,d`` times ``β`` per row, and
masks it afterwards.  As trees they differ; written with indices they are one product-sum::

    M[b, h, i, j] = Σ_d  β[b, h, i] · k[b, h, i, d] · k[b, h, j, d] · exp(γ[b, h, i, d] − γ[b, h, j, d])

``form(tree, letters, region)`` returns that canonical product-sum: ``P(coef, bound, factors)``, the
value ``coef · Σ_bound Π factors`` with bound indices renamed canonically.  Factors are atoms indexed by
letters (``("at", tree, letters)``; ``"_"`` for a unit axis), ``("exp", lin)`` with ``lin`` a linear
combination of atoms (all exps of a product merged into one), or an unresolved ``where``.  Axis moves,
broadcasting and einsums only rename indices, so equal forms are equal values.  ``region`` restricts the
value to part of the last two indices ("lower" j <= i, "strict_lower" j < i, "strict_upper" j > i):
a ``where`` whose condition is a position mask constant over the region resolves to one branch there
(``exp(-inf)`` is 0: a product with such a factor is zero), so a mask spelled inside or outside the
exponent reads the same.  Anything else raises ``NoForm``.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from seqfuse.passes.pattern import val
from seqfuse.passes.triangular import mask_value


class NoForm(Exception):
    """The tree has no index form here (the message says which piece)."""


@dataclass(frozen=True)
class P:
    """``coef · Σ_{bound} Π factors`` (bound: sorted names; factors: sorted, hashable)."""

    coef: float
    bound: tuple
    factors: tuple

    @property
    def zero(self) -> bool:
        return self.coef == 0.0


ZERO = P(0.0, (), ())

_ATOMS = ("leaf", "inv", "mask", "utinv", "apply", "last", "last2", "tril")


def shape(t) -> tuple:
    """The sizes of a tree's value in the chunk's frame, as strings (as ``_Chunked`` writes them)."""
    kind = t[0]
    if kind == "leaf":
        s = [str(d) for d in val(t[1]).shape]
        del s[2]
        return tuple(s)
    if kind == "inv":
        return tuple(str(d) for d in val(t[1]).shape)
    if kind == "mask":
        return tuple(str(d) for d in t[1])
    if kind == "num":
        return ()
    if kind == "ax":
        return tuple(t[3])
    if kind in ("last", "last2"):
        s = list(shape(t[1]))
        del s[-1 if kind == "last" else -2]
        return tuple(s)
    if kind in ("exp", "neg", "not", "tril", "utinv"):
        return shape(t[1])
    if kind == "apply":
        return shape(t[2])
    if kind == "ein":
        ins, out = t[1].split("->")
        a, b = ins.split(",")
        sizes = dict(zip(a, shape(t[2])))
        for c, d in zip(b, shape(t[3])):
            if sizes.get(c, "1") == "1":
                sizes[c] = d
        return tuple(sizes[c] for c in out)
    if kind in ("mul", "add", "sub", "where"):
        kids = [shape(k) for k in (t[1:] if kind != "where" else t[1:3])]
        r = max(len(s) for s in kids)
        out = []
        for i in range(r):
            ds = {s[i - (r - len(s))] for s in kids if i >= r - len(s)} - {"1"}
            out.append(ds.pop() if len(ds) == 1 else ("1" if not ds else None))
            if out[-1] is None:
                raise NoForm("operands that do not broadcast")
        return tuple(out)
    raise NoForm(f"a {kind} piece")


class _Former:
    def __init__(self, ctx, region):
        self.ctx, self.region = ctx, region
        self.fresh = itertools.count()

    def letters_of(self, kid, letters, out_shape):
        """The letters of a broadcast operand: the last ones, '_' for its unit axes against non-unit sizes."""
        ks = shape(kid)
        if len(ks) > len(letters):
            raise NoForm("an operand of higher rank than its result")
        mine = letters[len(letters) - len(ks):]
        os_ = out_shape[len(out_shape) - len(ks):]
        return tuple("_" if d == "1" and o != "1" else c for c, d, o in zip(mine, ks, os_))

    def form(self, t, letters) -> P:
        kind = t[0]
        if kind == "num":
            return P(float(t[1]), (), ())
        if kind in _ATOMS:
            return P(1.0, (), (("at", t, tuple(letters)),))
        if kind == "ax":
            return self.form(t[1], self._ax_letters(t, letters))
        if kind == "neg":
            p = self.form(t[1], letters)
            return P(-p.coef, p.bound, p.factors)
        if kind == "mul":
            s = shape(t)
            return product([self.form(k, self.letters_of(k, letters, s)) for k in t[1:]])
        if kind == "exp":
            lin = self.lin(t[1], letters)
            if lin[0] == -math.inf:
                return ZERO
            return P(1.0, (), (("exp", lin),))
        if kind == "where":
            s = shape(t)
            const = self.mask_on_region(t[1], self.letters_of(t[1], letters, s))
            if const is True:
                return self.form(t[2], self.letters_of(t[2], letters, s))
            if const is False:
                if t[3] == 0:
                    return ZERO
                return P(float(t[3]), (), ())
            raise NoForm("a where whose condition is not constant over the region")
        if kind == "ein":
            ins, out = t[1].split("->")
            a, b = ins.split(",")
            names = dict(zip(out, letters))
            bound = []
            for c in sorted(set(a + b) - set(out)):
                names[c] = f"~{next(self.fresh)}"
                bound.append(names[c])
            pa = self.form(t[2], tuple(names[c] for c in a))
            pb = self.form(t[3], tuple(names[c] for c in b))
            p = product([pa, pb])
            return P(p.coef, tuple(sorted(p.bound + tuple(bound))), p.factors)
        raise NoForm(f"a {kind} piece")

    def _ax_letters(self, t, letters):
        x, axes = t[1], t[2]
        r = len(shape(x))
        out = ["_"] * r
        for pos, a in enumerate(axes):
            if a is not None:
                out[a] = letters[pos]
        return tuple(out)

    def lin(self, t, letters):
        """(constant, ((atom, coefficient), …) sorted) of a linear tree (sums, differences, negations,
        numbers, atoms; a where over the region resolved)."""
        kind = t[0]
        if kind == "num":
            return (float(t[1]), ())
        if kind in _ATOMS:
            return (0.0, ((("at", t, tuple(letters)), 1.0),))
        if kind == "ax":
            return self.lin(t[1], self._ax_letters(t, letters))
        if kind == "neg":
            c, terms = self.lin(t[1], letters)
            return (-c, tuple((a, -k) for a, k in terms))
        if kind in ("add", "sub"):
            s = shape(t)
            (c1, t1), (c2, t2) = (self.lin(k, self.letters_of(k, letters, s)) for k in t[1:3])
            sign = 1.0 if kind == "add" else -1.0
            return _lin_sum(c1, t1, sign * c2, tuple((a, sign * k) for a, k in t2))
        if kind == "mul" and len(t) == 3 and any(k[0] == "num" for k in t[1:]):
            num, x = (t[1], t[2]) if t[1][0] == "num" else (t[2], t[1])
            c, terms = self.lin(x, letters)
            return (c * num[1], tuple((a, k * num[1]) for a, k in terms))
        if kind == "where":
            s = shape(t)
            const = self.mask_on_region(t[1], self.letters_of(t[1], letters, s))
            if const is True:
                return self.lin(t[2], self.letters_of(t[2], letters, s))
            if const is False and isinstance(t[3], (int, float)):
                return (float(t[3]), ())
        raise NoForm(f"a {kind} in an exponent")

    def mask_on_region(self, cond, letters):
        """True / False when the position mask ``cond`` is that over the whole region, else None."""
        m = mask_value(self.ctx, cond)
        if m is None or self.region is None or len(letters) != m.dim():
            return None
        i, j = self.region_letters
        for d, c in enumerate(letters):       # a position mask: only the region's letters (and unit axes)
            if c not in (i, j) and m.shape[d] != 1:
                return None
        if i not in letters or j not in letters:
            return None
        m = m.reshape([m.shape[d] for d, c in enumerate(letters) if c in (i, j)])
        if [c for c in letters if c in (i, j)] == [j, i]:
            m = m.t()
        C = m.shape[0]
        if m.dim() != 2 or m.shape[1] != C:
            return None
        ii, jj = torch.meshgrid(torch.arange(C), torch.arange(C), indexing="ij")
        inside = {"lower": jj <= ii, "strict_lower": jj < ii, "strict_upper": jj > ii}[self.region]
        vals = m[inside]
        if vals.numel() == 0:
            return None
        if bool(vals.all()):
            return True
        if not bool(vals.any()):
            return False
        return None


def _lin_sum(c1, t1, c2, t2):
    acc: dict = {}
    for a, k in t1 + t2:
        acc[a] = acc.get(a, 0.0) + k
    return (c1 + c2, tuple(sorted(((a, k) for a, k in acc.items() if k != 0.0), key=repr)))


def product(ps) -> P:
    """The product of product-sums (bound indices kept apart by the caller; exponents merged)."""
    coef, bound, factors, lin = 1.0, [], [], None
    for p in ps:
        coef *= p.coef
        bound += list(p.bound)
        for f in p.factors:
            if f[0] == "exp":
                lin = f[1] if lin is None else _lin_sum(lin[0], lin[1], f[1][0], f[1][1])
            else:
                factors.append(f)
    if coef == 0.0:
        return ZERO
    if lin is not None and (lin[0] != 0.0 or lin[1]):
        factors.append(("exp", lin))
    return P(coef, tuple(bound), tuple(factors))


def _rename(x, names):
    if isinstance(x, str):
        return names.get(x, x)
    if isinstance(x, tuple) and x and x[0] == "at":
        return ("at", x[1], tuple(names.get(c, c) for c in x[2]))
    if isinstance(x, tuple):
        return tuple(_rename(e, names) for e in x)
    return x


def canonical(p: P) -> P:
    """``p`` with its bound indices named @0, @1, … in the order that sorts its factors first (the smallest
    over the orders of up to 4 bound indices; more are left as named)."""
    if not p.bound:
        return P(p.coef, (), tuple(sorted(p.factors, key=repr)))
    best = None
    orders = itertools.permutations(p.bound) if len(p.bound) <= 4 else [p.bound]
    for order in orders:
        names = {b: f"@{i}" for i, b in enumerate(order)}
        fs = tuple(sorted((_rename(f, names) for f in p.factors), key=repr))
        if best is None or repr(fs) < repr(best):
            best = fs
    return P(p.coef, tuple(f"@{i}" for i in range(len(p.bound))), best)


def form(ctx, tree, letters, region=None) -> P:
    """The canonical index form of ``tree`` with its axes named ``letters``, restricted to ``region`` of
    its last two indices (None: everywhere).  Raises NoForm."""
    f = _Former(ctx, region)
    if region is not None:
        f.region_letters = (letters[-2], letters[-1])
    if len(shape(tree)) != len(letters):
        raise NoForm("a piece of another rank")
    p = f.form(tree, tuple(letters))
    return ZERO if p.zero else canonical(p)
