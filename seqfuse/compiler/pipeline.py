"""The seqfuse pipeline: every stage, in order, with why the order matters."""
from __future__ import annotations

import os
import time
from contextlib import contextmanager

import torch
import torch.fx

from seqfuse import log
from seqfuse.compiler.checkpoint import (drop_regions, has_checkpoints, inline_checkpoints, mark_regions, retag,
                                         selective_bodies, sink_shape_only_inputs)
from seqfuse.compiler.constants import attach as attach_constants, buffer_constants, inherit_constants, lift_guards
from seqfuse.compiler.decay_buffers import express_decay_buffers
from seqfuse.compiler.canonicalize import (block_slices, forward_slot_reads, normalize_contractions, normalize_inplace, normalize_masks, normalize_slices,
                                           normalize_postnormalized, normalize_softmax, postnormalized_near_misses,
                                           restore_layouts, trace_pre_dispatch, unstable_softmaxes)
from seqfuse.compiler.options import Options
from seqfuse.compiler.report import GraphReport
from seqfuse.ir import format_graph, format_op, ir_of, verify_graph
from seqfuse.lowering import lower_graph
from seqfuse.passes import PassContext, SelectPass, enabled_passes


class _Dumper:
    """Writes the graph after each stage to ``dump_dir`` (nothing when dump_dir is None)."""

    def __init__(self, dump_dir: str | None, report: GraphReport):
        self.dir, self.report, self.step = dump_dir, report, 0
        if dump_dir:
            os.makedirs(dump_dir, exist_ok=True)
            taken = {f.split("_")[0] for f in os.listdir(dump_dir) if f.startswith("g")}
            n = 0
            while f"g{n}" in taken:
                n += 1
            self.prefix = f"g{n}"

    def __call__(self, stage: str, text: str | torch.fx.Graph, dot: torch.fx.Graph | None = None) -> None:
        """Write ``<prefix>_<step>_<stage>.txt``; with ``dot``, also that graph as ``.dot`` beside it."""
        if not self.dir:
            return
        if isinstance(text, torch.fx.Graph):
            text = format_graph(text)
        path = os.path.join(self.dir, f"{self.prefix}_{self.step:02d}_{stage}.txt")
        with open(path, "w") as f:
            f.write(text)
        self.report.dumps.append(path)
        if dot is not None:
            dot_path = path[:-len(".txt")] + ".dot"
            with open(dot_path, "w") as f:
                f.write(graph_to_dot(dot, name=f"{self.prefix}_{stage}"))
            self.report.dumps.append(dot_path)
        self.step += 1

    def within(self, scope: str) -> "_Scoped":
        """This dumper with its stage names prefixed by ``scope`` (a subgraph's name)."""
        return _Scoped(self, scope)


class _Scoped:
    """A :class:`_Dumper` for a subgraph: the same files and numbering, stages named ``scope.stage``."""

    def __init__(self, parent: _Dumper, scope: str):
        self.parent, self.scope = parent, scope

    def __call__(self, stage: str, text: str | torch.fx.Graph, dot: torch.fx.Graph | None = None) -> None:
        self.parent(f"{self.scope}.{stage}", text, dot)

    def within(self, scope: str) -> "_Scoped":
        return _Scoped(self.parent, f"{self.scope}.{scope}")


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def graph_to_dot(graph: torch.fx.Graph, name: str = "seqfuse") -> str:
    """The graph as graphviz ``dot`` text (no graphviz needed to write it; render it with
    ``dot -Tsvg file.dot -o file.svg``): one box per node, an edge per use, IR ops filled orange
    with their kind and algorithm, inputs and outputs grey."""
    lines = [f"digraph {_dot_quote(name)} {{", "  rankdir=TB;",
             '  node [shape=box, fontname="monospace", fontsize=10, style=filled, fillcolor=white];']
    ids = {node: f"n{i}" for i, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        op = ir_of(node)
        if op is not None:
            label = f"{node.name}\nseqfuse.{op.kind}\nalgo={op.algorithm}"
            attrs = 'fillcolor="#f4a460", penwidth=2'
        elif node.op in ("placeholder", "output", "get_attr"):
            label, attrs = f"{node.op}: {node.name}", 'fillcolor="#dddddd"'
        else:
            target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            label, attrs = f"{node.name}\n{target}", "fillcolor=white"
        lines.append(f"  {ids[node]} [label={_dot_quote(label)}, {attrs}];")
    for node in graph.nodes:
        for user in node.users:
            lines.append(f"  {ids[node]} -> {ids[user]};")
    lines.append("}")
    return "\n".join(lines) + "\n"


@contextmanager
def _timed(report: GraphReport, stage: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - start
        report.seconds[stage] = report.seconds.get(stage, 0.0) + seconds
        log.pipeline.debug("%s took %.3f s", stage, seconds)


def check_links(graph: torch.fx.Graph, where: str) -> None:
    """Raise if the graph's node list read backward differs from it read forward.  A node inserted
    before an erased one is reachable forward only; ``Graph.lint`` does not see it, and the
    Interpreter that AOTAutograd runs (which frees values by a backward walk) then fails."""
    forward = list(graph.nodes)
    backward = list(reversed(graph.nodes))[::-1]
    if forward != backward:
        lost = sorted({n.name for n in forward} ^ {n.name for n in backward})
        raise RuntimeError(f"seqfuse: pass {where!r} left the graph's node list broken (nodes {lost} "
                           "are linked one way only): a node was inserted next to an erased one")


def run_pipeline(gm: torch.fx.GraphModule, example_inputs, options: Options,
                 report: GraphReport) -> torch.fx.GraphModule:
    """Turn Dynamo's graph into an executable graph whose mixers are seqfuse custom ops."""
    dump = _Dumper(options.dump_dir, report)
    dump("dynamo", gm.print_readable(print_output=False))
    # whether this graph will be differentiated (AOTAutograd's test): a cost the passes may weigh, and
    # what decides whether checkpointed regions are recomputed at all
    training = torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)
    # 1. Pre-dispatch ATen: canonical op names, symbolic shapes kept, autograd not yet
    #    applied, so a replaced region keeps training through the custom op's backward.
    with _timed(report, "trace"):
        if has_checkpoints(gm):
            # checkpointed regions read as the rest of the graph, their ops tagged for recompute
            gm, opaque = inline_checkpoints(gm, backward=training)
            report.checkpoint_regions = len({n.meta["ac_graph_id"] for n in gm.graph.nodes if "ac_graph_id" in n.meta})
            for node, reason in opaque:
                report.add_near_miss("graph", f"an activation-checkpointed region is left whole: {reason}", node)
            dump("checkpoints_inlined", gm.print_readable(print_output=False))
        canon = trace_pre_dispatch(gm, example_inputs)
        # small module buffers a recognizer may read by value, under a run-time value guard
        attach_constants(canon, buffer_constants(gm, example_inputs))
    canon.meta["seqfuse_training"] = training
    # checkpointed regions: tags kept (and given to the rewrites' nodes) where there is a backward to
    # recompute them for, dropped otherwise (AOTAutograd's inference path refuses random ops in them)
    originals = mark_regions(canon.graph) if training else drop_regions(canon.graph)
    rewrite_graph(canon, options, report, dump)
    if originals:
        retag(canon.graph, originals)
        canon.recompile()
    # selective checkpoint regions stay calls (their policy is applied when AOTAutograd traces them):
    # their bodies are rewritten in place, each as a graph of its own
    _rewrite_selective(canon, options, report, dump)
    dump("lowered", canon.graph)
    return canon


def _rewrite_selective(parent: torch.fx.GraphModule, options: Options, report: GraphReport, dump) -> None:
    """Rewrite the body of each selective checkpoint call of ``parent`` (and of the calls nested in
    them), the constants ``parent`` may read by value passed in and the reads passed back as guards."""
    sunk = 0
    for node, body in selective_bodies(parent):
        sunk += sink_shape_only_inputs(parent, node, body)
        inherit_constants(body, node.args[1:], parent)
        body.meta["seqfuse_training"] = parent.meta["seqfuse_training"]
        report.selective_regions += 1
        inner = dump.within(node.args[0].target)
        rewrite_graph(body, options, report, inner)
        _rewrite_selective(body, options, report, inner)
        inner("lowered", body.graph)
        lift_guards(body, node.args[1:], parent)
    if sunk:   # what the bodies now build themselves, the caller may no longer need
        parent.graph.eliminate_dead_code()
        parent.recompile()


def rewrite_graph(canon: torch.fx.GraphModule, options: Options, report: GraphReport, dump) -> None:
    """Stages 2 to 6 on the pre-dispatch graph ``canon``, in place: canonicalize, recognize, select,
    verify, lower."""
    dump("pre_dispatch", canon.graph)
    # 2. Contractions before masks: mask normalization and all recognizers read
    #    scores as einsums with views folded in.
    with _timed(report, "canonicalize"):
        normalize_slices(canon)
        block_slices(canon)
        express_decay_buffers(canon)
        normalize_inplace(canon)
        forward_slot_reads(canon)
        normalize_contractions(canon)
        dump("contractions", canon.graph)
        normalize_masks(canon)
        normalize_softmax(canon)
        normalize_postnormalized(canon)
        for node, reason in postnormalized_near_misses(canon):
            report.add_near_miss("attention", reason, node)
        for node in unstable_softmaxes(canon):
            report.add_near_miss("attention", "a softmax written out without its row max subtracted (exp(s) / "
                                 "exp(s).sum()): it overflows where softmax does not, so it is not read as softmax", node)
        # values the program computes but never uses would count as users in the
        # recognizers' single-use checks
        canon.graph.eliminate_dead_code()
    dump("masks", canon.graph)
    # 3. Recognizers in registration order (built-in first, users' after, so a user
    #    pass can build on the IR ops the built-ins produced).
    for p in enabled_passes(options.passes):
        with _timed(report, p.name):
            p.run(PassContext(canon, report, options))
            canon.graph.lint()
            check_links(canon.graph, p.name)
        dump(p.name, canon.graph)
    # 4. Select after every recognizer: the cost model sees all IR ops and their shapes.
    with _timed(report, "select"):
        SelectPass().run(PassContext(canon, report, options))
    # 5. Verify before anything executes: a malformed op is a recognizer bug.
    verify_graph(canon.graph)
    ir_lines = []
    for node in canon.graph.nodes:
        op = ir_of(node)
        if op is not None:
            text = format_op(op, node.name)
            log.select.debug("%s %%%s: algorithm %s", op.kind, node.name, op.algorithm)
            report.add_rewrite(op.kind, text, node, op.algorithm)
            ir_lines.append(text)
    dump("ir", "\n".join(ir_lines) + "\n", dot=canon.graph)
    # 6. Lower last: IR nodes become calls of the seqfuse custom ops, with the
    #    runtime path choice baked in as an argument; canonical nodes no rewrite consumed
    #    get the layouts of the user's ops back, so downstream sees the program's layouts.
    with _timed(report, "lower"):
        restore_layouts(canon)
        lower_graph(canon, options.runtime)
        if options.sequence_parallel is not None:
            # the ssd / scan calls become their sequence-parallel forms (one collective each)
            from seqfuse.compiler.report import location_of
            from seqfuse.lowering.sequence_parallel import SequenceParallelUnsupported, apply_sequence_parallel
            missed = [m for m in report.near_misses if m.kind in ("ssd", "scan", "delta")]
            if missed:  # left alone, it would compute over this rank's slice only
                raise SequenceParallelUnsupported(
                    "seqfuse: option 'sequence_parallel': a linear recurrence was not rewritten, so it would run on "
                    "this rank's slice alone: " + "; ".join(f"{m.kind} at {m.location}: {m.reason}" for m in missed))
            apply_sequence_parallel(canon, options.sequence_parallel, where=location_of)
        canon.graph.eliminate_dead_code()
        check_links(canon.graph, "lower")
        canon.recompile()
