"""Chunked programs of a linear recurrence -> one seqfuse.ssd over the whole sequence.

The chunked (Mamba-2 "SSD") algorithm splits time into chunks, t = z·Q + l, and writes

    Y = Y_diag + Y_off
    Y_diag[z, l] = Σ_{s ≤ l} (c_{z,l}·b_{z,s}) exp(G_{z,l} - G_{z,s}) x_{z,s}     # G = cumsum_l a
    S[z]         = Σ_s exp(G_{z,Q-1} - G_{z,s}) b_{z,s} ⊗ x_{z,s}                   # chunk states
    H[z]         = state entering chunk z: H[0] = h0, H[z+1] = exp(G_{z,Q-1})·H[z] + S[z]
    Y_off[z, l]  = exp(G_{z,l}) · c_{z,l} · H[z]

which is the recurrence S_t = exp(a_t)·S_{t-1} + x_t ⊗ b_t, y_t = S_t·c_t over t (the
chunked algorithm's correctness).  This pass proves each piece of a program against that
listing and replaces Y (and the final state H[n], when the program returns it) by one ssd
over the sequence, t = z·Q + l (padding included: a padded step has a = 0, x = b = c = 0, so
it leaves the state alone and its output is 0, as in the chunked program).

Pieces, each read with the product-term machinery of :mod:`seqfuse.passes.ssd_forms`:

- Y_diag: a quadratic masked form over (l, s) whose batch axes include the chunk axis z
  (``SSDFormsPass.analyze_quadratic``); decay none or exp of a segment sum of a.
- Y_off: Σ_n c[z, l, n]·H[z, p, n]·exp(cumsum_l a) with the same c, a (and scale) as Y_diag.
- H, two spellings:
  (a) the SSD listing / transformers Mamba-2: H = NS[:-1], NS = Σ_{w ≤ z} exp(segsum(A'))[z, w]·St[w]
      with A' = pad(G[..., Q-1], (1, 0)) and St = cat([h0 or zeros, S]); the final state is NS[-1];
  (b) decay none (flash-linear-attention's chunked linear attention): H = cat([zeros, cumsum_z(S)[:-1]]);
  (c) a Python loop over chunks (fla's naive_chunk_simple_gla), re-rolled by the loops pass into
      ``seqfuse.scan`` over the chunk axis: H = cat([h0, Hs[:-1]]) with Hs the scan's states,
      h0 the scan's own initial state (or zero without one), its decay exp(G[z, Q-1]) the same
      along the state axes, its input S; the final state is the scan's.
- S: Σ_s b[z, s, n]·x[z, s, p]·exp(G[z, Q-1] - G[z, s]) with the same b, x, a.

Anything else (decays other than a per-step log decay, a single chunk, a loop that reads the
state after the chunk's update) stays as it is; ssd_forms then lifts the intra-chunk term alone.
"""
from __future__ import annotations

import operator

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from seqfuse.ir.ops import SSD, Scan
from seqfuse.passes.pattern import arg, constant_value, is_op, needed_after, rank, same_expr, sym_product, val
from seqfuse.passes.registry import Pass, PassContext
from seqfuse.passes.ssd_decay import UNIT, Analyzer, NoMatch, aligned, base_letters, evaluate
from seqfuse.passes.ssd_forms import SSDFormsPass, ssd_value, _einsum_parts, _flatten, _is_zero, _Roles, _Silent, \
    _split_products, _Term

aten = torch.ops.aten
#: ssd_forms' analysis and graph-building helpers (stateless), shared by every match
_FORMS = SSDFormsPass()


def _same_int(a, b) -> bool:
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return statically_known_true(a == b)
    return a == b


def _letters(leaf) -> set:
    return {c for c in leaf[1] if c != UNIT}


def _scalars_key(term: _Term):
    """The product of a term's scalar factors as (constant, sorted symbolic factors)."""
    const, syms = 1.0, []
    for v, inv in term.scalars:
        if isinstance(v, torch.fx.Node):
            syms.append((id(v), inv))
        else:
            const = const / float(v) if inv else const * float(v)
    return round(const, 12), sorted(syms)


def _product_term(gm, node, letters: list) -> _Term:
    """Flatten ``node`` (an einsum, or products/scalings of one) as a product term over ``letters``."""
    term = _Term("".join(letters), strict=True)
    if is_op(node, aten.einsum):
        _einsum_parts(node)
        _flatten(gm, node, list(letters), term, root=True)
    else:
        _flatten(gm, node, list(letters), term)
        if not term.consumed:
            raise NoMatch(f"{node} is not a contraction")
    if term.masks:
        raise NoMatch("a mask inside a term of the chunked form")
    if term.divisors:
        raise NoMatch("a term of the chunked form divided by a tensor")
    _split_products(term)
    return term


def _summing_one_axis(gm, node, letters: list, what: str, axis: str):
    """(term, summed letter) of ``node``, an unscaled einsum over ``letters`` that sums exactly one
    axis; NoMatch naming ``what`` (the piece) and ``axis`` (the axis it should sum) otherwise."""
    if not is_op(node, aten.einsum):
        raise NoMatch(f"{what}: not a contraction")
    term = _product_term(gm, node, letters)
    if term.scalars:
        raise NoMatch(f"{what}: scaled by a constant or symbol")
    summed = set().union(*(_letters(lf) for lf in term.leaves)) - set(letters)
    if len(summed) != 1:
        raise NoMatch(f"{what}: not a sum over {axis} alone")
    return term, next(iter(summed))


def _slice_parts(node):
    """(src, dim, start, end, step) of an aten.slice."""
    src = node.args[0]
    return src, arg(node, 1, "dim", 0) % rank(src), arg(node, 2, "start", None), arg(node, 3, "end", None), \
        arg(node, 4, "step", 1)


def _is_last(node, d, size) -> bool:
    """Whether ``node`` reads only the last entry of axis ``d`` (select or a keepdim slice)."""
    if node.target is aten.select.int:
        i = node.args[2]
        return i == -1 or _same_int(i, size - 1)
    if is_op(node, aten.slice):
        _, _, start, end, step = _slice_parts(node)
        return step == 1 and (start == -1 or _same_int(start, size - 1)) and \
            (end is None or (isinstance(end, int) and end >= 2 ** 62) or _same_int(end, size))
    return False


def _is_drop_last(node, d, size) -> bool:
    """node = src[..., :-1, ...] along axis d."""
    if not is_op(node, aten.slice):
        return False
    _, dim, start, end, step = _slice_parts(node)
    return dim == d and step == 1 and start in (0, None) and (end == -1 or _same_int(end, size - 1))


class _Chunked:
    """What Y_diag says: the roles of its quadratic form, the chunk letter, the log decay."""

    def __init__(self, term, roles, decay):
        self.term, self.roles = term, roles
        self.decay_seq = None               # (A node, letters with i): a per-step log decay
        self.rate = None                    # Coef: a constant log decay w per step (exp(w·(i - j)))
        if decay is not None:
            coef, seq = decay
            if seq is None:
                self.rate = coef
            elif coef.const != 1.0 or coef.factors:
                raise NoMatch("a chunked form whose decay is not exp of a segment sum of a per-step "
                              "log decay")
            else:
                self.decay_seq = (seq[0], list(seq[1]))
        self.z = None
        self.add = None                     # the node Y_diag + Y_off

    @property
    def decays(self) -> bool:
        return self.decay_seq is not None or self.rate is not None

    def chunk_length(self):
        """Q, the length of the position axis i (of c)."""
        c, letters = self.roles.c
        return val(c).shape[list(letters).index(self.roles.i)]


class ChunkedSSDPass(Pass):
    """Recognize chunked programs of linear recurrences as one ssd over the sequence."""

    name = "ssd_chunks"

    def run(self, ctx: PassContext) -> None:
        forms = _FORMS
        for node in list(ctx.graph.nodes):
            if node.graph is not ctx.graph or node.target is not aten.add.Tensor or arg(node, 2, "alpha", 1) != 1:
                continue
            if not all(isinstance(a, torch.fx.Node) and is_op(a, aten.einsum, aten.mul) for a in node.args[:2]):
                continue
            for yd, yo in (node.args[:2], node.args[1::-1]):
                if not is_op(yd, aten.einsum) or list(val(yd).shape) != list(val(node).shape) or \
                        list(val(yo).shape) != list(val(node).shape):
                    continue
                try:
                    term, roles, decay = forms.analyze_quadratic(ctx.gm, yd)
                except (_Silent, NoMatch):
                    continue
                if term.divisors or roles.norm is not None:    # ssd_forms lifts the intra-chunk term alone
                    continue
                if roles.vpos:
                    ctx.report.add_near_miss("ssd", "chunked form not fused into one ssd: a decay per key channel "
                                                    "(the chunk pieces are read for a scalar decay only); the "
                                                    "intra-chunk term is lifted alone", node)
                    break
                try:
                    self._match(ctx, forms, node, _Chunked(term, roles, decay), yo)
                    break
                except _Silent:
                    continue
                except NoMatch as e:
                    ctx.report.add_near_miss("ssd", f"chunked form not fused into one ssd: {e}", node)
                    break
        ctx.graph.eliminate_dead_code()
        _concatenate_consecutive(ctx)
        ctx.graph.eliminate_dead_code()
        ctx.gm.recompile()

    # --- matching ---------------------------------------------------------------------
    def _match(self, ctx, forms, add, ch: _Chunked, yo) -> None:
        gm, r = ctx.gm, ch.roles
        t_o = _product_term(gm, yo, list(ch.term.out))
        if _scalars_key(t_o) != _scalars_key(ch.term):
            raise NoMatch("the inter-chunk term is scaled differently from the intra-chunk term")
        every = set().union(*(_letters(lf) for lf in t_o.leaves)) if t_o.leaves else set()
        summed = every - set(ch.term.out)
        cs = [lf for lf in t_o.leaves if lf[0] is r.c[0]]
        if len(summed) != 1 or len(cs) != 1:
            raise _Silent()
        (n_o,), c_leaf = summed, cs[0]
        rename = {n_o: r.n}
        if [rename.get(x, x) for x in c_leaf[1]] != list(r.c[1]):
            raise NoMatch("the inter-chunk term reads c at other positions than the intra-chunk term")
        rest = [lf for lf in t_o.leaves if lf is not c_leaf]
        hs = [lf for lf in rest if n_o in _letters(lf) and r.p in _letters(lf)]
        if len(hs) != 1 or r.i in _letters(hs[0]):
            raise NoMatch("the inter-chunk term is not c · (state entering the chunk)")
        h_node, h_letters = hs[0][0], [rename.get(x, x) for x in hs[0][1]]
        factors = [lf for lf in rest if lf is not hs[0]]
        self._check_entry_decay(gm, ch, factors)
        ch.add = add
        entry = self._states(ctx, forms, ch, h_node, h_letters)
        self._build(ctx, add, ch, entry)

    def _check_entry_decay(self, gm, ch, factors) -> None:
        """Y_off's position factors must be exp(cumsum_l a) (nothing for decay none)."""
        r = ch.roles
        if not ch.decays:
            if factors:
                raise NoMatch("the inter-chunk term has a decay factor but the intra-chunk term none")
            return
        if len(factors) != 1:
            raise NoMatch("the inter-chunk term's decay is not one factor exp(cumsum a)")
        node, letters = factors[0]
        if not _letters(factors[0]) <= set(r.batch) | {r.i}:
            raise NoMatch("the inter-chunk decay varies along other axes than the chunk position")
        if ch.rate is not None:             # exp(w·(l + 1)) = exp(G_l) with G = cumsum of a constant w
            if _rate_affine(gm, ch, node, letters, r.i, "the inter-chunk decay") != (1.0, 1.0):
                raise NoMatch("the inter-chunk decay is not exp(w·(l + 1)) for the intra-chunk decay's "
                              "exp(w·(i - j))")
            return
        p = Analyzer(gm, r.i, "\0", r.batch).position(node, letters)
        if p.masks or p.log is None or len(p.log.terms) != 1 or p.log.valid or p.log.zero:
            raise NoMatch("the inter-chunk decay is not exp(cumsum a)")
        (atom, coef), = p.log.terms
        if atom[0] != "g" or coef.const != 1.0 or coef.factors:
            raise NoMatch("the inter-chunk decay is not exp(cumsum a)")
        self._same_cumsum(atom[1], list(atom[2]), r.i, ch)

    def _same_cumsum(self, g, letters, axis_letter, ch) -> None:
        """g (axes ``letters``) = cumsum of the decay's a along the axis named ``axis_letter``."""
        g, letters = base_letters(g, letters)
        if not is_op(g, aten.cumsum) or arg(g, 2, "dtype") is not None:
            raise NoMatch("a decay read from something else than the cumulative sum of a")
        d = g.args[1] % rank(g)
        if letters[d] != axis_letter:
            raise NoMatch("a cumulative sum of a along another axis than the chunk position")
        node, lt = base_letters(g.args[0], letters)
        a_node, a_letters = ch.decay_seq
        want = [axis_letter if x == ch.roles.i else x for x in a_letters]
        if node is not a_node or list(lt) != want:
            raise NoMatch("the chunk decays are cumulative sums of another tensor than the intra-chunk decay's")

    def _states(self, ctx, forms, ch, h_node, h_letters) -> dict:
        """Prove H (axes ``h_letters``) is the state entering each chunk; returns what the build
        needs: h0 (node, letters) or None, the final-state nodes, their letters."""
        h_node, h_letters = base_letters(h_node, h_letters)
        if is_op(h_node, aten.slice):                   # (a) H = NS[:, :-1]
            ns, d = h_node.args[0], _slice_parts(h_node)[1]
            z = h_letters[d]
            if z == UNIT and _same_int(val(ns).shape[d], 2):
                raise NoMatch("a single chunk (its chunk axis has size 1): only the intra-chunk term is lifted")
            if z == UNIT or z not in ch.roles.batch or not _is_drop_last(h_node, d, val(ns).shape[d]):
                raise NoMatch("the state entering a chunk is a slice other than all but the last chunk")
            ch.z = z
            return self._states_quadratic(ctx, forms, ch, ns, h_letters, d)
        if is_op(h_node, aten.cat) and _scan_source(h_node) is not None:   # (c) H = cat([h0, scan(...)[:-1]])
            return self._states_scan(ctx, ch, h_node, h_letters)
        if is_op(h_node, aten.cat):                     # (b) H = cat([0, cumsum(S)[:-1]])
            return self._states_cumsum(ctx, ch, h_node, h_letters)
        if set(ch.roles.batch) <= set(h_letters) and ch.decays and not is_op(h_node, aten.slice):
            # (d) one chunk entered with a state H (a state carried in from before: the ragged last block
            # of a loop over blocks, a cache): Y_diag + exp(G_l)·c_l·H is the ssd with h0 = H along
            # the positions, for every batch entry (chunks included, each with its own H)
            # (ch.z stays None: _build reads the chunk's own positions as the sequence)
            return {"h0": None if _is_zero(h_node) else (h_node, h_letters), "final": [], "final_letters": []}
        raise NoMatch("the state entering a chunk is neither NS[:-1] of a recursion over chunks, "
                      "an exclusive cumulative sum of chunk states nor the states of a scan over chunks")

    def _states_quadratic(self, ctx, forms, ch, ns, letters, d) -> dict:
        gm, r, z = ctx.gm, ch.roles, ch.z
        if ch.decay_seq is None:
            raise NoMatch("a chunk recursion with decays but an intra-chunk term without (or with a "
                          "constant-rate decay exp(w·(i - j)), read only with a loop over chunks)")
        term, w = _summing_one_axis(gm, ns, letters, "the recursion over chunks", "one chunk axis")
        sts = [lf for lf in term.leaves if r.p in _letters(lf)]
        if len(sts) != 1:
            raise NoMatch("the recursion over chunks does not read one tensor of states")
        st, st_letters = sts[0]
        pos = [lf for lf in term.leaves if lf is not sts[0]]
        if [z if x == w else x for x in st_letters] != list(letters):
            raise NoMatch("the recursion over chunks mixes state axes")
        roles = _Roles(i=z, j=w, batch=[x for x in r.batch if x != z], c=None, b=None, x=None, pos=pos)
        an = Analyzer(gm, z, w, roles.batch)
        masks, log = [], None
        for leaf in pos:
            if not _letters(leaf) <= set(roles.batch) | {z, w}:
                raise NoMatch("a chunk decay over other axes than the chunks")
            p = an.position(*leaf)
            masks += p.masks
            if p.log is not None:
                log = p.log if log is None else log.plus(p.log)
        if log is None:
            raise NoMatch("the recursion over chunks has no decay")
        masks += log.zero
        coef, seq = forms._check(gm, roles, masks, log, val(ns).shape[d])
        if seq is None or coef.const != 1.0 or coef.factors:
            raise NoMatch("the chunk decay is not exp of a segment sum")
        self._check_padded_last(ch, *seq)
        # St = cat([h0 or 0, S]) along the chunk axis
        st, st_letters = base_letters(st, [z if x == w else x for x in st_letters])
        if not is_op(st, aten.cat) or len(st.args[0]) != 2 or \
                arg(st, 1, "dim", 0) % rank(st) != st_letters.index(z):
            raise NoMatch("the chunk states are not cat([initial state, states]) along the chunks")
        first, states = st.args[0]
        dz = st_letters.index(z)
        if not _same_int(val(first).shape[dz], 1):
            raise NoMatch("more than one initial state in front of the chunk states")
        h0 = None if _is_zero(first) else base_letters(first, [UNIT if x == z else x for x in st_letters])
        self._chunk_states(ctx, ch, states, st_letters)
        finals = [u for u in ns.users if u.target is aten.select.int and u.args[1] % rank(ns) == d
                  and _is_last(u, d, val(ns).shape[d])]
        return {"h0": h0, "final": finals, "final_letters": self._unit_batch(ch, [x for x in letters if x != z])}

    def _check_padded_last(self, ch, apad, letters) -> None:
        """A' = pad(G[..., Q-1], (1, 0)) along the chunk axis (the chunk-end cumulative decays)."""
        z = ch.z
        if is_op(apad, aten.constant_pad_nd):
            pad, value = apad.args[1], arg(apad, 2, "value", 0)
        elif is_op(apad, aten.pad):
            pad, value = apad.args[1], arg(apad, 3, "value", None)
            if arg(apad, 2, "mode", "constant") != "constant":
                raise NoMatch("the chunk decays are padded in a non-constant mode")
        else:
            raise NoMatch("the chunk decays are not padded with one zero in front")
        if list(pad) != [1, 0] or (value is not None and value != 0) or letters[-1] != z:
            raise NoMatch("the chunk decays are not padded with one zero in front of the chunk axis")
        last = apad.args[0]
        if last.target is not aten.select.int:
            raise NoMatch("the chunk decays are not the last entries of a cumulative sum")
        g = last.args[0]
        d = last.args[1] % rank(g)
        gl = list(letters[:d]) + [ch.roles.i] + list(letters[d:])
        if not _is_last(last, d, val(g).shape[d]):
            raise NoMatch("the chunk decays read another entry than the chunk's last")
        self._same_cumsum(g, gl, ch.roles.i, ch)

    def _chunk_states(self, ctx, ch, s_node, s_letters) -> None:
        """S[z] = Σ_s b[z, s]⊗x[z, s]·exp(G[z, Q-1] - G[z, s]) with Y_diag's b, x, a."""
        gm, r = ctx.gm, ch.roles
        s_node, s_letters = base_letters(s_node, s_letters)
        term, s = _summing_one_axis(gm, s_node, s_letters, "the chunk states", "the chunk positions")
        rename = {s: r.j}
        bs = [lf for lf in term.leaves if lf[0] is r.b[0] and [rename.get(x, x) for x in lf[1]] == list(r.b[1])]
        xs = [lf for lf in term.leaves if lf[0] is r.x[0] and [rename.get(x, x) for x in lf[1]] == list(r.x[1])]
        if len(bs) != 1 or len(xs) != 1 or bs[0] is xs[0]:
            raise NoMatch("the chunk states are not built from the intra-chunk term's b and x")
        factors = [lf for lf in term.leaves if lf is not bs[0] and lf is not xs[0]]
        if not ch.decays:
            if factors:
                raise NoMatch("decayed chunk states but an intra-chunk term without decay")
            return
        if len(factors) != 1:
            raise NoMatch("the chunk states' decay is not one factor exp(G_last - G)")
        node, letters = factors[0]
        if ch.rate is not None:             # exp(w·(Q - 1 - s)) = exp(G_last - G_s)
            if _rate_affine(gm, ch, node, letters, s, "the chunk states' decay") != \
                    (-1.0, float(ch.chunk_length() - 1)):
                raise NoMatch("the chunk states' decay is not exp(w·(Q - 1 - s)) for the intra-chunk decay's "
                              "exp(w·(i - j))")
            return
        if not is_op(node, aten.exp) or node.args[0].target is not aten.sub.Tensor:
            raise NoMatch("the chunk states' decay is not exp(G_last - G)")
        sub = node.args[0]
        hi, lo = sub.args
        lo_b, lo_l = base_letters(lo, aligned(lo, letters, sub))
        self._same_cumsum(lo_b, lo_l, s, ch)
        hi_b, hi_l = base_letters(hi, aligned(hi, letters, sub))
        if is_op(hi_b, aten.slice):
            g, dim = hi_b.args[0], _slice_parts(hi_b)[1]
            gl = list(hi_l)
            gl[dim] = s
        elif hi_b.target is aten.select.int:
            g, dim = hi_b.args[0], hi_b.args[1] % rank(hi_b.args[0])
            gl = list(hi_l[:dim]) + [s] + list(hi_l[dim:])
        else:
            raise NoMatch("the chunk states' decay does not read the chunk's last cumulative decay")
        if not _is_last(hi_b, dim, val(g).shape[dim]):
            raise NoMatch("the chunk states' decay does not read the chunk's last cumulative decay")
        self._same_cumsum(g, gl, s, ch)

    def _states_cumsum(self, ctx, ch, cat, letters) -> dict:
        """(b) decay none: H = cat([zeros, cumsum_z(S)[:-1]]) along the chunk axis z."""
        if ch.decays:
            raise NoMatch("an exclusive cumulative sum of chunk states with a decaying intra-chunk term")
        if len(cat.args[0]) != 2:
            raise NoMatch("the state entering a chunk is a cat of more than two parts")
        dz = arg(cat, 1, "dim", 0) % rank(cat)
        z = letters[dz]
        if z == UNIT or z not in ch.roles.batch:
            raise NoMatch("the state entering a chunk is concatenated along a non-chunk axis")
        ch.z = z
        first, rest = cat.args[0]
        if not _is_zero(first) or not _same_int(val(first).shape[dz], 1):
            raise NoMatch("the first chunk's entering state is not zero")
        if not _is_drop_last(rest, dz, val(rest.args[0]).shape[dz]):
            raise NoMatch("the entering states are not the cumulative states shifted by one chunk")
        cs = rest.args[0]
        if not is_op(cs, aten.cumsum) or cs.args[1] % rank(cs) != dz or arg(cs, 2, "dtype") is not None:
            raise NoMatch("the entering states are not a cumulative sum over the chunks")
        self._chunk_states(ctx, ch, cs.args[0], letters)
        finals = []
        return {"h0": None, "final": finals, "final_letters": [x for x in letters if x != z]}

    def _states_scan(self, ctx, ch, cat, letters) -> dict:  # noqa: C901 - one reading per decay kind
        """(c) a chunk loop re-rolled by the loops pass: H = cat([h0, Hs[:-1]]) along the chunk axis z,
        Hs the states of ``seqfuse.scan`` over the chunks, h_z = a_z·h_{z-1} + b_z from the scan's
        own h0, with a_z = exp(G[z, Q-1]) (one number per chunk and batch entry) and b_z = S[z]."""
        r = ch.roles
        if len(cat.args[0]) != 2:
            raise NoMatch("the state entering a chunk is a cat of more than two parts")
        dz = arg(cat, 1, "dim", 0) % rank(cat)
        z = letters[dz]
        if z == UNIT or z not in r.batch:
            raise NoMatch("the state entering a chunk is concatenated along a non-chunk axis")
        ch.z = z
        first, rest = cat.args[0]
        if not _same_int(val(first).shape[dz], 1):
            raise NoMatch("more than one initial state in front of the scan's states")
        if not _is_drop_last(rest, dz, val(rest.args[0]).shape[dz]):
            raise NoMatch("the entering states are not the scan's states shifted by one chunk")
        ys, yl = base_letters(rest.args[0], letters)
        scan = _scan_source(cat)
        op = scan.meta["seqfuse_ir"]
        if not ch.decays and not _is_ones(op.a):
            raise NoMatch("a scan over chunks with a decay but an intra-chunk term without one")
        if op.reverse or op.c is not None:
            raise NoMatch("the scan over chunks runs reversed or has a readout")
        if ys.args[1] != 0 or sorted(yl) != sorted(letters) or yl[-2] != z:
            raise NoMatch("the entering states are not the scan's states along the chunk axis")
        hl = yl[:-2] + yl[-1:]
        # H[0]: the scan's own initial state (the same view of the same tensor), or zero without one
        fb = base_letters(first, [UNIT if x == z else x for x in letters])
        if op.h0 is None:
            if not (_is_zero(first) or _is_zero(fb[0])):
                raise NoMatch("the first chunk's entering state is not the scan's initial state")
            h0 = None
        else:
            h0 = base_letters(op.h0, hl)
            if fb[0] is not h0[0] or list(fb[1]) != list(h0[1]):
                raise NoMatch("the first chunk's entering state is not the scan's initial state")
        if not ch.decays:               # decay none: h_z = h_{z-1} + S[z] (the scan's a a constant 1)
            self._chunk_states(ctx, ch, op.b, aligned(op.b, yl, ys))
            finals = [u for u in scan.users if u.target is operator.getitem and u.args[1] == 1]
            return {"h0": h0, "final": finals, "final_letters": self._unit_batch(ch, hl)}
        # a_z = exp(G[z, Q-1]): the chunk's last cumulative decay, the same along the state axes
        a_node, a_l = base_letters(op.a, aligned(op.a, yl, ys))
        if ch.rate is not None:         # exp(w·Q), the same for every chunk
            if not set(a_l) - {UNIT} <= set(r.batch) - {z}:
                raise NoMatch("the scan's decay over chunks varies along the state or between chunks, "
                              "where the intra-chunk decay is a constant rate exp(w·(i - j))")
            if _rate_affine(ctx.gm, ch, a_node, a_l, None, "the scan's decay over chunks") != \
                    (0.0, float(ch.chunk_length())):
                raise NoMatch("the scan's decay over chunks is not exp(w·Q) for the intra-chunk decay's "
                              "exp(w·(i - j))")
            self._chunk_states(ctx, ch, op.b, aligned(op.b, yl, ys))
            finals = [u for u in scan.users if u.target is operator.getitem and u.args[1] == 1]
            return {"h0": h0, "final": finals, "final_letters": self._unit_batch(ch, hl)}
        if not set(a_l) - {UNIT} <= set(r.batch) or z not in a_l:
            raise NoMatch("the scan's decay over chunks varies along the state or is not per chunk")
        if not is_op(a_node, aten.exp):
            raise NoMatch("the scan's decay over chunks is not exp(G_last)")
        last, ll = base_letters(a_node.args[0], aligned(a_node.args[0], a_l, a_node))
        if last.target is not aten.select.int:
            raise NoMatch("the scan's decay over chunks is not the chunk's last cumulative decay")
        g = last.args[0]
        d = last.args[1] % rank(g)
        if not _is_last(last, d, val(g).shape[d]):
            raise NoMatch("the scan's decay over chunks reads another entry than the chunk's last")
        self._same_cumsum(g, list(ll[:d]) + [r.i] + list(ll[d:]), r.i, ch)
        # b_z = S[z] = Σ_s b⊗x·exp(G_last - G_s)
        self._chunk_states(ctx, ch, op.b, aligned(op.b, yl, ys))
        finals = [u for u in scan.users if u.target is operator.getitem and u.args[1] == 1]
        return {"h0": h0, "final": finals, "final_letters": self._unit_batch(ch, hl)}

    @staticmethod
    def _rate_a(graph, before, ch, full, x, add):
        """a (B', T, H) = w at every step, for a constant-rate decay exp(w·(i - j))."""
        emit, rate = _FORMS._emit, ch.rate
        if any(ch.z in letters for _, _, letters in rate.factors):
            raise NoMatch("the decay rate varies between chunks")
        a = None
        for kind, node, letters in rate.factors:
            if kind == "log":
                node = emit(graph, before, aten.log.default, (node,), add)
            if not val(node).is_floating_point():
                raise NoMatch("a decay factor that is not floating point")
            f = _FORMS._layout(graph, before, full, node, list(letters), full.i, None, add)
            a = f if a is None else emit(graph, before, aten.mul.Tensor, (a, f), add)
        if a is None:
            raise NoMatch("a constant decay without a per-head factor")
        a = emit(graph, before, aten.expand.default, (a, [-1, val(x).shape[1], -1]), add)   # over t
        if rate.const != 1.0:
            a = emit(graph, before, aten.mul.Tensor, (a, float(rate.const)), add)
        return a

    @staticmethod
    def _unit_batch(ch, hl):
        """Final-state letters with each size-1 axis (UNIT) named by a batch letter of size 1 that
        is missing (size-1 axes are interchangeable, so any order is the same tensor)."""
        out_shape = val(ch.add).shape
        missing = [e for e in ch.roles.batch if e != ch.z and e not in hl]
        if hl.count(UNIT) != len(missing) or \
                any(not _same_int(out_shape[ch.term.out.index(e)], 1) for e in missing):
            raise NoMatch("the final state is broadcast over a batch axis")
        fill = iter(missing)
        return [next(fill) if e == UNIT else e for e in hl]

    # --- building ---------------------------------------------------------------------
    def _unchunk(self, graph, before, node, letters, z, l, t, like):
        """(node, letters) with chunk axis z and position axis l -> the sequence axis t = z·Q + l."""
        letters = list(letters)
        if z not in letters or l not in letters:
            raise NoMatch("an operand is broadcast over the chunks or the chunk positions")
        emit = _FORMS._emit
        order = [x for x in letters if x != l]
        order.insert(order.index(z) + 1, l)
        if order != letters:
            node = emit(graph, before, aten.permute.default, (node, [letters.index(x) for x in order]), like)
            letters = order
        k = letters.index(z)
        node = emit(graph, before, aten.flatten.using_ints, (node, k, k + 1), like)
        return node, letters[:k] + [t] + letters[k + 2:]

    def _build(self, ctx, add, ch: _Chunked, entry: dict) -> None:
        """One ssd over the sequence t = z·Q + l; without a chunk axis (ch.z None: one chunk entered with
        a state), over the chunk's own positions, for every batch entry."""
        graph, r, z = ctx.graph, ch.roles, ch.z
        forms = _FORMS
        emit = forms._emit
        finals = entry["final"]
        order = {n: k for k, n in enumerate(graph.nodes)}
        before = min([add, *[u for f in finals for u in f.users]], key=order.__getitem__)
        t = "\1" if z is not None else r.i
        sources = [r.c[0], r.b[0], r.x[0]] + ([ch.decay_seq[0]] if ch.decay_seq else []) + \
            ([entry["h0"][0]] if entry["h0"] is not None else [])
        if any(order[s] > order[before] for s in sources if isinstance(s, torch.fx.Node)):
            raise NoMatch("an operand is computed after the chunked form's result is used")

        def sequence(node, letters, pos):       # (node, letters) with the position axis named t
            if z is None:
                return node, [t if e == pos else e for e in letters]
            return self._unchunk(graph, before, node, letters, z, pos, t, add)

        c, cl = sequence(*r.c, r.i)
        b, bl = sequence(*r.b, r.j)
        x, xl = sequence(*r.x, r.j)
        a = None
        if ch.decay_seq is not None:
            a, al = sequence(*ch.decay_seq, r.i)
        batch = [e for e in r.batch if e != z]
        full = _Roles(i=t, j=t, n=r.n, p=r.p, batch=batch, c=(c, cl), b=(b, bl), x=(x, xl), pos=[])
        if a is not None:
            full.pos = [(a, al)]
        x = forms._layout(graph, before, full, x, xl, t, r.p, add)
        b = forms._layout(graph, before, full, b, bl, t, r.n, add)
        c = forms._layout(graph, before, full, c, cl, t, r.n, add)
        if a is not None:
            a = forms._layout(graph, before, full, a, al, t, None, add)
        elif ch.rate is not None:
            a = self._rate_a(graph, before, ch, full, x, add)
        scale = _scalar_product(graph, ch.term, before)
        if scale is not None:
            c = emit(graph, before, aten.mul.Tensor, (c, scale), add)
        h0 = None
        if entry["h0"] is not None:
            h0 = _FORMS.to_layout(graph, before, full, *entry["h0"], [], [r.p, r.n], add)   # (B', H, P, N)
        # the chunk states' exp(G[Q-1] - G[s]) (and any decay read off the chunk pieces) is a difference
        op = SSD(x=x, b=b, c=c, a=a, h0=h0, decay="none" if a is None else "scalar", finite_only=a is not None)
        ir = ctx.insert_ir(op, before, add)
        ir.meta["val"] = ssd_value(x, b, c)
        y = emit(graph, before, operator.getitem, (ir, 0), add)
        lead, head = batch[:-1], batch[-1:]
        y = _FORMS.from_layout(graph, before, full, y, 2, add)
        ylet = lead + [t] + head + [r.p]
        if z is not None:
            k = ylet.index(t)
            sizes = [_FORMS._size(graph, before, r, z, add), _FORMS._size(graph, before, r, r.i, add)]
            y = emit(graph, before, aten.unflatten.int, (y, k, sizes), add)
            ylet = ylet[:k] + [z, r.i] + ylet[k + 1:]
        perm = [ylet.index(e) for e in ch.term.out]
        if perm != list(range(len(perm))):
            y = emit(graph, before, aten.permute.default, (y, perm), add)
        if val(y).dtype != val(add).dtype:
            y = emit(graph, before, aten.to.dtype, (y, val(add).dtype), add)
        add.replace_all_uses_with(y)
        for f in finals:
            hn = emit(graph, before, operator.getitem, (ir, 1), f)
            hn = _FORMS.from_layout(graph, before, full, hn, 1, f)
            hl = lead + head + [r.p, r.n]
            perm = [hl.index(e) for e in entry["final_letters"]]
            if perm != list(range(len(perm))):
                hn = emit(graph, before, aten.permute.default, (hn, perm), f)
            if val(hn).dtype != val(f).dtype:
                hn = emit(graph, before, aten.to.dtype, (hn, val(f).dtype), f)
            f.replace_all_uses_with(hn)


def _final_state_of(node):
    """The ssd node whose final state ``node`` is (``getitem(ssd, 1)``), or None."""
    if isinstance(node, torch.fx.Node) and node.target is operator.getitem and node.args[1] == 1 and \
            isinstance(node.args[0], torch.fx.Node) and isinstance(node.args[0].meta.get("seqfuse_ir"), SSD):
        return node.args[0]
    return None


def _concatenate_consecutive(ctx) -> None:
    """ssd₂ entered with ssd₁'s final state, and nothing else reading that state: one ssd over the
    concatenated steps (x, b, c, a along T), h0 = ssd₁'s, final state ssd₂'s; y₁ and y₂ are its
    first T₁ and last T₂ steps.  (MiniMax's whole blocks and its ragged last block.)"""
    graph = ctx.graph
    for n2 in list(graph.nodes):
        op2 = n2.meta.get("seqfuse_ir")
        if n2.graph is not graph or not isinstance(op2, SSD) or op2.h0 is None:
            continue
        n1 = _final_state_of(op2.h0)
        if n1 is None or n1.graph is not graph or len(op2.h0.users) != 1:
            continue
        op1 = n1.meta["seqfuse_ir"]
        if op1.decay != op2.decay or op1.d is not None or op2.d is not None or \
                (op1.a is None) != (op2.a is None):
            continue
        pairs = [(op1.x, op2.x), (op1.b, op2.b), (op1.c, op2.c)] + ([(op1.a, op2.a)] if op1.a is not None else [])
        if any(val(u).dtype != val(w).dtype or val(u).dim() != val(w).dim() or
               any(not _same_int(p, q) for k, (p, q) in enumerate(zip(val(u).shape, val(w).shape)) if k != 1)
               for u, w in pairs):
            continue
        if not _hoist([w for _, w in pairs], n1):
            continue                # ssd₂'s operands cannot be computed before ssd₁
        emit = _FORMS._emit
        cat = [emit(graph, n1, aten.cat.default, ([u, w], 1), n2) for u, w in pairs]
        op = SSD(x=cat[0], b=cat[1], c=cat[2], a=cat[3] if len(cat) > 3 else None, h0=op1.h0, decay=op1.decay,
                 finite_only=op1.finite_only or op2.finite_only)
        ir = ctx.insert_ir(op, n1, n2)
        ir.meta["val"] = ssd_value(cat[0], cat[1], cat[2])
        y = emit(graph, n1, operator.getitem, (ir, 0), n2)
        t1 = val(op1.x).shape[1]
        y1 = emit(graph, n1, aten.slice.Tensor, (y, 1, 0, t1), n1)
        y2 = emit(graph, n1, aten.slice.Tensor, (y, 1, t1, val(y).shape[1]), n2)
        h = emit(graph, n1, operator.getitem, (ir, 1), n2)
        for g in list(n1.users):
            if g.target is operator.getitem and g.args[1] == 0:
                g.replace_all_uses_with(y1)
        for g in list(n2.users):
            if g.target is operator.getitem:
                g.replace_all_uses_with(y2 if g.args[1] == 0 else h)


def _hoist(values: list, before: torch.fx.Node) -> bool:
    """Move the nodes ``values`` need that come after ``before`` to just before it (in their order), if
    none of them is ``before`` or reads it, writes memory, draws random numbers (moved, it would draw
    them in another order than eager) or is a placeholder; returns whether it did."""
    need = needed_after(values, before)
    for n in need:
        t = n.target
        if n is before or n.op != "call_function":
            return False
        if isinstance(t, torch._ops.OpOverload):
            if t._schema.is_mutable or torch.Tag.nondeterministic_seeded in t.tags:
                return False
        elif t is not operator.getitem and "seqfuse_ir" not in n.meta:
            return False        # a higher-order op or Python callable: what it does inside is not known
    for n in need:
        before.prepend(n)
    return True


def _same_factors(f1: tuple, f2: tuple) -> bool:
    """Whether two Coef factor lists are the same product (same kinds, same values, same axes)."""
    key = lambda f: (f[0], [e for e in f[2] if e != UNIT])  # noqa: E731
    if len(f1) != len(f2):
        return False
    rest = list(f2)
    for f in f1:
        hit = next((g for g in rest if key(g) == key(f) and same_expr(g[1], f[1])), None)
        if hit is None:
            return False
        rest.remove(hit)
    return True


def _rate_affine(gm, ch: _Chunked, node, letters, pos, what: str) -> tuple[float, float]:
    """(α, β) with ``node`` (axes ``letters``) = exp(w·(α·l + β)), w the intra-chunk decay's constant
    rate and l = arange along the axis named ``pos`` (None: no position axis); NoMatch otherwise."""
    p = Analyzer(gm, pos if pos is not None else "\2", "\3", ch.roles.batch).position(node, letters)
    if p.masks or p.log is None or p.log.valid or p.log.zero or p.log.req:
        raise NoMatch(f"{what} is not one exponential exp(w·(α·l + β))")
    alpha = beta = 0.0
    for atom, coef in p.log.terms:
        if coef.const == 0:
            continue
        if not _same_factors(coef.factors, ch.rate.factors):
            raise NoMatch(f"{what} has another rate than the intra-chunk decay exp(w·(i - j))")
        k = coef.const / ch.rate.const
        if atom[0] == "pos" and atom[1] == pos:       # positions: v = α'·arange + β' exactly
            v = evaluate(gm, atom[2], None).reshape(-1).double()
            ar = torch.arange(v.numel(), dtype=torch.float64)
            slope, offset = (float(v[1] - v[0]) if v.numel() > 1 else 1.0), float(v[0])
            if not torch.equal(v, slope * ar + offset):
                raise NoMatch(f"{what} reads positions that are not an affine function of the index")
            alpha, beta = alpha + k * slope, beta + k * offset
        elif atom[0] == "const":
            beta += k
        else:
            raise NoMatch(f"{what} is not exp(w·(α·l + β)) for the intra-chunk decay's rate w")
    return alpha, beta


def _is_ones(node) -> bool:
    """Whether ``node`` is, through views, a constant tensor of ones (a scan's a when nothing decays)."""
    if not isinstance(node, torch.fx.Node):
        return isinstance(node, (int, float)) and node == 1
    base, _ = base_letters(node, [UNIT] * (rank(node) or 0))
    if is_op(base, aten.ones, aten.ones_like, aten.new_ones):
        return True
    if is_op(base, aten.full, aten.full_like, aten.new_full):
        return constant_value(base.args[-1]) == 1
    return False


def _scan_source(cat):
    """The seqfuse.scan node whose states (result 0) the second part of ``cat`` reads through
    a slice and views, or None."""
    parts = cat.args[0]
    if len(parts) != 2 or not isinstance(parts[1], torch.fx.Node) or not is_op(parts[1], aten.slice):
        return None
    ys, _ = base_letters(parts[1].args[0], [UNIT] * rank(parts[1].args[0]))
    if not isinstance(ys, torch.fx.Node) or ys.target is not operator.getitem:
        return None
    src = ys.args[0]
    if isinstance(src, torch.fx.Node) and isinstance(src.meta.get("seqfuse_ir"), Scan):
        return src
    return None


def _scalar_product(graph, term, before):
    """The term's scalar factor as a graph value or float, None when it is 1."""
    if not term.scalars:
        return None
    if all(not isinstance(v, torch.fx.Node) for v, _ in term.scalars):
        s = 1.0
        for v, inv in term.scalars:
            s = s / float(v) if inv else s * float(v)
        return None if s == 1.0 else s
    return sym_product(graph, term.scalars, before)

