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


# --- the generalized correction: a read key, an erase key, a read before the decay ---------------------------

def comba(q, k, v, p, beta, g):
    return pytest.importorskip("fla.ops.comba.naive").naive_recurrent_comba(q, k, v, p, beta, g,
                                                                             output_final_state=True)


def dplr(q, k, v, a, b, gk):
    return pytest.importorskip("fla.ops.generalized_delta_rule.dplr.naive").dplr_recurrence(
        *(x.transpose(1, 2) for x in (q, k, v, a, b, gk)))


def test_comba_reads_with_its_own_key(tmp_path):
    # Comba's correction reads the state with p and writes along k: one op with p (no erase key, decayed read)
    q, k, v, beta, g, _ = operands()
    p = F.normalize(torch.randn_like(k), dim=-1)
    text, _ = after_pass(comba, q, k, v, p, beta, g, tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK-NOT: aten.einsum
        CHECK: %delta = seqfuse.delta(%{{.*}}, %{{.*}}, %{{.*}}, %{{.*}}, g=%{{.*}}, p=%{{.*}}) {gate=scalar, scale=1.0, chunk=64, algo=auto} : (f32[1, 6, 2, 5], f32[1, 2, 4, 5])
        CHECK-NOT: aten.einsum
        CHECK: return
    """)


def test_dplr_erases_along_its_own_key_and_reads_before_the_decay(tmp_path):
    # DPLR: S' = S ⊙ e^g + b ⊗ (Sᵀ a) + k ⊗ v reads the undecayed state with a and erases along b
    q, k, v, _, g, _ = operands("vector")
    a = F.normalize(torch.randn_like(k), dim=-1)
    text, _ = after_pass(dplr, q, k, v, -a, a * 0.5, g, tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK-NOT: aten.einsum
        CHECK: %delta = seqfuse.delta(%{{.*}}, %{{.*}}, %{{.*}}, %{{.*}}, g=%{{.*}}, p=%{{.*}}, e=%{{.*}}) {gate=vector, scale=1.0, chunk=64, read=previous, algo=auto}
        CHECK-NOT: aten.einsum
        CHECK: return
    """)


def test_a_correction_with_part_of_the_decay_is_left_as_written(tmp_path):
    # the decay is a factor per head times one per key dim; the correction reads the state with the per-key
    # part only: neither the decayed nor the previous state, so the loop stays (its step einsums are still
    # there) with a near miss naming it
    q, k, v, beta, gh, _ = operands()
    gk = -torch.rand(*k.shape)

    def loop(q, k, v, beta, gh, gk):
        S = torch.zeros(1, 2, 4, 5)
        ys = []
        for t in range(T):
            per_key = gk[:, t].exp()[..., None]
            c = torch.einsum("bhkv,bhk->bhv", S * per_key, k[:, t])
            S = S * gh[:, t].exp()[..., None, None] * per_key + \
                k[:, t, ..., None] * (beta[:, t, :, None] * (v[:, t] - c))[..., None, :]
            ys.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
        return torch.stack(ys, 1)
    text, report = after_pass(loop, q, k, v, beta, gh, gk, tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK-NOT: seqfuse.delta
        CHECK: aten.einsum
    """)
    assert any("part of its decay" in m.reason for m in report.near_misses if m.kind == "delta"), str(report)


def rwkv7_key_matrix(r, w, k, v, kk, a, state):
    # RWKV-7 as the RWKV-LM demo's CUDA-free sequence mode writes it: the key matrix (−κ̂) ⊗ (κ̂ ⊙ a) formed per
    # step and contracted with the (H, N, N) state, the decay along the state's last (key) axis
    H, N, _ = state.shape
    out = torch.zeros_like(r)
    w = torch.exp(-torch.exp(w))
    for t in range(r.shape[0]):
        ab = (-kk[t]).view(H, N, 1) @ (kk[t] * a[t]).view(H, 1, N)
        state = state * w[t].view(H, 1, N) + state @ ab.float() + (v[t].view(H, N, 1) @ k[t].view(H, 1, N)).float()
        out[t] = (state @ r[t].view(H, N, 1)).view(H * N)
    return out, state


def test_rwkv7_key_matrix_reads_along_one_factor_and_erases_along_the_other(tmp_path):
    H, N = 2, 4
    r, k, v = (torch.randn(T, H * N) for _ in range(3))
    w = torch.randn(T, H * N)
    kk = F.normalize(torch.randn(T, H, N), dim=-1).view(T, H * N)
    text, _ = after_pass(rwkv7_key_matrix, r, w, k, v, kk, torch.rand(T, H * N), torch.randn(H, N, N),
                         tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK-NOT: aten.einsum
        CHECK: %delta = seqfuse.delta(%{{.*}}, %{{.*}}, %{{.*}}, %{{.*}}, g=%{{.*}}, h0=%{{.*}}, p=%{{.*}}, e=%{{.*}}) {gate=vector, scale=1.0, chunk=64, read=previous, algo=auto} : (f32[2, 6, 1, 4], f32[2, 1, 4, 4])
        CHECK-NOT: aten.einsum
        CHECK: return
    """)


def test_preconditioned_delta_rule_reads_the_preconditioner_scans_steps_stacked(tmp_path):
    # fla's preconditioned gated delta rule: the ATK scan A_t (a second carried state the delta state does not
    # feed) stays as written; its squash M(A_t), one factor of the written key, is stacked over the steps
    # for the op; the delta state's contractions are gone; the final A is the scan's own last step
    precond = pytest.importorskip("fla.ops.precond_gated_delta_rule.naive")
    B, H, K, V = 1, 2, 4, 5

    def fn(q, k, v, ga, g, ba, beta):
        return precond.naive_recurrent_precond_gated_delta_rule(q, k, v, ga, g, ba, beta, output_final_state=True)
    args = (torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V), -torch.rand(B, T, H),
            -torch.rand(B, T, H), torch.rand(B, T, H), torch.rand(B, T, H))
    text, _ = after_pass(fn, *args, tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK-COUNT-6: aten.exp(%mul
        CHECK-NOT: aten.einsum
        CHECK: aten.stack([%exp_{{[0-9]+}}, %exp_{{[0-9]+}}, %exp_{{[0-9]+}}, %exp_{{[0-9]+}}, %exp_{{[0-9]+}}, %exp_{{[0-9]+}}], 0) : f32[6, 1, 2, 4]
        CHECK-NOT: aten.einsum
        CHECK: %delta = seqfuse.delta(%{{.*}}, %{{.*}}, %{{.*}}, %{{.*}}, g=%{{.*}}, p=%{{.*}}) {gate=scalar, scale=1.0, chunk=64, algo=auto}
        CHECK-NOT: aten.einsum
        CHECK: %[[H:[a-z_0-9]+]] = getitem(%delta, 1)
        CHECK: return ({{.*}}, %[[H]], %add_{{[0-9]+}})
    """)
