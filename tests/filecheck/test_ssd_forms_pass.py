"""FileCheck on the graph right after the ssd_forms pass (dump stage "ssd_forms")."""

import torch
import torch.nn.functional as F
from torch._higher_order_ops.associative_scan import associative_scan_op
from torch._higher_order_ops.scan import scan

import pytest
from fc import graph_after, run_filecheck

fla_retention = pytest.importorskip("fla.ops.retention.naive")


def after_pass(fn, *args, tmp_path, stage="ssd_forms", dynamic=None):
    return graph_after(fn, *args, tmp_path=tmp_path, stage=stage, dynamic=dynamic)[0]


def causal_linear_attention(q, k, v):
    return (q @ k.mT).tril() @ v


def test_causal_linear_attention_bhtd(tmp_path):
    # (B, H, T, D) -> the ssd layout (B, T, H, ·) and back; the scores and the mask are gone
    text = after_pass(causal_linear_attention, *[torch.randn(2, 3, 8, 4) for _ in range(3)], tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK: %[[X:[a-z_0-9]+]] = aten.permute(%l_v_, [0, 2, 1, 3])
        CHECK: %[[B:[a-z_0-9]+]] = aten.permute(%l_k_, [0, 2, 1, 3])
        CHECK: %[[C:[a-z_0-9]+]] = aten.permute(%l_q_, [0, 2, 1, 3])
        CHECK: %ssd = seqfuse.ssd(%[[X]], %[[B]], %[[C]]) {decay=none, chunk=64, algo=auto} : (f32[2, 8, 3, 4], f32[2, 3, 4, 4])
        CHECK: %[[Y:[a-z_0-9]+]] = getitem(%ssd, 0)
        CHECK: %[[O:[a-z_0-9]+]] = aten.permute(%[[Y]], [0, 2, 1, 3]) : f32[2, 3, 8, 4]
        CHECK-NOT: aten.einsum
        CHECK-NOT: aten.tril
        CHECK: return (%[[O]])
    """)


def mamba2_attention_form(C, Bm, x, A):
    # (b, l, h, n) operands are already in the ssd layout: no permute of x, b, c
    t = A.shape[-1]
    Acs = A.cumsum(-1)
    L = torch.exp((Acs[..., :, None] - Acs[..., None, :]).masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), -torch.inf))
    M = torch.einsum("blhn,bshn->blsh", C, Bm) * L.permute(0, 2, 3, 1)
    return torch.einsum("blsh,bshp->blhp", M, x)


def test_mamba2_segsum_is_scalar_decay_with_a(tmp_path):
    args = (torch.randn(2, 8, 3, 4), torch.randn(2, 8, 3, 4), torch.randn(2, 8, 3, 5), -torch.rand(2, 3, 8))
    text = after_pass(mamba2_attention_form, *args, tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK: %[[A:[a-z_0-9]+]] = aten.permute(%l_a_, [0, 2, 1]) : f32[2, 8, 3]
        CHECK: %ssd = seqfuse.ssd(%l_x_, %l_bm_, %l_c_, a=%[[A]]) {decay=scalar
        CHECK-NOT: aten.exp
        CHECK-NOT: aten.cumsum
        CHECK: return (%getitem)
    """)


def simple_gla_bhtd(q, k, v, g):
    # fla's naive_parallel_simple_gla in (B, H, T, D) with its 1/sqrt(D) scale on the scores
    A = q @ k.mT * q.shape[-1] ** -0.5
    G = g.cumsum(-1)
    return (A * (G[..., :, None] - G[..., None, :]).tril().exp().tril()) @ v


def test_simple_gla_dynamic_folds_the_scale_into_c(tmp_path):
    # dynamic shapes: the scale is symbolic and multiplies c; a is the gate, moved to (B, T, H)
    args = [torch.randn(2, 3, 8, 4) for _ in range(3)] + [F.logsigmoid(torch.randn(2, 3, 8))]
    text = after_pass(simple_gla_bhtd, *args, tmp_path=tmp_path, dynamic=True)
    run_filecheck(text, """
        CHECK: %[[S:[a-z_0-9]+]] = pow(%{{[a-z_0-9]+}}, -0.5) : sym
        CHECK: %[[C:[a-z_0-9]+]] = aten.mul.Tensor(%{{[a-z_0-9]+}}, %[[S]])
        CHECK: %[[A:[a-z_0-9]+]] = aten.permute(%l_g_, [0, 2, 1])
        CHECK: seqfuse.ssd(%{{[a-z_0-9]+}}, %{{[a-z_0-9]+}}, %[[C]], a=%[[A]]) {decay=scalar
        CHECK-SAME: : (f32[s{{[0-9]+}}, s{{[0-9]+}}, s{{[0-9]+}}, s{{[0-9]+}}]
        CHECK-NOT: aten.exp
        CHECK-NOT: aten.cumsum
    """)


def retention(q, k, v):
    return fla_retention.naive_retention(q, k, v)


def test_retention_a_is_log_gamma(tmp_path):
    # exp2((n_i - n_j)·log2 γ)·[i >= j]: a = log2 γ · ln 2, broadcast over batch and time
    text = after_pass(retention, *[torch.randn(2, 3, 8, 4) for _ in range(3)], tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK: %log2 = aten.log2
        CHECK: aten.expand(%{{[a-z_0-9]+}}, [2, 8, -1])
        CHECK: %[[A:[a-z_0-9]+]] = aten.mul.Tensor(%{{[a-z_0-9]+}}, 0.69314
        CHECK: seqfuse.ssd({{.*}}, a=%[[A]]) {decay=scalar
        CHECK-NOT: aten.exp2
    """)


def strictly_lower(q, k, v):
    # must not match: [j < i] drops the diagonal, which a recurrence's readout always includes
    return (q @ k.mT).tril(-1) @ v


def test_strictly_lower_is_the_ssd_of_the_keys_one_step_later(tmp_path):
    # y_t = Σ_{s<t} (q_t·k_s) v_s: k and v shifted one step later along T (zero at t = 0), then inclusive
    text = after_pass(strictly_lower, *[torch.randn(2, 3, 8, 4) for _ in range(3)], tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-NOT: aten.tril
        CHECK: %[[XS:[a-z_0-9]+]] = aten.slice.Tensor(%{{[a-z_0-9]+}}, 1, 0, -1) : f32[2, 7, 3, 4]
        CHECK: %[[X:[a-z_0-9]+]] = aten.constant_pad_nd(%[[XS]], [0, 0, 0, 0, 1, 0], 0.0) : f32[2, 8, 3, 4]
        CHECK: %[[BS:[a-z_0-9]+]] = aten.slice.Tensor(%{{[a-z_0-9]+}}, 1, 0, -1) : f32[2, 7, 3, 4]
        CHECK: %[[B:[a-z_0-9]+]] = aten.constant_pad_nd(%[[BS]], [0, 0, 0, 0, 1, 0], 0.0) : f32[2, 8, 3, 4]
        CHECK: seqfuse.ssd(%[[X]], %[[B]], %{{[a-z_0-9]+}}) {decay=none,
        CHECK-NOT: aten.tril
        CHECK-NOT: aten.einsum
    """)


def rwkv_exclusive(q, k, v, w):
    t = q.shape[-2]
    wc = w.cumsum(-1)
    decay = torch.exp(wc[..., :, None] - w[..., :, None] - wc[..., None, :])
    return (q @ k.mT * decay.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(-1), 0.0)) @ v


def test_exclusive_segment_sum_shifts_the_decay_too(tmp_path):
    # exp(w_{j+1} + … + w_{i-1}), j < i: x, b and a all one step later; no exp(a) factor on x.  a's
    # step 0 is 0·w_{T-1} (not 0): the op still sees a non-finite w_{T-1}, which the program's
    # G_{T-1} - w_{T-1} reads; the exponent is a finite_only, so the op carries finite_only=true
    text = after_pass(rwkv_exclusive, *[torch.randn(2, 3, 8, 4) for _ in range(3)], -torch.rand(2, 3, 8),
                      tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK: %[[W:[a-z_0-9]+]] = aten.permute(%l_w_, [0, 2, 1]) : f32[2, 8, 3]
        CHECK: %[[LAST:[a-z_0-9]+]] = aten.slice.Tensor(%[[W]], 1, -1, none) : f32[2, 1, 3]
        CHECK: %[[ZERO:[a-z_0-9]+]] = aten.mul.Tensor(%[[LAST]], 0.0)
        CHECK: %[[HEAD:[a-z_0-9]+]] = aten.slice.Tensor(%[[W]], 1, 0, -1) : f32[2, 7, 3]
        CHECK: %[[A:[a-z_0-9]+]] = aten.cat([%[[ZERO]], %[[HEAD]]], 1) : f32[2, 8, 3]
        CHECK-NOT: aten.exp
        CHECK: seqfuse.ssd({{.*}}, a=%[[A]]) {decay=scalar, chunk=64, finite_only=true,
    """)


def causal_softmax(q, k, v):
    # must not match: a softmax makes it attention (taken by the attention pass before this one)
    t = q.shape[-2]
    return (q @ k.mT).masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf")).softmax(-1) @ v


def test_softmax_attention_is_not_an_ssd(tmp_path):
    text = after_pass(causal_softmax, *[torch.randn(2, 3, 8, 4) for _ in range(3)], tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK: seqfuse.attention
        CHECK-NOT: seqfuse.ssd
    """)


def cumsum_linear_attention(q, k, v):
    # Σ_{s<=t} k_s ⊗ v_s read out by q_t: the (B, T, H, N, P) state tensor is never built
    S = torch.einsum("bthn,bthp->bthnp", k, v).cumsum(1)
    return torch.einsum("bthn,bthnp->bthp", q, S)


def test_cumsum_form_drops_the_state_tensor(tmp_path):
    text = after_pass(cumsum_linear_attention, *[torch.randn(2, 8, 3, 4) for _ in range(3)], tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK: %ssd = seqfuse.ssd(%l_v_, %l_k_, %l_q_) {decay=none
        CHECK-NOT: aten.cumsum
        CHECK-NOT: aten.einsum
        CHECK: return (%getitem)
    """)


def exclusive_cumsum_linear_attention(q, k, v):
    kv = torch.einsum("bthn,bthp->bthnp", k, v)
    return torch.einsum("bthn,bthnp->bthp", q, kv.cumsum(1) - kv)


def test_exclusive_cumsum_is_the_strictly_causal_form(tmp_path):
    # cumsum(S) - S = Σ_{s<t} S_s: v and k one step later, no state tensor, no subtraction left
    text = after_pass(exclusive_cumsum_linear_attention, *[torch.randn(2, 8, 3, 4) for _ in range(3)],
                      tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK: %[[VS:[a-z_0-9]+]] = aten.slice.Tensor(%l_v_, 1, 0, -1) : f32[2, 7, 3, 4]
        CHECK: %[[V:[a-z_0-9]+]] = aten.constant_pad_nd(%[[VS]], [0, 0, 0, 0, 1, 0], 0.0)
        CHECK: %[[KS:[a-z_0-9]+]] = aten.slice.Tensor(%l_k_, 1, 0, -1) : f32[2, 7, 3, 4]
        CHECK: %[[K:[a-z_0-9]+]] = aten.constant_pad_nd(%[[KS]], [0, 0, 0, 0, 1, 0], 0.0)
        CHECK: seqfuse.ssd(%[[V]], %[[K]], %l_q_) {decay=none
        CHECK-NOT: aten.cumsum
        CHECK-NOT: aten.sub
        CHECK-NOT: aten.einsum
    """)


def plain_cumsum(x):
    # must not match: a cumsum alone is a trivial scan, cheaper as it is
    return x.cumsum(1)


def test_plain_cumsum_is_left_alone(tmp_path):
    text = after_pass(plain_cumsum, torch.randn(2, 8, 3), tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-NOT: seqfuse
        CHECK: aten.cumsum
    """)


def _linear_body(h, xs):
    a, b = xs
    h = a * h + b
    return h, h.clone()


def hop_scan(a, b):
    return scan(_linear_body, torch.zeros_like(b[0]), (a, b))[1]


def test_hop_scan_moves_time_to_axis_minus_2(tmp_path):
    # (T, B, N) scanned over axis 0 -> seqfuse.scan on (B, T, N), zero initial carry dropped, and back
    text = after_pass(hop_scan, torch.rand(8, 2, 4), torch.randn(8, 2, 4), tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK: %[[A:[a-z_0-9]+]] = aten.permute(%l_a_, [1, 0, 2]) : f32[2, 8, 4]
        CHECK: %[[B:[a-z_0-9]+]] = aten.permute(%l_b_, [1, 0, 2]) : f32[2, 8, 4]
        CHECK: %scan_1 = seqfuse.scan(%[[A]], %[[B]]) {reverse=false
        CHECK: %[[Y:[a-z_0-9]+]] = getitem(%scan_1, 0)
        CHECK: aten.permute(%[[Y]], [1, 0, 2]) : f32[8, 2, 4]
        CHECK-NOT: = scan(
    """)


def _linear_combine(a_left, b_left, a_right, b_right):
    return a_left * a_right, a_right * b_left + b_right


def assoc_scan(a, b):
    return associative_scan_op(_linear_combine, (a.movedim(2, 0), b.movedim(2, 0)), ())[1].movedim(0, 2)


def test_associative_scan_hop_becomes_scan(tmp_path):
    # (a_l·a_r, a_r·b_l + b_r) is the linear recurrence's combine: all states = seqfuse.scan's y
    text = after_pass(assoc_scan, torch.rand(2, 3, 8, 4), torch.randn(2, 3, 8, 4), tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK: seqfuse.scan(%{{[a-z_0-9]+}}, %{{[a-z_0-9]+}}) {reverse=false
        CHECK-SAME: (f32[2, 3, 8, 4], f32[2, 3, 4])
        CHECK-NOT: = associative_scan(
    """)


def rwkv6_intra(q, k, v, w):
    # RWKV-6's intra-chunk scores: a decay per key channel inside q·k, the exclusive exponent, [j < i]
    g = w.cumsum(-2)
    t = q.shape[-2]
    e = g[..., :, None, :] - w[..., :, None, :] - g[..., None, :, :]
    keep = torch.arange(t)[None, :] < torch.arange(t)[:, None]
    return (q[..., :, None, :] * k[..., None, :, :] * e.exp()).sum(-1).masked_fill(~keep, 0) @ v


def test_decay_per_key_channel_is_a_vector_ssd(tmp_path):
    # a = w laid (B, T, H, N) and one step later (the exclusive exponent; step 0 is 0·w_{T-1}), as are the
    # keys and values; the pairwise exponent, its exp and the mask are gone; a difference spelling (finite_only)
    args = (torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 5),
            F.logsigmoid(torch.randn(1, 2, 8, 4)))
    text = after_pass(rwkv6_intra, *args, tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK: %[[W:[a-z_0-9]+]] = aten.squeeze.dims(%l_w_, [0]) : f32[2, 8, 4]
        CHECK: %[[WP:[a-z_0-9]+]] = aten.permute(%[[W]], [1, 0, 2]) : f32[8, 2, 4]
        CHECK: %[[WU:[a-z_0-9]+]] = aten.unsqueeze(%[[WP]], 0)
        CHECK: %[[WE:[a-z_0-9]+]] = aten.expand(%[[WU]],
        CHECK: %[[WL:[a-z_0-9]+]] = aten.slice.Tensor(%[[WE]], 1, -1, none) : f32[1, 1, 2, 4]
        CHECK: %[[WZ:[a-z_0-9]+]] = aten.mul.Tensor(%[[WL]], 0.0)
        CHECK: %[[WS:[a-z_0-9]+]] = aten.slice.Tensor(%[[WE]], 1, 0, -1) : f32[1, 7, 2, 4]
        CHECK: %[[A:[a-z_0-9]+]] = aten.cat([%[[WZ]], %[[WS]]], 1) : f32[1, 8, 2, 4]
        CHECK: %ssd = seqfuse.ssd(
        CHECK-SAME: a=%[[A]]) {decay=vector
        CHECK-SAME: chunk=64, finite_only=true, algo=auto} : (f32[1, 8, 2, 5], f32[1, 2, 5, 4])
        CHECK-NOT: aten.exp
        CHECK-NOT: aten.lt
        CHECK: return
    """)
