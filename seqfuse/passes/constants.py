"""Guardable constants: module buffers a recognizer may read by value.

The compiler (:mod:`seqfuse.compiler.constants`) gives the placeholders of the graph that are small
module buffers needing no gradient a snapshot of their value (``gm.meta[CONSTANTS]``).  A recognizer
that reads one by value (through ``pattern.is_shape_only(node, constants=True)`` and
``evaluate_shape_only``) records the read; the compiler turns the reads into run-time value guards,
so the rewrite runs only while the buffers still hold the values it was built on.  A recognizer
that evaluates a constant for a candidate it may still reject does so inside
:func:`tentative_reads` and :func:`commit` the reads once the rewrite is certain.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.fx

#: GraphModule.meta keys: placeholder node -> snapshot; the placeholders read as constants
CONSTANTS = "seqfuse_constants"
GUARDS = "seqfuse_guards"
SNAPSHOTS = "seqfuse_snapshots"
_SCOPES = "seqfuse_guard_scopes"


def snapshot_of(node: torch.fx.Node) -> torch.Tensor | None:
    """The compile-time value of a guardable constant placeholder (the example input itself:
    read it through :func:`read_constant`), or None."""
    if node.op != "placeholder":
        return None
    gm = node.graph.owning_module
    consts = gm.meta.get(CONSTANTS) if gm is not None else None
    return consts.get(node) if consts else None


def read_constant(node: torch.fx.Node) -> torch.Tensor:
    """The value of a guardable constant placeholder for an evaluation (a copy), recording the read:
    in the innermost :func:`tentative_reads` scope, else as a guard of the graph."""
    x = snapshot_of(node)
    if x is None:
        raise ValueError(f"{node.name} is not a guardable constant")
    meta = node.graph.owning_module.meta
    _reads(meta).add(node)
    snapshots = meta.setdefault(SNAPSHOTS, {})
    if node not in snapshots:       # copied on the first read: the value the guard will compare with
        snapshots[node] = x.detach().clone()
    return snapshots[node].clone()


@contextmanager
def tentative_reads(gm: torch.fx.GraphModule):
    """Collect the constants read inside the block into the yielded set instead of the graph's
    guards: the caller passes it to :func:`commit` once the rewrite that rests on them is certain."""
    scopes = gm.meta.setdefault(_SCOPES, [])
    reads: set = set()
    scopes.append(reads)
    try:
        yield reads
    finally:
        scopes.pop()


def commit(gm: torch.fx.GraphModule, reads) -> None:
    """Make constants read in a :func:`tentative_reads` block guards of the graph."""
    _reads(gm.meta).update(reads)


def _reads(meta: dict) -> set:
    """Where a read goes now: the innermost :func:`tentative_reads` scope, else the graph's guards."""
    scopes = meta.get(_SCOPES)
    return scopes[-1] if scopes else meta.setdefault(GUARDS, set())
