"""xLSTM's mLSTM written as a loop over time steps -> one seqfuse.ssd and the closed form of its stabilizer.

transformers' ``mlstm_recurrent_sequence_native`` (xLSTM's sequence kernel for inference, and the
remainder of a sequence that is not a whole number of chunks) runs ``mlstm_recurrent_step_native``
once per step t, carrying the matrix state C (K, V), the normalizer n (K) and the stabilizer m::

    m'  = max(logsigmoid(f_t) + m, I_t)
    C'  = exp(logsigmoid(f_t) + m - m')·C + exp(I_t - m')·k_tᵀ·v_t
    n'  = exp(logsigmoid(f_t) + m - m')·n + exp(I_t - m')·k_t
    h_t = (s·q_t)·C' / (max(|(s·q_t)·n'|, exp(-m')) + eps)

and stacks the h_t.  Dynamo unrolls the loop; the max makes it no linear recurrence, so ``loops``
would leave it as T copies of the step.  This is the recurrent form of the chunkwise program that
``ssd_stabilized`` lifts, with the same closed form: with a_t = logsigmoid(f_t), C̃ = e^m·C and
ñ = e^m·n are linear (C̃' = e^{a_t}·C̃ + e^{I_t}·k_tᵀ·v_t), and h_t = N_t / (max(|D_t|, 1) + eps·e^{m_t})
with [N, D] one ssd over x = e^I·[v, 1] and m_t = G_t + max(m0, max_{j<=t}(I_j - G_j)).  The rewrite
is ``ssd_stabilized.emit_lifted``: fp64, the same ``seqfuse::within`` guards (a call outside them
runs the program as written), a given state (C0, n0, m0) as h0 = e^{m0}·[C0ᵀ; n0], and the final
state, read after the loop, as S_T·e^{-m_T}.

The pass proves, from the stacked outputs back, every step of that dataflow: the output division,
the maximum and its exp(-m'), the two products with the scaled query, both state updates with their
shared gates, the stabilizer's update, each step's state read from the previous step's (the first
from zeros or a given state), and q_t, k_t, v_t, f_t, I_t read as position t of one tensor each,
for t = 0 … T-1.  Casts that keep the dtype and clones are read through (transformers' ``.to(
dtype_state)`` with a state dtype equal to the operands'); any other cast — a 16-bit program or a
state dtype wider than the operands — is left as written with a near miss, as is every other
difference, once the outputs are the stacked divisions of the form above.  A single step (the
wrapper's step kernel, T = 1) is left alone.
"""
from __future__ import annotations

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import free_symbols

from seqfuse.passes.pattern import fill_constant, is_op, val
from seqfuse.passes.registry import Pass, PassContext
from seqfuse.passes.ssd_stabilized import NoMatch, _either, _is_max, _is_sub, _max_operands, _product, _same, \
    _scalar, emit_lifted, replace_with

aten = torch.ops.aten
PREFIX = "a stabilized recurrent form (xLSTM's mLSTM step loop): "


def _plain(node):
    """``node`` read through clones and casts that keep its dtype (None stays None)."""
    while isinstance(node, torch.fx.Node) and (
            (node.target is aten.to.dtype and val(node.args[0]).dtype == val(node).dtype and len(node.args) == 2
             and not node.kwargs) or (node.target is aten.clone.default and not node.kwargs)):
        node = node.args[0]
    return node


def _cast(node):
    """``node`` read through every cast and clone (to find the form of a program in another dtype)."""
    while isinstance(node, torch.fx.Node) and is_op(node, aten.to, aten.clone, aten._to_copy):
        node = node.args[0]
    return node


def _division(node) -> bool:
    """Whether ``node`` is num / (max(|·|, exp(-m)) + eps): the anchor of one step's output."""
    if not isinstance(node, torch.fx.Node) or node.target is not aten.div.Tensor or node.kwargs:
        return False
    den = _cast(node.args[1])
    if not isinstance(den, torch.fx.Node) or not is_op(den, aten.add) or len(den.args) != 2 or den.kwargs:
        return False
    mx = next((a for a in den.args if isinstance(a, torch.fx.Node) and not _scalar(a)), None)
    if mx is None or not any(_scalar(a) for a in den.args) or not _is_max(mx):
        return False
    return any(is_op(x, aten.abs) and is_op(y, aten.exp) and is_op(y.args[0], aten.neg)
               for x, y in (mx.args, mx.args[::-1]))


def _dim(node, index: int):
    """The axis argument ``index`` of ``node``, non-negative (an unsqueeze's counts in its result)."""
    d = node.args[index] if len(node.args) > index else node.kwargs.get("dim")
    rank = val(node if is_op(node, aten.unsqueeze) else node.args[0]).dim()
    return d % rank if isinstance(d, int) else None


def _position(node, t: int, what: str, unsqueezed: bool = False):
    """The tensor whose position ``t`` along axis 2 ``node`` is (``x[:, :, t]``; with ``unsqueezed``
    ``x[:, :, t, None]``)."""
    node = _plain(node)
    if unsqueezed:
        if not is_op(node, aten.unsqueeze) or _dim(node, 1) != 2 or val(node).dim() != 3:
            raise NoMatch(f"step {t}: {what} is not x[:, :, t, None]")
        node = _plain(node.args[0])
    if node.target is not aten.select.int or _dim(node, 1) != 2 or \
            node.args[2] % val(node.args[0]).shape[2] != t:
        raise NoMatch(f"step {t}: {what} is not position {t} along axis 2 of one tensor")
    return node.args[0]


def _squeezed_product(node, what: str):
    """(a, b) of squeeze(einsum(a·b), 2) where a = unsqueeze(·, 2): a row vector times a matrix."""
    node = _plain(node)
    if node.target is not aten.squeeze.dim or _dim(node, 1) != 2:
        raise NoMatch(f"{what} is not squeezed along axis 2")
    a, b = _product(_plain(node.args[0]), "nn", what)
    a = _plain(a)
    if not is_op(a, aten.unsqueeze) or _dim(a, 1) != 2:
        raise NoMatch(f"{what}: the query is not a row (unsqueezed along axis 2)")
    return _plain(a.args[0]), _plain(b)


def _outer(node, what: str):
    """(k, v) of einsum('…c,…d->…cd', k, v): the outer product k_tᵀ·v_t."""
    node = _plain(node)
    if not is_op(node, aten.einsum) or len(node.args[1]) != 2:
        raise NoMatch(f"{what} is not an outer product")
    ins, out = node.args[0].replace(" ", "").split("->")
    l0, l1 = ins.split(",")
    if not (len(l0) == len(l1) >= 1 and l0[:-1] == l1[:-1] and out == l0 + l1[-1] and len(set(out)) == len(out)):
        raise NoMatch(f"{what}: {node.args[0]} is not the outer product of two vectors")
    return tuple(_plain(x) for x in node.args[1])


def _gated(node, what: str):
    """(gate, x) of mul(gate, x) where x is the term's tensor (either order; the gate is an exp or
    an unsqueezed exp)."""
    a, b = _either(_plain(node), aten.mul, lambda x: is_op(_plain(x), aten.exp, aten.unsqueeze), what)
    return _plain(a), _plain(b)


def _ungate(node, dim: int | None, what: str):
    """The exp that ``node`` is, or unsqueezes along ``dim``."""
    if dim is not None:
        if not is_op(node, aten.unsqueeze) or _dim(node, 1) != dim:
            raise NoMatch(f"{what} is not broadcast along axis {dim}")
        node = _plain(node.args[0])
    if not is_op(node, aten.exp):
        raise NoMatch(f"{what} is not an exp")
    return node


class _Step:
    """The pieces of one step, found from its output division (module doc)."""

    def __init__(self, div, t: int):
        self.t = t
        what = f"step {t}"
        num, den = _plain(div.args[0]), _plain(div.args[1])
        mx, self.eps = _either(den, aten.add, lambda x: isinstance(x, torch.fx.Node) and _is_max(x),
                               f"{what}: the denominator")
        if not isinstance(self.eps, (int, float)):
            raise NoMatch(f"{what}: eps is not a number (dynamic=True?)")
        ab, en = _max_operands(mx, lambda x: is_op(x, aten.abs), f"{what}: the denominator's maximum")
        if not is_op(en, aten.exp) or not is_op(en.args[0], aten.neg):
            raise NoMatch(f"{what}: the denominator's floor is not exp(-m)")
        self.m = _plain(en.args[0].args[0])
        qs, self.C = _squeezed_product(num, f"{what}: the numerator")
        qs2, nu = _squeezed_product(_plain(ab.args[0]), f"{what}: the normalizer product")
        if not _same(qs, qs2):
            raise NoMatch(f"{what}: the numerator and the normalizer read different queries")
        nu = _plain(nu)
        if not is_op(nu, aten.unsqueeze) or _dim(nu, 1) != 3:
            raise NoMatch(f"{what}: the normalizer state is not a column (unsqueezed along axis 3)")
        self.n = _plain(nu.args[0])
        q, self.scale = _either(qs, aten.mul, lambda x: isinstance(x, torch.fx.Node), f"{what}: the scaled query")
        if not isinstance(self.scale, (int, float)):
            raise NoMatch(f"{what}: the query's scale is not a number")
        self.q = _plain(q)
        # m' = max(logsigmoid(f) + m, I)
        if not _is_max(self.m):
            raise NoMatch(f"{what}: the denominator's exp(-m) does not read this step's stabilizer (a maximum "
                          "of the decayed previous one and the input gate)")
        lead, iu = _max_operands(self.m, lambda x: is_op(_plain(x), aten.add), f"{what}: the stabilizer's update")
        self.iu, lead = _plain(iu), _plain(lead)
        ls, self.m_old = _either(lead, aten.add, lambda x: is_op(_plain(x), aten.log_sigmoid),
                                 f"{what}: the stabilizer's decayed term")
        self.fu, self.m_old = _plain(_plain(ls).args[0]), _plain(self.m_old)
        self.ls = _plain(ls)
        # C' = e_f·C + e_i·(kᵀ·v), n' = e_f·n + e_i·k
        c_terms = self._terms(self.C, 3, f"{what}: the memory's update")
        n_terms = self._terms(self.n, None, f"{what}: the normalizer's update")
        (ef, self.C_old), (ei, kv) = c_terms
        (ef2, self.n_old), (ei2, k2) = n_terms
        if not (_same(ef, ef2) and _same(ei, ei2)):
            raise NoMatch(f"{what}: the memory and the normalizer are not updated with the same gates")
        self.k, self.v = _outer(kv, f"{what}: the memory's input")
        if not _same(self.k, k2):
            raise NoMatch(f"{what}: the normalizer's input is not the memory's key")
        # the gates: exp(logsigmoid(f) + m - m') and exp(I - m')
        for gate, plus, name in ((ef, self.ls, "forget"), (ei, self.iu, "input")):
            d = _plain(gate.args[0])
            if not _is_sub(d) or not _same(_plain(d.args[1]), self.m):
                raise NoMatch(f"{what}: the {name} gate is not exp(· - m')")
            if name == "input" and not _same(_plain(d.args[0]), plus):
                raise NoMatch(f"{what}: the input gate is not exp(I - m')")
            if name == "forget":
                s = _plain(d.args[0])
                try:
                    x, y = _either(s, aten.add, lambda x: _same(_plain(x), self.ls), f"{what}: the forget gate")
                except NoMatch:
                    raise NoMatch(f"{what}: the forget gate is not exp(logsigmoid(f) + m - m')") from None
                if not _same(_plain(y), self.m_old):
                    raise NoMatch(f"{what}: the forget gate does not read the previous stabilizer")

    @staticmethod
    def _terms(node, dim, what):
        """((forget exp, previous state), (input exp, input)) of e_f·S + e_i·X."""
        node = _plain(node)
        if not is_op(node, aten.add) or len(node.args) != 2 or node.kwargs:
            raise NoMatch(f"{what} is not a sum of two terms")
        terms = [_gated(x, what) for x in node.args]
        terms = [(_ungate(g, dim, what), x) for g, x in terms]
        # the input term's exp reads I - m' directly, the forget term's logsigmoid(f) + m - m'
        def reads_input(term):
            d = _plain(term[0].args[0])
            return _is_sub(d) and not is_op(_plain(d.args[0]), aten.add)
        if reads_input(terms[0]) == reads_input(terms[1]):
            raise NoMatch(f"{what}: cannot tell the decayed state from the input term")
        return (terms[1], terms[0]) if reads_input(terms[0]) else (terms[0], terms[1])


class _Loop:
    """A stack of T >= 2 steps' outputs, proven step by step (module doc)."""

    def __init__(self, stack):
        self.stack = stack
        self.outputs = list(stack.args[0])

    @staticmethod
    def candidate(node) -> bool:
        return node.target is aten.stack.default and isinstance(node.args[0], (list, tuple)) and \
            len(node.args[0]) >= 2 and all(_division(_cast(x)) for x in node.args[0])

    def match(self):
        stack, outs = self.stack, self.outputs
        dim = stack.args[1] if len(stack.args) > 1 else stack.kwargs.get("dim", 0)
        if val(stack).dtype not in (torch.float32, torch.float64):
            raise NoMatch(f"the output is {val(stack).dtype}: the unstabilized sums are lifted in fp32 and fp64 only")
        if any(_plain(x) is not _cast(x) for x in outs):
            raise NoMatch("a cast that changes the dtype (a 16-bit program, or a state dtype other than the "
                          "operands'): lifted only when every value of the step is in one dtype")
        if free_symbols(val(stack)):
            raise NoMatch("symbolic sizes (dynamic=True): the loop is unrolled for one length, and the lifted form "
                          "is built for it")
        if val(stack).dim() != 4 or dim % 4 != 2:
            raise NoMatch("the outputs are not stacked along axis 2 of (batch, head, time, value)")
        steps = [_Step(_plain(x), t) for t, x in enumerate(outs)]
        first = steps[0]
        self.scale, self.eps = first.scale, first.eps
        bases = {}
        for s in steps:
            if s.scale != self.scale or s.eps != self.eps:
                raise NoMatch(f"step {s.t}: a scale or eps other than the first step's")
            for name, node, unsq in (("q", s.q, False), ("k", s.k, False), ("v", s.v, False),
                                     ("f", s.fu, True), ("i", s.iu, True)):
                base = _position(node, s.t, f"{name}_t", unsq)
                if bases.setdefault(name, base) is not base:
                    raise NoMatch(f"step {s.t}: {name}_t is read from another tensor than step 0's")
        T = len(steps)
        if any(val(b).shape[2] != T for b in bases.values()):
            raise NoMatch(f"the {T} steps do not cover axis 2 of their inputs (a loop over part of a sequence)")
        for prev, s in zip(steps, steps[1:]):
            for name in ("C", "n", "m"):
                if getattr(s, f"{name}_old") is not getattr(prev, name):
                    raise NoMatch(f"step {s.t}: the state {name} is not the previous step's")
        self.bases, self.steps = bases, steps
        self.initial = {}
        for name in ("C", "n", "m"):
            s0 = getattr(first, f"{name}_old")
            self.initial[name] = None if fill_constant(s0) == 0.0 else s0
        B, H, _, K = val(bases["q"]).shape
        V = val(bases["v"]).shape[-1]
        if tuple(val(bases["k"]).shape) != (B, H, T, K) or tuple(val(bases["v"]).shape[:3]) != (B, H, T) or \
                tuple(val(bases["f"]).shape) != (B, H, T) or tuple(val(bases["i"]).shape) != (B, H, T):
            raise NoMatch("q, k, v and the gates do not share (batch, head, time)")
        shapes = {"C": (B, H, K, V), "n": (B, H, K), "m": (B, H, 1)}
        for name, s0 in self.initial.items():
            if tuple(val(getattr(first, f"{name}_old")).shape) != shapes[name]:
                raise NoMatch(f"the state {name} is not {shapes[name]}")
        self.sizes = (B, H, T, K, V)
        return self


class MLSTMLoopPass(Pass):
    """Lift xLSTM's mLSTM step loop (module doc) into one ssd."""

    name = "mlstm_loop"

    def run(self, ctx: PassContext) -> None:
        done = 0
        for node in list(ctx.graph.nodes):
            if node.graph is not ctx.graph or not _Loop.candidate(node):
                continue
            try:
                loop = _Loop(node).match()
            except NoMatch as e:
                ctx.report.add_near_miss("ssd", PREFIX + str(e), node)
                continue
            _rewrite(ctx, loop)
            done += 1
        if done:
            ctx.graph.eliminate_dead_code()
            ctx.gm.recompile()


def _rewrite(ctx, loop: _Loop) -> None:
    """Replace the stacked outputs (and the last step's states, where read) by the lifted form."""
    graph, stack, last = ctx.graph, loop.stack, loop.steps[-1]
    finals = {name: getattr(last, name) for name in ("C", "n", "m")}
    order = {n: i for i, n in enumerate(graph.nodes)}
    # the states are read after the loop through their casts: replace what reads them outside the steps
    readers = [u for x in finals.values() for u in x.users]
    before = min([stack, *readers], key=order.__getitem__)
    b = loop.bases
    h, values = emit_lifted(ctx, before, stack, q=b["q"], k=b["k"], v=b["v"], i_gate=b["i"],
                            loga=None, forget=b["f"], scale=loop.scale, eps=loop.eps,
                            initial=loop.initial, sizes=loop.sizes, finals=True)
    replace_with(graph, before, stack, h)
    for name, x in finals.items():
        replace_with(graph, before, x, values[name])
    graph.eliminate_dead_code()

