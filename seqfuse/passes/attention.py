"""Attention recognizer: softmax(mask(scale·q·kᵀ + bias))·v -> seqfuse.attention.

Works on the canonical graph, where every contraction is an ``aten.einsum``
and every constant-fill mask is ``aten.where.ScalarOther(keep, s, fill)``.
Starting from each softmax it proves, in order:

1. values side: the probabilities (through casts and one dropout) feed only a
   contraction that sums over the softmax axis;       # Σ_j p[i, j]·v[j, e]
2. scores side: the softmax input is the contraction of q and k over one
   axis, followed only by scalings, one soft-cap, additive biases and
   masks that do not read the scores;                 # s = scale·Σ_d q[i, d]·k[j, d]
3. masks that depend only on sizes are evaluated and classified as causal /
   sliding window (with diagonal offset); others stay tensors.  Masks and
   biases are read in the scores' own axis order (keys-first scores, a
   (B, Lq, H, Lk) layout) and moved to the op's (*batch, Lq, Lk);
4. GQA: k and v repeated per head (repeat_interleave, or expand + reshape)
   are replaced by the unrepeated tensors;             # k[h] = k0[h // g]
   MQA: k and v with one head broadcast over q's heads.  # k[h] = k0[0]

Along the way the scores and probabilities may be reshaped when the reshape provably
regroups only the batch axes ((B·H, L, S) <-> (B, H, L, S): the last two axes untouched,
the same number of batch entries; Bloom's bmm over merged heads); masks, biases and the
values added or read in another grouping are brought to the contraction's.  In-place
``s /= c``, ``s *= c``, ``s += b`` on scores nothing else reads are their functional forms;
a scale after a bias scales the bias too (c·(s + b) = c·s + c·b, Falcon's ALiBi).  A region
in which anything else writes a tensor in place is left alone: the op, placed at the value
contraction, would read what the program read earlier.

Anything else is left as it was, and recorded as a near miss with its reason
when the region looked like attention.  ``F.scaled_dot_product_attention``
calls are lifted directly.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from seqfuse.ir.masks import classify_mask
from seqfuse.ir.ops import Attention
from seqfuse.passes.constants import commit, tentative_reads
from seqfuse.passes.pattern import (CASTS, ancestors, arg, concrete_sym, constant_value, depends_on, emit_before,
                                    evaluate_shape_only, is_op, is_scalar, is_shape_only, only_user, rank, sym_product,
                                    val)
from seqfuse.passes.registry import Pass, PassContext

aten = torch.ops.aten


class NoMatch(Exception):
    """Raised inside the matcher with the reason a candidate is not attention.  ``certain``: the
    region is attention but for this one step (a reshape that mixes the query or key axis): a near
    miss even when the other side of the softmax does not match either."""

    def __init__(self, reason: str, certain: bool = False):
        super().__init__(reason)
        self.certain = certain


@dataclass
class _Scores:
    """What the scores side of a candidate proved."""

    einsum: torch.fx.Node
    factors: list = field(default_factory=list)      # (value, invert) scale factors
    softcap: float | None = None
    biases: list = field(default_factory=list)      # _Bias additive terms
    bias_after_mask: bool = False
    keeps: list = field(default_factory=list)        # bool tensors, True = keep
    keep_stages: list = field(default_factory=list)  # node whose shape each keep is broadcast against
    fill: float = -math.inf
    inplace: list = field(default_factory=list)      # private in-place ops looked through (erased after a rewrite)
    bias_mask: bool = False                          # the one bias is where(AND of keeps, 0, finite fill)


@dataclass
class _Bias:
    """An additive term of the scores: ``mult · (±tensor)`` summed in ``dtype``, broadcast against
    ``stage``'s shape (the scores as they were where it was added, before or after a batch reshape)."""

    tensor: torch.fx.Node
    negated: bool
    dtype: torch.dtype
    stage: torch.fx.Node
    mult: float = 1.0


def _einsum_parts(node: torch.fx.Node) -> tuple[list[str], str]:
    lhs, out = node.args[0].split("->")
    return lhs.split(","), out


def _op_name(node) -> str:
    t = getattr(node, "target", node)
    return str(getattr(t, "_name", getattr(t, "__name__", t))).replace("::", ".")


# --- step 1: values side -----------------------------------------------------

def _match_values(softmax: torch.fx.Node):
    """(pv einsum, p operand node, dropout probability); NoMatch if the probabilities go elsewhere."""
    cur, dropout = softmax, 0.0
    while True:
        user = only_user(cur)
        if user is None:
            if any(u.op == "output" for u in cur.users):
                # eager_attention_forward returns its attn_weights; where the caller drops them in the
                # same graph they are dead code, but a graph break after the call makes them an output
                raise NoMatch(f"the probabilities are used {len(cur.users)} times: also as an output of the "
                              "graph (returned, e.g. as attn_weights; if the caller drops them, a graph break "
                              "before it does makes them an output anyway: see torch._dynamo.explain)")
            raise NoMatch(f"the probabilities are used {len(cur.users)} times (returned or reused), "
                          "not only by the contraction with the values")
        if is_op(user, *CASTS):
            cur = user
            continue
        if is_op(user, aten.dropout):
            prob, train = constant_value(arg(user, 1, "p")), constant_value(arg(user, 2, "train"))
            if prob is None or train is None:
                raise NoMatch("dropout with a probability or training flag not known at compile time")
            if train and prob > 0:
                if dropout:
                    raise NoMatch("two dropouts on the probabilities")
                dropout = float(prob)
            cur = user
            continue
        if is_op(user, *_RESHAPES):
            if not _batch_reshape(user):
                raise NoMatch(f"{_op_name(user)} between the softmax and the value contraction moves entries "
                              f"across the last two axes ({_shape_text(cur)} -> {_shape_text(user)}), not only "
                              "the batch·head axes")
            cur = user  # (B, H, L, S) -> (B·H, L, S): the same probabilities, batch index regrouped
            continue
        if is_op(user, aten.einsum) and len(user.args[1]) == 2:
            ops = list(user.args[1])
            if ops.count(cur) != 1:
                raise NoMatch("the probabilities are contracted with themselves")
            return user, cur, dropout
        raise NoMatch(f"the probabilities feed {_op_name(user)}, not a contraction with the values")


# --- attention sinks -------------------------------------------------------------

@dataclass
class _Sink:
    """softmax(cat([s, sink], -1) [- row max])[..., :-1]: the scores s, the sink column (*, 1),
    and the slice that drops the sink's probability (the values side starts there)."""
    scores: torch.fx.Node
    column: torch.fx.Node
    drop: torch.fx.Node


def _last_axis(node: torch.fx.Node, dim) -> bool:
    d = constant_value(dim)
    return isinstance(d, int) and d % rank(node) == rank(node) - 1


def _without_row_max(x: torch.fx.Node) -> torch.fx.Node:
    """``c`` for ``x = c - max(c, -1, keepdim=True)`` (or amax): a shift the softmax does not see
    (gpt-oss subtracts it against bf16 overflow); ``x`` otherwise."""
    if not is_op(x, aten.sub) or not isinstance(x.args[1], torch.fx.Node):
        return x
    c, m = x.args[0], x.args[1]
    if m.target is operator.getitem and m.args[1] == 0 and is_op(m.args[0], aten.max) and \
            len(m.args[0].args) >= 3 and m.args[0].args[0] is c and _last_axis(c, m.args[0].args[1]) and \
            m.args[0].args[2] is True:
        return c
    if is_op(m, aten.amax) and m.args[0] is c and len(m.args) >= 3 and isinstance(m.args[1], (list, tuple)) \
            and list(m.args[1]) in ([-1], [rank(c) - 1]) and m.args[2] is True:
        return c
    return x


def _peel_casts(x, narrowing: list | None = None):
    """``x`` without the float casts that cannot change a value (``.float()`` of the logits, a no-op in
    fp32 or a widening from bf16).  With a list ``narrowing``, narrowing casts are peeled too and each is
    appended to it as (from dtype, to dtype); without, the first one stops the walk."""
    while is_op(x, *CASTS) and isinstance(x.args[0], torch.fx.Node) and val(x).is_floating_point() and \
            val(x.args[0]).is_floating_point():
        if _narrows(val(x.args[0]).dtype, val(x).dtype):
            if narrowing is None:
                break
            narrowing.append((val(x.args[0]).dtype, val(x).dtype))
        x = x.args[0]
    return x


def _sink_cat(sm: torch.fx.Node, narrowing: list | None = None) -> torch.fx.Node | None:
    """The cat([scores, column], -1) a softmax over the last axis reads (through casts that keep its
    values and a row-max shift; narrowing ones too when ``narrowing`` collects them), or None."""
    if not _last_axis(sm, sm.args[1]):
        return None
    c = _peel_casts(_without_row_max(_peel_casts(sm.args[0], narrowing)), narrowing)
    if not is_op(c, aten.cat) or not _last_axis(c, arg(c, 1, "dim", 0)) or len(c.args[0]) != 2:
        return None
    return c


def _sink_split(sm: torch.fx.Node) -> _Sink | None:
    """The attention-sink form of a softmax over the last axis (gpt-oss; inkling2 casts the logits with
    ``.float()`` and its per-query sinks come from the hidden states), or None."""
    c = _sink_cat(sm)
    if c is None:
        return None
    scores, column = c.args[0]
    drop = only_user(sm)
    if not isinstance(column, torch.fx.Node) or val(column).shape[-1] != 1 or drop is None or \
            not is_op(drop, aten.slice) or not _last_axis(drop, drop.args[1]):
        return None
    n = val(scores).shape[-1]
    start, end = constant_value(arg(drop, 2, "start", 0)), constant_value(arg(drop, 3, "end", None))
    step = constant_value(arg(drop, 4, "step", 1))
    if start not in (0, None) or step != 1 or not (end == -1 or (isinstance(end, int) and _known(end == n))):
        return None
    return _Sink(scores, column, drop)


# --- step 2: scores side -----------------------------------------------------

def _softcap_input(node: torch.fx.Node):
    """If node = c·tanh(x / c) with constant c: (c, x), else None."""
    if node.target is not aten.mul.Tensor:
        return None
    a, b = node.args
    th, c = (a, b) if is_op(a, aten.tanh) else (b, a)
    c = constant_value(c)
    if not is_op(th, aten.tanh) or c is None:
        return None
    inner = th.args[0]
    if is_op(inner, aten.div) and constant_value(inner.args[1]) == c:
        return float(c), inner.args[0]
    if is_op(inner, aten.mul) and constant_value(inner.args[1]) is not None and \
            math.isclose(constant_value(inner.args[1]), 1.0 / c, rel_tol=1e-6):
        return float(c), inner.args[0]
    return None


def _rounded(x: float, dtype: torch.dtype) -> float:
    """``x`` as a ``dtype`` tensor holds it (±inf past its range), what a fill becomes in the program."""
    return float(torch.tensor(x, dtype=torch.float64).to(dtype)) if dtype.is_floating_point else x


#: float dtypes each one represents exactly (a cast to a dtype outside the set rounds or overflows)
_HOLDS = {torch.float64: {torch.float64, torch.float32, torch.float16, torch.bfloat16},
          torch.float32: {torch.float32, torch.float16, torch.bfloat16},
          torch.float16: {torch.float16}, torch.bfloat16: {torch.bfloat16}}


def _narrows(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether a cast from ``src`` to ``dst`` can change a value (fp64 -> fp32, fp32 -> bf16, fp16 <-> bf16)."""
    return src != dst and src.is_floating_point and dst.is_floating_point and src not in _HOLDS.get(dst, ())


def _from_masked_fill(node: torch.fx.Node) -> bool:
    """Whether a canonical ``where.ScalarOther`` was written as ``masked_fill`` (which raises for a
    fill its tensor's dtype cannot hold; ``torch.where`` rounds it to ±inf)."""
    stack = node.meta.get("source_fn_stack") or []
    return bool(stack) and "masked_fill" in str(stack[-1][1])


#: reshapes that keep the elements in row-major order (a view of a contiguous tensor, or a copy)
_RESHAPES = (aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten)


def _known(cond) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    return bool(statically_known_true(cond)) if not isinstance(cond, bool) else cond


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(_known(x == y) for x, y in zip(a, b))


def _numel(shape):
    n = 1
    for x in shape:
        n = n * x
    return n


def _batch_reshape(node: torch.fx.Node) -> bool:
    """Whether the reshape ``node`` only regroups the axes before the last two:
    (*A, X, Y) -> (*C, X, Y) with ∏A = ∏C (both provable from the sizes).  In row-major order the
    flat index is a·X·Y + x·Y + y on both sides, so entry (a, x, y) stays entry (c(a), x, y): the
    batch index is relabeled, the last two axes are untouched (B·H <-> (B, H) heads)."""
    src = node.args[0]
    if not isinstance(src, torch.fx.Node) or rank(src) is None or rank(node) is None:
        return False
    a, c = list(val(src).shape), list(val(node).shape)
    if len(a) < 2 or len(c) < 2:
        return False
    return _same_shape(a[-2:], c[-2:]) and _known(_numel(a[:-2]) == _numel(c[:-2]))


#: in-place arithmetic the eager code writes on the scores (``s /= c``, ``s *= c``, ``s += mask``)
_INPLACE = {aten.mul_.Tensor: aten.mul.Tensor, aten.mul_.Scalar: aten.mul.Tensor,
            aten.div_.Tensor: aten.div.Tensor, aten.div_.Scalar: aten.div.Tensor,
            aten.add_.Tensor: aten.add.Tensor, aten.add_.Scalar: aten.add.Tensor,
            aten.sub_.Tensor: aten.sub.Tensor, aten.sub_.Scalar: aten.sub.Tensor}


def _fresh(node: Any) -> bool:
    """Whether ``node`` is a tensor the program computed and nothing else reads: the result of a
    functional op (not a view, input, parameter or buffer), or of a private in-place op on one."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or len(node.users) != 1:
        return False
    if node.target in _INPLACE:
        return _fresh(node.args[0])
    schema = getattr(node.target, "_schema", None)
    return schema is not None and not schema.is_mutable and len(schema.returns) >= 1 and \
        all(r.alias_info is None for r in schema.returns)


def _functional(node: torch.fx.Node):
    """The functional target that ``node`` computes: an in-place ``s.op_(x)`` reads as ``s.op(x)``
    when s is private to it (no view, input or other reader sees the mutation) and the result keeps
    s's dtype; NoMatch for an in-place op that does not."""
    t = _INPLACE.get(node.target)
    if t is None:
        return node.target
    s, other = node.args[0], node.args[1]
    if not _fresh(s):
        raise NoMatch(f"{_op_name(node)} mutates scores that something else reads")
    if isinstance(other, torch.fx.Node) and isinstance(val(other), torch.Tensor) and \
            torch.result_type(val(s), val(other)) != val(s).dtype:
        raise NoMatch(f"{_op_name(node)} rounds a {torch.result_type(val(s), val(other))} sum to the "
                      f"{val(s).dtype} scores")
    return t


def _scores_behind(gm, node) -> bool:
    """Whether ``node`` is q·kᵀ scores as the scores walk accepts them, reshapes of any kind
    allowed: attention whose scores side only a reshape breaks."""
    while is_op(node, *_RESHAPES):
        node = node.args[0]
    try:
        _walk_scores(gm, node, [])
        return True
    except NoMatch as e:
        return e.certain


def _shape_text(node) -> str:
    return "(" + ", ".join(str(x) for x in val(node).shape) + ")"


def _walk_scores(gm, node: torch.fx.Node, steps: list):
    """Walk from the softmax input back to the q·kᵀ contraction, collecting the steps
    (in reverse program order).  Returns the contraction node."""
    if is_op(node, aten.einsum):
        if len(node.args[1]) != 2:
            raise NoMatch("the scores come from a contraction of more than two tensors")
        return node
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        raise NoMatch("the softmax input is not computed from a q·kᵀ contraction")
    fn = _functional(node)
    if fn is not node.target:
        steps.append(("inplace", node))
    if is_op(node, *CASTS):
        if not val(node).is_floating_point():
            raise NoMatch("the scores are cast to a non-float dtype")
        src = node.args[0]
        if isinstance(src, torch.fx.Node) and _narrows(val(src).dtype, val(node).dtype):
            raise NoMatch(f"the scores are narrowed from {val(src).dtype} to {val(node).dtype} before the "
                          "softmax (the op computes them at the inputs' precision)")
        return _walk_scores(gm, src, steps)
    sc = _softcap_input(node)
    if sc is not None:
        steps.append(("softcap", sc[0]))
        return _walk_scores(gm, sc[1], steps)
    if fn in (aten.mul.Tensor, aten.div.Tensor) or is_op(node, aten.mul, aten.div):
        a, b = node.args[0], node.args[1]
        invert = fn is aten.div.Tensor or is_op(node, aten.div)
        if is_scalar(b, gm) and isinstance(a, torch.fx.Node):
            factor, nxt = b, a
        elif not invert and is_scalar(a, gm) and isinstance(b, torch.fx.Node):
            factor, nxt = a, b
        else:
            raise NoMatch(f"the scores are {'divided' if invert else 'multiplied'} by a tensor")
        c = constant_value(factor, gm)
        steps.append(("scale", (c if c is not None else factor, invert)))
        return _walk_scores(gm, nxt, steps)
    if fn in (aten.add.Tensor, aten.sub.Tensor) and arg(node, 2, "alpha", 1) == 1:
        a, b = node.args[0], node.args[1]
        negate = fn is aten.sub.Tensor
        if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
            raise NoMatch(f"a scalar is {'subtracted from' if negate else 'added to'} the scores")
        # s + b and b + s -> bias b;  s - b -> bias -b  (b - s negates the scores: not attention)
        for s_side, bias in ((a, b),) if negate else ((a, b), (b, a)):
            try:
                sub: list = []
                einsum = _walk_scores(gm, s_side, sub)
            except NoMatch:
                continue
            if depends_on(bias, [einsum]):
                raise NoMatch("the additive mask depends on the attention scores")
            steps.append(("bias", (bias, negate, val(node).dtype, node)))
            steps.extend(sub)
            return einsum
        raise NoMatch("neither addend of the scores comes from a q·kᵀ contraction" if not negate else
                      "the scores are subtracted from a tensor, not a tensor from the scores")
    if node.target is aten.where.ScalarOther:
        keep, s, fill = node.args
        dtype = val(node).dtype
        rounded = _rounded(float(fill), dtype)
        if math.isfinite(float(fill)) and not math.isfinite(rounded) and _from_masked_fill(node):
            raise NoMatch(f"masked_fill with {float(fill)!r}, which {dtype} cannot hold (the program raises)")
        steps.append(("mask", (keep, rounded, node)))
        einsum = _walk_scores(gm, s, steps)
        if depends_on(keep, [einsum]):
            raise NoMatch("the mask depends on the attention scores")
        return einsum
    if is_op(node, aten.masked_fill) and constant_value(node.args[2], gm) is not None:
        raise NoMatch(f"masked_fill with {constant_value(node.args[2], gm)!r}, which {val(node).dtype} cannot "
                      "hold (the program raises)")
    if is_op(node, aten.where, aten.masked_fill):
        raise NoMatch("a mask whose fill value is not a compile-time constant")
    if is_op(node, *_RESHAPES):
        if not _batch_reshape(node):
            raise NoMatch(f"{_op_name(node)} between the scores and the softmax moves entries across the "
                          f"last two axes ({_shape_text(node.args[0])} -> {_shape_text(node)}), not only "
                          "the batch·head axes", certain=_scores_behind(gm, node.args[0]))
        # (B·H, L, S) <-> (B, H, L, S): the same scores, batch index regrouped
        steps.append(("reshape", node))
        return _walk_scores(gm, node.args[0], steps)
    raise NoMatch(f"{_op_name(node)} between the scores and the softmax")


def _match_scores(gm, x: torch.fx.Node) -> _Scores:
    steps: list = []
    einsum = _walk_scores(gm, x, steps)
    sc = _Scores(einsum)
    biases_after: list = []
    shape = val(einsum).shape
    for kind, data in reversed(steps):  # program order
        if kind == "inplace":
            sc.inplace.append(data)
        elif kind == "reshape":
            # a batch regroup: each bias and mask keeps the node it was broadcast against
            if not _same_shape(val(data.args[0]).shape, shape):
                raise NoMatch("a bias or mask broadcasts the scores to more axes or entries")
            shape = val(data).shape
        elif kind == "scale":
            if biases_after:
                raise NoMatch("the scores are scaled after a bias that follows a mask")
            if sc.biases:
                # c·(s + b) = c·s + c·b: the bias is scaled with the scores (Falcon's ALiBi)
                c = data[0]
                if not isinstance(c, (int, float)) or not math.isfinite(c) or c == 0:
                    raise NoMatch("the scores are scaled after a bias was added, by a factor that is not a "
                                  "finite nonzero constant")
                for b_ in sc.biases:
                    b_.mult = b_.mult / c if data[1] else b_.mult * c
            if sc.softcap is not None:
                raise NoMatch("the scores are scaled after the soft-cap")
            if sc.keeps:
                c = data[0]
                if sc.fill != -math.inf or not isinstance(c, (int, float)) or c <= 0:
                    raise NoMatch("the scores are scaled after a mask with a finite fill or by a non-positive factor")
            sc.factors.append(data)
        elif kind == "softcap":
            if sc.softcap is not None or sc.biases or sc.keeps:
                raise NoMatch("a soft-cap after a bias, a mask or another soft-cap")
            sc.softcap = data
        elif kind == "bias":
            # after a mask the order matters: with a finite fill, and with -inf where the bias is
            # +inf or NaN (s + b then fill replaces it; fill then + b keeps it)
            bias = _Bias(data[0], data[1], data[2], data[3])
            if sc.keeps:
                biases_after.append(bias)
            else:
                sc.biases.append(bias)
        elif kind == "mask":
            keep, fill, stage = data
            if biases_after:
                raise NoMatch("a mask after a bias that follows another mask")
            if sc.keeps and fill != sc.fill:
                raise NoMatch(f"two masks with different fill values ({sc.fill} and {fill})")
            sc.keeps.append(keep)
            sc.keep_stages.append(stage)
            sc.fill = fill
    if not _same_shape(val(x).shape, shape):
        raise NoMatch("a bias or mask broadcasts the scores to more axes or entries")
    if biases_after:
        if sc.biases:
            raise NoMatch("biases both before and after a mask")
        sc.biases, sc.bias_after_mask = biases_after, True
    if steps and steps[0][0] == "bias" and len(sc.biases) == 1 and not sc.keeps and not sc.bias_after_mask:
        term = sc.biases[0]
        factors = None if term.negated or term.mult != 1.0 else _fill_mask_factors(gm, term.tensor)
        if factors:
            # the last step adds where(keep, 0, fill): the keep factors restate it (bias_mask)
            sc.keeps, sc.keep_stages, sc.bias_mask = factors, [term.stage] * len(factors), True
    return sc


_BOOL_AND = (aten.__and__.Tensor, aten.bitwise_and.Tensor, aten.logical_and.default)


def _fill_mask_factors(gm, node: torch.fx.Node) -> list | None:
    """The bool factors ``m_1 … m_n`` when ``node`` is ``where(m_1 & … & m_n, 0, fill)`` with a finite
    negative constant fill (transformers 5's eager masks: ``where(mask, zeros(()), finfo.min)``, the
    mask an ``&`` of position comparisons and a padding lookup, expanded to the scores); else None."""
    if node.target is not aten.where.ScalarOther:
        return None
    cond, zero, fill = node.args
    if not isinstance(fill, (int, float)) or not math.isfinite(fill) or fill >= 0 or \
            not isinstance(zero, torch.fx.Node) or not _is_zero(gm, zero):
        return None
    factors, todo = [], [cond]
    while todo:
        n = todo.pop()
        if not isinstance(n, torch.fx.Node) or val(n).dtype != torch.bool:
            return None
        if n.target in _BOOL_AND:
            todo += n.args[:2]
        elif is_op(n, aten.expand) or (is_op(n, *CASTS) and val(n.args[0]).dtype == torch.bool):
            todo.append(n.args[0])         # broadcasting an & of factors = the & of the broadcast factors
        else:
            factors.append(n)
    return factors


def _is_zero(gm, node: torch.fx.Node) -> bool:
    """Whether ``node`` is a shape-only float tensor that is 0 everywhere (``zeros(())``)."""
    if not is_op(node, aten.zeros, aten.zeros_like, aten.new_zeros, aten.full, aten.scalar_tensor) or \
            not is_shape_only(node) or val(node).numel() > 1:
        return False
    try:
        return bool((evaluate_shape_only(gm, node) == 0).all())
    except Exception:
        return False


# --- step 3: structural masks --------------------------------------------------

MAX_MASK_ELEMENTS = 1 << 26


def _size_variants(gm: torch.fx.GraphModule) -> list[dict | None]:
    """Size assignments to evaluate a shape-only mask at: the example sizes and, for a
    graph with symbolic sizes, two more, so a classification holds beyond one length."""
    syms = sorted({str(val(n).node.expr) for n in gm.graph.nodes
                   if n.op == "placeholder" and isinstance(val(n), torch.SymInt)})
    if not syms:
        return [None]
    return [None, {s: 5 + 3 * i for i, s in enumerate(syms)}, {s: 11 + 2 * i for i, s in enumerate(syms)}]


@dataclass
class _Layout:
    """Where the op's (*batch, i, j) axes are in the scores: masks and biases are
    broadcastable to the scores' shape, in the scores' own axis order."""

    shape: list                                      # sizes of the scores (ints or symbolic)
    perm: list                                       # scores axis of each op axis (*batch, i, j)

    def identity(self) -> bool:
        return self.perm == list(range(len(self.shape)))


def _allowed_matrix(gm, nodes: list, sizes, layout: _Layout) -> torch.Tensor | None:
    """AND of the shape-only masks (bool keep, or additive 0/-inf) as a bool (Lq, Lk) matrix,
    each broadcast to the full (Lq, Lk) first; None when one varies along a batch axis."""
    shape = [concrete_sym(n, sizes) if isinstance(n, torch.SymInt) else int(n) for n in layout.shape]
    lq, lk = shape[layout.perm[-2]], shape[layout.perm[-1]]
    if lq * lk > MAX_MASK_ELEMENTS:
        return None
    total = None
    for node, is_bias in nodes:
        m = evaluate_shape_only(gm, node, sizes)
        if m.numel() > MAX_MASK_ELEMENTS or m.dim() > len(shape):
            return None
        if is_bias:
            if not bool(((m == 0) | (m == -math.inf)).all()):
                return None
            m = m == 0
        if m.dtype != torch.bool:
            return None
        # scores' axis order -> (*batch, i, j); a (1, Lk) key mask is the same for every query row
        m = m.reshape((1,) * (len(shape) - m.dim()) + tuple(m.shape)).permute(layout.perm)
        m = m.reshape(-1, *m.shape[-2:])
        if not bool((m == m[:1]).all()):
            return None  # differs between batch entries (heads): not one positional mask
        m = torch.broadcast_to(m[0], (lq, lk))
        total = m if total is None else total & m
    return total


def _is_inf_mask(gm, node: torch.fx.Node, layout: _Layout) -> bool:
    """Whether a shape-only additive mask is 0/-inf (the same for every batch index) at every size variant."""
    try:
        return all(_allowed_matrix(gm, [(node, True)], sizes, layout) is not None for sizes in _size_variants(gm))
    except Exception:
        return False


def _structural(gm, nodes: list, layout: _Layout) -> tuple[str, int, int] | None:
    """Classify the shape-only masks at every size variant; None unless all agree."""
    if not nodes:
        return ("none", 0, 0)
    found = None
    for sizes in _size_variants(gm):
        try:
            m = _allowed_matrix(gm, nodes, sizes, layout)
        except Exception:
            return None
        c = classify_mask(m) if m is not None else None
        if c is None or (found is not None and c != found):
            return None
        found = c
    return found


# --- step 4: GQA ---------------------------------------------------------------

def _unrepeat(node: torch.fx.Node) -> tuple[torch.fx.Node, int, int] | None:
    """If node repeats each head of x g times along axis a: (x, a, g)."""
    if is_op(node, aten.repeat_interleave) and node.target is aten.repeat_interleave.self_int:
        g, dim = node.args[1], arg(node, 2, "dim")
        if isinstance(g, int) and dim is not None:
            return node.args[0], dim % rank(node), g
        return None
    if is_op(node, aten.reshape, aten.view, aten._unsafe_view) and is_op(node.args[0], aten.expand):
        exp = node.args[0]
        uns = exp.args[0]
        if not is_op(uns, aten.unsqueeze):
            return None
        x = uns.args[0]
        a = uns.args[1] % (rank(x) + 1)          # the new axis, right after the head axis a - 1
        xs, es, rs = list(val(x).shape), list(val(exp).shape), list(val(node).shape)
        g = es[a]
        if a == 0 or not isinstance(g, int) or len(rs) != len(xs):
            return None
        expect = xs[:a - 1] + [xs[a - 1] * g] + xs[a:]
        if es[:a] + es[a + 1:] != xs or rs != expect:
            return None
        return x, a - 1, g
    return None


# --- building the op -----------------------------------------------------------

_emit = emit_before


def _to_layout(graph, before, node, letters: str, target: str, like) -> torch.fx.Node:
    """Permute ``node`` (axes named by ``letters``) to the axis order ``target``,
    inserting size-1 axes for letters it lacks."""
    extra = [c for c in letters if c not in target]
    if extra:
        raise NoMatch(f"operand axes {extra} are neither batch, sequence nor feature axes")
    present = [c for c in target if c in letters]
    perm = [letters.index(c) for c in present]
    if perm != list(range(len(perm))):
        node = _emit(graph, before, aten.permute.default, (node, perm), like)
    for pos, c in enumerate(target):
        if c not in letters:
            node = _emit(graph, before, aten.unsqueeze.default, (node, pos), like)
    return node


def _to_scores_layout(graph, before, node, layout: _Layout, like) -> torch.fx.Node:
    """A mask or bias broadcastable to the scores, moved to the op's (*batch, i, j) axis order."""
    if layout.identity():
        return node
    for _ in range(len(layout.shape) - rank(node)):
        node = _emit(graph, before, aten.unsqueeze.default, (node, 0), like)
    return _emit(graph, before, aten.permute.default, (node, layout.perm), like)


def _first_reshape(x: torch.fx.Node, p: torch.fx.Node, einsum: torch.fx.Node) -> Any:
    """A reshape on the way from the scores contraction to the softmax input ``x`` or to the
    probabilities ``p`` (for a near miss to name); "a reshape" when none is found."""
    for end in (x, p):
        for n in [end, *ancestors(end)]:
            if is_op(n, *_RESHAPES) and depends_on(n, [einsum]):
                return n
    return "a reshape"


def _sizes(graph, before, ref: torch.fx.Node, dims, like) -> list:
    """The sizes of ``ref``'s axes ``dims``: ints where static, else ``sym_size`` nodes."""
    out = []
    for dim in dims:
        n = val(ref).shape[dim]
        out.append(n if isinstance(n, int) else _emit(graph, before, aten.sym_size.int, (ref, dim), like))
    return out


def _regroup(graph, before, node, src: torch.fx.Node, dst: torch.fx.Node, like, full: bool = False) -> torch.fx.Node:
    """``node``, broadcastable to ``src``'s shape (*A, X, Y), with its batch axes regrouped to
    ``dst``'s (*C, X, Y) (∏A = ∏C, proven by ``_batch_reshape`` along the chain between them):
    size-1 batch axes broadcast to A first unless all are 1, then flatten A and unflatten to C,
    the row-major regroup the program's reshapes made (``full``: broadcast batch axes are always
    expanded, so the result has dst's batch sizes).  The last two axes are left as they are."""
    a_rank, c_rank = rank(src) - 2, rank(dst) - 2
    if _same_shape(val(src).shape[:-2], val(dst).shape[:-2]):
        return node
    if rank(node) > rank(src):
        raise NoMatch("a bias or mask with more axes than the scores it is added to")
    for _ in range(rank(src) - rank(node)):
        node = _emit(graph, before, aten.unsqueeze.default, (node, 0), like)
    lead = val(node).shape[:-2]
    if all(_known(x == 1) for x in lead) and not full:
        sizes = [1] * c_rank
    else:
        if not _same_shape(lead, val(src).shape[:-2]):
            # (B, 1, L, S) added to (B, H, L, S) scores, later read as (B·H, L, S): copies per head
            node = _emit(graph, before, aten.expand.default,
                         (node, _sizes(graph, before, src, range(a_rank), like) + [-1, -1]), like)
        sizes = _sizes(graph, before, dst, range(c_rank), like)
    if a_rank == 0:
        node = _emit(graph, before, aten.unsqueeze.default, (node, 0), like)
    elif a_rank > 1:
        node = _emit(graph, before, aten.flatten.using_ints, (node, 0, a_rank - 1), like)
    if c_rank == 0:
        return _emit(graph, before, aten.squeeze.dim, (node, 0), like)
    if c_rank > 1:
        node = _emit(graph, before, aten.unflatten.int, (node, 0, sizes), like)
    return node


def _permuted(shape, letters: str, target: str, extra: list = ()) -> list:
    """``shape`` (axes named by ``letters``, then ``extra`` sizes for the letters past it) in ``target``'s order."""
    shape = list(shape) + list(extra)
    return [shape[letters.index(c)] if c in letters else None for c in target]


def _one_head(q, lq: str, k, lk: str, v, lv: str, h: str) -> bool:
    """Whether k and v have one head (the axis is absent or of size 1) that q's static head count reads."""
    hq = val(q).shape[lq.index(h)]
    size = lambda x, lx: val(x).shape[lx.index(h)] if h in lx else 1  # noqa: E731
    return isinstance(hq, int) and hq > 1 and all(isinstance(size(x, lx), int) and size(x, lx) == 1
                                                  for x, lx in ((k, lk), (v, lv)))


def _static_equal(a, b) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def _restore_raising_fills(graph: torch.fx.Graph) -> None:
    """A ``masked_fill`` whose fill its tensor's dtype cannot hold raises in the program (fp16 and
    -1e9); canonicalization made it a ``where``, which rounds the fill to -inf instead.  Put the
    ``masked_fill`` back so the compiled program raises as the program does."""
    for node in list(graph.nodes):
        if node.target is not aten.where.ScalarOther or not _from_masked_fill(node):
            continue
        keep, x, fill = node.args
        if not isinstance(x, torch.fx.Node) or math.isfinite(_rounded(float(fill), val(node).dtype)) or \
                not math.isfinite(float(fill)):
            continue
        drop = _emit(graph, node, aten.logical_not.default, (keep,), node)
        with graph.inserting_before(node):
            new = graph.call_function(aten.masked_fill.Scalar, (x, drop, float(fill)))
        new.meta.update({k: v for k, v in node.meta.items()})
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def _drop_unit_axes(graph, before, node, letters: str, others: str, like):
    """``node`` without its static size-1 axes whose letter no other operand or the output has
    (summing over them is the identity), and its remaining letters."""
    shape = val(node).shape
    drop = [i for i, c in enumerate(letters) if c not in others and isinstance(shape[i], int) and shape[i] == 1]
    for i in reversed(drop):
        node = _emit(graph, before, aten.squeeze.dim, (node, i), like)
    return node, "".join(c for i, c in enumerate(letters) if i not in drop)


def _no_mutation_between(first: torch.fx.Node, last: torch.fx.Node, private: set) -> None:
    """NoMatch if an op between ``first`` (the scores) and ``last`` (the value contraction), other
    than the ``private`` in-place ops looked through, mutates a tensor: the program reads q, k,
    masks and scores before it, the op (placed at ``last``) would read them after.  ``detach_``
    (a constant's autograd flag, not its values) does not count."""
    n = first.next
    while n is not last and n.op != "root":
        schema = getattr(n.target, "_schema", None) if n.op == "call_function" else None
        if schema is not None and schema.is_mutable and n not in private and not is_op(n, aten.detach_):
            raise NoMatch(f"{_op_name(n)} mutates a tensor between the scores and the value contraction")
        n = n.next


def _transposed_output_is_free(node: torch.fx.Node) -> bool:
    """Whether the op replacing ``node`` (a (B, H, L, Dv) attention output) may return it in (B, L, H, Dv)
    memory (``out_transposed``) with no consumer seeing the difference: every use transposes axes 1
    and 2 and every use of that makes it contiguous (``.contiguous()``, ``clone`` to contiguous format) or reshapes it
    to (B, L, H·Dv) — results contiguous either way, so later memory-order consumers (dropout) draw as
    the program does — and the program's own copy becomes free."""
    if rank(node) != 4 or not node.users:
        return False
    for t in node.users:
        if not ((is_op(t, aten.transpose) and sorted(d % 4 for d in t.args[1:3]) == [1, 2]) or
                (is_op(t, aten.permute) and [d % 4 for d in t.args[1]] == [0, 2, 1, 3])) or not t.users:
            return False
        for u in t.users:
            if is_op(u, aten.clone, aten.contiguous):
                fmt = u.kwargs.get("memory_format", None if is_op(u, aten.clone) else torch.contiguous_format)
                if fmt is not torch.contiguous_format:
                    return False
            elif is_op(u, aten.view, aten.reshape, aten._unsafe_view):
                shape = val(u).shape
                if len(shape) != 3 or not _static_equal(list(shape[:2]), list(val(t).shape[:2])):
                    return False
            else:
                return False
    return True


def _blhd_memory(node: torch.fx.Node) -> bool:
    """Whether ``node``'s traced value is (B, H, L, D) over (B, L, H, D) memory (what ATen's flash
    kernels return for transposed inputs: an SDPA call's output layout in the program)."""
    v = val(node)
    if not isinstance(v, torch.Tensor) or v.dim() != 4:
        return False
    _, h, l, d = v.shape
    return _static_equal(list(v.stride()), [l * h * d, d, h * d, 1])


def _erase_unused(graph: torch.fx.Graph, node: torch.fx.Node, private: set) -> None:
    """Erase ``node`` and, transitively, its inputs once nothing reads them: pure ops, and the
    ``private`` in-place ops (on scores nothing else reads) that dead-code elimination keeps."""
    work = [node]
    while work:
        n = work.pop()
        if getattr(n, "_erased", False) or n.graph is not graph or n.users or n.op != "call_function":
            continue
        if n.is_impure() and n not in private:
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        work.extend(inputs)


def _match_scores_quietly(gm, x) -> bool:
    try:
        _match_scores(gm, x)
        return True
    except NoMatch:
        return False


class AttentionPass(Pass):
    """Find softmax attention in every common spelling and lift it to ``seqfuse.attention``."""

    name = "attention"

    def run(self, ctx: PassContext) -> None:
        _restore_raising_fills(ctx.graph)
        for node in list(ctx.graph.nodes):
            if getattr(node, "_erased", False) or node.graph is not ctx.graph:
                continue  # erased with a region rewritten before it
            if is_op(node, aten.softmax, aten._softmax):
                self._softmax(ctx, node)
            elif node.target is aten.scaled_dot_product_attention.default:
                self._sdpa(ctx, node)
        ctx.graph.eliminate_dead_code()
        ctx.gm.recompile()

    # softmax(q·kᵀ·s + mask)·v -> attention
    def _softmax(self, ctx: PassContext, sm: torch.fx.Node) -> None:
        gm = ctx.gm
        x = sm.args[0]
        if is_op(sm, aten.softmax) and isinstance(x, torch.fx.Node) and \
                _narrows(val(x).dtype, val(sm).dtype):
            if _match_scores_quietly(gm, x):
                ctx.report.add_near_miss("attention", f"the softmax narrows the scores from {val(x).dtype} to "
                                         f"{val(sm).dtype} (the op computes them at the inputs' precision)", sm)
            return
        sink = _sink_split(sm)
        if sink is not None:  # the probabilities start at the slice that drops the sink's column
            x = sink.scores
        values = scores = None
        try:
            values = _match_values(sink.drop if sink is not None else sm)
        except NoMatch as e:
            values_err = str(e)
        try:
            scores = _match_scores(gm, x)
        except NoMatch as e:
            scores_err, scores_exc = str(e), e
        if values is None and scores is None:
            if scores_exc.certain:  # q·kᵀ scores but for a reshape that mixes the query or key axis
                ctx.report.add_near_miss("attention", scores_err, sm)
            elif sink is None and (cat := _sink_cat(sm, narrowed := [])) is not None and \
                    any(_match_scores_quietly(gm, x) for x in cat.args[0]):
                # q·kᵀ scores with a column beside them, but not the form above: never silent
                why = (f"cast from {narrowed[0][0]} to {narrowed[0][1]} before the softmax (the op computes them "
                       "at the inputs' precision)" if narrowed else
                       f"not then dropped by a slice [..., :-1] alone: {values_err}")
                ctx.report.add_near_miss("attention", "a softmax over q·kᵀ scores concatenated with a column (an "
                                         f"attention sink), {why}", sm)
            return  # else a softmax that is not attention (a router, a classifier head...)
        if values is None or scores is None:
            ctx.report.add_near_miss("attention", values_err if values is None else scores_err, sm)
            return
        try:
            self._rewrite(ctx, sm, values, scores, sink)
        except NoMatch as e:
            ctx.report.add_near_miss("attention", str(e), sm)

    def _rewrite(self, ctx: PassContext, sm, values, sc: _Scores, sink: _Sink | None = None) -> None:
        gm, graph = ctx.gm, ctx.graph
        pv, p_node, dropout = values
        x_in = sink.scores if sink is not None else sm.args[0]
        back = rank(sm) - sm.args[1] % rank(sm)  # the softmax axis, counted from the end
        # letters of the scores contraction: q·kᵀ summed over exactly one axis d
        (la, lb), lo = _einsum_parts(sc.einsum)
        a, b = sc.einsum.args[1]
        # size-1 axes summed away by one operand alone (a batch of 1 folded into a reshape) are dropped
        a, la = _drop_unit_axes(graph, pv, a, la, lb + lo, sm)
        b, lb = _drop_unit_axes(graph, pv, b, lb, la + lo, sm)
        contracted = (set(la) & set(lb)) - set(lo)
        if len(contracted) != 1 or len(lo) < 2:
            raise NoMatch(f"the scores sum over {len(contracted)} axes, not one feature axis")
        d = contracted.pop()
        if back > len(lo):
            raise NoMatch("the softmax axis is not an axis of the scores contraction")
        # the key axis j is the softmax axis (an axis of one operand only: k); the query axis i
        # is an axis of the other operand only (q); every other axis is a batch axis of both
        j = lo[len(lo) - back]
        if (j in la) == (j in lb):
            raise NoMatch("the softmax axis is shared by both operands of the scores, not a key axis")
        (q, lq), (k, lk) = ((a, la), (b, lb)) if j in lb else ((b, lb), (a, la))
        if any(c not in lq for c in lo if c != j):
            raise NoMatch("the keys have a batch axis the queries lack (queries broadcast over it)")
        q_only = [c for c in lo if c not in lk]
        if not q_only:
            raise NoMatch("the scores have no query axis")
        i = q_only[-1]
        batch = [c for c in lo if c not in (i, j)]
        # batch reshapes between the scores and the values ((B·H, L, S) <-> (B, H, L, S), Bloom):
        # every mask, bias and the values are brought to the contraction's own batch grouping
        stages = [x for x in [x_in, p_node, *sc.keep_stages, *(b_.stage for b_ in sc.biases)]
                  if not _same_shape(val(x).shape, val(sc.einsum).shape)]
        if sink is not None and (stages or j != lo[-1]):
            raise NoMatch("attention sinks on scores that are reshaped, or whose key axis is not the last axis")
        if stages and {i, j} != set(lo[-2:]):
            raise NoMatch(f"{_op_name(_first_reshape(x_in, p_node, sc.einsum))} between the scores and the "
                          "values, and the query and key axes are not the last two axes of the scores")
        sc.keeps = [_regroup(graph, pv, m, st, sc.einsum, sm) for m, st in zip(sc.keeps, sc.keep_stages)]
        for b_ in sc.biases:
            b_.tensor = _regroup(graph, pv, b_.tensor, b_.stage, sc.einsum, sm)
        # masks and biases read the scores' axis order; the op reads (*batch, i, j)
        layout = _Layout(list(val(sc.einsum).shape), [lo.index(c) for c in batch + [i, j]])
        # the values contraction must sum over the softmax axis
        (p_l, v_l), o_l = _einsum_parts(pv)
        if pv.args[1][1] is p_node:
            p_l, v_l = v_l, p_l
            v = pv.args[1][0]
        else:
            v = pv.args[1][1]
        v, v_l = _drop_unit_axes(graph, pv, v, v_l, p_l + o_l, sm)
        # size-1 batch axes of p that p·v sums away alone (a batch of 1 folded into the contraction's
        # view): p is read without them (a squeezed view stands for its shape)
        drop = [n for n, c in enumerate(p_l[:-2]) if c not in v_l + o_l and _known(val(p_node).shape[n] == 1)]
        if drop:
            for n in reversed(drop):
                p_node = _emit(graph, pv, aten.squeeze.dim, (p_node, n), sm)
            p_l = "".join(c for n, c in enumerate(p_l) if n not in drop)
        taken = set(la) | set(lb) | set(lo)
        fresh = (c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in taken)
        if back > len(p_l):
            raise NoMatch("the probabilities change rank before the value contraction")
        jv = p_l[len(p_l) - back]
        if jv in o_l or jv not in v_l:
            raise NoMatch("the value contraction does not sum over the softmax axis")
        e_letters = [c for c in v_l if c not in p_l]
        # size-1 axes of v that the output keeps and p lacks (a batch or head of 1 folded into the
        # contraction around a reshape): squeezed from v, put back in the output
        units = [c for c in e_letters if c in o_l and _known(val(v).shape[v_l.index(c)] == 1)]
        if units and len(e_letters) - len(units) == 1:
            for c in units:
                v = _emit(graph, pv, aten.squeeze.dim, (v, v_l.index(c)), sm)
                v_l = v_l.replace(c, "")
            e_letters = [c for c in e_letters if c not in units]
        else:
            units = []
        if len(e_letters) != 1 or any(c not in o_l for c in p_l if c != jv):
            raise NoMatch("the value contraction is not p·v over the key axis")
        regroup_out = None
        if not _same_shape(val(p_node).shape, val(sc.einsum).shape):
            # p reaches the values regrouped (B·H, L, S): v joins the scores' grouping (*batch, j, e),
            # the output goes back to p's, the letters pv names it with
            iv = p_l[-1] if back == 2 else p_l[-2]
            p_out = p_l[:-2] + iv + e_letters[0]
            if set(o_l) != set(p_out) | set(units):
                raise NoMatch("the attention output has axes the op cannot produce")
            v = _to_layout(graph, pv, v, v_l, p_l[:-2] + jv + e_letters[0], sm)
            v = _regroup(graph, pv, v, p_node, sc.einsum, sm, full=True)
            e = next(fresh)
            v_l = "".join(lo[:-2]) + j + e
            regroup_out = p_out
        else:
            if len(p_l) != len(lo):
                raise NoMatch("the probabilities change rank before the value contraction")
            rename = dict(zip(p_l, lo))            # letters of p in pv -> letters of the scores
            for c in v_l + o_l:
                if c not in rename:
                    rename[c] = next(fresh)            # value-only letters must not collide
            e = rename[e_letters[0]]
            v_l = "".join(rename.get(c, c) for c in v_l)
            o_l = "".join(rename.get(c, c) for c in o_l)
            units = [rename[c] for c in units]
        out_letters = "".join(batch) + i + e
        if regroup_out is None and set(o_l) != set(out_letters) | set(units):
            raise NoMatch("the attention output has axes the op cannot produce")
        # scale factors on q or k themselves (pre-scaled queries or keys)
        factors = list(sc.factors)
        for which in ("q", "k"):
            node = q if which == "q" else k
            while is_op(node, aten.mul, aten.div) and is_scalar(node.args[1], gm) and \
                    isinstance(node.args[0], torch.fx.Node):
                c = constant_value(node.args[1], gm)
                factors.append((c if c is not None else node.args[1], is_op(node, aten.div)))
                node = node.args[0]
            if which == "q":
                q = node
            else:
                k = node
        # masks: shape-only ones become the structural attribute, others stay tensors.
        # Additive 0/-inf masks stay biases: s + (-inf) is NaN where the score is NaN or +inf
        # (a NaN or inf in q or k), which a mask that replaces masked scores would hide.
        # A keep read from a module buffer (nanoGPT's tril buffer) is shape-only under a value
        # guard: its reads become guards only if the rewrite uses the structure it gives.
        shape_keeps = [m for m in sc.keeps if is_shape_only(m, constants=True)]
        tensor_keeps = [m for m in sc.keeps if m not in shape_keeps]
        inf_biases = []
        biases = list(sc.biases)
        # all of them together (a window from triu + tril), else the biases that classify alone
        structural = None
        with tentative_reads(gm) as constant_reads:
            for joined in (inf_biases, [b_ for b_ in inf_biases if _structural(gm, [(b_.tensor, True)], layout)]):
                structural = _structural(gm, [(m, False) for m in shape_keeps] +
                                         [(b_.tensor, True) for b_ in joined], layout)
                if structural is not None:
                    biases += [b_ for b_ in inf_biases if b_ not in joined]
                    break
        if structural is None:
            tensor_keeps += shape_keeps
            biases += inf_biases
            structural = ("none", 0, 0)
            constant_reads = set()
        mask_kind, diag, window = structural
        bias_mask = sc.bias_mask and mask_kind != "none"
        if sc.bias_mask and not bias_mask:
            tensor_keeps = []   # nothing structural to run instead: the mask stays the plain bias it is
        # GQA: unrepeated k and v when both repeat the last batch axis the same way
        gqa = 1
        rk, rv = _unrepeat(k), _unrepeat(v)
        if rk and rv and rk[2] == rv[2] and batch and \
                lk[rk[1]] == batch[-1] and v_l[rv[1]] == batch[-1]:
            k, v, gqa = rk[0], rv[0], rk[2]
        elif batch and _one_head(q, lq, k, lk, v, v_l, batch[-1]):
            gqa = val(q).shape[lq.index(batch[-1])]  # MQA: k and v broadcast one head to all
        # layouts: q (*B, i, d), k (*B, j, d), v (*B, j, e); output back in pv's order
        before = pv
        qc = _to_layout(graph, before, q, lq, "".join(batch) + i + d, sm)
        kc = _to_layout(graph, before, k, lk, "".join(batch) + j + d, sm)
        vc = _to_layout(graph, before, v, v_l, "".join(batch) + j + e, sm)
        keep = None
        for m in tensor_keeps:
            m = _to_scores_layout(graph, before, m, layout, sm)
            keep = m if keep is None else _emit(graph, before, aten.logical_and.default, (keep, m), sm)
        bias = None
        sums = {b_.dtype for b_ in biases}
        if len(sums) > 1 and sums & {torch.float16, torch.bfloat16}:
            raise NoMatch(f"biases added to the scores in different dtypes ({sorted(map(str, sums))})")
        for term in biases:
            b_, negate, dtype = term.tensor, term.negated, term.dtype
            if val(b_).dtype != dtype:
                # the op adds its bias in the bias's dtype (a 16-bit one rounds s + bias, docs/ir.md):
                # the dtype the program summed in (s + int/bool mask promotes it, bf16 s + fp32 bias is fp32)
                b_ = _emit(graph, before, aten.to.dtype, (b_, dtype), sm)
            if negate:
                b_ = _emit(graph, before, aten.neg.default, (b_,), sm)
            if term.mult != 1.0:
                b_ = _emit(graph, before, aten.mul.Tensor, (b_, term.mult), sm)
            b_ = _to_scores_layout(graph, before, b_, layout, sm)
            bias = b_ if bias is None else _emit(graph, before, aten.add.Tensor, (bias, b_), sm)
        fake_out = val(vc).new_empty([*val(qc).shape[:-1], val(vc).shape[-1]])
        if regroup_out is None and not _static_equal(_permuted(fake_out.shape, out_letters + "".join(units), o_l,
                                                               [1] * len(units)), val(pv).shape):
            raise NoMatch(f"output shape {tuple(_permuted(fake_out.shape, out_letters, o_l))} differs from the "
                          f"program's {tuple(val(pv).shape)}")
        _no_mutation_between(sc.einsum, pv, set(sc.inplace))
        sink_op = None
        if sink is not None:
            # the sink column (*scores axes but j, 1) -> (*batch, i): one logit per row
            col = _emit(graph, before, aten.squeeze.dim, (sink.column, -1), sm)
            sink_op = _to_layout(graph, before, col, "".join(c for c in lo if c != j), "".join(batch) + i, sm)
        scale = sym_product(graph, factors, before)
        op = Attention(q=qc, k=kc, v=vc, bias=bias, keep=keep, sink=sink_op, scale=scale, mask=mask_kind, diag=diag,
                       window=window, fill=sc.fill if (sc.keeps or mask_kind != "none") else -math.inf,
                       bias_after_mask=sc.bias_after_mask, gqa_groups=gqa, softcap=sc.softcap,
                       dropout=dropout, bias_mask=bias_mask, algorithm="fused",
                       out_transposed=regroup_out is None and o_l == out_letters and
                       val(vc).dtype == val(pv).dtype and _transposed_output_is_free(pv))
        ir = ctx.insert_ir(op, before, sm)
        ir.meta["val"] = fake_out
        if regroup_out is not None:
            out = _regroup(graph, before, ir, sc.einsum, p_node, sm)
            out = _to_layout(graph, before, out, regroup_out, o_l, sm) if o_l != regroup_out else out
            if not _static_equal(val(out).shape, val(pv).shape):
                raise NoMatch(f"output shape {tuple(val(out).shape)} differs from the program's {tuple(val(pv).shape)}")
        else:
            out = _to_layout(graph, before, ir, out_letters, o_l, sm) if o_l != out_letters else ir
        if val(out).dtype != val(pv).dtype:
            out = _emit(graph, before, aten.to.dtype, (out, val(pv).dtype), sm)
        pv.replace_all_uses_with(out)
        commit(gm, constant_reads)
        _erase_unused(graph, pv, set(sc.inplace))

    # F.scaled_dot_product_attention(q, k, v, mask, dropout, causal, scale, gqa) -> attention
    def _sdpa(self, ctx: PassContext, node: torch.fx.Node) -> None:
        q, k, v = node.args[:3]
        attn_mask = arg(node, 3, "attn_mask")
        dropout = constant_value(arg(node, 4, "dropout_p", 0.0))
        is_causal = constant_value(arg(node, 5, "is_causal", False))
        scale = arg(node, 6, "scale")
        enable_gqa = constant_value(arg(node, 7, "enable_gqa", False))
        if dropout is None or is_causal is None or enable_gqa is None:
            ctx.report.add_near_miss("attention", "SDPA flags not known at compile time", node)
            return
        if scale is not None and constant_value(scale) is None and not is_scalar(scale):
            ctx.report.add_near_miss("attention", "SDPA scale is not a scalar", node)
            return
        if rank(q) < 3 or not (rank(q) == rank(k) == rank(v)):
            ctx.report.add_near_miss("attention", "SDPA inputs of rank < 3 or of different ranks", node)
            return
        gqa = 1
        if enable_gqa:
            hq, hk = val(q).shape[-3], val(k).shape[-3]
            if not (isinstance(hq, int) and isinstance(hk, int)) or hq % hk:
                ctx.report.add_near_miss("attention", "SDPA enable_gqa with head counts unknown at compile time", node)
                return
            gqa = hq // hk
        if is_causal and not _static_equal([val(q).shape[-2]], [val(k).shape[-2]]):
            # SDPA's is_causal with Lq != Lk follows its own kernels' rules (NaN rows on CPU)
            ctx.report.add_near_miss("attention", "SDPA is_causal with query and key lengths that may differ", node)
            return
        mask_kind, diag, window = ("causal", 0, 0) if is_causal else ("none", 0, 0)
        keep = bias = None
        if attn_mask is not None:
            # the mask stays a tensor even when it depends only on sizes: SDPA adds it (a NaN or +inf
            # score at a masked key stays NaN), which a structural mask that replaces scores would not
            is_bool = val(attn_mask).dtype == torch.bool
            if is_bool:
                keep = attn_mask
            else:
                bias = attn_mask
                bdt, qdt = val(attn_mask).dtype, val(q).dtype
                if bdt not in (torch.float32, qdt):
                    # SDPA raises for it; left alone, the program still does
                    ctx.report.add_near_miss("attention", f"SDPA attn_mask of dtype {bdt} with {qdt} queries", node)
                    return
                if bdt in (torch.float16, torch.bfloat16):
                    # SDPA adds its mask to fp32 scores: the op's 16-bit bias would round the sum
                    bias = _emit(ctx.graph, node, aten.to.dtype, (attn_mask, torch.float32), node)
        op = Attention(q=q, k=k, v=v, bias=bias, keep=keep, scale=constant_value(scale) if scale is not None
                       and constant_value(scale) is not None else scale, mask=mask_kind, diag=diag, window=window,
                       gqa_groups=gqa, dropout=float(dropout), empty_rows="zero", algorithm="fused",
                       out_transposed=_blhd_memory(node) or _transposed_output_is_free(node))
        ir = ctx.insert_ir(op, node, node)
        node.replace_all_uses_with(ir)
