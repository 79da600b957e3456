"""The loop re-roller on canonical graphs: every step of each golden form is matched (no step
left unrolled), carried values are found, and the linearity verdicts name the reason."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "golden"))

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
