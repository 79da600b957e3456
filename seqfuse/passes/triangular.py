"""The unit lower-triangular inverse written as a forward substitution, in place, row by row.

The WY / UT form of the delta rule (transformers' ``torch_chunk_gated_delta_rule``, every chunked
reference function of flash-linear-attention) inverts ``I + strictly_lower(M)`` per chunk by a Python
loop that Dynamo unrolls into C − 1 row updates::

    N = -M.masked_fill(triu(ones(C, C)), 0)             # −strictly_lower(M)
    for i in range(1, C):
        N[..., i, :i] = N[..., i, :i].clone() + (N[..., i, :, None].clone() * N[..., :, :i].clone()).sum(-2)
    T = N + eye(C)                                      # (I + strictly_lower(M))⁻¹

``prove`` checks such a program node by node (``delta`` reads it inside a chunked program it lifts);
the ``triangular`` pass replaces each one that is left by one
``linalg_solve_triangular(strictly_lower(M), I, upper=False, unitriangular=True)``: a few kernels
instead of ~5·C, and a graph the downstream compiler handles in one node instead of hundreds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from seqfuse.passes.loop_vectorize import known_eq
from seqfuse.passes.pattern import copy_meta, is_op, mutates, val, written
from seqfuse.passes.registry import Pass, PassContext

aten = torch.ops.aten

#: the ops that read the system between its writes: views and clones of them
_READS = (aten.select.int, aten.slice.Tensor, aten.unsqueeze.default, aten.clone.default)


class NotForwardSubstitution(Exception):
    """The program is not the forward substitution (the message names the piece that differs)."""


def is_eye(x) -> bool:
    """Whether ``x`` is ``eye(C)`` of a floating dtype."""
    return is_op(x, aten.eye) and val(x).dim() == 2 and val(x).dtype.is_floating_point


def whole_write(buf):
    """The value ``src`` when ``buf`` is a fresh buffer (zeros, ones, empty, full) whose only write is one
    ``copy_(buf[..., 0:n], src)`` over all of it (n its size along that axis; ``src`` of exactly its shape
    and dtype: the copy neither broadcasts nor casts), made before anything else reads ``buf``: every
    later read sees ``src``'s values (loop_map writes a vectorized map loop so).  Else None."""
    found = _whole_copy(buf)
    return found[0] if found is not None else None


def _whole_copy(buf):
    """(src, the copy_, its destination slice or None) of ``whole_write``; None when there is none."""
    if not is_op(buf, aten.zeros, aten.zeros_like, aten.new_zeros, aten.ones, aten.ones_like, aten.empty,
                 aten.empty_like, aten.new_empty, aten.full, aten.full_like, aten.new_full):
        return None
    copies = [(u, None) for u in buf.users if u.target is aten.copy_.default and u.args[0] is buf]
    for u in buf.users:
        if u.target is aten.slice.Tensor and u.args[0] is buf:
            copies += [(c, u) for c in u.users if c.target is aten.copy_.default and c.args[0] is u]
    if len(copies) != 1:
        return None
    cp, dest = copies[0]
    if dest is not None:
        r = val(buf).dim()
        a = list(dest.args) + [None] * (5 - len(dest.args))
        d, start, end, step = a[1] % r, a[2] or 0, a[3], a[4] or 1
        size = val(buf).shape[d]
        if not isinstance(size, int) or start != 0 or step != 1 or not isinstance(end, int) or end < size \
                or len(dest.users) != 1:
            return None
    src = cp.args[1]
    if not isinstance(src, torch.fx.Node) or tuple(val(src).shape) != tuple(val(buf).shape) \
            or val(src).dtype != val(buf).dtype or written(cp):
        return None
    for u in buf.users:          # nothing reads the buffer before the write, nor writes it otherwise
        if u is cp or u is dest:
            continue
        n = cp
        while n.op != "root" and n is not u:      # (the graph's node list ends at its root node)
            n = n.next
        if n is not u or mutates(u, buf) or written(u):
            return None
    return src, cp, dest


#: readers that depend on the buffer's strides (or identity): they read a contiguous copy of the value
_STRIDED = (aten.view.default, aten._unsafe_view.default, aten.as_strided.default)


def forward_whole_write(graph, buf) -> bool:
    """When a fresh buffer ``buf`` is written once over all of it before any read (``triangular.whole_write``:
    a vectorized map loop's one ``copy_``), its readers read the written value instead, and the buffer,
    the slice and the copy go: the value flows through the graph as a value, so the loop finder labels a
    per-step buffer's readers with their step (a step-private ``zeros`` read after its write would
    otherwise look like one loop invariant) and the recognizers read it without a write in between.
    Readers that depend on the buffer's strides read ``contiguous(value)``.  Whether it did so."""
    found = _whole_copy(buf)
    if found is None or found[1].users:
        return False
    src, cp, dest = found
    readers = [u for u in buf.users if u is not cp and u is not dest]
    contiguous = None
    for u in readers:
        x = src
        if u.op != "call_function" or u.target in _STRIDED:
            if contiguous is None:
                with graph.inserting_after(cp):
                    contiguous = graph.call_function(aten.contiguous.default, (src,))
                contiguous.meta["val"] = val(buf)
                copy_meta(contiguous, cp)
            x = contiguous
        u.replace_input_with(buf, x)
    graph.erase_node(cp)
    if dest is not None:
        graph.erase_node(dest)
    graph.erase_node(buf)
    return True


def mask_value(ctx, tree) -> torch.Tensor | None:
    """The boolean value of a mask tree: ("mask", shape, values) evaluated, or ("inv", shape-only node)
    evaluated now, possibly under ("not", ·); None when it is neither or not boolean."""
    from seqfuse.passes.pattern import evaluate_shape_only, is_shape_only
    neg = False
    while tree[0] == "not":
        neg, tree = not neg, tree[1]
    if tree[0] == "mask":
        m = torch.tensor(tree[2], dtype=torch.bool).reshape(tree[1])
    elif tree[0] == "inv" and isinstance(tree[1], torch.fx.Node) and is_shape_only(tree[1]):
        try:
            m = evaluate_shape_only(ctx.gm, tree[1])
        except Exception:   # noqa: BLE001 - not evaluable here: no value
            return None
    else:
        return None
    if m.dtype != torch.bool:
        return None
    return ~m if neg else m


def mask_is(ctx, tree, C, kind, unit_last=False) -> bool:
    """Whether a mask tree (``mask_value``) evaluates to the C x C mask ``kind``: "lower" (j <= i),
    "strict_lower" (j < i); ``unit_last``: laid (C, C, 1) (a mask of per-channel decays (·, C, C, K))."""
    m = mask_value(ctx, tree)
    if m is None:
        return False
    if unit_last:
        if m.dim() < 3 or m.shape[-1] != 1:
            return False
        m = m[..., 0]
    if m.dim() < 2 or tuple(m.shape[-2:]) != (C, C):
        return False
    want = torch.ones(C, C, dtype=torch.bool).tril(0 if kind == "lower" else -1)
    return bool((m.reshape(-1, C, C) == want).all())


@dataclass
class ForwardSubstitution:
    """A proven forward substitution: T = ``final`` = N + I = (I + strictly_lower(M))⁻¹, where
    ``lower`` = −N = strictly_lower(M) as the program computes it; ``nodes``: the row writes, their reads
    and views, and ``final``."""

    N: torch.fx.Node
    M: torch.fx.Node
    lower: torch.fx.Node
    final: torch.fx.Node
    nodes: set


def prove(ctx, N, eye) -> ForwardSubstitution:
    """The forward substitution whose system is N (..., C, C) and whose result is N + ``eye``: N =
    −strictly_lower(M) is rewritten in place row by row, for i = 1 … C−1 in program order,

        N[..., i, :i] = N[..., i, :i] + Σ_j N[..., i, j] · N[..., j, :i]        (j < i, or every j: N[i, j≥i] = 0)

    reading each row's old value before its write and the rows j < i after theirs: the forward
    substitution of (I − N)·T = I, so T = (I + strictly_lower(M))⁻¹.  NotForwardSubstitution otherwise."""
    R = val(N).dim()
    if R < 2:
        raise NotForwardSubstitution("the forward-substituted system is not a matrix")
    C = val(N).shape[-1]
    if not isinstance(C, int) or not known_eq(val(N).shape[-2], C) or tuple(val(eye).shape) != (C, C):
        raise NotForwardSubstitution("the forward substitution's system is not C x C with the identity added")
    # N = −strictly_lower(M): −where(j < i, M, 0) or −tril(M, −1)
    if N.target is not aten.neg.default:
        raise NotForwardSubstitution("the forward-substituted system is not −strictly_lower(M)")
    inner = N.args[0]
    if is_op(inner, aten.tril) and (inner.args[1] if len(inner.args) > 1 else inner.kwargs.get("diagonal", 0)) == -1:
        M = inner.args[0]
    elif inner.target is aten.where.ScalarOther and inner.args[2] == 0 and \
            mask_is(ctx, ("inv", inner.args[0]), C, "strict_lower"):
        M = inner.args[1]
    else:
        raise NotForwardSubstitution("the forward-substituted system is not −strictly_lower(M)")
    if not isinstance(M, torch.fx.Node) or val(M).dim() != R:
        raise NotForwardSubstitution("the forward-substituted system is not laid like M")
    graph_pos = {n: i for i, n in enumerate(N.graph.nodes)}
    # every use of N: views, the C−1 row writes, their reads, the final + I
    views, consumers, stack = set(), [], [N]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u.target in (aten.select.int, aten.slice.Tensor, aten.unsqueeze.default) and u.args[0] is n:
                if u not in views:
                    views.add(u)
                    stack.append(u)
            elif u not in consumers:
                consumers.append(u)
    final = [u for u in consumers if u.target is aten.add.Tensor and u.args[0] is N and u.args[1] is eye]
    copies = sorted((u for u in consumers if u.target is aten.copy_.default), key=graph_pos.__getitem__)
    reads = [u for u in consumers if u not in final and u not in copies]
    if len(final) != 1 or len(copies) != C - 1:
        raise NotForwardSubstitution("the in-place writes of the system are not one per row 1 … C−1")
    row_axes = tuple(range(R - 2)) + (R - 1,)
    prev = graph_pos[N]
    used = set()
    for i, cp in enumerate(copies, start=1):
        dest, src = cp.args[0], cp.args[1]
        if cp.users or _region(dest, N) != (i, (0, i), row_axes):
            raise NotForwardSubstitution(f"write {i} of the forward substitution is not row {i}, columns :{i}")
        if src.target is not aten.add.Tensor or src.kwargs or len(src.users) != 1:
            raise NotForwardSubstitution(f"row {i} is not its old value plus a sum over the rows before it")
        for old, ein in (src.args, src.args[::-1]):
            if is_op(ein, aten.einsum) and isinstance(old, torch.fx.Node):
                break
        else:
            raise NotForwardSubstitution(f"row {i} is not its old value plus a sum over the rows before it")

        def read(x):
            """(region, nodes) of a chain of views of N and clones, the clones taken between the writes i−1
            and i (so they hold the values of then)."""
            nodes, n = set(), x
            while isinstance(n, torch.fx.Node) and n is not N and n.target in _READS:
                if n.target is aten.clone.default and not prev < graph_pos[n] < graph_pos[cp]:
                    return None, nodes
                nodes.add(n)
                n = n.args[0]
            return _region(x, N), nodes
        r_old, n_old = read(old)
        if r_old != (i, (0, i), row_axes) or not prev < graph_pos[old] < graph_pos[cp]:
            raise NotForwardSubstitution(f"row {i}'s old value is not read before its write")
        if not prev < graph_pos[ein] < graph_pos[cp] or not _row_sum(ein, i, C, R, read):
            raise NotForwardSubstitution(f"row {i}'s update is not Σ_j N[i, j]·N[j, :{i}]")
        (_, n_a), (_, n_b) = read(ein.args[1][0]), read(ein.args[1][1])
        used |= {cp, src, ein, dest} | n_old | n_a | n_b
        prev = graph_pos[cp]
    if graph_pos[final[0]] < prev or any(r not in used for r in reads):
        raise NotForwardSubstitution("the forward substitution's system is read besides its row updates")
    return ForwardSubstitution(N, M, inner, final[0], used | views | {final[0]})


def _row_sum(ein, i, C, R, read) -> bool:
    """Whether ``ein`` = Σ_j N[..., i, j] · N[..., j, :i] over j < J (J = i, or C: the row's entries j >= i
    are the masked zeros), its operands read from N (rank R) or clones of reads, as ``read`` finds them."""
    eq = ein.args[0].replace(" ", "")
    if "->" not in eq or "." in eq or len(ein.args[1]) != 2:
        return False
    ins, out = eq.split("->")
    ins = ins.split(",")
    (ra, _), (rb, _) = read(ein.args[1][0]), read(ein.args[1][1])
    batch, row, col = tuple(range(R - 2)), R - 2, R - 1
    for (r1, l1), (r2, l2) in ((((ra, ins[0]), (rb, ins[1]))), ((rb, ins[1]), (ra, ins[0]))):
        if r1 is None or r2 is None or not isinstance(r1[0], int) or r1[0] != i or r1[1][0] != 0:
            continue
        J = r1[1][1]
        if J not in (i, C) or r2[0] != (0, J) or r2[1] != (0, i):
            continue
        m1, m2 = dict(zip(l1, r1[2])), dict(zip(l2, r2[2]))
        if len(m1) != len(l1) or len(m2) != len(l2):
            continue
        P = [next((c for c, a in m1.items() if a == d), None) for d in batch]
        if None in P or [next((c for c, a in m2.items() if a == d), None) for d in batch] != P:
            continue
        j = next((c for c, a in m1.items() if a == col), None)
        c = next((x for x, a in m2.items() if a == col), None)
        if j is None or c is None or m2.get(j) != row or j in out or out != "".join(P) + c:
            continue
        if any(a is None and x != c and x in out for x, a in m1.items()) or \
                any(a is not None and x not in P + [j] for x, a in m1.items()) or \
                any(x not in P + [j, c] for x in m2):
            continue
        return True
    return False


def _region(node, base):
    """(row index, (column start, end), axes of base kept in order) of a chain of select / slice views
    from ``base`` (..., C, C) over its last two axes ((row start, end) when the rows are sliced); None for
    any other view."""
    chain = []
    while node is not base:
        if not isinstance(node, torch.fx.Node) or node.target not in _READS:
            return None
        chain.append(node)
        node = node.args[0]
    size = list(val(base).shape)
    R = len(size)
    row, col = R - 2, R - 1
    axes = list(range(R))
    rng = {a: (0, size[a]) for a in range(R)}
    fixed = {}
    for n in reversed(chain):
        r = len(axes)
        if n.target is aten.clone.default:
            continue
        if n.target is aten.unsqueeze.default:
            axes.insert(n.args[1] % (r + 1), None)
            continue
        d = n.args[1] % r
        a = axes[d]
        if a is None:
            return None
        if n.target is aten.select.int:
            i = n.args[2]
            if not isinstance(i, int):
                return None
            lo, hi = rng[a]
            fixed[a] = lo + (i % (hi - lo))
            del axes[d]
        else:
            s = n.args[2] if len(n.args) > 2 and n.args[2] is not None else 0
            e = n.args[3] if len(n.args) > 3 and n.args[3] is not None else rng[a][1] - rng[a][0]
            st = n.args[4] if len(n.args) > 4 else 1
            if st != 1 or not isinstance(s, int) or not isinstance(e, int) or s < 0:
                return None
            lo, hi = rng[a]
            rng[a] = (lo + s, min(hi, lo + e))
    if any(a in fixed or rng[a] != (0, size[a]) for a in range(R - 2)) or col in fixed:
        return None
    if row in fixed:
        return (fixed[row], rng[col], tuple(axes))
    return (rng[row], rng[col], tuple(axes))


class TriangularPass(Pass):
    """Replace each forward substitution left in the graph (its chunked program not lifted to an IR op)
    by one unit lower-triangular solve against the identity."""

    name = "triangular"

    def run(self, ctx: PassContext) -> None:
        graph = ctx.graph
        changed = False
        for node in list(graph.nodes):
            if node.graph is not graph or node.target is not aten.add.Tensor or len(node.args) != 2 \
                    or not is_eye(node.args[1]) or not isinstance(node.args[0], torch.fx.Node) \
                    or not written(node.args[0]):
                continue
            N = node.args[0]
            try:
                fs = prove(ctx, N, node.args[1])
            except NotForwardSubstitution as e:
                # (once: delta names the same piece when it read this system inside a chunked program)
                if not any(str(e) in m.reason for m in getattr(ctx.report, "near_misses", ())):
                    ctx.report.add_near_miss("delta", f"forward substitution not replaced by a triangular solve: {e}",
                                             N)
                continue
            if val(N).dtype not in (torch.float32, torch.float64) or val(fs.final).dtype != val(N).dtype:
                ctx.report.add_near_miss("delta", "forward substitution not replaced by a triangular solve: "
                                         f"{val(N).dtype} (the solve takes fp32 / fp64)", N)
                continue
            self._replace(ctx, fs, node.args[1])
            changed = True
        if changed:
            graph.eliminate_dead_code()
            ctx.gm.recompile()

    @staticmethod
    def _replace(ctx, fs: ForwardSubstitution, eye) -> None:
        graph = ctx.graph
        if val(eye).dtype != val(fs.lower).dtype:
            with graph.inserting_before(fs.final):
                cast = graph.call_function(aten.to.dtype, (eye, val(fs.lower).dtype))
            copy_meta(cast, eye)
            with val(fs.lower).fake_mode:
                cast.meta["val"] = aten.to.dtype(val(eye), val(fs.lower).dtype)
            eye = cast
        with graph.inserting_before(fs.final):
            solve = graph.call_function(aten.linalg_solve_triangular.default, (fs.lower, eye),
                                        {"upper": False, "unitriangular": True})
        copy_meta(solve, fs.final)
        with val(fs.lower).fake_mode:
            if all(isinstance(d, int) for d in val(fs.lower).shape):
                solve.meta["val"] = aten.linalg_solve_triangular.default(val(fs.lower), val(eye), upper=False,
                                                                         unitriangular=True)
            else:
                # symbolic batch sizes: the meta function cannot broadcast the constant identity over them
                # (torch 2.13 raises); the result laid as it lays it, column-major square matrices in a
                # contiguous batch
                solve.meta["val"] = val(fs.lower).new_empty(val(fs.lower).shape).mT
        fs.final.replace_all_uses_with(solve)
        pos = {n: i for i, n in enumerate(graph.nodes)}
        for n in sorted(fs.nodes, key=pos.__getitem__, reverse=True):
            if not n.users:
                graph.erase_node(n)
        if not fs.N.users:
            graph.erase_node(fs.N)
