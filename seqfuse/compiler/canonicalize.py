"""Canonicalization: Dynamo's FX graph -> pre-dispatch ATen -> one spelling per concept.

1. ``trace_pre_dispatch``: re-trace the Dynamo graph with ``make_fx(pre_dispatch=True)``
   under Dynamo's own fake mode, so symbolic (dynamic) shapes survive, autograd
   is not yet applied, and every node keeps the user's source location.  vmap levels
   that are provably no-ops (an elementwise function, seqfuse.compiler.vmap) are removed
   first; any other torch.func transform makes the graph ``Untraceable``.  A custom
   ``torch.autograd.Function`` (Dynamo's ``autograd_function_apply``) stays one opaque
   node with its forward and backward bodies: make_fx would inline its forward and
   lose the backward the user wrote.
2. ``normalize_slices``: the pieces of ``unbind`` / ``split`` and ``narrow`` become ``select`` /
   ``slice`` of the tensor (the same views; a piece of one step ``unsqueeze(select)``), so a loop
   over ``x.unbind(1)`` or ``x.split(1, 1)`` has per-step slices.
   ``block_slices``: consecutive blocks ``x[:, 8i:8i+8]`` of one tensor (a Python loop over blocks of
   the sequence, MiniMax's lightning attention) become ``select(reshape(x, (.., n, 8, ..)), d, i)``, the
   per-step slices of a loop over chunks; a ragged last block stays a slice.
   ``normalize_inplace``: an in-place op on a temporary nothing else reads becomes out of place.
3. ``normalize_contractions``: matmul / bmm / mm / baddbmm (its beta·input added back; a symbolic
   beta as ``where(beta != 0, beta·input, 0)``, which keeps beta = 0 ignoring the input) / einsum /
   broadcast-multiply + sum become ``aten.einsum`` with transposes, permutes,
   unsqueezes and broadcasts of the operands folded into the equation; a fold
   is kept only if every letter keeps its size (a sum over n broadcast copies
   must not become a sum over the one stored).
4. ``normalize_masks``: masked_fill and every ``where`` spelling with a constant
   fill become ``aten.where.ScalarOther(keep, scores, fill)`` (keep = True where
   the score survives).  ``normalize_softmax``: a softmax written out with its row max
   subtracted becomes ``softmax``.  ``normalize_postnormalized``: attention normalized after the
   value contraction, ``exp(s - max) @ v / Σ exp(s - max)`` (with a sink: the max and the sum taking
   one more logit), becomes ``softmax(s) @ v`` (with a sink: the gpt-oss ``softmax(cat)[..., :-1]``).
5. ``restore_layouts`` (run by the pipeline after the recognizers): a canonical einsum (or
   out-of-place op) that no rewrite consumed, and whose result is laid out otherwise than the
   user's op laid it out, is copied back to the user's (contiguous) layout, so the graph handed
   downstream has the layouts of the program as written.
"""
from __future__ import annotations

import math
import operator
import string

import torch
import torch.fx
import torch.fx.traceback as fx_traceback
from torch._prims_common import make_contiguous_strides_for
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing, get_proxy_mode, make_fx, track_tensor_tree
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils import _pytree as pytree

from seqfuse.compiler.checkpoint import selective_bodies
from seqfuse.compiler import replay as _replay
from seqfuse.compiler import vmap as _vmap
from seqfuse.passes.loop_reroll import _seed_key, _writes_into
from seqfuse.passes.pattern import (arg, axis_view, constant_value, copy_meta, emit_before, fake_of, is_op, is_scalar, known_int,
                                    op_name, rank, same_expr, val, writes_through, written)

aten = torch.ops.aten


def fake_inputs(gm: torch.fx.GraphModule, example_inputs) -> tuple[list, FakeTensorMode]:
    """The placeholders' fake values from Dynamo (``meta["example_value"]``) and their fake mode.

    Outside Dynamo (no example values), the real example inputs are converted
    with a fresh fake mode (static shapes).
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = [n.meta.get("example_value", n.meta.get("val")) for n in placeholders]
    modes = [v.fake_mode for v in values if isinstance(v, FakeTensor)]
    if modes and len(values) == len(example_inputs) and all(v is not None for v in values):
        return values, modes[0]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    return [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs], mode


class Untraceable(Exception):
    """The Dynamo graph holds something seqfuse does not re-trace faithfully; the backend then
    compiles it unchanged and reports why (a designed refusal, not a failure)."""

    def __init__(self, reason: str, node: torch.fx.Node | None = None):
        super().__init__(reason)
        self.node = node


def _functorch_call(node: torch.fx.Node) -> bool:
    module = getattr(node.target, "__module__", "") or ""
    return node.op == "call_function" and (module.startswith("torch._functorch") or module.startswith("torch._C._functorch"))


_AUTOGRAD_FUNCTION_APPLY = torch.ops.higher_order.autograd_function_apply


class _Retrace(torch.fx.Interpreter):
    """Runs Dynamo's graph under ``make_fx``; a custom autograd.Function call is recorded as
    one ``autograd_function_apply`` node (forward and backward bodies kept as submodules)
    instead of being traced through, so the user's backward survives the re-trace."""

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        if target.startswith(_vmap.FOLDED) and get_proxy_mode() is not None:
            # a folded vmap level's value (vmap.fold_shape_only_vmaps): a tensor literal, as
            # torch.tensor(...) makes one (the fake mode refuses a real tensor in an op)
            return torch.ops.aten.lift_fresh_copy.default(value)
        return value

    def call_function(self, target, args, kwargs):
        if target is not _AUTOGRAD_FUNCTION_APPLY:
            return super().call_function(target, args, kwargs)
        mode = get_proxy_mode()
        if mode is None:
            return super().call_function(target, args, kwargs)
        # the outputs' fake values, computed with nothing recorded: no pre-dispatch key, no proxy
        # mode, no torch-function modes (those record the body's grad-mode switches)
        no_pre_dispatch = torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.PreDispatch))
        with torch._C.DisableTorchFunction(), no_pre_dispatch, disable_proxy_modes_tracing():
            out = target(*args, **kwargs)
        tracer = mode.tracer
        for body, stem in zip(args[:2], ("autograd_fwd", "autograd_bwd")):
            i = 0
            while hasattr(tracer.root, f"{stem}_{i}"):
                i += 1
            tracer.root.register_module(f"{stem}_{i}", body)
        proxy_args = pytree.tree_map(tracer.unwrap_proxy, args)
        proxy_kwargs = pytree.tree_map(tracer.unwrap_proxy, kwargs)
        proxy = tracer.create_proxy("call_function", target, proxy_args, proxy_kwargs)
        return track_tensor_tree(out, proxy, constant=None, tracer=tracer)


def _without_transforms(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` with its no-op vmap levels removed (a copy when there are any), in its own graph and in
    the bodies of the checkpoint calls it keeps (which the re-trace traces too); raises Untraceable
    for any other torch.func transform."""
    if _vmap.has_vmap(gm):
        # levels computed from sizes alone (FlexAttention's block masks) become constants
        gm, _ = _vmap.fold_shape_only_vmaps(gm)
    if _vmap.has_vmap(gm):
        # e.g. associative_scan(combine_mode="generic"): Dynamo inlines each combine call as a
        # vmap level; an elementwise combine's levels are no-ops and are removed (a copy of gm)
        try:
            gm = _vmap.remove_noop_vmaps(gm)
        except _vmap.NotNoOp as e:
            raise Untraceable(f"the graph uses torch.func transforms (vmap: {e}); seqfuse leaves it to the "
                              "downstream compiler", e.node) from None
    bad = next((n for n in gm.graph.nodes if _functorch_call(n)), None)
    if bad is not None:
        # make_fx re-runs vmap levels on fake tensors and bakes their intermediates into the
        # graph as constants (seen with associative_scan(combine_mode="generic"), which Dynamo
        # inlines as vmapped odd/even steps): refuse rather than build a graph that can't run
        raise Untraceable(f"the graph uses torch.func transforms ({bad.target.__name__}, e.g. vmap or "
                          "associative_scan with combine_mode='generic'); seqfuse leaves it to the downstream compiler", bad)
    for node, body in selective_bodies(gm):
        clean = _without_transforms(body)
        if clean is not body:
            clean.meta.update(body.meta)
            setattr(gm, node.args[0].target, clean)
    return gm


def trace_pre_dispatch(gm: torch.fx.GraphModule, example_inputs, replay: bool | None = None) -> torch.fx.GraphModule:
    """Re-trace ``gm`` to pre-dispatch ATen, keeping symbolic shapes and source locations.

    Large repetitive graphs (unrolled time loops) are traced by replay
    (:mod:`seqfuse.compiler.replay`: each distinct call traced once); ``replay`` forces
    (True) or forbids (False) that path, None decides by :func:`replay.eligible`.
    """
    if any(isinstance(x, (list, tuple)) for x in example_inputs):
        # compiled autograd's backward graph takes its tensors boxed in one list, which it expects the
        # compiled graph to clear as it reads them (``steal_arg``); a re-trace would flatten it
        raise Untraceable("a graph that takes its inputs boxed in a list (compiled autograd's backward "
                          "graph) is left to the downstream compiler as it is")
    gm = _without_transforms(gm)
    values, mode = fake_inputs(gm, example_inputs)
    traced = None
    if replay if replay is not None else _replay.eligible(gm):
        try:
            traced = _replay.trace_by_replay(gm, values, mode)
        except _replay.Unsupported:
            if replay:
                raise
    if traced is None:
        with mode, fx_traceback.preserve_node_meta():
            traced = make_fx(_Retrace(gm).run, pre_dispatch=True)(*values)
    # keep Dynamo's input names (l_q_, l_self_modules_...): they are what users recognise
    old = [n for n in gm.graph.nodes if n.op == "placeholder"]
    new = [n for n in traced.graph.nodes if n.op == "placeholder"]
    renamed = False
    for o, n in zip(old, new):
        if n.name != o.name and o.name not in traced.graph._graph_namespace._used_names:
            n._rename(o.name)
            renamed = True
    if renamed:
        traced.recompile()
    return traced


# --- contractions ------------------------------------------------------------

_LETTERS = string.ascii_letters


def _matmul_letters(ra: int, rb: int, kind: str) -> tuple[str, str, str] | None:
    """Einsum letters of a matmul-family op for operand ranks ra, rb."""
    if ra < 2 or rb < 2:
        return None  # vector products keep their own op
    nb = max(ra, rb) - 2
    batch = _LETTERS[:nb]
    i, k, j = _LETTERS[nb:nb + 3]
    return batch[nb - (ra - 2):] + i + k, batch[nb - (rb - 2):] + k + j, batch + i + j


def _parse_equation(eq: str) -> tuple[list[str], str] | None:
    eq = eq.replace(" ", "")
    if "..." in eq or "->" not in eq:
        return None
    lhs, out = eq.split("->")
    return lhs.split(","), out


def _rename_letters(ins: list[str], out: str) -> str:
    """Deterministic equation text: letters renamed in order of first appearance."""
    mapping: dict[str, str] = {}
    for ch in "".join(ins) + out:
        if ch not in mapping:
            mapping[ch] = _LETTERS[len(mapping)]
    tr = lambda s: "".join(mapping[c] for c in s)  # noqa: E731
    return ",".join(tr(s) for s in ins) + "->" + tr(out)


def _fold(operand: torch.fx.Node, letters: str, fresh: list[str]) -> tuple[torch.fx.Node, str]:
    """Fold the view chain of one operand into its letters (see ``axis_view``).

    An axis ``expand`` broadcasts from size 1 keeps its letter on the size-1 base
    axis (einsum broadcasts it back); ``_letter_sizes`` checks that another operand
    still gives that letter its full size."""
    base, axes = axis_view(operand, broadcast=True)
    if base is operand or _clones_written(operand, base):
        return operand, letters
    base_letters = [None] * rank(base)
    for view_axis, b in enumerate(axes):
        if b is not None:
            base_letters[b] = letters[view_axis]
    base_letters = [c if c is not None else fresh.pop() for c in base_letters]
    return base, "".join(base_letters)


def _clones_written(operand: torch.fx.Node, base: torch.fx.Node) -> bool:
    """Whether the chain from ``base`` to ``operand`` holds a clone of a tensor some view of which is written
    in place (copy_ or another mutating op): the clone keeps the value it had then, and the einsum must
    read the clone (autograd saves it), not the base that is written after."""
    chain, n = [], operand
    while n is not base and isinstance(n, torch.fx.Node) and n.args:
        chain.append(n)
        n = n.args[0]
    if not any(is_op(c, aten.clone) for c in chain):
        return False
    root = base
    while isinstance(root, torch.fx.Node) and root.op == "call_function" and root.args and \
            isinstance(root.args[0], torch.fx.Node) and is_op(root, aten.select, aten.slice, aten.view,
                                                              aten.unsqueeze, aten.alias, aten.expand):
        root = root.args[0]
    return written(root)


def _letter_sizes(operands, letters) -> dict:
    """Size of each einsum letter: the largest over the operands (size-1 axes broadcast)."""
    sizes: dict = {}
    for op, lets in zip(operands, letters):
        for c, n in zip(lets, val(op).shape):
            if c not in sizes or statically_known_true(sizes[c] == 1):
                sizes[c] = n
    return sizes


def _factored_sum(operands, letters, out) -> bool:
    """Whether a summed letter of ``sum(a * b)`` is broadcast in one operand (absent or of size 1
    there, longer in the other): ``Σ_c a·b_c``, which ``torch.einsum`` computes as ``a·Σ_c b_c``.
    That is not the program's arithmetic where a is ±inf (inf·b_1 + inf·b_2 is NaN when the b_c
    differ in sign, inf·(b_1 + b_2) is not), so such a sum stays a mul and a sum."""
    sizes = _letter_sizes(operands, letters)
    for c, n in sizes.items():
        if c in out or statically_known_true(n == 1):
            continue
        for op, lets in zip(operands, letters):
            if c not in lets or statically_known_true(val(op).shape[lets.index(c)] == 1):
                return True
    return False


def _shape_matches(expected, got) -> bool:
    return len(expected) == len(got) and all(statically_known_true(a == b) for a, b in zip(expected, got))


def _einsum_for(node: torch.fx.Node):
    """(operands, letters per operand, output letters, extra scale) of a contraction node, or None."""
    if is_op(node, aten.matmul, aten.bmm, aten.mm):
        a, b = node.args[0], node.args[1]
        letters = _matmul_letters(rank(a), rank(b), "matmul")
        if letters is None:
            return None
        return [a, b], list(letters[:2]), letters[2], 1
    if is_op(node, aten.baddbmm):
        # beta·input + alpha·(a @ b): the bias term (beta != 0, Bloom's ALiBi) is added back by the caller
        beta, alpha = arg(node, 3, "beta", 1), arg(node, 4, "alpha", 1)
        if not (is_scalar(alpha) and is_scalar(beta)):
            return None
        a, b = node.args[1], node.args[2]
        letters = _matmul_letters(3, 3, "bmm")
        return [a, b], list(letters[:2]), letters[2], alpha
    if is_op(node, aten.einsum):
        parsed = _parse_equation(node.args[0])
        if parsed is None or len(node.args[1]) != 2:
            return None
        return list(node.args[1]), parsed[0], parsed[1], 1
    if is_op(node, aten.sum) and node.target is aten.sum.dim_IntList and not arg(node, 2, "keepdim", False) \
            and arg(node, 3, "dtype") is None:
        prod = node.args[0]
        if not is_op(prod, aten.mul) or len(prod.users) != 1 or prod.target is not aten.mul.Tensor:
            return None
        a, b = prod.args
        if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)) or rank(a) is None or rank(b) is None:
            return None
        r = rank(prod)
        dims = {d % r for d in node.args[1]}
        full = _LETTERS[:r]
        la, lb = full[r - rank(a):], full[r - rank(b):]
        return [a, b], [la, lb], "".join(c for i, c in enumerate(full) if i not in dims), 1
    return None


def _baddbmm_bias(graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node | None:
    """The term beta·input of a baddbmm ``node`` (None when beta is 0 or ``node`` is no baddbmm),
    inserted before the insertion point."""
    if not is_op(node, aten.baddbmm):
        return None
    beta, bias = arg(node, 3, "beta", 1), node.args[0]
    c = constant_value(beta)
    if c == 0:
        return None
    if c == 1:
        return bias
    scaled = graph.call_function(aten.mul.Tensor, (bias, beta if c is None else c))
    copy_meta(scaled, node)
    if c is not None:
        scaled.meta["val"] = val(bias) * c
        return scaled
    # a symbolic beta (Dynamo passes a float module attribute such as Bloom's as a graph input
    # under dynamic=True): baddbmm ignores its input when beta is 0, NaN and inf included, which
    # beta·input would not: where(beta != 0, beta·input, 0)
    b, fake = val(beta), val(bias)
    with fake.fake_mode:
        scaled.meta["val"] = fake * b
        flag = torch.ops.aten.scalar_tensor.default(b, dtype=fake.dtype)
        nonzero = torch.ops.aten.ne.Scalar(flag, 0)
        kept = torch.ops.aten.where.ScalarOther(nonzero, scaled.meta["val"], 0.0)
    nodes = []
    for target, args, kwargs, value in ((aten.scalar_tensor.default, (beta,), {"dtype": fake.dtype}, flag),
                                        (aten.ne.Scalar, (None, 0), {}, nonzero),
                                        (aten.where.ScalarOther, (None, scaled, 0.0), {}, kept)):
        args = tuple(nodes[-1] if a is None else a for a in args)
        n = graph.call_function(target, args, kwargs)
        copy_meta(n, node)
        n.meta["val"] = value
        nodes.append(n)
    return nodes[-1]


#: meta key: the fake value of the user's op that a canonical node replaced (its layout is the one
#: restore_layouts gives back to a canonical node no rewrite consumed)
LAYOUT = "seqfuse_layout"


def _remember_layout(new: torch.fx.Node, old: torch.fx.Node) -> None:
    if isinstance(val(old), torch.Tensor):
        new.meta[LAYOUT] = val(old)


def normalize_contractions(gm: torch.fx.GraphModule) -> int:
    """Rewrite every contraction to ``aten.einsum`` on the operands' base tensors; returns the count."""
    graph, n = gm.graph, 0
    checked: dict = {}   # (equation, operand metadata) -> result (shape, dtype): an unrolled loop asks the same
    for node in list(graph.nodes):
        spec = _einsum_for(node)
        if spec is None:
            continue
        operands, letters, out, alpha = spec
        if any(val(o) is None for o in operands) or val(node) is None:
            continue
        if any(val(o).dtype != val(node).dtype for o in operands):
            continue  # mul promotes mixed dtypes, einsum does not (it raises)
        used = set("".join(letters) + out)
        fresh = [c for c in _LETTERS if c not in used]
        best = (operands, letters)
        # try folding both operands' view chains, then each alone
        for mask in ((True, True), (True, False), (False, True)):
            cand = [(_fold(o, l, fresh) if m else (o, l)) for o, l, m in zip(operands, letters, mask)]
            ops, lets = [c[0] for c in cand], [c[1] for c in cand]
            if ops == operands or not set(out) <= set("".join(lets)):
                continue
            got = _fake_einsum(",".join(lets) + "->" + out, [val(o) for o in ops], val(node).fake_mode, checked)
            if got is None:
                continue
            # every letter keeps its size: a broadcast letter that no operand has at full
            # size any more (or that is gone) would be summed over 1 element instead of n
            was, now = _letter_sizes(operands, letters), _letter_sizes(ops, lets)
            if not all(statically_known_true(now.get(c, 1) == n) for c, n in was.items()):
                continue
            if _shape_matches(val(node).shape, got[0]) and got[1] == val(node).dtype:
                best = (ops, lets)
                break
        ops, lets = best
        if is_op(node, aten.sum) and _factored_sum(ops, lets, out):
            continue
        equation = _rename_letters(lets, out)
        if is_op(node, aten.einsum) and ops == list(node.args[1]) and equation == node.args[0]:
            continue
        with graph.inserting_before(node):
            new = graph.call_function(aten.einsum.default, (equation, list(ops)))
            copy_meta(new, node, with_val=True)
            _remember_layout(new, node)
            if constant_value(alpha) != 1:
                new = graph.call_function(aten.mul.Tensor, (new, alpha))
                copy_meta(new, node, with_val=True)
            bias = _baddbmm_bias(graph, node)
            if bias is not None:
                new = graph.call_function(aten.add.Tensor, (new, bias))
                copy_meta(new, node, with_val=True)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        n += 1
    if n:
        graph.eliminate_dead_code()
        gm.recompile()
    return n


def _fake_einsum(equation: str, operands: list, mode, memo: dict):
    """(shape, dtype) of einsum(equation, operands) on fake tensors, None if it raises; memoized
    on static shapes (symbolic sizes are not hashable)."""
    key = None
    if all(not isinstance(s, torch.SymInt) for o in operands for s in (*o.shape, *o.stride())):
        key = (equation, tuple((tuple(o.shape), tuple(o.stride()), o.dtype) for o in operands))
        if key in memo:
            return memo[key]
    try:
        with mode:
            got = torch.einsum(equation, *operands)
        result = (got.shape, got.dtype)
    except Exception:
        result = None
    if key is not None:
        memo[key] = result
    return result


# --- masks -------------------------------------------------------------------

def _negate(graph: torch.fx.Graph, cond: torch.fx.Node, before: torch.fx.Node) -> torch.fx.Node:
    if is_op(cond, aten.logical_not, aten.bitwise_not) and val(cond.args[0]).dtype == torch.bool:
        return cond.args[0]
    with graph.inserting_before(before):
        neg = graph.call_function(aten.logical_not.default, (cond,))
    copy_meta(neg, cond)
    neg.meta["val"] = val(cond)
    return neg


def normalize_masks(gm: torch.fx.GraphModule) -> int:
    """Rewrite masked_fill / where spellings with a constant fill into
    ``where.ScalarOther(keep, x, fill)``; returns how many were rewritten."""
    graph, n = gm.graph, 0
    for node in list(graph.nodes):
        keep = x = fill = None
        if is_op(node, aten.masked_fill):
            x, cond, value = node.args[:3]
            fill = constant_value(value, gm)
            if fill is not None and isinstance(cond, torch.fx.Node):
                keep = _negate(graph, cond, node)
        elif node.target is aten.where.self:
            cond, a, b = node.args
            fa, fb = constant_value(a, gm), constant_value(b, gm)
            if fb is not None and fa is None:
                keep, x, fill = cond, a, fb
            elif fa is not None and fb is None:
                keep, x, fill = _negate(graph, cond, node), b, fa
        elif node.target is aten.where.ScalarSelf:
            cond, value, b = node.args
            keep, x, fill = _negate(graph, cond, node), b, value
        if keep is None or fill is None or not isinstance(x, torch.fx.Node) or not val(x).is_floating_point():
            continue
        if is_op(node, aten.masked_fill) and math.isfinite(float(fill)) and not math.isfinite(
                torch.tensor(float(fill), dtype=torch.float64).to(val(x).dtype).item()):
            continue  # masked_fill raises on a fill its dtype cannot hold (fp16 -1e9); where would round it
        if not _shape_matches(val(node).shape, val(x).shape) or val(node).dtype != val(x).dtype:
            continue  # the where broadcasts x or promotes its dtype: keep the original
        with graph.inserting_before(node):
            new = graph.call_function(aten.where.ScalarOther, (keep, x, float(fill)))
        copy_meta(new, node, with_val=True)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        n += 1
    if n:
        graph.eliminate_dead_code()
        gm.recompile()
    return n


def _keepdim_axis(node: torch.fx.Node, x: torch.fx.Node) -> int | None:
    """The one axis ``node`` (sum / amax / max.dim of ``x``) reduces with keepdim=True, else None."""
    if not node.args or node.args[0] is not x or not isinstance(val(x), torch.Tensor):
        return None
    r = val(x).dim()
    if node.target in (aten.sum.dim_IntList, aten.amax.default):
        dims, keep = arg(node, 1, "dim", None), arg(node, 2, "keepdim", False)
        if not keep or not isinstance(dims, (list, tuple)) or len(dims) != 1 or not isinstance(dims[0], int):
            return None
        return dims[0] % r
    if node.target is aten.max.dim:
        d, keep = arg(node, 1, "dim", None), arg(node, 2, "keepdim", False)
        return d % r if keep and isinstance(d, int) else None
    return None


def _row_max(m: torch.fx.Node, s: torch.fx.Node, d: int) -> bool:
    """Whether ``m`` is the max of ``s`` over axis d kept as an axis (``amax``, ``max(...).values``, either
    detached)."""
    while isinstance(m, torch.fx.Node) and m.target in (aten.detach.default, aten.alias.default):
        m = m.args[0]
    if not isinstance(m, torch.fx.Node):
        return False
    if m.target is operator.getitem and m.args[1] == 0 and isinstance(m.args[0], torch.fx.Node):
        m = m.args[0]
        return m.target is aten.max.dim and _keepdim_axis(m, s) == d
    return m.target is aten.amax.default and _keepdim_axis(m, s) == d


def normalize_softmax(gm: torch.fx.GraphModule) -> int:
    """Rewrite a softmax written out, ``e = exp(s - max_d(s)); e / e.sum(d, keepdim=True)``, into
    ``softmax(s, d)`` (the same computation: softmax subtracts the row max too); returns how many were
    rewritten.  Without the max subtracted the program overflows where softmax does not: left alone."""
    graph, n = gm.graph, 0
    for node in list(graph.nodes):
        if node.target is not aten.div.Tensor or not all(isinstance(a, torch.fx.Node) for a in node.args):
            continue
        e, z = node.args
        d = _keepdim_axis(z, e) if z.target is aten.sum.dim_IntList else None
        if d is None or e.target is not aten.exp.default:
            continue
        sub = e.args[0]
        if not isinstance(sub, torch.fx.Node) or sub.target is not aten.sub.Tensor or arg(sub, 2, "alpha", 1) != 1:
            continue
        s, m = sub.args
        if not isinstance(s, torch.fx.Node) or not _row_max(m, s, d):
            continue
        vs, vn = val(s), val(node)
        if vs.dtype != vn.dtype or not _shape_matches(vn.shape, vs.shape):
            continue
        with graph.inserting_before(node):
            new = graph.call_function(aten.softmax.int, (s, d))
        copy_meta(new, node, with_val=True)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        n += 1
    if n:
        graph.eliminate_dead_code()
        gm.recompile()
    return n


def unstable_softmaxes(gm: torch.fx.GraphModule) -> list:
    """The divisions ``exp(s) / exp(s).sum(d, keepdim=True)`` (a softmax written out without its row max
    subtracted) that feed a contraction: attention candidates that ``normalize_softmax`` does not read,
    since they overflow where softmax does not.  The pipeline reports each as a near miss."""
    found = []
    for node in gm.graph.nodes:
        if node.target is not aten.div.Tensor or not all(isinstance(a, torch.fx.Node) for a in node.args):
            continue
        e, z = node.args
        if e.target is aten.exp.default and z.target is aten.sum.dim_IntList and _keepdim_axis(z, e) is not None \
                and not (is_op(e.args[0], aten.sub) and _row_max(e.args[0].args[1], e.args[0].args[0],
                                                                 _keepdim_axis(z, e))) \
                and any(is_op(u, aten.einsum) for u in node.users):
            found.append(node)
    return found


# --- softmax normalized after the value contraction --------------------------------------

def _undetached(x):
    """``x`` with its ``detach`` / ``alias`` steps removed (the same values)."""
    while isinstance(x, torch.fx.Node) and x.target in (aten.detach.default, aten.alias.default):
        x = x.args[0]
    return x


def _last_axis_max(m, s: torch.fx.Node) -> bool:
    """Whether ``m`` is the max of ``s`` over its last axis alone (``amax`` or ``max(...).values``, the
    axis kept or not, either detached)."""
    m = _undetached(m)
    if not isinstance(m, torch.fx.Node):
        return False
    if m.target is operator.getitem and m.args[1] == 0 and is_op(m.args[0], aten.max) and \
            m.args[0].target is aten.max.dim:
        node, dims = m.args[0], [arg(m.args[0], 1, "dim")]
    elif m.target is aten.amax.default:
        node, dims = m, arg(m, 1, "dim", [])
    else:
        return False
    r = rank(s)
    return node.args[0] is s and len(dims) == 1 and isinstance(dims[0], int) and dims[0] % r == r - 1


def _row_layout(x, s: torch.fx.Node) -> bool | None:
    """How ``x`` holds one value per row of ``s`` (every axis but the last): True with the last axis kept
    as size 1 (``keepdim``), False without it, None when ``x`` has neither shape."""
    rows, shape = list(val(s).shape[:-1]), val(x).shape
    if _shape_matches(rows + [1], shape):
        return True
    return False if _shape_matches(rows, shape) else None


def _same_rows(x, base: torch.fx.Node, s: torch.fx.Node) -> bool:
    """Whether ``x`` is ``base`` (one value per row of ``s``) laid out row for row: through detach and views
    that leave every row axis where it is (an ``unsqueeze(-1)`` that puts the key axis back)."""
    if _row_layout(x, s) is None or _row_layout(base, s) is None:
        return False
    b, axes = axis_view(_undetached(x))
    r = rank(s) - 1
    return _undetached(b) is base and axes[:r] == list(range(r))


class _PostNormalized:
    """A match of ``einsum(eq, exp(s - m), v) / z'``: the contraction ``o``, the operand index ``k`` of the
    exponentials in it, the scores ``s``, and for a sink its logits ``sink`` (as the denominator reads
    them) and whether they keep the key axis (``keep``)."""

    def __init__(self, o, k, s, sink=None, keep=False):
        self.o, self.k, self.s, self.sink, self.keep = o, k, s, sink, keep


#: ops that reshape, move or cast a tensor's entries without computing new ones
_REGROUPS = (aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.unsqueeze, aten.squeeze,
             aten.permute, aten.transpose, aten.swapaxes, aten.t, aten.mT, aten.movedim, aten.expand, aten.clone,
             aten.contiguous, aten.alias, aten.detach, aten.to, aten._to_copy)


def _regrouped_from(x):
    """The tensor ``x`` is a reshape, view, copy or cast of (``x`` itself when it is none of those)."""
    while is_op(x, *_REGROUPS) and isinstance(x.args[0], torch.fx.Node):
        x = x.args[0]
    return x


def _exp_sum(x, exps: list) -> torch.fx.Node | None:
    """``x`` when it is ``sum`` of one of ``exps`` (an exponential the contraction reads), else None."""
    if is_op(x, aten.sum) and x.target is aten.sum.dim_IntList and x.args[0] in exps:
        return x
    return None


def _mutated_before(div: torch.fx.Node, reads: list) -> torch.fx.Node | None:
    """An op between the first of ``reads`` and ``div`` that writes a tensor in place (``detach_``, a flag
    and not values, aside), else None: the rewrite reads the scores, the values and the sink at ``div``."""
    pending, n = set(reads), div.prev
    while pending and n.op != "root":
        pending.discard(n)
        schema = getattr(n.target, "_schema", None) if n.op == "call_function" else None
        if pending and schema is not None and schema.is_mutable and not is_op(n, aten.detach_):
            return n
        n = n.prev
    return None


def _postnormalized(div: torch.fx.Node):
    """Read ``div`` as attention normalized after the value contraction: a :class:`_PostNormalized`, a
    reason (str) when it has that form but a check fails, None when it is something else.

    The form: ``o = einsum(eq, e, v)`` (any contraction: normalize_contractions made it one), ``e =
    exp(s - m)`` with ``m`` the max of ``s`` over its last axis, ``z = e.sum(-1)`` (keepdim or not), and
    ``div = o / z'`` with ``z'`` a view of ``z`` (unsqueeze / permute / view / reshape / expand).  With a
    sink: ``m = maximum(max(s), c)`` and ``z = e.sum(-1) + exp(c - m)``.  Exact because ``o`` sums over
    e's last axis alone, so dividing each of its entries by its own row's ``z`` divides each term of the
    sum: ``Σ_j e[r, j]·v[.., j] / z[r] = Σ_j softmax(s)[r, j]·v[.., j]`` once ``z'`` puts ``z[r]`` on the
    output entries of row ``r`` (checked axis by axis through the einsum's letters and the views).
    ``m`` is the max the softmax subtracts too (with the sink's logit: the max of the concatenated row),
    so nothing overflows that did not; its gradient is zero in the math (a shift), detached or not."""
    if div.target is not aten.div.Tensor or not all(isinstance(a, torch.fx.Node) for a in div.args):
        return None
    o, zv = div.args
    if not is_op(o, aten.einsum) or len(o.args[1]) != 2:
        return None
    ops = list(o.args[1])
    exps = [_regrouped_from(x) for x in ops if is_op(_regrouped_from(x), aten.exp)]
    z = _regrouped_from(zv)
    total, extra = _exp_sum(z, exps), None
    if total is None and z.target is aten.add.Tensor and arg(z, 2, "alpha", 1) == 1 and \
            all(isinstance(a, torch.fx.Node) for a in z.args[:2]):
        a, b = z.args[:2]
        total, extra = (a, b) if _exp_sum(a, exps) is not None else (_exp_sum(b, exps), a)
    if total is None:
        return None
    e = total.args[0]
    if [_regrouped_from(x) for x in ops].count(e) != 1:
        return None
    # from here on the program is a softmax normalized after the contraction: a failed check is a near miss
    if e not in ops:
        return (f"the exponentials reach the contraction with the values through "
                f"{op_name(next(x for x in ops if _regrouped_from(x) is e))}, which is not followed")
    base, z_axes = axis_view(zv)
    if base is not z:
        return (f"the denominator reaches the division through {op_name(base)} (not a view that only moves or adds "
                "axes): its rows cannot be aligned with the output's")
    k = ops.index(e)
    v = ops[1 - k]
    r = rank(e)
    dims, keep = arg(total, 1, "dim", None), bool(arg(total, 2, "keepdim", False))
    if arg(total, 3, "dtype") is not None or not isinstance(dims, (list, tuple)) or len(dims) != 1 or \
            not isinstance(dims[0], int) or dims[0] % r != r - 1:
        return (f"the denominator sums the exponentials over axes {list(dims) if dims else 'all'}, not over their "
                "last axis alone (the key axis the values are contracted over)")
    sub = e.args[0]
    if not is_op(sub, aten.sub) or sub.target is not aten.sub.Tensor or arg(sub, 2, "alpha", 1) != 1 or \
            not all(isinstance(a, torch.fx.Node) for a in sub.args[:2]):
        return ("a softmax normalized after the value contraction, without its row max subtracted (exp(s) @ v / "
                "exp(s).sum()): it overflows where softmax does not, so it is not read as softmax")
    s, m_e = sub.args[:2]
    if rank(s) != r:
        return "the row max is subtracted with a broadcast that changes the scores' shape"
    # m_e: the row max (with the sink's logit) m, laid back onto the rows with the key axis as size 1
    b, _ = axis_view(_undetached(m_e))
    m = _undetached(b)
    c = None
    if is_op(m, aten.maximum) and all(isinstance(a, torch.fx.Node) for a in m.args[:2]):
        x, y = m.args[:2]
        c, rowmax = (y, x) if _last_axis_max(x, s) else (x, y)
        if not _last_axis_max(rowmax, s) or not _shape_matches(val(m).shape, val(rowmax).shape):
            return ("the scores are shifted by the maximum of their row max and a tensor that varies along the key "
                    "axis, not by a per-row (sink) logit")
    elif not _last_axis_max(m, s):
        return ("a softmax normalized after the value contraction, without its row max subtracted (the term "
                "subtracted from the scores is not their max over the key axis): it overflows or underflows "
                "where softmax does not, so it is not read as softmax")
    if _row_layout(m_e, s) is not True or not _same_rows(m_e, m, s):
        return "the row max is not laid back onto the scores' rows as it was taken"
    if (c is None) != (extra is None):
        return ("the denominator adds a term that the subtracted max does not include" if c is None else
                "the subtracted max includes a tensor (a sink logit) whose exponential the denominator lacks")
    if c is not None:
        sink_sub = extra.args[0] if is_op(extra, aten.exp) else None
        if not is_op(sink_sub, aten.sub) or sink_sub.target is not aten.sub.Tensor or \
                arg(sink_sub, 2, "alpha", 1) != 1 or not same_expr(_undetached(sink_sub.args[0]), _undetached(c)) or \
                not _same_rows(sink_sub.args[1], m, s) or _row_layout(m, s) is not keep or \
                not _shape_matches(val(extra).shape, val(total).shape):
            return ("the term added to the denominator is not exp(c - m) with c the logit in the max m, in the "
                    "sum's layout (an attention sink)")
        c = sink_sub.args[0]
    nodes = [s, e, v, o, total, z, zv, div] + ([c, extra] if c is not None else [])
    dtypes = {val(x).dtype for x in nodes}
    if len(dtypes) != 1:
        return f"the softmax normalized after the value contraction mixes dtypes ({sorted(map(str, dtypes))})"
    if dtypes == {torch.float16}:
        return ("in float16 the unnormalized contraction exp(s - max) @ v can overflow where softmax(s) @ v does "
                "not: a softmax normalized after the value contraction is not read as softmax")
    # the contraction: e's last (key) axis summed against v, every other axis of e an output axis, nothing
    # of v summed alone
    lets, out = _parse_equation(o.args[0]) or ([None, None], None)
    p_l, v_l = lets[k], lets[1 - k]
    if out is None or any(len(set(x)) != len(x) for x in (p_l, v_l, out)):
        return "the contraction with the values repeats an axis letter"
    key = p_l[-1]
    unit = {c_ for c_, d in zip(v_l, val(v).shape) if statically_known_true(d == 1)}   # summed alone: no sum
    if key in out or key not in v_l or any(c_ not in out for c_ in p_l[:-1]) or \
            any(c_ not in out and c_ != key and c_ not in unit for c_ in v_l):
        return ("the contraction with the values does not sum the exponentials' last (key) axis against the "
                "values and nothing else")
    # z' on the output: an axis of a row letter reads that row axis of z, any other axis is constant (size 1
    # or created by the views); z's row axis a is e's axis a, kept or not
    if not _shape_matches(val(div).shape, val(o).shape) or len(z_axes) > len(out):
        return "the division by the denominator broadcasts the contraction's output"
    lead = len(out) - len(z_axes)
    for t, letter in enumerate(out):
        a = t - lead
        za = z_axes[a] if a >= 0 else None
        constant = za is None or statically_known_true(val(zv).shape[a] == 1)
        if letter in p_l:
            row = p_l.index(letter)
            ok = za == row or (constant and statically_known_true(val(e).shape[row] == 1))
        else:
            ok = constant
        if not ok:
            return (f"the denominator is not laid onto the output's rows: output axis {t} ({letter!r} of "
                    f"{o.args[0]!r}) reads the denominator's axis {za} through the views")
    reads = [sub, o] + ([extra.args[0]] if c is not None else [])
    if any(written(x) for x in nodes) or _mutated_before(div, reads) is not None:
        return "a tensor of the softmax normalized after the value contraction is written in place"
    return _PostNormalized(o, k, s, c, keep)


def normalize_postnormalized(gm: torch.fx.GraphModule) -> int:
    """Rewrite attention normalized after the value contraction (flash-attention's "lazy" normalization,
    fla's ``naive_parallel_attn`` with a sink), ``einsum(eq, exp(s - max(s)), v) / z'``, into
    ``einsum(eq, softmax(s, -1), v)``; with a sink logit ``c`` (``max(s)`` taken with ``c``, ``exp(c - m)``
    added to ``z``) into ``einsum(eq, softmax(cat([s, c], -1), -1)[..., :-1], v)``, the gpt-oss form the
    attention pass reads (c broadcast to one column).  Returns how many were rewritten; see
    :func:`_postnormalized` for why each is exact.  The new nodes are placed at the division (nothing
    writes the tensors they read in between, checked), the exponentials, the sum and the unnormalized
    contraction stay for any other reader.  The forms that fail a check: :func:`postnormalized_near_misses`."""
    graph, n = gm.graph, 0
    for node in list(graph.nodes):
        found = _postnormalized(node)
        if not isinstance(found, _PostNormalized):
            continue
        s = found.s

        def emit(target, args):
            return emit_before(graph, node, target, args, node)
        if found.sink is None:
            p = emit(aten.softmax.int, (s, rank(s) - 1))
        else:
            col = found.sink if found.keep else emit(aten.unsqueeze.default, (found.sink, -1))
            sizes = [x if isinstance(x, int) else emit(aten.sym_size.int, (s, d))
                     for d, x in enumerate(val(s).shape[:-1])]
            col = emit(aten.expand.default, (col, sizes + [1]))
            sm = emit(aten.softmax.int, (emit(aten.cat.default, ([s, col], -1)), -1))
            p = emit(aten.slice.Tensor, (sm, -1, 0, -1))
        operands = list(found.o.args[1])
        operands[found.k] = p
        new = emit(aten.einsum.default, (found.o.args[0], operands))
        _remember_layout(new, node)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        n += 1
    if n:
        graph.eliminate_dead_code()
        gm.recompile()
    return n


def postnormalized_near_misses(gm: torch.fx.GraphModule) -> list:
    """(division, reason) for each softmax normalized after the value contraction that
    :func:`normalize_postnormalized` left alone (run after it): the pipeline reports each as a near miss."""
    found = []
    for node in gm.graph.nodes:
        reason = _postnormalized(node)
        if isinstance(reason, str):
            found.append((node, reason))
    return found


#: in-place pointwise ops and the out-of-place op that computes the same value
_OUT_OF_PLACE = {
    aten.add_.Tensor: aten.add.Tensor, aten.add_.Scalar: aten.add.Scalar,
    aten.sub_.Tensor: aten.sub.Tensor, aten.sub_.Scalar: aten.sub.Scalar,
    aten.mul_.Tensor: aten.mul.Tensor, aten.mul_.Scalar: aten.mul.Scalar,
    aten.div_.Tensor: aten.div.Tensor, aten.div_.Scalar: aten.div.Scalar,
    aten.masked_fill_.Scalar: aten.masked_fill.Scalar, aten.masked_fill_.Tensor: aten.masked_fill.Tensor,
}


def _fresh(node: torch.fx.Node) -> bool:
    """Whether ``node``'s value is memory of its own: the result of an ATen op that neither mutates
    nor may return an alias of an argument (views, ``to``, ``contiguous`` and ``reshape`` may)."""
    t = node.target
    if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload) or t._schema.is_mutable:
        return False
    return all(r.alias_info is None for r in t._schema.returns)


def _piece_bounds(node: torch.fx.Node) -> list | None:
    """(dim, [(start, end) per output]) of an ``unbind`` / ``split`` / ``split_with_sizes`` with static
    sizes, else None (``unbind``'s pieces as (i, None): a select)."""
    t = node.target
    if t not in (aten.unbind.int, aten.split.Tensor, aten.split_with_sizes.default):
        return None
    x = node.args[0] if node.args else None
    if not isinstance(x, torch.fx.Node) or not isinstance(val(x), torch.Tensor) or val(x).dim() == 0:
        return None
    shape = val(x).shape
    d = arg(node, 1, "dim", 0) if t is aten.unbind.int else arg(node, 2, "dim", 0)
    if not isinstance(d, int):
        return None
    d = d % len(shape)
    n = known_int(shape[d])         # a symbolic length the guards pin is known
    if n is None:
        return None
    if t is aten.unbind.int:
        return [d, [(i, None) for i in range(n)]]
    sizes = node.args[1]
    if t is aten.split.Tensor:
        if not isinstance(sizes, int) or sizes <= 0:
            return None
        sizes = [min(sizes, n - i) for i in range(0, n, sizes)]
    if not all(isinstance(z, int) for z in sizes) or sum(sizes) != n:
        return None
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [d, [(a, a + z) for a, z in zip(starts, sizes)]]


def _piece(graph, before, x, d: int, a: int, b: int | None, like: torch.fx.Node) -> torch.fx.Node:
    """``x``'s piece [a, b) along axis d before ``before``: ``select(x, d, a)`` when b is None, a piece of
    one step as ``unsqueeze(select(x, d, a), d)`` (the per-step slice the loop finder reads, its size-1
    axis one that contractions fold away), else ``slice(x, d, a, b)``."""
    steps = [(aten.select.int, (x, d, a))] if b is None or b == a + 1 else [(aten.slice.Tensor, (x, d, a, b))]
    if b is not None and b == a + 1:
        steps.append((aten.unsqueeze.default, (None, d)))
    node = None
    for target, args in steps:
        args = tuple(node if a_ is None else a_ for a_ in args)
        with graph.inserting_before(before):
            new = graph.call_function(target, args)
        copy_meta(new, like)
        with val(x).fake_mode:
            new.meta["val"] = target(*fake_of(args))
        node = new
    return node


def normalize_slices(gm: torch.fx.GraphModule) -> int:
    """Rewrite the pieces of ``unbind`` / ``split`` (``for x_t in x.unbind(1)``, ``x.split(1, 1)``) into
    ``select`` / ``slice`` of the tensor (a piece of one step as ``unsqueeze(select)``), and
    ``narrow(x, d, start, length)`` likewise, with static sizes; returns how many were rewritten.  Each
    piece is the same view of the same memory, so nothing changes but the spelling: the loop finder
    reads per-step slices in one form (each placed before its first use, as Dynamo places ``x[:, t]``)."""
    graph, n = gm.graph, 0
    order = {x: i for i, x in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.narrow.default:
            x, d, start, length = (list(node.args) + [None] * 4)[:4]
            if not (isinstance(x, torch.fx.Node) and isinstance(d, int) and isinstance(start, int)
                    and isinstance(length, int) and start >= 0):
                continue
            d = d % val(x).dim()
            new = _piece(graph, node, x, d, start, start + length, node)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            n += 1
            continue
        bounds = _piece_bounds(node)
        if bounds is None:
            continue
        d, pieces = bounds
        for u in list(node.users):
            if u.target is not operator.getitem or not isinstance(u.args[1], int):
                continue
            a, b = pieces[u.args[1]]
            # at its first use, as Dynamo places ``x[:, t]``: a loop's steps read their own slices
            first = min(u.users, key=order.__getitem__, default=u)
            new = _piece(graph, first, node.args[0], d, a, b, u)
            u.replace_all_uses_with(new)
            graph.erase_node(u)
            n += 1
        if not node.users:
            graph.erase_node(node)
    if n:
        gm.recompile()
    return n


def block_slices(gm: torch.fx.GraphModule) -> int:
    """Rewrite n >= 2 slices ``x[.., kB:(k+1)B, ..]`` (k = 0 … n-1, B >= 2, static sizes) of one tensor
    along one axis into ``select(xc, d, k)`` with ``xc = reshape(x[.., :nB, ..], (.., n, B, ..))``, the
    spelling of a loop over chunks; returns how many slices were rewritten.  The same elements are read
    either way.  Tensors or slices written in place are left alone; so are the other slices of x (a
    ragged last block ``x[.., nB:T]``)."""
    graph, done = gm.graph, 0
    for x in list(graph.nodes):
        v = val(x)
        if not isinstance(v, torch.Tensor) or v.dim() == 0 or written(x):
            continue
        shape = [known_int(z) for z in v.shape]
        if any(z is None for z in shape):
            continue
        by_axis: dict = {}
        for u in x.users:
            if u.target is not aten.slice.Tensor or u.args[0] is not x:
                continue
            d, a, b, step = (list(u.args[1:]) + [0, None, None, 1][len(u.args) - 1:])[:4]
            if not all(isinstance(z, int) for z in (d, a, b, step)) or step != 1:
                continue
            d = d % v.dim()
            b = min(b, shape[d])
            if 0 <= a < b and not written(u):
                by_axis.setdefault(d, {}).setdefault((a, b), []).append(u)
        for d, pieces in by_axis.items():
            firsts = [ab for ab in pieces if ab[0] == 0]
            if len(firsts) != 1 or firsts[0][1] < 2:
                continue
            width = firsts[0][1]
            n = 0
            while (n * width, (n + 1) * width) in pieces:
                n += 1
            if n < 2:
                continue
            # right after x (after the last placeholder when x is one): before every slice of it
            anchor = (x if x.op != "placeholder" else [p for p in graph.nodes if p.op == "placeholder"][-1]).next
            base = x
            if n * width < shape[d]:
                base = emit_before(graph, anchor, aten.slice.Tensor, (x, d, 0, n * width), x)
            chunked = emit_before(graph, anchor, aten.reshape.default, (base, shape[:d] + [n, width] + shape[d + 1:]), x)
            for k in range(n):
                for u in pieces[(k * width, (k + 1) * width)]:
                    new = emit_before(graph, u, aten.select.int, (chunked, d, k), u)
                    u.replace_all_uses_with(new)
                    graph.erase_node(u)
                    done += 1
    if done:
        gm.recompile()
    return done


def normalize_inplace(gm: torch.fx.GraphModule) -> int:
    """Rewrite an in-place pointwise op (``S += x``, ``a.masked_fill_(m, 0)``) whose target is a
    temporary nothing else reads (fresh memory, its one user the op) into the out-of-place op, when
    that gives the same shape and dtype; returns how many were rewritten.  Nothing can observe the
    difference: no alias of the temporary exists, and its later readers read the op's result."""
    graph, n = gm.graph, 0
    for node in list(graph.nodes):
        oop = _OUT_OF_PLACE.get(node.target)
        x = node.args[0] if oop is not None and node.args else None
        if not isinstance(x, torch.fx.Node) or not _fresh(x) or len(x.users) != 1:
            continue
        fake = lambda a: val(a) if isinstance(a, torch.fx.Node) else a  # noqa: E731
        try:
            with val(x).fake_mode:
                out = oop(*[fake(a) for a in node.args], **{k: fake(v) for k, v in node.kwargs.items()})
        except Exception:   # noqa: BLE001 - an op the out-of-place form refuses stays as it is
            continue
        if tuple(out.shape) != tuple(val(node).shape) or out.dtype != val(node).dtype:
            continue    # the out-of-place op would broadcast or promote
        with graph.inserting_before(node):
            new = graph.call_function(oop, tuple(node.args), dict(node.kwargs))
        copy_meta(new, node, with_val=True)
        _remember_layout(new, node)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        n += 1
    if n:
        gm.recompile()
    return n


def forward_slot_reads(gm: torch.fx.GraphModule) -> int:
    """A read of one slot of a fresh buffer, ``select(buf, d, i)``, that follows a write of that whole slot,
    ``copy_(select(buf, d, i), v)`` (same dtype and shape: no cast, no broadcast), with no write to the
    buffer in between but to other slots along the same axis, reads ``v``; returns how many reads.

    A recurrence carried through a buffer, ``h[:, t + 1] = a[:, t] * h[:, t] + x[:, t]``, then carries
    its state as a value from step to step (step t reads step t - 1's result, not the buffer), the
    form the loops pass reads.  Only buffers whose every use is such a slot write, a slot read or a
    reader that mutates nothing (and whose views mutate nothing) are followed: nothing else can
    change a slot between its write and its read."""
    graph, n = gm.graph, 0
    pos = {node: k for k, node in enumerate(graph.nodes)}
    for buf in list(graph.nodes):
        if not _fresh(buf) or not isinstance(val(buf), torch.Tensor) or len(buf.users) < 2:
            continue
        events, ok = [], True
        for u in buf.users:
            key = _seed_key(u)      # (buf, dim, "select", index) of select(buf, dim, index)
            slot = (key[1], key[3]) if key is not None and key[2] == "select" else None
            if slot is not None and _writes_into(u):
                (copy,) = u.users
                v = copy.args[1]
                same = isinstance(v, torch.fx.Node) and isinstance(val(v), torch.Tensor) and \
                    val(v).dtype == val(u).dtype and _shape_matches(val(u).shape, val(v).shape)
                events.append((pos[copy], "write", slot, v if same else None))
            elif slot is not None and not written(u):
                events.append((pos[u], "read", slot, u))
            elif writes_through(u, buf):
                ok = False      # a write the slots cannot account for (buf.add_, a slice's copy_)
                break
        if not ok:
            continue
        known: dict = {}        # slot -> the value written there last (None: written, not forwardable)
        for _, kind, (d, i), x in sorted(events, key=lambda e: e[0]):
            if kind == "write":
                if any(d2 != d for d2, _ in known):
                    known.clear()   # a slot along another axis overlaps this one
                known[(d, i)] = x
            elif known.get((d, i)) is not None:
                x.replace_all_uses_with(known[(d, i)])
                graph.erase_node(x)
                n += 1
    if n:
        gm.recompile()
    return n


# --- layouts -----------------------------------------------------------------

def _laid_out_alike(a: torch.Tensor, b_shape, b_stride) -> bool:
    """Whether tensor ``a`` has strides ``b_stride`` along every axis whose size may exceed 1."""
    return len(a.shape) == len(b_shape) and all(
        statically_known_true(n <= 1) or statically_known_true(s == t)
        for n, s, t in zip(a.shape, a.stride(), b_stride))


def restore_layouts(gm: torch.fx.GraphModule) -> int:
    """Give each canonical node that is still in the graph (no rewrite consumed it) the layout of
    the user's op it replaced; returns how many copies were inserted.

    ``einsum`` computes ``W @ x.transpose(1, 2)`` as one matrix product of folded axes and returns a
    permuted view of it, where ``matmul`` returned contiguous memory.  The values are equal, but a
    downstream compiler traces the graph again, and a layout the user's program never had can meet
    an ATen kernel whose real output strides differ from its meta function's (aot_eager's backward
    of HF Mamba under ``dynamic=True``: ``softplus_backward``, then a ``view`` that fails).  So a
    canonical node whose result is laid out otherwise than the user's contiguous result is followed
    by a contiguous copy (a non-contiguous original layout is left as the canonical op gives it).
    """
    graph, n = gm.graph, 0
    for node in list(graph.nodes):
        want = node.meta.pop(LAYOUT, None)
        if node.op != "call_function" or want is None:
            continue
        try:
            got = node.target(*fake_of(node.args), **fake_of(dict(node.kwargs)))
        except Exception:   # noqa: BLE001 - a node whose value cannot be recomputed keeps its layout
            continue
        if not isinstance(got, torch.Tensor) or _laid_out_alike(got, want.shape, want.stride()):
            continue
        contiguous = make_contiguous_strides_for(want.shape)
        if not _laid_out_alike(want, want.shape, contiguous):
            continue
        node.meta["val"] = got
        with graph.inserting_after(node):
            copy = graph.call_function(aten.clone.default, (node,), {"memory_format": torch.contiguous_format})
        copy_meta(copy, node)
        copy.meta["val"] = aten.clone.default(got, memory_format=torch.contiguous_format)
        node.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)
        n += 1
    if n:
        gm.recompile()
    return n


def canonicalize(gm: torch.fx.GraphModule, example_inputs) -> torch.fx.GraphModule:
    """Trace to pre-dispatch ATen, then make in-place ops on temporaries out of place and normalize
    contractions and masks (in that order: mask normalization reads scores that are already einsums)."""
    traced = trace_pre_dispatch(gm, example_inputs)
    normalize_slices(traced)
    block_slices(traced)
    normalize_inplace(traced)
    normalize_contractions(traced)
    normalize_masks(traced)
    normalize_softmax(traced)
    normalize_postnormalized(traced)
    return traced
