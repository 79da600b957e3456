"""xLSTM's chunkwise mLSTM -> one seqfuse.ssd and the closed form of its stabilizer.

transformers' ``mlstm_chunkwise_native_autograd`` (the NX-AI mlstm_kernels "native" chunkwise
kernel, copied) computes, per batch and head, with forget-gate log-decays a_t (``logsigmoid(f)``),
input gates I_t, scale s and chunks of Q steps::

    B       = cumsum of a within each chunk;  g_z = B[z, Q-1];  A[z, j] = g_z - B[z, j] + I[z, j]
    loop over chunks z (states C (K, V), n (K), m written into zero-filled buffers, slice by slice):
        m' = max(g_z + m, max_j A[z, j])
        C' = exp(g_z + m - m')·C + (k_z ⊙ exp(A_z - m'))ᵀ·v_z
        n' = exp(g_z + m - m')·n + Σ_j k_z[j] ⊙ exp(A_z[j] - m')
    within the chunk (LogD[i, j] = B_i - B_j + I_j on j <= i, -inf above):
        m_i = max(B_i + m_z, max_j LogD[i, j])
        num = (q·s ⊙ e^{B + m_z - m})·C_z + (s·q·kᵀ ⊙ e^{LogD - m})·v
        den = (q·s ⊙ e^{B + m_z - m})·n_z + Σ_j (s·q·kᵀ ⊙ e^{LogD - m})
        h   = num / (max(|den|, e^{-m}) + eps)

Every factor e^{-m_i} cancels: with G the cumulative sum of a over the whole sequence and
x_t = e^{I_t}·[v_t, 1] (one more column: the normalizer),

    [N, D]_t = Σ_{j<=t} (s·q_t·k_j) e^{G_t - G_j} x_j            (one ssd, decay=scalar a)
    h_t      = N_t / (max(|D_t|, 1) + eps·e^{m_t}),   m_t = G_t + max(0, max_{j<=t} (I_j - G_j))

where m_t is the closed form of the program's chain of maxima (from m = 0: it is the running
maximum of the recurrent mLSTM's stabilizer, computed with one cumulative maximum; it enters only
through eps).  The unstabilized sums exponentiate I on its own, so the rewrite reads I through
``seqfuse::within`` (|I| <= ``LOG_BOUND``), and q, k, v too (|·| <= ``VALUE_BOUND``): with both,
T·d·|q||k||v|·e^{LOG_BOUND} stays inside fp32 for T up to ~1e6, where the program's terms are at most
|q||k||v|·d; a call outside those bounds runs the program as written.  A log-decay that is not a
``logsigmoid`` (which is <= 0 by construction) is read through ``within(·, -inf, 0)``: a growing
decay would make e^{G_t - G_j} overflow where the stabilized program does not.  fp32 and fp64 only.

The pass proves every piece of that dataflow (the buffers' writes and reads, each chunk step of the
loop against its chunk's slices, the intra-chunk form, the shared scale) and leaves the program as
written, with a near miss naming the first piece that differs, once the output's form
``num / (max(|den|, exp(-m)) + eps)`` is found.  A final state read after the loop
(``return_last_states=True``, the inference path) is the ssd's final state S_T = [C̃ᵀ; ñ] scaled by
e^{-m_T}, with m_T = m at the last step (the program's chain of maxima ends there too).  A given
initial state (C0, n0, m0) (``c_initial``, ...: a cache carried across calls) enters the ssd as
h0 = e^{m0}·[C0ᵀ; n0] and the maximum's closed form as max(m0, ·), read through the guards
(|m0| <= ``LOG_BOUND``, |C0|, |n0| <= ``STATE_BOUND``).  Not lifted: a constant start other than zeros.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import free_symbols

from seqfuse.ir.ops import SSD
from seqfuse.passes.pattern import emit_before, erase_write_only, evaluate_shape_only, fill_constant, is_op, \
    is_shape_only, same_expr, val
from seqfuse.passes.registry import Pass, PassContext
from seqfuse.passes.ssd_forms import ssd_value

aten = torch.ops.aten
#: |I| at most this: e^{20} ~ 4.9e8
LOG_BOUND = 20.0
#: |C0|, |n0| of a given state at most this (a state the program produced holds |C| <= Σ_j |k_j||v_j|)
STATE_BOUND = 1e12
#: |q|, |k|, |v| at most this: T·d·|q||k||v|·e^{LOG_BOUND} <= 1e6·128·1e18·4.9e8 ~ 6e34 < fp32's 3.4e38
VALUE_BOUND = 1e6
_VIEWS = (aten.view, aten.reshape, aten._unsafe_view)


class NoMatch(Exception):
    """A piece of the chunkwise program differs from the listing (the message says which)."""


def _binary(node, target, what: str):
    if not is_op(node, target) or len(node.args) != 2 or node.kwargs:
        raise NoMatch(f"{what} is not {target.__name__}")
    return node.args


def _either(node, target, test, what: str):
    """(x, y): the operands of the commutative binary ``node`` with ``test(x)`` true."""
    a, b = _binary(node, target, what)
    if test(a):
        return a, b
    if test(b):
        return b, a
    raise NoMatch(f"{what}: neither operand of {node.name} has the expected form")


def _same(a, b) -> bool:
    return a is b or (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node) and same_expr(a, b))


def _dim(node, index: int, rank: int):
    d = node.args[index] if len(node.args) > index else node.kwargs.get("dim")
    return d % rank if isinstance(d, int) else None


def _unsqueezed(node, base, dim: int, what: str):
    """Require ``node`` = unsqueeze(``base`` (or the same expression), ``dim`` of the result)."""
    if not is_op(node, aten.unsqueeze) or not _same(node.args[0], base) or \
            _dim(node, 1, val(node).dim()) != dim % val(node).dim():
        raise NoMatch(f"{what} is not the expected unsqueeze")


def _trailing_units(node, base, what: str):
    """Require ``node`` = ``base`` unsqueezed to trailing unit axes."""
    src = node
    while is_op(src, aten.unsqueeze):
        src = src.args[0]
    if not _same(src, base) or tuple(val(node).shape) != tuple(val(base).shape) + (1,) * (
            val(node).dim() - val(base).dim()):
        raise NoMatch(f"{what} is not broadcast along trailing unit axes")


def _factors(node) -> list:
    """The factors of a product tree of aten.mul.Tensor (numbers kept as numbers)."""
    if is_op(node, aten.mul) and len(node.args) == 2 and not node.kwargs:
        return _factors(node.args[0]) + _factors(node.args[1])
    return [node]


def _number_product(factors, what: str):
    """(product of the numbers among ``factors``, the other factors)."""
    nums = [f for f in factors if isinstance(f, (int, float)) and not isinstance(f, bool)]
    rest = [f for f in factors if not (isinstance(f, (int, float)) and not isinstance(f, bool))]
    if any(not isinstance(f, torch.fx.Node) for f in rest):
        raise NoMatch(f"{what}: a symbolic scale")
    return math.prod(nums), rest


def _product(node, kind: str, what: str):
    """(a, b) of a batched matrix product einsum: kind "nn" a·b, "nt" a·bᵀ, "tn" aᵀ·b."""
    if not is_op(node, aten.einsum) or len(node.args[1]) != 2:
        raise NoMatch(f"{what} is not a two-operand contraction")
    eq = node.args[0].replace(" ", "")
    ins, out = eq.split("->")
    l0, l1 = ins.split(",")
    p = out[:-2]
    ok = len(l0) == len(l1) == len(out) >= 2 and len(set(out)) == len(out) and l0[:-2] == l1[:-2] == p
    if ok:
        x, y = out[-2:]
        want = {"nn": (x + "%", "%" + y), "nt": (x + "%", y + "%"), "tn": ("%" + x, "%" + y)}[kind]
        k = l0[-1] if kind != "tn" else l0[-2]
        ok = k not in out and (l0[-2:], l1[-2:]) == tuple(w.replace("%", k) for w in want)
    if not ok:
        raise NoMatch(f"{what}: the contraction {eq} is not the expected matrix product")
    return node.args[1]


def _split(node):
    """(base, shape) of a view / reshape, else (node, None)."""
    if is_op(node, *_VIEWS):
        return node.args[0], tuple(node.args[1])
    return node, None


def _select(node, dim: int, what: str):
    """(base, index) of ``select(base, dim, index)`` with the index made non-negative."""
    if node.target is not aten.select.int or _dim(node, 1, val(node.args[0]).dim()) != dim:
        raise NoMatch(f"{what} is not a select along axis {dim}")
    return node.args[0], node.args[2] % val(node.args[0]).shape[dim]


def _span(node, rank: int, size: int):
    """[lo, hi) of axis 2 that ``node`` (a select or unit-step slice of a buffer of ``size`` entries along
    axis 2) reads, or None."""
    if node.target is aten.select.int and _dim(node, 1, rank) == 2:
        lo = node.args[2] % size
        return lo, lo + 1
    if is_op(node, aten.slice) and _dim(node, 1, rank) == 2 and (len(node.args) < 5 or node.args[4] == 1):
        lo = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
        hi = node.args[3] if len(node.args) > 3 and node.args[3] is not None else size
        lo, hi = max(lo + size, 0) if lo < 0 else min(lo, size), max(hi + size, 0) if hi < 0 else min(hi, size)
        return lo, hi
    return None


def _scalar(x) -> bool:
    """A number, or a node holding a symbolic one (a float input under dynamic=True)."""
    if isinstance(x, torch.fx.Node):
        return isinstance(val(x), (torch.SymFloat, torch.SymInt, float, int))
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _rowmax(node):
    """The tensor whose maximum over the last axis ``node`` is, else None."""
    if node.target is operator.getitem and node.args[1] == 0 and is_op(node.args[0], aten.max) and \
            node.args[0].target is aten.max.dim and _dim(node.args[0], 1, val(node.args[0].args[0]).dim()) == \
            val(node.args[0].args[0]).dim() - 1 and not (len(node.args[0].args) > 2 and node.args[0].args[2]):
        return node.args[0].args[0]
    if is_op(node, aten.amax) and len(node.args) >= 2 and list(node.args[1]) in ([-1], [val(node).dim()]) and \
            not (len(node.args) > 2 and node.args[2]):
        return node.args[0]
    return None


def _is_max(node) -> bool:
    return node.target in (aten.maximum.default, aten.max.other) and len(node.args) == 2 and not node.kwargs


def _max_operands(node, test, what: str):
    if not _is_max(node):
        raise NoMatch(f"{what} is not a maximum of two tensors")
    a, b = node.args
    if test(a):
        return a, b
    if test(b):
        return b, a
    raise NoMatch(f"{what}: neither operand of {node.name} has the expected form")


def _is_sub(node) -> bool:
    """Whether ``node`` is a - b (no alpha)."""
    return is_op(node, aten.sub) and len(node.args) == 2 and not node.kwargs


def _scalar_sub(node, plus, minus, what: str):
    """Require ``node`` = exp(``plus`` - ``minus``) (nodes or the same expressions)."""
    if not is_op(node, aten.exp) or not _is_sub(node.args[0]) or \
            not _same(node.args[0].args[0], plus) or not _same(node.args[0].args[1], minus):
        raise NoMatch(f"{what} is not exp of the expected difference")


class _Program:
    """The pieces of one chunkwise mLSTM program, found from its output division."""

    def __init__(self, gm, div):
        self.gm, self.div = gm, div
        self.reads = []         # the buffers' slices the intra-chunk form reads
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        num, den = div.args
        eps, mx = _either(den, aten.add, _scalar, "the denominator")
        self.eps = eps
        ab, en = _max_operands(mx, lambda x: is_op(x, aten.abs), "the denominator's maximum")
        self.num, self.dn, m5 = num, ab.args[0], en.args[0].args[0]
        self.m5 = m5

    @staticmethod
    def candidate(div) -> bool:
        """Whether ``div`` is num / (max(|den|, exp(-m)) + eps) over (batch, head, chunk, position, value):
        the anchor of the form (a step of the recurrent form, 3-D, is mlstm_loop's)."""
        if div.target is not aten.div.Tensor or div.kwargs or not isinstance(div.args[1], torch.fx.Node) or \
                val(div).dim() != 5:
            return False
        den = div.args[1]
        if not is_op(den, aten.add) or len(den.args) != 2 or den.kwargs:
            return False
        mx = next((a for a in den.args if isinstance(a, torch.fx.Node) and not _scalar(a)), None)
        if mx is None or not any(_scalar(a) for a in den.args) or not _is_max(mx):
            return False
        a, b = mx.args
        for x, y in ((a, b), (b, a)):
            if is_op(x, aten.abs) and is_op(y, aten.exp) and is_op(y.args[0], aten.neg):
                return True
        return False

    # --- the intra-chunk form ------------------------------------------------------------------

    def match(self):
        m5 = self.m5
        if val(self.div).dtype not in (torch.float32, torch.float64):
            raise NoMatch(f"the output is {val(self.div).dtype}: the unstabilized sums are lifted in fp32 and "
                          "fp64 only")
        if free_symbols(val(self.div)) or not isinstance(self.eps, (int, float)):
            raise NoMatch("symbolic sizes or eps (dynamic=True): the chunk loop is unrolled for one length, "
                          "and the lifted form is built for it")
        if val(self.div).dim() == 5 and val(self.div).shape[2] == 1:
            raise NoMatch("one chunk (the sequence is as long as a chunk): the contractions are folded onto the "
                          "unchunked inputs, which this pass does not read")
        if not is_op(m5, aten.unsqueeze) or _dim(m5, 1, val(m5).dim()) != val(m5).dim() - 1:
            raise NoMatch("the stabilizer m is not unsqueezed along the last axis")
        mc = m5.args[0]
        logd, binter = _max_operands(mc, lambda x: _rowmax(x) is not None, "the stabilizer m")
        logd = _rowmax(logd)
        if val(logd).dim() != 5:
            raise NoMatch("the stabilizer is not over (batch, head, chunk, query, key) scores")
        try:
            b, mprev_u = _either(binter, aten.add, lambda x: is_op(x, aten.cumsum), "B + m_z")
        except NoMatch:
            raise NoMatch("B + m_z: B is not a cumulative sum computed in the program (the parallel part "
                          "alone, with B and the chunk states given, has no chunk loop to prove)") from None
        if _dim(b, 1, 4) != 3 or len(b.args) > 2 or b.kwargs or val(b).dim() != 4:
            raise NoMatch("B is not a cumulative sum along the chunk's positions")
        self.b, self.loga = b, b.args[0]
        if not is_op(mprev_u, aten.unsqueeze) or _dim(mprev_u, 1, 4) != 3:
            raise NoMatch("the chunks' maxima m_z are not broadcast along the positions")
        self.mprev = mprev_u.args[0]
        w, iu = _either(logd, aten.add, lambda x: is_op(x, aten.where), "LogD")
        if not is_op(iu, aten.unsqueeze) or _dim(iu, 1, 5) != 3:
            raise NoMatch("the input gate I_j is not broadcast along the queries")
        self.i_gate = iu.args[0]
        mask, diff, fill = w.args if len(w.args) == 3 else (None, None, None)
        if not (w.target is aten.where.ScalarOther and fill == -math.inf and _is_sub(diff)):
            raise NoMatch("LogD is not where(causal, B_i - B_j, -inf) + I_j")
        _unsqueezed(diff.args[0], b, 4, "B_i")
        _unsqueezed(diff.args[1], b, 3, "B_j")
        q_len = val(b).shape[3]
        if not (isinstance(mask, torch.fx.Node) and is_shape_only(mask)) or not torch.equal(
                evaluate_shape_only(self.gm, mask).to(torch.bool),
                torch.ones(q_len, q_len, dtype=torch.bool).tril()):
            raise NoMatch("the intra-chunk mask is not the causal (lower triangular) one")
        # the value products
        terms = _binary(self.num, aten.add, "the numerator")
        for inter, intra in (terms, terms[::-1]):
            try:
                mm, v5 = _product(intra, "nn", "the intra-chunk product")
                qg, cview = _product(inter, "nn", "the inter-chunk product")
                break
            except NoMatch:
                continue
        else:
            raise NoMatch("the numerator is not (q ⊙ gate)·C_z + M·v, two batched matrix products (a contraction "
                          "that a key dim of 1 folded onto the unchunked operands is not read)")
        scale, rest = _number_product(_factors(mm), "the scores")
        e_d = [f for f in rest if is_op(f, aten.exp)]
        s = [f for f in rest if is_op(f, aten.einsum)]
        if len(e_d) != 1 or len(s) != 1 or len(rest) != 2:
            raise NoMatch("the scores are not s·(q·kᵀ) ⊙ exp(LogD - m)")
        _scalar_sub(e_d[0], logd, m5, "the scores' decay")
        q5, k5 = _product(s[0], "nt", "q·kᵀ")
        scale_q, rest = _number_product(_factors(qg), "the gated queries")
        if len(rest) != 2 or scale_q != scale:
            raise NoMatch("the gated queries are not s·q ⊙ exp(B + m_z - m) with the scores' scale")
        eg = next((f for f in rest if is_op(f, aten.exp)), None)
        if eg is None or not _same(next(f for f in rest if f is not eg), q5):
            raise NoMatch("the gated queries do not read the scores' q")
        if not _is_sub(eg.args[0]) or not _same(eg.args[0].args[1], m5):
            raise NoMatch("the queries' gate is not exp(B + m_z - m)")
        _unsqueezed(eg.args[0].args[0], binter, 4, "the queries' gate B + m_z")
        self.scale, self.q5, self.k5, self.v5 = scale, q5, k5, v5
        # the normalizer: (q ⊙ gate)·n_z + Σ_j M
        y1, y2 = _either(self.dn, aten.add, lambda x: is_op(x, aten.einsum), "the normalizer")
        qg2, nu = _product(y1, "nn", "the normalizer's inter-chunk product")
        if not _same(qg2, qg) or not is_op(nu, aten.unsqueeze) or _dim(nu, 1, 5) != 4:
            raise NoMatch("the normalizer does not read the gated queries and n_z")
        if not (is_op(y2, aten.sum) and y2.target is aten.sum.dim_IntList and _same(y2.args[0], mm)
                and list(y2.args[1]) in ([-1], [4]) and (y2.args[2] if len(y2.args) > 2 else
                                                          y2.kwargs.get("keepdim", False))):
            raise NoMatch("the normalizer's intra-chunk term is not the scores summed over the keys")
        self._shapes()
        self._states(cview, nu.args[0])
        order = self.order
        first = min([self.div, *(x for us in self.finals.values() for u in us for x in u.users)],
                    key=order.__getitem__)
        if any(order[x] > order[first] for x in (self.q5, self.k5, self.v5, self.i_gate, self.loga)):
            raise NoMatch("the final state is read before the inputs of the output are computed")
        return self

    def _shapes(self):
        for node, what in ((self.q5, "q"), (self.k5, "k"), (self.v5, "v"), (self.i_gate, "I"), (self.loga, "a")):
            v = val(node)
            if free_symbols(v):
                raise NoMatch(f"{what} has a symbolic size (the chunk loop is unrolled for one length)")
            if v.dtype not in (torch.float32, torch.float64) or v.dtype != val(self.q5).dtype:
                raise NoMatch(f"{what} is {v.dtype}: the unstabilized sums are lifted in fp32 and fp64 only")
        bs, h, nc, q_len, dk = val(self.q5).shape
        self.sizes = (bs, h, nc, q_len, dk, val(self.v5).shape[-1])
        if tuple(val(self.k5).shape) != (bs, h, nc, q_len, dk) or tuple(val(self.v5).shape[:4]) != (bs, h, nc, q_len) \
                or tuple(val(self.i_gate).shape) != (bs, h, nc, q_len) or tuple(val(self.b).shape) != (bs, h, nc, q_len):
            raise NoMatch("q, k, v and the gates are not split into the same chunks")

    # --- the chunk states: buffers written by the loop -----------------------------------------

    def _states(self, cview, nview):
        bs, h, nc, q_len, dk, dv = self.sizes
        cb = self._buffer(cview, 2, dk, (bs, h, (nc + 1) * dk, dv), "C")
        nb = self._buffer(nview, 2, dk, (bs, h, (nc + 1) * dk), "n")
        mb = self._buffer(self.mprev, 2, 1, (bs, h, nc + 1), "m", view=False)
        self.finals = {}
        cs, ns, ms = (self._writes(buf, width, nc, name) for buf, width, name in
                      ((cb, dk, "C"), (nb, dk, "n"), (mb, 1, "m")))
        # the state entering the first chunk: zeros (a fresh state), or given (a cache carried over)
        self.initial = {}
        for x, name in ((cs[0], "C"), (ns[0], "n"), (ms[0], "m")):
            src = x
            while is_op(src, aten.squeeze, aten.unsqueeze, *_VIEWS, aten.expand):
                src = src.args[0]
            c = fill_constant(src)
            if c is not None and c != 0.0:
                raise NoMatch(f"the initial state {name} is the constant {c:g}, not zero or a given state")
            if c is None and val(x).dtype not in (torch.float32, torch.float64):
                raise NoMatch(f"the given initial state {name} is {val(x).dtype}, not fp32 or fp64")
            want = {"C": (bs, h, dk, dv), "n": (bs, h, dk), "m": (bs, h)}[name]
            if c is None and tuple(val(x).shape) != want:
                raise NoMatch(f"the given initial state {name} has shape {tuple(val(x).shape)}, not {want}")
            self.initial[name] = None if c == 0.0 else x
        self.a_tensor = None
        for z in range(nc):
            self._step(z, cs[z], ns[z], ms[z], cs[z + 1], ns[z + 1], ms[z + 1])

    def _buffer(self, read, dim, width, shape, name, view=True):
        """The zero-filled buffer that ``read`` (its first nc chunks, viewed per chunk) reads."""
        sl = read
        if view:
            sl, _ = _split(read)
            bs, h, nc = shape[0], shape[1], shape[2] // width - 1
            if sl is read or tuple(val(read).shape) != (bs, h, nc, width, *shape[3:]):
                raise NoMatch(f"the {name} states are not a per-chunk view of a buffer")
        if not is_op(sl, aten.slice) or _dim(sl, 1, val(sl.args[0]).dim()) != dim:
            raise NoMatch(f"the {name} states are not a slice of a buffer")
        buf = sl.args[0]
        start = sl.args[2] if len(sl.args) > 2 else 0
        end = sl.args[3] if len(sl.args) > 3 else None
        if start not in (0, None) or end not in (-width, shape[dim] - width) or (len(sl.args) > 4 and sl.args[4] != 1):
            raise NoMatch(f"the {name} states read are not every chunk's but the last")
        if not is_op(buf, aten.zeros) or tuple(val(buf).shape) != shape:
            raise NoMatch(f"the {name} states' buffer is not a zero-filled tensor of one slot per chunk boundary")
        self.reads.append(sl)
        return buf

    def _writes(self, buf, width, nc, name):
        """The values written into ``buf``'s nc + 1 slots, in slot order (each by one copy_); a read of the
        last slot alone after every write (a returned final state) is kept in ``self.finals[name]``."""
        order = self.order
        size = (nc + 1) * width
        slots: dict = {}
        finals = []
        for u in buf.users:
            if u in self.reads:
                continue
            span = _span(u, val(buf).dim(), size)
            if span is None:
                raise NoMatch(f"the {name} states' buffer is read or written other than slot by slot")
            lo, hi = span
            copies = list(u.users)
            if not (len(copies) == 1 and copies[0].target is aten.copy_.default and copies[0].args[0] is u
                    and not copies[0].users):
                if any(c.target is aten.copy_.default for c in copies) or (lo, hi) != (size - width, size):
                    raise NoMatch(f"the {name} states' buffer is read or written other than slot by slot")
                finals.append(u)            # the final state, read after the loop
                continue
            if hi - lo != width:
                raise NoMatch(f"a write into the {name} states' buffer is not one chunk's slot")
            if lo % width or lo // width in slots:
                raise NoMatch(f"the {name} states' buffer is written twice or off a slot")
            slots[lo // width] = copies[0]
        if sorted(slots) != list(range(nc + 1)):
            raise NoMatch(f"not every slot of the {name} states' buffer is written")
        first_read = min(order[r] for r in self.reads + finals if r.args[0] is buf)
        if any(order[c] > first_read for c in slots.values()):
            raise NoMatch(f"the {name} states are read before the loop wrote them")
        self.finals[name] = finals
        return [slots[k].args[1] for k in range(nc + 1)]

    def _step(self, z, c0, n0, m0, c1, n1, m1):
        """Require chunk z's step: (C, n, m) = (c0, n0, m0) -> (c1, n1, m1)."""
        what = f"the chunk loop's step {z}"
        gm_, am = _max_operands(m1, lambda x: is_op(x, aten.add) and m0 in x.args, f"{what}: m'")
        g = _binary(gm_, aten.add, what)
        g = g[0] if g[1] is m0 else g[1]
        blast, gz = _select(g, 2, f"{what}: g_z")
        b_base, last = _select(blast, 3, f"{what}: B[Q-1]")
        if not _same(b_base, self.b) or last != val(self.b).shape[3] - 1 or gz != z:
            raise NoMatch(f"{what}: g_z is not the chunk's last B")
        amax, az = _select(am, 2, f"{what}: max_j A")
        a_tensor = _rowmax(amax)
        if a_tensor is None or az != z:
            raise NoMatch(f"{what}: max_j A is not the chunk's maximum of A")
        if self.a_tensor is None:
            try:
                lin, iv = _either(a_tensor, aten.add, _is_sub, f"{what}: A")
                if not _same(iv, self.i_gate) or not _same(lin.args[1], self.b):
                    raise NoMatch("A")
                _unsqueezed(lin.args[0], blast, 3, f"{what}: B[Q-1] in A")
            except NoMatch:
                raise NoMatch(f"{what}: A is not B[Q-1] - B + I") from None
            self.a_tensor = a_tensor
        elif not _same(a_tensor, self.a_tensor):
            raise NoMatch(f"{what}: A differs from the first chunk's")
        # C' = e·C + (k ⊙ exp(A - m'))ᵀ·v
        p1, p2 = _either(c1, aten.add, lambda x: is_op(x, aten.mul) and c0 in x.args, f"{what}: C'")
        ee = p1.args[1] if p1.args[0] is c0 else p1.args[0]
        e = ee
        while is_op(e, aten.unsqueeze):
            e = e.args[0]
        _trailing_units(ee, e, f"{what}: the state's decay")
        _scalar_sub(e, gm_, m1, f"{what}: the state's decay")
        kg, vk = _product(p2, "tn", f"{what}: the chunk's update")
        ks = _factors(kg)
        eks = [f for f in ks if is_op(f, aten.unsqueeze)]
        if len(ks) != 2 or len(eks) != 1:
            raise NoMatch(f"{what}: the gated keys are not k ⊙ exp(A - m')")
        kk = next(f for f in ks if f is not eks[0])
        ek = eks[0].args[0]
        _trailing_units(eks[0], ek, f"{what}: the keys' gate")
        if not is_op(ek, aten.exp) or not _is_sub(ek.args[0]):
            raise NoMatch(f"{what}: the keys' gate is not exp(A - m')")
        a_z, az2 = _select(ek.args[0].args[0], 2, f"{what}: A_z")
        if not _same(a_z, self.a_tensor) or az2 != z:
            raise NoMatch(f"{what}: the keys' gate does not read the chunk's A")
        _unsqueezed(ek.args[0].args[1], m1, 2, f"{what}: m' in the keys' gate")
        for piece, whole, name in ((kk, self.k5, "keys"), (vk, self.v5, "values")):
            base, zz = _select(piece, 2, f"{what}: the chunk's {name}")
            if zz != z or _split(base)[1] is None or _split(base)[0] is not _split(whole)[0] or \
                    tuple(val(base).shape) != tuple(val(whole).shape):
                raise NoMatch(f"{what}: the {name} are not the chunk's slice of the inputs' {name}")
        # n' = e·n + Σ_j k ⊙ exp(A - m')
        r1, r2 = _either(n1, aten.add, lambda x: is_op(x, aten.mul) and n0 in x.args, f"{what}: n'")
        ee2 = r1.args[1] if r1.args[0] is n0 else r1.args[0]
        _trailing_units(ee2, e, f"{what}: the normalizer state's decay")
        summed = r2.args[0] if is_op(r2, aten.sum) else None
        if summed is not None and is_op(summed, aten.transpose) and list(r2.args[1]) in ([-1], [3]) and \
                sorted(d % 4 for d in summed.args[1:3]) == [2, 3]:
            summed = summed.args[0]
        elif summed is not None and list(r2.args[1]) not in ([-2], [2]):
            summed = None
        if summed is None or not _same(summed, kg) or (len(r2.args) > 2 and r2.args[2]):
            raise NoMatch(f"{what}: the normalizer state's update is not Σ_j of the gated keys")


class StabilizedChunksPass(Pass):
    """Lift xLSTM's chunkwise mLSTM (module doc) into one ssd."""

    name = "ssd_stabilized"

    def run(self, ctx: PassContext) -> None:
        done = 0
        for node in list(ctx.graph.nodes):
            if node.graph is not ctx.graph or not _Program.candidate(node):
                continue
            try:
                prog = _Program(ctx.gm, node).match()
            except NoMatch as e:
                ctx.report.add_near_miss("ssd", f"a stabilized chunkwise form (xLSTM's mLSTM): {e}", node)
                continue
            _rewrite(ctx, prog)
            done += 1
        if done:
            ctx.graph.eliminate_dead_code()
            ctx.gm.recompile()


def _rewrite(ctx, p: _Program) -> None:
    """Replace the program's output (and its returned final states) by the lifted form (module doc)."""
    graph, div = ctx.graph, p.div
    bs, h, nc, q_len, dk, dv = p.sizes
    order = p.order             # (nothing was inserted since the match)
    finals = [(name, u) for name, us in p.finals.items() for u in us]
    before = min([div, *(x for _, u in finals for x in u.users)], key=order.__getitem__)
    out, values = emit_lifted(ctx, before, div, q=p.q5, k=p.k5, v=p.v5, i_gate=p.i_gate, loga=p.loga,
                              scale=p.scale, eps=p.eps, initial=p.initial, sizes=(bs, h, nc * q_len, dk, dv),
                              finals=bool(finals))
    replace_with(graph, before, div, out)
    for name, u in finals:
        replace_with(graph, before, u, values[name])
    graph.eliminate_dead_code()
    erase_write_only(graph)             # the loop's slot writes into the buffers nothing reads now


def replace_with(graph, before, node, x) -> None:
    """Replace ``node``'s uses by ``x`` reshaped to its shape and cast to its dtype (inserted before
    ``before``)."""
    if tuple(val(x).shape) != tuple(val(node).shape):
        x = emit_before(graph, before, aten.reshape.default, (x, list(val(node).shape)), node)
    if val(x).dtype != val(node).dtype:
        x = emit_before(graph, before, aten.to.dtype, (x, val(node).dtype), node)
    node.replace_all_uses_with(x)


def emit_lifted(ctx, before, like, *, q, k, v, i_gate, loga, scale: float, eps: float, initial: dict, sizes,
                finals: bool, forget=None):
    """Emit, before ``before`` (source location of ``like``), the mLSTM's lifted form (module doc):
    h (B, H, T, V) in fp64 and, when ``finals``, the final states {"C": (B, H, K, V), "n": (B, H, K),
    "m": (B, H)} in fp64.  The operands are the program's tensors, any shapes holding, in order,
    (B, H, T, K) for ``q`` and ``k``, (B, H, T, V) for ``v``, (B, H, T) for ``i_gate`` and the
    log-decay ``loga`` (a ``log_sigmoid`` node is taken in fp64 from its argument; another decay is
    read through ``within(·, -inf, 0)``; with ``forget`` given, ``loga`` is ignored and the log-decay
    is ``log_sigmoid(forget)``), and the given state ``initial`` {"C", "n", "m"} (None:
    zeros); ``sizes`` = (B, H, T, K, V).  Every value that the unstabilized sums exponentiate or
    multiply is read through ``seqfuse::within`` (the bounds of this module)."""
    graph = ctx.graph
    bs, h, t, dk, dv = sizes

    def emit(target, *args):
        return emit_before(graph, before, target, args, like)

    def fit(x, shape):
        return x if list(val(x).shape) == shape else emit(aten.reshape.default, x, shape)

    def wide(x):
        return emit(aten.to.dtype, x, torch.float64) if val(x).dtype != torch.float64 else x

    def guarded(x, lo, hi):
        return wide(emit(torch.ops.seqfuse.within.default, x, lo, hi))
    q = fit(guarded(q, -VALUE_BOUND, VALUE_BOUND), [bs, h, t, dk])
    k = fit(guarded(k, -VALUE_BOUND, VALUE_BOUND), [bs, h, t, dk])
    v = fit(guarded(v, -VALUE_BOUND, VALUE_BOUND), [bs, h, t, dv])
    i_gate = fit(guarded(i_gate, -LOG_BOUND, LOG_BOUND), [bs, h, t])
    if forget is None and is_op(loga, aten.log_sigmoid):
        forget = loga.args[0]
    if forget is not None:                  # <= 0 by construction; taken in fp64 as well
        loga = emit(aten.log_sigmoid.default, wide(forget))
    else:
        loga = guarded(loga, -math.inf, 0.0)
    loga = fit(loga, [bs, h, t])
    # x = e^I·[v, 1]
    x = emit(aten.mul.Tensor, emit(aten.constant_pad_nd.default, v, [0, 1], 1.0),
             emit(aten.unsqueeze.default, emit(aten.exp.default, i_gate), -1))
    x = emit(aten.permute.default, x, [0, 2, 1, 3])
    b = emit(aten.permute.default, k, [0, 2, 1, 3])
    c = emit(aten.permute.default, emit(aten.mul.Tensor, q, float(scale)), [0, 2, 1, 3])
    a = emit(aten.permute.default, loga, [0, 2, 1])
    # a given state (C0, n0, m0) enters as h0 = e^{m0}·[C0ᵀ; n0] (B, H, V + 1, K), read through the guards
    h0, m0 = None, initial["m"]
    if m0 is not None:
        m0 = fit(guarded(m0, -LOG_BOUND, LOG_BOUND), [bs, h])
    if initial["C"] is not None or initial["n"] is not None:
        rows = []
        for name, shape in (("C", [bs, h, dk, dv]), ("n", [bs, h, dk])):
            s0 = initial[name]
            s0 = emit(aten.new_zeros.default, q, shape) if s0 is None else \
                fit(guarded(s0, -STATE_BOUND, STATE_BOUND), shape)
            rows.append(emit(aten.transpose.int, s0, -2, -1) if name == "C" else emit(aten.unsqueeze.default, s0, -2))
        h0 = emit(aten.cat.default, rows, -2)
        if m0 is not None:
            h0 = emit(aten.mul.Tensor, h0, emit(aten.unsqueeze.default, emit(aten.unsqueeze.default,
                                                                                emit(aten.exp.default, m0), -1), -1))
    op = SSD(x=x, b=b, c=c, a=a, h0=h0, decay="scalar", finite_only=True)
    ir = ctx.insert_ir(op, before, like)
    ir.meta["val"] = ssd_value(x, b, c)
    y = emit(aten.permute.default, emit(operator.getitem, ir, 0), [0, 2, 1, 3])      # (B, H, T, V + 1)
    num = emit(aten.slice.Tensor, y, 3, 0, dv)
    den = emit(aten.slice.Tensor, y, 3, dv, dv + 1)
    # m_t = G_t + max(0, max_{j<=t} (I_j - G_j))
    g = emit(aten.cumsum.default, loga, -1)
    lead = emit(aten.sub.Tensor, i_gate, g)
    lead = emit(aten.clamp_min.default, lead, 0.0) if m0 is None else \
        emit(aten.maximum.default, lead, emit(aten.unsqueeze.default, m0, -1))
    run = emit(operator.getitem, emit(aten.cummax.default, lead, -1), 0)
    m = emit(aten.unsqueeze.default, emit(aten.add.Tensor, g, run), -1)
    den = emit(aten.add.Tensor, emit(aten.clamp_min.default, emit(aten.abs.default, den), 1.0),
               emit(aten.mul.Tensor, emit(aten.exp.default, m), eps))
    out = emit(aten.div.Tensor, num, den)
    if not finals:
        return out, None
    # the final state: S_T = [C̃ᵀ; ñ] (the ssd's, unstabilized) scaled by e^{-m_T}, and m_T itself
    m_t = emit(aten.select.int, emit(aten.squeeze.dim, m, -1), -1, -1)                  # (B, H)
    scale_t = emit(aten.exp.default, emit(aten.neg.default, m_t))
    state = emit(aten.mul.Tensor, emit(operator.getitem, ir, 1),
                 emit(aten.unsqueeze.default, emit(aten.unsqueeze.default, scale_t, -1), -1))
    return out, {"C": emit(aten.transpose.int, emit(aten.slice.Tensor, state, 2, 0, dv), -2, -1),
                 "n": emit(aten.select.int, state, 2, dv), "m": m_t}
