"""RWKV-4's stabilized WKV loop -> the linear recurrence it computes, for ``loops`` to lift.

transformers' ``rwkv_linear_attention_cpu`` carries (num, den, M) through its time loop, with
w' = -exp(time_decay), u = time_first and keys k_t, values v_t::

    mo = max(M, k + u);  out_t = (e^{M-mo}·num + e^{k+u-mo}·v) / (e^{M-mo}·den + e^{k+u-mo})
    ms = max(M + w', k); num, den, M = e^{M+w'-ms}·num + e^{k-ms}·v, e^{M+w'-ms}·den + e^{k-ms}, ms

M is a running maximum (not linear), but with N = num·e^M and D = den·e^M every e^{-max} cancels::

    out_t = (N + e^{u+k_t}·v_t) / (D + e^{u+k_t}),    N' = e^{w'}·N + e^{k_t}·v_t,   D' = e^{w'}·D + e^{k_t}

from N = D = 0 (num = den = 0, M a constant below every k + u: transformers' -1e38), or from a
given state (num0, den0, M0) — ``use_cache=True``, where the model passes its state buffers —
as N = num0·e^{M0}, D = den0·e^{M0}.
``unstabilize`` matches every step of that dataflow exactly (subexpressions written twice
included) and rebuilds the steps in N and D, in fp64; the loops pass then lifts them to two
scans.  (In fp32 the linear form's backward cancels terms of size e^k: with one dominant key, -21
to 17 over 16 steps, time_decay's gradient came out 7.1e-5 off where eager's is 9.4e-7; in fp64
it is 6.5e-9.  The Triton scan kernels take no fp64: on a GPU these scans run the reference.)  The unstabilized form exponentiates k and u on their own, so it reads them (and v)
through ``seqfuse::within``: a call whose |k| or |u| exceeds ``LOG_BOUND`` or |v| exceeds
``VALUE_BOUND`` (or holds a NaN) runs the program as written (there e^{±(k+u)} or the sums could
overflow or underflow where the program's do not); a given state is read the same way (M0 at most
``LOG_BOUND``, num0 and den0 within ``STATE_BOUND``), and must be fp32 or wider.

A final state read after the loop (``return_state=True``) is rebuilt from the linear form:
M_T = max(M0 + T·w', max_j (k_j + (T-1-j)·w')), the closed form of the program's chain of maxima
M' = max(M + w', k) as one reduction over the stacked keys (it rounds each term once where the chain
rounds every addition, so it is at least as close to the exact maximum; the returned triple is
scaled consistently), and num_T = N_T·e^{-M_T}, den_T = D_T·e^{-M_T}.  It needs one w' for every step
and keys that are consecutive slices of one tensor.  Anything else — a larger start of the
maximum, a state read outside the loop before its last step (the stabilized loop would run beside
the linear form), another order of operations — is left alone, with a near miss once the first
step matched; so is a loop of fewer than ``MIN_STEPS`` steps, which the loops pass would not lift.
"""
from __future__ import annotations

import math

import torch
import torch.fx

from seqfuse.passes.pattern import copy_meta, emit_before, fill_constant, is_op, same_expr, val

aten = torch.ops.aten
#: |k|, |u| at most this: e^{±2·30} stays inside fp32 with a margin of e^{28} for the sums
LOG_BOUND = 30.0
#: |v| at most this: T·|v|·e^{60} stays below fp32's largest value for T up to ~2.5e5
VALUE_BOUND = 1e6
#: loops of fewer steps stay as written: the loops pass does not re-roll them, and their steps left in the
#: linear form would only change the rounding (fuzz seed 3501: a 5-step loop with keys from -29 to 20
#: gave time_first's gradient 2.1e-5 off, where the program's is 8e-8)
MIN_STEPS = 6
#: |num0|, |den0| of a given state at most this: num0·e^{M0} <= 1e12·e^{30} ~ 1e25, far inside fp32
#: (a state the loop itself produced holds |num| <= den·max|v| and den <= the number of steps)
STATE_BOUND = 1e12


class _NoMatch(Exception):
    pass


def _users(node, target, pos=None):
    return [u for u in node.users if is_op(u, target) and (pos is None or (len(u.args) > pos and u.args[pos] is node))]


def _one(nodes, what):
    if len(nodes) != 1:
        raise _NoMatch(what)
    return nodes[0]


def _operands(node, target):
    """(a, b) of a binary ``target`` node (raises when it is not one)."""
    if not is_op(node, target) or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        raise _NoMatch(f"{node.name} is not {target}")
    return node.args


def _weighted(e_state, e_in, state, value):
    """The node e_state·state + e_in·value (value None: + e_in) among the users of e_state·state."""
    m = _one([u for u in _users(e_state, aten.mul) if state in u.args and e_state in u.args], "no e·state")
    out = _one(_users(m, aten.add), "no sum")
    a, b = _operands(out, aten.add)
    other = b if a is m else a
    if value is None:
        if other is not e_in:
            raise _NoMatch("the denominator is not e·den + e")
    else:
        x, y = _operands(other, aten.mul)
        if not ({x, y} == {e_in, value} or (x is e_in and same_expr(y, value)) or (y is e_in and same_expr(x, value))):
            raise _NoMatch("the numerator is not e·num + e·v")
    return out


def _step(M, num, den):
    """Match one step reading (M, num, den); returns its nodes and (num', den', M') or raises."""
    cands = [u for u in _users(M, aten.maximum, 0) if is_op(u.args[1], aten.add)]
    for mo in cands:
        try:
            kpu = mo.args[1]
            k, u = _operands(kpu, aten.add)
            e1 = _one([x for x in _users(mo, aten.sub, 1) if x.args[0] is M], "no M - mo")
            e1 = _one(_users(e1, aten.exp), "no exp(M - mo)")
            e2 = _one([x for x in _users(mo, aten.sub, 1) if x.args[0] is not M and same_expr(x.args[0], kpu)],
                      "no k + u - mo")
            e2 = _one(_users(e2, aten.exp), "no exp(k + u - mo)")
            v = None
            for m in _users(e2, aten.mul):
                v = m.args[1] if m.args[0] is e2 else m.args[0]
            if v is None:
                raise _NoMatch("no e·v")
            numer = _weighted(e1, e2, num, v)
            denom = _weighted(e1, e2, den, None)
            out = _one([x for x in _users(numer, aten.div, 0) if x.args[1] is denom and x.target is aten.div.Tensor
                        and not x.kwargs], "no numerator / denominator")
            # the update: ms = max(M + w', k)
            ms = None
            for add in _users(M, aten.add, 0):
                for x in _users(add, aten.maximum, 0):
                    if x.args[1] is k and len(add.args) == 2 and add.kwargs.get("alpha", 1) == 1:
                        ms, w = x, add.args[1]
            if ms is None:              # the last step: its update, dead code, was dropped
                return dict(k=k, u=u, v=v, w=None, out=out), (None, None, None)
            f1 = [x for x in _users(ms, aten.sub, 1) if is_op(x.args[0], aten.add) and x.args[0].args[0] is M
                  and len(x.args[0].args) == 2 and x.args[0].kwargs.get("alpha", 1) == 1
                  and same_expr(x.args[0].args[1], w)]
            f1 = _one(_users(_one(f1, "no M + w - ms"), aten.exp), "no exp(M + w - ms)")
            f2 = _one(_users(_one([x for x in _users(ms, aten.sub, 1) if x.args[0] is k], "no k - ms"), aten.exp),
                      "no exp(k - ms)")
            num2 = _weighted(f1, f2, num, v) if any(num in x.args for x in _users(f1, aten.mul)) else None
            den2 = _weighted(f1, f2, den, None) if any(den in x.args for x in _users(f1, aten.mul)) else None
            return dict(k=k, u=u, v=v, w=w, out=out), (num2, den2, ms)
        except _NoMatch:
            continue
    raise _NoMatch("no step")


def _chain_base(node):
    """(base, [ops from base to node]) through select / to / unsqueeze chains on the first argument."""
    chain = []
    while is_op(node, aten.select, aten.to, aten._to_copy, aten.unsqueeze, aten.view, aten.reshape):
        chain.append(node)
        node = node.args[0]
    return node, list(reversed(chain))


def _replay(graph, before, chain, base):
    """The ops of ``chain`` applied to ``base`` instead of their own base."""
    x = base
    for n in chain:
        x = emit_before(graph, before, n.target, (x, *n.args[1:]), n)
    return x


def _guarded(graph, before, node, lo, hi, cache, whole: bool = True):
    """``node`` read through seqfuse::within(·, lo, hi): once per base tensor of a select / cast chain and
    bound (two operands sliced from one tensor with different bounds get a guard each); with
    ``whole`` False, ``node`` itself (a given state's slice of a buffer that holds other layers'
    states: only its own values are the loop's)."""
    base, chain = _chain_base(node)
    if any(n.kwargs for n in chain) or not whole:
        base, chain = node, []
    if (base, lo, hi) not in cache:
        cache[base, lo, hi] = emit_before(graph, before, torch.ops.seqfuse.within.default, (base, lo, hi), node)
    guard = cache[base, lo, hi]
    return _replay(graph, before, chain, guard) if chain else guard


def _rewrite(graph, steps, n0, d0, m0, given: bool, final=None) -> None:
    """Each step's output from (N, D), carried from (n0, d0) = 0, or, when ``given``, from the given
    state (n0·e^{m0}, d0·e^{m0}) (see the module doc), computed in fp64: the bounds hold
    e^{±2·LOG_BOUND} inside fp32's range already, not fp16's (an fp16 program's stabilized arithmetic
    never exponentiates a key on its own), and fp64 keeps the backward's cancellations of terms of
    size e^k exact enough (module doc); each output is cast back to the program's dtype.  ``final``:
    (num', den', M', keys) of the last step when its state is read after the loop: M' becomes
    ``_closed_max`` and num', den' become N·e^{-M'}, D·e^{-M'}."""
    guards: dict = {}
    decays: dict = {}           # w' -> e^{w'} (one per distinct node; a loop-invariant w' is one)

    def wide(x, before):
        if not val(x).is_floating_point() or val(x).dtype == torch.float64:
            return x
        return emit_before(graph, before, aten.to.dtype, (x, torch.float64), before)
    N, D = n0, d0
    if given:
        first = steps[0]["out"]
        scale = emit_before(graph, first, aten.exp.default,
                            (_guarded(graph, first, m0, -math.inf, LOG_BOUND, guards, whole=False),), first)
        N, D = (emit_before(graph, first, aten.mul.Tensor,
                            (wide(_guarded(graph, first, x, -STATE_BOUND, STATE_BOUND, guards, whole=False), first),
                             scale), first)
                for x in (n0, d0))
    for s in steps:
        out = s["out"]

        def emit(target, *args):
            return emit_before(graph, out, target, args, out)
        if s["w"] is not None and s["w"] not in decays:
            # w' = -exp(time_decay) <= 0 in the program; a positive or NaN w' would grow N, D where the
            # stabilized loop does not: read through the guard too
            decays[s["w"]] = emit(aten.exp.default, wide(_guarded(graph, out, s["w"], -math.inf, 0.0, guards), out))
        ew = decays.get(s["w"])
        k = wide(_guarded(graph, out, s["k"], -LOG_BOUND, LOG_BOUND, guards), out)
        u = wide(_guarded(graph, out, s["u"], -LOG_BOUND, LOG_BOUND, guards), out)
        v = wide(_guarded(graph, out, s["v"], -VALUE_BOUND, VALUE_BOUND, guards), out)
        ek = emit(aten.exp.default, k)
        eku = emit(aten.exp.default, emit(aten.add.Tensor, k, u))
        y = emit(aten.div.Tensor, emit(aten.add.Tensor, N, emit(aten.mul.Tensor, eku, v)),
                 emit(aten.add.Tensor, D, eku))
        if val(y).dtype != val(out).dtype:
            y = emit(aten.to.dtype, y, val(out).dtype)
        out.replace_all_uses_with(y)
        if ew is None:
            break                       # the last step: no update
        N = emit(aten.add.Tensor, emit(aten.mul.Tensor, ew, N), emit(aten.mul.Tensor, ek, v))
        D = emit(aten.add.Tensor, emit(aten.mul.Tensor, ew, D), ek)
    if final is not None:
        num, den, ms, keys = final
        order = {n: i for i, n in enumerate(graph.nodes)}
        after = max((num, den, ms), key=order.__getitem__).next
        m_end = _closed_max(graph, after, m0, steps[0]["w"], keys, ms)
        inv = emit_before(graph, after, aten.exp.default,
                          (emit_before(graph, after, aten.neg.default, (wide(m_end, after),), ms),), ms)
        for old, lin in ((num, N), (den, D)):
            x = emit_before(graph, after, aten.mul.Tensor, (lin, inv), old)
            if val(x).dtype != val(old).dtype:
                x = emit_before(graph, after, aten.to.dtype, (x, val(old).dtype), old)
            old.replace_all_uses_with(x)
        # (the last step's own uses of M', before m_end, die with its num' and den')
        order = {n: i for i, n in enumerate(graph.nodes)}      # (renumbered: nodes were inserted)
        ms.replace_all_uses_with(m_end, delete_user_cb=lambda u: order[u] > order[m_end])


def _stacked_keys(steps):
    """(base, dim, first index, ops after the select) when step j's key is ``select(base, dim, i0 + j)``
    followed by the same casts in every step; else None."""
    found = []
    for s in steps:
        base, chain = _chain_base(s["k"])
        if not chain or not is_op(chain[0], aten.select) or chain[0].args[0] is not base or \
                any(n.kwargs for n in chain):
            return None
        if not all(is_op(n, aten.to, aten._to_copy) for n in chain[1:]):
            return None                     # (casts only: a reshape of the stacked keys is not the same)
        d, i = chain[0].args[1], chain[0].args[2]
        found.append((base, d, i, [(n.target, tuple(n.args[1:])) for n in chain[1:]], chain[1:]))
    base, d, i0, ops, rest = found[0]
    if not isinstance(i0, int) or not isinstance(d, int) or i0 < 0:
        return None
    for j, (b, dj, ij, oj, _) in enumerate(found):
        if b is not base or dj != d or ij != i0 + j or oj != ops:
            return None
    return base, d, i0, rest


def _closed_max(graph, before, m0, w, keys, like):
    """M_T = max(M0 + T·w', max_j (k_j + (T-1-j)·w')) over the T steps' keys (``keys``: _stacked_keys),
    the value the program's chain M' = max(M + w', k) reaches, as one reduction over the time axis.
    It rounds each k_j + (T-1-j)·w' once where the chain rounds every addition: it is at least as
    close to the exact maximum.  (T-1-j)·w' is 0 at j = T-1 even for w' = -inf (a reset)."""
    base, d, i0, rest, T = keys

    def emit(target, *args):
        return emit_before(graph, before, target, args, like)
    k = emit(aten.slice.Tensor, base, d, i0, i0 + T)
    for n in rest:                          # the steps' casts, applied to the stacked keys
        k = emit(n.target, k, *n.args[1:])
    dtype = val(like).dtype
    if val(k).dtype != dtype:
        k = emit(aten.to.dtype, k, dtype)
    nd = val(k).dim()
    d = d % (nd + 1) if d < 0 else d
    shape = [1] * nd
    shape[d] = T
    with graph.inserting_before(before):       # T-1-j: the steps from key j to the end
        lag = graph.call_function(aten.arange.start_step, (T - 1, -1, -1),
                                  {"dtype": dtype, "device": val(k).device})
    with val(k).fake_mode:
        lag.meta["val"] = torch.empty(T, dtype=dtype, device=val(k).device)
    copy_meta(lag, like)
    lag = emit(aten.view.default, lag, shape)
    wt = emit(aten.unsqueeze.default, w, d) if val(w).dim() == nd - 1 else w
    decayed = emit(aten.where.self, emit(aten.eq.Scalar, lag, 0), k, emit(aten.add.Tensor, k, emit(aten.mul.Tensor, lag, wt)))
    latest = emit(aten.amax.default, decayed, [d])
    start = emit(aten.add.Tensor, m0, emit(aten.mul.Tensor, w, float(T)))
    return emit(aten.maximum.default, start, latest)


def _starts_below_every_step(c: float, dtype) -> bool:
    """Whether a running maximum starting at ``c`` (rounded to ``dtype``: -1e38 is -inf in fp16) lies
    below every k + u and k + w' the guards let through, so the first step takes its maximum from
    the key and its e^{k-max} is exactly 1.  From a larger start the program's first e^{k+u-M}
    can underflow (0 / 0: NaN) where the linear form's N = D = 0 gives v."""
    c = torch.tensor(c, dtype=dtype).item()
    return not math.isnan(c) and c <= -2 * LOG_BOUND


def _first_step(m0, given: bool = False):
    """(num0, den0) of a loop starting at the constant M = ``m0`` from num = den = 0, or, when
    ``given``, at a given state (num0, den0, m0) of any values; None if no step reads them."""
    mo = _one([u for u in _users(m0, aten.maximum, 0) if is_op(u.args[1], aten.add)], "no first step")
    e1 = _one(_users(_one([x for x in _users(mo, aten.sub, 1) if x.args[0] is m0], "no M - mo"), aten.exp), "no exp")
    states = [x.args[1] if x.args[0] is e1 else x.args[0] for x in _users(e1, aten.mul)]
    if given:
        pairs = [(a, b) for a in states for b in states if a is not b and isinstance(a, torch.fx.Node)
                 and isinstance(b, torch.fx.Node)]
    else:
        zeros = [s for s in states if fill_constant(s) == 0.0]
        pairs = [tuple(zeros), tuple(zeros[::-1])] if len(zeros) == 2 else []
    for num, den in pairs:
        try:
            _step(m0, num, den)
            return num, den
        except _NoMatch:
            continue
    return None


def _given_start(m0) -> bool:
    """Whether ``m0`` may start a loop from a given state: a floating tensor of fp32 or wider (the
    program's exponents are then computed in fp32 at least) that no step's maximum produced."""
    v = val(m0)
    return isinstance(v, torch.Tensor) and v.dtype in (torch.float32, torch.float64) and \
        not is_op(m0, aten.maximum)


def _still_read(graph, replaced: set, states: list) -> bool:
    """Whether one of the stabilized loop's ``states`` (num, den and the maximum after each step)
    stays live once every node of ``replaced`` has lost its uses: is reached from an output or a
    side effect without passing through ``replaced``.  Then the stabilized loop would still run
    beside the linear form."""
    live, stack = set(), [n for n in graph.nodes if n.op == "output" or (n.op == "call_function" and n.is_impure())]
    while stack:
        n = stack.pop()
        if n in live or n in replaced:
            continue
        live.add(n)
        stack.extend(n.all_input_nodes)
    return any(x in live for x in states)


def unstabilize(ctx) -> int:
    """Rewrite the outputs of every stabilized WKV loop of ``ctx.graph`` (see the module doc) in the
    linear form, from zeros or from a given state, and its final state when it is read after the
    loop; returns how many loops.  A loop whose state is read outside it before its last step keeps
    its stabilized form, with a near miss: that state would need the stabilized loop anyway
    (``_still_read``)."""
    gm, graph = ctx.gm, ctx.graph
    done = 0
    for m0 in list(graph.nodes):
        if m0.graph is not graph or m0.op not in ("call_function", "placeholder") or \
                not _users(m0, aten.maximum, 0):
            continue
        c = fill_constant(m0)
        given = c is None
        if given and not _given_start(m0):
            continue
        if not given and (not val(m0).is_floating_point() or not _starts_below_every_step(c, val(m0).dtype)):
            continue
        steps = []
        try:
            start = _first_step(m0, given)
            if start is None:
                continue
            M, (num, den) = m0, start
            while True:
                nodes, (num2, den2, ms) = _step(M, num, den)
                steps.append(dict(nodes, states=(num2, den2, ms)))
                if num2 is None or den2 is None or not _users(ms, aten.maximum, 0):
                    break
                M, num, den = ms, num2, den2
        except _NoMatch:
            if not steps:
                continue
        order = {n: i for i, n in enumerate(graph.nodes)}
        steps = steps[:next((i for i, s in enumerate(steps) if s["w"] is not None and (
            not isinstance(s["w"], torch.fx.Node) or order[s["w"]] > order[s["out"]])), len(steps))]
        # (a w' that is a number, or is computed inside the step, ends the rewritten steps there)
        if len(steps) < MIN_STEPS:
            continue
        # the last step's state may be read after the loop (a returned state): it is rebuilt from the
        # linear form; any earlier state read outside the loop leaves the loop as written
        outs = {s["out"] for s in steps}
        final = steps[-1]["states"] if steps[-1]["w"] is not None else None
        if final is not None and not any(x is not None and _still_read(graph, outs, [x]) for x in final):
            final = None
        inner = [x for s in steps for x in s["states"] if x is not None and (final is None or x not in final)]
        if _still_read(graph, outs | set(final or ()), inner):
            ctx.report.add_near_miss("scan", "RWKV-4's stabilized WKV loop: its state (num, den, max) is read "
                                     "outside the loop before its last step: the stabilized loop would run "
                                     "beside its linear form, so it is left as written", steps[0]["out"])
            continue
        if final is not None:
            keys = _stacked_keys(steps)
            if keys is None or len({s["w"] for s in steps}) != 1 or None in final:
                ctx.report.add_near_miss("scan", "RWKV-4's stabilized WKV loop: its final state is returned, and "
                                         "its keys are not consecutive slices of one tensor, or its steps decay "
                                         "by different w' (the final maximum has no closed form)", steps[0]["out"])
                continue
            final = (*final, (*keys, len(steps)))
        _rewrite(graph, steps, *start, m0, given, final=final)
        done += 1
    if done:
        graph.eliminate_dead_code()
        gm.recompile()
    return done
