"""Fold a readout of all states (and reads of the last state) into seqfuse.scan.

A scan without a readout ``c`` returns every state, y = h (*R, T, N).  When the program reads
those states only to contract them over the state axis and to take the last one::

    E[.., t, ..] = Σ_n h[.., t, .., n] · c[.., t, .., n]     # y_t = Σ_n c_t,n·h_t,n -> scan(a, b, c=c')
    h[.., T-1, ..]   (t = 0 when reverse)                     # the last state       -> result 1 of the scan

it becomes one scan with the readout, and the (*R, T, N) states are never materialized.  Every
use of the states is followed structurally, from the scan's y through

- views that only move, add or drop size-1 axes (``seqfuse.passes.pattern.axis_view``: permute,
  transpose, movedim, unsqueeze, expand of a unit axis, unit reshapes, identity copies; never
  ``detach``, which would change the gradients), keeping for each axis the axis of y it reads;
- casts.  A cast to a narrower dtype rounds the states before the contraction (transformers'
  Mamba in bf16: ``h.to(bf16) @ C``): the scan then takes that dtype as its ``readout_dtype``
  and rounds them the same way (and, as autograd through the cast does, the gradient that
  reaches them through the readout); every readout must read them through the same casts, and
  casts that one rounding cannot stand for (fp16 then bf16) are a near miss.  A last-state read
  through widening casts gets the same casts on the final state; one through a narrowing cast
  leaves the graph as is (the program sums the two reads' gradients in the narrow dtype);
- ``flip`` of the time axis (torch's ``associative_scan(reverse=True)`` scans the flipped inputs
  and flips the states back): it reverses which position is the last state, and a readout through
  it reads c and writes its result time-reversed;

to its uses, each of which must be

(a) a two-operand ``einsum`` of the states and a tensor c that does not depend on the scan, in
    which the states' N letter is summed against c, and every other letter is kept in the output
    or names only size-1 axes (c may broadcast over rows and time; a c-only axis of size > 1 would
    be several readouts: refused).  All such einsums must read the same c in the same way;
(b) ``select`` / size-1 ``slice`` of the time axis at the last computed state (T-1, or 0 when
    ``reverse``).

At least one readout is needed (only last-state reads leave the states computed anyway).  Any
other use (a graph output, another op, a select of another position) leaves the graph as is.
The new scan takes c' = c laid out as (*R | 1, T | 1, N | 1) (y's axes, size 1 where c
broadcasts); each einsum becomes the scan's y (*R, T) in the einsum's layout, each last-state
read the scan's final state (*R, N) in the read's layout.  The nodes computing c that come after
the scan are moved before it (they do not depend on it and are pure).
"""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from seqfuse.ir.ops import Scan, ir_of, scan_y_dtype
from seqfuse.passes.pattern import CASTS, ancestors, arg, axis_view, emit_before, is_op, needed_after, rank, readout_rounding, val
from seqfuse.passes.registry import Pass, PassContext

aten = torch.ops.aten

_RANDOM = (aten.rand, aten.randn, aten.randint, aten.bernoulli, aten.dropout, aten.empty, aten.empty_like,
           aten.rand_like, aten.randn_like, aten.normal)


class NotReadout(Exception):
    """A use of the states that is not a readout or a last-state read (the graph stays as it is)."""


class NearReadout(Exception):
    """Nearly a readout: the reason is reported as a near miss."""


def _one(s) -> bool:
    return statically_known_true(s == 1) if isinstance(s, torch.SymInt) else s == 1


def _eq(a, b) -> bool:
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return statically_known_true(a == b)
    return a == b


def _einsum_letters(node) -> tuple[list[str], str]:
    """(operand letter strings, output letters) of an explicit einsum without ellipsis or diagonals."""
    eq = node.args[0]
    if not isinstance(eq, str) or "->" not in eq or "." in eq:
        raise NotReadout("an implicit or ellipsis einsum")
    lhs, out = eq.replace(" ", "").split("->")
    parts = lhs.split(",")
    if any(len(set(p)) != len(p) for p in parts) or len(set(out)) != len(out):
        raise NotReadout("an einsum that takes a diagonal")
    return parts, out


@dataclasses.dataclass
class _View:
    """A node that reads the states: ``axes[k]`` is the axis of y that its axis k reads (None: a
    size-1 axis the views added); ``flipped``: its time axis runs backwards; ``anchor``: the
    nearest node (y, a cast or a flip) from which ``axis_view`` reaches it; ``dtypes``: the
    dtypes of the casts on the way from y, in order."""

    anchor: torch.fx.Node
    anchor_axes: list
    axes: list
    flipped: bool
    dtypes: tuple = ()


@dataclasses.dataclass
class _Readout:
    """One einsum E = Σ_n states·c: c's axis for each axis of y (None: c broadcasts), and the axis
    of the scan's y (*R, T) each output axis of E reads (None: a size-1 axis); ``dtypes``: the
    casts of the states on the way to it."""

    node: torch.fx.Node
    c: torch.fx.Node
    c_axes: tuple
    out_axes: list
    flipped: bool
    dtypes: tuple = ()


class ScanReadoutPass(Pass):
    """Fold contractions of a scan's states with c (and last-state reads) into scan(a, b, c=c')."""

    name = "scan_readout"

    def run(self, ctx: PassContext) -> None:
        """Try every scan IR op without a readout; rewrite those whose states are only read out."""
        changed = False
        for node in list(ctx.graph.nodes):
            op = ir_of(node)
            if node.graph is not ctx.graph or not isinstance(op, Scan) or op.c is not None:
                continue
            try:
                changed |= self._fold(ctx, node, op)
            except NotReadout:
                # the readout may sum a row axis of the elementwise state instead of its last axis
                # (MiniMax's cached loop: q_t·S over S's key axis, the scan laid out with the value axis
                # last): the same scan with those two axes swapped has the summed one last
                changed |= self._fold_swapped(ctx, node, op)
            except NearReadout as e:
                ctx.report.add_near_miss("scan", str(e), node)
        if changed:
            ctx.graph.eliminate_dead_code()
            ctx.gm.recompile()

    # --- analysis -----------------------------------------------------------------------

    def _fold_swapped(self, ctx: PassContext, scan: torch.fx.Node, op: Scan) -> bool:
        """``_fold`` with the scan's state axis N (y's last) and a row axis m swapped, for each row axis
        m of size > 1 until one reads as a readout; False when none does (near misses are not reported:
        the unswapped reading is the program's)."""
        y = next((u for u in scan.users if u.target is operator.getitem and u.args[1] == 0), None)
        if y is None or op.dt is not None or op.u is not None:
            return False
        r = val(y).dim()
        if any(not isinstance(v, torch.fx.Node) or rank(v) != r for v in (op.a, op.b)):
            return False
        for m in range(r - 2):
            if _one(val(y).shape[m]):
                continue
            perm = list(range(r))
            perm[m], perm[r - 1] = r - 1, m
            try:
                return self._fold(ctx, scan, op, perm)
            except (NotReadout, NearReadout):
                continue
        return False

    def _fold(self, ctx: PassContext, scan: torch.fx.Node, op: Scan, perm: list | None = None) -> bool:
        """``perm``: the scan read with y's axes permuted (a transposition of a row axis and N): axis k of
        the read layout is y's axis perm[k]; the rewritten scan takes a, b, h0 in that layout."""
        ys, hs = [], []
        for u in scan.users:
            if u.target is not operator.getitem or u.args[1] not in (0, 1):
                raise NotReadout("the scan's pair is used as a whole")
            (ys if u.args[1] == 0 else hs).append(u)
        if not ys:
            return False
        y_val = val(ys[0])
        r = y_val.dim()
        self.perm = perm if perm is not None else list(range(r))
        self.r, self.T, self.y_shape = r, y_val.shape[-2], [y_val.shape[k] for k in self.perm]
        self.near = []
        self.reverse = bool(op.reverse)
        readouts, lasts = [], []
        views: dict = {}
        stack = []
        for y in ys:
            # y's axis k is axis perm[k] of the read layout (perm is its own inverse)
            views[y] = _View(y, list(self.perm), list(self.perm), False)
            stack.append(y)
        while stack:
            x = stack.pop()
            v = views[x]
            for u in x.users:
                if u in views:
                    continue
                kind, new = self._use(scan, x, v, u)
                if kind == "view":
                    views[u] = new
                    stack.append(u)
                elif kind == "readout":
                    readouts.append(new)
                else:
                    lasts.append(new)
        if not readouts:
            return False
        if self.near:
            raise NearReadout(self.near[0])
        first = readouts[0]
        for ro in readouts[1:]:
            if (ro.c, ro.c_axes, ro.flipped) != (first.c, first.c_axes, first.flipped):
                raise NotReadout("two readouts of the states with different c")
        if first.c in views or scan in ancestors(first.c):
            raise NotReadout("c depends on the scan")
        if any(ro.dtypes != first.dtypes for ro in readouts):
            raise NearReadout("the readouts read the states through different casts")
        try:
            rounding = readout_rounding(y_val.dtype, first.dtypes)
        except ValueError as e:
            raise NearReadout(f"{e}: the readout cannot round the states that way") from None
        read_dtype = first.dtypes[-1] if first.dtypes else y_val.dtype    # the einsum's states operand
        want = torch.promote_types(read_dtype, val(first.c).dtype)
        if want != scan_y_dtype(y_val.dtype, val(first.c).dtype, rounding) or any(val(ro.node).dtype != want for ro in readouts):
            raise NotReadout("the readout is computed in another dtype")
        for node, _, dtypes in lasts:
            # a last state read after a narrowing cast too: the program's gradient of the states sums
            # both reads in that dtype (one more rounding than the folded op's), so the states stay
            if readout_rounding(y_val.dtype, dtypes) is not None:
                raise NotReadout("the last state is read rounded too")
        self.rounding = rounding
        move = self._movable(scan, first.c)
        self._rewrite(ctx, scan, op, ys, hs, readouts, lasts, move)
        return True

    def _use(self, scan, x, v: _View, u):
        """Classify user ``u`` of states node ``x`` (read as ``v``): ("view" | "cast", _View),
        ("readout", _Readout) or ("last", (node, axes of the scan's h per axis of u))."""
        r, T = self.r, self.T
        if u.op != "call_function":
            raise NotReadout("the states are returned or used outside a call")
        if is_op(u, aten.einsum):
            return "readout", self._readout(x, v, u)
        if u.args[0] is not x or any(a is x for a in u.all_input_nodes[1:]) or \
                sum(1 for a in u.all_input_nodes if a is x) != 1:
            raise NotReadout("the states are an argument other than the first")
        if is_op(u, *CASTS):
            uv = val(u)
            if not isinstance(uv, torch.Tensor) or uv.device != val(x).device or list(uv.shape) != list(val(x).shape):
                raise NotReadout("a cast that changes more than the dtype")
            if u.target is aten._to_copy.default and set(u.kwargs) - {"dtype", "memory_format"}:
                raise NotReadout("a copy to another device or layout")
            if uv.dtype == val(x).dtype:
                return "view", _View(u, v.axes, list(v.axes), v.flipped, v.dtypes)
            return "view", _View(u, v.axes, list(v.axes), v.flipped, v.dtypes + (uv.dtype,))
        if is_op(u, aten.flip):
            dims = [d % rank(x) for d in u.args[1]]
            toggles = 0
            for d in dims:
                if v.axes[d] == r - 2 and not _one(T):
                    toggles += 1
                elif not _one(val(x).shape[d]):
                    raise NotReadout("a flip of another axis than time")
            return "view", _View(u, v.axes, list(v.axes), v.flipped ^ (toggles % 2 == 1), v.dtypes)
        if is_op(u, aten.select, aten.slice) and u.target in (aten.select.int, aten.slice.Tensor):
            return "last", self._last(x, v, u)
        if is_op(u, aten.detach, aten.detach_, aten.lift_fresh_copy):
            raise NotReadout("detached states")
        base, axes = axis_view(u)
        if base is not v.anchor or base is u:
            raise NotReadout(f"a use of the states by {u.target}")
        new = [None if a is None else v.anchor_axes[a] for a in axes]
        shape = val(u).shape
        if any(m is None and not _one(shape[k]) for k, m in enumerate(new)):
            raise NotReadout("the states broadcast to a larger shape")
        return "view", _View(v.anchor, v.anchor_axes, new, v.flipped, v.dtypes)

    def _position(self, v: _View, index):
        """Whether time index ``index`` of a view is the last computed state."""
        T = self.T
        if not isinstance(index, (int, torch.SymInt)):
            return False
        pos = index
        if isinstance(index, int) and index < 0:
            pos = T + index
        if v.flipped:
            pos = T - 1 - pos
        return _eq(pos, 0) if self.reverse else _eq(pos, T - 1)

    def _last(self, x, v: _View, u):
        r = self.r
        d = arg(u, 1, "dim", 0) % rank(x)
        if v.axes[d] != r - 2:
            raise NotReadout("a select or slice of another axis than time")
        if u.target is aten.select.int:
            if not self._position(v, arg(u, 2, "index")):
                raise NotReadout("a state other than the last one is read")
            axes = v.axes[:d] + v.axes[d + 1:]
        else:
            start, step = arg(u, 2, "start", None), arg(u, 4, "step", 1)
            if step != 1 or not _one(val(u).shape[d]) or not self._position(v, 0 if start is None else start):
                raise NotReadout("a slice other than the last state")
            axes = v.axes[:d] + [None] + v.axes[d + 1:]
        # the scan's h (*R, N): y axis i < r-2 is h axis i, y's N (r-1) is h axis r-2
        return u, [None if m is None else (m if m < r - 2 else r - 2) for m in axes], v.dtypes

    def _readout(self, x, v: _View, u) -> _Readout:
        r = self.r
        x_shape = [val(x).shape[k] for k in range(rank(x))]
        ops = u.args[1]
        if len(ops) != 2 or sum(1 for o in ops if o is x) != 1:
            raise NotReadout("an einsum of the states with other than one more operand")
        parts, out = _einsum_letters(u)
        i = 0 if ops[0] is x else 1
        ls, lc, c = parts[i], parts[1 - i], ops[1 - i]
        if not isinstance(c, torch.fx.Node) or not isinstance(val(c), torch.Tensor):
            raise NotReadout("c is not a tensor")
        c_shape = val(c).shape
        y_of = {}                              # letter -> axis of y (None: an axis the views added)
        for k, letter in enumerate(ls):
            y_of[letter] = v.axes[k]
        size = {}
        for letters, shape in ((ls, x_shape), (lc, c_shape)):
            for k, letter in enumerate(letters):
                size.setdefault(letter, []).append(shape[k])
        present = [m for m in v.axes if m is not None]
        n = next((l for l, m in y_of.items() if m == r - 1), None)
        if n is None or n not in lc or n in out:
            raise NotReadout("the state axis is not contracted with c")
        c_axes = [None] * r
        for letter in set(ls) | set(lc):
            m = y_of.get(letter)
            in_c = letter in lc
            if m is not None:
                ysize = x_shape[ls.index(letter)]
                if in_c:
                    cs = c_shape[lc.index(letter)]
                    if not (_eq(cs, ysize) or _one(cs)):
                        raise NotReadout("c is larger than the states along an axis")
                    c_axes[m] = lc.index(letter)
                if letter != n and letter not in out and not _one(ysize):
                    self.near.append("the states are contracted with c over another axis than the state axis")
            elif not all(_one(s) for s in size[letter]):
                raise NotReadout("an axis of c or of the states' views that is not the states' (several readouts)")
        if any(not _one(self.y_shape[m]) for m in range(r) if m not in present):
            raise NotReadout("an axis of the states is dropped")
        # the output axes: an axis of the scan's y (*R, T) is y's own index (N is gone)
        out_axes = [y_of[l] if (y_of.get(l) is not None and y_of[l] != r - 1) else None for l in out]
        oshape = val(u).shape
        if any(m is None and not _one(oshape[k]) for k, m in enumerate(out_axes)):
            raise NotReadout("an output axis of size > 1 that is not the states'")
        return _Readout(u, c, tuple(c_axes), out_axes, v.flipped, v.dtypes)

    @staticmethod
    def _movable(scan, c) -> list:
        """The nodes computing c that come after the scan (moved before it); each must be pure (c does
        not depend on the scan: checked before)."""
        after = needed_after([c], scan)
        for n in after:
            if n.op not in ("call_function", "get_attr") or (n.op == "call_function" and
                                                            (n.is_impure() or is_op(n, *_RANDOM))):
                raise NotReadout("c is computed after the scan by an impure op")
        return after

    # --- rewrite ------------------------------------------------------------------------

    def _rewrite(self, ctx, scan, op: Scan, ys, hs, readouts, lasts, move) -> None:
        graph = ctx.graph
        r = self.r
        for n in move:
            scan.prepend(n)

        def emit(target, args, like=scan):
            return emit_before(graph, scan, target, args, like)

        first = readouts[0]
        c = self._layout(emit, first.c, list(first.c_axes), rank(first.c))
        if first.flipped and first.c_axes[r - 2] is not None and not _one(val(c).shape[r - 2]):
            c = emit(aten.flip.default, (c, [r - 2]))
        swapped = self.perm != list(range(r))
        hperm = [k if k < r - 2 else r - 2 for k in self.perm[:r - 2]] + [self.perm[r - 1] if self.perm[r - 1] < r - 2
                                                                            else r - 2]
        if swapped:     # a, b (*R, T, N) and h0 (*R, N) in the read layout
            op = dataclasses.replace(op, a=emit(aten.permute.default, (op.a, self.perm)),
                                     b=emit(aten.permute.default, (op.b, self.perm)),
                                     h0=None if op.h0 is None else emit(aten.permute.default, (op.h0, hperm)))
        new_op = dataclasses.replace(op, c=c, readout_dtype=self.rounding)
        ir = ctx.insert_ir(new_op, scan, scan)
        va, vb, vc = val(op.a), val(op.b), val(c)
        full = torch.broadcast_shapes(va.shape, vb.shape, vc.shape)
        y_like = val(ys[0])
        ir.meta["val"] = (y_like.new_empty(tuple(full[:-1]), dtype=scan_y_dtype(y_like.dtype, vc.dtype, self.rounding)),
                          y_like.new_empty((*full[:-2], full[-1])))
        y = emit(operator.getitem, (ir, 0))
        h = emit(operator.getitem, (ir, 1))
        if first.flipped and not _one(full[-2]):
            y = emit(aten.flip.default, (y, [r - 2]))
        for ro in readouts:
            ro.node.replace_all_uses_with(self._layout(emit, y, ro.out_axes, r - 1, like=ro.node))
        for node, axes, dtypes in lasts:
            last = h
            for d in dtypes:   # the casts the program applied on the way to this read
                last = emit(aten.to.dtype, (last, d), like=node)
            node.replace_all_uses_with(self._layout(emit, last, axes, r - 1, like=node))
        h_program = emit(aten.permute.default, (h, hperm)) if swapped else h   # back to the program's layout
        for old in hs:
            old.replace_all_uses_with(h_program)

    @staticmethod
    def _layout(emit, src, axes: list, src_rank: int, like=None):
        """``src`` with its axes arranged so that axis k of the result is src axis ``axes[k]``
        (a new size-1 axis where None); src axes not named must have size 1 (they are dropped)."""
        present = [m for m in axes if m is not None]
        missing = [m for m in range(src_rank) if m not in present]
        shape = val(src).shape
        if any(not _one(shape[m]) for m in missing):
            raise AssertionError("scan_readout: a dropped axis of size > 1")  # checked by the analysis
        perm = present + missing
        x = src
        if perm != list(range(src_rank)):
            x = emit(aten.permute.default, (x, perm)) if like is None else emit(aten.permute.default, (x, perm), like)
        if missing:
            x = emit(aten.squeeze.dims, (x, list(range(len(present), src_rank))))
        for k, m in enumerate(axes):
            if m is None:
                x = emit(aten.unsqueeze.default, (x, k))
        return x
