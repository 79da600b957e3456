"""seqfuse.runtime.values: the one-reduction value checks every fast path and guard refuses calls by.

Each check is compared with its elementwise definition (``isfinite(x).all()``, ``((x >= lo) &
(x <= hi)).all()``, no NaN and no +inf) for one bad element at every position of tensors whose
sizes cover the vectorized body and the tail of a reduction, in every floating dtype, and for
strided views, empty tensors and 0-dim tensors.
"""
import math

import pytest
import torch

from seqfuse.lowering.guards import within
from seqfuse.runtime import ProgramRequired, all_finite, all_within, below_pos_inf

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BAD = (math.nan, math.inf, -math.inf)


def _positions(n):
    return sorted({0, 1, n // 2, n - 2, n - 1} & set(range(n)))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [1, 7, 33, 257, 4099])
def test_all_finite_equals_the_elementwise_definition(dtype, n):
    x = torch.randn(n).to(dtype)
    assert bool(all_finite(x))
    for bad in BAD:
        for i in _positions(n):
            y = x.clone()
            y[i] = bad
            assert bool(all_finite(y)) == bool(torch.isfinite(y).all()) == False, (bad, i)  # noqa: E712
            assert bool(all_finite(x, y)) is False and bool(all_finite(y, None, x)) is False


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [1, 33, 4099])
def test_all_within_equals_the_elementwise_definition(dtype, n):
    x = torch.rand(n).to(dtype) * 2 - 1  # in [-1, 1]
    for lo, hi in [(-1.0, 1.0), (-0.5, 2.0), (-2.0, 0.25), (0.0, 0.0), (-math.inf, math.inf)]:
        assert bool(all_within(x, lo, hi)) == bool(((x >= lo) & (x <= hi)).all()), (lo, hi)
    for bad in (*BAD, 1.5, -1.5):
        for i in _positions(n):
            y = x.clone()
            y[i] = bad
            want = bool(((y >= -1) & (y <= 1)).all())
            assert want is False and bool(all_within(y, -1.0, 1.0)) is False, (bad, i)
    y = x.clone()
    y[-1] = 1.0  # the bounds themselves are inside
    y[0] = -1.0
    assert bool(all_within(y, -1.0, 1.0))
    assert bool(all_within(y, -1.0, 0.999)) == bool(((y >= -1.0) & (y <= 0.999)).all())
    if dtype in (torch.float32, torch.float64):  # 0.999 is below 1 there (not in bf16)
        assert bool(all_within(y, -1.0, 0.999)) == (n == 1)


@pytest.mark.parametrize("dtype", FLOATS)
def test_below_pos_inf_allows_minus_inf_only(dtype):
    x = torch.randn(300).to(dtype)
    x[5] = -math.inf
    assert bool(below_pos_inf(x))
    for bad in (math.nan, math.inf):
        for i in _positions(300):
            y = x.clone()
            y[i] = bad
            assert not bool(below_pos_inf(y)), (bad, i)


def test_views_empty_scalars_integers_and_complex():
    base = torch.randn(64, 64)
    view = base.t()[::3, 1::2]
    assert bool(all_finite(view))
    base[3, 6] = math.nan  # view[i, j] is base[1 + 2j, 3i]: view[2, 1]
    assert not bool(all_finite(view)) and not bool(all_within(view, -100.0, 100.0))
    base[3, 6] = 0.0
    base[2, 6] = math.nan  # an even row of base: outside the view
    assert bool(all_finite(view)) and bool(all_within(view, -100.0, 100.0))
    for empty in (torch.empty(0), torch.empty(3, 0, 2, dtype=torch.float16)):
        assert bool(all_finite(empty)) and bool(all_within(empty, 0.0, 0.0)) and bool(below_pos_inf(empty))
    assert bool(all_finite(torch.tensor(2.0))) and not bool(all_finite(torch.tensor(math.inf)))
    assert not bool(all_within(torch.tensor(math.nan), -math.inf, math.inf))
    assert bool(all_finite(torch.arange(5), torch.ones(3, dtype=torch.bool)))
    assert bool(all_finite()) and bool(all_finite(None))
    z = torch.randn(9, dtype=torch.complex64)
    assert bool(all_finite(z))
    z[4] = complex(1.0, math.inf)
    assert not bool(all_finite(z))
    for check in (all_finite(torch.ones(3)), all_within(torch.ones(3), 0, 1), below_pos_inf(torch.ones(3))):
        assert check.dim() == 0 and check.dtype == torch.bool


def test_within_guard_refuses_by_the_same_rule():
    x = torch.randn(1000, dtype=torch.float64)
    assert torch.equal(within(x, -10.0, 10.0), x)
    for bad in (math.nan, 10.5, -math.inf):
        y = x.clone()
        y[777] = bad
        with pytest.raises(ProgramRequired, match="outside"):
            within(y, -10.0, 10.0)
