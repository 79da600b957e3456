"""FileCheck on the graph right after the delta pass (dump stage "delta"): a delta-rule loop becomes one
seqfuse.delta, its per-step outputs one buffer copy, and no per-step node is left; a loop whose update
is not the delta rule is left as it was."""

import pytest
import torch
import torch.nn.functional as F

from fc import graph_after, run_filecheck

fla_gdn = pytest.importorskip("fla.ops.gated_delta_rule.naive")
fla_kda = pytest.importorskip("fla.ops.kda.naive")

T = 6


def after_pass(fn, *args, tmp_path, stage="delta"):
    return graph_after(fn, *args, tmp_path=tmp_path, stage=stage)


def operands(gate="scalar", B=1, H=2, K=4, V=5):
    q, k, v = torch.randn(B, T, H, K), F.normalize(torch.randn(B, T, H, K), dim=-1), torch.randn(B, T, H, V)
    g = -torch.rand(B, T, H, K) if gate == "vector" else -torch.rand(B, T, H)
    return q, k, v, torch.rand(B, T, H), g, torch.randn(B, H, K, V)


def gdn(q, k, v, beta, g, h0):
    return fla_gdn.naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True)


def test_gated_delta_rule_loop_becomes_one_op(tmp_path):
    text, _ = after_pass(gdn, *operands(), tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK: %[[BUF:[a-z_0-9]+]] = aten.to.device(%zeros
        CHECK: %[[H0:[a-z_0-9]+]] = aten.to.dtype(%l_h0_, f32)
        CHECK-NOT: aten.einsum
        CHECK: %delta = seqfuse.delta(%{{.*}}, %{{.*}}, %{{.*}}, %{{.*}}, g=%{{.*}}, h0=%[[H0]]) {gate=scalar, scale=1.0, chunk=64, algo=auto} : (f32[1, 6, 2, 5], f32[1, 2, 4, 5])
        CHECK-NOT: aten.select.int
        CHECK-NOT: aten.einsum
        CHECK: %[[H:[a-z_0-9]+]] = getitem(%delta, 1)
        CHECK: aten.slice.Tensor(%[[BUF]], 2, 0, 6)
        CHECK: aten.copy_(
        CHECK-NOT: aten.copy_(
        CHECK: return ({{.*}}, %[[H]])
    """)


def kda(q, k, v, beta, g, h0):
    return fla_kda.naive_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)


def test_kda_loop_becomes_one_op_with_a_vector_gate(tmp_path):
    text, _ = after_pass(kda, *operands("vector"), tmp_path=tmp_path)
    # the gate exp(g_t) is read back as its exponent g_t: no exp is left for the op's operands
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK-NOT: aten.exp
        CHECK: %delta = seqfuse.delta({{.*}}, g=%{{.*}}, h0=%{{.*}}) {gate=vector, scale=1.0, chunk=64, algo=auto} : (f32[1, 6, 2, 5], f32[1, 2, 4, 5])
        CHECK-NOT: aten.select.int
        CHECK-NOT: aten.exp
        CHECK: return
    """)


def tanh_delta(q, k, v, beta, g, h0):
    S = h0
    o = torch.zeros_like(v)
    for t in range(v.shape[1]):
        S = S * g[:, t].exp()[..., None, None]
        u = torch.tanh(v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, t])) * beta[:, t, :, None]
        S = S + k[:, t, ..., None] * u[..., None, :]
        o[:, t] = torch.einsum("bhkv,bhk->bhv", S, q[:, t])
    return o, S


def test_a_nonlinear_correction_is_left_unrolled(tmp_path):
    # tanh of the correction: not linear in the state, so no op; every step's einsums stay
    text, report = after_pass(tanh_delta, *operands(), tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK-NOT: seqfuse.delta
        CHECK: aten.tanh
        CHECK: aten.tanh
        CHECK: aten.tanh
        CHECK-NOT: seqfuse.delta
        CHECK: return
    """)
    assert [m.kind for m in report.near_misses] == ["delta", "scan"], str(report)


qwen3_next = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")


def chunked(q, k, v, beta, g, h0):
    return qwen3_next.torch_chunk_gated_delta_rule.__wrapped__(q, k, v, g, beta, chunk_size=2, initial_state=h0,
                                                                output_final_state=True)


def test_chunked_wy_program_becomes_one_op_over_the_sequence(tmp_path):
    # T = 6 in chunks of 2: the UT transform (two triangular solves), the decay mask, the loop over
    # the 3 chunks and the output buffer all go; the op runs over the 6 steps on the un-chunked (B, T, H, ·)
    # operands
    text, _ = after_pass(chunked, *operands(), tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK-NOT: aten.linalg_solve_triangular
        CHECK-NOT: aten.cumsum
        CHECK: %delta = seqfuse.delta(%{{.*}}, %{{.*}}, %{{.*}}, %{{.*}}, g=%{{.*}}, h0=%{{.*}}) {gate=scalar, scale=1.0, chunk=64, finite_only=true, algo=auto} : (f32[1, 6, 2, 5], f32[1, 2, 4, 5])
        CHECK-NOT: aten.linalg_solve_triangular
        CHECK-NOT: aten.einsum
        CHECK: aten.reshape({{.*}}, [1, 2, 3, 2, 5])
        CHECK-NOT: aten.copy_(
        CHECK: return
    """)
    # the output buffer the loop filled chunk by chunk is written over all of it by the op: read as the value
    assert "aten.zeros" not in text and "aten.copy_(" not in text, text


def chunked_no_state(q, k, v, beta, g, h0):
    return qwen3_next.torch_chunk_gated_delta_rule.__wrapped__(q, k, v, g, beta, chunk_size=2, initial_state=h0)[0]


def test_chunked_program_without_its_final_state_is_one_op_over_every_chunk(tmp_path):
    # T = 8 in 4 chunks: the last chunk's state update is dead, so the loop re-rolls over the first 3 chunks;
    # the last chunk (its corrections and readout from the loop's final state) is proven to be one more step
    # of the loop's body and the op covers all 8 steps, so nothing keeps the solves alive
    q, k, v, beta, g, h0 = operands()
    more = [torch.cat([x, x[:, :2]], 1) for x in (q, k, v, beta, g)]
    text, _ = after_pass(chunked_no_state, *more, h0, tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK-NOT: aten.linalg_solve_triangular
        CHECK: %delta = seqfuse.delta({{.*}}, h0=%{{.*}}) {gate=scalar, scale=1.0, chunk=64, finite_only=true, algo=auto} : (f32[1, 8, 2, 5], f32[1, 2, 4, 5])
        CHECK-NOT: aten.linalg_solve_triangular
        CHECK: aten.copy_(
        CHECK: aten.copy_(
        CHECK-NOT: aten.copy_(
        CHECK-NOT: aten.einsum
        CHECK: return
    """)


def fla_chunked_no_state(q, k, v, beta, g, h0):
    return fla_gdn.naive_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=2, initial_state=h0)[0]


def test_fla_chunked_program_with_a_forward_substitution_is_one_op_over_every_chunk(tmp_path):
    # fla's naive chunked Gated DeltaNet, T = 8 in 4 chunks of 2, no final state: the forward substitution
    # written in place (its row writes are copy_s into the system) is erased with the loop, the pieces it
    # computes in the loop (q ⊙ e^γ, the masked scores) go, and the last chunk, left out of the loop, is
    # proven to be one more step and covered: one copy_ of the op's chunks and one of the last chunk remain
    q, k, v, beta, g, h0 = operands()
    more = [torch.cat([x, x[:, :2]], 1) for x in (q, k, v, beta, g)]
    text, _ = after_pass(fla_chunked_no_state, *more, h0, tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK-NOT: aten.copy_
        CHECK-NOT: aten.masked_fill_
        CHECK: %delta = seqfuse.delta({{.*}}, g=%{{.*}}, h0=%{{.*}}) {gate=scalar, scale=1.0, chunk=64, finite_only=true, algo=auto} : (f32[1, 8, 2, 5], f32[1, 2, 4, 5])
        CHECK-NOT: aten.einsum
        CHECK-NOT: aten.masked_fill_
        CHECK: aten.copy_(
        CHECK: aten.copy_(
        CHECK-NOT: aten.copy_(
        CHECK-NOT: aten.einsum
        CHECK-NOT: aten.masked_fill_
        CHECK: return
    """)


def kimi_chunked_no_state(q, k, v, beta, g):
    kimi = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    f = kimi.chunk_kimi_delta_attention
    while hasattr(f, "__wrapped__"):
        f = f.__wrapped__
    return f(q, k, v, g, beta, chunk_size=2)[0]


def test_kimi_chunked_kda_without_its_final_state_is_one_vector_gated_op_over_every_chunk(tmp_path):
    # Kimi Linear's chunked KDA, T = 8 in 4 chunks of 2, no final state: one op {gate=vector} over all 8
    # steps (the last chunk, computed after the loop with its own copy of the j <= i mask, is proven to be
    # one more step), the per-channel decay mask, the forward substitution and every einsum gone
    q, k, v, beta, g, _ = operands("vector")
    more = [torch.cat([x, x[:, :2]], 1) for x in (q, k, v, beta, g)]
    text, _ = after_pass(kimi_chunked_no_state, *more, tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK-NOT: aten.copy_
        CHECK: %delta = seqfuse.delta({{.*}}, g=%{{.*}}) {gate=vector, scale=1.0, chunk=64, finite_only=true, algo=auto} : (f32[1, 8, 2, 5], f32[1, 2, 4, 5])
        CHECK-NOT: aten.einsum
        CHECK: aten.copy_(
        CHECK: aten.copy_(
        CHECK-NOT: aten.copy_(
        CHECK-NOT: aten.einsum
        CHECK: return
    """)
