"""Generated C kernels for CPU (the dispatcher's "cpu" path): sequential linear recurrences
(seqfuse::scan, and seqfuse::ssd's recurrent algorithm), compiled at run time with the system
C compiler, loaded with ctypes and cached on disk (build.py).  Importing this package
registers them; a call they cannot run (no compiler, complex, too large a state) is refused
by their ``supports`` with the reason, and the next path runs it.

Each kernel module builds one small library per kernel variant (the constants of its generated
C: compute dtype, forward or backward, form); :func:`graph_variants` lists the variants a
lowered graph's ops will call, so that the backend builds exactly those while the downstream
compiler runs."""
from __future__ import annotations

import torch

from seqfuse.lowering.cpu import scan, ssd

scan.register()
ssd.register()

#: custom op -> (kernel module, its operand names: the tensors ``call_variant`` reads)
_OPS = {"scan": (scan, ("a", "b", "c", "h0", "dt", "u")), "ssd": (ssd, ("x", "b", "c", "a", "d", "h0"))}


def _value(arg):
    """The example value (a fake tensor) of a graph node argument, the argument itself otherwise."""
    return arg.meta.get("val") if isinstance(arg, torch.fx.Node) else arg


def graph_variants(gm: torch.fx.GraphModule, example_inputs=()) -> dict[str, list]:
    """Kernel module name ("scan", "ssd") -> the kernel variants (each module's ``Variant``, in
    graph order, without repeats) that the seqfuse ops of the lowered graph ``gm`` (and of the
    subgraphs it calls) will call on the
    "cpu" path: the forward of each op whose runtime allows the C kernels (``auto`` or ``cpu``)
    and whose algorithm is the recurrent one, and its backward too where the graph will be
    differentiated (grad mode on and one of ``example_inputs`` requires grad: the graph's own
    example values do not say).  Read from the nodes' example values (dtypes, which operands are
    given, n strides); an op whose values are missing or refused (e.g. complex) adds nothing (its
    first call builds what it needs, or its ``supports`` refuses the call as before)."""
    backward = torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad
                                               for x in example_inputs)
    out: dict[str, list] = {name: [] for name in _OPS}
    # the graph's own nodes, then those of the subgraphs it calls (selective checkpoint bodies)
    nodes = [n for m in gm.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes]
    for node in nodes:
        if node.op != "call_function" or getattr(node.target, "namespace", None) != "seqfuse":
            continue
        name = node.target.overloadpacket.__name__  # "scan" for torch.ops.seqfuse.scan.default
        if name not in _OPS:
            continue
        module, operands = _OPS[name]
        schema = [a.name for a in node.target._schema.arguments]
        bound = {**dict(zip(schema, node.args)), **node.kwargs}
        if bound.get("runtime") not in ("auto", "cpu") or bound.get("algorithm", "recurrent") != "recurrent":
            continue
        tensors = {k: _value(bound.get(k)) for k in operands}
        given = [t for t in tensors.values() if t is not None]
        if not all(isinstance(t, torch.Tensor) for t in given) or module.check_tensors(tensors) is not None:
            continue
        attrs = {k: v for k, v in bound.items() if k not in operands}
        try:
            wanted = [module.call_variant(tensors, attrs)]
            if backward or any(t.requires_grad for t in given):
                wanted.append(module.call_variant(tensors, {**attrs, "needs": [True] * len(operands)}))
        except Exception:  # noqa: BLE001 - e.g. symbolic strides: the first call builds what it needs
            continue
        out[name] += [v for v in wanted if v not in out[name]]
    return out
