"""Deterministic text form of IR ops and of whole canonical graphs.

The printed form is the spec FileCheck tests read::

    graph(%q: f32[2, 4, 16, 8], %k: f32[2, 4, 16, 8], %v: f32[2, 4, 16, 8]):
      %o = seqfuse.attention(%q, %k, %v) {scale=0.125, mask=causal, diag=0, ...} : f32[2, 4, 16, 8]
      return (%o)

Value names are the FX node names, which are stable for a given program.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx

from seqfuse.ir.ops import IROp, ir_of

_DTYPES = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.bool: "i1", torch.uint8: "u8",
    torch.complex64: "c64", torch.complex128: "c128", torch.int8: "i8", torch.int16: "i16",
}


def format_value(x) -> str:
    """One attribute or argument value in printed form."""
    if isinstance(x, torch.fx.Node):
        return f"%{x.name}"
    if x is None:
        return "none"
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, float):
        if math.isinf(x):
            return "-inf" if x < 0 else "inf"
        return repr(x)
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(format_value(e) for e in x) + "]"
    if isinstance(x, torch.dtype):
        return _DTYPES.get(x, str(x).replace("torch.", ""))
    if isinstance(x, torch.device):
        return x.type
    if isinstance(x, str):
        return x
    return str(x)


def format_type(val) -> str:
    """`f32[2, s0, 8]` for a (fake) tensor, `sym` for a symbolic scalar, '' otherwise."""
    if isinstance(val, torch.Tensor):
        dims = ", ".join(str(d) for d in val.shape)
        return f"{_DTYPES.get(val.dtype, str(val.dtype))}[{dims}]"
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return "sym"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(format_type(v) for v in val) + ")"
    return ""


def format_op(op: IROp, result: str = "out") -> str:
    """Print one IR op: `%result = seqfuse.<kind>(operands) {attrs}`."""
    required, optional = [], []
    for f in op.operand_fields():
        v = getattr(op, f.name)
        if f.metadata["optional"]:
            if v is not None:
                optional.append(f"{f.name}={format_value(v)}")
        else:
            required.append(format_value(v))
    omit = {f.name: f.default for f in dataclasses.fields(op) if f.metadata.get("omit_default")}
    attrs = [f"{k}={format_value(v)}" for k, v in op.attributes() if not (k in omit and v == omit[k])]
    attrs.append(f"algo={op.algorithm}")
    args = ", ".join(required + optional)
    return f"%{result} = seqfuse.{op.kind}({args}) {{{', '.join(attrs)}}}"


def _target_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        ns = target.namespace
        name = target._schema.name.split("::")[-1]
        overload = target._overloadname
        return f"{ns}.{name}" if overload == "default" else f"{ns}.{name}.{overload}"
    return getattr(target, "__name__", str(target))


def format_node(node: torch.fx.Node) -> str:
    """Print one graph node (IR ops in IR form, everything else as `%x = ns.op(args)`)."""
    ty = format_type(node.meta.get("val"))
    suffix = f" : {ty}" if ty else ""
    op = ir_of(node)
    if op is not None:
        return format_op(op, node.name) + suffix
    if node.op == "call_function":
        args = [format_value(a) for a in node.args]
        args += [f"{k}={format_value(v)}" for k, v in node.kwargs.items()]
        return f"%{node.name} = {_target_name(node.target)}({', '.join(args)}){suffix}"
    if node.op == "get_attr":
        return f"%{node.name} = constant[{node.target}]{suffix}"
    return f"%{node.name} = {node.op}[{node.target}]{suffix}"


def format_graph(graph: torch.fx.Graph, name: str = "graph") -> str:
    """Print a whole canonical graph deterministically."""
    params, body, ret = [], [], ""
    for node in graph.nodes:
        if node.op == "placeholder":
            ty = format_type(node.meta.get("val"))
            params.append(f"%{node.name}: {ty}" if ty else f"%{node.name}")
        elif node.op == "output":
            outs = node.args[0]
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            ret = "  return (" + ", ".join(format_value(o) for o in outs) + ")"
        else:
            body.append("  " + format_node(node))
    return "\n".join([f"{name}({', '.join(params)}):", *body, ret]) + "\n"
