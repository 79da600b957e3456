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

A region whose body carries a policy (``context_fn``: selective checkpointing, whose per-op save /
recompute choices are made while AOTAutograd traces the body) stays a call, and its body, re-traced
with the rest, is rewritten in place as a graph of its own (:func:`selective_bodies`): the policy then
sees each rewrite as one ``torch.ops.seqfuse.*`` op.  Its ``context_fn`` is wrapped
(:class:`RewriteAwarePolicy`): a seqfuse op drawing random numbers is always saved, never recomputed,
and a fused attention is saved where the policy saves ATen's attention kernels.
A plain region whose results are read other than by indexing stays a call the same way, with the
always-recompute policy AOTAutograd itself gives a plain region.
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
    """Why the checkpoint call ``node`` is left alone, its body not looked into (None: it is read)."""
    body = _body(gm, node)
    if not isinstance(body, torch.fx.GraphModule):
        return "its body is not a graph"
    return None


def _kept_whole(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether the checkpoint call ``node`` stays a call (its body rewritten in place): a selective
    region, or a call whose results are read other than by index."""
    return _CONTEXT_FN in _body(gm, node).meta or any(
        u.op != "call_function" or u.target is not operator.getitem or not isinstance(u.args[1], int)
        for u in node.users)


def has_checkpoints(gm: torch.fx.GraphModule) -> bool:
    """Whether ``gm``'s graph calls ``tag_activation_checkpoint``."""
    return any(is_checkpoint(n) for n in gm.graph.nodes)


def inline_checkpoints(gm: torch.fx.GraphModule, backward: bool = True) -> tuple[torch.fx.GraphModule, list]:
    """A copy of ``gm`` with every plain checkpoint region's ops in place of its call, tagged as
    AOTAutograd tags them; also the calls left whole, as (node of the copy, reason).  A region
    nested in an inlined one is inlined too and keeps its own tags (the inner region's).  Without a
    ``backward`` (nothing is recomputed, so no policy has anything to choose) selective regions are
    inlined too: AOTAutograd's inference path refuses a random op (SDPA counts as one) in a region."""
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
        elif backward and _kept_whole(gm, node):
            _keep_call(gm, node)
        else:
            work.extend(_inline(gm, node))
    # the bodies inlined are read by nothing now; no other node is removed (FX's dead-code pass would
    # also drop a Dynamo graph's in-place calls, ``x.scatter_(...)``, which have no users)
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and not n.users and isinstance(getattr(gm, n.target, None), torch.fx.GraphModule):
            gm.graph.erase_node(n)
    gm.recompile()
    return gm, opaque


def _keep_call(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    """Prepare the checkpoint call ``node``, kept a call, for the pre-dispatch re-trace and for the
    rewriting of its body: a copy of the body (the caller's graph, compiled unchanged if the pipeline
    fails, keeps its own) with a policy, the always-recompute one AOTAutograd gives a plain region if
    it has none (the re-trace reads the policy key unconditionally), wrapped in :class:`RewriteAwarePolicy`;
    the checkpoint calls nested in it are kept calls too."""
    body = _body(gm, node)
    copy = torch.fx.GraphModule(body, body.graph.__deepcopy__(), class_name=type(body).__name__)
    copy.meta.update(body.meta)
    context_fn = copy.meta.get(_CONTEXT_FN)
    if context_fn is None:
        import functools

        from torch.utils.checkpoint import create_selective_checkpoint_contexts
        context_fn = functools.partial(create_selective_checkpoint_contexts, _recompute)
    if not isinstance(context_fn, RewriteAwarePolicy):
        context_fn = RewriteAwarePolicy(context_fn)
    copy.meta[_CONTEXT_FN] = context_fn
    setattr(gm, node.args[0].target, copy)
    for inner in [n for n in copy.graph.nodes if is_checkpoint(n)]:
        if opaque_reason(copy, inner) is None:
            _keep_call(copy, inner)
    copy.recompile()


def sink_shape_only_inputs(parent: torch.fx.GraphModule, node: torch.fx.Node, body: torch.fx.GraphModule) -> int:
    """Move into ``body`` the computation of each input of the checkpoint call ``node`` that follows
    from shapes and constants alone (a causal mask built from ``arange``, as transformers builds it
    once per model, outside its layers), and drop that input from the call; returns how many.  The
    body's recognizers then see how the mask is made (causal, a window) instead of an opaque tensor
    they could only read as a bias.  A computation is moved only when everything it reads besides
    shape-only ops is already an input of the body; the caller keeps its own copy for other users."""
    from seqfuse.passes.pattern import ancestors, is_shape_only, val

    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    pairs = list(zip(placeholders, node.args[1:]))
    passed = {a: ph for ph, a in pairs if isinstance(a, torch.fx.Node)}   # caller's node -> body's value
    order = {n: i for i, n in enumerate(parent.graph.nodes)}
    anchor, drop = placeholders[-1], set()
    # in the caller's order, each copy after the last: an input built from another one reads its copy
    for ph, a in sorted((p for p in pairs if isinstance(p[1], torch.fx.Node)), key=lambda p: order[p[1]]):
        if not (a.op == "call_function" and isinstance(val(a), torch.Tensor) and ph.users
                and is_shape_only(a, constants=True)):
            continue
        inner = sorted(ancestors(a, stop=passed) | {a}, key=order.__getitem__)
        if any(n.op in ("placeholder", "get_attr") for n in inner):
            continue   # it reads a value the body is not given (a size or a buffer of the caller)
        env = dict(passed)
        for n in inner:
            with body.graph.inserting_after(anchor):
                env[n] = anchor = body.graph.node_copy(n, lambda x: env[x])
        ph.replace_all_uses_with(env[a])
        passed[a] = env[a]
        drop.add(ph)
    keep = [(ph, a) for ph, a in pairs if ph not in drop]
    for ph in drop:
        body.graph.erase_node(ph)
    if drop:
        node.args = (node.args[0], *(a for _, a in keep))
        body.recompile()
    return len(drop)


class RewriteAwarePolicy:
    """A selective checkpoint's ``context_fn`` whose policy knows seqfuse's rewrites.  Every op is put to
    the wrapped policy, with two exceptions.  A seqfuse call that draws random numbers
    (:func:`draws_random`) is always saved: its draws are its own (the partitioner replays aten's, not
    a custom op's), so recomputing it in the backward would draw another dropout mask than its forward
    output used.  And a fused attention the policy would recompute by default is saved if the policy
    saves one of ATen's attention kernels (``_scaled_dot_product_flash_attention`` and the others it
    stands for, asked with its arguments): a policy written for SDPA, as torchtitan's is, keeps
    meaning what it says."""

    def __init__(self, context_fn):
        self.context_fn = context_fn

    def __call__(self):
        forward, recompute = self.context_fn()
        policy = getattr(forward, "policy_fn", None)
        if policy is not None:   # torch's SAC context; any other context tags nothing for recompute
            forward.policy_fn = _aware_of_rewrites(policy)
        return forward, recompute


#: the ATen attention kernels a fused attention stands for (those this torch has)
_SDPA_KERNELS = tuple(getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable") if hasattr(torch.ops.aten, name))


def _by_default(answer) -> bool:
    """Whether a policy's answer is its default, recompute (not a choice to save, nor MUST_RECOMPUTE)."""
    return answer is False or answer == CheckpointPolicy.PREFER_RECOMPUTE


def _aware_of_rewrites(policy):
    def wrapped(ctx, func, *args, **kwargs):
        if _random_call(func, args, kwargs):
            return CheckpointPolicy.MUST_SAVE
        answer = policy(ctx, func, *args, **kwargs)
        if _by_default(answer) and func is torch.ops.seqfuse.attention.default:
            for kernel in _SDPA_KERNELS:
                try:
                    stands_for = policy(ctx, kernel, *args, **kwargs)
                except Exception:  # noqa: BLE001 - a policy that reads SDPA's own arguments: its default
                    continue
                if not _by_default(stands_for):
                    return stands_for
        return answer
    return wrapped


def selective_bodies(gm: torch.fx.GraphModule) -> list:
    """(call, body) of each checkpoint call of ``gm``'s graph kept a call (with a policy) whose body is
    a graph: the bodies the pipeline rewrites in place."""
    out = []
    for n in gm.graph.nodes:
        body = _body(gm, n) if is_checkpoint(n) else None
        if isinstance(body, torch.fx.GraphModule) and _CONTEXT_FN in body.meta:
            out.append((n, body))
    return out


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
    return node.op == "call_function" and _random_call(node.target, node.args, node.kwargs)


def _random_call(target, args, kwargs) -> bool:
    """Whether calling ``target`` with ``args`` and ``kwargs`` is a seqfuse op drawing random numbers."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "seqfuse":
        return False
    for i, a in enumerate(target._schema.arguments):
        if a.name == "dropout":
            p = kwargs.get("dropout", args[i] if i < len(args) else a.default_value)
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
