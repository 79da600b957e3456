"""Rewrite passes and their registry.

A pass is a small object with a ``name`` and its options as fields, and a
``run(ctx)`` method that rewrites ``ctx.graph`` in place (DESIGN.md §4.2).
Built-in recognizers register themselves here; users add their own with
:func:`register_pass` and turn any pass on or off with
``options={"passes": {name: bool}}``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch.fx

from seqfuse.ir.ops import IROp, graph_values, ir_marker


class ReportSink(Protocol):
    """Where a pass records what it did (the compiler's GraphReport implements this)."""

    def add_rewrite(self, kind: str, ir: str, node: torch.fx.Node | None = None, algorithm: str = "-") -> None: ...

    def add_near_miss(self, kind: str, reason: str, node: torch.fx.Node | None = None) -> None: ...


@dataclass
class PassContext:
    """What a pass sees: the canonical graph module, the graph's report, and the options."""

    gm: torch.fx.GraphModule
    report: ReportSink
    options: Any = None

    @property
    def graph(self) -> torch.fx.Graph:
        return self.gm.graph

    def insert_ir(self, op: IROp, before: torch.fx.Node, like: torch.fx.Node) -> torch.fx.Node:
        """Insert a node carrying IR ``op`` before ``before``; it takes ``like``'s value metadata
        and source location (``like`` is the node whose value the op computes)."""
        with self.graph.inserting_before(before):
            # every graph value the op reads is an argument, so dependencies and DCE see it
            values = [v for _, v in graph_values(op)]
            node = self.graph.create_node("call_function", ir_marker, tuple(values), name=op.kind)
        node.meta.update({k: v for k, v in like.meta.items() if k in ("val", "stack_trace", "nn_module_stack")})
        node.meta["seqfuse_ir"] = op
        return node


class Pass:
    """Base class of rewrite passes.  Subclasses set ``name`` and implement ``run``."""

    name: ClassVar[str] = ""
    #: whether the pass runs when ``options["passes"]`` does not name it
    enabled_by_default: ClassVar[bool] = True

    def run(self, ctx: PassContext) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


_REGISTRY: dict[str, Pass] = {}


def register_pass(p: Pass, *, replace: bool = False) -> Pass:
    """Add pass ``p`` to the registry; it then runs after the built-in recognizers, in
    registration order.  Raises ValueError if the name is taken (unless ``replace``)."""
    if isinstance(p, type):
        raise TypeError(f"register_pass expects a pass instance, got the class {p.__name__}; call it first")
    if not isinstance(p, Pass) or not p.name or not isinstance(p.name, str):
        raise TypeError(f"register_pass expects an instance of seqfuse.passes.Pass with a non-empty name, got {p!r}")
    if p.name in _REGISTRY and not replace:
        raise ValueError(f"register_pass: a pass named {p.name!r} is already registered (pass replace=True)")
    _REGISTRY[p.name] = p
    return p


def unregister_pass(name: str) -> None:
    """Remove the pass called ``name`` (KeyError if there is none)."""
    if name not in _REGISTRY:
        raise KeyError(f"unregister_pass: no pass named {name!r}; registered: {sorted(_REGISTRY)}")
    del _REGISTRY[name]


def registered_passes() -> list[Pass]:
    """All registered passes, built-in first, in run order."""
    return list(_REGISTRY.values())


def enabled_passes(selection: dict) -> list[Pass]:
    """The passes to run for ``options.passes``: {name: bool}, or {"__only__": [names]}."""
    known = set(_REGISTRY)
    named = set(selection.get("__only__", [])) if "__only__" in selection else set(selection)
    unknown = sorted(named - known)
    if unknown:
        raise ValueError(f"seqfuse: option 'passes' names unknown pass(es) {unknown}; registered: {sorted(known)}")
    if "__only__" in selection:
        return [p for p in _REGISTRY.values() if p.name in named]
    return [p for p in _REGISTRY.values() if selection.get(p.name, p.enabled_by_default)]
