"""Activation-checkpointed regions: seen through by the recognizers, still recomputed in backward.

``torch.utils.checkpoint.checkpoint(f, *args)`` (and transformers' ``gradient_checkpointing_enable()``,
which calls it per layer) reaches a backend as one higher-order op::

    %wrap_body_0 = get_attr[wrap_body_0]                       # f's graph
    %ckpt = torch.ops.higher_order.tag_activation_checkpoint(%wrap_body_0, *args, use_reentrant=False)
    %out = getitem(%ckpt, 0)

AOTAutograd gives it its meaning: it traces the body and tags every op of it with
``meta["recompute"] = PREFER_RECOMPUTE`` and one ``meta["ac_graph_id"]`` per region; the partitioner
then recomputes tagged values in the backward instead of saving them.  seqfuse's recognizers read one
flat graph, so :func:`inline_checkpoints` puts each plain region's ops into the graph in place of the
call, with exactly those two tags (which ``make_fx`` carries to the ATen ops it traces from them, as
it carries source locations), and the downstream compiler's partitioner does what it would have done
with the region.  The ops a rewrite emits inherit a region's tags where they replace that region's
ops (:func:`retag`), so a fused attention inside a checkpointed layer is recomputed in the backward
as the ops it replaced would have been.

Left as they are (the region stays one opaque op, which the recognizers do not look into; a near miss
says so): a region whose body carries a policy (``context_fn``: selective checkpointing, whose
per-op save / recompute choices are made while AOTAutograd traces the body), and a call whose results
are read other than by indexing.
"""
from __future__ import annotations

import itertools
import operator

import torch
import torch.fx
from torch.utils.checkpoint import CheckpointPolicy

_HOP = torch.ops.higher_order.tag_activation_checkpoint
#: the node metadata AOTAutograd's partitioner reads to recompute a value in the backward
TAGS = ("recompute", "ac_graph_id")
_CONTEXT_FN = "_checkpoint_context_fn"
#: region ids (from the same counter as torch's own, so they never collide with a region it tags)
try:
    from torch._higher_order_ops.wrap import uid as _UID
except ImportError:  # pragma: no cover - older layouts of torch
    _UID = itertools.count(1 << 20)


def is_checkpoint(node: torch.fx.Node) -> bool:
    """Whether ``node`` calls ``tag_activation_checkpoint``."""
    return node.op == "call_function" and node.target is _HOP


def _body(gm: torch.fx.GraphModule, node: torch.fx.Node):
    body = node.args[0]
    if not (isinstance(body, torch.fx.Node) and body.op == "get_attr"):
        return None
    return getattr(gm, body.target, None)


def opaque_reason(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    """Why the checkpoint call ``node`` is not inlined (None: it is)."""
    body = _body(gm, node)
    if not isinstance(body, torch.fx.GraphModule):
        return "its body is not a graph"
    if _CONTEXT_FN in body.meta:
        return ("a selective activation checkpoint (context_fn=...): its save / recompute policy is applied "
                "while AOTAutograd traces the region, so seqfuse leaves the region whole and does not look into it")
    if any(u.op != "call_function" or u.target is not operator.getitem or not isinstance(u.args[1], int)
           for u in node.users):
        return "its results are read other than by index"
    return None


def has_checkpoints(gm: torch.fx.GraphModule) -> bool:
    """Whether ``gm``'s graph calls ``tag_activation_checkpoint``."""
    return any(is_checkpoint(n) for n in gm.graph.nodes)


def inline_checkpoints(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, list]:
    """A copy of ``gm`` with every plain checkpoint region's ops in place of its call, tagged as
    AOTAutograd tags them; also the calls left whole, as (node of the copy, reason).  A region
    nested in an inlined one is inlined too and keeps its own tags (the inner region's)."""
    original = gm
    gm = torch.fx.GraphModule(original, original.graph.__deepcopy__(), class_name=type(original).__name__)
    gm.meta.update(original.meta)
    opaque = []
    work = [n for n in gm.graph.nodes if is_checkpoint(n)]
    while work:
        node = work.pop(0)
        reason = opaque_reason(gm, node)
        if reason is not None:
            opaque.append((node, reason))
            _make_traceable(gm, node)
            continue
        work.extend(_inline(gm, node))
    # the bodies inlined are read by nothing now; no other node is removed (FX's dead-code pass would
    # also drop a Dynamo graph's in-place calls, ``x.scatter_(...)``, which have no users)
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and not n.users and isinstance(getattr(gm, n.target, None), torch.fx.GraphModule):
            gm.graph.erase_node(n)
    gm.recompile()
    return gm, opaque


def _make_traceable(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    """Give a plain region left whole the (vanilla, always-recompute) policy AOTAutograd would use, so
    that a pre-dispatch re-trace of the call (which reads the policy key unconditionally) succeeds."""
    body = _body(gm, node)
    if isinstance(body, torch.fx.GraphModule) and _CONTEXT_FN not in body.meta:
        import functools

        from torch.utils.checkpoint import create_selective_checkpoint_contexts
        # a copy: the caller's graph (compiled unchanged if the pipeline fails) keeps its own body
        copy = torch.fx.GraphModule(body, body.graph, class_name=type(body).__name__)
        copy.meta.update(body.meta)
        copy.meta[_CONTEXT_FN] = functools.partial(create_selective_checkpoint_contexts, _recompute)
        setattr(gm, node.args[0].target, copy)


def _recompute(*args, **kwargs):
    """The policy of a plain checkpoint: recompute every op."""
    return CheckpointPolicy.PREFER_RECOMPUTE


def _inline(gm: torch.fx.GraphModule, node: torch.fx.Node) -> list:
    """Put the body of checkpoint call ``node`` in its place; returns the checkpoint calls it copied in."""
    body = _body(gm, node)
    graph = gm.graph
    tags = {"recompute": CheckpointPolicy.PREFER_RECOMPUTE, "ac_graph_id": next(_UID)}
    env: dict = {}
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    for ph, a in zip(placeholders, node.args[1:]):
        env[ph] = a
    nested, result = [], None
    with graph.inserting_before(node):
        for n in body.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                result = torch.fx.node.map_arg(n.args[0], lambda x: env[x])
                break
            if n.op == "get_attr":
                # a nested region's body, or a constant of the body: moved onto the root under a fresh name
                name = _fresh_attr(gm, n.target)
                setattr(gm, name, _get(body, n.target))
                new = graph.get_attr(name)
                new.meta.update(n.meta)
            else:
                new = graph.node_copy(n, lambda x: env[x])
            for k, v in tags.items():
                new.meta.setdefault(k, v)
            env[n] = new
            if is_checkpoint(new):
                nested.append(new)
    outs = result if isinstance(result, (tuple, list)) else (result,)
    for user in list(node.users):
        user.replace_all_uses_with(outs[user.args[1]])
        graph.erase_node(user)
    graph.erase_node(node)
    return nested


def _get(module: torch.nn.Module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _fresh_attr(gm: torch.nn.Module, target: str) -> str:
    base = target.replace(".", "_")
    for i in itertools.count():
        name = f"{base}_inlined_{i}"
        if not hasattr(gm, name):
            return name
    raise AssertionError("unreachable")


def _region(node: torch.fx.Node):
    rec = node.meta.get("recompute")
    return None if rec is None else (rec, node.meta.get("ac_graph_id"))


def mark_regions(graph: torch.fx.Graph) -> set | None:
    """The nodes of ``graph`` before the rewrites (:func:`retag` tags the others), or None if no node
    carries tags (then there is nothing to retag).  A node's region is its tags, which the rewrites
    leave as they are, so the set is all :func:`retag` needs."""
    if not any(_region(n) is not None for n in graph.nodes):
        return None
    return set(graph.nodes)


def drop_regions(graph: torch.fx.Graph) -> None:
    """Remove every node's recompute tags (a graph with no backward: nothing is recomputed, and
    AOTAutograd's inference path refuses random ops, SDPA included, inside a tagged region); returns
    None, like :func:`mark_regions` for a graph with no region: there is nothing to retag."""
    for n in graph.nodes:
        for k in TAGS:
            n.meta.pop(k, None)
    return None


def retag(graph: torch.fx.Graph, originals: set) -> int:
    """Tag the nodes the rewrites emitted (those not in ``originals``, :func:`mark_regions`' set): a run
    of new nodes between two original nodes of one region, or whose inputs from outside the run all
    come from one region and whose readers outside it all lie in it, is in that region.  Any other run
    is left untagged: its values are saved, not recomputed (the answer is the same; the memory is what
    the program without the region would use).  A new node that already carries tags keeps them, and
    a seqfuse call that draws random numbers is never tagged (:func:`draws_random`).  Returns the
    number of nodes tagged."""
    tagged = 0
    run: list = []
    prev = None

    def close(nxt):
        nonlocal tagged
        region = prev if prev is not None and prev == nxt else _only_region(run)
        if region is not None:
            for n in run:
                if _region(n) is None and not draws_random(n):
                    n.meta["recompute"], n.meta["ac_graph_id"] = region
                    tagged += 1
        run.clear()

    for n in graph.nodes:
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        if n in originals:
            close(_region(n))
            prev = _region(n)
        else:
            run.append(n)
    close(None)
    return tagged


def draws_random(node: torch.fx.Node) -> bool:
    """Whether ``node`` calls a seqfuse op that draws random numbers (attention with dropout > 0).  Such
    a call is never tagged for recompute: a second call in the backward would draw another dropout
    mask than the forward's output used (the partitioner makes aten's random ops replay their draws,
    but it knows nothing of a custom op's)."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if target.namespace != "seqfuse":
        return False
    for i, a in enumerate(target._schema.arguments):
        if a.name == "dropout":
            p = node.kwargs.get("dropout", node.args[i] if i < len(node.args) else a.default_value)
            return not isinstance(p, (int, float)) or p > 0.0
    return False


def _only_region(run: list):
    """The one region every input of ``run`` from outside it comes from and every reader outside it
    lies in (None if there are several, or none)."""
    inside = set(run)
    seen = set()
    for n in run:
        for x in n.all_input_nodes:
            if x not in inside and x.op not in ("placeholder", "get_attr"):
                seen.add(_region(x))
        for u in n.users:
            if u not in inside and u.op != "output":
                seen.add(_region(u))
    return next(iter(seen)) if len(seen) == 1 else None


def signature(graph: torch.fx.Graph) -> str:
    """A hash of which nodes carry which recompute tags ("" for a graph with none), regions numbered in
    order of appearance: what the downstream compiler's cache key must add to the graph's code."""
    import hashlib
    regions: dict = {}
    items = []
    for i, n in enumerate(graph.nodes):
        region = _region(n)
        if region is not None:
            items.append((i, str(region[0]), regions.setdefault(region[1], len(regions))))
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16] if items else ""
