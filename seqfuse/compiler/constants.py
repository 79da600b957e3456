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


def inherit_constants(body: torch.fx.GraphModule, args, parent: torch.fx.GraphModule) -> None:
    """Give the placeholders of ``body`` (a subgraph ``parent`` calls with ``args``, in placeholder order)
    the constants of the ``parent`` placeholders passed to them."""
    consts = parent.meta.get(CONSTANTS) or {}
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    body.meta[CONSTANTS] = {ph: consts[a] for ph, a in zip(placeholders, args) if a in consts}
    body.meta[GUARDS] = set()
    body.meta[SNAPSHOTS] = {}


def lift_guards(body: torch.fx.GraphModule, args, parent: torch.fx.GraphModule) -> None:
    """Make the constants the rewrites of ``body`` read (see :func:`inherit_constants`) guards of
    ``parent``, with the snapshots they were read from."""
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    snapshots = body.meta.get(SNAPSHOTS) or {}
    for ph, a in zip(placeholders, args):
        if ph in (body.meta.get(GUARDS) or ()):
            parent.meta.setdefault(GUARDS, set()).add(a)
            parent.meta.setdefault(SNAPSHOTS, {}).setdefault(a, snapshots[ph])


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


def _unrewritten(fallback):
    """``run(args, reason)``: the graph compiled without seqfuse's rewrites (``fallback(args)``, called
    once, on the first call that needs it, with that call's inputs: the compile-time inputs are not
    kept alive), run on ``args``; each run is counted in the report's "paths not taken" under
    ``graph``, and the first one warns."""
    from seqfuse.runtime.counters import count_fallback
    state: dict = {"fallback": None, "warned": False}

    def run(args, reason: str):
        count_fallback("graph", reason)
        if not state["warned"]:
            state["warned"] = True
            warnings.warn(f"seqfuse: {reason}")
            log.runtime.info("%s", reason)
        if state["fallback"] is None:
            state["fallback"] = fallback(list(args))
        return state["fallback"](*args)

    return run


def guarded(compiled, guards: list, fallback):
    """Wrap ``compiled`` so that it runs only while every guarded input equals its snapshot.

    ``guards``: (input position, name, snapshot) from :func:`guards_of`; ``fallback(args)`` compiles
    the graph without seqfuse's rewrites for inputs like ``args`` (called once, on the first call
    whose values differ, with that call's inputs: the compile-time inputs are not kept alive).
    The last input seen equal is remembered with its version counter and data pointer, so a
    buffer that comes back unchanged costs no comparison (and no device synchronization)."""
    seen: dict[int, tuple] = {}
    unrewritten = _unrewritten(fallback)

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
        return unrewritten(args, f"value guard: input {changed} (a module buffer read as a constant) differs from "
                                 "its value at compile time; ran the graph without seqfuse's rewrites")

    return run


#: Dynamo-graph calls whose result may share its input's storage (a write into it writes the input)
_VIEWS = {"view", "view_as", "reshape", "reshape_as", "transpose", "permute", "t", "T", "mT", "unsqueeze", "squeeze",
          "expand", "expand_as", "narrow", "select", "slice", "getitem", "as_strided", "unflatten", "flatten",
          "split", "chunk", "unbind", "movedim", "swapaxes", "diagonal", "real", "imag", "detach", "contiguous",
          "__getitem__", "type_as", "to", "float", "double", "half", "bfloat16", "view_as_real", "view_as_complex"}


def _name(target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


#: Python's in-place operators and their dunders (``x += y`` on a tensor writes x)
_INPLACE_OPERATORS = {"setitem", "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul", "iand",
                      "ior", "ixor", "ilshift", "irshift"}


def _writes(node: torch.fx.Node):
    """The tensor ``node`` writes in place (its first argument), or None."""
    if node.op not in ("call_function", "call_method") or not node.args:
        return None
    schema = getattr(node.target, "_schema", None)
    name = _name(node.target)
    dunder = name[2:-2] if name.startswith("__") and name.endswith("__") else None
    if (schema is not None and schema.is_mutable) or name in _INPLACE_OPERATORS or dunder in _INPLACE_OPERATORS or \
            (name.endswith("_") and dunder is None and not name.startswith("_")):
        return node.args[0] if isinstance(node.args[0], torch.fx.Node) else None
    return None


def mutates(gm: torch.fx.GraphModule) -> bool:
    """Whether Dynamo's graph ``gm`` writes in place into one of its inputs (or a view of one:
    ``buf.add_``, ``cache[:, i] = v``): such a graph cannot be run a second time after a partial run.
    Writes into tensors the graph creates (a mask filled in place) do not count."""
    for node in gm.graph.nodes:
        x = _writes(node)
        seen = set()
        while isinstance(x, torch.fx.Node) and x not in seen:
            seen.add(x)
            if x.op == "placeholder" or x.op == "get_attr":
                return True
            if x.op in ("call_function", "call_method") and _name(x.target) in _VIEWS and x.args:
                x = x.args[0]
            else:
                break
    return False


def rerunning(compiled, cannot_rerun: str | None, fallback):
    """Wrap ``compiled`` so that a call one of its ops refuses (:class:`ProgramRequired`, raised
    before that op did any work: an ``ssd`` or ``delta`` lowered with ``finite_only``, or a user's op)
    runs the graph without seqfuse's rewrites: the program as written, its own NaNs and gradients
    included.  ``fallback(args)`` compiles the unrewritten graph (once, on first need).  When the graph cannot
    be run again as written, ``cannot_rerun`` says why (it writes its inputs in place, which it may
    have done before the refusal; it runs on one rank's slice of a sequence): such a call raises a
    RuntimeError naming the op and the cause instead."""
    from seqfuse.runtime import ProgramRequired
    unrewritten = _unrewritten(fallback)

    def run(*args):
        try:
            return compiled(*args)
        except ProgramRequired as exc:
            if cannot_rerun:
                raise RuntimeError(f"{exc}; {cannot_rerun}, so seqfuse cannot run it as written instead. Keep "
                                   "the log-decays finite, or disable the pass that found the op (seqfuse.explain "
                                   "names it; option 'passes')") from exc
            reason = f"{exc}; ran the graph without seqfuse's rewrites"
        return unrewritten(args, reason)

    return run
