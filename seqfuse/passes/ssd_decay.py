"""Proving what a position factor of a quadratic form is: a causal mask times a decay.

A *position factor* is a tensor of the product term of ``(c·bᵀ ∘ M)·x`` whose axes are
batch axes and the two time axes i (query) and j (key).  ``analyze_position`` reads
its subgraph and returns it as

    M[i, j] = Π masks(i, j) · exp(E[i, j])      with E exact on the ``valid`` regions

where each mask is a size-only (or constant) bool/0-1 tensor or a ``tril`` of the
scores, and E is a linear form over three kinds of atoms:

- ``("g", G, letters)``: a tensor G read at i or j (G = cumsum(a) gives a segment sum);
- ``("seg", A, letters)``: cumsum_i(where(j < i, A_i, 0)) = Σ_{j<x≤i} A_x, the stable segsum of
  mamba_ssm/modules/ssd_minimal.py and HF segment_sum (A_i broadcast along j by expand, einops.repeat
  or Tensor.repeat of a size-1 axis; the inner mask is proven tril(-1) at every size variant, the
  outer -inf mask makes the whole mask tril(0)).  It sums A over (j, i] directly, not as G_i - G_j:
  the op's algorithms recompute the segment sums their own way (tests compare both with fp64);
- ``("pos", letter)``: the position index i or j (an arange), for γ^(i-j) decays;
- ``("const", None, None)``: a constant term (the +1 of ``arange(T) + 1``), which must cancel
  (``(i + 1) - (j + 1)``) where the terms are resolved;
- ``("q", T, letters)`` / ``("k", T, letters)``: any other tensor read along the query (key) axis only,
  so that ``side_term_reason`` can name what the exponent holds (never lifted).

Coefficients are a constant times a product of per-batch tensors (a per-head log γ).
Nothing is evaluated numerically except size-only masks and constants, at several
sizes (the caller checks them); every other step is read off the graph's structure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from seqfuse.passes.constants import snapshot_of
from seqfuse.passes.pattern import CASTS, IDENTITIES, ancestors, arg, axis_view, concrete_sym, constant_value, \
    guards_hold, is_op, is_scalar, rank, val

aten = torch.ops.aten
UNIT = "."          # the letter of a size-1 (broadcast) axis


class NoMatch(Exception):
    """Raised with the reason a candidate is not (or not provably) an ssd."""


# --- letters through views ----------------------------------------------------------

def _is_one(n) -> bool:
    return statically_known_true(n == 1) if isinstance(n, torch.SymInt) else n == 1


def is_full_slice(node) -> bool:
    if not (isinstance(node, torch.fx.Node) and node.target is aten.slice.Tensor):
        return False
    src = node.args[0]
    d = arg(node, 1, "dim", 0) % rank(src)
    start, end, step = arg(node, 2, "start", None), arg(node, 3, "end", None), arg(node, 4, "step", 1)
    size = val(src).shape[d]
    return start in (0, None) and step == 1 and (end is None or (isinstance(end, int) and end >= 2 ** 62)
                                                  or statically_known_true(val(node).shape[d] == size))


def base_letters(node, letters: list) -> tuple[torch.fx.Node, list]:
    """Follow view chains (and full slices) back to their base; letters of the base's axes
    (UNIT for an axis of size 1)."""
    letters = list(letters)
    while isinstance(node, torch.fx.Node):
        if is_full_slice(node):
            node = node.args[0]
            continue
        b, axes = axis_view(node, broadcast=True)
        if b is node:
            break
        new = [UNIT] * rank(b)
        for k, ax in enumerate(axes):
            if ax is not None and letters[k] != UNIT:
                new[ax] = letters[k]
        node, letters = b, new
    if isinstance(node, torch.fx.Node) and isinstance(val(node), torch.Tensor):
        letters = [UNIT if _is_one(s) else c for s, c in zip(val(node).shape, letters)]
    return node, letters


def tile_as_broadcast(node, letters: list) -> tuple:
    """``aten.repeat`` that tiles only size-1 axes (and prepends axes) is a broadcast (an
    ``expand``): its source and the letters of the source's axes, UNIT on each tiled axis.
    Any other node (or a repeat that really tiles an axis longer than 1) is returned as is."""
    if not (isinstance(node, torch.fx.Node) and node.target is aten.repeat.default):
        return node, letters
    src, reps = node.args[0], list(node.args[1])
    r = rank(src)
    new = len(reps) - (r or 0)
    if r is None or new < 0 or len(letters) != len(reps):
        return node, letters
    shape, out = val(src).shape, []
    for k in range(r):
        if _is_one(reps[new + k]):
            out.append(letters[new + k])
        elif _is_one(shape[k]):
            out.append(UNIT)                        # r copies of one element: constant along the axis
        else:
            return node, letters
    return src, out                                 # prepended axes: the value does not depend on them


def aligned(operand, letters: list, result) -> list:
    """Letters of a broadcasting operand of an elementwise op whose result has ``letters``."""
    r = rank(operand) or 0
    out = list(letters[len(letters) - r:]) if r else []
    shape, rshape = val(operand).shape, val(result).shape
    for k in range(r):
        if _is_one(shape[k]) and not _is_one(rshape[len(rshape) - r + k]):
            out[k] = UNIT
    return out


# --- evaluation of size-only / constant subgraphs -------------------------------------

_RANDOM = (aten.rand, aten.randn, aten.randint, aten.bernoulli, aten.dropout, aten.empty, aten.empty_like,
           aten.rand_like, aten.randn_like, aten.normal)


def size_variants(gm) -> list:
    """Size assignments to evaluate a shape-only subgraph at: the example sizes (None) and, for a
    graph with symbolic sizes, two more where every guard of the program holds.  The small
    assignments of attention's ``_size_variants`` come first; when a guard rules them out (a
    length that must be a multiple of a symbolic chunk size, T = K·Q with K = T // Q >= 2), the
    example sizes scaled by 1/2, 2, 3 (every symbol at once, so T // Q keeps its value and
    T % Q stays 0).  Never fewer assignments than attention's: its own fill in when too few
    satisfy the guards."""
    from seqfuse.passes.attention import _size_variants
    base = _size_variants(gm)
    syms = [val(n) for n in gm.graph.nodes if n.op == "placeholder" and isinstance(val(n), torch.SymInt)]
    if len(base) == 1 or not syms:
        return base
    env = syms[0].node.shape_env
    hints = getattr(env, "backed_var_to_val", None) or env.var_to_val
    names = {str(s.node.expr): s.node.expr for s in syms}
    example = {}
    for name, expr in names.items():
        if expr in hints:
            example[name] = int(hints[expr])
    candidates = list(base[1:])
    if len(example) == len(names):
        if all(v % 2 == 0 for v in example.values()):          # the smaller masks first
            candidates.append({k: v // 2 for k, v in example.items()})
        candidates += [{k: v * 2 for k, v in example.items()}, {k: v * 3 for k, v in example.items()}]
    out = [None]
    for sizes in candidates:
        if sizes != example and guards_hold(env, sizes) and sizes not in out:
            out.append(sizes)
        if len(out) == len(base):
            return out
    # too few assignments satisfy the guards (or they cannot be read): attention's own variants
    # as before, so a mask is never proven at fewer lengths (one that cannot run there is a near miss)
    return out + [v for v in base[1:] if v not in out][:len(base) - len(out)]


def evaluable(node) -> bool:
    """Whether ``node``'s value follows from sizes and graph constants alone."""
    if not isinstance(node, torch.fx.Node) or not isinstance(val(node), torch.Tensor):
        return False
    for n in [node, *ancestors(node)]:
        if n.op == "placeholder" and isinstance(val(n), torch.Tensor):
            return False
        if n.op not in ("placeholder", "get_attr", "call_function") or is_op(n, *_RANDOM):
            return False
    return True


def evaluate(gm, node, sizes) -> torch.Tensor:
    """Run the subgraph of an ``evaluable`` node on real tensors (symbols set to ``sizes``)."""
    needed = ancestors(node) | {node}
    env: dict = {}

    def conc(x):
        if isinstance(x, torch.fx.Node):
            return env[x]
        if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return concrete_sym(x, sizes)
        if isinstance(x, (list, tuple)):
            return type(x)(conc(e) for e in x)
        return x

    for n in gm.graph.nodes:
        if n not in needed:
            continue
        if n.op == "placeholder":
            env[n] = conc(val(n))
        elif n.op == "get_attr":
            env[n] = getattr(gm, n.target)
        else:
            env[n] = n.target(*conc(n.args), **{k: conc(v) for k, v in n.kwargs.items()})
    return env[node]


# --- the analysis result ---------------------------------------------------------------

@dataclass
class Coef:
    """const · Π factors, each factor a (node, letters) tensor over batch axes only."""

    const: float = 1.0
    factors: tuple = ()

    def key(self):
        return tuple((k, id(n), tuple(l)) for k, n, l in self.factors)

    def scaled(self, c: float) -> "Coef":
        return Coef(self.const * c, self.factors)


@dataclass
class Lin:
    """E = Σ coef·atom, exact where every ``valid`` mask holds; exp(E) is 0 outside ``zero`` masks;
    ``req`` lists (mask, expected classification) a form relies on."""

    terms: list = field(default_factory=list)       # (atom, Coef)
    valid: list = field(default_factory=list)
    zero: list = field(default_factory=list)
    req: list = field(default_factory=list)

    def scaled(self, c: float, factor=None) -> "Lin":
        terms = [(a, Coef(k.const * c, k.factors + ((factor,) if factor else ()))) for a, k in self.terms]
        return Lin(terms, self.valid, self.zero, self.req)

    def plus(self, other: "Lin") -> "Lin":
        return Lin(self.terms + other.terms, self.valid + other.valid, self.zero + other.zero, self.req + other.req)


@dataclass
class Position:
    """Π masks · exp(log) (log None: no decay)."""

    masks: list = field(default_factory=list)       # ("tril", row, col, diag) | ("keep", node, letters)
    log: Lin | None = None
    nodes: list = field(default_factory=list)       # nodes read (for diagnostics)


def _op_name(node) -> str:
    t = getattr(node, "target", node)
    return str(getattr(t, "__name__", t))


class Analyzer:
    """Reads position factors; ``i`` and ``j`` are the query and key letters."""

    def __init__(self, gm, i: str, j: str, batch: list):
        self.gm, self.i, self.j, self.batch = gm, i, j, set(batch)

    def _is_01(self, node) -> bool:
        v = evaluate(self.gm, node, None)
        return v.dtype == torch.bool or bool(((v == 0) | (v == 1)).all())

    # M = Π masks · exp(E)
    def position(self, node, letters) -> Position:
        node, letters = base_letters(node, letters)
        if is_op(node, *CASTS, *IDENTITIES) and val(node.args[0]).is_floating_point() == val(node).is_floating_point():
            return self.position(node.args[0], letters)
        if evaluable(node) and (val(node).dtype == torch.bool or self._is_01(node)):
            return Position(masks=[("keep", node, letters)])   # [size-only 0/1 matrix]
        if is_op(node, aten.tril) and not evaluable(node):
            p = self.position(node.args[0], letters)
            p.masks.append(("tril", letters[-2], letters[-1], arg(node, 1, "diagonal", 0)))
            return p
        if node.target is aten.where.ScalarOther and node.args[2] == 0.0:
            keep, x = node.args[0], node.args[1]
            p = self.position(x, letters)
            p.masks.append(("keep", keep, aligned(keep, letters, node)))
            return p
        if node.target is aten.mul.Tensor and all(isinstance(a, torch.fx.Node) for a in node.args):
            a, b = (self.position(x, aligned(x, letters, node)) for x in node.args)
            log = a.log if b.log is None else b.log if a.log is None else a.log.plus(b.log)
            return Position(a.masks + b.masks, log)
        if is_op(node, aten.exp):                          # exp(E)
            return Position(log=self.lin(node.args[0], letters))
        if is_op(node, aten.exp2):                         # 2^E = exp(E·ln 2)
            return Position(log=self.lin(node.args[0], letters).scaled(math.log(2.0)))
        if node.target is aten.pow.Tensor_Tensor:          # γ^E = exp(E·log γ), γ proven in (0, 1]
            base, e = node.args
            bl = aligned(base, letters, node)
            if any(c in (self.i, self.j) for c in bl):
                raise NoMatch("a power whose base varies with position")
            self._prove_unit_interval(base)
            return Position(log=self.lin(e, aligned(e, letters, node)).scaled(1.0, ("log", base, bl)))
        if isinstance(node, torch.fx.Node) and node.op == "placeholder":
            # MiniMax's lightning attention: diagonal_decay, a buffer exp(-rate_h·(i-j)) built in
            # __init__; Dynamo lifts it as an input.  A module buffer could be read by value under a
            # value guard (seqfuse.passes.constants, as attention reads nanoGPT's mask buffer), but
            # reading a decay matrix's numbers as exp(w·(i - j)) is not done
            if snapshot_of(node) is not None:
                raise NoMatch(f"the decay mask is a precomputed module buffer ({node.name}): its values are "
                              f"not read as exp of a segment sum or a power γ^(i-j) on the lower triangle")
            raise NoMatch(f"the decay mask is a graph input ({node.name}: an argument or parameter whose "
                          f"values are not known when compiling; nothing proves it is exp of a segment sum "
                          f"or a power γ^(i-j) on the lower triangle)")
        if is_op(node, aten.select):
            # L[:, :, i] of a mask over all chunks: one step of a loop over chunks left unrolled (the
            # loops pass re-rolls 2 steps or more: a single chunk read at a constant index)
            raise NoMatch("select.int in the decay mask: one chunk of a decay mask read by a constant index "
                          "(a loop over chunks that was not re-rolled)")
        raise NoMatch(f"{_op_name(node)} in the decay mask (not a mask, exp of a segment sum or a power γ^(i-j))")

    def _scalar_factors(self, w):
        """(c, w') with w = c·w' and c the constant scalings of w (-w, w·1.0, w / 2): one factor w' for
        every spelling of a multiple of it."""
        c = 1.0
        while isinstance(w, torch.fx.Node):
            if is_op(w, aten.neg):
                w, c = w.args[0], -c
                continue
            if is_op(w, aten.mul, aten.div) and len(w.args) == 2:
                x, y = w.args
                if is_scalar(y, self.gm) and constant_value(y, self.gm) not in (None, 0) and \
                        isinstance(x, torch.fx.Node):
                    k = float(constant_value(y, self.gm))
                    w, c = x, (c / k if is_op(w, aten.div) else c * k)
                    continue
                if is_op(w, aten.mul) and is_scalar(x, self.gm) and constant_value(x, self.gm) not in (None, 0) \
                        and isinstance(y, torch.fx.Node):
                    w, c = y, c * float(constant_value(x, self.gm))
                    continue
            break
        return c, w

    def _prove_unit_interval(self, base) -> None:
        if evaluable(base):
            for sizes in size_variants(self.gm):
                v = evaluate(self.gm, base, sizes)
                if not bool(((v > 0) & (v <= 1)).all()):
                    raise NoMatch("the decay base γ is not in (0, 1]")
            return
        raise NoMatch("the decay base γ is not proven to lie in (0, 1] (log γ would be undefined for γ <= 0)")

    # E as a linear form
    def lin(self, node, letters) -> Lin:
        i, j = self.i, self.j
        node, letters = base_letters(node, letters)
        if is_op(node, *CASTS, *IDENTITIES) and val(node.args[0]).is_floating_point():
            return self.lin(node.args[0], letters)
        if is_op(node, *CASTS) and val(node).is_floating_point() and evaluable(node.args[0]) and \
                not val(node.args[0]).is_floating_point() and val(node.args[0]).dtype != torch.bool:
            # (i - j).float(): integer positions cast exactly (the masks are checked at T <= 4096)
            return self.lin(node.args[0], letters)
        t = node.target if isinstance(node, torch.fx.Node) else None
        if t in (aten.sub.Tensor, aten.add.Tensor) and arg(node, 2, "alpha", 1) == 1:
            x, y = node.args
            sign = -1.0 if t is aten.sub.Tensor else 1.0
            if isinstance(x, torch.fx.Node) and isinstance(y, (int, float)) and math.isfinite(y):
                # E + c: a constant term, kept as an atom so that the c of (i + c) - (j + c) cancels;
                # one that does not cancel is refused where the terms are resolved
                return self.lin(x, letters).plus(Lin([(("const", None, None), Coef(sign * float(y)))]))
            if not (isinstance(x, torch.fx.Node) and isinstance(y, torch.fx.Node)):
                raise NoMatch("a constant offset in the decay exponent")
            lx, ly = self.lin(x, aligned(x, letters, node)), self.lin(y, aligned(y, letters, node))
            return lx.plus(ly.scaled(sign))
        if is_op(node, aten.neg):
            return self.lin(node.args[0], letters).scaled(-1.0)
        if is_op(node, aten.mul, aten.div):
            x, y = node.args[0], node.args[1]
            if is_scalar(y, self.gm) and constant_value(y, self.gm) is not None and isinstance(x, torch.fx.Node):
                c = float(constant_value(y, self.gm))
                return self.lin(x, letters).scaled(1.0 / c if is_op(node, aten.div) else c)
            if is_op(node, aten.mul) and is_scalar(x, self.gm) and constant_value(x, self.gm) is not None:
                return self.lin(y, letters).scaled(float(constant_value(x, self.gm)))
            if node.target is aten.mul.Tensor and isinstance(x, torch.fx.Node) and isinstance(y, torch.fx.Node):
                # E·w with w a per-batch tensor (a per-head log γ); -w is -1·w, one factor w
                for e, w in ((x, y), (y, x)):
                    wl = aligned(w, letters, node)
                    if not any(c in (i, j) for c in wl) and val(w).is_floating_point():
                        sign, w = self._scalar_factors(w)
                        return self.lin(e, aligned(e, letters, node)).scaled(sign, ("t", w, wl))
            raise NoMatch("the decay exponent is multiplied by a tensor that varies with position")
        if node.target is aten.where.ScalarOther:
            keep, x, fill = node.args
            out = self.lin(x, letters)
            mask = ("keep", keep, aligned(keep, letters, node))
            if fill == -math.inf:
                return Lin(out.terms, out.valid, out.zero + [mask], out.req)
            if not math.isfinite(fill):
                raise NoMatch("the decay exponent is filled with +inf or nan outside a mask")
            return Lin(out.terms, out.valid + [mask], out.zero, out.req)
        if is_op(node, aten.tril):
            out = self.lin(node.args[0], letters)
            return Lin(out.terms, out.valid + [("tril", letters[-2], letters[-1], arg(node, 1, "diagonal", 0))],
                       out.zero, out.req)
        if is_op(node, aten.cumsum):
            d = node.args[1] % rank(node)
            src = node.args[0]
            if d < len(letters) and letters[d] == i and src.target is aten.where.ScalarOther and src.args[2] == 0.0:
                # cumsum_i(where(j < i, A_i, 0)) = Σ_{j<x≤i} A_x  (HF Mamba-2 segment_sum)
                keep, y = src.args[0], src.args[1]
                yb, yl = base_letters(y, aligned(y, letters, src))
                while True:                 # x.unsqueeze(-1).repeat(..., T): a tiling of a size-1 axis
                    tb, tl = tile_as_broadcast(yb, yl)
                    if tb is yb:
                        break
                    yb, yl = base_letters(tb, tl)
                if i in yl and j not in yl:
                    mask = ("keep", keep, aligned(keep, letters, src))
                    return Lin([(("seg", yb, tuple(yl)), Coef())], valid=[("tril", i, j, 0)], req=[(mask, ("causal", -1, 0))])
            if d < len(letters) and letters[d] in (i, j):
                return Lin([(("g", node, tuple(letters)), Coef())])
            raise NoMatch("a cumulative sum in the decay that is not along the time axis")
        if evaluable(node):
            used = [c for c in letters if c != UNIT]
            if len(used) == 1 and used[0] in (i, j):
                return Lin([(("pos", used[0], node, tuple(letters)), Coef())])
        elif isinstance(node, torch.fx.Node) and isinstance(val(node), torch.Tensor) and \
                val(node).is_floating_point():
            time = {c for c in letters if c != UNIT} & {i, j}
            if not time:
                # a per-batch tensor w alone: the constant term 1·w (exp(w·Q), a chunk's whole decay)
                c, w = self._scalar_factors(node)
                return Lin([(("const", None, None), Coef(c, (("t", w, tuple(letters)),)))])
            if len(time) == 1:
                # a tensor read along one time axis only: a per-query ("q") or per-key ("k") term of the
                # exponent; never lifted, the caller names it (side_term_reason)
                return Lin([(("q" if i in time else "k", node, tuple(letters)), Coef())])
        raise NoMatch(f"{_op_name(node)} in the decay exponent")


def side_term_reason(terms: list) -> str | None:
    """The near miss of an exponent holding per-query / per-key terms (atoms "q", "k"), or None.

    G_i - G_j of a tensor G that is not a cumulative sum is a segment sum of G's first differences,
    which the pass does not form; an unpaired per-key term I_j (an input gate) or per-query term m_i
    (a stabilizer, mLSTM's exp(B_i - B_j + I_j - m_i)) is bounded only inside the program's sum:
    moved into b or c as exp(I_j) or exp(-m_i) it can overflow where the program's exponent does not."""
    side = [(a, c) for a, c in terms if a[0] in ("q", "k")]
    if not side:
        return None
    names = {}
    for a, c in side:
        names.setdefault(id(a[1]), []).append((a, c))
    paired, single_q, single_k = [], [], []
    for group in names.values():
        kinds = sorted(a[0] for a, _ in group)
        if kinds == ["k", "q"] and group[0][1].key() == group[1][1].key() and group[0][1].const == -group[1][1].const:
            paired.append(group[0][0][1].name)
        else:
            for a, _ in group:
                (single_q if a[0] == "q" else single_k).append(a[1].name)
    parts = []
    if single_k:
        parts.append(f"a per-key term ({', '.join(single_k)}: an input gate I_j)")
    if single_q:
        parts.append(f"a per-query term ({', '.join(single_q)}: a stabilizer m_i)")
    if parts:
        why = ("as in mLSTM's exp(B_i - B_j + I_j - m_i), the exponent is bounded only as a whole; split into "
               "exp(I_j)·b or exp(-m_i)·c it can overflow where the program does not, and the ssd op has no "
               "input log-gate or stabilizer operand")
        return f"the decay exponent holds {' and '.join(parts)}: {why}"
    return (f"the decay exponent is G_i - G_j of {', '.join(paired)}, which is not a cumulative sum "
            f"(a segment sum of its first differences is not formed)")
