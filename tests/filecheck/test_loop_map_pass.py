"""FileCheck on the graph right after the loop_map pass (dump stage "loop_map"): a loop that writes an
independent value per step into a buffer becomes one vectorized value and one copy_ into the slice of
all steps (a fresh buffer written over all of it is then read as that value); loops that read their
buffer, or whose steps differ, stay as they are.  Every case also
compares outputs and gradients with eager."""

import pytest
import torch

from fc import graph_after, run_filecheck
from helpers import check_against_eager


def after_pass(fn, *args, tmp_path, stage="loop_map"):
    text, report = graph_after(fn, *args, tmp_path=tmp_path, stage=stage)
    return report, text


def columns(k, g):
    """fla's naive_chunk_kda builds its system column by column (same spelling, (B, H, C, D))."""
    C = k.shape[-2]
    A = torch.zeros(*k.shape[:-1], C)
    for i in range(C):
        A[..., i] = torch.einsum('... c d, ... d -> ... c', k * (g - g[..., i:i + 1, :]).exp(), k[..., i, :])
    return A * 2


def operands(B=2, H=3, C=6, D=4):
    torch.manual_seed(0)
    return torch.randn(B, H, C, D, requires_grad=True), (-torch.rand(B, H, C, D)).requires_grad_()


def test_column_loop_becomes_one_einsum_and_one_write(tmp_path):
    k, g = operands()
    _, text = after_pass(columns, k, g, tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK-NOT: aten.zeros(
        CHECK: %[[E:[a-z_0-9]+]] = aten.einsum({{[a-z]+}},{{[a-z]+}}->{{[a-z]+}}, {{.*}}) : f32[6, 2, 3, 6]
        CHECK-NOT: aten.zeros(
        CHECK: %[[V:[a-z_0-9]+]] = aten.movedim.int(%[[E]], 0, 3)
        CHECK-NOT: aten.select.int
        CHECK-NOT: aten.copy_
        CHECK: aten.mul.Tensor(%[[V]], 2)
    """)
    report = check_against_eager(columns, k, g)
    assert not report.near_misses, str(report)


def some_columns(k, g):
    """The same loop over all columns but the last: the write covers part of the buffer."""
    C = k.shape[-2]
    A = torch.zeros(*k.shape[:-1], C)
    for i in range(C - 1):
        A[..., i] = torch.einsum('... c d, ... d -> ... c', k * (g - g[..., i:i + 1, :]).exp(), k[..., i, :])
    return A * 2


def strided_reader(k, g):
    """The whole buffer written, then read by a view that needs its strides (a contiguous value)."""
    C = k.shape[-2]
    A = torch.zeros(*k.shape[:-1], C)
    for i in range(C):
        A[..., i] = (k * g[..., i:i + 1, :]).sum(-1) * k[..., i, 0:1]
    return A.view(-1, C * C) + 1, A


def test_a_buffer_written_in_part_keeps_its_write(tmp_path):
    k, g = operands()
    _, text = after_pass(some_columns, k, g, tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK: %[[BUF:[a-z_0-9]+]] = aten.zeros([2, 3, 6, 6]
        CHECK: %[[DEST:[a-z_0-9]+]] = aten.slice.Tensor(%[[BUF]], 3, 0, 5)
        CHECK: aten.copy_(%[[DEST]],
        CHECK: aten.mul.Tensor(%[[BUF]], 2)
    """)
    check_against_eager(some_columns, k, g)


def test_a_whole_buffer_read_by_strides_reads_a_contiguous_value(tmp_path):
    k, g = operands()
    _, text = after_pass(strided_reader, k, g, tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK-NOT: aten.copy_
        CHECK: %[[V:[a-z_0-9]+]] = aten.movedim.int(%{{[a-z_0-9]+}}, 0, 3) : f32[2, 3, 6, 6]
        CHECK-NEXT: %[[C:[a-z_0-9]+]] = aten.contiguous(%[[V]])
        CHECK-NEXT: aten.view(%[[C]], [-1, 36])
        CHECK: return ({{.*}}, %[[C]])
    """)
    check_against_eager(strided_reader, k, g)


def reads_its_buffer(x):
    """A recurrence through the buffer: step i reads column i - 1 (not a map)."""
    A = torch.zeros_like(x)
    A[..., 0] = x[..., 0]
    for i in range(1, x.shape[-1]):
        A[..., i] = A[..., i - 1] * 0.5 + x[..., i].sin()
    return A


def reads_a_view_of_its_buffer(x):
    """Each step reads the buffer through another view of it (the sum of all columns so far)."""
    A = torch.zeros_like(x)
    whole = A.view(-1, x.shape[-1])
    for i in range(x.shape[-1]):
        A[..., i] = x[..., i].sin() + whole.sum(-1).view(x.shape[:-1])
    return A


def read_between_writes(x):
    """Code outside the steps reads the buffer while the loop writes it."""
    A = torch.zeros_like(x)
    seen = []
    for i in range(x.shape[-1]):
        A[..., i] = x[..., i].sin()
        seen.append(A.sum())
    return A, torch.stack(seen)


@pytest.mark.parametrize("fn", [reads_its_buffer, reads_a_view_of_its_buffer, read_between_writes])
def test_loops_that_read_their_buffer_are_left_alone(fn, tmp_path):
    x = torch.randn(2, 3, 8, requires_grad=True)
    _, text = after_pass(fn, x, tmp_path=tmp_path)
    assert text.count("aten.copy_(") == 8, text
    check_against_eager(fn, x)


def step_mask(x):
    """Each step reads its own mask built from the Python loop index (fla's naive_chunk_rwkv6)."""
    C = x.shape[-1]
    out = torch.zeros_like(x)
    for i in range(C):
        keep = torch.arange(C) < i
        out[..., i] = (x * keep).sum(-1) + x[..., i]
    return out


def test_loop_index_constants_are_read_from_an_index_tensor(tmp_path):
    x = torch.randn(2, 6, requires_grad=True)
    _, text = after_pass(step_mask, x, tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK: %[[IDX:[a-z_0-9]+]] = aten.arange.start(0, 6, dtype=i64
        CHECK-NOT: aten.lt.Scalar
        CHECK: %[[U:[a-z_0-9]+]] = aten.unsqueeze(%[[IDX]], 1) : i64[6, 1]
        CHECK: aten.lt.Tensor(%{{[a-z_0-9]+}}, %[[U]]) : i1[6, 6]
        CHECK-NOT: aten.copy_
        CHECK: aten.contiguous(
        CHECK: return
    """)
    check_against_eager(step_mask, x)


def alternating(x):
    """Odd and even steps compute different things: not one body."""
    out = torch.zeros_like(x)
    for i in range(x.shape[-1]):
        out[..., i] = x[..., i].sin() if i % 2 else x[..., i].cos()
    return out


def test_steps_that_differ_are_a_near_miss(tmp_path):
    x = torch.randn(2, 6, requires_grad=True)
    report, text = after_pass(alternating, x, tmp_path=tmp_path)
    assert text.count("aten.copy_(") == 6, text
    misses = [m.reason for m in report.near_misses if m.kind == "scan"]
    assert any(r.startswith("map loop") and "differs" in r for r in misses), str(report)
    check_against_eager(alternating, x)
