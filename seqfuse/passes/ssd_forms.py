"""Loop-free faces of linear recurrences -> seqfuse.ssd / seqfuse.scan.

1. Quadratic masked forms (the attention-like face of the SSD duality).  From every
   contraction the pass flattens the product term it computes: contractions (any number
   of operands), products with position factors, ``tril`` and zero-fill masks, scalar
   scalings of the scores, and cumulative sums are expanded while each step is used only
   once.  The term must read

       y[.., i, p] = s · Σ_j Σ_n c[.., i, n]·b[.., j, n] · M[.., i, j] · x[.., j, p]

   with M a product of position factors proven (seqfuse.passes.ssd_decay) to be

       [j ≤ i]                              # (c·bᵀ ∘ tril)·x             -> ssd(decay=none)
       [j ≤ i]·exp(G_i - G_j), G = cumsum a # (c·bᵀ ∘ exp(segsum a))·x    -> ssd(decay=scalar, a)
       [j ≤ i]·exp(w·(i - j))               # (c·bᵀ ∘ γ^(i-j)[i≥j])·x     -> ssd(decay=scalar, a=w=log γ)

   Masks depend on sizes only; they are evaluated at several sizes and must be exactly
   the inclusive lower triangle, or the strict one [j < i] (a strictly causal form: y_t reads
   S_{t-1}), which is the inclusive form of the keys and values one step later,
   b'_s = b_{s-1}, x'_s = x_{s-1}·exp(a_s) (zero at s = 0).  With the strict mask the exponent
   may also be RWKV's exclusive segment sum G_i - a_i - G_j = a_{j+1} + … + a_{i-1}: then a is
   shifted too and x' takes no factor.  Windows and other diagonals are near misses.
   A decay per key channel inside the sum over n (GLA's and RWKV-6's chunked intra-chunk scores,
   Σ_n q[i, n]·k[j, n]·exp(G[i, n] - G[j, n]), the product q_i ⊙ k_j split into its factors) is the
   same proof with n read as one more batch axis of the exponent:   -> ssd(decay=vector, a[t, n])
   (strict: the factor exp(a_s) goes to b', which has the key dim).
2. Cumulative-sum forms are the same term:   # cumsum_t(S)[t] = Σ_s [s ≤ t]·S[s]
   ``q_t · cumsum_t(k ⊗ v)`` flattens to Σ_{n,s} q[t,n]·k[s,n]·[s ≤ t]·v[s,p]; the exclusive
   ``cumsum_t(S) - S`` to the same with [s < t] (the strictly causal form above).
   A decay factored into the operands (q·exp(G), k·exp(-G); q·P, k/P with P a cumprod) stays
   in c and b with decay=none: that equals eager; extracting a would not be provably equal.
3. Polynomial kernels of the scores (Based's Taylor feature map):  # Σ_d w_d·(q·k)^d = φ_c(q)·φ_b(k)
   ``(P(s) ∘ [j ≤ i])·x`` with s = c·bᵀ and P(s) = Σ_{d≤2} w_d·s^d is linear attention over the
   features φ_c(c) = [w_0, w_1·c, w_2·vec(c⊗c)], φ_b(b) = [1, b, vec(b⊗b)]; its row sums Σ_j
   (P(s) ∘ [j ≤ i]) (Based's normalizer) are one more column of ones in x      -> ssd(decay=none)
4. Higher-order ops: ``torch.ops.higher_order.scan`` whose body is h' = a·h + b with output h',
   and ``associative_scan`` whose combine is (a_l·a_r, a_r·b_l + b_r)    -> scan(a, b)
   (the scanned axis 0 moves to -2).

The ssd takes x (B, T, H, P), b/c (B, T, H, N), a (B, T, H): leading batch axes are
flattened into B, the last batch axis is H; y is permuted back to the contraction's layout.
"""
from __future__ import annotations

import itertools
import operator
import string

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from seqfuse.ir.masks import classify_mask, position_mask
from seqfuse.ir.ops import SSD, Scan
from seqfuse.passes.pattern import CASTS, IDENTITIES, arg, concrete_sym, constant_value, emit_before, is_op, \
    is_scalar, rank, sym_product, val
from seqfuse.passes.registry import Pass, PassContext
from seqfuse.passes.ssd_decay import UNIT, Analyzer, Coef, NoMatch, aligned, base_letters, evaluable, evaluate, \
    side_term_reason, size_variants

aten = torch.ops.aten
MAX_MASK_ELEMENTS = 1 << 24



def _check_mask_precision(roles) -> None:
    """Refuse a decay mask computed in a narrower floating dtype than the product it weighs (an fp32
    γ^(i-j) cast to fp64 for fp64 q, k, v): the program rounds the mask's values to that dtype, the
    op computes the decays in the product's precision (a difference of ~1e-8 in an fp64 result)."""
    dtype = torch.promote_types(torch.promote_types(val(roles.x[0]).dtype, val(roles.b[0]).dtype),
                                val(roles.c[0]).dtype)
    if not dtype.is_floating_point:
        return
    eps = torch.finfo(dtype).eps
    seen, stack = set(), [leaf[0] for leaf in roles.pos]
    while stack:
        n = stack.pop()
        if not isinstance(n, torch.fx.Node) or n in seen:
            continue
        seen.add(n)
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor) and v.is_floating_point() and torch.finfo(v.dtype).eps > eps:
            raise NoMatch(f"the decay mask is computed in {str(v.dtype).replace('torch.', '')}, narrower than the "
                          f"product's {str(dtype).replace('torch.', '')}: the program rounds its values")
        stack.extend(n.all_input_nodes)

class _Silent(Exception):
    """Not the shape of a quadratic form at all: no near miss."""


# --- flattening a product term ---------------------------------------------------------

class _Term:
    """Σ over the letters not in ``out`` of Π leaves · Π masks · Π scalars."""

    def __init__(self, out: str, strict: bool):
        self.out, self.strict = out, strict
        self.leaves: list = []       # (node, letters)
        self.masks: list = []        # ("tril", r, c, d) | ("keep", node, letters)
        self.scalars: list = []      # (value, invert)
        self.consumed: list = []     # expanded nodes (each used once)
        self.blocked = False
        self.divisors: list = []     # (node, letters): the term is divided by each (read off a div by a tensor)
        self.shared: set = set()     # nodes read elsewhere too, expanded anyway (a scores operand also summed)
        self.root_names: dict = {}   # the root einsum's equation letters -> the term's letters
        self._fresh = (c for c in string.ascii_letters + "αβγδεζηθικλμνξοπρστυφχψω" if c not in out)

    def fresh(self, taken) -> str:
        for c in self._fresh:
            if c not in taken:
                return c
        raise _Silent()


def _expand_ellipsis(lhs: str, out: str, operands) -> tuple:
    """``...`` spelled out with fresh letters (einsum aligns the broadcast axes it stands for on
    the right, as broadcasting does): ('...d,...md', '...m') over (B, H, T, D), (B, H, T, M, D)
    -> ('abcd,abcmd', 'abcm')."""
    parts = lhs.split(",")
    if len(parts) != len(operands) or any(p.count("...") > 1 or p.replace("...", "").count(".") for p in parts):
        raise _Silent()
    counts = []
    for p, op in zip(parts, operands):
        r = rank(op) if isinstance(op, torch.fx.Node) else None
        if r is None:
            raise _Silent()
        counts.append(r - len(p.replace("...", "")) if "..." in p else 0)
    if any(c < 0 for c in counts):
        raise _Silent()
    used = set(lhs + out)
    fresh = [c for c in string.ascii_letters if c not in used][:max(counts)]
    if len(fresh) < max(counts):
        raise _Silent()
    parts = [p.replace("...", "".join(fresh[len(fresh) - k:] if k else [])) for p, k in zip(parts, counts)]
    return ",".join(parts), out.replace("...", "".join(fresh))


def _einsum_parts(node):
    eq = node.args[0]
    if "->" not in eq or " " in eq:
        raise _Silent()                       # implicit output: not a canonical contraction
    lhs, out = eq.split("->")
    if "." in eq:
        lhs, out = _expand_ellipsis(lhs, out, node.args[1])
    parts = lhs.split(",")
    if any(len(set(p)) != len(p) for p in parts) or len(set(out)) != len(out):
        raise _Silent()                       # a repeated letter takes a diagonal
    return parts, out


def _inplace_zero_fill(node) -> bool:
    """x.masked_fill_(drop, 0) on a temporary x read by nothing else (canonicalization leaves
    the in-place spelling alone): the same value as where(~drop, x, 0)."""
    return isinstance(node, torch.fx.Node) and node.target is aten.masked_fill_.Scalar and \
        constant_value(node.args[2]) == 0 and isinstance(node.args[0], torch.fx.Node) and \
        len(node.args[0].users) == 1 and node.args[0].op == "call_function"


def _reaches_contraction(node) -> bool:
    """Whether ``node`` is a scores chain: scalings, products, tril and zero-fill masks of a contraction."""
    if not isinstance(node, torch.fx.Node):
        return False
    if is_op(node, aten.einsum) and len(node.args[1]) >= 2:
        return True
    if is_op(node, aten.cumsum) and arg(node, 2, "dtype") is None and val(node).is_floating_point():
        return True
    if is_op(node, aten.tril) or (node.target is aten.where.ScalarOther and node.args[2] == 0.0):
        return _reaches_contraction(node.args[0] if is_op(node, aten.tril) else node.args[1])
    if _inplace_zero_fill(node):
        return _reaches_contraction(node.args[0])
    if _exclusive_cumsum(node):
        return _reaches_contraction(node.args[0])
    if is_op(node, aten.mul, aten.div) and node.target in (aten.mul.Tensor, aten.div.Tensor):
        return any(_reaches_contraction(a) for a in node.args[:1 if is_op(node, aten.div) else 2])
    return False


def _exclusive_cumsum(node) -> bool:
    """Whether ``node`` is cumsum_t(S) - S with the same S and shape (an exclusive cumulative sum)."""
    if node.target is not aten.sub.Tensor or node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2:
        return False
    cs, x = node.args
    return is_op(cs, aten.cumsum) and cs.args[0] is x and len(cs.users) == 1 and \
        isinstance(val(x), torch.Tensor) and val(cs).shape == val(node).shape == val(x).shape


def _flatten_cumsum(gm, node, letters: list, term: _Term, diagonal: int) -> None:
    """cumsum_t(S)[t] = Σ_s [s - t <= diagonal]·S[s]: a fresh summed letter s and a causal mask
    (diagonal 0 inclusive, -1 exclusive), then S at s."""
    d = node.args[1] % rank(node)
    t = letters[d]
    if t == UNIT:
        raise _Silent()
    s = term.fresh(set(letters))
    term.masks.append(("tril", t, s, diagonal))
    inner = letters[:d] + [s] + letters[d + 1:]
    src = node.args[0]
    if src.target is aten.mul.Tensor and (len(src.users) == 1 or src in term.shared) and \
            all(isinstance(x, torch.fx.Node) and isinstance(val(x), torch.Tensor) for x in src.args):
        term.consumed.append(src)          # an outer product k ⊗ v
        for x in src.args:
            _flatten(gm, x, aligned(x, inner, src), term)
        return
    return _flatten(gm, src, inner, term)


def _flatten(gm, node, letters: list, term: _Term, root: bool = False) -> None:
    if not root and _reaches_contraction(node):
        if len(node.users) > 1 and node not in term.shared:
            term.blocked = True
            if term.strict:
                term.leaves.append((node, letters))
                return
        term.consumed.append(node)
        if is_op(node, aten.cumsum):
            # cumsum_t(S)[t] = Σ_s [s <= t]·S[s]: a fresh summed letter s and a causal mask
            return _flatten_cumsum(gm, node, letters, term, 0)
        if _exclusive_cumsum(node):
            # cumsum_t(S)[t] - S[t] = Σ_s [s < t]·S[s]: the strict mask (S is read by both, once here)
            term.consumed.append(node.args[0])
            term.shared.add(node.args[1])
            return _flatten_cumsum(gm, node.args[0], letters, term, -1)
        if is_op(node, aten.einsum):
            ins, out = _einsum_parts(node)
            names = dict(zip(out, letters))
            taken = set(letters) | set("".join(ins))
            for c in "".join(ins):
                if c not in names:
                    names[c] = term.fresh(taken | set(names.values()))
            for op, l in zip(node.args[1], ins):
                _flatten(gm, op, [names[c] for c in l], term)
            return
        if is_op(node, aten.tril):
            term.masks.append(("tril", letters[-2], letters[-1], arg(node, 1, "diagonal", 0)))
            return _flatten(gm, node.args[0], letters, term)
        if node.target is aten.where.ScalarOther:
            term.masks.append(("keep", node.args[0], aligned(node.args[0], letters, node)))
            return _flatten(gm, node.args[1], letters, term)
        if _inplace_zero_fill(node):
            term.masks.append(("drop", node.args[1], aligned(node.args[1], letters, node)))
            return _flatten(gm, node.args[0], letters, term)
        a, b = node.args[0], node.args[1]
        if is_op(node, aten.div):                       # s / c: c a scalar
            if isinstance(b, torch.fx.Node) and isinstance(val(b), torch.Tensor) and not is_scalar(b, gm):
                # (Σ ...) / d = Σ (... / d) when d does not vary with a summed letter (checked once the
                # roles are known): naive_cumsum_abc's cumsum(s ⊗ k) / cumsum(s)
                if node.target is not aten.div.Tensor or not val(b).is_floating_point():
                    raise _Silent()
                term.divisors.append(base_letters(b, aligned(b, letters, node)))
                return _flatten(gm, a, letters, term)
            if not is_scalar(b, gm):
                raise _Silent()
            c = constant_value(b, gm)
            term.scalars.append((c if c is not None else b, True))
            return _flatten(gm, a, letters, term)
        for x in (a, b):
            if is_scalar(x, gm) and not (isinstance(x, torch.fx.Node) and isinstance(val(x), torch.Tensor)
                                         and constant_value(x, gm) is None):
                c = constant_value(x, gm)
                term.scalars.append((c if c is not None else x, False))
            else:
                _flatten(gm, x, aligned(x, letters, node), term)
        return
    if root:
        ins, out = _einsum_parts(node)
        names = dict(zip(out, letters))
        for c in "".join(ins):
            if c not in names:
                names[c] = term.fresh(set(names.values()) | set("".join(ins)))
        term.root_names = names
        for op, l in zip(node.args[1], ins):
            _flatten(gm, op, [names[c] for c in l], term)
        return
    if isinstance(node, torch.fx.Node) and isinstance(val(node), torch.Tensor):
        if not (val(node).is_floating_point() or val(node).dtype == torch.bool):
            raise _Silent()
        term.leaves.append(base_letters(node, letters))
        return
    if is_scalar(node, gm):
        c = constant_value(node, gm)
        term.scalars.append((c if c is not None else node, False))
        return
    raise _Silent()


# --- the gate: candidates rejected silently leave a near miss -------------------------

#: ops a quadratic or cumulative-sum form is read through (layout moves, casts, products, masks)
_READ_THROUGH = {"einsum", "mul", "div", "tril", "where", "masked_fill", "masked_fill_", "cumsum", "view", "reshape",
                 "_unsafe_view", "permute", "transpose", "t", "unsqueeze", "squeeze", "expand", "clone", "contiguous",
                 "alias", "to", "_to_copy", "type_as", "slice", "select", "unflatten", "flatten", "neg", "detach",
                 "lift_fresh_copy"}
#: ops that make the scores attention-like (a normalization over the keys): the attention pass's
#: candidates, not a recurrence's
_ATTENTION_LIKE = {"softmax", "_softmax", "log_softmax", "_log_softmax", "exp", "amax", "max", "logsumexp",
                   "sum", "mean", "sigmoid", "_safe_softmax"}
#: how far back from an einsum the gate looks for a masked product of a contraction
_GATE_DEPTH = 8


def _packet(node) -> str:
    t = node.target
    return str(getattr(getattr(t, "overloadpacket", t), "__name__", t))


def rejected_masked_product(root) -> str | None:
    """For an einsum that ``analyze_quadratic`` left silently (no quadratic form): a near miss's
    reason when one of its operands is a masked product of a contraction (a tril/triu, a position
    mask or a cumulative sum on the data path back to another contraction) through an op the
    recognizer does not read (triu, flip, relu, pow, sub, ...); None otherwise.  Paths through a
    normalization over the keys (softmax, exp, max, sum) are attention's, not a recurrence's."""
    memo: dict = {}

    def reaches(n, depth) -> bool:           # n is on a data path back to a contraction
        if not isinstance(n, torch.fx.Node) or n.op != "call_function" or depth > _GATE_DEPTH:
            return False
        if n in memo:
            return memo[n]
        memo[n] = False
        if is_op(n, aten.einsum) and len(n.args[1]) >= 2:
            memo[n] = True
        elif is_op(n, aten.cumsum) and n.args[0].target is aten.mul.Tensor \
                and all(isinstance(x, torch.fx.Node) for x in n.args[0].args):
            memo[n] = memo[n.args[0]] = True     # a cumulative sum of an outer product k ⊗ v
        else:
            memo[n] = any(reaches(a, depth + 1) for a in n.all_input_nodes
                          if isinstance(val(a), torch.Tensor) and val(a).dim() >= 2)
        return memo[n]

    if len(root.args[1]) >= 3 and any(_decay_mask(x) for x in root.args[1]) and _unit_axis(root, [root]):
        return _UNIT_AXIS            # one contraction of c, b, the mask and x (``blhn,bshn,bhls,bshp->blhp``)
    for operand in root.args[1]:
        if not reaches(operand, 0):
            continue
        masked, unread, stack, seen, ends = False, [], [operand], set(), []
        while stack:
            n = stack.pop()
            if n in seen or not memo.get(n):
                continue
            seen.add(n)
            if is_op(n, aten.einsum):
                ends.append(n)
                continue                      # the contraction itself: the path ends there
            name = _packet(n)
            if name in _ATTENTION_LIKE:
                unread = None
                break
            if name in ("tril", "triu", "where", "masked_fill", "masked_fill_", "cumsum") or \
                    any(_packet(a) in ("tril", "triu") or _decay_mask(a) for a in n.all_input_nodes
                        if not memo.get(a)):    # × tril(ones), × exp(segsum masked with -inf)
                masked = True
            if name not in _READ_THROUGH and name not in unread:
                unread.append(name)
            stack.extend(n.all_input_nodes)
        if masked and unread:
            return (f"a masked product of a contraction read through {', '.join(sorted(unread))}: not the "
                    f"quadratic form (c·bᵀ ∘ M)·x of a forward recurrence nor a cumulative sum of one")
        if masked and unread is not None and _unit_axis(root, seen):
            return _UNIT_AXIS
        if masked and unread == [] and any(_channel_weighted(e) for e in ends):
            return _CHANNEL_DECAY
    return None


_CHANNEL_DECAY = ("a masked product of scores that sum over a feature axis a product whose factors all vary along "
                  "it and both time axes (a decay per key channel inside q·k, as in GLA's or RWKV-6's chunked "
                  "forms): the quadratic form reads a decay outside the feature sum only; not lifted")


def _channel_weighted(node) -> bool:
    """Whether einsum ``node`` sums one letter of operands that all have every letter (Σ_e f·g·… over
    full tensors: scores weighted per channel), rather than a contraction of distinct operands."""
    eq = node.args[0]
    if not isinstance(eq, str) or "->" not in eq or "." in eq:
        return False
    ins, out = eq.replace(" ", "").split("->")
    ins = ins.split(",")
    return len(ins) >= 2 and len({frozenset(x) for x in ins}) == 1 and len(set(ins[0]) - set(out)) == 1


_UNIT_AXIS = ("a masked product of a contraction with a size-1 feature axis (a key or value dim of 1 reads as a "
              "broadcast, so c, b and x are not told apart): not lifted")


#: how far back from a side input of the scores' product a mask op makes it a decay mask
_MASK_DEPTH = 4
_MASK_OPS = ("tril", "triu", "where", "masked_fill", "masked_fill_", "ge", "gt", "le", "lt")


def _decay_mask(node, depth: int = 0) -> bool:
    """Whether ``node`` (a side input of a product on the scores' path) is computed through a triangular
    or position mask within a few ops: ``exp(segsum(a).masked_fill(~tril, -inf))`` and its permutes."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or depth > _MASK_DEPTH:
        return False
    if _packet(node) in _MASK_OPS:
        return True
    return any(_decay_mask(a, depth + 1) for a in node.all_input_nodes)


def _twice(shape) -> int:
    """The largest size a mask's shape has twice (its time axes), 2 if a size is symbolic (no guard is
    taken comparing symbols; such a length may exceed 1), 1 if none repeats."""
    if any(not isinstance(d, int) for d in shape):
        return 2
    return max((d for d in shape if list(shape).count(d) >= 2), default=1)


def _unit_axis(root, path) -> bool:
    """Whether the masked product ``root`` (``path``: the nodes back to its contraction) runs over more than
    one step and has a size-1 feature axis: a letter summed by ``root`` or by a contraction of ``path``
    (the key dim; the masks' time axis is longer), or ``root``'s last output axis (the value dim)."""
    masks = [m for n in path for m in [n, *n.all_input_nodes]
             if _packet(m) in ("tril", "triu", "cumsum", "where", "masked_fill", "masked_fill_")]
    side = [m for n in path for m in n.all_input_nodes if m not in path and m not in masks and _decay_mask(m)]
    lengths = [val(m).shape[m.args[1] % val(m).dim()] if _packet(m) == "cumsum" else val(m).shape[-1]
               for m in masks if isinstance(val(m), torch.Tensor) and val(m).dim() >= 1]
    # a side decay mask may be laid out with its two time axes anywhere (``exp(seg).permute(0, 2, 3, 1)``):
    # its length is a size it has twice
    lengths += [_twice(val(m).shape) for m in side if isinstance(val(m), torch.Tensor)]
    if not any(isinstance(t, int) and t > 1 for t in lengths):
        return False                                    # one step: not a recurrence at all
    if isinstance(val(root).shape[-1], int) and val(root).shape[-1] == 1:
        return True
    for n in [root, *path]:
        if not is_op(n, aten.einsum) or "->" not in n.args[0]:
            continue
        ins, out = n.args[0].replace(" ", "").split("->")
        for letters, x in zip(ins.split(","), n.args[1]):
            if isinstance(x, torch.fx.Node) and isinstance(val(x), torch.Tensor) and len(letters) == val(x).dim():
                if any(c not in out and isinstance(d, int) and d == 1 for c, d in zip(letters, val(x).shape)):
                    return True
    return False


# --- polynomial kernels of the scores --------------------------------------------------

#: the highest power of the scores read as features (degree d has N^d features)
MAX_POLY_DEGREE = 2


def _poly_add(p: dict, q: dict) -> dict:
    out = dict(p)
    for d, w in q.items():
        out[d] = out.get(d, 0.0) + w
    return out


def _poly_mul(p: dict, q: dict) -> dict:
    out: dict = {}
    for d1, w1 in p.items():
        for d2, w2 in q.items():
            out[d1 + d2] = out.get(d1 + d2, 0.0) + w1 * w2
    return out


def _polynomial_of_scores(gm, node, nodes: set) -> tuple:
    """``node`` as Σ_d w_d·s^d of one contraction s: ({d: w_d}, s); adds the nodes read to
    ``nodes``.  Raises _Silent for anything else (a constant alone, two contractions)."""
    def const(x):
        if isinstance(x, torch.fx.Node) and isinstance(val(x), torch.Tensor) and val(x).dim() > 0:
            return None
        c = constant_value(x, gm) if is_scalar(x, gm) else None
        return None if c is None or isinstance(c, bool) else float(c)

    base = []

    def walk(n) -> dict:
        if is_op(n, aten.einsum) and len(n.args[1]) == 2:
            if base and base[0] is not n:
                raise _Silent()
            base[:] = [n]
            nodes.add(n)
            return {1: 1.0}
        if not isinstance(n, torch.fx.Node) or n.op != "call_function":
            raise _Silent()
        nodes.add(n)
        t = n.target
        if t in (aten.add.Tensor, aten.sub.Tensor) and arg(n, 2, "alpha", 1) == 1:
            x, y = n.args[:2]
            sign = -1.0 if t is aten.sub.Tensor else 1.0
            cx, cy = const(x), const(y)
            px = {0: cx} if cx is not None else walk(x)
            py = {0: cy} if cy is not None else walk(y)
            return _poly_add(px, {d: sign * w for d, w in py.items()})
        if t is aten.mul.Tensor:
            x, y = n.args[:2]
            cx, cy = const(x), const(y)
            if cy is not None:
                return {d: w * cy for d, w in walk(x).items()}
            if cx is not None:
                return {d: w * cx for d, w in walk(y).items()}
            return _poly_mul(walk(x), walk(y))
        if t is aten.div.Tensor and const(n.args[1]) not in (None, 0.0):
            c = const(n.args[1])
            return {d: w / c for d, w in walk(n.args[0]).items()}
        if t is aten.neg.default:
            return {d: -w for d, w in walk(n.args[0]).items()}
        if t is aten.pow.Tensor_Scalar and isinstance(n.args[1], (int, float)) and float(n.args[1]).is_integer() \
                and 1 <= n.args[1] <= 8:
            p0 = walk(n.args[0])
            out = p0
            for _ in range(int(n.args[1]) - 1):
                out = _poly_mul(out, p0)
            return out
        raise _Silent()

    poly = walk(node)
    if not base:
        raise _Silent()
    return {d: w for d, w in poly.items() if w != 0.0}, base[0]


def _masked_scores(gm, node, letters: list, masks: list, nodes: set):
    """Strip tril / zero-fill masks from ``node`` (recording them in ``masks``): the node below."""
    while True:
        if is_op(node, aten.tril):
            masks.append(("tril", letters[-2], letters[-1], arg(node, 1, "diagonal", 0)))
        elif node.target is aten.where.ScalarOther and node.args[2] == 0.0:
            masks.append(("keep", node.args[0], aligned(node.args[0], letters, node)))
            node = node.args[1]
            nodes.add(node)
            continue
        elif _inplace_zero_fill(node) or (node.target is aten.masked_fill.Scalar and constant_value(node.args[2]) == 0):
            masks.append(("drop", node.args[1], aligned(node.args[1], letters, node)))
        else:
            return node
        node = node.args[0]
        nodes.add(node)


def _key_sum(root):
    """(A, u, axis letter) when the einsum ``root`` has two operands and one of them, A, is read by
    root and by one more node u = A.sum(axis) over an axis that root sums against the other operand
    (a normalizer Σ_j A[i, j]); None otherwise."""
    if not is_op(root, aten.einsum) or len(root.args[1]) != 2:
        return None
    try:
        parts, out = _einsum_parts(root)
    except _Silent:
        return None
    for k in (0, 1):
        a = root.args[1][k]
        if not isinstance(a, torch.fx.Node) or len(a.users) != 2 or root.args[1][1 - k] is a:
            continue
        u = next(x for x in a.users if x is not root)
        dims = arg(u, 1, "dim", None)
        if u.target is not aten.sum.dim_IntList or dims is None or len(dims) != 1 or \
                arg(u, 3, "dtype", None) is not None or u.args[0] is not a:
            continue
        letter = parts[k][dims[0] % len(parts[k])]
        if letter in parts[1 - k] and letter not in out:
            return a, u, letter
    return None


# --- roles -----------------------------------------------------------------------------

class _Roles:
    strict = False        # the mask is [j < i] (set by SSDFormsPass._check)
    exclusive = False     # the decay is the exclusive segment sum G_{i-1} - G_j (set by SSDFormsPass._resolve)
    vpos: list = []       # position factors that vary with the key dim n too: a decay per key channel
    finite_only = False   # the program's exponent is a difference (G_i - G_j, w·(i - j)): SSD.finite_only

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _letters_of(leaf) -> set:
    return {c for c in leaf[1] if c != UNIT}


def _classify(term: _Term) -> _Roles:
    """Which leaf is c, b, x, and which are position factors; raises _Silent otherwise."""
    out = term.out
    every = set().union(*(_letters_of(l) for l in term.leaves)) if term.leaves else set()
    summed = every - set(out)
    if len(summed) != 2:
        raise _Silent()
    found = []
    for j, n in itertools.permutations(sorted(summed)):
        with_n = [l for l in term.leaves if n in _letters_of(l)]
        cs = [l for l in with_n if j not in _letters_of(l)]
        bs = [l for l in with_n if j in _letters_of(l)]
        vpos = []
        if len(cs) == 1 and len(bs) == 2:
            # a decay per key channel inside the sum over n (GLA's, RWKV-6's chunked forms): the factor whose
            # letters hold the other one's and the query's letter too (checked once i is known)
            big = [l for l in bs if _letters_of(l) > _letters_of(bs[1 - bs.index(l)])]
            if len(big) == 1:
                vpos, bs = big, [l for l in bs if l is not big[0]]
        if len(cs) != 1 or len(bs) != 1 or len(with_n) != 2 + len(vpos):
            continue
        rest = [l for l in term.leaves if n not in _letters_of(l)]
        c, b = cs[0], bs[0]
        lc, lb = _letters_of(c), _letters_of(b)
        # x: the leaf with j and an output letter p that only it has
        for x in [l for l in rest if j in _letters_of(l)]:
            pos = [l for l in rest if l is not x]
            others = lc | lb | set().union(*(_letters_of(l) for l in pos)) if pos else lc | lb
            ps = [ch for ch in out if ch in _letters_of(x) and ch not in others]
            if not ps:
                continue
            p = ps[-1]
            cand_i = [ch for ch in out if ch in lc and ch not in lb and ch not in _letters_of(x)]
            if len(cand_i) > 1:
                near = set().union(*(_letters_of(l) for l in pos)) if pos else set()
                near |= {m[1] for m in term.masks if m[0] == "tril"} | {m[2] for m in term.masks if m[0] == "tril"}
                cand_i = [ch for ch in cand_i if ch in near]
            if len(cand_i) != 1:
                continue
            i = cand_i[0]
            batch = [ch for ch in out if ch not in (i, p)]
            ok = (lc <= set(batch) | {i, n} and lb <= set(batch) | {j, n} and _letters_of(x) <= set(batch) | {j, p}
                  and all(_letters_of(l) <= set(batch) | {i, j} for l in pos)
                  and all(i in _letters_of(l) and _letters_of(l) <= set(batch) | {i, j, n} for l in vpos))
            if ok:
                found.append(_Roles(i=i, j=j, n=n, p=p, batch=batch, c=c, b=b, x=x, pos=pos, vpos=vpos))
    # the term is symmetric under reading x·bᵀ·c backwards: take the reading whose masks are over (i, j)
    for r in found:
        if all({m[1], m[2]} == {r.i, r.j} for m in term.masks if m[0] == "tril"):
            return r
    if found:
        return found[0]
    raise _Silent()


def _value_of(node):
    """``node`` past casts to its own dtype and identity copies (``x.float()`` of an fp32 x): the same values."""
    while isinstance(node, torch.fx.Node) and is_op(node, *CASTS, *IDENTITIES) and \
            isinstance(node.args[0], torch.fx.Node) and isinstance(val(node.args[0]), torch.Tensor) and \
            val(node.args[0]).dtype == val(node).dtype and list(val(node.args[0]).shape) == list(val(node).shape):
        node = node.args[0]
    return node


def _split_products(term: _Term, floating_only: bool = False) -> bool:
    """Split leaves that are elementwise products of two tensors into their factors (a product of leaves is a
    product term either way; q_i ⊙ k_j formed before the sum over the key dim, as RWKV-6's chunked form writes
    its scores); with ``floating_only`` only products of floating factors.  Whether any was split."""
    out, todo, split = [], list(term.leaves), False
    while todo:
        node, letters = todo.pop()
        if isinstance(node, torch.fx.Node) and node.target is aten.mul.Tensor and \
                all(isinstance(x, torch.fx.Node) and isinstance(val(x), torch.Tensor)
                    and (val(x).is_floating_point() or not floating_only) for x in node.args):
            todo.extend(base_letters(x, aligned(x, letters, node)) for x in node.args)
            split = True
            continue
        out.append((node, letters))
    term.leaves = out[::-1]
    return split


def _classify_split(term: _Term) -> _Roles:
    """``_classify``, trying again with product leaves split into their factors when it fails."""
    try:
        return _classify(term)
    except _Silent:
        if not _split_products(term, floating_only=True):
            raise
    return _classify(term)


def _place_divisors(term: _Term, roles) -> dict:
    """Which operand each divisor of the term divides: {"y" | "c" | "x" | "b": [(node, letters)]}.
    A divisor over batch axes, i and the output's p divides y after the sum (Σ_j f(j)/d_i =
    (Σ_j f(j))/d_i); over batch axes, i and the key dim n it divides c; over j and p, x; over j and
    n, b.  One that varies with both time axes (or with p and n together) is a near miss."""
    axes = {"y": {roles.i, roles.p}, "c": {roles.i, roles.n}, "x": {roles.j, roles.p}, "b": {roles.j, roles.n}}
    out = {k: [] for k in axes}
    for leaf in term.divisors:
        ls = _letters_of(leaf) - set(roles.batch)
        where = next((k for k, a in axes.items() if ls <= a), None)
        if where is None:
            raise NoMatch("the product is divided by a tensor over both time axes (or over the key dim and the "
                          "output dim together): the division is not a factor of one operand")
        out[where].append(leaf)
    dt = val(roles.x[0]).dtype
    if any(out[k] for k in ("c", "x", "b")) and dt.is_floating_point and \
            torch.finfo(dt).max < torch.finfo(torch.float32).max:
        # c/d can overflow where the program's (Σ ...)/d does not (a small d): fp16's range is 65504
        raise NoMatch(f"a division moved into an operand in {str(dt).replace('torch.', '')}: c/d or x/d can "
                      f"overflow where the program's quotient does not")
    return out


# --- masks -----------------------------------------------------------------------------

def _mask_matrix(gm, spec, roles, sizes, t: int) -> torch.Tensor:
    """A mask spec as a bool (T, T) matrix over (i, j) at the given sizes."""
    i, j = roles.i, roles.j
    if spec[0] == "tril":
        _, r, c, d = spec
        if (r, c) == (i, j):
            return position_mask(t, t, "causal", d)
        if (r, c) == (j, i):
            return position_mask(t, t, "causal", d).T
        raise NoMatch("a tril over axes other than the two time axes")
    kind, node, letters = spec
    if not evaluable(node):
        raise NoMatch("a mask that depends on tensor values, not only on positions")
    m = evaluate(gm, node, sizes)
    if m.numel() > MAX_MASK_ELEMENTS:
        raise NoMatch("the mask is too large to check")
    if m.dtype != torch.bool:
        if not bool(((m == 0) | (m == 1)).all()):
            raise NoMatch("a mask factor with values other than 0 and 1")
        m = m != 0
    if kind == "drop":
        m = ~m
    for k, ch in enumerate(letters):
        if ch == UNIT or ch not in (i, j):
            if ch not in (UNIT, *roles.batch):
                raise NoMatch("a mask over an axis that is not a time or batch axis")
            first = m.narrow(k, 0, 1)
            if not bool((m == first).all()):
                raise NoMatch("the mask differs between batch entries (heads): not one positional mask")
    idx = [0 if (ch == UNIT or ch not in (i, j)) else slice(None) for ch in letters]
    m = m[tuple(idx)]
    present = [ch for ch in letters if ch in (i, j)]
    if present == [j, i]:
        m = m.T
    elif present == [i]:
        m = m[:, None]
    elif present == [j]:
        m = m[None, :]
    elif not present:
        m = m.reshape(1, 1)
    return torch.broadcast_to(m, (t, t))


def _size_variants(gm):
    """The sizes a mask is proven at (seqfuse.passes.ssd_decay.size_variants: the program's guards hold)."""
    return size_variants(gm)


# --- scan higher-order op ----------------------------------------------------------------

_SCAN_HOP = getattr(torch.ops.higher_order, "scan", None)
_ZEROS = (aten.zeros_like, aten.zeros, aten.new_zeros)


_ASSOC_SCAN_HOP = getattr(torch.ops.higher_order, "associative_scan", None)


def _commutes(node, target, x, y) -> bool:
    """Whether node = target(x, y) or target(y, x) (add with alpha 1)."""
    return isinstance(node, torch.fx.Node) and node.target is target and arg(node, 2, "alpha", 1) == 1 \
        and set(node.args[:2]) == {x, y} and len(node.args[:2]) == 2 and x is not y


def linear_combine(combine: torch.fx.GraphModule) -> bool:
    """Whether an associative_scan combine graph ((a_l, b_l), (a_r, b_r)) -> (a_l·a_r, a_r·b_l + b_r):
    the composition of two steps h -> a·h + b, left (earlier) first."""
    ph = [n for n in combine.graph.nodes if n.op == "placeholder"]
    out = next(n for n in combine.graph.nodes if n.op == "output").args[0]
    if len(ph) != 4 or len(out) != 2:
        return False
    a_l, b_l, a_r, b_r = ph
    prod, acc = out
    if not _commutes(prod, aten.mul.Tensor, a_l, a_r) or acc.target is not aten.add.Tensor or \
            arg(acc, 2, "alpha", 1) != 1:
        return False
    for m, bias in (acc.args[:2], acc.args[1::-1]):
        if bias is b_r and _commutes(m, aten.mul.Tensor, a_r, b_l):
            return True
    return False


def _is_zero(node) -> bool:
    """Whether a scan's initial carry is all zeros (then the op starts from h0 = 0)."""
    if is_op(node, *_ZEROS):
        return True
    if is_op(node, aten.full, aten.full_like, aten.new_full):
        return constant_value(node.args[-1]) == 0
    return False


def linear_scan_body(body: torch.fx.GraphModule, n_carry: int = 1):
    """For a scan body (h, x0, x1) -> (h', y): the indices (of a, b among the xs) when
    h' = a·h + b and y = h'; None otherwise.         # h_t = a_t ⊙ h_{t-1} + b_t"""
    ph = [n for n in body.graph.nodes if n.op == "placeholder"]
    out = next(n for n in body.graph.nodes if n.op == "output").args[0]
    if len(ph) != n_carry + 2 or len(out) != 2 or n_carry != 1:
        return None
    h, xs = ph[0], ph[1:]
    new, y = out
    while is_op(y, aten.clone, aten.alias, aten.view_as) and y is not new:
        y = y.args[0]
    if y is not new or new.target is not aten.add.Tensor or arg(new, 2, "alpha", 1) != 1:
        return None
    for prod, bias in (new.args, new.args[::-1]):
        if isinstance(prod, torch.fx.Node) and prod.target is aten.mul.Tensor and bias in xs:
            others = [x for x in prod.args if x is not h]
            if len(others) == 1 and h in prod.args and others[0] in xs and others[0] is not bias:
                return xs.index(others[0]), xs.index(bias)
    return None


def ssd_value(x, b, c) -> tuple:
    """The fake (y (B, T, H, P), h (B, H, P, N)) of an ssd on the (B, T, H, ·) operands x, b, c:
    both in the promoted dtype of the three."""
    xv, bv, cv = val(x), val(b), val(c)
    dtype = torch.promote_types(torch.promote_types(xv.dtype, bv.dtype), cv.dtype)
    bs, t, h, p = xv.shape
    return xv.new_empty((bs, t, h, p), dtype=dtype), xv.new_empty((bs, h, p, bv.shape[-1]), dtype=dtype)


# --- the pass --------------------------------------------------------------------------

class SSDFormsPass(Pass):
    """Recognize the closed (loop-free) forms of linear recurrences."""

    name = "ssd_forms"

    def run(self, ctx: PassContext) -> None:
        for node in list(ctx.graph.nodes):
            if node.graph is not ctx.graph or not node.users:
                continue
            if node.target in (_SCAN_HOP, _ASSOC_SCAN_HOP) and node.target is not None:
                try:
                    (self._scan_hop if node.target is _SCAN_HOP else self._assoc_scan_hop)(ctx, node)
                except NoMatch as e:
                    ctx.report.add_near_miss("scan", str(e), node)
                continue
            if not is_op(node, aten.einsum):
                continue
            try:
                try:
                    self._quadratic(ctx, node)
                except _Silent:
                    self._polynomial(ctx, node)
            except _Silent:
                reason = rejected_masked_product(node)
                if reason is not None:          # the gate: no candidate rejected without a reason
                    ctx.report.add_near_miss("ssd", reason, node)
            except NoMatch as e:
                ctx.report.add_near_miss("ssd", str(e), node)
        ctx.graph.eliminate_dead_code()
        ctx.gm.recompile()

    # scan(h' = a·h + b, init, (a, b)) -> scan
    def _scan_hop(self, ctx: PassContext, node: torch.fx.Node) -> None:
        gm = ctx.gm
        body_node, init, xs, extra = node.args[:4]
        body = getattr(gm, body_node.target, None) if body_node.op == "get_attr" else None
        if not isinstance(body, torch.fx.GraphModule) or len(init) != 1 or len(xs) != 2 or len(extra):
            raise NoMatch("a scan whose body is not one carry updated from two scanned inputs")
        ab = linear_scan_body(body)
        if ab is None:
            raise NoMatch("the scan body is not the linear recurrence h' = a·h + b with output h'")
        a, b = xs[ab[0]], xs[ab[1]]
        h0 = init[0]
        vh = val(h0)
        if list(val(a).shape[1:]) != list(vh.shape) or val(a).dtype != vh.dtype:
            raise NoMatch("the scanned inputs and the carry differ in shape or dtype")
        self._emit_scan(ctx, node, a, b, None if _is_zero(h0) else h0, {0: "h", 1: "y"})

    # associative_scan((a_l·a_r, a_r·b_l + b_r), (a, b)) -> scan      (all states h_t, h_{-1} = 0)
    def _assoc_scan_hop(self, ctx: PassContext, node: torch.fx.Node) -> None:
        gm = ctx.gm
        combine_node, xs, extra = node.args[:3]
        combine = getattr(gm, combine_node.target, None) if combine_node.op == "get_attr" else None
        if not isinstance(combine, torch.fx.GraphModule) or len(xs) != 2 or len(extra):
            raise NoMatch("an associative_scan over other than the pair (a, b)")
        if not linear_combine(combine):
            raise NoMatch("the associative_scan combine_fn is not (a_l·a_r, a_r·b_l + b_r), "
                          "the composition of two linear recurrence steps")
        self._emit_scan(ctx, node, xs[0], xs[1], None, {1: "y"})

    def _emit_scan(self, ctx, node, a, b, h0, results: dict) -> None:
        """Replace a HOP scanning axis 0 by seqfuse.scan; ``results`` maps the HOP's result
        indices to "y" (all states, (T, *R, N)) or "h" (the final state)."""
        graph = ctx.graph
        va, vb = val(a), val(b)
        if list(va.shape) != list(vb.shape) or va.dtype != vb.dtype or not va.is_floating_point():
            raise NoMatch("the scanned a and b differ in shape or dtype")
        for user in node.users:
            if user.target is not operator.getitem or user.args[1] not in results:
                raise NoMatch("a result of the scan that the recurrence does not give is used "
                              "(the cumulative product of a, or the whole tuple)")
        r = va.dim()
        if r < 2:
            raise NoMatch("a scan of scalars (no state axis)")
        perm = list(range(1, r - 1)) + [0, r - 1]       # (T, *R, N) -> (*R, T, N)
        a = self._emit(graph, node, aten.permute.default, (a, perm), node)
        b = self._emit(graph, node, aten.permute.default, (b, perm), node)
        op = Scan(a=a, b=b, h0=h0)
        ir = ctx.insert_ir(op, node, node)
        ir.meta["val"] = (val(a).new_empty(val(a).shape), va.new_empty((*va.shape[1:],)))
        back = [r - 2] + list(range(r - 2)) + [r - 1]    # (*R, T, N) -> (T, *R, N)
        for user in list(node.users):
            if results[user.args[1]] == "h":
                new = self._emit(graph, user, operator.getitem, (ir, 1), user)
            else:
                y = self._emit(graph, user, operator.getitem, (ir, 0), user)
                new = self._emit(graph, user, aten.permute.default, (y, back), user)
            user.replace_all_uses_with(new)

    # (c·bᵀ ∘ M)·x -> ssd
    def _quadratic(self, ctx: PassContext, root: torch.fx.Node) -> None:
        term, roles, decay = self.analyze_quadratic(ctx.gm, root, strict_ok=True)
        self._build(ctx, root, roles, term, decay)

    # (P(c·bᵀ) ∘ [j <= i])·x -> ssd over polynomial features (Based)
    def _polynomial(self, ctx: PassContext, root: torch.fx.Node) -> None:
        """``root`` = einsum(A, x) with A a causally masked polynomial Σ_d w_d·s^d (degree <= 2, not
        a plain multiple of s) of a contraction s = c·bᵀ; A read by root and at most one sum over
        the keys (a normalizer).  Raises _Silent when root is not such a form, NoMatch with the
        reason when it nearly is."""
        gm = ctx.gm
        if len(root.args[1]) != 2:
            raise _Silent()
        parts, out = _einsum_parts(root)
        for ka in (0, 1):
            la, lv = parts[ka], parts[1 - ka]
            A, xv = root.args[1][ka], root.args[1][1 - ka]
            summed = [ch for ch in la if ch in lv and ch not in out]
            qs = [ch for ch in la if ch in out and ch not in lv]
            ps = [ch for ch in lv if ch in out and ch not in la]
            if len(summed) == 1 and len(qs) == 1 and len(ps) == 1 and isinstance(A, torch.fx.Node):
                break
        else:
            raise _Silent()
        i, j, p = qs[0], summed[0], ps[0]
        batch = [ch for ch in out if ch not in (i, p)]
        if set(la) != set(batch) | {i, j} or not set(lv) <= set(batch) | {j, p}:
            raise _Silent()
        la = list(la)
        nodes, masks = set(), []
        poly_node = _masked_scores(gm, A, la, masks, nodes)
        poly, s = _polynomial_of_scores(gm, poly_node, nodes)
        if not masks or set(poly) <= {1} or not poly:
            raise _Silent()                        # no mask, or a plain (scaled) quadratic form
        if max(poly) > MAX_POLY_DEGREE or min(poly) < 0:
            raise NoMatch(f"a polynomial of the scores of degree {max(poly)} (features are formed up to "
                          f"degree {MAX_POLY_DEGREE})")
        if list(val(s).shape) != list(val(poly_node).shape):
            raise NoMatch("the polynomial of the scores broadcasts them")
        # s = σ·Σ_n c[i, n]·b[j, n]
        term = _Term("".join(la), strict=True)
        _flatten(gm, s, la, term, root=True)
        every = set().union(*(_letters_of(leaf) for leaf in term.leaves)) if term.leaves else set()
        if len(term.leaves) != 2 or term.masks or term.divisors or len(every - set(la)) != 1:
            raise NoMatch("the scores under the polynomial are not one contraction c·bᵀ over a key dim")
        n = next(iter(every - set(la)))
        cs = [leaf for leaf in term.leaves if i in _letters_of(leaf) and j not in _letters_of(leaf)]
        bs = [leaf for leaf in term.leaves if j in _letters_of(leaf) and i not in _letters_of(leaf)]
        if len(cs) != 1 or len(bs) != 1 or not _letters_of(cs[0]) <= set(batch) | {i, n} or \
                not _letters_of(bs[0]) <= set(batch) | {j, n}:
            raise NoMatch("the scores under the polynomial are not c·bᵀ with c over the queries, b over the keys")
        # who reads what: the polynomial's nodes only each other, A only root and one sum over the keys
        norm = [u for u in A.users if u is not root]
        for u in norm:
            dims = arg(u, 1, "dim", None)
            if not (u.target is aten.sum.dim_IntList and dims is not None and len(dims) == 1 and
                    dims[0] % len(la) == la.index(j) and arg(u, 3, "dtype", None) is None and len(norm) == 1):
                raise NoMatch("the masked polynomial scores are also used elsewhere than their product with x "
                              "and one sum over the keys")
        for nd in nodes | {A}:
            extra = [u for u in nd.users if u not in nodes and u is not A and u is not root and u not in norm]
            if extra:
                raise NoMatch("the scores (or a power of them) are also returned or used elsewhere")
        xl = base_letters(xv, list(lv))
        roles = _Roles(i=i, j=j, n=n, p=p, batch=batch, c=cs[0], b=bs[0], x=xl, pos=[], a_letters=la)
        dt = val(root).dtype
        if any(val(leaf[0]).dtype != dt for leaf in (cs[0], bs[0], xl)) or not dt.is_floating_point:
            raise NoMatch("the polynomial kernel's operands differ in dtype from its result")
        if max(poly) >= 2 and torch.finfo(dt).max < torch.finfo(torch.float32).max:
            # c_a·c_b can overflow where (c·b)² does not (large q, small k): fp16's range is 65504
            raise NoMatch(f"a square of the scores in {str(dt).replace('torch.', '')}: the features vec(c⊗c) can "
                          f"overflow where the program's (c·b)² does not")
        self._check(gm, roles, masks, None, val(cs[0][0]).shape[cs[0][1].index(i)])
        _check_mask_precision(roles)
        self._build_polynomial(ctx, root, roles, term, poly, norm[0] if norm else None)

    def _build_polynomial(self, ctx, root, roles, term, poly: dict, norm) -> None:
        graph, i, j = ctx.graph, roles.i, roles.j
        emit = self._emit
        x = self._layout(graph, root, roles, *roles.x, j, roles.p, root)
        b = self._layout(graph, root, roles, *roles.b, j, roles.n, root)
        c = self._layout(graph, root, roles, *roles.c, i, roles.n, root)
        scale = sym_product(graph, term.scalars, root) if term.scalars else 1.0
        if isinstance(scale, torch.fx.Node) or scale != 1.0:
            c = emit(graph, root, aten.mul.Tensor, (c, scale), root)

        def features(u, weights: bool):
            # φ(u) = [w_0, w_1·u, w_2·vec(u ⊗ u)] (weights) or [1, u, vec(u ⊗ u)]
            parts = []
            for d in sorted(poly):
                w = poly[d] if weights else 1.0
                if d == 0:
                    one = emit(graph, root, aten.slice.Tensor, (u, -1, 0, 1), root)
                    f = emit(graph, root, aten.full_like.default, (one, w), root)
                else:
                    f = u
                    if d == 2:
                        f = emit(graph, root, aten.mul.Tensor, (emit(graph, root, aten.unsqueeze.default, (u, -1), root),
                                                                emit(graph, root, aten.unsqueeze.default, (u, -2), root)), root)
                        f = emit(graph, root, aten.flatten.using_ints, (f, 3, 4), root)
                    if w != 1.0:
                        f = emit(graph, root, aten.mul.Tensor, (f, w), root)
                parts.append(f)
            return parts[0] if len(parts) == 1 else emit(graph, root, aten.cat.default, (parts, -1), root)

        c, b = features(c, True), features(b, False)
        if norm is not None:                        # Σ_j A[i, j] = (A·1)[i]: a column of ones in x
            x = self._ones_column(graph, root, x)
        op = SSD(x=x, b=b, c=c, a=None, decay="none")
        ir = ctx.insert_ir(op, root, root)
        ir.meta["val"] = ssd_value(x, b, c)
        y = emit(graph, root, operator.getitem, (ir, 0), root)
        lead, head = roles.batch[:-1], roles.batch[-1:]
        if norm is not None:
            y = self._split_key_sum(graph, root, roles, y, norm, roles.a_letters)
        y = self.from_layout(graph, root, roles, y, 2, root)
        order = lead + [i] + head + [roles.p]
        perm = [order.index(ch) for ch in _einsum_parts(root)[1]]
        if perm != list(range(len(perm))):
            y = emit(graph, root, aten.permute.default, (y, perm), root)
        if val(y).dtype != val(root).dtype:
            y = emit(graph, root, aten.to.dtype, (y, val(root).dtype), root)
        root.replace_all_uses_with(y)

    def analyze_quadratic(self, gm, root: torch.fx.Node, strict_ok: bool = False):
        """Read the einsum ``root`` as s·(c·bᵀ ∘ M)·x with M proven [j <= i]·exp(E): returns
        (term, roles, decay), decay None or (Coef, (seq node, letters) or None).  Raises
        _Silent when it is not such a form, NoMatch (with the reason) when it nearly is.
        With ``strict_ok`` the strictly lower triangle [j < i] is accepted too (``roles.strict``:
        a strictly causal form, which ``_build`` runs as an ssd of the inputs shifted by one step)."""
        out = _einsum_parts(root)[1]
        term = _Term(out, strict=True)
        key_sum = _key_sum(root)
        if key_sum is not None and _reaches_contraction(key_sum[0]):
            term.shared = {key_sum[0]}
        else:
            key_sum = None
        _flatten(gm, root, list(out), term, root=True)
        if not term.consumed and not term.blocked and len(root.args[1]) == 2:
            raise _Silent()                     # a single contraction: nothing masked in it
        try:
            roles = _classify_split(term)
        except _Silent:
            if term.blocked:
                loose = _Term(out, strict=False)
                _flatten(gm, root, list(out), loose, root=True)
                try:
                    r = _classify_split(loose)
                except _Silent:
                    raise _Silent() from None
                if loose.masks or r.pos:
                    reason = "the scores (or masked scores) are also returned or used elsewhere, so the " \
                             "quadratic form cannot be replaced"
                    decay = self._decay_reason(gm, r)
                    raise NoMatch(reason + (f"; and {decay}" if decay else "")) from None
            raise
        if not term.masks and not roles.pos and not roles.vpos:
            raise _Silent()                     # (c·bᵀ)·x without a mask: two matmuls
        roles.divide = _place_divisors(term, roles)
        roles.norm = self._check_key_sum(root, term, roles, key_sum) if key_sum is not None else None
        sizes_i = val(roles.c[0]).shape[roles.c[1].index(roles.i)]
        sizes_j = val(roles.x[0]).shape[roles.x[1].index(roles.j)]
        if not statically_known_true(sizes_i == sizes_j):
            raise NoMatch("the query and key lengths differ (not one sequence)")
        an = Analyzer(gm, roles.i, roles.j, roles.batch)
        masks, logs = list(term.masks), []
        for leaf in roles.pos:
            if any(is_op(n, aten.softmax, aten._softmax) for n in [leaf[0]]):
                raise _Silent()
            p = an.position(*leaf)
            masks += p.masks
            if p.log is not None:
                logs.append(p.log)
        for leaf in roles.vpos:        # a decay per key channel: the key dim reads as one more batch axis
            p = Analyzer(gm, roles.i, roles.j, [*roles.batch, roles.n]).position(*leaf)
            if p.log is None:
                raise NoMatch("a factor per key channel inside q·k that is not exp of a per-channel segment sum")
            masks += p.masks        # (a mask that varies with the key dim is refused when it is evaluated)
            logs.append(p.log)
        log = None
        for lg in logs:
            log = lg if log is None else log.plus(lg)
        if log is not None:
            masks += log.zero
        decay = self._check(gm, roles, masks, log, sizes_i, strict_ok)
        if roles.vpos and (decay is None or decay[1] is None or roles.n not in decay[1][1] or decay[0].factors):
            raise NoMatch("a decay per key channel inside q·k that is not the segment sum of a per-channel log "
                          "decay a[t, n] (exp(G_i - G_j) with G = cumsum_t a, inclusive or exclusive)")
        _check_mask_precision(roles)
        return term, roles, decay

    def _check_key_sum(self, root, term, roles, key_sum):
        """The normalizer Σ_j A[.., i, j] of a scores operand A of ``root`` (``_key_sum``) is the same
        form with x = 1 when A is all of the term but x (root's other operand is the x leaf), the sum
        runs over j, and A has exactly the batch and time axes: (u, A's term letters); NoMatch else."""
        a, u, letter = key_sum
        names = term.root_names
        parts = _einsum_parts(root)[0]
        k = list(root.args[1]).index(a)
        la = [names[c] for c in parts[k]]
        other = root.args[1][1 - k]
        xb = base_letters(other, [names[c] for c in parts[1 - k]])
        if names[letter] != roles.j or xb[0] is not roles.x[0] or list(xb[1]) != list(roles.x[1]) or \
                sorted(la) != sorted(set(roles.batch) | {roles.i, roles.j}):
            raise NoMatch("the scores are also summed, but not as the form's normalizer Σ_j (c·bᵀ ∘ M)[i, j]")
        sizes = dict(zip(term.out, val(root).shape))
        sizes[roles.j] = sizes[roles.i]
        if any(not statically_known_true(val(a).shape[n] == sizes[ch]) for n, ch in enumerate(la)):
            raise NoMatch("the summed scores are broadcast over an axis of the result")
        return u, la

    def _decay_reason(self, gm, roles) -> str | None:
        """Why the position factors of ``roles`` are not a decay the ssd takes, when the analysis of
        their exponent says so (None when they are, or fail for another reason): a second reason
        for a near miss that has one already."""
        an, log = Analyzer(gm, roles.i, roles.j, roles.batch), None
        try:
            for leaf in roles.pos:
                p = an.position(*leaf)
                if p.log is not None:
                    log = p.log if log is None else log.plus(p.log)
            if log is not None:
                self._resolve(log, roles)
        except NoMatch as e:
            return str(e)
        except Exception:       # an analysis that cannot run: the first reason stands alone
            return None
        return None

    def _check(self, gm, roles, masks, log, t_size, strict_ok: bool = False):
        """Prove M = [j <= i]·exp(E) (or, with ``strict_ok``, [j < i]·exp(E): then ``roles.strict``
        is set) at every size variant; returns the decay (None or (Coef, seq factor))."""
        try:
            return self._check_sizes(gm, roles, masks, log, t_size, strict_ok)
        except (NoMatch, _Silent):
            raise
        except Exception as e:      # a mask subgraph that cannot run at a size variant
            raise NoMatch(f"the mask could not be evaluated at every length ({type(e).__name__})") from None

    def _check_sizes(self, gm, roles, masks, log, t_size, strict_ok):
        decay = self._resolve(log, roles) if log is not None else None
        kinds = set()
        for sizes in _size_variants(gm):
            t = concrete_sym(t_size, sizes) if isinstance(t_size, torch.SymInt) else int(t_size)
            if t * t > MAX_MASK_ELEMENTS:
                raise NoMatch("the sequence is too long to check the mask")
            total = torch.ones(t, t, dtype=torch.bool)
            for spec in masks:
                total &= _mask_matrix(gm, spec, roles, sizes, t)
            kind = classify_mask(total)
            if kind is None or (kind[0] == "none" and log is None):
                if kind is not None:
                    raise _Silent()             # a full mask: plain matmuls
                raise NoMatch("the mask is not a structural causal mask")
            kinds.add(kind)
            if kind != ("causal", 0, 0) and not (strict_ok and kind == ("causal", -1, 0)):
                what = "strictly lower triangular" if kind == ("causal", -1, 0) else \
                    f"{kind[0]} with diagonal {kind[1]}" + (f" and window {kind[2]}" if kind[0] == "window" else "")
                raise NoMatch(f"the mask is {what}, not the inclusive lower triangle [j <= i] of a recurrence")
            if len(kinds) > 1:
                raise NoMatch("the mask is the inclusive lower triangle at some lengths and the strict one at others")
            if log is not None:
                for spec in log.valid:
                    v = _mask_matrix(gm, spec, roles, sizes, t)
                    if bool((total & ~v).any()):
                        raise NoMatch("the decay exponent is altered inside the causal triangle")
                for spec, want in log.req:
                    if classify_mask(_mask_matrix(gm, spec, roles, sizes, t)) != want:
                        raise NoMatch("the segment sum's inner mask is not the strict lower triangle")
                for atom, _ in log.terms:
                    if atom[0] == "pos":
                        v = evaluate(gm, atom[2], sizes).reshape(-1)
                        if not torch.equal(v.double(), torch.arange(v.numel(), dtype=torch.float64)):
                            raise NoMatch("a position index in the decay that is not arange(T)")
        roles.strict = kinds == {("causal", -1, 0)}
        if roles.exclusive and not roles.strict:
            raise NoMatch("the decay exponent is the exclusive segment sum G_{i-1} - G_j but the mask keeps the "
                          "diagonal (exp(-a_i) there: not a recurrence's decay)")
        return decay

    def _resolve(self, log, roles):
        """E -> (Coef, (seq node, letters) or None): a = coef·seq (per step) or coef (constant in t)."""
        i, j = roles.i, roles.j
        groups: dict = {}
        for atom, coef in log.terms:
            key = (atom[0], id(atom[1]) if atom[0] != "pos" else atom[1],
                   atom[2] if atom[0] != "pos" else None, coef.key())
            if key in groups:
                groups[key] = (atom, Coef(groups[key][1].const + coef.const, coef.factors))
            else:
                groups[key] = (atom, coef)
        terms = [(a, c) for a, c in groups.values() if c.const != 0]
        if any(a[0] == "const" for a, _ in terms):
            raise NoMatch("a constant offset in the decay exponent (a constant factor exp(c) of the mask)")
        kinds = sorted(a[0] for a, _ in terms)
        if kinds == ["g", "g", "q"]:                  # G_i - a_i - G_j = G_{i-1} - G_j (RWKV-6)
            (qa, qc), = [(a, c) for a, c in terms if a[0] == "q"]
            coef, seq = self._segment_sum([(a, c) for a, c in terms if a[0] == "g"], roles)
            if _value_of(qa[1]) is _value_of(seq[0]) and list(qa[2]) == list(seq[1]) and qc.key() == coef.key() \
                    and qc.const == -coef.const:
                roles.exclusive = roles.finite_only = True     # Σ_{j<x<i} a_x: the query's own step left out
                return coef, seq
            raise NoMatch("the decay exponent is G_i - G_j plus a per-query term that is not the step "
                          "-a_i of the same cumulative sum (the exclusive segment sum G_{i-1} - G_j)")
        side = side_term_reason(terms)
        if side is not None:
            raise NoMatch(side)
        if kinds == ["seg"]:                          # Σ_{j<x≤i} A_x
            (atom, coef), = terms
            return coef, (atom[1], list(atom[2]))
        if kinds == ["g", "g"]:                       # G_i - G_j, G = cumsum(a)
            roles.finite_only = True
            return self._segment_sum(terms, roles)
        if kinds == ["pos", "pos"]:                   # w·(i - j)
            (a1, k1), (a2, k2) = terms
            if {a1[1], a2[1]} == {i, j} and k1.key() == k2.key() and k1.const == -k2.const:
                # a tensor w: -inf·0 = NaN on the diagonal, or a log of a γ <= 0 where γ**(i-j) is finite
                roles.finite_only = bool(k1.factors)
                return (k1 if a1[1] == i else k2), None
            raise NoMatch("the decay exponent is not w·(i - j)")
        raise NoMatch("the decay exponent is neither a segment sum G_i - G_j nor w·(i - j) (a power γ^(i-j))")

    @staticmethod
    def _segment_sum(terms, roles):
        """The two "g" atoms of G_i - G_j with G = cumsum_i(a) -> (coefficient of G_i, (a, letters at i))."""
        i, j = roles.i, roles.j
        (a1, k1), (a2, k2) = terms
        if a1[1] is a2[1] and is_op(a1[1], aten.cumsum) and k1.key() == k2.key() and k1.const == -k2.const:
            g, l1, l2 = a1[1], list(a1[2]), list(a2[2])
            d = g.args[1] % rank(g)
            if l1[d] == j:
                l1, l2, k1 = l2, l1, k2
            same = all(x == y for k, (x, y) in enumerate(zip(l1, l2)) if k != d)
            if same and l1[d] == i and l2[d] == j:
                return k1, base_letters(g.args[0], l1)
        raise NoMatch("the decay exponent is not a segment sum G_i - G_j of one cumulative sum")

    # --- building --------------------------------------------------------------------
    def _emit(self, graph, before, target, args, like):
        return emit_before(graph, before, target, args, like)

    def _size(self, graph, before, roles, letter, like):
        for node, letters in [roles.c, roles.b, roles.x, *roles.pos]:
            if letter in letters:
                k = letters.index(letter)
                s = val(node).shape[k]
                if isinstance(s, int):
                    return s
                return self._emit(graph, before, aten.sym_size.int, (node, k), like)
        return 1

    def _layout(self, graph, before, roles, node, letters, seq, feat, like):
        """node (axes ``letters``) -> (B', T, H[, F]) with T = ``seq``, F = ``feat``."""
        return self.to_layout(graph, before, roles, node, letters, [seq], [feat] if feat else [], like)

    def from_layout(self, graph, before, roles, node, head_axis, like):
        """The inverse of ``to_layout`` on a result (B', ..., H at ``head_axis``, ...): B' unflattened
        into the leading batch axes of ``roles`` (dropped when there are none), the head axis
        dropped when the form has none."""
        lead, head = roles.batch[:-1], roles.batch[-1:]
        if not head:
            node = self._emit(graph, before, aten.squeeze.dims, (node, [head_axis]), like)
        if len(lead) == 0:
            node = self._emit(graph, before, aten.squeeze.dims, (node, [0]), like)
        elif len(lead) > 1:
            sizes = [self._size(graph, before, roles, ch, like) for ch in lead]
            node = self._emit(graph, before, aten.unflatten.int, (node, 0, sizes), like)
        return node

    def to_layout(self, graph, before, roles, node, letters, mid, tail, like):
        """node (axes ``letters``) -> (B', *mid, H, *tail): the leading batch axes of ``roles``
        flattened into B' (a unit axis when there are none), H its last batch axis (a unit axis
        when the form has none); axes it lacks are broadcast (expand), unit axes dropped."""
        lead, head = roles.batch[:-1], roles.batch[-1:]
        target = lead + list(mid) + head + list(tail)
        units = [k for k, c in enumerate(letters) if c == UNIT]
        if units:
            node = self._emit(graph, before, aten.squeeze.dims, (node, units), like)
            letters = [c for c in letters if c != UNIT]
        extra = [c for c in letters if c not in target]
        if extra:
            raise NoMatch(f"an operand has axes {extra} outside the recurrence's layout")
        present = [c for c in target if c in letters]
        perm = [letters.index(c) for c in present]
        if perm != list(range(len(perm))):
            node = self._emit(graph, before, aten.permute.default, (node, perm), like)
        missing = False
        for pos, c in enumerate(target):
            if c not in letters:
                node = self._emit(graph, before, aten.unsqueeze.default, (node, pos), like)
                missing = True
        if missing:
            full = [(-1 if c in letters else self._size(graph, before, roles, c, like)) for c in target]
            node = self._emit(graph, before, aten.expand.default, (node, full), like)
        if len(lead) == 0:
            node = self._emit(graph, before, aten.unsqueeze.default, (node, 0), like)
        elif len(lead) > 1:
            node = self._emit(graph, before, aten.flatten.using_ints, (node, 0, len(lead) - 1), like)
        if not head:
            node = self._emit(graph, before, aten.unsqueeze.default, (node, 1 + len(mid)), like)
        return node

    def _strictly_causal(self, graph, root, x, b, a, exclusive: bool, vector: bool = False):
        """(x', b', a') of the strictly causal form y_t = Σ_{s<t} L[t, s]·(c_t·b_s)·x_s as an inclusive
        one: the keys and values one step later, b'_s = b_{s-1}, x'_s = x_{s-1} (zero at s = 0), so
        that y_t = Σ_{s<=t} L'[t, s]·(c_t·b'_s)·x'_s with L'[t, s] = L[t, s - 1]:

        - L[t, s] = exp(a_{s+1} + … + a_t) (the inclusive segment sum): L'[t, s] = exp(a_s)·exp(a_{s+1}
          + … + a_t), so x'_s also takes the factor exp(a_s) and a' = a;
        - L[t, s] = exp(a_{s+1} + … + a_{t-1}) (``exclusive``, RWKV's): a' = a one step later too.

        Layouts (B', T, H, F); a (B', T, H), or (B', T, H, N) with ``vector`` (a decay per key channel: the
        factor exp(a_s) goes to b', which has the key dim)."""
        def later(u):           # u one step later along T: zero at t = 0, u_{t-1} after
            pad = [0, 0] * (rank(u) - 2) + [1, 0]
            u = self._emit(graph, root, aten.slice.Tensor, (u, 1, 0, -1), root)
            return self._emit(graph, root, aten.constant_pad_nd.default, (u, pad, 0.0), root)
        x, b = later(x), later(b)
        if a is not None and exclusive:
            # a one step later; its step 0 is 0·a_{T-1} instead of 0: the same 0 while a_{T-1} is finite,
            # NaN when not, so that SSD.finite_only still sees the program's G_{T-1} - a_{T-1} (inf - inf)
            last = self._emit(graph, root, aten.slice.Tensor, (a, 1, -1, None), root)
            last = self._emit(graph, root, aten.mul.Tensor, (last, 0.0), root)
            head = self._emit(graph, root, aten.slice.Tensor, (a, 1, 0, -1), root)
            a = self._emit(graph, root, aten.cat.default, ([last, head], 1), root)
        elif a is not None and vector:
            step = self._emit(graph, root, aten.exp.default, (a,), root)
            b = self._emit(graph, root, aten.mul.Tensor, (b, step), root)
        elif a is not None:
            step = self._emit(graph, root, aten.exp.default, (a,), root)
            step = self._emit(graph, root, aten.unsqueeze.default, (step, -1), root)
            x = self._emit(graph, root, aten.mul.Tensor, (x, step), root)
        return x, b, a

    def _divide(self, graph, root, roles, node, divisors, seq, feat):
        """node (B', T, H, F) divided by each divisor, brought to the same layout (T = ``seq``)."""
        for d, letters in divisors:
            d = self._layout(graph, root, roles, d, letters, seq, feat, root)
            node = self._emit(graph, root, aten.div.Tensor, (node, d), root)
        return node

    def _ones_column(self, graph, root, x):
        """x (B', T, H, P) -> (B', T, H, P + 1), the last column ones."""
        one = self._emit(graph, root, aten.slice.Tensor, (x, -1, 0, 1), root)
        return self._emit(graph, root, aten.cat.default,
                          ([x, self._emit(graph, root, aten.full_like.default, (one, 1.0), root)], -1), root)

    def _split_key_sum(self, graph, root, roles, y, norm, a_letters):
        """y (B', T, H, P + 1) of a form with a ones column: replaces ``norm`` (Σ over the key axis of
        the scores, axes ``a_letters``) by the last column; returns the first P columns."""
        emit = self._emit
        p_size = self._size(graph, root, roles, roles.p, root)
        z = emit(graph, root, aten.select.int, (y, -1, p_size), root)
        y = emit(graph, root, aten.slice.Tensor, (y, -1, 0, p_size), root)
        z = self.from_layout(graph, root, roles, z, 2, root)
        lead, head = roles.batch[:-1], roles.batch[-1:]
        zl = lead + [roles.i] + head
        want = [ch for ch in a_letters if ch != roles.j]
        perm = [zl.index(ch) for ch in want]
        if perm != list(range(len(perm))):
            z = emit(graph, root, aten.permute.default, (z, perm), root)
        if arg(norm, 2, "keepdim", False):
            z = emit(graph, root, aten.unsqueeze.default, (z, a_letters.index(roles.j)), root)
        if val(z).dtype != val(norm).dtype:
            z = emit(graph, root, aten.to.dtype, (z, val(norm).dtype), root)
        norm.replace_all_uses_with(z)
        return y

    def _build(self, ctx: PassContext, root, roles, term, decay) -> None:
        graph = ctx.graph
        i, j = roles.i, roles.j
        x = self._layout(graph, root, roles, *roles.x, j, roles.p, root)
        b = self._layout(graph, root, roles, *roles.b, j, roles.n, root)
        c = self._layout(graph, root, roles, *roles.c, i, roles.n, root)
        divide = getattr(roles, "divide", {})
        x, b, c = (self._divide(graph, root, roles, opnd, divide.get(k, ()), t, f)
                   for opnd, k, t, f in ((x, "x", j, roles.p), (b, "b", j, roles.n), (c, "c", i, roles.n)))
        norm = getattr(roles, "norm", None)
        if norm is not None:                  # Σ_j A[i, j] = (A·1)[i]: a column of ones in x
            x = self._ones_column(graph, root, x)
        syms = [f for f in term.scalars if isinstance(f[0], torch.fx.Node)]
        consts = [f for f in term.scalars if not isinstance(f[0], torch.fx.Node)]
        if len(syms) == 1 and not syms[0][1] and all(float(v) == 1.0 for v, _ in consts):
            scale = syms[0][0]                    # one symbolic factor: no `1.0 * s` node
        else:
            scale = sym_product(graph, term.scalars, root)
        if isinstance(scale, torch.fx.Node) or scale != 1.0:     # s·(c·bᵀ ∘ M)·x = ((s·c)·bᵀ ∘ M)·x
            c = self._emit(graph, root, aten.mul.Tensor, (c, scale), root)
        a = None
        if decay is not None:
            coef, seq = decay
            factors = [] if seq is None else [seq]
            for f in coef.factors:
                kind, node, letters = f
                if kind == "log":
                    node = self._emit(graph, root, aten.log.default, (node,), root)
                factors.append((node, list(letters)))
            if not factors:
                raise NoMatch("a constant decay without a per-head factor")
            for node, letters in factors:
                if not val(node).is_floating_point():
                    raise NoMatch("a decay factor that is not floating point")
                f = self._layout(graph, root, roles, node, [i if ch == j else ch for ch in letters], i,
                                 roles.n if roles.vpos else None, root)      # (B', T, H[, N])
                a = f if a is None else self._emit(graph, root, aten.mul.Tensor, (a, f), root)
            if seq is None:   # constant in t: broadcast over the time axis
                a = self._emit(graph, root, aten.expand.default,
                               (a, [-1, self._size(graph, root, roles, i, root), -1]), root)
            if coef.const != 1.0:
                a = self._emit(graph, root, aten.mul.Tensor, (a, float(coef.const)), root)
        if roles.strict:
            x, b, a = self._strictly_causal(graph, root, x, b, a, roles.exclusive, vector=bool(roles.vpos))
        op = SSD(x=x, b=b, c=c, a=a, decay="none" if a is None else "vector" if roles.vpos else "scalar",
                 finite_only=a is not None and roles.finite_only)
        ir = ctx.insert_ir(op, root, root)
        ir.meta["val"] = ssd_value(x, b, c)
        y = self._emit(graph, root, operator.getitem, (ir, 0), root)
        y = self._divide(graph, root, roles, y, divide.get("y", ()), i, roles.p)   # (Σ_j ...)/d_i
        if norm is not None:
            y = self._split_key_sum(graph, root, roles, y, *norm)
        # (B', T, H, P) -> lead + [i] + head + [p] -> the contraction's layout
        lead, head = roles.batch[:-1], roles.batch[-1:]
        y = self.from_layout(graph, root, roles, y, 2, root)
        order = lead + [i] + head + [roles.p]
        perm = [order.index(ch) for ch in term.out]
        if perm != list(range(len(perm))):
            y = self._emit(graph, root, aten.permute.default, (y, perm), root)
        if val(y).dtype != val(root).dtype:
            y = self._emit(graph, root, aten.to.dtype, (y, val(root).dtype), root)
        root.replace_all_uses_with(y)
