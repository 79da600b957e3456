"""Lift DeltaNet's blocked ("parallel") form to one seqfuse.delta.

flash-linear-attention's ``delta_rule_parallel`` (``fla.ops.delta_rule.naive``, the block-parallel
algorithm of the DeltaNet paper) carries no state.  Over chunks of C positions, laid (B, H, N, C, ·), it
computes

    U    = (I + strictly_lower(kβ_c·k_cᵀ))⁻¹                 the UT inverse (a forward substitution)
    A_c  = lower(q_c·k_cᵀ)·U                                 the chunk's own attention
    Oi_c = A_c·vβ_c                                          its intra-chunk output
    Q'_c = q_c − A_c·kβ_c                                    the queries carried to the chunk's start
    K'_c = k_c − (strictly_lower(k_c·k_cᵀ)·U)ᵀ·kβ_c          the keys carried to the chunk's end

and then, for the rows of each chunk c, walks the earlier chunks j = c−1, …, 0 backwards from Q = Q'_c,
o = Oi_c:

    A = Q·K'_jᵀ,   o = o + A·vβ_j,   Q = Q − A·kβ_j           (chunk j's transition I − K'_jᵀ·kβ_j on Q)

a block of rows (several chunks) at a time, the rows of chunks ≥ j masked to zero.  That is the delta rule
without a gate from a zero state, y_t = S_tᵀ q_t, S_t = S_{t−1} + k_t β_t (v_t − S_{t−1}ᵀ k_t): its
transitions applied to the query instead of the state.

The pass proves it in two parts.  The per-chunk pieces are canonical trees of delta._Chunked (the forward
substitution proven by triangular.prove).  The blocks are evaluated symbolically, chunk of rows by chunk
of rows: every row tensor of a block is a sum of terms (a chunk of Q' or Oi, or a term times a chunk
matrix K'_jᵀ, kβ_j, vβ_j), a row mask is evaluated on the chunk's rows (all kept, or all zero; a chunk
split by a mask is a near miss), and each chunk's output must be exactly the sum above, term for term.
The output buffer, written block by block, is then the op's output.  A program of this shape (a query
product with the UT inverse on the right) that fails a check is a near miss naming the piece.
"""
from __future__ import annotations

import operator
from types import SimpleNamespace

import torch
import torch.fx

from seqfuse.ir.ops import Delta
from seqfuse.passes.delta import (_MM, _MMT, NotDelta, _canon_eq, _Chunked, _ChunkRewrite, chunked_from,
                                  erase_dead_inverse)
from seqfuse.passes.loop_vectorize import known_eq
from seqfuse.passes.pattern import (CASTS, IDENTITIES, emit_before, erase_write_only, evaluate_shape_only, is_op,
                                    is_shape_only, known_int, mutates, val, written)
from seqfuse.passes.registry import Pass, PassContext
from seqfuse.passes.ssd_decay import is_full_slice
from seqfuse.passes.triangular import is_eye, mask_is

aten = torch.ops.aten

#: Aᵀ·B over the last two axes (contracting their rows), in _Chunked's canonical letters
_MTM = _canon_eq(["abcd", "abce"], "abde")
#: A·B over the last two axes of (B, H, N, ·, ·) tensors over all chunks
_MM5 = _canon_eq(["abcde", "abcef"], "abcdf")
#: fresh buffers an output may be written into block by block
_FRESH = (aten.empty, aten.empty_like, aten.new_empty, aten.zeros, aten.zeros_like, aten.new_zeros)
_VIEWS = (aten.reshape, aten.view, aten._unsafe_view, aten.slice, aten.select, aten.alias)


def _ut_result(node) -> bool:
    """Whether ``node`` is T = N + I over chunks (B, H, N, C, C), N written in place (a forward substitution)."""
    return node.op == "call_function" and node.target is aten.add.Tensor and len(node.args) == 2 \
        and is_eye(node.args[1]) and isinstance(node.args[0], torch.fx.Node) and written(node.args[0]) \
        and isinstance(val(node), torch.Tensor) and val(node).dim() == 5


def _mm_eq(node) -> str | None:
    """The canonical equation of a two-operand einsum over (B, H, ·, ·) operands, else None."""
    if not is_op(node, aten.einsum) or len(node.args[1]) != 2:
        return None
    eq = node.args[0].replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    ins, out = eq.split("->")
    return _canon_eq(ins.split(","), out)


def _unchunk(node, what):
    """x when ``node`` is x (B, H, T, ·) reshaped to chunks (B, H, N, C, ·), else NotDelta."""
    src = chunked_from(node)
    if src is None or val(src).dim() != 4:
        raise NotDelta(f"the chunks of {what} are not its time axis split into (N, C)")
    return src


class _Sym:
    """Interned linear combinations of terms.  A value is a tuple of (term id, coefficient) sorted by id;
    a term is a chunk of a row tensor ("at", base, c) or a value times a chunk matrix ("mm", value id,
    (kind, base, j)), kind "T" (K'_jᵀ-like: the chunk's rows become columns) or "N" (the chunk as is)."""

    def __init__(self):
        self.ids: dict = {}

    def _id(self, key) -> int:
        return self.ids.setdefault(key, len(self.ids))

    def at(self, base, c) -> tuple:
        return ((self._id(("at", base, c)), 1),)

    def mm(self, x: tuple, factor) -> tuple:
        return ((self._id(("mm", self._id(("lin", x)), factor)), 1),) if x else ()

    @staticmethod
    def add(x: tuple, y: tuple, sign: int = 1) -> tuple:
        out = dict(x)
        for t, c in y:
            out[t] = out.get(t, 0) + sign * c
        return tuple(sorted((t, c) for t, c in out.items() if c))


class _Blocked:
    """One candidate program: its UT inverse ``T``.  ``run`` returns False when T is not used the blocked
    form's way (no query product with T on the right), True once lifted; NotDelta names a failed check."""

    def __init__(self, ctx: PassContext, T: torch.fx.Node):
        self.ctx, self.graph, self.T = ctx, ctx.graph, T
        self.cx = _Chunked(ctx, SimpleNamespace(template=[]), None, set())
        self.sym = _Sym()
        self.memo: dict = {}
        self.masks: dict = {}   # evaluated row masks
        self._kp = None     # the carried keys K' (proven when a block first reads them)

    def run(self) -> bool:
        # A = (masked scores)·T, itself multiplied on the right (A·vβ, A·kβ); K''s (k·kᵀ)·T is read transposed
        cands = [u for u in self.T.users if _mm_eq(u) == _MM5 and u.args[1][1] is self.T
                 and u.args[1][0] is not self.T and any(_mm_eq(w) == _MM5 and w.args[1][0] is u for w in u.users)]
        if not cands:
            return False
        if len(cands) != 1:
            raise NotDelta("the UT inverse multiplies several query products")
        self.A = cands[0]
        self._chunk_pieces()
        blocks, buf, readers = self._output()
        self.C = C = known_int(val(self.Oi).shape[3])
        for block in blocks:
            self._prove_block(block, C)
        self._emit(buf, readers, blocks)
        return True

    # -- the per-chunk pieces ----------------------------------------------------------------
    def _tree(self, node, what):
        return self.cx.whole(node, what)

    def _chunk_pieces(self):
        U = self._tree(self.T, "the UT inverse")
        if U[0] != "utinv":
            raise NotDelta("the UT inverse is not a forward substitution")
        kb_c, k_c = _ChunkRewrite._mmt(U[1], "the UT system")
        tA = self._tree(self.A, "the chunk's attention")
        if tA[0] != "ein" or tA[1] != _MM or tA[3] != U:
            raise NotDelta("the chunk's attention is not (masked scores)·U")
        ia = tA[2]
        C = _ChunkRewrite._leaf_c(k_c)
        if C is None or ia[0] != "where" or ia[3] != 0 or not mask_is(self.ctx, ia[1], C, "lower"):
            raise NotDelta("the chunk's scores are not masked to j <= i")
        q_c, k_c2 = _ChunkRewrite._mmt(ia[2], "the chunk's scores")
        if k_c2 != k_c:
            raise NotDelta("the chunk's scores use another key than the UT system")
        # Oi = A·vβ, Q' = q − A·kβ: the products of A (the one whose result q minus it is Q')
        self.Qp = self.Oi = None
        vb_c = None
        for u in self.A.users:
            if _mm_eq(u) != _MM5 or u.args[1][0] is not self.A:
                continue
            # (the tree of A·x from x's: the output A·vβ is accumulated in place, which _Chunked refuses)
            t = ("ein", _MM, tA, self._tree(u.args[1][1], "a product of the chunk's attention"))
            subs = [s for s in u.users if s.target is aten.sub.Tensor and s.args[1] is u and not s.kwargs]
            if subs and t[3] == kb_c and len(subs) == 1 and self.Qp is None:
                ts = self._tree(subs[0], "the carried queries")
                if ts != ("sub", q_c, t):
                    raise NotDelta("the carried queries are not q − A·kβ")
                self.Qp = subs[0]
            elif not subs and self.Oi is None:
                self.Oi, vb_c = u, t[3]
        if self.Qp is None or self.Oi is None:
            raise NotDelta("the chunk's attention is not read as A·vβ and q − A·kβ")
        self.trees = dict(q=q_c, k=k_c, kb=kb_c, vb=vb_c, U=U)
        # the inputs before chunking: q, k, v ⊙ β, k ⊙ β over (B, H, T, ·)
        names = {name: _unchunk(_ChunkRewrite._leaf(t, name), name)
                 for name, t in (("q", q_c), ("k", k_c), ("kb", kb_c), ("vb", vb_c))}
        k2, beta = _ChunkRewrite._times_beta(names["kb"])
        v, beta2 = _ChunkRewrite._times_beta(names["vb"])
        if k2 is not names["k"] or beta is None or beta2 is not beta:
            raise NotDelta("kβ and vβ are not the key and the values times one β")
        self.inputs = SimpleNamespace(q=names["q"], k=names["k"], v=v, beta=beta, kb=names["kb"], vb=names["vb"])
        if written(names["kb"]) or written(names["vb"]):     # (Q' and K' are trees: _Chunked refuses writes)
            raise NotDelta("kβ or vβ is written in place")

    def _prove_kp(self, Kp):
        """K' = k − (strictly_lower(k·kᵀ)·U)ᵀ·kβ, as a tree."""
        t = self.trees
        tk = self._tree(Kp, "the carried keys")
        ok = tk[0] == "sub" and tk[1] == t["k"] and tk[2][0] == "ein" and tk[2][1] == _MTM \
            and tk[2][3] == t["kb"] and tk[2][2][0] == "ein" and tk[2][2][1] == _MM and tk[2][2][3] == t["U"]
        if ok:
            m = tk[2][2][2]
            ok = m[0] == "where" and m[3] == 0 and m[2] == ("ein", _MMT, t["k"], t["k"]) \
                and mask_is(self.ctx, m[1], self.C, "strict_lower")
        if not ok:
            raise NotDelta("the carried keys are not k − (strictly_lower(k·kᵀ)·U)ᵀ·kβ")

    # -- the output buffer -------------------------------------------------------------------------
    def _output(self):
        """[(start row, rows, final accumulator)] of the row blocks the intra-chunk output starts, the buffer
        they are written into, and its readers (after every write)."""
        views, chains, stack = set(), [], [self.Oi]
        while stack:
            n = stack.pop()
            for u in n.users:
                if is_op(u, *_VIEWS) and u.args[0] is n:
                    views.add(u)
                    stack.append(u)
                elif n is not self.Oi and not u.kwargs and (is_op(u, aten.add, aten.add_) and u.args[0] is n
                                                             or u.target is aten.copy_.default and u.args[1] is n):
                    chains.append(n)     # a block's accumulation starts (or, over one chunk, is copied out)
                else:
                    raise NotDelta("the intra-chunk output is read besides the row blocks it starts")
        blocks, buf = [], None
        self.mutable = set(views) | {self.Oi}
        for r in chains:
            if len(r.users) != 1:
                raise NotDelta("a row block of the intra-chunk output is read twice")
            acc = r
            while len(acc.users) == 1:
                u = next(iter(acc.users))
                if not (is_op(u, aten.add, aten.add_) and u.args[0] is acc and not u.kwargs):
                    break
                self.mutable.add(u)
                acc = u
            cps = list(acc.users)
            if len(cps) != 1 or cps[0].target is not aten.copy_.default or cps[0].args[1] is not acc:
                raise NotDelta("a row block's output is not copied into a buffer")
            dest = cps[0].args[0]
            full, dests = (dest.args[0] if dest.target is aten.slice.Tensor else None), [dest]
            while full is not None and is_full_slice(full) and len(full.users) == 1:
                dests.append(full)
                full = full.args[0]
            if is_op(dest, *_FRESH):       # one block over every row: copied into the whole buffer
                b, start = dest, 0
            else:
                a = list(dest.args) + [None] * (5 - len(dest.args))
                if dest.target is not aten.slice.Tensor or a[1] % 4 != 2 or (a[4] or 1) != 1 \
                        or len(dest.users) != 1:
                    raise NotDelta("a row block's output is not copied into a slice of rows")
                b, start = full, a[2] or 0
            if buf is None:
                buf = b
            if b is not buf or not is_op(b, *_FRESH):
                raise NotDelta("the row blocks are not written into one fresh buffer")
            rows = self._rows(r)
            if rows is None or rows[0] is not self.Oi or rows[1] != start:
                raise NotDelta("a row block is not written where its rows are")
            blocks.append((rows[1], rows[2], acc, cps[0], [] if dest is buf else dests))
        if buf is None:
            raise NotDelta("the intra-chunk output is not accumulated in row blocks")
        pos = {n: i for i, n in enumerate(self.graph.nodes)}
        writes = {n for _, _, _, cp, dests in blocks for n in [cp] + dests}
        last = max(pos[cp] for _, _, _, cp, _ in blocks)
        # the buffer's readers, and the readers of a copy's result (the buffer itself, returned by copy_)
        readers = [u for u in buf.users if u not in writes] + [u for _, _, _, cp, _ in blocks for u in cp.users]
        if any(pos[u] < last or (u.op == "call_function" and (mutates(u, buf) or written(u))) for u in readers):
            raise NotDelta("the output buffer is read before its last block is written, or written otherwise")
        T = known_int(val(buf).shape[2])
        covered = sorted((s, s + n) for s, n, *_ in blocks)
        if T is None or covered[0][0] != 0 or covered[-1][1] != T \
                or any(a[1] != b[0] for a, b in zip(covered, covered[1:])):
            raise NotDelta("the row blocks do not cover the output once")
        return blocks, buf, readers

    def _rows(self, node):
        """(base, first row, rows) when ``node`` (B, H, R, ·) is rows of a sequence: consecutive positions
        of a tensor (B, H, T, ·) (base), or of one laid in chunks (B, H, N, C, ·) computed as such, through
        reshapes, row slices and chunk selects; else None."""
        chain = []
        n = node
        while is_op(n, *_VIEWS, *IDENTITIES) or (is_op(n, *CASTS) and val(n).dtype == val(n.args[0]).dtype):
            chain.append(n)
            n = n.args[0]
        v = val(n)
        if not isinstance(v, torch.Tensor) or v.dim() not in (4, 5):
            return None
        # the positions: (start, rows) of a flat row axis, or (start, chunks, chunk size)
        lay = (0, v.shape[2]) if v.dim() == 4 else (0, v.shape[2], v.shape[3])
        lead, tail = v.shape[:2], v.shape[-1]
        for x in reversed(chain):
            o = val(x)
            if is_op(x, *IDENTITIES, *CASTS) or is_full_slice(x):
                continue
            if not (known_eq(o.shape[0], lead[0]) and known_eq(o.shape[1], lead[1]) and known_eq(o.shape[-1], tail)):
                return None
            total = lay[1] if len(lay) == 2 else lay[1] * lay[2]
            if is_op(x, aten.reshape, aten.view, aten._unsafe_view):
                if o.dim() == 4 and known_eq(o.shape[2], total):
                    lay = (lay[0], o.shape[2])
                elif o.dim() == 5 and known_eq(o.shape[2] * o.shape[3], total):
                    lay = (lay[0], o.shape[2], o.shape[3])
                else:
                    return None
            elif x.target is aten.slice.Tensor and len(lay) == 2:
                a = list(x.args) + [None] * (5 - len(x.args))
                if a[1] % 4 != 2 or (a[4] or 1) != 1:
                    return None
                start = a[2] or 0
                end = lay[1] if a[3] is None else min(a[3], lay[1])
                if not isinstance(start, int) or not isinstance(end, int) or start < 0:
                    return None
                lay = (lay[0] + start, end - start)
            elif x.target is aten.select.int and len(lay) == 3 and x.args[1] % 5 == 2 and isinstance(x.args[2], int):
                i = x.args[2] % lay[1]
                lay = (lay[0] + i * lay[2], lay[2])
            else:
                return None
        if len(lay) != 2 or known_int(lay[1]) is None:
            return None
        return n, lay[0], known_int(lay[1])

    # -- the blocks ------------------------------------------------------------------------------
    def _prove_block(self, block, C):
        start, rows, acc = block[:3]
        if start % C or rows % C:
            raise NotDelta(f"the row block at {start} splits a chunk of {C}")
        for c in range(start // C, (start + rows) // C):
            if self._ev(acc, c, start) != self._expected(c):
                raise NotDelta(f"the output of chunk {c} is not the delta rule's: its sum over the earlier "
                               "chunks is not o = Oi + Σ_j (Q·K'_jᵀ)·vβ_j with Q carried back by Q − (Q·K'_jᵀ)·kβ_j")

    def _expected(self, c):
        """The output of chunk c as the blocked form computes it (symbolic)."""
        s = self.sym
        kp, kb, vb = self._kp, self.inputs.kb, self.inputs.vb
        q, o = s.at(self.Qp, c), s.at(self.Oi, c)
        for j in range(c - 1, -1, -1):
            a = s.mm(q, ("T", kp, j))
            o = s.add(o, s.mm(a, ("N", vb, j)))
            q = s.add(q, s.mm(a, ("N", kb, j)), -1)
        return o

    def _ev(self, node, c, start):
        """The rows of chunk c of ``node``, a row tensor (B, H, R, ·) of the block starting at ``start``
        (its row r is position start + r), as a symbolic value."""
        key = (node, c, start)
        if key not in self.memo:
            self.memo[key] = self._eval(node, c, start)
        return self.memo[key]

    def _eval(self, node, c, start):
        s = self.sym
        if written(node) and node not in self.mutable:
            raise NotDelta(f"a row tensor of the blocks ({node.name}) is written in place")
        if is_op(node, *IDENTITIES) or (is_op(node, *CASTS) and val(node).dtype == val(node.args[0]).dtype):
            return self._ev(node.args[0], c, start)
        rows = self._rows(node)
        if rows is not None and rows[0] in (self.Qp, self.Oi):
            base, first, n = rows
            if first != start or not (first <= c * self.C and (c + 1) * self.C <= first + n):
                raise NotDelta("a block reads rows of the carried queries or the output other than its own")
            return s.at(base, c)
        if node.target in (aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor) and not node.kwargs \
                and all(isinstance(a, torch.fx.Node) for a in node.args):
            x, y = (self._ev(a, c, start) for a in node.args)
            return s.add(x, y, -1 if node.target is aten.sub.Tensor else 1)
        if node.target is aten.where.ScalarOther and node.args[2] == 0:
            keep = self._row_mask(node.args[0], node, c, start)
            return self._ev(node.args[1], c, start) if keep else ()
        eq = _mm_eq(node)
        if eq in (_MM, _MMT):
            x, f = node.args[1]
            fr = self._rows(f)
            if fr is None or fr[2] != self.C or fr[1] % self.C:
                raise NotDelta(f"a block multiplies by {f.name}, which is not one chunk of a sequence")
            base, j = fr[0], fr[1] // self.C
            if eq == _MMT:
                if self._kp is None:
                    self._prove_kp(base)
                    self._kp = base
                if base is not self._kp:
                    raise NotDelta("a block's scores use other keys than the carried keys")
            elif base not in (self.inputs.kb, self.inputs.vb):
                raise NotDelta("a block multiplies its scores by another tensor than kβ or vβ")
            return s.mm(self._ev(x, c, start), ("T" if eq == _MMT else "N", base, j))
        raise NotDelta(f"a block computes {node.name} ({node.target}), not a piece of the blocked form")

    def _row_mask(self, cond, node, c, start) -> bool:
        """Whether the row mask ``cond`` keeps every row of chunk c (False: none); NotDelta otherwise."""
        if not isinstance(cond, torch.fx.Node) or not is_shape_only(cond):
            raise NotDelta("a block masks its scores with a mask not built from positions")
        if cond not in self.masks:
            self.masks[cond] = evaluate_shape_only(self.ctx.gm, cond)
        m = self.masks[cond]
        R = val(node).shape[2]
        if m.dtype != torch.bool or m.dim() > 4 or m.dim() < 2 or m.shape[-1] != 1 or m.shape[-2] != R \
                or any(d != 1 for d in m.shape[:-2]):
            raise NotDelta("a block's mask is not a mask of its rows")
        part = m.reshape(-1)[c * self.C - start:(c + 1) * self.C - start]
        if bool(part.all()):
            return True
        if not bool(part.any()):
            return False
        raise NotDelta(f"a block's row mask splits chunk {c}")

    # -- the rewrite ------------------------------------------------------------------------------
    def _emit(self, buf, readers, blocks):
        g, x = self.graph, self.inputs
        D = val(buf).dtype
        if any(val(t).dtype != D for t in (x.q, x.k, x.v, x.beta)) or val(x.v).shape[-1] != val(buf).shape[-1] \
                or not all(known_eq(a, b) for a, b in zip(val(x.v).shape, val(buf).shape)):
            raise NotDelta("the output buffer is not laid (B, H, T, V) in the inputs' dtype")
        if not readers:
            return
        pos = {n: i for i, n in enumerate(g.nodes)}
        anchor = min(readers, key=pos.__getitem__)
        ops = {n: emit_before(g, anchor, aten.transpose.int, (getattr(x, n), 1, 2), buf)
               for n in ("q", "k", "v", "beta")}
        op = Delta(q=ops["q"], k=ops["k"], v=ops["v"], beta=ops["beta"], g=None, h0=None, gate="none")
        fake = torch.ops.seqfuse.delta.default(*(val(ops[n]) for n in ("q", "k", "v", "beta")), None, None,
                                               "none", 1.0, 64, "recurrent", "auto")
        ir = self.ctx.insert_ir(op, anchor, buf)
        ir.meta["val"] = fake
        y = emit_before(g, anchor, operator.getitem, (ir, 0), buf)
        y = emit_before(g, anchor, aten.transpose.int, (y, 1, 2), buf)
        y = emit_before(g, anchor, aten.contiguous.default, (y,), buf)     # laid like the buffer
        for u in readers:
            u.replace_input_with(buf, y)
            for _, _, _, cp, _ in blocks:
                u.replace_input_with(cp, y)
        for _, _, _, cp, dests in blocks:
            g.erase_node(cp)
            for d in dests:
                g.erase_node(d)
        g.erase_node(buf)
        # the blocks' accumulations in place into the intra-chunk output, the attention matrix the program
        # also fills (write-only once its reader is gone), then the UT inverse's row writes: in-place writes
        # that dead-code elimination keeps
        pos = {n: i for i, n in enumerate(g.nodes)}
        for n in sorted(self.mutable - {self.Oi}, key=pos.__getitem__, reverse=True):
            if not n.users:
                g.erase_node(n)
        erase_write_only(g)
        g.eliminate_dead_code()
        for N, nodes in self.cx.inverses:
            erase_dead_inverse(g, N, nodes)
        g.eliminate_dead_code()


class DeltaBlocksPass(Pass):
    """Find DeltaNet's blocked (parallel) form — the UT inverse on the right of the chunks' masked query
    products, the earlier chunks walked backwards block by block — and replace it by one seqfuse.delta."""

    name = "delta_blocks"

    def run(self, ctx: PassContext) -> None:
        changed = False
        for node in list(ctx.graph.nodes):
            if getattr(node, "_erased", False) or not _ut_result(node):
                continue
            try:
                changed |= _Blocked(ctx, node).run()
            except NotDelta as e:
                ctx.report.add_near_miss("delta", "blocked (parallel) form not lifted: " + str(e), node)
        if changed:
            ctx.gm.recompile()
