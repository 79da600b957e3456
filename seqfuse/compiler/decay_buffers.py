"""Decay tables kept as module buffers, read back as the expressions that built them.

Lightning attention (MiniMax) builds its decays once, in ``__init__``, as powers of one rate per head
and keeps them as buffers: ``query_decay = exp(-s·(l + 1))``, ``key_decay = exp(-s·(B - 1 - l))``,
``diagonal_decay = exp(-s·(i - j))`` on the lower triangle, 0 above, beside the rate ``s`` itself
(``slope_rate``, also a buffer).  Dynamo lifts them as graph inputs, so a recognizer sees numbers where
the program's structure was a power of a rate.

:func:`express_decay_buffers` reads each view of such a buffer (the buffer, or a chain of ``alias`` /
static ``slice`` views of it, as ``key_decay[:, -n:]``) by value under a value guard
(:mod:`seqfuse.passes.constants`) and, when it equals, bit for bit,

    where(keep, exp(R · E), 0)

for R another guardable buffer broadcast over it (the rate), E = β + Σ_d α_d·pos_d an integer affine
function of the positions along the axes R does not vary along, and keep a lower-triangle mask of
two positions (or none), replaces the view's reads by that expression.  The recognizers then read
exp(w·(i - j)) and exp(w·(l + 1)) as they would in a program that computes its decays: the value is the
same bits, so nothing changes where no rewrite follows.  A buffer that matches no such form is left
alone; the guard makes the compiled graph fall back when a buffer or the rate changes after compiling.
"""
from __future__ import annotations

import itertools

import torch
import torch.fx

from seqfuse.passes.constants import read_constant, snapshot_of
from seqfuse.passes.pattern import copy_meta, emit_before, val

aten = torch.ops.aten

#: view ops followed from a buffer to the views the program reads
_VIEWS = (aten.alias.default, aten.slice.Tensor)


def _views(node: torch.fx.Node) -> list[torch.fx.Node]:
    """``node`` and every chain of alias / static slice views of it, in graph order."""
    out, todo = [], [node]
    while todo:
        n = todo.pop()
        out.append(n)
        for u in n.users:
            if u.target in _VIEWS and u.args[0] is n and all(isinstance(a, int) for a in u.args[1:]):
                todo.append(u)
    return out


def _value(view: torch.fx.Node, base: torch.fx.Node, snap: torch.Tensor) -> torch.Tensor:
    """The value of ``view`` (a chain of views of ``base``) computed from ``base``'s snapshot."""
    chain = []
    while view is not base:
        chain.append(view)
        view = view.args[0]
    x = snap
    for n in reversed(chain):
        x = n.target(x, *n.args[1:])
    return x


def _fit(w: torch.Tensor, r: torch.Tensor):
    """(coef, keep, position axes) for ``w == where(keep, exp(r·E), 0)``: E = coef[0] + Σ coef[1 + k]·pos_k
    an integer affine function of the position axes (those along which r has size 1 and w does not),
    keep None or a lower triangle over the last two position axes (as (axis_i, axis_j, k): j <= i + k);
    None when w is no such table.  The caller checks the bits (:func:`_same_bits`)."""
    if w.dim() < r.dim():
        return None
    rb = r.reshape((1,) * (w.dim() - r.dim()) + tuple(r.shape))
    if any(a != 1 and a != b for a, b in zip(rb.shape, w.shape)) or bool((r == 0).any()):
        return None
    pos = [d for d in range(w.dim()) if rb.shape[d] == 1 and w.shape[d] > 1]
    if not pos or bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
        return None
    keep = None
    if len(pos) >= 2:
        a, b = pos[-2], pos[-1]
        other = [d for d in range(w.dim()) if d not in (a, b)]
        seen = (w != 0).permute(*other, a, b).reshape(-1, w.shape[a], w.shape[b]).any(0)   # (T_a, T_b)
        ia, ib = torch.arange(w.shape[a])[:, None], torch.arange(w.shape[b])[None, :]
        k = int((ib - ia)[seen].max()) if bool(seen.any()) else 0     # the lowest lower triangle holding them
        if not bool((ib <= ia + k).all()):
            keep = (a, b, k)
    # a sample of entries: coefficients by a least-squares fit of log(w)/r weighted by how well the table's
    # precision resolves each logarithm (normal values only; 1 - 1e-8·k is one float for several k), then
    # the rounded coefficients and their neighbours tried on the sample's bits (_same_bits checks all)
    flat = w.reshape(-1)
    picks = torch.unique(torch.randint(0, flat.numel(), (4096,), generator=torch.Generator().manual_seed(0)))
    at = torch.stack(torch.unravel_index(picks, w.shape), 1)                    # (n, rank)
    rate = rb.expand(w.shape).reshape(-1)[picks]
    if keep is not None:
        inside = at[:, keep[1]] <= at[:, keep[0]] + keep[2]
        picks, at, rate = picks[inside], at[inside], rate[inside]
    v = flat[picks].double()
    eps = torch.finfo(w.dtype).eps
    resolved = torch.abs(1 - v) / (eps * torch.clamp(v, min=1.0))     # |log v| in units of its rounding
    good = (v >= torch.finfo(w.dtype).tiny) & torch.isfinite(v) & (resolved > 2)
    if int(good.sum()) <= len(pos):
        return None
    e = torch.log(v[good]) / rate[good].double()
    weight = torch.sqrt(torch.clamp(resolved[good], max=1e6))
    cols = torch.stack([torch.ones(int(good.sum()), dtype=torch.float64)] + [at[good][:, d].double() for d in pos], 1)
    sol = torch.linalg.lstsq(cols * weight[:, None], (e * weight)[:, None]).solution[:, 0]
    base = [round(float(c)) for c in sol]
    for delta in itertools.product((0, -1, 1), repeat=len(base)):
        coef = [c + d for c, d in zip(base, delta)]
        if all(c == 0 for c in coef[1:]):
            continue                                 # no position dependence: not a decay table
        E = coef[0] + sum(c * at[:, d] for c, d in zip(coef[1:], pos))
        if torch.equal(torch.exp(rate * E), flat[picks]):
            break
    else:
        return None
    return [int(c) for c in coef], keep, pos


def _build(graph, before, view, rate, coef, keep, pos):
    """where(keep, exp(rate · E), 0) with the shape of ``view``, before ``before`` (under the graph's fake
    mode)."""
    shape = list(val(view).shape)
    rank = len(shape)
    device = val(view).device

    def position(d):
        with graph.inserting_before(before):
            ar = graph.call_function(aten.arange.default, (shape[d],), {"dtype": torch.int64, "device": device})
        copy_meta(ar, view)
        ar.meta["val"] = aten.arange.default(shape[d], dtype=torch.int64, device=device)
        return emit_before(graph, before, aten.reshape.default, (ar, [shape[d] if k == d else 1 for k in range(rank)]),
                     view)

    places = {d: position(d) for d in pos}
    e = None
    for c, d in zip(coef[1:], pos):
        if c == 0:
            continue
        term = places[d] if c == 1 else emit_before(graph, before, aten.mul.Tensor, (places[d], c), view)
        e = term if e is None else emit_before(graph, before, aten.add.Tensor, (e, term), view)
    if coef[0] != 0:
        e = emit_before(graph, before, aten.add.Tensor, (e, coef[0]), view)
    out = emit_before(graph, before, aten.exp.default, (emit_before(graph, before, aten.mul.Tensor, (rate, e), view),), view)
    if list(val(out).shape) != shape:
        out = emit_before(graph, before, aten.expand.default, (out, shape), view)
    if keep is not None:
        a, b, k = keep
        ia, ib = places[a], places[b]
        if k:
            ia = emit_before(graph, before, aten.add.Tensor, (ia, k), view)
        mask = emit_before(graph, before, aten.le.Tensor, (ib, ia), view)
        out = emit_before(graph, before, aten.where.ScalarOther, (mask, out, 0.0), view)
    return out


def _same_bits(coef, keep, pos, rate_v, w) -> bool:
    """Whether the expression, computed as the graph will, equals ``w`` bit for bit."""
    idx = [torch.arange(n).reshape([n if k == d else 1 for k in range(w.dim())]) for d, n in enumerate(w.shape)]
    e = torch.zeros((), dtype=torch.int64)
    for c, d in zip(coef[1:], pos):
        if c:
            e = e + (idx[d] if c == 1 else idx[d] * c)
    e = e + coef[0]
    out = torch.exp(rate_v * e).expand(w.shape)
    if keep is not None:
        a, b, k = keep
        out = torch.where(idx[b] <= idx[a] + k, out, 0.0)
    return out.dtype == w.dtype and torch.equal(out, w)


def express_decay_buffers(gm: torch.fx.GraphModule) -> int:
    """Replace the reads of decay tables kept as buffers by the expressions that equal them bit for bit
    (module docstring); returns how many views were replaced."""
    graph = gm.graph
    consts = [n for n in graph.nodes if n.op == "placeholder" and snapshot_of(n) is not None
              and snapshot_of(n).is_floating_point()]
    rates = [n for n in consts if not bool((snapshot_of(n) == 0).any())]
    done = 0
    for buf in consts:
        snap = snapshot_of(buf)
        for view in _views(buf):
            readers = [u for u in view.users if not (u.target in _VIEWS and u.args[0] is view)]
            if not readers:
                continue
            w = _value(view, buf, snap)
            for rate in rates:
                if rate is buf or snapshot_of(rate).dtype != w.dtype:
                    continue
                fit = _fit(w, snapshot_of(rate))
                if fit is None:
                    continue
                coef, keep, pos = fit
                if not _same_bits(coef, keep, pos, snapshot_of(rate), w):
                    continue
                read_constant(buf)          # both values are what the expression rests on: guards
                read_constant(rate)
                order = {n: k for k, n in enumerate(graph.nodes)}
                first = min(readers, key=order.__getitem__)
                with val(view).fake_mode:       # the values of the new nodes (scalar operands included)
                    new = _build(graph, first, view, rate, coef, keep, pos)
                for u in readers:
                    u.replace_input_with(view, new)
                done += 1
                break
    if done:
        graph.eliminate_dead_code()
        gm.recompile()
    return done
