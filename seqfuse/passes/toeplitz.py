"""Toeplitz matrix products: ``T·u`` with T built from a kernel k by data movement -> long_conv.

    # y_i = Σ_j T[i, j]·u_j,  T[i, j] = k[i − j] (0 <= i − j < Lk) else 0   ->   y = (u ⊛ k)[:L]

Programs spell T many ways: ``k[:, idx.clamp(min=0)] * (idx >= 0)`` with ``idx = i − j`` from
aranges, ``pad(k, (L−1, 0)).unfold(−1, L, 1).flip(−1)``, ``as_strided``, a ``tril`` of a
gathered matrix.  Rather than one pattern per spelling, the pass proves T by evaluation:

1. walk back from the contraction's T operand through *data-movement* ops only (index with
   constant indices, pad / where / masked_fill with zero, products with constants, views,
   unfold, flip, roll, slices, cat, tril / triu, as_strided) to the one tensor they move, k;
   every other input on the way must be a constant of the graph (sizes, aranges, masks);
2. each entry of such a T is one entry of k times a constant (or 0), so T is the Toeplitz
   matrix of k for every k if it is for two probes k = p1, p2 of distinct random fp64 values
   (w·p[m] = p[m'] for both probes only when m = m' and w = 1): evaluate T on both;
3. the contraction sums T's last axis j against u's time axis and T's axis i is the output's
   time axis; T's other axes are k's leading axes (per-channel kernels), found in u and the
   output.

Static shapes only (the probes are evaluated at the example sizes); anything else is a near
miss with its reason.  Runs after long_conv, so FFT and conv1d spellings are found there first.
"""
from __future__ import annotations

import torch
import torch.fx

from seqfuse.ir.ops import LongConv
from seqfuse.passes.pattern import ancestors, concrete_sym, emit_before, is_op, val
from seqfuse.passes.registry import Pass, PassContext

aten = torch.ops.aten

#: ops that only move or zero the entries of their first tensor argument (the others are constants)
_MOVES = {
    aten.index.Tensor, aten.index_select.default, aten.gather.default, aten.pad.default,
    aten.constant_pad_nd.default, aten.unfold.default, aten.flip.default, aten.roll.default,
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.squeeze.default, aten.expand.default, aten.slice.Tensor, aten.select.int, aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten.tril.default, aten.triu.default, aten.as_strided.default,
    aten.narrow.default, aten.movedim.int, aten.cat.default, aten.stack.default, aten.mul.Tensor,
    aten.where.self, aten.where.ScalarOther, aten.masked_fill.Scalar, aten.masked_fill.Tensor,
    aten._to_copy.default, aten.to.dtype,
}


#: the data-movement ops that can lay a kernel out along two axes (a lag structure); a matrix
#: moved out of a lower-rank tensor without one (an unsqueeze + expand) is no Toeplitz candidate
_STRUCTURE = {aten.index.Tensor, aten.index_select.default, aten.gather.default, aten.unfold.default,
              aten.as_strided.default}


class _NotToeplitz(Exception):
    pass


def _is_constant(node: torch.fx.Node, placeholders_are_inputs=True) -> bool:
    """Whether ``node``'s value follows from sizes and graph constants alone."""
    for n in [node, *ancestors(node)]:
        if n.op == "placeholder" and isinstance(val(n), torch.Tensor):
            return False
        if n.op not in ("placeholder", "get_attr", "call_function"):
            return False
        if is_op(n, aten.rand, aten.randn, aten.randint, aten.bernoulli, aten.dropout, aten.empty,
                 aten.empty_like, aten.rand_like, aten.randn_like, aten.normal):
            return False
    return True


def _source(T: torch.fx.Node) -> tuple[torch.fx.Node, set]:
    """(k, the data-movement nodes from k to T); raises _NotToeplitz with the reason."""
    path, sources, stack = set(), set(), [T]
    while stack:
        n = stack.pop()
        if n in path:
            continue
        if n.op != "call_function" or n.target not in _MOVES:
            sources.add(n)
            continue
        tensors = [a for a in n.all_input_nodes if isinstance(val(a), torch.Tensor)]
        moving = [a for a in tensors if not _is_constant(a)]
        if n.target in (aten.cat.default, aten.stack.default):
            pass  # every piece is moved
        elif len(moving) > 1:
            raise _NotToeplitz(f"{n.target} combines two inputs")
        if n.target is aten.mul.Tensor and len(moving) != 1:
            raise _NotToeplitz("a product of two non-constant factors")
        if n.target in (aten.where.self,):
            if _is_constant(n.args[1]) or not _is_constant(n.args[0]) or not (
                    isinstance(n.args[2], (int, float)) and n.args[2] == 0 or
                    isinstance(n.args[2], torch.fx.Node) and _is_constant(n.args[2])):
                raise _NotToeplitz("a where that is not a constant selection of the moved tensor")
        if n.target is aten.where.ScalarOther and n.args[2] != 0:
            raise _NotToeplitz(f"a where with fill {n.args[2]}")
        if n.target in (aten.masked_fill.Scalar,) and n.args[2] != 0:
            raise _NotToeplitz(f"a masked_fill with {n.args[2]}")
        if n.target in (aten.pad.default,) and len(n.args) > 2 and n.args[2] not in ("constant",):
            raise _NotToeplitz(f"a {n.args[2]} pad")
        if n.target in (aten.pad.default, aten.constant_pad_nd.default):
            value = n.kwargs.get("value", n.args[3] if len(n.args) > 3 else 0)
            if value not in (None, 0, 0.0):
                raise _NotToeplitz(f"a pad with value {value}")
        if n.target in (aten._to_copy.default, aten.to.dtype) and val(n).dtype != val(n.all_input_nodes[0]).dtype:
            raise _NotToeplitz("a dtype conversion of the kernel")
        path.add(n)
        stack.extend(moving)
    if len(sources) != 1:
        raise _NotToeplitz(f"{len(sources)} tensors feed the matrix" if sources else "no kernel tensor")
    (k,) = sources
    if _is_constant(k):
        raise _NotToeplitz("the matrix is a constant of the graph")
    return k, path


def _evaluate(gm: torch.fx.GraphModule, T: torch.fx.Node, k: torch.fx.Node, probe: torch.Tensor) -> torch.Tensor:
    """T's value with k = ``probe`` (constants evaluated at the example sizes)."""
    env: dict = {k: probe}

    def conc(x):
        if isinstance(x, torch.fx.Node):
            return env[x]
        if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return concrete_sym(x)
        if isinstance(x, (list, tuple)):
            return type(x)(conc(e) for e in x)
        return x

    needed = ancestors(T) | {T}
    for n in gm.graph.nodes:
        if n not in needed or n in env:
            continue
        if n.op == "placeholder":
            env[n] = conc(val(n))
        elif n.op == "get_attr":
            env[n] = getattr(gm, n.target)
        else:
            args = conc(n.args)
            kwargs = {key: conc(v) for key, v in n.kwargs.items()}
            if n.target in (aten._to_copy.default, aten.to.dtype):
                env[n] = args[0]  # same dtype (checked): keep the probe in fp64
                continue
            env[n] = n.target(*args, **kwargs)
    return env[T]


def _toeplitz(p: torch.Tensor, L: int) -> torch.Tensor:
    """(…, L, L) with [..., i, j] = p[..., i − j] for 0 <= i − j < p.shape[-1], else 0."""
    i = torch.arange(L)
    lag = i[:, None] - i[None, :]
    ok = (lag >= 0) & (lag < p.shape[-1])
    return torch.where(ok, p[..., lag.clamp(0, max(p.shape[-1] - 1, 0))], torch.zeros((), dtype=p.dtype))


def _static(node) -> bool:
    v = val(node)
    return isinstance(v, torch.Tensor) and not any(isinstance(s, torch.SymInt) for s in v.shape)


class ToeplitzPass(Pass):
    """``einsum(T, u)`` whose T is the (causal) Toeplitz matrix of a kernel k -> long_conv(u, k)."""

    name = "toeplitz"

    def run(self, ctx: PassContext) -> None:
        for node in list(ctx.graph.nodes):
            if node.target is not aten.einsum.default or len(node.args[1]) != 2:
                continue
            self._try(ctx, node)

    def _try(self, ctx: PassContext, node: torch.fx.Node) -> None:
        eq = node.args[0]
        ins, out = eq.split("->")
        letters = ins.split(",")
        for t_pos in (0, 1):
            T, u = node.args[1][t_pos], node.args[1][1 - t_pos]
            lt, lu = letters[t_pos], letters[1 - t_pos]
            if len(lt) < 2 or not isinstance(val(T), torch.Tensor):
                continue
            i, j = lt[-2], lt[-1]
            # j summed against u's time axis, i the output's time axis, the other axes shared
            if not (j in lu and j not in out and i in out and i not in lu):
                continue
            if set(lu) - {j} != set(out) - {i} or len(set(lt)) != len(lt) or len(set(lu)) != len(lu):
                continue
            batch_t = lt[:-2]
            if not set(batch_t) <= set(out):
                continue
            try:
                k, path = _source(T)
            except _NotToeplitz:
                continue  # not built from a kernel by data movement: an ordinary matrix product
            if val(k).dim() >= val(T).dim() or not any(n.target in _STRUCTURE for n in path):
                continue  # a view or broadcast of a tensor, not a kernel laid out by lag: an ordinary product
            if any(isinstance(s, int) and s == 1 for s in val(T).shape[-2:]):
                continue  # a 1 x 1 (or 1-wide) matrix: nothing to convolve
            self._rewrite(ctx, node, T, u, k, lt, lu, out, i, j, batch_t)
            return

    def _rewrite(self, ctx, node, T, u, k, lt, lu, out, i, j, batch_t) -> None:
        vt, vu, vk = val(T), val(u), val(k)
        if not all(_static(x) for x in (T, u, k, node)):
            ctx.report.add_near_miss("long_conv", "a Toeplitz product with symbolic sizes (its matrix is "
                                     "proven by evaluation at fixed sizes)", node)
            return
        L = vu.shape[lu.index(j)]
        if vt.shape[-1] != L or vt.shape[-2] != L:
            ctx.report.add_near_miss("long_conv", f"a Toeplitz-built matrix of shape {tuple(vt.shape)} applied to "
                                     f"a sequence of length {L} (only square, causal products)", node)
            return
        if not (vt.dtype == vu.dtype == vk.dtype == val(node).dtype) or not vk.is_floating_point():
            ctx.report.add_near_miss("long_conv", "a Toeplitz product mixing dtypes", node)
            return
        if vk.dim() - 1 != len(batch_t) or any(vk.shape[a] not in (1, vt.shape[a]) for a in range(len(batch_t))):
            ctx.report.add_near_miss("long_conv", f"the matrix's leading axes {tuple(vt.shape[:-2])} are not its "
                                     f"kernel's {tuple(vk.shape[:-1])}", node)
            return
        # 2. two probes of distinct random values: T(p) must be Toep(p), to the last bit
        gen = torch.Generator().manual_seed(0)
        for _ in range(2):
            probe = torch.rand(vk.shape, generator=gen, dtype=torch.float64) + 1.0
            try:
                got = _evaluate(ctx.gm, T, k, probe)
            except Exception as exc:  # noqa: BLE001 - a subgraph that does not evaluate is not proven
                ctx.report.add_near_miss("long_conv", f"a matrix built from {k.name} that could not be evaluated "
                                         f"({type(exc).__name__}: {exc})", node)
                return
            want = _toeplitz(probe, L).expand(got.shape) if got.dim() >= 2 else None
            if want is None or got.shape != vt.shape or not torch.equal(got, want):
                ctx.report.add_near_miss("long_conv", f"a matrix built from {k.name} by data movement that is not "
                                         "its causal Toeplitz matrix (T[i, j] = k[i - j] for j <= i, else 0)", node)
                return
        # 3. y = long_conv(u', k') with time last: u' in the output's order with i -> j, k' broadcast
        order = [c for c in out if c != i] + [i]
        graph = ctx.graph
        u_perm = [lu.index(c if c != i else j) for c in order]
        u_in = u if u_perm == list(range(len(lu))) else emit_before(graph, node, aten.permute.default,
                                                                   (u, u_perm), node)
        k_shape = [vk.shape[batch_t.index(c)] if c in batch_t else 1 for c in order[:-1]] + [vk.shape[-1]]
        kt = k
        pos = [batch_t.index(c) for c in order[:-1] if c in batch_t]
        if pos != sorted(pos):  # the kernel's leading axes in the output's order
            kt = emit_before(graph, node, aten.permute.default, (k, [*pos, vk.dim() - 1]), node)
        if list(val(kt).shape) != k_shape:
            kt = emit_before(graph, node, aten.reshape.default, (kt, k_shape), node)
        op = LongConv(u=u_in, k=kt, causal=True, fft_size=0, scale=1.0, activation="none", algorithm="auto")
        ir = ctx.insert_ir(op, node, node)
        ir.meta["val"] = val(u_in).new_empty(torch.broadcast_shapes(val(u_in).shape, tuple(k_shape[:-1]) + (L,)))
        result = ir
        back = [order.index(c) for c in out]
        if back != list(range(len(out))):
            result = emit_before(graph, node, aten.permute.default, (ir, back), node)
        if tuple(val(result).shape) != tuple(val(node).shape):
            raise AssertionError(f"toeplitz: rewrite shape {tuple(val(result).shape)} != {tuple(val(node).shape)}")
        node.replace_all_uses_with(result)
        graph.erase_node(node)
        graph.eliminate_dead_code()
