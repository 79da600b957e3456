"""FileCheck on the graph right after the delta_blocks pass (dump stage "delta_blocks"): fla's blocked
(parallel) DeltaNet becomes one seqfuse.delta on q (scaled), k, v, β, and nothing of the program is left
(no UT system, no block, no attention-matrix write); a look-alike is left as written.  Outputs and
gradients vs eager."""

import pytest
import torch
import torch.nn.functional as F

from delta_spellings import blocked
from fc import graph_after, run_filecheck
from helpers import check_against_eager

fla_delta = pytest.importorskip("fla.ops.delta_rule.naive")


def after_pass(fn, *args, tmp_path):
    return graph_after(fn, *args, tmp_path=tmp_path, stage="delta_blocks")


def operands(T=48):
    q, k = torch.randn(1, 2, T, 8), F.normalize(torch.randn(1, 2, T, 8), dim=-1)
    return [x.requires_grad_() for x in (q, k, torch.randn(1, 2, T, 6), torch.rand(1, 2, T))]


def parallel(q, k, v, beta):
    return fla_delta.delta_rule_parallel(q, k, v, beta, BM=24, BN=8)[0]


def test_blocked_delta_rule_becomes_one_op(tmp_path):
    text, _ = after_pass(parallel, *(x.detach() for x in operands()), tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK: %[[Q:[a-z_0-9]+]] = aten.mul.Tensor(%l_q_, 0.3535
        CHECK-NOT: aten.einsum
        CHECK-NOT: aten.copy_
        CHECK: %[[QT:[a-z_0-9]+]] = aten.transpose.int(%[[Q]], 1, 2)
        CHECK: %[[KT:[a-z_0-9]+]] = aten.transpose.int(%l_k_, 1, 2)
        CHECK: %[[VT:[a-z_0-9]+]] = aten.transpose.int(%l_v_, 1, 2)
        CHECK: %[[BT:[a-z_0-9]+]] = aten.transpose.int(%l_beta_, 1, 2)
        CHECK: %delta = seqfuse.delta(%[[QT]], %[[KT]], %[[VT]], %[[BT]]) {gate=none, scale=1.0, chunk=64, algo=auto} : (f32[1, 48, 2, 6], f32[1, 2, 8, 6])
        CHECK: %[[Y:[a-z_0-9]+]] = getitem(%delta, 0)
        CHECK-NOT: aten.einsum
        CHECK-NOT: aten.copy_
        CHECK-NOT: aten.where
        CHECK: return
    """)
    check_against_eager(parallel, *operands())


def test_a_walk_over_the_plain_keys_is_left_as_written(tmp_path):
    # the walk reads k where the blocked form reads the carried keys K' (a chunk transition that is not
    # the delta rule's): the blocks stay, with a near miss
    def wrong(q, k, v, beta):
        return blocked(q, k, v, beta, 24, 8, bug="plain_keys")
    text, report = after_pass(wrong, *(x.detach() for x in operands()), tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK-NOT: seqfuse.delta
        CHECK: aten.einsum
        CHECK: aten.where
        CHECK-NOT: seqfuse.delta
    """)
    assert any("blocked (parallel) form not lifted" in m.reason for m in report.near_misses), str(report)
