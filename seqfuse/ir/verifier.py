"""Structural checks of IR ops against their operands' (fake) tensor metadata.

A recognizer that builds an op the verifier rejects has a bug: the pipeline
raises :class:`IRVerificationError` naming the op and the broken rule instead
of running a wrong program.
"""
from __future__ import annotations

import math

import torch
import torch.fx

from seqfuse.ir.ops import READOUT_DTYPES, Attention, Delta, IROp, LongConv, Scan, SSD


class IRVerificationError(ValueError):
    """An IR op whose operands or attributes break the op's contract."""


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _check(cond, op: IROp, msg: str) -> None:
    if not cond:
        raise IRVerificationError(f"seqfuse.{op.kind}: {msg}")


def _same(a, b) -> bool:
    """Static equality of two sizes; unknown (symbolic, undecided) counts as equal."""
    try:
        return bool(a == b)
    except Exception:  # data-dependent symbolic comparison
        return True


def _is_number(x) -> bool:
    """A real Python number (bools excluded), so range checks compare numbers, never raise TypeError."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _verify_attention(op: Attention) -> None:
    q, k, v = _val(op.q), _val(op.k), _val(op.v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check(isinstance(t, torch.Tensor), op, f"operand {name} has no tensor metadata")
        _check(t.dim() >= 3, op, f"operand {name} must have rank >= 3 (*batch, L, D), got {tuple(t.shape)}")
    _check(q.dim() == k.dim() == v.dim(), op, f"q, k, v ranks differ: {q.dim()}, {k.dim()}, {v.dim()}")
    _check(_same(q.shape[-1], k.shape[-1]), op, f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    _check(_same(k.shape[-2], v.shape[-2]), op, f"k and v lengths differ: {k.shape[-2]} vs {v.shape[-2]}")
    _check(q.is_floating_point(), op, f"q must be floating point, got {q.dtype}")
    _check(op.mask in ("none", "causal", "window"), op, f"mask must be none|causal|window, got {op.mask!r}")
    _check(isinstance(op.diag, int), op, f"diag must be an int, got {op.diag!r}")
    if op.mask == "window":
        _check(isinstance(op.window, int) and op.window > 0, op, f"window must be a positive int, got {op.window!r}")
    _check(isinstance(op.gqa_groups, int) and op.gqa_groups >= 1, op, f"gqa_groups must be >= 1, got {op.gqa_groups!r}")
    if op.gqa_groups > 1:
        _check(_same(q.shape[-3], k.shape[-3] * op.gqa_groups), op,
               f"gqa_groups={op.gqa_groups} but q has {q.shape[-3]} heads and k has {k.shape[-3]}")
        _check(_same(k.shape[-3], v.shape[-3]), op,
               f"gqa_groups={op.gqa_groups} but k has {k.shape[-3]} heads and v has {v.shape[-3]}")
    _check(op.scale is None or _is_number(op.scale) or isinstance(op.scale, torch.fx.Node), op,
           f"scale must be None, a number or a graph value, got {op.scale!r}")
    _check(op.empty_rows in ("nan", "zero"), op, f"empty_rows must be nan|zero, got {op.empty_rows!r}")
    _check(_is_number(op.dropout) and 0.0 <= op.dropout < 1.0, op, f"dropout must be in [0, 1), got {op.dropout!r}")
    _check(isinstance(op.fill, float) and not math.isnan(op.fill), op, f"fill must be a float, got {op.fill!r}")
    _check(op.softcap is None or (_is_number(op.softcap) and op.softcap > 0), op,
           f"softcap must be None or a positive number, got {op.softcap!r}")
    if op.bias_mask:
        _check(op.bias is not None and op.fill == -math.inf and not op.bias_after_mask, op,
               "bias_mask needs a bias, fill=-inf and no bias_after_mask (the bias is the mask)")
    if op.out_transposed:
        _check(len(_val(op.q).shape) == 4, op, "out_transposed needs a 4-D (B, H, L, D) q")
    if op.keep is not None:
        _check(_val(op.keep).dtype == torch.bool, op, f"keep mask must be bool, got {_val(op.keep).dtype}")
    if op.bias is not None:
        _check(_val(op.bias).is_floating_point(), op, f"bias must be floating point, got {_val(op.bias).dtype}")
    if op.sink is not None:
        sink = _val(op.sink)
        _check(sink.is_floating_point(), op, f"sink must be floating point, got {sink.dtype}")
        rows = tuple(q.shape[:-1])
        _check(sink.dim() <= len(rows) and all(_same(s, 1) or _same(s, r) for s, r in
                                                 zip(reversed(sink.shape), reversed(rows))), op,
               f"sink {tuple(sink.shape)} does not broadcast to the rows {rows}")


def _verify_operands_are_tensors(op: IROp) -> None:
    for name, node in op.operands():
        if node is not None:
            _check(isinstance(_val(node), torch.Tensor), op, f"operand {name} has no tensor metadata")


def _verify_scan(op: Scan) -> None:
    a, b = _val(op.a), _val(op.b)
    _check(a.dim() >= 2 and b.dim() >= 2, op, f"a and b need (…, T, N) axes, got ranks {a.dim()} and {b.dim()}")
    _check(a.shape[-2] == b.shape[-2] or a.shape[-2] == 1, op,
           f"a and b differ on the time axis (-2): {tuple(a.shape)} vs {tuple(b.shape)}")
    if op.c is not None:
        _check(_val(op.c).dim() >= 2, op, f"c needs (…, T, N) axes, got rank {_val(op.c).dim()}")
    for name, node in (("dt", op.dt), ("u", op.u)):
        if node is not None:
            t = _val(node)
            _check(t.dim() >= 2, op, f"{name} needs (…, T, N) axes, got rank {t.dim()}")
            _check(not t.is_complex(), op, f"{name} must be real, got {t.dtype}")
    if op.dt is not None:
        _check(not a.is_complex(), op, f"with dt, a holds real log-decays; got {a.dtype}")
    if op.readout_dtype is not None:
        _check(op.c is not None, op, "readout_dtype needs a readout c")
        _check(op.readout_dtype in READOUT_DTYPES, op,
               f"readout_dtype must be one of {READOUT_DTYPES}, got {op.readout_dtype!r}")
    _check(isinstance(op.reverse, bool), op, f"reverse must be a bool, got {op.reverse!r}")


def _verify_ssd(op: SSD) -> None:
    _check(op.decay in ("none", "scalar", "vector"), op, f"unknown decay kind {op.decay!r}")
    _check(isinstance(op.chunk, int) and op.chunk > 0, op, f"chunk must be a positive int, got {op.chunk!r}")
    _check(isinstance(op.finite_only, bool) and (op.a is not None or not op.finite_only), op,
           f"finite_only must be a bool, and true only with a log-decay a; got {op.finite_only!r}")
    x, b, c = _val(op.x), _val(op.b), _val(op.c)
    _check(x.dim() == 4 and b.dim() == 4 and c.dim() == 4, op,
           f"x, b, c must be (B, T, H, P|N), got ranks {x.dim()}, {b.dim()}, {c.dim()}")
    want = {"none": None, "scalar": 3, "vector": 4}[op.decay]
    got = None if op.a is None else _val(op.a).dim()
    _check(got == want, op, f"decay={op.decay} needs a of rank {want}, got {got}")
    if op.a is not None:    # the algorithms sum log-decays in real arithmetic (a complex decay is a scan's)
        _check(not _val(op.a).is_complex(), op, f"a holds real log-decays; got {_val(op.a).dtype}")


def _verify_long_conv(op: LongConv) -> None:
    u, k = _val(op.u), _val(op.k)
    _check(u.dim() >= 1 and k.dim() >= 1, op, "u and k need a sequence axis")
    _check(k.dim() <= u.dim(), op, f"k (rank {k.dim()}) has more axes than u (rank {u.dim()})")
    _check(u.is_floating_point() and k.is_floating_point(), op, f"u and k must be real floating point, got {u.dtype}, {k.dtype}")
    _check(isinstance(op.causal, bool), op, f"causal must be a bool, got {op.causal!r}")
    _check(not isinstance(op.fft_size, int) or op.fft_size >= 0, op, f"fft_size must be >= 0, got {op.fft_size!r}")
    _check(op.causal or not isinstance(op.fft_size, int) or op.fft_size > 0, op,
           "a circular convolution needs its fft_size")
    _check(op.activation in ("none", "silu"), op, f"activation must be none|silu, got {op.activation!r}")
    _check(isinstance(op.scale, float), op, f"scale must be a float, got {op.scale!r}")


def _verify_delta(op: Delta) -> None:
    _check(op.gate in ("none", "scalar", "vector"), op, f"gate must be none|scalar|vector, got {op.gate!r}")
    _check(isinstance(op.chunk, int) and op.chunk > 0, op, f"chunk must be a positive int, got {op.chunk!r}")
    _check(_is_number(op.scale) and math.isfinite(op.scale), op, f"scale must be a finite number, got {op.scale!r}")
    _check(isinstance(op.finite_only, bool) and (op.g is not None or not op.finite_only), op,
           f"finite_only must be a bool, and true only with a log-decay g; got {op.finite_only!r}")
    q, k, v, beta = _val(op.q), _val(op.k), _val(op.v), _val(op.beta)
    _check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, op,
           f"q, k, v must be (B, T, H, K|V), got ranks {q.dim()}, {k.dim()}, {v.dim()}")
    _check(all(_same(a, b) for a, b in zip(q.shape, k.shape)), op,
           f"q and k must have one shape (B, T, H, K), got {tuple(q.shape)} and {tuple(k.shape)}")
    _check(all(_same(a, b) for a, b in zip(v.shape[:3], k.shape[:3])), op,
           f"v must be (B, T, H, V) with k's (B, T, H), got {tuple(v.shape)} and {tuple(k.shape)}")
    _check(beta.dim() == 3 and all(_same(a, b) for a, b in zip(beta.shape, k.shape[:3])), op,
           f"beta must be (B, T, H), got {tuple(beta.shape)}")
    want = {"none": None, "scalar": 3, "vector": 4}[op.gate]
    got = None if op.g is None else _val(op.g).dim()
    _check(got == want, op, f"gate={op.gate} needs g of rank {want}, got {got}")
    if op.h0 is not None:
        _check(_val(op.h0).dim() == 4, op, f"h0 must be (B, H, K, V), got rank {_val(op.h0).dim()}")
    for name, node in (("p", op.p), ("e", op.e)):
        if node is not None:
            x = _val(node)
            _check(x.dim() == 4 and all(_same(a, b) for a, b in zip(x.shape, k.shape)), op,
                   f"{name} must have k's shape (B, T, H, K), got {tuple(x.shape)} and {tuple(k.shape)}")
    _check(op.read in ("decayed", "previous"), op, f"read must be decayed|previous, got {op.read!r}")
    for name, node in op.operands():
        if node is not None:
            _check(_val(node).is_floating_point(), op, f"{name} must be real floating point, got {_val(node).dtype}")


_RULES = {Attention: _verify_attention, Scan: _verify_scan, SSD: _verify_ssd, LongConv: _verify_long_conv, Delta: _verify_delta}


def verify_op(op: IROp) -> None:
    """Raise IRVerificationError if ``op`` breaks its contract; return None otherwise."""
    _verify_operands_are_tensors(op)
    _RULES[type(op)](op)


def verify_graph(graph: torch.fx.Graph) -> int:
    """Verify every IR op in ``graph``; returns how many were checked."""
    n = 0
    for node in graph.nodes:
        op = node.meta.get("seqfuse_ir")
        if op is not None:
            verify_op(op)
            n += 1
    return n
