"""Lower IR nodes of a canonical graph to calls of the seqfuse custom ops."""
from __future__ import annotations

import operator

import torch
import torch.fx

from seqfuse.ir.ops import SSD, Attention, Delta, IROp, LongConv, Scan, ir_marker, ir_of
from seqfuse.lowering import attention_op, delta_op, long_conv_op, scan_op, ssd_op  # noqa: F401  (register the custom ops)


def _lower_attention(graph: torch.fx.Graph, node: torch.fx.Node, op: Attention, runtime: str) -> torch.fx.Node:
    # a distinct nonce per dropout call keeps CSE from merging two calls into one mask
    nonce = sum(1 for n in graph.nodes if n.target is torch.ops.seqfuse.attention.default) if op.dropout else 0
    args = (op.q, op.k, op.v, op.bias, op.keep, op.scale, op.mask, op.diag, op.window, float(op.fill),
            op.bias_after_mask, op.gqa_groups, op.softcap, float(op.dropout), op.empty_rows, nonce, runtime)
    tail = [op.sink, op.bias_mask, op.out_transposed]   # optional arguments: trailing defaults omitted
    while tail and (tail[-1] is None or tail[-1] is False):
        tail.pop()
    args = (*args, *tail)
    with graph.inserting_before(node):
        call = graph.call_function(torch.ops.seqfuse.attention.default, args)
        out = graph.call_function(operator.getitem, (call, 0))
    call.meta.update(node.meta)
    out.meta.update({k: v for k, v in node.meta.items() if k != "seqfuse_ir"})
    return out


def _lower_long_conv(graph: torch.fx.Graph, node: torch.fx.Node, op: LongConv, runtime: str) -> torch.fx.Node:
    args = (op.u, op.k, op.d, op.gate, op.bias, op.causal, op.fft_size, float(op.scale), op.activation, op.algorithm, runtime)
    with graph.inserting_before(node):
        call = graph.call_function(torch.ops.seqfuse.long_conv.default, args)
    call.meta.update({k: v for k, v in node.meta.items() if k != "seqfuse_ir"})
    return call


#: the algorithm an op still at "auto" runs (only when passes/select was turned off): the one
#: that is never slow to the point of uselessness at any length
_UNSELECTED = {"ssd": "chunked", "scan": "recurrent", "delta": "chunked"}


def _algorithm(op: IROp) -> str:
    return _UNSELECTED[op.kind] if op.algorithm == "auto" else op.algorithm


def _lower_pair(graph: torch.fx.Graph, node: torch.fx.Node, target, args) -> torch.fx.Node:
    """An op whose value is the pair (y, h): its users are getitem(node, 0|1) and keep working
    on the custom op's tuple."""
    with graph.inserting_before(node):
        call = graph.call_function(target, args)
    call.meta.update({k: v for k, v in node.meta.items() if k != "seqfuse_ir"})
    return call


def _lower_ssd(graph: torch.fx.Graph, node: torch.fx.Node, op: SSD, runtime: str) -> torch.fx.Node:
    args = (op.x, op.b, op.c, op.a, op.d, op.h0, op.decay, int(op.chunk), _algorithm(op), runtime)
    if op.finite_only:
        args = (*args, True)
    return _lower_pair(graph, node, torch.ops.seqfuse.ssd.default, args)


def _lower_scan(graph: torch.fx.Graph, node: torch.fx.Node, op: Scan, runtime: str) -> torch.fx.Node:
    args = (op.a, op.b, op.c, op.h0, bool(op.reverse), _algorithm(op), runtime)
    if op.dt is not None or op.u is not None or op.readout_dtype is not None:
        args = (*args, op.dt, op.u, op.readout_dtype)
    return _lower_pair(graph, node, torch.ops.seqfuse.scan.default, args)


def _lower_delta(graph: torch.fx.Graph, node: torch.fx.Node, op: Delta, runtime: str) -> torch.fx.Node:
    args = (op.q, op.k, op.v, op.beta, op.g, op.h0, op.gate, float(op.scale), int(op.chunk), _algorithm(op), runtime)
    tail = [bool(op.finite_only), op.p, op.e, op.read]   # optional arguments: trailing defaults omitted
    while tail and tail[-1] in (None, False, "decayed"):
        tail.pop()
    return _lower_pair(graph, node, torch.ops.seqfuse.delta.default, (*args, *tail))


_LOWERINGS = {Attention: _lower_attention, LongConv: _lower_long_conv, SSD: _lower_ssd, Scan: _lower_scan,
              Delta: _lower_delta}


def lower_graph(gm: torch.fx.GraphModule, runtime: str = "auto") -> int:
    """Replace every IR node in ``gm`` by its custom-op call; returns how many were lowered."""
    graph, n = gm.graph, 0
    for node in list(graph.nodes):
        op: IROp | None = ir_of(node)
        if op is None or node.op != "call_function" or node.target is not ir_marker:
            continue
        lowering = _LOWERINGS.get(type(op))
        if lowering is None:
            raise NotImplementedError(f"seqfuse: no lowering for IR op {op.kind!r} yet")
        new = lowering(graph, node, op, runtime)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        n += 1
    gm.recompile()
    return n

