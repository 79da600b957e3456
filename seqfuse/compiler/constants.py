"""Module buffers read as constants, under a run-time value guard.

A mask a model keeps as a module buffer (nanoGPT's ``self.bias = tril(ones(N, N))``, read as
``bias[:, :, :T, :T] == 0``) reaches the backend as a graph input: Dynamo lifts buffers to inputs
and guards only on their shapes and dtypes, never on their values.  Read as an input, such a mask
is an arbitrary keep tensor and its causal structure is lost (no ``mask=causal``, no skipped tiles).

Here a small, floating- or bool-valued buffer that needs no gradient is a *guardable constant*:
the pipeline snapshots its value when compiling (:func:`buffer_constants`, :func:`attach`), a
recognizer may read it as a constant (:mod:`seqfuse.passes.constants`), and every constant read
for a rewrite becomes a *value guard* of the graph (:func:`guards_of`).
:func:`guarded` wraps the compiled graph: each call checks that the guarded inputs still hold the
snapshot (a cheap identity / version check when the same buffer comes back unchanged, a full
comparison otherwise) and, when one does not, runs the graph compiled without seqfuse's
rewrites instead (compiled on first need, counted in the report's "paths not taken").
"""
from __future__ import annotations

import warnings

import torch
import torch.fx

from seqfuse import log
from seqfuse.passes.constants import CONSTANTS, GUARDS, SNAPSHOTS

#: the largest buffer read as a constant (elements): a 2048 x 2048 mask
MAX_ELEMENTS = 1 << 22


def _source_name(node: torch.fx.Node) -> str:
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", None)
    if callable(name):
        name = name()
    return name if isinstance(name, str) else ""


def is_module_buffer(node: torch.fx.Node) -> bool:
    """Whether Dynamo lifted placeholder ``node`` from a module buffer (``..._buffers['name']``)."""
    return "._buffers[" in _source_name(node)


def buffer_constants(gm: torch.fx.GraphModule, example_inputs) -> dict[int, torch.Tensor]:
    """Position in the input list -> the example input, for each input of Dynamo's graph ``gm``
    that is a module buffer, needs no gradient and has at most ``MAX_ELEMENTS`` elements (copied
    only when a recognizer reads it)."""
    out = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for index, (node, x) in enumerate(zip(placeholders, example_inputs)):
        if not is_module_buffer(node) or not isinstance(x, torch.Tensor) or x.requires_grad:
            continue
        if x.layout != torch.strided or x.numel() > MAX_ELEMENTS or x.device.type == "meta" or \
                isinstance(x, torch._subclasses.FakeTensor) or type(x) is not torch.Tensor:
            continue
        out[index] = x
    return out


def attach(gm: torch.fx.GraphModule, snapshots: dict[int, torch.Tensor]) -> None:
    """Give the placeholders of ``gm`` (the re-traced graph, inputs in the same order) their values."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    gm.meta[CONSTANTS] = {placeholders[i]: x for i, x in snapshots.items() if i < len(placeholders)}
    gm.meta[GUARDS] = set()
    gm.meta[SNAPSHOTS] = {}


def guards_of(gm: torch.fx.GraphModule) -> list[tuple[int, str, torch.Tensor]]:
    """(input position, name, snapshot) of each constant the rewrites of ``gm`` rest on."""
    used = gm.meta.get(GUARDS) or set()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    snapshots = gm.meta.get(SNAPSHOTS) or {}
    return [(k, n.name, snapshots[n]) for k, n in enumerate(placeholders) if n in used and n in snapshots]


def _same(x, snapshot: torch.Tensor) -> bool:
    return isinstance(x, torch.Tensor) and x.shape == snapshot.shape and x.dtype == snapshot.dtype and \
        bool(torch.equal(x.detach(), snapshot.to(x.device)))


def _version(x: torch.Tensor):
    try:
        return x._version
    except RuntimeError:        # an inference tensor has no version counter: compare every call
        return None


def guarded(compiled, guards: list, fallback):
    """Wrap ``compiled`` so that it runs only while every guarded input equals its snapshot.

    ``guards``: (input position, name, snapshot) from :func:`guards_of`; ``fallback(args)`` compiles
    the graph without seqfuse's rewrites for inputs like ``args`` (called once, on the first call
    whose values differ, with that call's inputs: the compile-time inputs are not kept alive).
    The last input seen equal is remembered with its version counter and data pointer, so a
    buffer that comes back unchanged costs no comparison (and no device synchronization)."""
    from seqfuse.runtime.counters import count_fallback
    seen: dict[int, tuple] = {}
    state: dict = {"fallback": None, "warned": False}

    def still_equal(args) -> str | None:
        for index, name, snapshot in guards:
            x = args[index]
            last = seen.get(index)
            if last is not None and last[0] is x and isinstance(x, torch.Tensor):
                version = _version(x)
                if version is not None and version == last[1] and x.data_ptr() == last[2]:
                    continue
            if not _same(x, snapshot):
                return name
            seen[index] = (x, _version(x), x.data_ptr())
        return None

    def run(*args):  # Dynamo calls a backend's result with positional inputs
        changed = still_equal(args)
        if changed is None:
            return compiled(*args)
        reason = (f"value guard: input {changed} (a module buffer read as a constant) differs from its value "
                  "at compile time; ran the graph without seqfuse's rewrites")
        count_fallback("graph", reason)
        if not state["warned"]:
            state["warned"] = True
            warnings.warn(f"seqfuse: {reason}")
            log.runtime.info("%s", reason)
        if state["fallback"] is None:
            state["fallback"] = fallback(list(args))
        return state["fallback"](*args)

    return run
