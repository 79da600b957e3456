"""FileCheck on the graph right after the ssd_forms / ssd_chunks passes for the Mamba-2 listing's
stable segment sum (mamba_ssm/modules/ssd_minimal.py): repeat, strict-lower mask, cumsum over the
rows, -inf above the diagonal is proven a segment sum of a; nothing of it is left."""

import pytest

from fc import graph_after, run_filecheck
from golden.test_ssd_stable_segsum import SEGSUMS, inputs, listing, make_segsum, ssd_quadratic


def quadratic(segsum_):
    def ssd_quad(X, A, B, C):          # named parameters: the graph's placeholders are l_x_, l_a_, ...
        return ssd_quadratic(X, A, B, C, segsum=segsum_)
    return ssd_quad


def after_pass(fn, *args, tmp_path, stage):
    return graph_after(fn, *[a.detach() for a in args], tmp_path=tmp_path, stage=stage)[0]


@pytest.mark.parametrize("spelling", ["einops", "expand", "repeat"])
def test_quadratic_form_is_one_ssd_with_a(tmp_path, spelling):
    # rearrange(A, "b l h -> b h l") and the segsum are gone: a is the program's A itself
    fn = quadratic(SEGSUMS[spelling])
    text = after_pass(fn, *inputs(t=8), tmp_path=tmp_path, stage="ssd_forms")
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK-NOT: aten.cumsum
        CHECK: %ssd = seqfuse.ssd(%l_x_, %l_b_, %l_c_, a=%l_a_) {decay=scalar
        CHECK-SAME: : (f32[2, 8, 3, 5], f32[2, 3, 5, 4])
        CHECK-NOT: aten.repeat
        CHECK-NOT: aten.expand
        CHECK-NOT: aten.where
        CHECK-NOT: aten.cumsum
        CHECK-NOT: aten.exp
        CHECK-NOT: aten.einsum
        CHECK: return (%getitem)
    """)


@pytest.mark.parametrize("h0", [False, True])
def test_ssd_minimal_discrete_is_one_ssd(tmp_path, h0):
    # 4 blocks of 4 flatten back to the sequence; the final state is the op's second result
    text = after_pass(listing(4), *inputs(t=16, h0=h0), tmp_path=tmp_path, stage="ssd_chunks")
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK-DAG: %[[X:[a-z_0-9]+]] = aten.flatten.using_ints(%{{[a-z_0-9]+}}, 1, 2) : f32[2, 16, 3, 5]
        CHECK-DAG: %[[A:[a-z_0-9]+]] = aten.flatten.using_ints(%{{[a-z_0-9]+}}, 1, 2) : f32[2, 16, 3]
        CHECK: %ssd = seqfuse.ssd(%[[X]], %{{[a-z_0-9]+}}, %{{[a-z_0-9]+}}, a=%[[A]]""" +
                  (", h0=%squeeze_dims)" if h0 else ")") + """ {decay=scalar
        CHECK-SAME: : (f32[2, 16, 3, 5], f32[2, 3, 5, 4])
        CHECK-NOT: aten.einsum
        CHECK-NOT: aten.cumsum
        CHECK-NOT: aten.exp
        CHECK-NOT: aten.cat
        CHECK-NOT: aten.where
        CHECK: %[[H:[a-z_0-9]+]] = getitem(%ssd, 1)
        CHECK: return (%{{[a-z_0-9]+}}, %[[H]])
    """)


def test_wrong_inner_diagonal_is_left_alone(tmp_path):
    # tril(0) in the first masked_fill: Σ_{j<=x<=i}, not a segment sum; the program stays as written
    fn = quadratic(make_segsum("einops", inner=0))
    text = after_pass(fn, *inputs(t=8), tmp_path=tmp_path, stage="ssd_forms")
    run_filecheck(text, """
        CHECK-NOT: seqfuse.ssd
        CHECK: aten.cumsum
        CHECK: aten.exp
        CHECK: aten.einsum
        CHECK-NOT: seqfuse.ssd
        CHECK: return
    """)
