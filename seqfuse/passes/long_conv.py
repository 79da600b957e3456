"""Long-convolution recognizer: FFT convolutions and causal depthwise conv1d -> seqfuse.long_conv.

Forms (the canonical graph keeps the ATen FFT ops as they are):

- ``irfft(rfft(u, n=N) · rfft(k, n=N), n=N)[..., :L]``  # FFT⁻¹(FFT(u)·FFT(k)) = u ⊛ k
  and ``ifft(fft(u, n=N) · fft(k, n=N)).real[..., :L]``, with scalar scalings on
  either spectrum or the output and any ``norm=``: the product of all factors is
  folded into one constant ``scale`` (it must not depend on sizes).
  N ≥ L + Lk - 1 makes it the causal (linear) convolution; a smaller N (≥ L) a
  circular one.
- ``conv1d(u, w, groups=C, padding=K-1)[..., :L]`` or ``conv1d(pad(u, (K-1, 0)), w, groups=C)``
  on depthwise weights (C, 1, K)                       # Σ_s w[K-1-s]·u[t-s] = u ⊛ flip(w)
- epilogues folded into the op while each step has a single user, in this order:
  a constant scale, the skip ``+ u·d``, ``silu``, the gate ``· g``, and casts.

Kernels computed inside the graph (implicit filters, S4D's Vandermonde kernel) stay in
the graph and feed the op's ``k`` operand.
"""
from __future__ import annotations

import sympy
import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from seqfuse.ir.ops import LongConv
from seqfuse.passes.pattern import CASTS, arg, constant_value, copy_meta, depends_on, fake_of, is_op, is_scalar, \
    only_user, rank, val
from seqfuse.passes.registry import Pass, PassContext

aten = torch.ops.aten


class NoMatch(Exception):
    """Raised inside the matcher with the reason a candidate is not a long convolution."""


def _expr(x):
    """A scalar as a sympy expression (numbers, SymInt/SymFloat values, or nodes holding them)."""
    v = val(x) if isinstance(x, torch.fx.Node) else x
    if isinstance(v, (torch.SymInt, torch.SymFloat)):
        return v.node.expr
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        c = constant_value(x)
        if c is None:
            raise NoMatch("a scaling factor that is neither a constant nor a size")
        v = c
    return sympy.Integer(v) if isinstance(v, int) else sympy.Float(v)


def _norm_factor(norm, n, inverse: bool):
    """The factor a transform multiplies by, relative to the unnormalized DFT."""
    if norm in (None, "backward"):
        return 1 / n if inverse else sympy.Integer(1)
    if norm == "forward":
        return sympy.Integer(1) if inverse else 1 / n
    if norm == "ortho":
        return 1 / sympy.sqrt(n)
    raise NoMatch(f"unknown FFT norm {norm!r}")


def _strip_scalars(node, gm, factors: list):
    """Follow scalar multiplications/divisions back to their tensor operand."""
    while is_op(node, aten.mul, aten.div):
        a, b = node.args[0], node.args[1]
        if is_scalar(b, gm) and isinstance(a, torch.fx.Node):
            factors.append(1 / _expr(b) if is_op(node, aten.div) else _expr(b))
            node = a
        elif is_op(node, aten.mul) and is_scalar(a, gm) and isinstance(b, torch.fx.Node):
            factors.append(_expr(a))
            node = b
        else:
            break
    return node


def _padded_signal(x):
    """(signal, FFT size) of a forward FFT's input without an explicit n: ``pad(u, (0, P))`` with zeros is
    u transformed at size L + P; anything else is itself at its own length."""
    if is_op(x, aten.constant_pad_nd, aten.pad) and len(x.args[1]) == 2 and statically_known_true(fake_of(x.args[1][0]) == 0) \
            and (not is_op(x, aten.pad) or arg(x, 2, "mode", "constant") == "constant") \
            and constant_value(arg(x, 3 if is_op(x, aten.pad) else 2, "value", 0) or 0) == 0:
        return x.args[0], val(x).shape[-1]
    return x, val(x).shape[-1]


def _strip_casts(node):
    while is_op(node, *CASTS):
        node = node.args[0]
    return node


def _last_dim(dim, node) -> bool:
    return dim is not None and dim % rank(node) == rank(node) - 1


class LongConvPass(Pass):
    """Find FFT convolutions and causal depthwise conv1d and lift them to ``seqfuse.long_conv``."""

    name = "long_conv"
    #: depthwise conv1d kernels shorter than this stay ordinary convolutions
    min_direct_kernel: int = 2

    def run(self, ctx: PassContext) -> None:
        for node in list(ctx.graph.nodes):
            if node.graph is not ctx.graph or not node.users:
                continue
            try:
                if is_op(node, aten.fft_irfft):
                    self._fft(ctx, node, node, real_form=False)
                elif is_op(node, aten.real) and is_op(node.args[0], aten.fft_ifft):
                    self._fft(ctx, node.args[0], node, real_form=True)
                elif is_op(node, aten.conv1d):
                    self._conv1d(ctx, node)
            except NoMatch as e:
                ctx.report.add_near_miss("long_conv", str(e), node)
        ctx.graph.eliminate_dead_code()
        ctx.gm.recompile()

    # irfft(rfft(u)·rfft(k)) -> long_conv
    def _fft(self, ctx: PassContext, inv: torch.fx.Node, result: torch.fx.Node, real_form: bool) -> None:
        gm = ctx.gm
        fwd_op = aten.fft_fft if real_form else aten.fft_rfft
        spec = inv.args[0]
        n, dim, norm = arg(inv, 1, "n"), arg(inv, 2, "dim", -1), arg(inv, 3, "norm")
        if not _last_dim(dim, inv):
            raise NoMatch("the inverse FFT is not over the last axis")
        factors: list = []
        prod = _strip_scalars(spec, gm, factors)
        if prod.target is not aten.mul.Tensor:
            raise NoMatch("the inverse FFT input is not a product of two spectra")
        ffts = []
        for s in prod.args:
            if not isinstance(s, torch.fx.Node):
                raise NoMatch("the inverse FFT input is not a product of two spectra")
            f = _strip_scalars(s, gm, factors)
            if not is_op(f, fwd_op):
                raise NoMatch(f"a factor of the spectrum product is not an {fwd_op.__name__} of a signal")
            if not _last_dim(arg(f, 2, "dim", -1), f):
                raise NoMatch("a forward FFT is not over the last axis")
            ffts.append(f)
        sizes, signals = [], []
        for f in ffts:      # rfft(pad(x, (0, P))) is rfft(x, n=L+P); rfft(x) is rfft(x, n=L)
            x, size = (f.args[0], arg(f, 1, "n")) if arg(f, 1, "n") is not None else _padded_signal(f.args[0])
            signals.append(x)
            sizes.append(size)
        if n is None:
            n = sizes[0] if real_form else 2 * (val(spec).shape[-1] - 1)
            if isinstance(n, torch.SymInt):     # the size the first forward FFT ran at, read off its input
                if sympy.simplify(_expr(n) - _expr(sizes[0])) != 0:
                    raise NoMatch("the forward and inverse FFT sizes differ")
                if isinstance(sizes[0], torch.fx.Node):
                    n = sizes[0]
                else:
                    with ctx.graph.inserting_before(inv):
                        n = ctx.graph.call_function(aten.sym_size.int, (ffts[0].args[0], -1))
                    n.meta["val"] = val(ffts[0].args[0]).shape[-1]
        n_expr = _expr(n)
        if any(sympy.simplify(_expr(s) - n_expr) != 0 for s in sizes):
            raise NoMatch("the forward and inverse FFT sizes differ")
        # which signal is u: the one whose leading axes are the output's (the kernel may broadcast)
        (x0, x1) = signals
        lead = lambda x: tuple(val(x).shape[:-1])  # noqa: E731
        try:
            out_lead = torch.broadcast_shapes(lead(x0), lead(x1))
        except RuntimeError:
            raise NoMatch("the signals' leading axes do not broadcast")
        if len(lead(x0)) == len(out_lead) and all(statically_known_true(a == b) for a, b in zip(lead(x0), out_lead)):
            (u, fu), (k, fk) = (x0, ffts[0]), (x1, ffts[1])
        else:
            (u, fu), (k, fk) = (x1, ffts[1]), (x0, ffts[0])
        if not (val(u).is_floating_point() and val(k).is_floating_point()):
            raise NoMatch("the convolved signals are not real")
        # scalings of the inverse FFT's output before the slice
        y = result
        while True:
            user = only_user(y)
            if not is_op(user, aten.mul, aten.div):
                break
            other = user.args[1] if user.args[0] is y else user.args[0]
            if not is_scalar(other, gm) or (is_op(user, aten.div) and user.args[0] is not y):
                break
            factors.append(1 / _expr(other) if is_op(user, aten.div) else _expr(other))
            y = user
        # scale = every factor relative to the unnormalized convolution FFT⁻¹(FFT(u)·FFT(k))
        total = sympy.Integer(1)
        for f in factors:
            total *= f
        total *= _norm_factor(arg(fu, 3, "norm"), n_expr, False) * _norm_factor(arg(fk, 3, "norm"), n_expr, False)
        total *= _norm_factor(norm, n_expr, True) * n_expr
        total = sympy.simplify(total)
        if not total.is_number:
            raise NoMatch(f"the normalization {total} depends on the sequence length")
        length, lk = val(u).shape[-1], val(k).shape[-1]
        n_val = val(n) if isinstance(n, torch.fx.Node) else n   # the FFT size as an int or SymInt
        if not statically_known_true(n_val >= length):
            raise NoMatch("the FFT size is smaller than the signal (the FFT truncates it)")
        # the output: all N samples (circular, N = L) or the first L
        sl = only_user(y)
        if sl is not None and is_op(sl, aten.slice) and sl.target is aten.slice.Tensor and \
                sl.args[1] % rank(sl) == rank(sl) - 1 and arg(sl, 2, "start", 0) in (0, None) and \
                arg(sl, 4, "step", 1) == 1 and statically_known_true(val(sl).shape[-1] == length):
            y = sl
        elif not statically_known_true(val(y).shape[-1] == length):
            raise NoMatch("the convolution output is not sliced to the signal length")
        kl = lk if statically_known_true(lk <= n_val) else n_val   # rfft(k, n) keeps at most n taps
        causal = bool(statically_known_true(n_val >= length + kl - 1))
        op = LongConv(u=u, k=k, causal=causal, fft_size=n if isinstance(n, (int, torch.fx.Node)) else int(n),
                      scale=float(total), algorithm="auto")
        self._finish(ctx, op, y, result)

    # conv1d(u, w, groups=C) with causal padding -> long_conv
    def _conv1d(self, ctx: PassContext, conv: torch.fx.Node) -> None:
        x, w, bias = conv.args[0], conv.args[1], arg(conv, 2, "bias")
        stride, padding, dilation, groups = (arg(conv, 3, "stride", [1]), arg(conv, 4, "padding", [0]),
                                             arg(conv, 5, "dilation", [1]), arg(conv, 6, "groups", 1))
        if rank(x) != 3 or rank(w) != 3 or isinstance(padding, str):
            return
        c, one, kk = val(w).shape
        groups = fake_of(groups)
        if not (isinstance(one, int) and one == 1) or not isinstance(groups, (int, torch.SymInt)) \
                or not statically_known_true(val(x).shape[1] == groups) or list(stride) != [1] or list(dilation) != [1]:
            return  # not a depthwise causal-able conv: an ordinary convolution
        if isinstance(kk, int) and kk < self.min_direct_kernel:
            return  # a short kernel: an ordinary convolution
        if not statically_known_true(kk >= self.min_direct_kernel):
            raise NoMatch("a depthwise conv1d whose kernel length is symbolic and not provably 2 or more")
        pad = fake_of(list(padding)[0])
        y, u = conv, x
        if statically_known_true(pad == kk - 1):
            sl = only_user(conv)
            if not (sl is not None and sl.target is aten.slice.Tensor and sl.args[1] % 3 == 2 and
                    arg(sl, 2, "start", 0) in (0, None) and arg(sl, 4, "step", 1) == 1 and
                    statically_known_true(val(sl).shape[-1] == val(x).shape[-1])):
                raise NoMatch("a depthwise conv1d padded on both sides and not sliced back to causal")
            y = sl
        elif statically_known_true(pad == 0) and is_op(x, aten.constant_pad_nd, aten.pad) and len(x.args[1]) == 2 \
                and statically_known_true(fake_of(x.args[1][0]) == kk - 1) and statically_known_true(fake_of(x.args[1][1]) == 0) \
                and \
                constant_value(arg(x, 3 if is_op(x, aten.pad) else 2, "value", 0) or 0) == 0:
            u = x.args[0]
        else:
            raise NoMatch(f"a depthwise conv1d whose padding is not provably causal (the kernel has length {kk}; "
                          f"causal needs {kk - 1} zeros on the left only, at every size)")
        graph = ctx.graph
        with graph.inserting_before(conv):
            k2 = graph.call_function(aten.squeeze.dim, (w, 1))
            k = graph.call_function(aten.flip.default, (k2, [-1]))
        k2.meta["val"] = val(w).squeeze(1)
        k.meta["val"] = val(k2).flip(-1)
        copy_meta(k2, conv), copy_meta(k, conv)
        op = LongConv(u=u, k=k, causal=True, fft_size=0, algorithm="auto")
        if bias is not None:  # conv1d's per-channel bias: + b[c] on every step
            with graph.inserting_before(conv):
                op.bias = graph.call_function(aten.unsqueeze.default, (bias, -1))
            op.bias.meta["val"] = val(bias).unsqueeze(-1)
            copy_meta(op.bias, conv)
        self._finish(ctx, op, y, conv)

    def _finish(self, ctx: PassContext, op: LongConv, y: torch.fx.Node, anchor: torch.fx.Node) -> None:
        """Fold the epilogue into ``op`` and replace the last folded node by the op's result."""
        gm, graph = ctx.gm, ctx.graph
        stage, last = 0, y                   # stages: 0 scale, 1 skip, 2 activation, 3 gate
        base_u = _strip_casts(op.u)
        while True:
            user = only_user(last)
            if user is None:
                break
            if is_op(user, *CASTS):
                last = user
                continue
            if is_op(user, aten.mul, aten.div) and stage == 0:
                other = user.args[1] if user.args[0] is last else user.args[0]
                c = constant_value(other, gm)
                if c is not None and (is_op(user, aten.mul) or user.args[0] is last):
                    op.scale *= (1.0 / c) if is_op(user, aten.div) else float(c)
                    last = user
                    continue
            if user.target is aten.add.Tensor and stage == 0 and arg(user, 2, "alpha", 1) == 1:
                other = user.args[1] if user.args[0] is last else user.args[0]
                if is_op(other, aten.mul) and other.target is aten.mul.Tensor:
                    a, b = other.args
                    if isinstance(a, torch.fx.Node) and _strip_casts(a) is base_u and not depends_on(b, [last]):
                        op.d, stage, last = b, 1, user
                        continue
                    if isinstance(b, torch.fx.Node) and _strip_casts(b) is base_u and not depends_on(a, [last]):
                        op.d, stage, last = a, 1, user
                        continue
            if is_op(user, aten.silu) and stage <= 1:
                op.activation, stage, last = "silu", 2, user
                continue
            if user.target is aten.mul.Tensor and stage <= 2:
                other = user.args[1] if user.args[0] is last else user.args[0]
                if isinstance(other, torch.fx.Node) and isinstance(val(other), torch.Tensor) and \
                        val(other).dim() > 0 and not depends_on(other, [last]):
                    op.gate, stage, last = other, 3, user
                    continue
            break
        ir = ctx.insert_ir(op, last, anchor)
        ir.meta["val"] = _fake_out(op)
        out = ir
        if val(out).dtype != val(last).dtype:
            with graph.inserting_before(last):
                out = graph.call_function(aten.to.dtype, (out, val(last).dtype))
            out.meta["val"] = val(out.args[0]).to(val(last).dtype)
        last.replace_all_uses_with(out)


def _fake_out(op: LongConv):
    u, k = val(op.u), val(op.k)
    dtype = torch.promote_types(u.dtype, k.dtype)
    shape = torch.broadcast_shapes(u.shape, (*k.shape[:-1], u.shape[-1]))
    for x in (op.d, op.gate, op.bias):
        if x is not None:
            dtype = torch.promote_types(dtype, val(x).dtype)
            shape = torch.broadcast_shapes(shape, val(x).shape)
    return u.new_empty(shape, dtype=dtype)

