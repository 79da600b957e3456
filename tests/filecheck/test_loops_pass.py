"""FileCheck on the graph right after the loops pass (dump stage "loops"): an unrolled loop
becomes one seqfuse.scan / seqfuse.ssd and no per-step node is left."""

import torch
import torch.nn.functional as F

from fc import graph_after, run_filecheck

T = 6


def after_pass(fn, *args, tmp_path, stage="loops", dynamic=None):
    return graph_after(fn, *args, tmp_path=tmp_path, stage=stage, dynamic=dynamic)[0]


def hgrn(x, g):
    h = torch.zeros(x.shape[0], x.shape[2])
    o = torch.zeros_like(x)
    for i in range(x.shape[1]):
        h = g[:, i].exp() * h + x[:, i]
        o[:, i] = h
    return o, h


def test_hgrn_buffer_writes_become_one_copy(tmp_path):
    text = after_pass(hgrn, torch.randn(2, T, 4), -torch.rand(2, T, 4), tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK: %[[BUF:[a-z_0-9]+]] = aten.zeros_like(%l_x_
        CHECK: %[[G:[a-z_0-9]+]] = aten.movedim.int(%l_g_, 1, 0) : f32[6, 2, 4]
        CHECK: aten.exp(%[[G]])
        CHECK: %scan = seqfuse.scan(%{{.*}}, %{{.*}}) {reverse=false, algo=auto} : (f32[2, 6, 4], f32[2, 4])
        CHECK-NOT: aten.select.int
        CHECK: %[[H:[a-z_0-9]+]] = getitem(%scan, 1)
        CHECK: aten.slice.Tensor(%[[BUF]], 1, 0, 6)
        CHECK: aten.copy_(
        CHECK-NOT: aten.copy_(
        CHECK: return (%[[BUF]], %[[H]])
    """)


def hf_mamba(hidden, dt, A, B, C):
    dtype = hidden.dtype
    discrete_A = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
    deltaB_u = dt[:, :, :, None] * B[:, None, :, :].float() * hidden[:, :, :, None].float()
    ssm_state = torch.zeros(hidden.shape[0], hidden.shape[1], A.shape[1], dtype=dtype)
    ys = []
    for i in range(hidden.shape[2]):
        ssm_state = discrete_A[:, :, i, :] * ssm_state + deltaB_u[:, :, i, :]
        ys.append(torch.matmul(ssm_state.to(dtype), C[:, i, :].unsqueeze(-1))[:, :, 0])
    return torch.stack(ys, dim=-1), ssm_state


def test_hf_mamba_readout_is_folded_and_stack_replaced(tmp_path):
    text = after_pass(hf_mamba, torch.randn(2, 3, T), torch.rand(2, 3, T), -torch.rand(3, 4), torch.randn(2, T, 4),
                      torch.randn(2, T, 4), tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK: %scan = seqfuse.scan(%{{.*}}, %{{.*}}, c=%{{.*}}) {reverse=false, algo=auto} : (f32[2, 3, 6], f32[2, 3, 4])
        CHECK-NOT: aten.stack
        CHECK-NOT: aten.einsum
        CHECK: return
    """)


def gla(q, k, v, gk):
    o = torch.zeros_like(v)
    h = q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1])
    for i in range(q.shape[2]):
        kv = k[:, :, i, :, None] * v[:, :, i, None, :]
        h = h * gk[:, :, i].exp()[..., None] + kv
        o[:, :, i] = (q[:, :, i, :, None] * h).sum(-2)
    return o, h


def test_gla_becomes_ssd_with_vector_decay(tmp_path):
    text = after_pass(gla, torch.randn(1, 2, T, 4), torch.randn(1, 2, T, 4), torch.randn(1, 2, T, 5),
                      torch.randn(1, 2, T, 4), tmp_path=tmp_path)
    # the log-decay is gk itself (the exp is dropped); the (K, V) state is SSD's (P, N) transposed
    run_filecheck(text, """
        CHECK: aten.movedim.int(%l_gk_, 2, 0)
        CHECK-NOT: aten.exp
        CHECK: %ssd = seqfuse.ssd(%{{.*}}, %{{.*}}, %{{.*}}, a=%{{.*}}) {decay=vector, chunk=64, algo=auto} : (f32[1, 6, 2, 5], f32[1, 2, 5, 4])
        CHECK: %[[H:[a-z_0-9]+]] = aten.transpose.int(%{{.*}}, -1, -2) : f32[1, 2, 4, 5]
        CHECK-NOT: aten.select.int(%l_
        CHECK: return (%{{.*}}, %[[H]])
    """)


def linear_attn(q, k, v):
    o = torch.empty_like(v)
    S = torch.zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    for t in range(q.shape[1]):
        S = S + torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        o[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t], S)
    return o


def test_linear_attention_becomes_ssd_without_decay(tmp_path):
    text = after_pass(linear_attn, torch.randn(2, T, 3, 4), torch.randn(2, T, 3, 4), torch.randn(2, T, 3, 5),
                      tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK: %ssd = seqfuse.ssd(%{{.*}}, %{{.*}}, %{{.*}}) {decay=none, chunk=64, algo=auto}
        CHECK-NOT: aten.einsum
        CHECK: aten.copy_(
        CHECK-NOT: aten.copy_(
    """)


def reversed_scan(x, a, h0):
    h = h0
    ys = []
    for t in range(x.shape[1] - 1, -1, -1):
        h = torch.sigmoid(a[:, t]) * h + x[:, t]
        ys.append(h)
    return torch.stack(ys[::-1], 1), h


def test_reversed_loop_with_initial_state(tmp_path):
    text = after_pass(reversed_scan, torch.randn(2, T, 4), torch.randn(2, T, 4), torch.randn(2, 4), tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK: aten.sigmoid(%{{.*}}) : f32[6, 2, 4]
        CHECK: %scan = seqfuse.scan(%{{.*}}, %{{.*}}, h0=%l_h0_) {reverse=true, algo=auto}
        CHECK-NOT: aten.sigmoid
    """)


def lstm(x, W, U, b):
    # must not match: the cell state is multiplied by a gate computed from h (coupled, nonlinear)
    h = torch.zeros(x.shape[0], U.shape[0])
    c = torch.zeros(x.shape[0], U.shape[0])
    for t in range(x.shape[1]):
        i, f, g, o = (x[:, t] @ W + h @ U + b).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
    return h


def test_lstm_is_left_alone(tmp_path):
    text = after_pass(lstm, torch.randn(2, T, 3), torch.randn(3, 16), torch.randn(4, 16), torch.randn(16),
                      tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-NOT: seqfuse.scan
        CHECK-NOT: seqfuse.ssd
        CHECK: aten.tanh
    """)


def tanh_rnn(x, a):
    # must not match: tanh of the state is not linear
    h = torch.zeros(x.shape[0], x.shape[2])
    for t in range(x.shape[1]):
        h = torch.tanh(a * h + x[:, t])
    return h


def test_tanh_rnn_is_left_alone(tmp_path):
    text = after_pass(tanh_rnn, torch.randn(2, T, 4), torch.randn(4), tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-NOT: seqfuse.scan
        CHECK: aten.tanh
    """)


def silu_gate_unused(x):
    # not a recurrence: independent steps (no carried value) are not rewritten by this pass
    return torch.stack([F.silu(x[:, t]) for t in range(x.shape[1])], 1)


def test_independent_steps_are_not_a_recurrence(tmp_path):
    text = after_pass(silu_gate_unused, torch.randn(2, T, 4), tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-NOT: seqfuse.scan
        CHECK: aten.stack
    """)


def outer_gate(x, a):
    # the gate (B, 1, N) and the input (B, D, 1) each cover part of the (B, D, N) state
    h = torch.zeros(x.shape[0], x.shape[2], a.shape[-1])
    for t in range(x.shape[1]):
        h = a[:, t, None, :].exp() * h + x[:, t, :, None]
    return h


def test_dynamic_sizes_reach_the_scan_as_sym_size_nodes(tmp_path):
    # dynamic=True: batch, D and N are symbols (T = 6 is unrolled); the input term is expanded to
    # the whole state with sizes read from the inputs by aten.sym_size.int (never raw SymInts)
    text = after_pass(outer_gate, torch.randn(2, T, 3), -torch.rand(2, T, 4), tmp_path=tmp_path, dynamic=True)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK-SAME: %l_x_: f32[[[B:s[0-9]+]], 6, [[D:s[0-9]+]]]
        CHECK-SAME: %l_a_: f32[[[B]], 6, [[N:s[0-9]+]]]
        CHECK-NOT: aten.select.int
        CHECK-DAG: %[[SB:[a-z_0-9]+]] = aten.sym_size.int(%l_x_, 0) : sym
        CHECK-DAG: %[[SD:[a-z_0-9]+]] = aten.sym_size.int(%l_x_, 2) : sym
        CHECK-DAG: %[[SN:[a-z_0-9]+]] = aten.sym_size.int(%l_a_, 2) : sym
        CHECK: %[[X:[a-z_0-9]+]] = aten.expand(%{{.*}}, [%[[SB]], %[[SD]], 6, %[[SN]]]) : f32[[[B]], [[D]], 6, [[N]]]
        CHECK: %scan = seqfuse.scan(%{{.*}}, %[[X]]) {reverse=false, algo=auto} : (f32[[[B]], [[D]], 6, [[N]]], f32[[[B]], [[D]], [[N]]])
        CHECK-NOT: aten.select.int
        CHECK: return
    """)


def test_dynamic_hf_mamba_readout_reshape_uses_sym_size(tmp_path):
    # the folded readout y (B, D, T) is reshaped back to the per-step (B, D, 1) layout with
    # symbolic sizes taken from an input
    text = after_pass(hf_mamba, torch.randn(2, 3, T), torch.rand(2, 3, T), -torch.rand(3, 4), torch.randn(2, T, 4),
                      torch.randn(2, T, 4), tmp_path=tmp_path, dynamic=True)
    run_filecheck(text, """
        CHECK: %scan = seqfuse.scan(%{{.*}}, %{{.*}}, c=%{{.*}}) {reverse=false, algo=auto} : (f32[[[B:s[0-9]+]], [[D:s[0-9]+]], 6], f32[[[B]], [[D]], [[N:s[0-9]+]]])
        CHECK: %[[SB:[a-z_0-9]+]] = aten.sym_size.int(%l_hidden_, 0) : sym
        CHECK: %[[SD:[a-z_0-9]+]] = aten.sym_size.int(%l_hidden_, 1) : sym
        CHECK: aten.reshape(%{{.*}}, [6, %[[SB]], %[[SD]], 1])
        CHECK-NOT: aten.stack
        CHECK-NOT: aten.einsum
        CHECK: return
    """)


def test_rwkv4_stabilized_wkv_becomes_two_scans_read_through_guards(tmp_path):
    # the running maximum is gone: the keys, time_first and the values are read through seqfuse.within,
    # and the numerator and denominator are two scans with the decay e^{-exp(time_decay)}, in fp64
    rwkv = __import__("pytest").importorskip("transformers.models.rwkv.modeling_rwkv")

    def wkv(decay, first, k, v):
        return rwkv.rwkv_linear_attention_cpu(decay, first, k, v)[0]
    text = after_pass(wkv, torch.randn(5), torch.randn(5), torch.randn(2, T, 5), torch.randn(2, T, 5),
                      tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK: %[[W:[a-z_0-9]+]] = aten.neg(
        CHECK: %[[WG:[a-z_0-9]+]] = seqfuse.within(%[[W]], -inf, 0.0) : f32[5]
        CHECK: %[[WD:[a-z_0-9]+]] = aten.to.dtype(%[[WG]], f64) : f64[5]
        CHECK: aten.exp(%[[WD]]) : f64[5]
        CHECK: seqfuse.within(%l_k_, -30.0, 30.0) : f32[2, 6, 5]
        CHECK: seqfuse.within(%l_first_, -30.0, 30.0) : f32[5]
        CHECK: seqfuse.within(%l_v_, -1000000.0, 1000000.0) : f32[2, 6, 5]
        CHECK: %scan = seqfuse.scan(
        CHECK: %scan_1 = seqfuse.scan(
        CHECK-NOT: aten.maximum
        CHECK: aten.div.Tensor
        CHECK: return
    """)
