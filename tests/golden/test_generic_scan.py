"""``associative_scan(combine_mode="generic")``: Dynamo inlines torch's generic_associative_scan
(vmapped odd/even steps); seqfuse removes the no-op vmaps and replaces the tree of the linear
combine (a_l·a_r, a_r·b_l + b_r) by one seqfuse.scan.  Compiled output and gradients equal
eager; other combines and non-elementwise vmaps are left alone (still equal to eager)."""
import pytest
import torch
from torch._higher_order_ops.associative_scan import associative_scan

import seqfuse
from helpers import BOUND, check_against_eager, rel_err


def linear(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def linear_commuted(left, right):
    # the same operator spelled with its products and sum the other way round
    return right[0] * left[0], right[1] + left[1] * right[0]


def states(a, b, dim, reverse=False, combine=linear):
    return associative_scan(combine, (a, b), dim=dim, reverse=reverse, combine_mode="generic")[1]


def gates_and_inputs(shape):
    a = torch.rand(*shape).mul(0.5).add(0.5).requires_grad_()
    b = torch.randn(*shape, requires_grad=True)
    return a, b


def assert_one_scan(report):
    assert report.count("scan") == 1, str(report)
    assert not report.near_misses, str(report)
    ir = report.rewrites[0].ir
    assert "seqfuse.scan(" in ir and "reverse=false" in ir, ir
    assert "test_generic_scan.py" in report.rewrites[0].location, report.rewrites[0].location
    return ir


@pytest.mark.parametrize("dim", [0, 1, 2])
@pytest.mark.parametrize("t", [2, 3, 8, 13])
def test_linear_combine_is_one_scan(dim, t):
    shape = [3, 4, 5]
    shape[dim] = t
    a, b = gates_and_inputs(shape)
    report = check_against_eager(lambda a, b: states(a, b, dim), a, b)
    assert_one_scan(report)


def test_reverse_is_one_scan():
    a, b = gates_and_inputs((2, 9, 4))
    report = check_against_eager(lambda a, b: states(a, b, 1, reverse=True), a, b)
    assert_one_scan(report)


def test_commuted_spelling_is_one_scan():
    a, b = gates_and_inputs((2, 7, 4))
    report = check_against_eager(lambda a, b: states(a, b, 1, combine=linear_commuted), a, b)
    assert_one_scan(report)


def test_leaves_in_the_other_order():
    # xs = (b, a): the combine's first leaf is the additive one
    def combine(left, right):
        return right[1] * left[0] + right[0], left[1] * right[1]

    def fn(a, b):
        return associative_scan(combine, (b, a), dim=1, combine_mode="generic")[0]

    a, b = gates_and_inputs((2, 6, 3))
    assert_one_scan(check_against_eager(fn, a, b))


def test_one_dimensional_scan():
    a, b = gates_and_inputs((11,))
    assert_one_scan(check_against_eager(lambda a, b: states(a, b, 0), a, b))


def test_mamba_shaped_scan_with_readout_after():
    # HF Mamba's layout: (batch, channels, T, state) scanned along dim 2, then read out with C
    a, b = gates_and_inputs((2, 6, 10, 4))
    c = torch.randn(2, 10, 4, requires_grad=True)

    def fn(a, b, c):
        h = states(a, b, 2)
        return torch.matmul(h.transpose(1, 2), c.unsqueeze(-1)).squeeze(-1)

    assert_one_scan(check_against_eager(fn, a, b, c))


def test_both_results_used():
    # the cumulative product of a (the first result) stays computed by the tree; h is the scan
    a, b = gates_and_inputs((2, 8, 3))

    def fn(a, b):
        p, h = associative_scan(linear, (a, b), dim=1, combine_mode="generic")
        return p, h

    assert_one_scan(check_against_eager(fn, a, b))


def test_length_one_has_no_tree():
    # torch returns the leaves unchanged: no op to replace, nothing to report
    a, b = gates_and_inputs((2, 1, 3))
    report = check_against_eager(lambda a, b: states(a, b, 1), a, b)
    assert report.count("scan") == 0 and not report.near_misses, str(report)


# --- not the linear recurrence: left alone, equal to eager ---------------------------

def max_combine(left, right):
    return torch.maximum(left[0], right[0]), torch.maximum(left[1], right[1])


def quadratic_combine(left, right):
    # a·b + b·b: pointwise, but not the composition of two linear steps
    return left[0] * right[0], left[1] * right[0] + right[1] * right[1]


def swapped_combine(left, right):
    # a_l·b_r + b_l: the later step applied first (a reversed recurrence), not this scan
    return left[0] * right[0], left[0] * right[1] + left[1]


@pytest.mark.parametrize("combine, reason", [
    # only h's result is used, and h's max reads only h: a one-leaf tree
    (max_combine, "over 1 leaves"),
    (quadratic_combine, "not (a_l·a_r, a_r·b_l + b_r)"),
    (swapped_combine, "not (a_l·a_r, a_r·b_l + b_r)"),
])
def test_other_combines_are_a_near_miss(combine, reason):
    a, b = gates_and_inputs((2, 8, 3))
    report = check_against_eager(lambda a, b: states(a, b, 1, combine=combine), a, b)
    assert report.count("scan") == 0, str(report)
    assert [m.kind for m in report.near_misses] == ["scan"], str(report)
    assert reason in report.near_misses[0].reason, report.near_misses[0].reason


def test_single_leaf_cumsum_is_a_near_miss():
    x = torch.randn(2, 8, 3, requires_grad=True)
    report = check_against_eager(lambda x: associative_scan(lambda l, r: l + r, x, dim=1, combine_mode="generic"), x)
    assert report.count("scan") == 0, str(report)
    assert [m.kind for m in report.near_misses] == ["scan"], str(report)
    assert "1 leaves" in report.near_misses[0].reason


def test_vmap_of_a_matmul_stays_refused():
    # the vmapped function is not elementwise: batching is not a no-op, the graph is compiled unchanged
    w = torch.randn(4, 4)

    def fn(x):
        return torch.vmap(lambda r: r @ w)(x)

    x = torch.randn(5, 3, 4, requires_grad=True)
    report = check_against_eager(fn, x)
    assert report.count("scan") == 0 and [m.kind for m in report.near_misses] == ["graph"], str(report)
    assert "not elementwise" in report.near_misses[0].reason


def test_vmap_with_broadcasting_stays_refused():
    # batched inputs of different shapes: logical broadcasting differs from physical broadcasting
    def fn(x, y):
        return torch.vmap(lambda u, v: u * v)(x, y)

    x, y = torch.randn(5, 3, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    report = check_against_eager(fn, x, y)
    assert [m.kind for m in report.near_misses] == ["graph"], str(report)
    assert "differ in shape" in report.near_misses[0].reason


def test_elementwise_vmap_is_removed_and_still_equal():
    # an elementwise vmapped function with equal shapes is just the function
    def fn(x, y):
        return torch.vmap(lambda u, v: torch.exp(u) * v + 1.0)(x, y)

    x, y = torch.randn(5, 3, 4, requires_grad=True), torch.randn(5, 3, 4, requires_grad=True)
    report = check_against_eager(fn, x, y)
    assert not report.near_misses, str(report)


def test_symbolic_batch_and_state_sizes():
    # the length is static (the tree's shape depends on it), the other sizes are symbolic: the
    # rewrite adds no guard, so other batch and state sizes run the same compiled graph
    a, b = gates_and_inputs((2, 7, 3))
    for x in (a, b):
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(x, 2)
    assert_one_scan(check_against_eager(lambda a, b: states(a, b, 1), a, b))
    torch._dynamo.reset()
    seqfuse.reset_counters()
    compiled = torch.compile(lambda a, b: states(a, b, 1), backend="seqfuse", dynamic=None,
                             options={"downstream": "aot_eager"})
    for shape in ((2, 7, 3), (3, 7, 5), (4, 7, 2)):
        a2, b2 = gates_and_inputs(shape)
        for x in (a2, b2):
            torch._dynamo.mark_dynamic(x, 0)
            torch._dynamo.mark_dynamic(x, 2)
        assert rel_err(compiled(a2, b2), states(a2, b2, 1)) < BOUND[torch.float32]
    assert sum(seqfuse.counters()["scan"].values()) == 3, seqfuse.counters()


@pytest.mark.parametrize("t", [8, 13, 40])
def test_symbolic_length_pinned_by_the_guards_is_one_scan(t):
    # the length marked dynamic: the tree's recursion on it left guards (its halvings and their parities)
    # that hold at one length of the symbol's proven range only (pattern.known_int); that length is the
    # tree's.  Outputs and gradients equal eager; one scan
    def fn(a, b):
        return states(a, b, 1)
    a, b = gates_and_inputs((2, t, 3))
    ref_a, ref_b = (x.detach().clone().requires_grad_() for x in (a, b))
    for x in (a, b):
        torch._dynamo.mark_dynamic(x, 1)
    seqfuse.reset_counters()
    compiled = torch.compile(fn, backend="seqfuse", options={"downstream": "aot_eager"})
    out, want = compiled(a, b), fn(ref_a, ref_b)
    w = torch.randn_like(want)
    got_g, want_g = torch.autograd.grad(out, (a, b), w), torch.autograd.grad(want, (ref_a, ref_b), w)
    for o, r in zip((out, *got_g), (want, *want_g)):
        assert rel_err(o, r) < BOUND[torch.float32], rel_err(o, r)
    assert sum(seqfuse.counters()["scan"].values()) == 1, seqfuse.counters()


def test_symbolic_length_too_wide_to_enumerate_is_a_near_miss():
    # dynamic=True at T=2000: the guards leave the length a range wider than PINNED_RANGE, so it stays
    # symbolic (known_int does not enumerate it) and the tree is a near miss saying so
    a, b = gates_and_inputs((1, 2000, 2))
    report = check_against_eager(lambda a, b: states(a, b, 1), a, b, dynamic=True)
    assert report.count("scan") == 0, str(report)
    assert [m.kind for m in report.near_misses] == ["scan"], str(report)
    assert "symbolic" in report.near_misses[0].reason


@pytest.mark.parametrize("shape", [(1, 600, 2), (2, 8, 3)], ids=["T600", "all_sizes_symbolic"])
def test_symbolic_length_pinned_beside_other_symbolic_sizes_is_one_scan(shape):
    # dynamic=True: every size is symbolic and guards on strides (s·t) tie the length to the others;
    # those guards can only rule out more lengths, so the length's own guards, which pin it, decide
    a, b = gates_and_inputs(shape)
    report = check_against_eager(lambda a, b: states(a, b, 1), a, b, dynamic=True)
    assert report.count("scan") == 1 and not report.near_misses, str(report)


def test_pairwise_sum_of_step_2_slices_is_left_alone_silently():
    # x[0:-1:2] + x[1::2] looks like a tree's first level, but nothing interleaves: no near miss
    x = torch.randn(9, 4, requires_grad=True)
    report = check_against_eager(lambda x: x[0:-1:2] * x[1::2] + 1.0, x)
    assert report.count("scan") == 0 and not report.near_misses, str(report)
