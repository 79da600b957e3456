"""Fold a scan's discretization into seqfuse.scan: exp(Δ·A) and Δ·B·x stay factored.

Mamba-1 (every spelling: transformers' loop and associative_scan, mamba_ssm's
``selective_scan_ref``) discretizes before it scans::

    a = exp(A ⊙ Δ)          # (B, D, T, N) from A (D, N) and Δ (B, D, T)
    b = Δ ⊙ B ⊙ x           # (B, D, T, N) from Δ, B (B, T, N) and x (B, D, T)
    scan(a, b, c=C)

Both products are materialized at the state's full size, N times the size of any factor, only
to be read once by the scan.  This pass rewrites such a scan into its discretized form
(seqfuse.ir.ops.Scan)::

    scan(A', B', c=C, dt=Δ', u=x')      decay exp(dt ⊙ a), input b ⊙ dt ⊙ u

whose kernels form each step's decay and input in registers from the factors (primes: the
factors as broadcastable views).  A *product* is a tree of two-tensor ``mul`` nodes, or an
``einsum`` that sums no letter (an outer product: each operand becomes a permute / unsqueeze
view in the output's axis order).  The rewrite needs:

- a = ``exp`` of a product of exactly two factors, b a product of two or three factors, one
  factor equal on both sides (the same tensor read through the same axes: ``axis_view``, so two
  ``unsqueeze`` of one Δ are equal).  That factor is dt, a's other one is a, b's others b and u;
- or, with no such shared factor, b a product of exactly two factors (b, u; a stays as it is);
- every product node (the ``exp``, the ``mul`` / ``einsum``) used only inside the product, and its
  root only by the scan, else it is materialized anyway and the graph stays as is;
- every factor a real tensor node (a Python-number or 0-dim factor is left inside b).

- every product (and the ``exp``) computed in fp32 or fp64: the kernels form the products in
  fp32 (fp64 on the fp64 paths) without rounding them, which is what the program computes only
  in those dtypes.  A product of fp16 / bf16 factors rounds after every ``mul``; it stays as it is
  (transformers' Mamba casts B and x with ``.float()``, so its products are fp32 in bf16 models).

The function is unchanged: the op promotes its operands' dtypes exactly as the ``mul`` nodes did,
and the gradients of every factor come from the op's backward (dt's collects both of its uses).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx

from seqfuse.ir.ops import Scan, ir_of
from seqfuse.passes.pattern import axis_view, emit_before, is_op, rank, val
from seqfuse.passes.registry import Pass, PassContext

aten = torch.ops.aten


@dataclasses.dataclass
class _Factor:
    """One factor of a product of rank ``r``: ``node`` read with ``axes`` (axis k of the product
    reads axis ``axes[k]`` of node, None: broadcast), and its identity ``key`` (base tensor, axes
    of the base) for comparing factors of two products."""

    node: torch.fx.Node
    axes: tuple
    key: tuple


def _key(node: torch.fx.Node, axes: tuple) -> tuple:
    """(base, base axis per product axis) with size-1 axes as None: equal keys read equal values."""
    base, view = axis_view(node)
    shape = val(base).shape
    out = []
    for a in axes:
        b = None if a is None else view[a]
        out.append(None if b is None or shape[b] == 1 else b)
    return base, tuple(out)


def _single_use(node: torch.fx.Node, user: torch.fx.Node) -> bool:
    return len(node.users) == 1 and user in node.users


_EXACT = (torch.float32, torch.float64)


def _factors(node: torch.fx.Node, r: int) -> list[_Factor] | None:
    """The factors of product ``node`` (rank r), or None when it is not a product of tensors
    computed in fp32 / fp64."""
    if not isinstance(val(node), torch.Tensor) or val(node).dtype not in _EXACT:
        return None
    if is_op(node, aten.mul) and len(node.args) == 2 and not node.kwargs:
        out = []
        for x in node.args:
            if not isinstance(x, torch.fx.Node) or not isinstance(val(x), torch.Tensor) or val(x).dim() == 0:
                return None
            inner = _factors(x, r) if _single_use(x, node) and is_op(x, aten.mul, aten.einsum) else None
            if inner is not None and val(x).dim() == r:
                out.extend(inner)
            else:
                k = val(x).dim()
                axes = (None,) * (r - k) + tuple(range(k))
                out.append(_Factor(x, axes, _key(x, axes)))
        return out
    if is_op(node, aten.einsum) and len(node.args) == 2 and isinstance(node.args[0], str):
        eq = node.args[0].replace(" ", "")
        if "->" not in eq or "." in eq:
            return None
        lhs, out_letters = eq.split("->")
        parts, ops = lhs.split(","), node.args[1]
        if len(parts) != len(ops) or len(out_letters) != r or len(set(out_letters)) != r:
            return None
        out = []
        for letters, x in zip(parts, ops):
            if not isinstance(x, torch.fx.Node) or len(set(letters)) != len(letters) or \
                    any(ch not in out_letters for ch in letters) or len(letters) != rank(x):
                return None  # a diagonal or a summed letter: not a plain product
            axes = tuple(letters.index(ch) if ch in letters else None for ch in out_letters)
            out.append(_Factor(x, axes, _key(x, axes)))
        return out
    return None


_PERMUTES = (aten.permute, aten.transpose, aten.movedim, aten.swapaxes)


def _through_permutes(node: torch.fx.Node, consumer: torch.fx.Node):
    """(base, perm): ``node`` is ``base`` read through a chain of single-use axis permutations
    (perm[k]: the base axis that axis k reads; the identity without one), or None when
    ``node`` is not used by ``consumer`` alone."""
    if not _single_use(node, consumer):
        return None
    x = node
    while is_op(x, *_PERMUTES) and isinstance(x.args[0], torch.fx.Node) and _single_use(x.args[0], x):
        x = x.args[0]
    if x is node:
        return node, tuple(range(val(node).dim()))
    base, perm = axis_view(node)
    if base is not x or None in perm or sorted(perm) != list(range(val(x).dim())):
        return node, tuple(range(val(node).dim()))
    return x, tuple(perm)


def _permuted(factors: list[_Factor] | None, perm: tuple) -> list[_Factor] | None:
    """The factors of a product read through axis permutation ``perm``."""
    if factors is None:
        return None
    out = []
    for f in factors:
        axes = tuple(f.axes[p] for p in perm)
        out.append(_Factor(f.node, axes, _key(f.node, axes)))
    return out


def _training(gm: torch.fx.GraphModule) -> bool:
    """Whether the graph will be differentiated (the pipeline records it in ``gm.meta``: grad mode
    on and an input that requires grad; unknown counts as yes)."""
    return bool(gm.meta.get("seqfuse_training", True))


def _worth_it(ctx: PassContext, op: Scan) -> bool:
    """The fold's cost on this device.  On CPU the C kernel forms exp(Δ·A) in its sequential step
    loop, a few steps of N values at a time, while the products it would otherwise read are one
    vectorized, parallel elementwise kernel of the downstream compiler: inference was 2x slower
    with the fold (transformers' Mamba, B=1, L=512, d=64, N=16, inductor downstream: 7.3 vs 3.2 ms,
    benchmarks/run.py), training 15-18% faster (22.1 vs 26.2 ms: the backward no longer reads
    and writes the (B, D, T, N) products and their gradients).  So on CPU it folds only when the
    graph is differentiated; elsewhere (CUDA: the kernels are bandwidth-bound) always."""
    a = val(op.a)
    return a is None or a.device.type != "cpu" or _training(ctx.gm)


class ScanDiscretizePass(Pass):
    """Keep a scan's exp(Δ·A) and Δ·B·x factored: scan(a, b) -> scan(A, B, dt=Δ, u=x)."""

    name = "scan_discretize"

    def run(self, ctx: PassContext) -> None:
        """Rewrite every scan IR op whose decays / inputs are products only the scan reads (on CPU
        only when the graph is differentiated: see :func:`_worth_it`)."""
        changed = False
        for node in list(ctx.graph.nodes):
            op = ir_of(node)
            if node.graph is not ctx.graph or not isinstance(op, Scan) or op.dt is not None or op.u is not None:
                continue
            if not _worth_it(ctx, op):
                continue
            changed |= self._fold(ctx, node, op)
        if changed:
            ctx.graph.eliminate_dead_code()
            ctx.gm.recompile()

    def _fold(self, ctx: PassContext, scan: torch.fx.Node, op: Scan) -> bool:
        va, vb = val(op.a), val(op.b)
        if va is None or vb is None or va.is_complex() or vb.is_complex():
            return False
        r = va.dim()
        if vb.dim() != r:
            return False
        fb = fa = None
        seen_b = _through_permutes(op.b, scan)
        if seen_b is not None:
            fb = _permuted(_factors(seen_b[0], r), seen_b[1])
        seen_a = _through_permutes(op.a, scan) if op.a is not op.b else None
        if seen_a is not None and is_op(seen_a[0], aten.exp) and val(seen_a[0]).dtype in _EXACT:
            arg = seen_a[0].args[0]
            if isinstance(arg, torch.fx.Node) and _single_use(arg, seen_a[0]) and val(arg).dim() == r:
                fa = _permuted(_factors(arg, r), seen_a[1])
        if fb is None:
            return False
        plan = self._plan(fa, fb)
        if plan is None:
            return False
        a_f, b_f, dt_f, u_f = plan
        emit = _Emitter(ctx.graph, scan)
        new = dataclasses.replace(op, a=emit.view(a_f) if a_f is not None else op.a, b=emit.view(b_f),
                                  dt=emit.view(dt_f) if dt_f is not None else None,
                                  u=emit.view(u_f) if u_f is not None else None)
        ir = ctx.insert_ir(new, scan, scan)
        scan.replace_all_uses_with(ir)
        ctx.graph.erase_node(scan)
        return True

    @staticmethod
    def _plan(fa, fb):
        """(a, b, dt, u) factors (a None: a stays as it is), or None when nothing folds."""
        if fa is not None and len(fa) == 2 and len(fb) in (2, 3):
            shared = [(i, j) for i, x in enumerate(fa) for j, y in enumerate(fb) if x.key == y.key]
            if len(shared) == 1:
                i, j = shared[0]
                rest = [f for k, f in enumerate(fb) if k != j]
                # u: the factor constant over the state axis (x), b the one that varies along it (B)
                rest.sort(key=lambda f: f.axes[-1] is None)
                return fa[1 - i], rest[0], fb[j], rest[1] if len(rest) > 1 else None
        if len(fb) == 2:
            b, u = sorted(fb, key=lambda f: f.axes[-1] is None)
            return None, b, None, u
        return None


class _Emitter:
    """Builds factor views before the scan node."""

    def __init__(self, graph: torch.fx.Graph, before: torch.fx.Node):
        self.graph, self.before = graph, before

    def _emit(self, target, args) -> torch.fx.Node:
        return emit_before(self.graph, self.before, target, args, self.before)

    def view(self, f: _Factor) -> torch.fx.Node:
        """``f.node`` laid out to broadcast against the product (right-aligned): its axes permuted
        into the product's order, a size-1 axis where it broadcasts (leading ones left out)."""
        order = [a for a in f.axes if a is not None]
        x = f.node
        if order != sorted(order):
            x = self._emit(aten.permute.default, (x, order))
        lead = 0
        while lead < len(f.axes) and f.axes[lead] is None:
            lead += 1
        for k in range(lead, len(f.axes)):
            if f.axes[k] is None:
                x = self._emit(aten.unsqueeze.default, (x, k - lead))
        return x
