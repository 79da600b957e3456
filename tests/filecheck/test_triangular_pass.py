"""FileCheck on the graph right after the triangular pass (dump stage "triangular"): a forward
substitution that inverts I + strictly_lower(M) in place, row by row, becomes one unit lower-triangular
solve; a program that differs stays as it is, with a near miss.  Outputs and gradients vs eager."""
import pathlib

import pytest
import torch
import torch.nn.functional as F

import seqfuse
from fc import graph_after, run_filecheck
from helpers import check_against_eager


def after_pass(fn, *args, tmp_path, stage="triangular", dynamic=None):
    text, report = graph_after(fn, *args, tmp_path=tmp_path, stage=stage, dynamic=dynamic)
    return report, text


def inverse(M, spelling="fla", mask="masked_fill", bad=None):
    """(I + strictly_lower(M))⁻¹ by forward substitution, as fla (every column j, the entries j >= i being
    the masked zeros) or transformers' Qwen3-Next (columns j < i) write it; ``bad`` breaks one piece."""
    C = M.shape[-1]
    if mask == "masked_fill":
        N = -M.masked_fill(torch.triu(torch.ones(C, C, dtype=torch.bool), diagonal=0), 0)
    else:
        N = -M.tril(-1)
    for i in range(1, C):
        if spelling == "fla":
            N[..., i, :i] = N[..., i, :i].clone() + (N[..., i, :, None].clone() * N[..., :, :i].clone()).sum(-2)
        else:
            row = N[..., i, :i].clone()
            sub = N[..., :i, :i].clone()
            N[..., i, :i] = row + (row.unsqueeze(-1) * (sub if bad != "row" or i != 2 else sub * 2)).sum(-2)
    T = N + torch.eye(C, dtype=M.dtype)
    return T @ M.sin() if bad != "reads" else (T, N.sum())


@pytest.mark.parametrize("spelling,mask,shape,dtype", [
    ("fla", "masked_fill", (2, 3, 6, 6), torch.float32),
    ("qwen", "tril", (2, 2, 3, 5, 5), torch.float64),
    ("qwen", "masked_fill", (6, 6), torch.float32),
])
def test_forward_substitution_becomes_one_solve(spelling, mask, shape, dtype, tmp_path):
    torch.manual_seed(0)
    M = (torch.randn(shape, dtype=dtype) * 0.5).requires_grad_()
    fn = lambda M: inverse(M, spelling, mask)  # noqa: E731
    report, text = after_pass(fn, M, tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK: %[[L:[a-z_0-9]+]] = aten.where.ScalarOther({{.*}}) : {{f32|f64}}
        CHECK: %[[EYE:[a-z_0-9]+]] = aten.eye(
        CHECK-NOT: aten.copy_
        CHECK: aten.linalg_solve_triangular(%[[L]], %[[EYE]], upper=false, unitriangular=true)
        CHECK-NOT: aten.copy_
    """ if mask == "masked_fill" else """
        CHECK-LABEL: graph(
        CHECK: %[[L:[a-z_0-9]+]] = aten.tril(
        CHECK-NOT: aten.copy_
        CHECK: aten.linalg_solve_triangular(%[[L]], {{.*}}, upper=false, unitriangular=true)
        CHECK-NOT: aten.copy_
    """)
    # a 5-D system is a UT system over chunks to delta; no loop reads it chunk by chunk, so it is no WY
    # program, and delta leaves no near miss (it reported "whose loop over chunks was not re-rolled")
    assert not [m for m in report.near_misses if "forward substitution" in m.reason or m.kind == "delta"], \
        str(report)
    check_against_eager(fn, M)


@pytest.mark.parametrize("bad", ["row", "reads"])
def test_a_program_that_differs_is_a_near_miss(bad, tmp_path):
    torch.manual_seed(0)
    M = (torch.randn(2, 5, 5) * 0.5).requires_grad_()
    fn = lambda M: inverse(M, "qwen", bad=bad)  # noqa: E731
    report, text = after_pass(fn, M, tmp_path=tmp_path)
    assert "linalg_solve_triangular" not in text and text.count("aten.copy_(") == 4, text
    reasons = [m.reason for m in report.near_misses if "forward substitution" in m.reason]
    want = "row 2's update" if bad == "row" else "read besides its row updates"
    assert reasons and want in reasons[0], str(report)
    check_against_eager(fn, M)


def test_half_precision_is_left_alone_with_a_near_miss(tmp_path):
    M = (torch.randn(2, 5, 5) * 0.5).to(torch.float16)
    report, text = after_pass(lambda M: inverse(M, "fla"), M, tmp_path=tmp_path)
    assert "linalg_solve_triangular" not in text, text
    assert any("torch.float16" in m.reason for m in report.near_misses), str(report)


fla_kda = pytest.importorskip("fla.ops.kda.naive")


def test_fla_naive_chunk_kda_columns_are_vectorized_and_the_program_is_one_delta(tmp_path):
    # fla's chunked KDA: both its column loops (the UT system's, and the intra-chunk scores' inside every
    # step of the loop over chunks) become one einsum each (loop_map), the buffers they fill are read as the
    # values written, and delta lifts the whole program, forward substitution included (nothing is left
    # for this pass); the program equals eager
    B, T, H, K, V = 1, 16, 2, 4, 3
    torch.manual_seed(0)
    q, k, v = torch.randn(B, T, H, K), F.normalize(torch.randn(B, T, H, K), dim=-1), torch.randn(B, T, H, V)
    g, beta = -torch.rand(B, T, H, K), torch.rand(B, T, H)
    args = [x.requires_grad_() for x in (q, k, v, g, beta)]

    def fn(q, k, v, g, beta):
        return fla_kda.naive_chunk_kda(q, k, v, g, beta, chunk_size=4, output_final_state=True)
    report, text = after_pass(fn, *args, tmp_path=tmp_path)
    columns = pathlib.Path(next(p for p in report.dumps if p.endswith("_loop_map.txt"))).read_text()
    C, N = 4, 4
    # the forward substitution's C - 1 row writes and one write per chunk into o[:, :, i]; the column
    # buffers (A, each chunk's Aqk) are gone, their readers read the vectorized values
    assert columns.count("aten.copy_(") == (C - 1) + N, columns
    run_filecheck(columns, """
        CHECK-LABEL: graph(
        CHECK: %[[A:[a-z_0-9]+]] = aten.einsum({{[a-z]+}},{{[a-z]+}}->{{[a-z]+}}, {{.*}}) : f32[4, 1, 2, 4, 4]
        CHECK: %[[AT:[a-z_0-9]+]] = aten.movedim.int(%[[A]], 0, 4) : f32[1, 2, 4, 4, 4]
        CHECK: aten.mul.Tensor(%[[AT]],
        CHECK-COUNT-4: aten.einsum({{[a-z]+}},{{[a-z]+}}->{{[a-z]+}}, {{.*}}) : f32[4, 1, 2, 4]
    """)
    assert "aten.copy_(" not in text and "linalg_solve_triangular" not in text, text
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK: seqfuse.delta({{.*}}) {gate=vector,
        CHECK-NOT: aten.einsum
        CHECK: return
    """)
    assert report.count("delta") == 1 and not report.near_misses, str(report)
    check_against_eager(fn, *args)


def test_forward_substitution_over_symbolic_batch_sizes_becomes_one_solve(tmp_path):
    # dynamic shapes: the batch sizes are symbols; the solve's fake value cannot come from its meta function
    # (torch 2.13 cannot broadcast the constant identity over symbols: the pipeline raised), so it is laid
    # as the solve lays its result
    torch.manual_seed(0)
    M = (torch.randn(3, 4, 6, 6) * 0.5).requires_grad_()
    fn = lambda M: inverse(M, "fla")  # noqa: E731
    report, text = after_pass(fn, M, tmp_path=tmp_path, dynamic=True)
    assert "aten.linalg_solve_triangular(" in text and "aten.copy_(" not in text, text
    check_against_eager(fn, M, dynamic=True)
    out = seqfuse.explain(fn, M.detach(), options={"downstream": "eager"}, dynamic=True).output
    assert out.stride() == fn(M.detach()).stride()
