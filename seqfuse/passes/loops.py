"""Re-roll Dynamo-unrolled Python loops over time and lift the linear ones to scan / ssd.

Dynamo unrolls ``for t in range(T)``: T copies of the body in one flat graph.  This pass
finds them, proves the carried update linear, and replaces the whole loop by one IR op,
in time linear in the graph size (see loop_reroll for how the steps are found):

- ``h = a_t ⊙ h + b_t`` (any elementwise factors and terms, casts of h)      -> seqfuse.scan
  with the readout ``y_t = Σ_n c_t[n]·h_t[n]`` folded in when it is the state's only use;
- ``S = g_t ⊙ S + k_t ⊗ v_t`` read out as ``q_t · S`` (g scalar per head or a vector
  along the contracted axis, written exp(·), sigmoid(·) or a positive constant)  -> seqfuse.ssd;
- per-step outputs collected by ``stack`` / ``cat`` or written into a buffer with
  ``copy_(select(buf, d, t), ·)`` (or one index ahead, ``t + 1``, or behind: loop_reroll's write
  offsets) become the op's stacked results; everything else the body computes is vectorized over
  time on whole tensors (loop_vectorize).  A state carried through the buffer itself,
  ``h[:, t + 1] = a[:, t] * h[:, t] + x[:, t]``, arrives as a value carried from step to step
  (canonicalize.forward_slot_reads) with ``h[:, 0]`` its initial state.

A loop over chunks (``S = S·g_i + k_iᵀ·v_i`` from step i's own slices, after step i's readout;
a slice read in several expressions of the body) is read with every node in the step of its
slices: its state is a scan over the chunks, which ssd_chunks fuses with the rest of the chunked
program into one ssd.

Coupled or nonlinear updates (LSTM, GRU, tanh of the state, h·h, a running maximum such as RWKV-4's
stabilizer) are near misses and stay as they are.  Not re-rolled yet (near misses): a body that reads time both forward and reversed,
second-order recurrences (h_{t-2}).

With dynamic=True the number of steps is still a Python int (Dynamo unrolls the loop), while
batch / head / channel sizes are symbols.  Steps match when their size arguments are the same
expressions; a size check of the rewrite holds only when it is provably true for every value of
the symbols (statically_known_true, never a guard on the hints), else the loop stays unrolled
with the reason as a near miss; sizes the emitted nodes need are ``aten.sym_size.int`` of an
input or invariant tensor (loop_vectorize.Vectorizer.size).  make_fx keeps the whole slices
``x[:]`` that ``x[:, t]`` traces through with symbolic sizes; they are folded first.  A step that
differs from the others ends the loop there; the steps outside stay unrolled and read the op's
final state.
"""
from __future__ import annotations

import math
import operator
import sys

import torch
import torch.fx

from seqfuse.ir.ops import SSD, Scan
from seqfuse.passes.loop_linear import PASS_THROUGH, Analysis, Lin, leaves
from seqfuse.passes.loop_stabilized import unstabilize
from seqfuse.passes.loop_reroll import (Loop, NoLoop, _hashable, _seed_key, check_buffer_reads, find_runs, group_loops,
                                        reads_shape_only, rebuild_dropped, reroll, share_slice_sources)
from seqfuse.passes.loop_vectorize import Vectorizer, broadcasts_to, can_vectorize, known_eq, same_shape
from seqfuse.passes.pattern import CASTS, axis_view, constant_value, evaluate_shape_only, is_op, is_shape_only, \
    readout_rounding, val
from seqfuse.passes.registry import Pass, PassContext

aten = torch.ops.aten

#: loops at least this long are reported when their steps cannot be matched
REPORT_MIN_STEPS = 4
_ZEROS = (aten.zeros, aten.zeros_like, aten.new_zeros)
_FULLS = (aten.full, aten.full_like, aten.new_full)


class LoopPass(Pass):
    """Find unrolled time loops; rewrite those whose carried update is linear in the state."""

    name = "loops"

    def run(self, ctx: PassContext) -> None:
        graph = ctx.graph
        unstabilize(ctx)        # RWKV-4's stabilized WKV steps in their linear form (loop_stabilized)
        folded = _fold_full_slices(graph)
        folded |= share_slice_sources(graph)
        runs = find_runs(graph)
        if not runs:
            if folded:
                ctx.gm.recompile()
            return
        pos = _positions(graph)
        seeds = {n for r in runs for n in r.nodes}
        changed, touched = False, folded
        for group in group_loops(runs, pos):
            if changed:
                pos = _positions(graph)
            if any(n not in pos for r in group for n in r.nodes):
                continue
            merged = _merge_duplicate_runs(graph, group, pos, seeds)
            touched |= len(merged) < len(group)
            group = merged
            outcome, miss = self._lift(ctx, group, pos)
            if outcome in ("failed", "rebuilt") and len(_by_length(group, pos)) > 1:
                # runs of other lengths overlapped this loop's and were grouped with it (an outer loop
                # over layers reading one state buffer per layer): each loop of one length on its own
                pos = _positions(graph)
                tries = []
                for sub in _by_length(group, pos):
                    tries.append(self._lift(ctx, sub, pos))
                    if tries[-1][0] != "failed":
                        pos = _positions(graph)
                if any(o == "lifted" for o, _ in tries):
                    outcome, miss = "lifted", None
                    for o, m in tries:
                        if o in ("failed", "rebuilt") and m is not None:
                            ctx.report.add_near_miss(*m)
                touched |= outcome == "rebuilt" or any(o == "rebuilt" for o, _ in tries)
            if outcome == "lifted":
                changed = True
            elif outcome == "rebuilt":      # the rebuilt last-step update is dead again: removed below
                changed = touched = True
            if miss is not None and outcome != "lifted":
                ctx.report.add_near_miss(*miss)
        if changed:
            graph.eliminate_dead_code()
        if changed or touched:
            ctx.gm.recompile()


    def _lift(self, ctx, group, pos):
        """Re-roll ``group`` and lift the loop: ("lifted" | "failed" | "rebuilt" | "none", near miss
        args or None).  "rebuilt": the rewrite failed after rebuild_dropped inserted nodes (dead code
        to remove); "none": independent steps, no recurrence."""
        try:
            loop = _reroll(ctx.graph, group, pos)
        except NoLoop as e:
            if max(len(r.nodes) for r in group) >= REPORT_MIN_STEPS:
                return "failed", ("scan", f"unrolled loop not re-rolled: {e}", group[0].nodes[0])
            return "failed", None
        if not loop.carried:
            return "none", None
        try:
            _Rewrite(ctx, loop, pos).run()
            return "lifted", None
        except NoLoop as e:
            return ("rebuilt" if loop.rebuilt else "failed"), ("scan", str(e), _where(loop))


def _by_length(group: list, pos: dict) -> list:
    """``group``'s runs clustered by step count (sorted counts more than 1 apart start a new cluster:
    a loop's runs have its length, or one less when a slot is read ahead or behind), each cluster
    regrouped by overlapping spans; the groups of the longest runs first."""
    runs = sorted(group, key=lambda r: -len(r.nodes))
    clusters: list = []
    for r in runs:
        if clusters and len(clusters[-1][-1].nodes) - len(r.nodes) <= 1:
            clusters[-1].append(r)
        else:
            clusters.append([r])
    return [g for c in clusters for g in group_loops(c, pos)]


def _full_slice(node) -> bool:
    """Whether ``node`` is ``slice(x, d, 0, end)`` with end provably past the size of axis d (the whole of
    x; with dynamic=True make_fx keeps these, e.g. ``x[:, t]`` traces to select(slice(x, 0, 0, max), 1, t))."""
    if node.target is not aten.slice.Tensor or not isinstance(node.args[0], torch.fx.Node):
        return False
    x = val(node.args[0])
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return False
    args = list(node.args[1:]) + [None] * (4 - len(node.args[1:]))
    d, start, end, step = args[0] if args[0] is not None else 0, args[1], args[2], args[3]
    if not isinstance(d, int) or node.kwargs or not (start is None or (isinstance(start, int) and start == 0)) \
            or not (step is None or (isinstance(step, int) and step == 1)):
        return False
    if end is None:
        return True
    if not isinstance(end, int):
        return False
    if end >= sys.maxsize:      # ``x[:]``: the end Python slicing writes for None
        return True
    size = x.shape[d]
    if isinstance(size, int):
        return end >= size
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    return statically_known_true(size <= end)


def _fold_full_slices(graph: torch.fx.Graph) -> bool:
    """Replace whole-tensor slices of tensors with symbolic sizes by the tensor itself (the same memory,
    shape and strides: a view that changes nothing), so that the steps of a loop read one base.  With
    static sizes make_fx already drops them; with dynamic=True it keeps one per ``x[:, t]``."""
    done = False
    for node in list(graph.nodes):
        if not _full_slice(node):
            continue
        base = node.args[0]
        vb, vn = val(base), val(node)
        if all(isinstance(d, int) for d in vb.shape) or not isinstance(vn, torch.Tensor):
            continue
        if not same_shape(vb.shape, vn.shape) or not same_shape(vb.stride(), vn.stride()) or \
                not known_eq(vb.storage_offset(), vn.storage_offset()):
            continue
        node.replace_all_uses_with(base)
        graph.erase_node(node)
        done = True
    return done


def _reroll(graph, group, pos) -> Loop:
    """The loop read with updates moved to the step that reads them (``S = γ·S + …``); when its
    steps do not match, or a step would read the previous step's input slices (the update
    belongs to the step of the slices it reads), the loop read with every node in the step of
    its seeds.  The first reading's reason is the near miss when neither matches."""
    try:
        loop = reroll(graph, group, pos, last_may_drop=True)
        if not any(loop.roles[k] is None for k in loop.carried):
            rebuild_dropped(graph, loop, pos)
            return loop
        first = NoLoop("a step reads the previous step's input slice (a lag, not a recurrence)")
    except NoLoop as e:
        first = e
    try:
        loop = reroll(graph, group, pos, move_updates=False, last_may_drop=True)
    except NoLoop:
        raise first from None
    if any(loop.roles[k] is None for k in loop.carried):
        raise first
    rebuild_dropped(graph, loop, pos)
    return loop


def _merge_duplicate_runs(graph: torch.fx.Graph, group: list, pos: dict, seeds: set) -> list:
    """One run per per-step slice of a loop: ``decay[:, :, i]`` read in three expressions of the body
    is three runs of ``select(decay, 2, i)`` with the same indices in the same loop; each later copy
    is the same view of the same tensor as the first, so its uses move to the first and the run goes.
    Runs that are written through (the destinations of per-step buffer writes) are left alone.  A copy of
    one seed after it that is in no run (``seeds``: the nodes of every run) reads the seed too."""
    kept: dict = {}
    out = []
    for run in group:
        key = (run.family, tuple(run.indices), tuple(n.target for n in run.nodes))
        keep = kept.get(key)
        if keep is None or any(_written(n) for n in run.nodes + keep.nodes) or \
                any(n.args != m.args or n.kwargs != m.kwargs for n, m in zip(run.nodes, keep.nodes)):
            kept.setdefault(key, run)
            out.append(run)
            continue
        for n, m in zip(run.nodes, keep.nodes):
            n.replace_all_uses_with(m)
            graph.erase_node(n)
    loose: dict = {}    # base -> {(target, args): slices of it that are in no run}, built once per base
    for run in out:     # a lone copy of one seed (``x[:, 0]`` read for a shape and for a value) goes too
        for n in run.nodes:
            base = n.args[0]
            if base not in loose:
                loose[base] = {}
                for u in base.users:
                    if u not in seeds and _seed_key(u) is not None and not u.kwargs:
                        loose[base].setdefault((u.target, _hashable(u.args)), []).append(u)
            copies = [u for u in loose[base].get((n.target, _hashable(n.args)), ())
                      if not u.kwargs and not n.kwargs and pos.get(u, -1) > pos[n] and not getattr(u, "_erased", False)]
            if not copies or any(_written(c) for c in copies + [n]):
                continue
            for c in copies:
                c.replace_all_uses_with(n)
                graph.erase_node(c)
    return out


def _written(node) -> bool:
    """Whether a user of ``node`` mutates it (its first argument of a mutable op)."""
    for u in node.users:
        t = u.target
        if isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable and u.args and u.args[0] is node:
            return True
    return False


def _positions(graph):
    return {n: i for i, n in enumerate(graph.nodes)}


def _where(loop: Loop):
    return next((n for n, r in zip(loop.template, loop.roles) if r is not None), loop.template[0])


def _is_zero(x) -> bool:
    """Whether an initial value is known to be zero."""
    if x is None:
        return True
    if not isinstance(x, torch.fx.Node):
        return x == 0
    if is_op(x, *_ZEROS):
        return True
    if is_op(x, *_FULLS):
        v = x.args[1] if not is_op(x, aten.new_full) else x.args[2]
        return constant_value(v) == 0
    return constant_value(x) == 0


def _einsum_parts(node):
    eq = node.args[0].replace(" ", "")
    if "." in eq or "->" not in eq:
        return None
    ins, out = eq.split("->")
    return ins.split(","), out


class _Rewrite:
    """Checks a re-rolled loop, then replaces it (nothing is touched until every check passed)."""

    def __init__(self, ctx: PassContext, loop: Loop, pos, strict: bool = False):
        """``strict``: every value the rewrite needs must vectorize (none stacked from its per-step
        nodes), else NoLoop before the graph is touched (a loop with nothing carried gains nothing
        from a stack)."""
        self.ctx, self.loop, self.pos, self.graph, self.strict = ctx, loop, pos, ctx.graph, strict
        self.an = Analysis(loop)
        self.tindex = {n: j for j, n in enumerate(loop.template)}

    # 1. checks ----------------------------------------------------------------------
    def run(self):
        loop, an = self.loop, self.an
        lins = {k: an.update(k) for k in loop.carried}
        body = loop.body()
        self.body = set(body)
        last = max(body, key=self.pos.__getitem__)
        self.first = min(self.pos[n] for n in body)
        self.last = self.pos[last]
        self.anchor = last.next
        writes = self._buffer_writes()
        uses = self._outside_uses()
        readouts = {k: self._readout(k) for k in loop.carried}
        readouts = {k: v for k, v in readouts.items() if v is not None}
        roots = self._roots(uses, writes)
        # a readout is folded only when nothing else needs the states
        while True:
            states = self._closure(roots, readouts, lins)
            drop = [k for k in readouts if k in states]
            if not drop:
                break
            for k in drop:
                del readouts[k]
        # 2. the rewrite
        vec = self.vec = Vectorizer(self.graph, loop, self.anchor, an.deps)
        if self.strict:
            vec.strict = True
            for r in roots:     # NoLoop here leaves only dead new nodes behind
                vec.role(r)
        finals = {}
        for k in loop.carried:
            plan = self._ssd_plan(k, lins[k], readouts.get(k)) if k in readouts else None
            if plan is not None:
                finals[k] = self._emit_ssd(vec, k, plan)
            else:
                finals[k] = self._emit_scan(vec, k, lins[k], readouts.get(k), k in states)
        vec.replace_outside_uses(uses, writes, finals)
        for n in sorted(body, key=self.pos.__getitem__, reverse=True):
            if not n.users:
                self.graph.erase_node(n)

    def _buffer_writes(self):
        """Template copy_ entries writing every step's result into a slice of one buffer: [(j, seed j, src role)]."""
        loop, writes = self.loop, []
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
        check_buffer_reads(loop, writes, self.body, self.pos, self.first, self.last)
        return writes

    def _outside_uses(self):
        """{(step, j): [users outside the body]} (they must all come after the loop)."""
        loop, uses = self.loop, {}
        for s in loop.steps:
            for j, n in enumerate(loop.inst[s]):
                outs = [u for u in n.users if u not in self.body and not reads_shape_only(u, n)]
                if not outs:
                    continue
                if any(self.pos[u] <= self.last for u in outs):
                    raise NoLoop("a value of the loop body is used inside the loop by code outside the body")
                uses[(s, j)] = outs
        return uses

    def _roots(self, uses, writes):
        roots, final_only = set(), set()
        for (s, j), _ in uses.items():
            if j in self.loop.carried and s == self.loop.hi:
                final_only.add(j)
            else:
                roots.add(("L", j))
        for _, _, src in writes:
            if src[0] not in ("L", "P"):
                raise NoLoop("a buffer write of an invariant value")
            roots.add(src)
        return roots

    def _closure(self, roots, readouts, lins):
        """The carried values whose states at every step are needed (raises if a state-dependent entry
        cannot be vectorized)."""
        loop, an = self.loop, self.an
        readout_of = {v[0]: k for k, v in readouts.items()}
        states, seen = set(), set()
        stack = list(roots)
        for k, lin in lins.items():   # the op's operands
            for f, _ in lin.coef + [f for _, fs in lin.terms for f in fs]:
                stack.append(f)
            if k in readouts:
                stack.append(readouts[k][2])
        while stack:
            r = stack.pop()
            if r[0] == "P":
                states.add(r[1])
                continue
            if r[0] != "L" or r[1] in seen:
                continue
            j = r[1]
            seen.add(j)
            if j in readout_of:
                continue
            if j in loop.carried:
                states.add(j)
                continue
            if loop.roles[j] is None:
                continue
            if not can_vectorize(loop.template[j]):
                if an.deps[j]:
                    raise NoLoop(f"cannot vectorize {loop.template[j].target} applied to the state")
                continue   # stacked from its per-step nodes
            stack.extend(leaves(loop.roles[j]))
        return states

    # readouts ------------------------------------------------------------------------
    def _state_operand(self, role, k) -> bool:
        """Whether a role is carried value k itself or a cast / copy of it."""
        loop = self.loop
        while role[0] == "L":
            if role[1] == k:
                return True
            node = loop.template[role[1]]
            if loop.roles[role[1]] is None or not is_op(node, *PASS_THROUGH):
                return False
            role = loop.roles[role[1]][0][2][0]
        return False

    def _state_casts(self, role, k) -> tuple:
        """The dtypes of the casts on the way from carried value k to a readout's state operand
        ``role`` (one that :meth:`_state_operand` accepts), in the order they apply."""
        loop, out = self.loop, []
        while role[0] == "L" and role[1] != k:
            node = loop.template[role[1]]
            if is_op(node, *CASTS):
                out.append(val(node).dtype)
            role = loop.roles[role[1]][0][2][0]
        return tuple(reversed(out))

    def _readout(self, k):
        """(j, state operand position, c role, letters) of an einsum reading state k once and
        contracting it with a constant operand, or None."""
        loop, an = self.loop, self.an
        for j, node in enumerate(loop.template):
            if loop.roles[j] is None or not is_op(node, aten.einsum) or an.deps[j] != {k}:
                continue
            ops = loop.roles[j][0][2][1]
            parts = _einsum_parts(node)
            if ops[0] != "T" or len(ops[2]) != 2 or parts is None:
                continue
            for i in (0, 1):
                if self._state_operand(ops[2][i], k) and an.const(ops[2][1 - i]):
                    ins, out = parts
                    return j, i, ops[2][1 - i], ins[i], ins[1 - i], out
        return None

    # 2. scan ----------------------------------------------------------------------
    def _product(self, vec, factors, r):
        """Π factors as a vectorized (T'|1, ...) node of rank r + 1 (None if all are numbers), and the number."""
        acc, num = None, 1
        for f, p in factors:
            if f[0] == "C":
                if not isinstance(f[1], (int, float, complex)) or (p < 0 and f[1] == 0):
                    raise NoLoop("a coefficient of the state is not a number")
                num = num * f[1] if p > 0 else num / f[1]
                continue
            if f[0] == "L":
                x = vec.vec(f[1])
                if val(x).dim() > r + 1:
                    raise NoLoop("a coefficient broadcasts the state to a larger shape")
                x = vec.pad(x, r + 1)
            elif f[0] == "I":
                x = f[1]
                if val(x).dim() > r:
                    raise NoLoop("a coefficient broadcasts the state to a larger shape")
                x = vec.timed_invariant(x, r)
            else:
                raise NoLoop("a coefficient of the state is a list")
            if p < 0:
                x = vec.emit(aten.reciprocal.default, (x,))
            acc = x if acc is None else vec.emit(aten.mul.Tensor, (acc, x))
        return acc, num

    def _coefficient(self, vec, factors, r, like):
        acc, num = self._product(vec, factors, r)
        if acc is None:
            return vec.emit(aten.full.default, ([1] * (r + 1), num),
                            {"dtype": torch.complex64 if isinstance(num, complex) else val(like).dtype,
                             "device": val(like).device})
        return acc if num == 1 else vec.emit(aten.mul.Tensor, (acc, num))

    def _sum(self, vec, terms, r, like):
        total = None
        for sign, fs in terms:
            x = self._coefficient(vec, fs, r, like)
            if total is None:
                total = x if sign > 0 else vec.emit(aten.neg.default, (x,))
            else:
                total = vec.emit(aten.add.Tensor if sign > 0 else aten.sub.Tensor, (total, x))
        return total

    def _init(self, vec, k, shape, dtype):
        init = self.loop.init.get(k)
        if _is_zero(init):
            return None
        if not isinstance(init, torch.fx.Node):
            return vec.emit(aten.full.default, (list(shape), init), {"dtype": dtype, "device": val(self.loop.template[k]).device})
        x = init
        if not same_shape(val(x).shape, shape):
            if not broadcasts_to(val(x).shape, shape):
                raise NoLoop("the initial state does not provably broadcast to the state's shape")
            x = vec.emit(aten.expand.default, (x, list(shape)))
        return vec.cast(x, dtype)

    def _emit_scan(self, vec, k, lin: Lin, readout, all_states):
        loop = self.loop
        tmpl = loop.template[k]
        S, D = tuple(val(tmpl).shape), val(tmpl).dtype
        r = len(S)
        if r == 0:
            raise NoLoop("the carried value is a scalar")
        a = self._coefficient(vec, lin.coef, r, tmpl)
        b = self._sum(vec, lin.terms, r, tmpl) if lin.terms else vec.emit(aten.mul.Tensor, (a, 0))
        for x in (a, b):
            if not broadcasts_to(val(x).shape[1:], S):
                raise NoLoop("a coefficient broadcasts the state to a larger shape (or a symbolic size of it "
                             "is not provably the state's)")
        a = vec.emit(aten.movedim.int, (a, 0, -2))
        b = vec.emit(aten.movedim.int, (vec.cast(b, torch.promote_types(val(b).dtype, D)), 0, -2))
        full = [*S[:-1], vec.count, S[-1]]
        if not same_shape(val(b).shape, full):
            b = vec.emit(aten.expand.default, (b, full))
        h0 = self._init(vec, k, S, D)
        c = None
        rounding = None
        if readout is not None and not all_states:
            j, i, c_role, sl, cl, out = readout
            state_role = loop.roles[j][0][2][1][2][i]
            try:
                # the program may round the states before reading them out (h.to(bf16) @ C)
                rounding = readout_rounding(D, self._state_casts(state_role, k))
            except ValueError:
                readout = None
            if readout is not None and not self._scan_readout_ok(sl, cl, out, val(loop.template[j])):
                readout = None
            elif readout is not None:
                cv, is_vec = vec.role(c_role)
                c = vec.align(cv, is_vec, cl, sl)
                c = vec.emit(aten.movedim.int, (c, 0, -2)) if is_vec else vec.emit(aten.unsqueeze.default, (c, -2))
        else:
            readout = None
        rounding = rounding if c is not None else None
        op = Scan(a=a, b=b, c=c, h0=h0, reverse=loop.reverse, readout_dtype=rounding)
        fake = torch.ops.seqfuse.scan.default(val(a), val(b), val(c) if c is not None else None,
                                              val(h0) if h0 is not None else None, loop.reverse, "recurrent", "auto",
                                              None, None, rounding)
        ir = self.ctx.insert_ir(op, self.anchor, loop.inst[loop.hi][k])
        ir.meta["val"] = fake
        y = vec.emit(operator.getitem, (ir, 0))
        h = vec.cast(vec.emit(operator.getitem, (ir, 1)), D)
        if readout is not None:
            j = readout[0]
            rv = vec.emit(aten.movedim.int, (y, -1, 0))
            shape = [vec.count, *val(loop.template[j]).shape]
            vec.memo[j] = vec.cast(vec.emit(aten.reshape.default, (rv, shape)), val(loop.template[j]).dtype)
        else:
            vec.states[k] = vec.cast(vec.emit(aten.movedim.int, (y, -2, 0)), D)
        return h

    @staticmethod
    def _scan_readout_ok(sl, cl, out, out_val) -> bool:
        # y = Σ_n c[n]·h[n]: the state's last letter is the only one contracted
        if len(set(sl)) != len(sl) or sl[-1] not in cl or sl[-1] in out:
            return False
        extras = [c for c in out if c not in sl]
        if any(c not in cl for c in extras) or any(c not in sl and c not in out for c in cl):
            return False
        sizes = {c: out_val.shape[i] for i, c in enumerate(out)}
        if any(not known_eq(sizes[c], 1) for c in extras):
            return False
        return "".join(c for c in out if c in sl) == sl[:-1]

    # 3. ssd ----------------------------------------------------------------------
    def _ssd_plan(self, k, lin: Lin, readout):
        """The SSD reading of state k, or None (then it is a scan)."""
        loop = self.loop
        tmpl = loop.template[k]
        S = tuple(val(tmpl).shape)
        r = len(S)
        j, _, c_role, sl, cl, out = readout
        if r < 2 or len(lin.terms) != 1 or len(set(sl)) != len(sl):
            return None
        contracted = [c for c in sl if c not in out]
        # a letter of c's outside the state's is a size-1 axis the readout keeps (``q[:, :, t:t+1] @ S``): the
        # output check below proves it has size 1, and Vectorizer.align sums it away.  Only for a state with
        # batch axes before its (P, N) pair: a vector state's two axes are a batch axis and N
        if len(contracted) != 1 or contracted[0] not in sl[-2:] or \
                any(c not in sl[:-2] + contracted[0] and (c not in out or r < 3) for c in cl):
            return None
        n_ax = sl.index(contracted[0])
        p_ax = 2 * r - 3 - n_ax          # the other of the last two axes
        out_val = val(loop.template[j])
        keep = "".join(c for c in out if c in sl)
        if keep != sl[:-2] + sl[p_ax] or any(not known_eq(out_val.shape[i], 1) for i, c in enumerate(out) if c not in sl):
            return None
        factors = self._flatten(lin.terms[0][1])
        if factors is None or lin.terms[0][0] < 0:
            return None
        xs, bs = [], []
        for f in factors:
            shp = self._factor_shape(f, r)
            if shp is None:
                return None
            if known_eq(shp[n_ax], 1):
                xs.append(f)
            elif known_eq(shp[p_ax], 1):
                bs.append(f)
            else:
                return None
        if not bs:
            return None
        logs = []
        vector = False
        for f, p in lin.coef:
            fv = self._role_val(f)
            if (isinstance(fv, torch.Tensor) and fv.is_complex()) or (f[0] == "C" and isinstance(f[1], complex)):
                return None     # a complex decay (LRU): the ssd sums real log-decays; a scan takes it
            shp = self._factor_shape((f, p), r)
            if shp is None or not known_eq(shp[p_ax], 1):
                return None
            vector |= not known_eq(shp[n_ax], 1)
            lg = self._log(f, p)
            if lg is None:
                self.ctx.report.add_near_miss("ssd", "gate sign unknown (a decay that is not exp, sigmoid or a positive "
                                              "constant): lifted to a scan over the whole state instead", tmpl)
                return None
            logs.append(lg)
        decay = "none" if not lin.coef else ("vector" if vector else "scalar")
        return dict(n_ax=n_ax, p_ax=p_ax, xs=xs, bs=bs, logs=logs, decay=decay, readout=readout)

    def _flatten(self, factors):
        """Factors with constant products and outer-product einsums split into their operands."""
        loop, outl = self.loop, []
        for f, p in factors:
            if f[0] == "L" and p == 1 and loop.roles[f[1]] is not None:
                node = loop.template[f[1]]
                a = loop.roles[f[1]][0][2]
                if node.target is aten.mul.Tensor:
                    sub = self._flatten([(a[0], 1), (a[1], 1)])
                    if sub is None:
                        return None
                    outl += sub
                    continue
                parts = _einsum_parts(node) if is_op(node, aten.einsum) else None
                if parts is not None and a[1][0] == "T" and len(a[1][2]) == 2:
                    ins, out = parts
                    if all(set(s) <= set(out) for s in ins) and len(set(out)) == len(out) \
                            and set(ins[0]) | set(ins[1]) == set(out):
                        outl += [(("E", a[1][2][i], ins[i], out), 1) for i in (0, 1)]
                        continue
            outl.append((f, p))
        return outl

    def _factor_shape(self, fp, r):
        """Per-step shape of a factor padded to rank r (None if it is bigger)."""
        f = fp[0]
        if f[0] == "C":
            return (1,) * r
        if f[0] == "E":
            node_shape = {}
            src = self._role_val(f[1])
            if src is None:
                return None
            for c, s in zip(f[2], src.shape):
                node_shape[c] = s
            shp = tuple(node_shape.get(c, 1) for c in f[3])
        else:
            v = self._role_val(f)
            if v is None:
                return None
            shp = tuple(v.shape)
        if len(shp) > r:
            return None
        return (1,) * (r - len(shp)) + shp

    def _role_val(self, role):
        if role[0] == "L":
            return val(self.loop.template[role[1]])
        if role[0] == "I":
            return val(role[1]) if isinstance(val(role[1]), torch.Tensor) else None
        return None

    def _log(self, f, p):
        """log(f^p) when f is provably positive, as ("num", value) or (kind, p, role of g, axes):
        f is a chain of unsqueeze/expand views of exp(g) (log = g) or sigmoid(g) (log = logsigmoid(g))."""
        loop = self.loop
        if f[0] == "C":
            return ("num", p * math.log(f[1])) if isinstance(f[1], (int, float)) and f[1] > 0 else None
        node = loop.template[f[1]] if f[0] == "L" else f[1]
        base, axes = axis_view(node)
        kept = [a for a in axes if a is not None]
        if not isinstance(base, torch.fx.Node) or kept != list(range(val(base).dim())):
            return None
        j = self.tindex.get(base)
        if j is not None and loop.roles[j] is None:   # a seed slice of exp(g): the same slice of g
            x, d, form, _ = _seed_key(base)
            if not is_op(x, aten.exp, aten.sigmoid):
                return None
            return ("exp" if is_op(x, aten.exp) else "sigmoid", p, ("X", x.args[0], d, form), axes)
        if j is None and f[0] == "I" and self._positive_constant(base):
            return ("log", p, ("I", base), axes)   # a positive constant: its log
        if not is_op(base, aten.exp, aten.sigmoid):
            return None
        if j is not None:
            if loop.roles[j] is None:
                return None
            inner = loop.roles[j][0][2][0]
        else:   # outside the step's template: an invariant
            inner = ("I", base.args[0])
        return ("exp" if is_op(base, aten.exp) else "sigmoid", p, inner, axes)

    def _positive_constant(self, node) -> bool:
        """A value computed from sizes and constants only whose every element is > 0."""
        if not is_shape_only(node):
            return False
        try:
            return bool((evaluate_shape_only(self.ctx.gm, node) > 0).all())
        except Exception:
            return False

    def _emit_ssd(self, vec, k, plan):
        loop = self.loop
        tmpl = loop.template[k]
        S, D = tuple(val(tmpl).shape), val(tmpl).dtype
        r = len(S)
        n_ax, p_ax = plan["n_ax"], plan["p_ax"]
        batch = list(S[:-2])
        P, N = S[p_ax], S[n_ax]

        def fac(f):
            if f[0] == "E":
                xv, is_vec = vec.role(f[1])
                x = vec.align(xv, is_vec, f[2], f[3])
                return x if is_vec else vec.emit(aten.unsqueeze.default, (x, 0))
            return None

        def prod(fs):
            plain = [(f, p) for f, p in fs if f[0] != "E"]
            acc, num = self._product(vec, plain, r)
            for f, _ in fs:
                if f[0] == "E":
                    x = vec.pad(fac(f), r + 1)
                    acc = x if acc is None else vec.emit(aten.mul.Tensor, (acc, x))
            if acc is None:
                acc = vec.emit(aten.full.default, ([1] * (r + 1), 1.0), {"dtype": D, "device": val(tmpl).device})
            return acc if num == 1 else vec.emit(aten.mul.Tensor, (acc, num))

        def layout(x, tail):
            # (T'|1, *batch', *tail') -> (B, T', H, *tail)
            shape = [vec.count, *batch, *tail]
            if not same_shape(val(x).shape, shape):
                if not broadcasts_to(val(x).shape, shape):
                    raise NoLoop("an operand of the ssd does not provably broadcast to the state's layout")
                x = vec.emit(aten.expand.default, (x, shape))
            nb = len(batch)
            if nb == 0:
                x = vec.emit(aten.unsqueeze.default, (vec.emit(aten.unsqueeze.default, (x, 1)), 1))
            elif nb == 1:
                x = vec.emit(aten.unsqueeze.default, (x, 2))
            elif nb > 2:
                lead = math.prod(batch[:-1])
                lead = lead if isinstance(lead, int) else -1   # a product of symbols: inferred
                x = vec.emit(aten.reshape.default, (x, [vec.count, lead, batch[-1], *tail]))
            return vec.emit(aten.movedim.int, (x, 0, 1))

        # x: the factors constant along N (select N = 0); b: those constant along P
        xv = vec.emit(aten.select.int, (prod(plan["xs"]), n_ax + 1, 0))
        xv = layout(xv, [P])
        bv = vec.emit(aten.select.int, (prod(plan["bs"]), p_ax + 1, 0))
        bv = layout(bv, [N])
        j, _, c_role, sl, cl, out = plan["readout"]
        cv, is_vec = vec.role(c_role)
        target = sl[:-2] + sl[n_ax]
        cv = vec.align(cv, is_vec, cl, target)
        if not is_vec:
            cv = vec.emit(aten.unsqueeze.default, (cv, 0))
        cv = layout(cv, [N])
        a = None
        if plan["decay"] != "none":
            total = None
            for lg in plan["logs"]:
                if lg[0] == "num":
                    continue
                kind, p, role, axes = lg
                g, is_vec = vec.role(role)
                for i, ax in enumerate(axes):   # the view chain's unit axes
                    if ax is None:
                        g = vec.emit(aten.unsqueeze.default, (g, i + (1 if is_vec else 0)))
                g = vec.pad(g, r + 1) if is_vec else vec.timed_invariant(g, r)
                if kind == "sigmoid":
                    g = vec.emit(aten.log_sigmoid.default, (g,))
                elif kind == "log":
                    g = vec.emit(aten.log.default, (g,))
                if p != 1:
                    g = vec.emit(aten.mul.Tensor, (g, p))
                total = g if total is None else vec.emit(aten.add.Tensor, (total, g))
            nums = sum(lg[1] for lg in plan["logs"] if lg[0] == "num")
            if total is None:
                total = vec.emit(aten.full.default, ([1] * (r + 1), nums), {"dtype": D, "device": val(tmpl).device})
            elif nums:
                total = vec.emit(aten.add.Tensor, (total, nums))
            total = vec.emit(aten.select.int, (total, p_ax + 1, 0))      # (T', *batch', N|1)
            if plan["decay"] == "scalar":
                total = vec.emit(aten.select.int, (total, -1, 0))
                a = layout(total, [])
            else:
                a = layout(total, [N])
        h0 = self._init(vec, k, S, D)
        if h0 is not None:
            if p_ax == r - 1:
                h0 = vec.emit(aten.transpose.int, (h0, -1, -2))
            lead = val(xv).shape[0]
            lead = lead if isinstance(lead, int) else -1
            h0 = vec.emit(aten.reshape.default, (h0, [lead, val(xv).shape[2], P, N]))
        if loop.reverse:   # ssd runs forward: flip time in and out
            xv, bv, cv = (vec.emit(aten.flip.default, (t, [1])) for t in (xv, bv, cv))
            a = vec.emit(aten.flip.default, (a, [1])) if a is not None else None
        op = SSD(x=xv, b=bv, c=cv, a=a, h0=h0, decay=plan["decay"])
        fake = torch.ops.seqfuse.ssd.default(val(xv), val(bv), val(cv), val(a) if a is not None else None, None,
                                             val(h0) if h0 is not None else None, plan["decay"], 64, "recurrent", "auto")
        ir = self.ctx.insert_ir(op, self.anchor, loop.inst[loop.hi][k])
        ir.meta["val"] = fake
        y = vec.emit(operator.getitem, (ir, 0))       # (B, T', H, P)
        if loop.reverse:
            y = vec.emit(aten.flip.default, (y, [1]))
        y = vec.emit(aten.movedim.int, (y, 1, 0))
        ro = loop.template[j]
        vec.memo[j] = vec.cast(vec.emit(aten.reshape.default, (y, [vec.count, *val(ro).shape])), val(ro).dtype)
        h = vec.emit(operator.getitem, (ir, 1))       # (B, H, P, N)
        h = vec.emit(aten.reshape.default, (h, [*batch, P, N]))
        if p_ax == r - 1:
            h = vec.emit(aten.transpose.int, (h, -1, -2))
        return vec.cast(h, D)

    # 4. outside uses -----------------------------------------------------------
