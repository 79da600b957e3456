"""Vectorize map loops: unrolled loops whose steps carry nothing and each write one slice of a buffer.

flash-linear-attention's reference programs build matrices column by column::

    A = torch.zeros(..., C, C)
    for i in range(C):
        A[..., i] = torch.einsum('... c d, ... d -> ... c', k * (g - g[..., i:i+1, :]).exp(), k[..., i, :])

Dynamo unrolls that into C copies of the body, each ending in ``copy_(select(A, -1, i), value_i)``.
When no step reads a value of another step (nothing is carried) and the buffer is only written,
the loop is the map i -> value_i: the value of every step is built once on whole tensors
(``loop_vectorize``) and written with one ``copy_`` into the slice of all steps (the buffer, its
other slices and its later readers are unchanged).  The steps are read by the loop finder
(``loop_reroll``), so a step that differs from the others (a mask built from the Python loop index,
``arange(C) < i``) leaves the loop as it is, with a near miss.

A loop is anchored on its *write run*: the destinations ``select(A, d, i)`` (or ``A[..., i:i+1]``) of
one buffer at consecutive indices, each written by one ``copy_``.  Its other per-step slices are the
runs read at the same indices between consecutive writes, so an inner loop in every step of an
outer loop is found on its own (the outer loop's slices are invariants of the inner one); inner
loops go first, and the outer loop, whose steps are then alike, is re-rolled by the passes after
this one (``delta``, ``loops``).

Only values that vectorize without stacking their per-step nodes are rewritten: a stack would
compute the same thing in more nodes.  This runs before ``delta``, whose chunked WY programs read
matrices built this way.
"""
from __future__ import annotations

import bisect

import torch
import torch.fx

from seqfuse.passes.loop_reroll import NoLoop, Run, find_runs, group_loops, reroll, share_slice_sources
from seqfuse.passes.loops import REPORT_MIN_STEPS, _Rewrite
from seqfuse.passes.pattern import copy_meta, val
from seqfuse.passes.registry import Pass, PassContext
from seqfuse.passes.triangular import forward_whole_write

aten = torch.ops.aten


def _write_run(run: Run) -> bool:
    """Whether every seed of ``run`` is the destination of exactly one ``copy_`` and read by nothing else."""
    for n in run.nodes:
        if len(n.users) != 1:
            return False
        u = next(iter(n.users))
        if u.target is not aten.copy_.default or u.args[0] is not n:
            return False
    return run.step != 0


def _inner_runs(write: Run, runs: list[Run], pos: dict) -> list[Run]:
    """The runs read at the write run's indices, step t's slice between writes t-1 and t."""
    at = [pos[n] for n in write.nodes]
    out = []
    for r in runs:
        if r is write or r.indices != write.indices:
            continue
        if all(pos[n] < at[t] and (t == 0 or pos[n] > at[t - 1]) for t, n in enumerate(r.nodes)):
            out.append(r)
    return out


#: offsets o of the Python ints i + o read as the loop index i (``arange(C) < i``, ``< i + 1``)
_INDEX_OFFSETS = (-1, 0, 1)


def _index_constants(graph, w: Run, inner: list[Run], pos: dict):
    """Read each Python-int operand c = i + o (o in _INDEX_OFFSETS) of a pointwise op computed in step i of
    ``w`` (after the previous write, before the step's own; ``x < i`` is ``lt.Scalar(x, i)``, ``x * i``
    ``mul.Tensor(x, i)``) from an index tensor instead: the op becomes its ``.Tensor`` overload reading ``select(arange(o, o + n), 0, i)``, a 0-d int64 tensor of the
    same value (a 0-d operand promotes like the Python number), so that the steps, which differed only in
    that constant, read a per-step slice like any other.  The values are unchanged either way.  Returns a
    function that undoes the change (None when nothing was changed)."""
    at = [pos[n] for n in w.nodes]
    # step 0 has no write before it: it spans as many nodes as a step between two writes
    span = max(abs(at[1] - at[0]), 1) if len(at) > 1 else 1
    lo0 = min([pos[r.nodes[0]] for r in inner] + [min(at) - span]) - 1
    order = sorted(range(len(at)), key=lambda t: at[t])
    ends = [at[t] for t in order]                       # step order[k] lies before ends[k], after ends[k - 1]
    nodes = list(graph.nodes)
    changes, idx = [], {}
    for node in nodes[max(lo0 + 1, 0):ends[-1]]:
        k = bisect.bisect_right(ends, pos[node])
        t = order[k] if k < len(order) else None
        target = node.target
        if t is None or node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) \
                or target._overloadname not in ("Scalar", "Tensor") or torch.Tag.pointwise not in target.tags \
                or not hasattr(target.overloadpacket, "Tensor") or len(node.args) != 2 or node.kwargs:
            continue
        c, x = node.args[1], node.args[0]
        if not isinstance(c, int) or isinstance(c, bool) or c - w.indices[t] not in _INDEX_OFFSETS \
                or not isinstance(x, torch.fx.Node) or not isinstance(val(x), torch.Tensor):
            continue
        off = c - w.indices[t]
        fake_mode = val(x).fake_mode
        tensor_op = target.overloadpacket.Tensor
        with fake_mode:
            index = torch.tensor(c, dtype=torch.int64, device=val(x).device)
            try:
                same = tensor_op(val(x), index)
            except Exception:    # noqa: BLE001 - the Tensor overload refuses these operands
                continue
        if same.dtype != val(node).dtype or tuple(same.shape) != tuple(val(node).shape):
            continue             # it would promote or broadcast otherwise than the Python int does
        if off not in idx:
            n = max(w.indices) + 1
            first = next(iter(graph.nodes))
            while first.op == "placeholder":
                first = first.next
            with graph.inserting_before(first):
                idx[off] = graph.call_function(aten.arange.start, (off, off + n),
                                               {"dtype": torch.int64, "device": val(x).device})
            with fake_mode:
                idx[off].meta["val"] = torch.arange(off, off + n, dtype=torch.int64, device=val(x).device)
            copy_meta(idx[off], node)
        with graph.inserting_before(node):
            sel = graph.call_function(aten.select.int, (idx[off], 0, w.indices[t]))
        with fake_mode:
            sel.meta["val"] = val(idx[off])[w.indices[t]]
        copy_meta(sel, node)
        changes.append((node, target, node.args, sel))
        node.target = tensor_op
        node.args = (x, sel)
    if not changes:
        return None

    def undo():
        for node, target, args, sel in changes:
            node.target, node.args = target, args
            graph.erase_node(sel)
        for n in idx.values():
            graph.erase_node(n)
    return undo


def _reroll(graph, runs, pos, group):
    """The loop of ``runs`` with every node in the step of the slices it reads; None when the loop
    carries a value, read so or as the passes after read it (``group``: every run overlapping it, with
    updates moved to the step that reads them): a recurrence, which delta / loops lift or report."""
    try:
        return reroll(graph, runs, pos, move_updates=False)
    except NoLoop as e:
        first = e
    for candidates, move in ((runs, True), (group, True), (group, False)):
        try:
            if reroll(graph, candidates, pos, move_updates=move).carried:
                return None
        except NoLoop:
            pass
    raise first


class MapLoopPass(Pass):
    """Replace each unrolled loop that writes an independent value per step into one buffer by one
    vectorized value and one write (inner loops first)."""

    name = "loop_map"

    def run(self, ctx: PassContext) -> None:
        graph = ctx.graph
        touched = share_slice_sources(graph)
        tried: set = set()
        changed = False
        while True:
            runs = find_runs(graph)
            pos = {n: i for i, n in enumerate(graph.nodes)}
            writes = [r for r in runs if _write_run(r) and r.nodes[0] not in tried]
            if not writes:
                break
            # the innermost loop first: the shortest span in the graph
            w = min(writes, key=lambda r: pos[r.nodes[-1]] - pos[r.nodes[0]])
            tried.add(w.nodes[0])
            inner = _inner_runs(w, runs, pos)
            if not inner:
                continue       # the steps read no slice of their own: a broadcast, nothing to vectorize
            try:
                loop = self._loop(graph, w, runs, inner, pos)
                if loop is None:
                    continue   # a recurrence: delta / loops lift it or report it
                pos = {n: i for i, n in enumerate(graph.nodes)}
                buf = w.nodes[0].args[0]
                _Rewrite(ctx, loop, pos, strict=True).run()
                forward_whole_write(graph, buf)
            except NoLoop as e:
                if len(w.nodes) >= REPORT_MIN_STEPS:
                    ctx.report.add_near_miss("scan", f"map loop (a buffer written slice by slice) not vectorized: {e}",
                                             w.nodes[0])
                continue
            changed = True
        if changed:
            graph.eliminate_dead_code()
        if changed or touched:
            ctx.gm.recompile()

    @staticmethod
    def _loop(graph, w, runs, inner, pos):
        """The map loop of write run ``w`` (None for a recurrence), reading Python-int constants of its steps'
        pointwise ops as the loop index where the steps differ only in them; NoLoop otherwise."""
        def attempt(runs, inner, pos):
            group = next(g for g in group_loops(runs, pos) if w in g)
            loop = _reroll(graph, [w] + inner, pos, group)
            if loop is not None and not loop.carried and (loop.lo != 0 or loop.hi != len(w.nodes) - 1):
                raise NoLoop(f"only steps {loop.lo}..{loop.hi} of {len(w.nodes)} are alike")
            return None if loop is None or loop.carried else loop
        try:
            return attempt(runs, inner, pos)
        except NoLoop as e:
            first = e
        undo = _index_constants(graph, w, inner, pos)
        if not undo:
            raise first
        runs = find_runs(graph)
        pos = {n: i for i, n in enumerate(graph.nodes)}
        w2 = next((r for r in runs if r.nodes == w.nodes), None)
        try:
            if w2 is None:
                raise first
            w = w2
            loop = attempt(runs, _inner_runs(w, runs, pos), pos)
            if loop is None:
                raise first
            return loop
        except NoLoop:
            undo()
            raise first from None

