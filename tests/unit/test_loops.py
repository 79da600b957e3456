"""The loop re-roller on canonical graphs: every step of each golden form is matched (no step
left unrolled), carried values are found, and the linearity verdicts name the reason."""
import os
import sys

import pytest
import torch

import seqfuse

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "golden"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import test_recurrence_loops as forms  # noqa: E402
from seqfuse.compiler.canonicalize import canonicalize  # noqa: E402
from seqfuse.passes.loop_linear import Analysis  # noqa: E402
from seqfuse.passes.loop_reroll import NoLoop, find_runs, group_loops, reroll  # noqa: E402

T = 10


def loops_of(fn, *args):
    """Every re-rolled loop of ``fn``'s canonical graph (the graph is not rewritten)."""
    found = []

    def backend(gm, example_inputs):
        canon = canonicalize(gm, example_inputs)
        graph = canon.graph
        pos = {n: i for i, n in enumerate(graph.nodes)}
        for group in group_loops(find_runs(graph), pos):
            try:
                found.append(reroll(graph, group, pos))
            except NoLoop as e:
                found.append(e)
        return gm.forward

    torch.compile(fn, backend=backend)(*args)
    return found


r = torch.randn
FORMS = [
    ("hf_mamba", forms.hf_mamba_slow, lambda: (r(2, 6, T), torch.rand(2, 6, T), -torch.rand(6, 4), r(2, T, 4),
                                                r(2, T, 4), r(6), r(2, 6, T)), 1),
    ("selective_scan_ref", forms.selective_scan_ref, lambda: (r(2, 6, T), torch.rand(2, 6, T), -torch.rand(6, 4),
                                                               r(2, 4, T), r(2, 4, T), r(6), r(2, 6, T)), 1),
    ("hgrn", forms.hgrn, lambda: (r(2, T, 8), -torch.rand(2, T, 8)), 1),
    ("reversed_h0", forms.hgrn_h0_reversed, lambda: (r(2, T, 8), -torch.rand(2, T, 8), r(2, 8)), 1),
    ("lru", forms.lru, lambda: (r(2, T, 4), r(6), r(6), r(6, 4), r(6, 4), r(6, 4), r(6, 4)), 1),
    ("gla", forms.naive_recurrent_gla, lambda: (r(2, 3, T, 4), r(2, 3, T, 4), r(2, 3, T, 5), r(2, 3, T, 4)), 1),
    ("linear_attn", forms.naive_recurrent_linear_attn, lambda: (r(2, T, 3, 4), r(2, T, 3, 4), r(2, T, 3, 5)), 1),
    ("retnet", forms.retnet_recurrent, lambda: (r(2, 3, T, 4), r(2, 3, T, 4), r(2, 3, T, 5)), 1),
    ("mamba2", forms.mamba2_recurrent, lambda: (r(2, T, 3, 4), torch.rand(2, T, 3), -torch.rand(3), r(2, T, 5),
                                                r(2, T, 5)), 1),
    ("two_scans", forms.two_scans, lambda: (r(2, T, 5), r(2, T, 5), r(2, T, 5)), 2),
]


@pytest.mark.parametrize("name,fn,args,carried", FORMS, ids=[f[0] for f in FORMS])
def test_every_step_is_matched(name, fn, args, carried):
    (loop,) = loops_of(fn, *args())
    assert not isinstance(loop, NoLoop), loop
    assert (loop.lo, loop.hi) == (0, T - 1), (loop.lo, loop.hi)
    assert len(loop.carried) == carried
    an = Analysis(loop)
    for k in loop.carried:
        lin = an.update(k)
        assert lin.state == k and len(lin.terms) >= 1


def test_bidirectional_pair_is_two_loops():
    loops = loops_of(forms.bidirectional, r(2, T, 5), r(2, T, 5))
    assert [lp.reverse for lp in loops] == [False, True]
    assert all((lp.lo, lp.hi) == (0, T - 1) for lp in loops)


@pytest.mark.parametrize("fn,args,reason", [
    (forms.tanh_rnn, lambda: (r(2, T, 4), r(4)), "applies aten.tanh to the state"),
    (forms.square_rnn, lambda: (r(2, T, 4),), "multiplied by itself"),
    (forms.lstm_cell_loop, lambda: (r(2, T, 3), r(3, 16), r(4, 16), r(16)), "coupled"),
])
def test_nonlinear_updates_are_refused_with_reason(fn, args, reason):
    (loop,) = loops_of(fn, *args())
    an = Analysis(loop)
    with pytest.raises(NoLoop, match=reason):
        for k in loop.carried:
            an.update(k)


def test_qkv_unbind_is_not_a_loop():
    # three selects of one tensor (q, k, v = qkv[0], qkv[1], qkv[2]) are no loop with a carried value
    def attn(qkv):
        q, k, v = qkv[0], qkv[1], qkv[2]
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v
    found = loops_of(attn, r(3, 2, 8, 4))
    assert all(isinstance(x, NoLoop) or not x.carried for x in found)


def _chunk_loop(fn, *args):
    """(reroll with updates moved, the duplicate runs merged, the loop read by the loops pass) of
    ``fn``'s one loop."""
    from seqfuse.passes.loops import _merge_duplicate_runs, _reroll
    found = []

    def backend(gm, example_inputs):
        graph = canonicalize(gm, example_inputs).graph
        pos = {n: i for i, n in enumerate(graph.nodes)}
        (group,) = group_loops(find_runs(graph), pos)
        try:
            moved = reroll(graph, group, pos)
        except NoLoop as e:
            moved = e
        merged = _merge_duplicate_runs(graph, group, pos, {n for r in group for n in r.nodes})
        found.append((moved, len(group) - len(merged), _reroll(graph, merged, {n: i for i, n in enumerate(graph.nodes)})))
        return gm.forward

    torch.compile(fn, backend=backend)(*args)
    return found[0]


def test_chunk_loop_updating_from_its_own_slices():
    """A loop over chunks that updates the state from step i's own slices after step i's readout:
    the update is made from step i's slices, so even the reading that moves updates to the step that
    reads them keeps it in step i (moved, step i+1 would read step i's slices); each chunk is one step
    with one linear state."""
    from golden.test_ssd_chunks import chunk_loop_gla, gla_inputs
    moved, merged, loop = _chunk_loop(chunk_loop_gla, *[z.detach() for z in gla_inputs(t=40)])
    assert not isinstance(moved, NoLoop) and merged == 0, moved
    assert [n.name for n in moved.template] == [n.name for n in loop.template]
    assert (loop.lo, loop.hi) == (0, 4) and len(loop.carried) == 1
    lin = Analysis(loop).update(loop.carried[0])
    assert len(lin.coef) == 1 and len(lin.terms) == 1


def test_fla_chunk_loop_duplicate_slices_are_merged():
    """fla's naive_chunk_simple_gla reads ``decay[:, :, i]`` in four expressions of the body: four
    runs of the same slices, merged into one before the steps are matched."""
    naive = pytest.importorskip("fla.ops.simple_gla.naive")

    def fn(q, k, v, g, h0):
        return naive.naive_chunk_simple_gla(q, k, v, g, initial_state=h0, output_final_state=True, chunk_size=8)

    moved, merged, loop = _chunk_loop(fn, r(1, 32, 2, 4), r(1, 32, 2, 4), r(1, 32, 2, 3), -torch.rand(1, 32, 2),
                                      r(1, 2, 4, 3))
    assert merged == 3, (moved, merged)
    assert (loop.lo, loop.hi) == (0, 3) and len(loop.carried) == 1
    # the update after the readout is made from step i's slices: no reading moves it to step i+1
    assert not isinstance(moved, NoLoop) and (moved.lo, moved.hi) == (0, 3), moved


def _symbols(*hints):
    """Backed SymInts of a fresh ShapeEnv (one symbol per hint)."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    env = ShapeEnv()
    out = []
    for i, h in enumerate(hints):
        src = ConstantSource(f"s_{i}")
        sym = env.create_symbol(h, src, dynamic_dim=DimDynamic.DYNAMIC)
        out.append(env.create_symintnode(sym, hint=h, source=src))
    return env, out


def test_symbolic_sizes_equal_only_when_provably_equal():
    # two symbols with the same hint are not provably equal: the rewrite treats them as different
    # (no guard is added: the hints are never consulted)
    from seqfuse.passes.loop_vectorize import broadcasts_to, known_eq, same_shape

    env, (b, d, n) = _symbols(4, 4, 5)
    assert known_eq(b, b) and known_eq(2 * b, b + b) and known_eq(7, 7)
    assert not known_eq(b, d) and not known_eq(b, 4) and not known_eq(b, 1)
    assert same_shape((b, 6, d), [b, 6, d]) and not same_shape((b, 6, d), (d, 6, b))
    assert broadcasts_to((1, d), (b, 6, d)) and broadcasts_to((6, 1), (b, 6, d))
    assert not broadcasts_to((b,), (b, 6, d)) and not broadcasts_to((n, 6, d), (b, 6, d))
    assert not env.guards


def test_dynamic_loop_is_rerolled_with_symbolic_sizes():
    # with dynamic=True the per-step slices x[:, t] read through whole slices x[:] that make_fx
    # keeps; the loop pass folds those, so every step is found and the scan replaces them
    report = seqfuse.explain(forms.hgrn, torch.randn(3, T, 8), -torch.rand(3, T, 8),
                             options={"downstream": "eager"}, dynamic=True)
    assert report.count("scan") == 1, str(report)
    assert not report.near_misses, str(report)
