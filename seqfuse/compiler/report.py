"""What a compile found: rewrites, near misses, and the runtime paths that ran.

The backend fills one :class:`GraphReport` per captured graph; every
:class:`Report` collecting at that moment in the same context (``seqfuse.explain``
opens one) receives it.  Collection is context-local (a ``contextvars.ContextVar``):
two ``explain`` calls in two threads (or asyncio tasks) each get only their own graphs.
"""
from __future__ import annotations

import contextvars
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch.fx

from seqfuse import log
from seqfuse.ir.ops import KINDS


@dataclass(frozen=True)
class Rewrite:
    """One region replaced by an IR op (or by a user pass's op)."""

    kind: str
    ir: str
    location: str
    algorithm: str


@dataclass(frozen=True)
class NearMiss:
    """A region that looked like a mixer but was left alone, and why."""

    kind: str
    reason: str
    location: str


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def location_of(node: torch.fx.Node | None) -> str:
    """`file.py:line in function` of the user code that produced ``node`` ('?' if unknown)."""
    trace = node.meta.get("stack_trace") if node is not None else None
    if not trace:
        return "?"
    frames = _FRAME.findall(trace)
    if not frames:
        return "?"
    path, line, fn = frames[-1]
    return f"{path.rsplit('/', 1)[-1]}:{line} in {fn}"


@dataclass
class GraphReport:
    """Findings for one captured graph; passes write into it through their context."""

    graph_id: int = 0
    rewrites: list[Rewrite] = field(default_factory=list)
    near_misses: list[NearMiss] = field(default_factory=list)
    dumps: list[str] = field(default_factory=list)
    #: seconds spent in each pipeline stage (trace, each pass, select, lower), in order
    seconds: dict[str, float] = field(default_factory=dict)
    #: seconds the downstream compiler (inductor, ...) took on the rewritten graph, as the backend
    #: saw it (inductor may defer part of its work, e.g. the backward, to a later call)
    downstream_seconds: float = 0.0
    #: the inputs (module buffers) whose values the rewrites rest on: checked on every call, a changed
    #: value runs the graph without the rewrites (seqfuse.compiler.constants)
    guards: list[str] = field(default_factory=list)
    #: activation-checkpointed regions read through (seqfuse.compiler.checkpoint): in a graph with a
    #: backward their ops, the rewrites' included, are recomputed there
    checkpoint_regions: int = 0
    #: selective checkpoint regions (a policy, ``context_fn``) whose bodies were rewritten in place
    selective_regions: int = 0

    def add_rewrite(self, kind: str, ir: str, node: torch.fx.Node | None = None, algorithm: str = "-") -> None:
        """Record a rewrite of kind ``kind``, printed as ``ir``, at ``node``'s source location."""
        rewrite = Rewrite(kind, ir, location_of(node), algorithm)
        self.rewrites.append(rewrite)
        log.passes.info("rewrote %s at %s (algorithm %s): %s", kind, rewrite.location, algorithm, ir)

    def add_near_miss(self, kind: str, reason: str, node: torch.fx.Node | None = None) -> None:
        """Record that a ``kind`` candidate at ``node`` was left alone because of ``reason``."""
        miss = NearMiss(kind, reason, location_of(node))
        self.near_misses.append(miss)
        log.passes.info("near miss: %s at %s left alone: %s", kind, miss.location, reason)


class Report:
    """Everything seqfuse did while it was collecting (see ``seqfuse.explain``).

    ``rewrites`` and ``near_misses`` list what every compiled graph found;
    ``count(kind)`` counts rewrites of one kind; ``runtime`` holds the calls per
    runtime path made while collecting, and ``fallbacks`` why faster paths were skipped.
    """

    def __init__(self):
        self.graphs: list[GraphReport] = []
        self.runtime: dict[str, dict[str, int]] = {}
        self.fallbacks: dict[str, dict[str, int]] = {}
        #: where the first call's time went (filled by ``seqfuse.explain``): "first_call" (wall time of
        #: the call that compiled), "dynamo" (capturing the graphs, guards, bytecode: Dynamo's
        #: own share), "seqfuse" (the pipeline: sum of ``seconds``), "downstream" (inductor / aot_eager
        #: / eager on the rewritten graphs); "dynamo" is None where torch does not report it
        self.compile_seconds: dict[str, float | None] = {}

    @property
    def rewrites(self) -> list[Rewrite]:
        return [r for g in self.graphs for r in g.rewrites]

    @property
    def near_misses(self) -> list[NearMiss]:
        return [m for g in self.graphs for m in g.near_misses]

    @property
    def dumps(self) -> list[str]:
        """Paths of files written under ``dump_dir``."""
        return [d for g in self.graphs for d in g.dumps]

    @property
    def seconds(self) -> dict[str, float]:
        """Seconds per pipeline stage, summed over the graphs (where compile time goes)."""
        total: dict[str, float] = {}
        for g in self.graphs:
            for stage, t in g.seconds.items():
                total[stage] = total.get(stage, 0.0) + t
        return total

    def count(self, kind: str) -> int:
        """How many rewrites of ``kind`` ("attention", "ssd", "scan", "long_conv", or a user pass's kind)."""
        if not isinstance(kind, str):
            raise TypeError(f"count(kind): kind must be a string such as {KINDS}, got {kind!r}")
        return sum(r.kind == kind for r in self.rewrites)

    def __str__(self) -> str:
        lines = [f"seqfuse report: {len(self.graphs)} graph(s), {len(self.rewrites)} rewrite(s), "
                 f"{len(self.near_misses)} near miss(es)"]
        if self.rewrites:
            lines.append("rewrites:")
            lines += _table(["kind", "algorithm", "location", "ir"],
                            [[r.kind, r.algorithm, r.location, r.ir] for r in self.rewrites])
        if self.near_misses:
            lines.append("near misses:")
            lines += _table(["kind", "location", "reason"],
                            [[m.kind, m.location, m.reason] for m in self.near_misses])
        guards = [name for g in self.graphs for name in g.guards]
        if guards:
            lines.append("value guards (module buffers read as constants; a changed value runs the graph "
                         "unrewritten): " + ", ".join(guards))
        regions = sum(g.checkpoint_regions for g in self.graphs)
        if regions:
            lines.append(f"activation checkpointing: {regions} region(s) read through; in a graph with a backward "
                         "their ops, rewrites included, are recomputed there")
        selective = sum(g.selective_regions for g in self.graphs)
        if selective:
            lines.append(f"selective activation checkpointing: {selective} region(s) kept as calls, their bodies read "
                         "in place; their policy sees each rewrite as one op (torch.ops.seqfuse.*, recomputed unless "
                         "the policy saves it)")
        if self.runtime:
            from seqfuse.runtime.dispatch import PATHS
            lines.append("runtime calls:")
            lines += _table(["op", *PATHS], [[k, *(str(v.get(p, 0)) for p in PATHS)] for k, v in self.runtime.items()])
        if self.fallbacks:
            lines.append("paths not taken:")
            lines += _table(["op", "calls", "reason"],
                            [[k, str(n), r] for k, rs in self.fallbacks.items() for r, n in rs.items()])
        cs = self.compile_seconds
        if cs:
            lines.append("compile seconds: " + ", ".join(
                f"{k} {'?' if v is None else f'{v:.2f}'}" for k, v in cs.items()))
        seconds = self.seconds
        if seconds:
            lines.append(f"pipeline seconds: {sum(seconds.values()):.2f} (" +
                         ", ".join(f"{k} {v:.2f}" for k, v in seconds.items()) + ")")
        return "\n".join(lines)

    __repr__ = __str__


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    widths[-1] = 0  # the last column is free-form
    fmt = lambda r: "  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return [fmt(header)] + [fmt(r) for r in rows]


#: the Reports collecting in this context (thread / task); a tuple, so a nested block never
#: changes what an enclosing one sees
_COLLECTORS: contextvars.ContextVar[tuple[Report, ...]] = contextvars.ContextVar("seqfuse_collectors", default=())


@contextmanager
def collecting(report: Report):
    """Within this block, every graph the backend compiles in this thread (or asyncio task)
    is added to ``report``; compiles in other threads are not."""
    token = _COLLECTORS.set(_COLLECTORS.get() + (report,))
    try:
        yield report
    finally:
        _COLLECTORS.reset(token)


def publish(graph_report: GraphReport) -> None:
    """Hand a finished graph's findings to the collectors active in this context."""
    for r in _COLLECTORS.get():
        graph_report.graph_id = len(r.graphs)
        r.graphs.append(graph_report)
