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

import torch
import torch.fx

from seqfuse.passes.constants import read_constant, snapshot_of
from seqfuse.passes.pattern import copy_meta, fake_of, val

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
    """(E, keep, position axes) with ``w == where(keep, exp(r·E), 0)`` bit for bit, E an integer affine
    function of the position axes (those along which r has size 1 and w does not), keep None or a lower
    triangle over the last two position axes (as (axis_i, axis_j, k): j <= i + k); else None."""
    if w.dim() < r.dim():
        return None
    rb = r.reshape((1,) * (w.dim() - r.dim()) + tuple(r.shape))
    if any(a != 1 and a != b for a, b in zip(rb.shape, w.shape)) or bool((r == 0).any()):
        return None
    pos = [d for d in range(w.dim()) if rb.shape[d] == 1 and w.shape[d] > 1]
    if not pos or bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
        return None
    wd, rd = w.double(), rb.double().expand(w.shape)
    nz = wd > 0
    e = torch.where(nz, torch.log(torch.where(nz, wd, 1.0)) / rd, 0.0)
    idx = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in w.shape], indexing="ij")
    # fit E = β + Σ α_d·pos_d on the nonzero entries (integers, checked exactly below)
    cols = [torch.ones(int(nz.sum()), dtype=torch.float64)] + [idx[d][nz] for d in pos]
    if cols[0].numel() < len(cols):
        return None
    sol = torch.linalg.lstsq(torch.stack(cols, 1), e[nz][:, None]).solution[:, 0]
    coef = [round(float(c)) for c in sol]
    if all(c == 0 for c in coef[1:]):
        return None                                  # no position dependence: not a decay table
    E = coef[0] + sum(c * idx[d] for c, d in zip(coef[1:], pos))
    keep = None
    if not bool(nz.all()):
        if len(pos) < 2:
            return None
        a, b = pos[-2], pos[-1]
        for k in range(-w.shape[b], w.shape[a] + 1):
            tri = idx[b] <= idx[a] + k
            if torch.equal(tri, nz):
                keep = (a, b, k)
                break
        if keep is None:
            return None
    return [int(c) for c in coef], keep, pos, E


def _emit(graph, before, target, args, like):
    with graph.inserting_before(before):
        n = graph.call_function(target, args)
    copy_meta(n, like)
    fake = val(like)
    with fake.fake_mode:
        n.meta["val"] = target(*fake_of(args))
    return n


def _build(graph, before, view, rate, coef, keep, pos):
    """where(keep, exp(rate · E), 0) with the shape of ``view``, before ``before``."""
    shape = list(val(view).shape)
    rank = len(shape)
    device = val(view).device

    def position(d):
        ar = _emit(graph, before, aten.arange.default, (shape[d],), view)
        ar.kwargs = {"dtype": torch.int64, "device": device}
        with val(view).fake_mode:
            ar.meta["val"] = aten.arange.default(shape[d], dtype=torch.int64, device=device)
        return _emit(graph, before, aten.reshape.default, (ar, [shape[d] if k == d else 1 for k in range(rank)]),
                     view)

    places = {d: position(d) for d in pos}
    e = None
    for c, d in zip(coef[1:], pos):
        if c == 0:
            continue
        term = places[d] if c == 1 else _emit(graph, before, aten.mul.Tensor, (places[d], c), view)
        e = term if e is None else _emit(graph, before, aten.add.Tensor, (e, term), view)
    if coef[0] != 0:
        e = _emit(graph, before, aten.add.Tensor, (e, coef[0]), view)
    out = _emit(graph, before, aten.exp.default, (_emit(graph, before, aten.mul.Tensor, (rate, e), view),), view)
    if list(val(out).shape) != shape:
        out = _emit(graph, before, aten.expand.default, (out, shape), view)
    if keep is not None:
        a, b, k = keep
        ia, ib = places[a], places[b]
        if k:
            ia = _emit(graph, before, aten.add.Tensor, (ia, k), view)
        mask = _emit(graph, before, aten.le.Tensor, (ib, ia), view)
        out = _emit(graph, before, aten.where.ScalarOther, (mask, out, 0.0), view)
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
    rates = [n for n in consts if snapshot_of(n).numel() > 1 and not bool((snapshot_of(n) == 0).any())]
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
                coef, keep, pos, _ = fit
                if not _same_bits(coef, keep, pos, snapshot_of(rate), w):
                    continue
                read_constant(buf)          # both values are what the expression rests on: guards
                read_constant(rate)
                order = {n: k for k, n in enumerate(graph.nodes)}
                first = min(readers, key=order.__getitem__)
                new = _build(graph, first, view, rate, coef, keep, pos)
                for u in readers:
                    u.replace_input_with(view, new)
                done += 1
                break
    if done:
        graph.eliminate_dead_code()
        gm.recompile()
    return done
