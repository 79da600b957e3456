"""Re-rolling Dynamo-unrolled time loops: find the steps, build the body template, match every step.

All of it runs in time linear in the graph size:

1. *Slice families*: ``select.int(X, d, i)`` and ``slice(X, d, i, i+1)`` nodes grouped by
   (X, d, form); within a family, members in graph order form *runs* of consecutive indices
   i, i±1, i±2, … (the per-step inputs of one loop).  Runs that overlap in the graph and go
   the same way form one loop; step s reads index s (forward) or imax - s (reversed).
2. *Labels*: one topological pass gives each node the largest step of the seeds it reads
   (-1: loop-invariant).  Loop-invariant nodes recomputed at every step are hash-consed, so
   ``A.exp()`` written inside the loop is the same invariant at every step.
3. *Template*: the nodes of a middle step m, in order, with their arguments as roles:
   ("L", k) the step's own node k, ("P", k) node k of the previous step (a carried value),
   ("I", node) an invariant, ("C", value) a constant, ("S", family, form) a seed.
4. *Matching*: each step t is instantiated from the template by looking among the users of
   an argument already mapped (never a deep walk); the first step binds the carried roles to
   whatever it reads there (the initial values).  The loop is the longest run of steps that
   match.
"""
from __future__ import annotations

import bisect
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from seqfuse.passes.pattern import copy_meta, fake_call, is_op, val

aten = torch.ops.aten

#: runs of a family still open for extension (a run is closed when a later one takes its place)
_OPEN_RUNS = 8
#: the fewest steps a re-rolled loop has
MIN_STEPS = 2


class NoLoop(Exception):
    """A candidate loop could not be re-rolled (the message is the near miss's reason)."""


@dataclass
class Run:
    """Seeds of one family read at consecutive indices, in graph order."""

    family: tuple            # (X, dim, form)
    nodes: list              # seed nodes, in graph order
    indices: list            # their indices
    step: int = 0            # +1 forward, -1 reversed, 0 unknown (one element)

    def start(self, pos):
        return pos[self.nodes[0]]

    def end(self, pos):
        return pos[self.nodes[-1]]


def _seed_key(node: torch.fx.Node):
    """(X, dim, form, index) when ``node`` is a per-step slice of a graph value, else None."""
    if (node.target is not aten.select.int and node.target is not aten.slice.Tensor) \
            or not isinstance(node.args[0], torch.fx.Node):
        return None
    x = node.args[0]
    r = val(x).dim() if isinstance(val(x), torch.Tensor) else None
    if r is None or r == 0:
        return None
    if node.target is aten.select.int:
        d, i = node.args[1], node.args[2]
        if isinstance(d, int) and isinstance(i, int) and i >= 0:
            return (x, d % r, "select", i)
    elif node.target is aten.slice.Tensor:
        d = node.args[1] if len(node.args) > 1 else 0
        s = node.args[2] if len(node.args) > 2 else None
        e = node.args[3] if len(node.args) > 3 else None
        st = node.args[4] if len(node.args) > 4 else 1
        if isinstance(d, int) and isinstance(s, int) and isinstance(e, int) and s >= 0 and e == s + 1 and st == 1:
            return (x, d % r, "slice", s)
    return None


def find_runs(graph: torch.fx.Graph) -> list[Run]:
    """Every run of at least MIN_STEPS seeds, in graph order of their first seed."""
    open_runs: dict[tuple, list[Run]] = {}
    done: list[Run] = []
    for node in graph.nodes:
        key = _seed_key(node)
        if key is None:
            continue
        fam, i = key[:3], key[3]
        runs = open_runs.setdefault(fam, [])
        for run in runs:
            last = run.indices[-1]
            if (run.step in (0, 1) and i == last + 1) or (run.step in (0, -1) and i == last - 1):
                run.step = i - last
                run.nodes.append(node)
                run.indices.append(i)
                break
        else:
            runs.append(Run(fam, [node], [i]))
            if len(runs) > _OPEN_RUNS:
                done.append(runs.pop(0))
    for runs in open_runs.values():
        done.extend(runs)
    return [r for r in done if len(r.nodes) >= MIN_STEPS]


def group_loops(runs: list[Run], pos: dict) -> list[list[Run]]:
    """Runs whose graph spans overlap belong to one loop."""
    runs = sorted(runs, key=lambda r: r.start(pos))
    groups: list[list[Run]] = []
    end = -1
    for r in runs:
        if groups and r.start(pos) <= end:
            groups[-1].append(r)
            end = max(end, r.end(pos))
        else:
            groups.append([r])
            end = r.end(pos)
    return groups


# --- hash-consing of invariants ------------------------------------------------------

def _hashable(x):
    """A hashable stand-in for an argument (nodes by identity, symbolic sizes by expression)."""
    if isinstance(x, (list, tuple)):
        return (type(x).__name__,) + tuple(_hashable(e) for e in x)
    if isinstance(x, dict):
        return ("dict",) + tuple(sorted((k, _hashable(v)) for k, v in x.items()))
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym", str(x.node.expr))
    if isinstance(x, float):
        return ("float", repr(x))
    hash(x)
    return x


def same_value(a, b) -> bool:
    """Equality of two non-node arguments without guarding on symbolic sizes."""
    try:
        return _hashable(a) == _hashable(b)
    except TypeError:
        return a is b


#: ops whose result reads only the shape, dtype and device of their first argument
_SHAPE_ONLY = (aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default, aten.full_like.default,
               aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default, aten.new_full.default)


def _shape_only(node: torch.fx.Node, label: dict) -> bool:
    """Whether ``node`` is a fill of its first argument's shape (``zeros_like(x[:, 0])``) that reads no other
    step value: its value is the same at every step, whichever step's slice gives it its shape."""
    if node.target not in _SHAPE_ONLY or not node.args or not isinstance(val(node), torch.Tensor):
        return False
    return not any(label.get(a, -1) >= 0 for a in node.all_input_nodes if a is not node.args[0])


def reads_shape_only(user: torch.fx.Node, node: torch.fx.Node) -> bool:
    """Whether ``user`` is a fill of ``node``'s shape that reads nothing else of it (``zeros_like(x[:, 0])``
    before a loop): a use of the node's metadata, not of its values."""
    return user.target in _SHAPE_ONLY and bool(user.args) and user.args[0] is node and \
        node not in list(user.args[1:]) + list(user.kwargs.values())


def _pure(node: torch.fx.Node) -> bool:
    t = node.target
    if node.op != "call_function":
        return False
    if isinstance(t, torch._ops.OpOverload):
        return not t._schema.is_mutable and torch.Tag.nondeterministic_seeded not in t.tags
    return t is operator.getitem


# --- the loop --------------------------------------------------------------------------

@dataclass
class Loop:
    """A re-rolled loop: the template and, per matched step, the node of every template entry."""

    runs: list[Run]
    reverse: bool
    imin: int
    imax: int
    template: list[torch.fx.Node] = field(default_factory=list)   # the nodes of step m
    roles: list[tuple] = field(default_factory=list)               # per template node: (args, kwargs) roles
    inst: dict[int, list[torch.fx.Node]] = field(default_factory=dict)  # step -> nodes
    init: dict[int, Any] = field(default_factory=dict)             # carried k -> initial value (node / number)
    lo: int = 0
    hi: int = 0
    carried: list[int] = field(default_factory=list)               # template indices read by the next step
    rebuilt: bool = False            # rebuild_dropped inserted nodes (dead code unless the loop is rewritten)
    #: family -> k for a run of write destinations one step ahead of (k = 1) or behind the reads: step t
    #: writes index(t) + k (``h[:, t + 1] = f(h[:, t], x[:, t])``); the runs' indices are shifted by -k
    offsets: dict = field(default_factory=dict)
    mid: int = 0                     # the step the template was taken from

    def index(self, s: int) -> int:
        """The tensor index step s reads."""
        return self.imax - s if self.reverse else self.imin + s

    @property
    def steps(self) -> range:
        return range(self.lo, self.hi + 1)

    def body(self) -> list[torch.fx.Node]:
        return [n for s in self.steps for n in self.inst[s]]

    def vec_range(self) -> tuple[int, int]:
        """(first index, count) of the matched steps along the time axis of a vectorized value."""
        a, b = self.index(self.lo), self.index(self.hi)
        return min(a, b), abs(b - a) + 1


def reroll(graph: torch.fx.Graph, runs: list[Run], pos: dict, move_updates: bool = True,
           last_may_drop: bool = False) -> Loop:
    """Label, build the template at a middle step, match every step: the loop, or NoLoop (see _reroll).
    A loop that reads some inputs several times per step of others fails with that as its reason."""
    try:
        return _reroll(graph, runs, pos, move_updates, last_may_drop)
    except NoLoop as e:
        why = _substeps(runs, pos)
        if why is None:
            raise
        raise NoLoop(why) from e


def _reroll(graph: torch.fx.Graph, runs: list[Run], pos: dict, move_updates: bool = True,
            last_may_drop: bool = False) -> Loop:
    """Label, build the template at a middle step, match every step: the loop, or NoLoop.

    ``move_updates``: a chain of nodes whose users all belong to the next step starts that step
    (``S = γ·S + …`` with an invariant γ).  Without it, every node stays in the step of the
    seeds it reads (``S = S·exp(g_i[-1]) + k_iᵀ·v_i`` updates the state from step i's own
    slices, after step i's readout: moving it would make step i+1 read step i's slices).

    ``last_may_drop``: the last step may lack the nodes that only a next step would read (its state
    update, dead code when the program drops the state after the loop); their ``inst`` entries are then
    None, and the caller that takes the loop calls ``rebuild_dropped`` before reading them."""
    steps = {r.step for r in runs if r.step}
    if len(steps) != 1:
        raise NoLoop("the loop reads time both forward and reversed (a bidirectional loop body)")
    reverse = steps.pop() < 0
    runs = _initial_slot_dropped(runs)
    offsets = _write_offsets(runs)
    if offsets:
        runs = [Run(r.family, r.nodes, [i - offsets.get(r.family, 0) for i in r.indices], r.step) for r in runs]
    imin = min(min(r.indices) for r in runs)
    imax = max(max(r.indices) for r in runs)
    loop = Loop(runs, reverse, imin, imax, offsets=offsets)
    T = imax - imin + 1
    if T < MIN_STEPS:
        raise NoLoop("too few steps")
    step_of_seed = {}
    for r in runs:
        for n, i in zip(r.nodes, r.indices):
            step_of_seed[n] = (imax - i) if reverse else (i - imin)
    # 2. labels and hash-consed invariants, from the first seed on
    label: dict[torch.fx.Node, int] = {}
    canon: dict[torch.fx.Node, torch.fx.Node] = {}
    table: dict[Any, torch.fx.Node] = {}
    members: dict[torch.fx.Node, list] = {}    # representative -> every hash-consed copy
    by_step: dict[int, list[torch.fx.Node]] = {}
    node = next(iter(graph.nodes))   # from the top: invariants before the loop are hash-consed too
    while node is not None and node.op != "output":
        if node in step_of_seed:
            s = step_of_seed[node]
        elif _shape_only(node, label):
            s = -1      # zeros_like(x[:, 0]): an invariant, however its argument is labeled
        else:
            s = max((label.get(a, -1) for a in node.all_input_nodes), default=-1)
        if s >= 0:
            label[node] = s
            by_step.setdefault(s, []).append(node)
        elif _pure(node):
            try:
                args = node.args
                if _shape_only(node, label):   # equal when the shape and dtype are (their argument's values unread)
                    v = val(node)
                    args = (("like", _hashable(tuple(v.shape)), v.dtype, str(v.device)), *args[1:])
                key = (node.target, _hashable(_canon_args(args, canon)),
                       _hashable(_canon_args(node.kwargs, canon)))
                canon[node] = table.setdefault(key, node)
                members.setdefault(canon[node], []).append(node)
            except TypeError:
                pass
        node = node.next
    # a node whose users all belong to the next step starts that step (``S = γ·S + …`` computes
    # γ·S right after the previous step's last use of S): it moves there, so that the carried
    # value is the state the step reads out.  Only a function of the step's carried values moves:
    # ``S' = S·γ + k_iᵀ·v_i`` written after step i's readout reads step i's own data, and stays in step
    # i even where its only user is the next step (the first step's, whose S·γ is an invariant when
    # S starts as zeros; the last's, when the update after it is dead code)
    labeled = [n for s in sorted(by_step) for n in by_step[s]]
    movable = _state_functions(labeled, label, step_of_seed) if move_updates else set()
    for n in reversed(labeled if move_updates else []):
        s = label[n]
        if n in movable and n.users and all(_starts(u, s + 1, label) for u in n.users):
            label[n] = s + 1
    by_step = {}
    for n in sorted(labeled, key=pos.__getitem__):
        by_step.setdefault(label[n], []).append(n)
    m = T // 2
    if m - 1 not in by_step or m not in by_step:
        raise NoLoop("the middle steps of the loop compute nothing")
    if m == T - 1:
        # two steps: the template is the last step, which also holds the code after the loop that
        # gathers both steps' values (``torch.stack(outs)``) or reads the last state with values no
        # earlier step reads (a ragged last block of MiniMax's loop); that code is no part of a step
        start = min(pos[n] for n in by_step[m])

        def foreign(a):     # computed in the last step and unlike anything computed before it
            return a not in label and a.op == "call_function" and pos.get(a, -1) > start and \
                all(pos.get(x, -1) > start for x in members.get(canon.get(a, a), [a]))

        after = _gathers(by_step[m], label, m, foreign)
        by_step[m] = [n for n in by_step[m] if n not in after]
        if not by_step[m]:
            raise NoLoop("the middle steps of the loop compute nothing")
    # 3. the template: roles of the arguments of step m's nodes
    prev_index = {n: k for k, n in enumerate(by_step[m - 1])}
    here_index = {n: k for k, n in enumerate(by_step[m])}

    def role(a):
        if isinstance(a, (list, tuple)):
            return ("T", type(a), tuple(role(e) for e in a))
        if isinstance(a, torch.fx.Node):
            if a in here_index:
                return ("L", here_index[a])
            if a in prev_index:
                return ("P", prev_index[a])
            if a in label:
                raise NoLoop("a step reads a value computed two or more steps before (not a first-order recurrence)")
            return ("I", canon.get(a, a))
        return ("C", a)

    loop.template, loop.mid = by_step[m], m
    for n in loop.template:
        if n in step_of_seed:
            loop.roles.append(None)
        else:
            loop.roles.append((role(tuple(n.args)), {k: role(v) for k, v in n.kwargs.items()}))
    loop.carried = _carried(loop.roles)
    # 4. match steps from the first on; the loop is the longest run of matching steps
    seeds = {}
    for r in runs:
        for n, i in zip(r.nodes, r.indices):
            seeds.setdefault((r.family, i), []).append(n)
    ctx = _Match(loop, seeds, canon, label, members)
    ctx.loop_seeds = step_of_seed
    # two steps whose template lacks the update only a third step would read: _take_first_step_update
    # reads the first step's layout itself, so carried roles are renumbered only where all have a node
    _reindex_carried(loop, ctx, by_step[m - 1], m - 1, partial=m < T - 1)
    lo = None
    for start in range(0, min(3, m)):
        if ctx.step(start, first=True):
            lo = start
            break
    if lo is None:
        raise NoLoop("no step of the loop body matches its middle step (the body differs between steps"
                     + _unmatched(getattr(ctx, "unmatched", None), label) + ")")
    if last_may_drop and T == 2 and lo == 0:
        # two steps, the second (the template) lacking the update the first computes for it: the
        # template takes the first step's update, read with its initial values as carried ones
        dropped = _take_first_step_update(loop, by_step[0], ctx, canon)
        if dropped:
            loop.inst = {}
            if not ctx.step(0, first=True) or not ctx.step(1, first=False, droppable=dropped):
                raise NoLoop("the two steps of the loop differ (the second lacks the first's state update "
                             "and the rest does not match)")
            loop.lo, loop.hi = 0, 1
            return loop
    hi = lo
    while hi + 1 < T and ctx.step(hi + 1, first=False):
        hi += 1
    if last_may_drop and hi == T - 2 and m < T - 1:
        # the last step may lack what only the next step would have read: the program drops the state
        # after the loop (``S = None`` unless a final state is asked for), so Dynamo removed the last
        # state update as dead code.  Match the rest of the step; rebuild_dropped makes it whole
        dead = _feeds_next_step_only(loop.template, set(by_step.get(m + 1, ())))
        if dead and ctx.step(T - 1, first=False, droppable=dead):
            hi = T - 1
    if hi < m:
        raise NoLoop(f"step {hi + 1} of the loop body differs from the others")
    loop.lo, loop.hi = lo, hi
    return loop


def _substeps(runs: list[Run], pos: dict) -> str | None:
    """Why a loop whose inputs are read at different rates does not re-roll: a family sliced n >= 2 times
    between each two slices of another (Gated DeltaProduct reads n keys per query, k[:, n·t + j]), so the
    finder's steps (one index of each family) would be sub-steps of the program's; None otherwise."""
    lengths = {len(r.indices) for r in runs}
    short, long = min(lengths), max(lengths)
    if short < MIN_STEPS or long % short or long // short < 2:
        return None
    n = long // short
    dense = next(r for r in runs if len(r.indices) == long)
    sparse = next(r for r in runs if len(r.indices) == short)
    at = sorted(pos[x] for x in sparse.nodes)
    dense_at = sorted(pos[x] for x in dense.nodes)
    if any(bisect.bisect_left(dense_at, b) - bisect.bisect_right(dense_at, a) != n for a, b in zip(at, at[1:])):
        return None     # not interleaved n to 1 (a buffer's initial slots written before the loop, ...)
    name = lambda r: getattr(r.family[0], "name", r.family[0])  # noqa: E731
    return (f"the loop reads {n} slices of {name(dense)} per slice of {name(sparse)} (sub-steps, as Gated "
            f"DeltaProduct's {n} Householder steps per token): a re-rolled step reads one slice of each input")


def _writes_into(node: torch.fx.Node) -> bool:
    """Whether seed ``node``'s one use is a ``copy_`` into it (a per-step buffer write's destination)."""
    users = list(node.users)
    return len(users) == 1 and users[0].target is aten.copy_.default and users[0].args[0] is node


def _writes_and_reads(runs: list[Run]) -> tuple[list[Run], list[Run]]:
    """(runs of write destinations, the runs that read), leaving out a read followed by writes."""
    writes = [r for r in runs if all(_writes_into(n) for n in r.nodes)]
    others = [r for r in runs if not any(r is w for w in writes) and not all(_writes_into(n) for n in r.nodes[1:])]
    return writes, others


def _span(runs: list[Run]) -> tuple[int, int]:
    return min(min(r.indices) for r in runs), max(max(r.indices) for r in runs)


def _initial_slot_dropped(runs: list[Run]) -> list[Run]:
    """``runs`` without the slot of a recurrence's initial state in a run of write destinations:
    a read of h[:, 0] followed by the writes h[:, t + 1], or the write h[:, 0] = h0 before the loop
    followed by them (a forward run one index longer than the reads).  The first step reads that slot;
    it is no step's seed."""
    def tail(r):
        return Run(r.family, r.nodes[1:], r.indices[1:], r.step)
    runs = [tail(r) if len(r.nodes) > MIN_STEPS and not _writes_into(r.nodes[0]) and
            all(_writes_into(n) for n in r.nodes[1:]) else r for r in runs]
    writes, others = _writes_and_reads(runs)
    if not writes or not others:
        return runs
    lo, hi = _span(others)
    return [tail(r) if any(r is w for w in writes) and r.step == 1 and r.indices[0] == lo and
            r.indices[-1] == hi + 1 and len(r.nodes) > MIN_STEPS else r for r in runs]


def _write_offsets(runs: list[Run]) -> dict:
    """family -> k for each run of write destinations whose indices are those of the other runs shifted
    by k = ±1 (``h[:, t + 1] = a[:, t] * h[:, t] + x[:, t]`` writes one index ahead of its reads): the
    write of step t goes to index(t) + k.  Whether the shifted writes really belong to the steps is
    what matching the steps proves (a misplaced write makes the steps differ)."""
    writes, others = _writes_and_reads(runs)
    if not writes or not others:
        return {}
    lo, hi = _span(others)
    out = {}
    for r in writes:
        k = min(r.indices) - lo
        if k in (-1, 1) and max(r.indices) - k == hi:
            out[r.family] = k
    return out


_GATHERS = (aten.stack.default, aten.cat.default)


def _gathers(last: list, label: dict, s: int, foreign=None) -> set:
    """The nodes of the last step ``s`` (in program order) that are code after the loop: a stack or
    cat of values of step s and of an earlier step, a node that reads a value computed outside the
    steps for which ``foreign`` holds, and every node of step s that reads one."""
    after: set = set()
    for n in last:
        if foreign is not None and any(foreign(a) for a in n.all_input_nodes):
            after.add(n)
            continue
        if n.target in _GATHERS and n.args and isinstance(n.args[0], (list, tuple)):
            steps = {label.get(a, -1) for a in n.args[0] if isinstance(a, torch.fx.Node)}
            if s in steps and any(0 <= x < s for x in steps):
                after.add(n)
                continue
        if any(a in after for a in n.all_input_nodes):
            after.add(n)
    return after


def _state_functions(labeled: list, label: dict, seeds: dict) -> set:
    """The labeled nodes that may start the next step: computed from invariants and from values of
    their own step that are that step's state, i.e. values a next step reads (carried), values another
    node of the step also reads (the state the step reads out), or such functions in turn; ``labeled``
    is in graph order.  Seeds, and a value only the candidate reads that is made from the step's own
    slices (``k_iᵀ·v_i`` added after step i's readout), are not state."""
    out: set = set()

    def state(a, n) -> bool:
        if a not in label:
            return True
        if label[a] != label[n] or a in seeds:
            return False
        return a in out or any(label.get(u, -2) == label[a] + 1 or (u is not n and label.get(u) == label[a])
                               for u in a.users)

    for n in labeled:
        if n not in seeds and all(state(a, n) for a in n.all_input_nodes):
            out.add(n)
    return out


def _reindex_carried(loop: Loop, ctx: "_Match", prev_nodes: list, t: int, partial: bool = True) -> None:
    """Carried roles ("P", k) index the nodes of step t = m - 1 in program order, which is the template's
    order only where step t is laid out as the template is.  The first step may not be: its update from
    a zero initial state (S·γ with S = 0) is an invariant, no node of the step.  Match step t on its own
    (its carried values bound freely, as a first step's are) and renumber k to the template index of the
    node it names; a node without one gets an index no step has (the match then fails as before), or,
    without ``partial``, the roles stay as they are."""
    if not ctx.step(t, first=True):
        loop.inst.pop(t, None)
        return
    inst = loop.inst.pop(t)
    loop.init = {}
    where = {n: k for k, n in enumerate(inst) if n is not None}
    size = len(loop.template)
    remap = {k: where.get(n, size + k) for k, n in enumerate(prev_nodes)}
    used = loop.carried
    if all(remap[k] == k for k in used) or (not partial and any(remap[k] >= size for k in used)):
        return

    loop.roles = _map_carried(loop.roles, remap.__getitem__)
    loop.carried = _carried(loop.roles)


def _feeds_next_step_only(template: list, next_step: set) -> set:
    """Indices of the template nodes whose every user is in the next step or is another such node:
    the state update the next step reads, which a last step may lack."""
    index = {n: j for j, n in enumerate(template)}
    feeds: set = set()
    for j in reversed(range(len(template))):
        users = template[j].users
        if users and all(u in next_step or index.get(u) in feeds for u in users):
            feeds.add(j)
    return feeds


def _take_first_step_update(loop: Loop, first: list, ctx: "_Match", canon: dict) -> set:
    """For a loop of two steps whose second step (the template) lacks the state update only a third
    step would read: append to the template the first step's nodes the second reads that have no
    counterpart in it (and their producers of the first step), with roles in which the first step's
    initial values are the carried values they stand for; renumber carried roles to template indices.
    Returns the appended indices (empty when the template is whole); raises NoLoop when the first step
    cannot be read this way."""
    matched = {n: j for j, n in enumerate(loop.inst[0]) if n is not None}
    here = set(first)
    p_nodes = {first[r[1]] for roles in loop.roles if roles for r in _walk_roles(roles)
               if r[0] == "P" and r[1] < len(first)}
    if all(n in matched for n in p_nodes):
        return set()
    # a slice at the first step's index of a tensor the loop slices per step, read by the update alone:
    # one member, so no run made it a seed (the second step's copy was dropped with the update)
    families = {r.family for r in loop.runs}
    first_index = loop.index(0)

    def lone_seed(n):
        key = _seed_key(n)
        return key is not None and any(f[:2] == key[:2] for f in families) \
            and key[3] == first_index

    memo: dict = {}

    def per_step(n):    # computed from such a slice (outside the steps: no run labeled it)
        if n not in memo:
            memo[n] = n.op == "call_function" and (lone_seed(n) or any(per_step(a) for a in n.all_input_nodes
                                                                       if a not in matched and a not in here))
        return memo[n]

    # an invariant the update computes from an initial value alone (``S·γ`` with S = zeros at the first
    # step, the same at every step, so no step labeled it) is the update's own node too
    init_nodes = {v for v in loop.init.values() if isinstance(v, torch.fx.Node)}

    def from_init(n):
        return n.op == "call_function" and n not in matched and n not in here and \
            any(a in init_nodes for a in n.all_input_nodes) and \
            all(a in init_nodes or a not in ctx.label for a in n.all_input_nodes)

    extra, lone, stack = set(), [], [n for n in p_nodes if n not in matched]
    while stack:
        n = stack.pop()
        if n in extra:
            continue
        extra.add(n)
        if lone_seed(n):
            same = [m for m in ctx.seeds.get((_seed_key(n)[:3], first_index), ()) if m in matched]
            if same:    # the same view of the same tensor as a seed of the step: read that one
                n.replace_all_uses_with(same[0])
                extra.discard(n)
                lone.append(n)
            else:
                ctx.seeds.setdefault((_seed_key(n)[:3], first_index), []).append(n)
                ctx.loop_seeds[n] = 0
            continue
        stack.extend(a for a in n.all_input_nodes if a not in matched and (a in here or per_step(a) or from_init(a)))
    order = {n: i for i, n in enumerate(first[0].graph.nodes)}
    extra_list, seen, gone = [], {}, lone[:]
    for n in sorted(extra, key=order.__getitem__):
        # the update's slices now read the step's own seeds: copies of one expression (decay[:, :, i, -1]
        # written twice) become one, so that matching them is not ambiguous
        try:
            key = (n.target, _hashable(n.args), _hashable(n.kwargs))
        except TypeError:
            key = None
        if key is not None and key in seen and n not in ctx.loop_seeds:
            n.replace_all_uses_with(seen[key])
            gone.append(n)
            continue
        if key is not None:
            seen[key] = n
        extra_list.append(n)
    extra = set(extra_list)
    for n in sorted(gone, key=order.__getitem__, reverse=True):   # dead now: no candidate to match
        if not n.users:
            n.graph.erase_node(n)
    base = len(loop.template)
    index = {**matched, **{n: base + i for i, n in enumerate(extra_list)}}

    def carried(k):    # a P role of the template (a position in the first step) -> a template index
        if k >= len(first) or first[k] not in index:
            raise NoLoop("the second step reads a value of the first step that is neither matched nor its update")
        return index[first[k]]

    inits = {}    # initial value -> the carried template index it stands for
    for k, v in loop.init.items():
        if isinstance(v, torch.fx.Node):
            inits.setdefault(v, carried(k))

    def role(a):
        if isinstance(a, (list, tuple)):
            return ("T", type(a), tuple(role(e) for e in a))
        if isinstance(a, torch.fx.Node):
            if a in extra:
                return ("L", index[a])
            if a in inits:
                return ("P", inits[a])
            if a in matched:
                return ("L", matched[a])
            if a in here:
                raise NoLoop("the first step's update reads a value the second step does not compute")
            return ("I", canon.get(a, a))
        return ("C", a)

    loop.roles = _map_carried(loop.roles, carried)
    for n in extra_list:
        loop.template.append(n)
        loop.roles.append(None if n in ctx.loop_seeds else (role(tuple(n.args)), {k: role(v) for k, v in n.kwargs.items()}))
    loop.carried = _carried(loop.roles)
    return set(range(base, len(loop.template)))


def rebuild_dropped(graph: torch.fx.Graph, loop: Loop, pos: dict) -> None:
    """Insert the template nodes the last step lacks (its ``loop.inst`` entries left None by
    ``last_may_drop``), each from its roles at that step (a seed as the slice at the step's index),
    after every node of the step and its arguments; they are dead until the loop is rewritten (and
    ``loop.rebuilt`` tells the caller to remove them if it is not).  ``pos`` is renumbered."""
    t = loop.hi
    nodes, prev = loop.inst[t], loop.inst.get(t - 1)
    if all(n is not None for n in nodes):
        return
    seed_index = {}     # (checked before the graph is touched)
    for j, tmpl in enumerate(loop.template):
        if nodes[j] is None and loop.roles[j] is None:
            _, d, _, i = _seed_key(tmpl)
            i += loop.index(t) - loop.index(loop.mid)
            size = val(tmpl.args[0]).shape[d]
            if i < 0 or not isinstance(size, int) or i >= size:
                raise NoLoop(f"the last step's dropped update would read {tmpl.args[0].name}[{i}] along axis {d}, "
                             "which the program does not have")
            seed_index[j] = i
    loop.rebuilt = True

    def resolve(r):
        kind = r[0]
        if kind == "T":
            return r[1](resolve(e) for e in r[2])
        if kind == "L":
            return nodes[r[1]]
        if kind == "P":
            return prev[r[1]]
        return r[1]     # "I": the invariant's node; "C": the constant

    order = {n: i for i, n in enumerate(graph.nodes)}
    anchor = max((n for n in nodes if n is not None), key=order.__getitem__)
    for j, tmpl in enumerate(loop.template):
        if nodes[j] is not None:
            continue
        if loop.roles[j] is None:          # a seed: its slice moved from the template's step to this one
            i = seed_index[j]
            args = list(tmpl.args)
            if tmpl.target is aten.slice.Tensor:
                args[2:4] = [i, i + 1]
            else:
                args[2] = i
            args, kwargs = tuple(args), dict(tmpl.kwargs)
        else:
            args_r, kwargs_r = loop.roles[j]
            args, kwargs = resolve(args_r), {k: resolve(v) for k, v in kwargs_r.items()}
        reads: list = []
        torch.fx.node.map_arg((args, kwargs), reads.append)
        anchor = max(reads + [anchor], key=order.__getitem__)
        with graph.inserting_after(anchor):
            new = graph.call_function(tmpl.target, args, kwargs)
        copy_meta(new, tmpl)
        new.meta["val"] = fake_call(tmpl.target, args, kwargs)
        # right after the anchor, before the node that followed it (the step's inserts stay below 1 apart)
        order[new] = order[anchor] + 1 / (len(nodes) + 1)
        nodes[j] = anchor = new
    pos.clear()
    pos.update({n: i for i, n in enumerate(graph.nodes)})


def _unmatched(node, label) -> str:
    """What the middle step computes that an earlier step does not: the op, and the values it
    reads from outside the steps (each step reading another one: a mask or number built from the
    Python loop index, as ``arange(C) < i``)."""
    if node is None:
        return ""
    name = str(getattr(getattr(node.target, "overloadpacket", node.target), "__name__", node.target))
    outside = [a.name for a in node.all_input_nodes if a not in label]
    if not outside:
        return f": no {name} like the middle step's"
    return (f": no {name} like the middle step's, which reads {', '.join(outside)} computed outside the steps; "
            f"when each step reads its own such value, as a mask built from the Python loop index "
            f"(arange(C) < i), the steps differ")


def _starts(u, s, label) -> bool:
    """Whether ``u`` is computed in step s from steps s-1 and s only (not a collector of all steps)."""
    return label.get(u, -2) == s and all(label.get(a, s) >= s - 1 for a in u.all_input_nodes)


def _map_carried(roles: list, f) -> list:
    """``roles`` (the template's, None for seeds) with each carried role ("P", k) made ("P", f(k))."""
    def fix(r):
        if r[0] == "T":
            return ("T", r[1], tuple(fix(e) for e in r[2]))
        return ("P", f(r[1])) if r[0] == "P" else r

    return [None if r is None else (fix(r[0]), {k: fix(v) for k, v in r[1].items()}) for r in roles]


def _carried(roles: list) -> list:
    """The template indices the carried roles ("P", k) of ``roles`` name, sorted."""
    return sorted({r[1] for n_roles in roles if n_roles for r in _walk_roles(n_roles) if r[0] == "P"})


def _walk_roles(r):
    args, kwargs = r
    stack = [args, *kwargs.values()]
    while stack:
        x = stack.pop()
        if x[0] == "T":
            stack.extend(x[2])
        else:
            yield x


def _canon_args(x, canon):
    if isinstance(x, (list, tuple)):
        return type(x)(_canon_args(e, canon) for e in x)
    if isinstance(x, dict):
        return {k: _canon_args(v, canon) for k, v in x.items()}
    if isinstance(x, torch.fx.Node):
        return canon.get(x, x)   # nodes before the loop stand for themselves
    return x


class _Match:
    """Instantiates the template at one step at a time (binding carried roles at the first)."""

    def __init__(self, loop: Loop, seeds, canon, label, members):
        self.loop, self.seeds, self.canon, self.label, self.members = loop, seeds, canon, label, members
        self.family: dict[int, tuple] = {}

    def step(self, t: int, first: bool, droppable: frozenset | set = frozenset()) -> bool:
        """Match step t against the template.  ``droppable``: template entries the step may lack (left
        None), as may every entry reading a lacking one."""
        loop = self.loop
        self._t, self._first = t, first
        nodes: list = [None] * len(loop.template)
        claimed: set = set()
        init: dict[int, Any] = {}
        prev = None if first else loop.inst[t - 1]
        pending = list(range(len(loop.template)))
        dropped: set = set()
        for attempt in range(3):  # a node reading only unbound carried roles waits for one pass
            waiting = []
            for j in pending:
                if j in droppable and loop.roles[j] is not None and \
                        any(r[0] == "L" and r[1] in dropped for r in _walk_roles(loop.roles[j])):
                    dropped.add(j)
                    continue
                got = self._one(j, t, nodes, prev, init, claimed, attempt == 2)
                if got is None and j in droppable:
                    dropped.add(j)
                    continue
                if got is None:
                    self.unmatched = loop.template[j]     # for the near miss
                    return False
                if got is False:
                    waiting.append(j)
            pending = waiting
            if not pending:
                break
        if droppable:
            dropped |= {j for j in pending if j in droppable}
            pending = [j for j in pending if j not in droppable]
            if not dropped:
                return False
        for j in reversed(pending):   # found through a matched user (users before producers) (first step: reads only unbound carried values)
            cand = init.get(("L", j))
            if cand is None or self._among(j, t, [cand], nodes, prev, init, claimed) is None:
                return False
        loop.inst[t] = nodes
        if first:
            loop.init = {k: v for k, v in init.items() if isinstance(k, int)}
        return True

    def _one(self, j, t, nodes, prev, init, claimed, via_invariants=False):
        """The node of template entry j at step t; None if there is none, False if it must wait.
        ``via_invariants``: look among the users of its invariant arguments (the first step only)."""
        loop = self.loop
        tmpl = loop.template[j]
        if loop.roles[j] is None:  # a seed
            fam = self.family.get(j)
            if fam is None:
                fam = self.family[j] = _seed_key(tmpl)[:3]
            cands = self.seeds.get((fam, loop.index(t)), [])
            for c in cands:
                if c not in claimed:
                    claimed.add(c)
                    nodes[j] = c
                    return c
            return None
        args_r, kwargs_r = loop.roles[j]
        # an argument already known at this step whose users hold the candidate
        anchor = self._known(args_r, nodes, prev, init)
        if anchor is None:
            anchor = self._known_kw(kwargs_r, nodes, prev, init)
        if anchor is None and via_invariants:
            inv = next((r[1] for r in _walk_roles(loop.roles[j]) if r[0] == "I"), None)
            if inv is not None:
                return self._among(j, t, [u for m in self.members.get(inv, [inv]) for u in m.users],
                                   nodes, prev, init, claimed)
        if anchor is None:
            return False
        return self._among(j, t, anchor.users, nodes, prev, init, claimed)

    def _among(self, j, t, cands, nodes, prev, init, claimed):
        loop = self.loop
        tmpl = loop.template[j]
        args_r, kwargs_r = loop.roles[j]
        for cand in cands:
            if cand in claimed or cand.target is not tmpl.target or len(cand.args) != len(tmpl.args) \
                    or cand.kwargs.keys() != tmpl.kwargs.keys():
                continue
            if init.get(("L", j), cand) is not cand:
                continue   # a matched user already read another node here
            lab = self.label.get(cand, -1)
            if lab != t and not (lab == -1 and self._first):   # the first step may read only initial values
                continue
            trial = dict(init)
            if self._same(args_r, tuple(cand.args), nodes, prev, trial) and \
                    all(self._same(kwargs_r[k], cand.kwargs[k], nodes, prev, trial) for k in kwargs_r):
                init.update(trial)
                claimed.add(cand)
                nodes[j] = cand
                return cand
        return None

    def _known(self, r, nodes, prev, init):
        kind = r[0]
        if kind == "T":
            for e in r[2]:
                a = self._known(e, nodes, prev, init)
                if a is not None:
                    return a
            return None
        if kind == "L":
            return nodes[r[1]]
        if kind == "P":
            if prev is not None:
                return prev[r[1]] if r[1] < len(prev) else None
            v = init.get(r[1])
            return v if isinstance(v, torch.fx.Node) else None
        return None

    def _known_kw(self, kwargs_r, nodes, prev, init):
        for r in kwargs_r.values():
            a = self._known(r, nodes, prev, init)
            if a is not None:
                return a
        return None

    def _same(self, r, a, nodes, prev, init) -> bool:
        kind = r[0]
        if kind == "T":
            return isinstance(a, (list, tuple)) and len(a) == len(r[2]) and \
                all(self._same(e, x, nodes, prev, init) for e, x in zip(r[2], a))
        if kind == "L":
            if nodes[r[1]] is None:   # not matched yet (first step): bind tentatively, verified later
                key = ("L", r[1])
                if key in init:
                    return a is init[key]
                if not isinstance(a, torch.fx.Node) or self.label.get(a, -1) not in (self._t, -1):
                    return False
                init[key] = a
                return True
            return a is nodes[r[1]]
        if kind == "P":
            if prev is not None:   # a step shorter than the template carries fewer values: no match
                return r[1] < len(prev) and a is prev[r[1]]
            if isinstance(a, torch.fx.Node) and self.label.get(a, -1) >= self._t:
                return False  # an initial value comes from before the step
            if r[1] in init:
                b = init[r[1]]
                return a is b if isinstance(a, torch.fx.Node) or isinstance(b, torch.fx.Node) else same_value(a, b)
            init[r[1]] = a
            return True
        if kind == "I":
            return isinstance(a, torch.fx.Node) and self.canon.get(a, a) is r[1]
        return not isinstance(a, torch.fx.Node) and same_value(a, r[1])


#: ops whose result aliases their first argument (a view taken at any point reads the same memory)
_VIEWS = (aten.unsqueeze, aten.squeeze, aten.permute, aten.transpose, aten.expand, aten.view, aten.movedim,
          aten.t, aten.alias, aten.select, aten.slice, aten.diagonal, aten.unflatten)


def share_slice_sources(graph: torch.fx.Graph) -> bool:
    """Per-step slices of one view recomputed at every step read the first copy of that view.

    Dynamo unrolls ``C[:, None, i]`` into ``select(unsqueeze(C, 1), 2, i)`` with a new
    ``unsqueeze(C, 1)`` per step, so each step's slice would be a family of its own.  Equal chains
    of views of one tensor (same ops, same arguments) alias the same memory wherever they are
    taken, so every slice can read the first one.  Returns whether a slice was changed."""
    table: dict = {}
    canon: dict = {}
    changed = False
    for node in graph.nodes:
        if node.op == "call_function" and is_op(node, *_VIEWS):
            try:
                key = (node.target, _hashable(_canon_args(node.args, canon)), _hashable(_canon_args(node.kwargs, canon)))
            except TypeError:
                continue
            canon[node] = table.setdefault(key, node)
        if _seed_key(node) is not None:
            x = node.args[0]
            first = canon.get(x, x)
            if first is not x:
                node.replace_input_with(x, first)
                changed = True
    return changed


def aliases(node: torch.fx.Node) -> set:
    """Every node that may share memory with ``node``: the base it is a view of (through the view ops
    above) and every view taken of that base, at any depth."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and is_op(node, *_VIEWS) \
            and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    out, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in out:
            continue
        out.add(n)
        stack.extend(u for u in n.users if u.op == "call_function" and is_op(u, *_VIEWS) and u.args[0] is n)
    return out


def check_buffer_reads(loop: Loop, writes: list, body: set, pos: dict, first: int, last: int) -> None:
    """NoLoop unless the buffers of the per-step writes ``writes`` ([(copy_ entry, destination seed entry,
    source role)]) are only written by the loop: no entry of the body reads a destination (but its own
    copy_), no node of the body reads the buffer through any other alias, and no code outside the body
    reads it between the loop's first and last node (positions ``pos``)."""
    dest_entries = {s for _, s, _ in writes}
    for j, roles in enumerate(loop.roles):
        if roles is None:
            continue
        for w, r in enumerate(roles[0][2]):
            if r[0] == "L" and r[1] in dest_entries and not (loop.template[j].target is aten.copy_.default and w == 0):
                raise NoLoop("the loop reads the buffer it writes its outputs into")
    dests = {loop.inst[t][s] for _, s, _ in writes for t in loop.steps}
    copies = {loop.inst[t][j] for j, _, _ in writes for t in loop.steps}
    for _, s, _ in writes:
        buf = loop.template[s].args[0]
        key = _seed_key(loop.template[s])
        written = {_seed_key(loop.inst[t][s])[3] for t in loop.steps}
        for a in aliases(buf):
            if a in body and a not in dests:
                raise NoLoop("the loop reads the buffer it writes its outputs into")
            for u in a.users:
                if u in body and u not in copies and a in dests:
                    raise NoLoop("the loop reads the buffer it writes its outputs into")
                other = _seed_key(u)
                if a is buf and key[2] == "select" and other is not None and other[:3] == key[:3] and \
                        other[3] not in written:
                    continue    # a slot the loop does not write (the initial state h[:, 0] of a recurrence
                    #             written one index ahead)
                if u not in body and first < pos[u] < last:
                    raise NoLoop("the output buffer is used inside the loop by code outside the loop body")
