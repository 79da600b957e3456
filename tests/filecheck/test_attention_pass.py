"""FileCheck tests of the attention pass: the graph printed right after the pass.

Each case compiles a small function with ``dump_dir`` set, reads the dump of
the "attention" stage (``g0_NN_attention.txt``, see compiler/pipeline.py) and
checks it with FileCheck.  Positive cases show which ATen ops the pass
replaced and the op's operands and attributes; negative cases show the region
left as it was, each with a comment saying why it must not match.  A few
cases check the canonical form the recognizer reads (the "contractions" and
"masks" stages): many spellings, one form.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import seqfuse
from fc import run_filecheck

B, H, L, D = 2, 4, 16, 8
NEG_INF = float("-inf")


def dump(fn, *inputs, tmp_path, stage="attention", dynamic=None) -> str:
    """The graph text the pipeline wrote after ``stage`` when compiling ``fn``."""
    report = seqfuse.explain(fn, *inputs, options={"downstream": "eager", "dump_dir": str(tmp_path)},
                             dynamic=dynamic)
    paths = [p for p in report.dumps if os.path.basename(p).split("_", 2)[-1] == f"{stage}.txt"]
    assert len(paths) == 1, report.dumps
    with open(paths[0]) as f:
        return f.read()


def qkv(lq=L, lk=L, hkv=H, layout="bhld"):
    shapes = [(B, H, lq, D), (B, hkv, lk, D), (B, hkv, lk, D)]
    if layout == "blhd":
        shapes = [(s[0], s[2], s[1], s[3]) for s in shapes]
    return [torch.randn(*s) for s in shapes]


def future(lq, lk=None):
    lk = lq if lk is None else lk
    return torch.triu(torch.ones(lq, lk, dtype=torch.bool), diagonal=lk - lq + 1)


# --- positives -------------------------------------------------------------------------

def test_naive_causal(tmp_path):
    def f(q, k, v):
        l = q.shape[-2]
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        s = s.masked_fill(torch.triu(torch.ones(l, l, dtype=torch.bool), 1), NEG_INF)
        return torch.softmax(s, dim=-1) @ v
    run_filecheck(dump(f, *qkv(), tmp_path=tmp_path), """
        CHECK-LABEL: graph(
        CHECK-NOT: aten.
        CHECK: %[[O:[a-z_0-9]+]] = seqfuse.attention(%l_q_, %l_k_, %l_v_) {scale=0.35355339059327{{[0-9]*}}, mask=causal, diag=0, window=0, fill=-inf, bias_after_mask=false, gqa_groups=1, softcap=none, dropout=0.0, empty_rows=nan, algo=fused} : f32[2, 4, 16, 8]
        CHECK-NOT: aten.
        CHECK: return (%[[O]])
    """)


def test_blhd_einsum_permutes_in_and_out(tmp_path):
    def f(q, k, v):
        s = torch.einsum("blhd,bmhd->bhlm", q, k) * q.shape[-1] ** -0.5
        return torch.einsum("bhlm,bmhd->blhd", s.softmax(-1), v)
    run_filecheck(dump(f, *qkv(layout="blhd"), tmp_path=tmp_path), """
        CHECK-LABEL: graph(
        CHECK-SAME: %l_q_: f32[2, 16, 4, 8]
        CHECK-DAG: %[[Q:[a-z_0-9]+]] = aten.permute(%l_q_, [0, 2, 1, 3]) : f32[2, 4, 16, 8]
        CHECK-DAG: %[[K:[a-z_0-9]+]] = aten.permute(%l_k_, [0, 2, 1, 3]) : f32[2, 4, 16, 8]
        CHECK-DAG: %[[V:[a-z_0-9]+]] = aten.permute(%l_v_, [0, 2, 1, 3]) : f32[2, 4, 16, 8]
        CHECK-NOT: aten.einsum
        CHECK: %[[O:[a-z_0-9]+]] = seqfuse.attention(%[[Q]], %[[K]], %[[V]]) {scale=0.35355339059327{{[0-9]*}}, mask=none,
        CHECK-NEXT: %[[T:[a-z_0-9]+]] = aten.permute(%[[O]], [0, 2, 1, 3]) : f32[2, 16, 4, 8]
        CHECK-NEXT: return (%[[T]])
    """)


def test_scores_in_bqhk_layout_with_causal_mask(tmp_path):
    # scores (B, Lq, H, Lk): the (Lq, 1, Lk) mask is read in the scores' layout and still causal
    def f(q, k, v):
        s = torch.einsum("bqhd,bkhd->bqhk", q, k) * 0.125
        s = s.masked_fill(future(q.shape[1])[:, None, :], NEG_INF)
        return torch.einsum("bqhk,bkhd->bqhd", s.softmax(-1), v)
    run_filecheck(dump(f, *qkv(layout="blhd"), tmp_path=tmp_path), """
        CHECK-LABEL: graph(
        CHECK-NOT: aten.where
        CHECK: seqfuse.attention({{.*}}) {scale=0.125, mask=causal, diag=0,
        CHECK-NOT: keep=
    """)


def test_keys_first_scores_transpose_the_bias(tmp_path):
    # s[j, i] with the softmax over the keys (axis -2): the (Lk, Lq)-laid-out bias is moved to
    # the op's (Lq, Lk) order; the transposed causal mask is still causal
    def f(q, k, v, bias):
        s = torch.einsum("bhjd,bhid->bhji", k, q) * 0.125 + bias
        s = s.masked_fill(future(q.shape[-2]).T, NEG_INF)
        return torch.einsum("bhji,bhjd->bhid", s.softmax(-2), v)
    run_filecheck(dump(f, *qkv(), torch.randn(L, L), tmp_path=tmp_path), """
        CHECK-LABEL: graph(
        CHECK: %[[U:[a-z_0-9]+]] = aten.unsqueeze(%{{.*}}, 0) : f32[1, 1, 16, 16]
        CHECK-NEXT: %[[B:[a-z_0-9]+]] = aten.permute(%[[U]], [0, 1, 3, 2]) : f32[1, 1, 16, 16]
        CHECK-NEXT: seqfuse.attention(%l_q_, %l_k_, %l_v_, bias=%[[B]]) {scale=0.125, mask=causal, diag=0,
    """)


def test_gqa_reads_the_unrepeated_keys_and_values(tmp_path):
    def f(q, k, v):
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        return torch.softmax(q @ k.transpose(-2, -1) * 0.125, -1) @ v
    run_filecheck(dump(f, *qkv(hkv=2), tmp_path=tmp_path), """
        CHECK-LABEL: graph(
        CHECK-SAME: %l_k_: f32[2, 2, 16, 8]
        CHECK-NOT: repeat_interleave
        CHECK: seqfuse.attention(%l_q_, %l_k_, %l_v_) {scale=0.125, {{.*}}, gqa_groups=2, {{.*}}} : f32[2, 4, 16, 8]
        CHECK-NOT: repeat_interleave
    """)


def test_gqa_expand_reshape(tmp_path):
    def f(q, k, v):
        b, hkv, l, d = k.shape
        k = k[:, :, None].expand(b, hkv, 2, l, d).reshape(b, 2 * hkv, l, d)
        v = v[:, :, None].expand(b, hkv, 2, l, d).reshape(b, 2 * hkv, l, d)
        return torch.softmax(q @ k.transpose(-2, -1) * 0.125, -1) @ v
    run_filecheck(dump(f, *qkv(hkv=2), tmp_path=tmp_path), """
        CHECK-LABEL: graph(
        CHECK-NOT: aten.expand
        CHECK: seqfuse.attention(%l_q_, %l_k_, %l_v_) {{.*}}gqa_groups=2,
    """)


def test_key_padding_keep_mask(tmp_path):
    def f(q, k, v, m):
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        return s.masked_fill(~m[:, None, None, :], NEG_INF).softmax(-1) @ v
    # ~m and masked_fill(~m) cancel: keep is m itself, broadcast to (B, 1, 1, Lk)
    run_filecheck(dump(f, *qkv(), torch.ones(B, L, dtype=torch.bool), tmp_path=tmp_path), """
        CHECK-LABEL: graph(
        CHECK-NOT: aten.bitwise_not
        CHECK: %[[M:[a-z_0-9]+]] = aten.unsqueeze(%{{[a-z_0-9]+}}, 2) : i1[2, 1, 1, 16]
        CHECK-NOT: aten.where
        CHECK: seqfuse.attention(%l_q_, %l_k_, %l_v_, keep=%[[M]]) {{.*}}mask=none, {{.*}}fill=-inf,
    """)


def test_padding_bias(tmp_path):
    def f(q, k, v, m):
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        return (s + (1.0 - m[:, None, None, :]) * -10000.0).softmax(-1) @ v
    run_filecheck(dump(f, *qkv(), torch.ones(B, L), tmp_path=tmp_path), """
        CHECK-LABEL: graph(
        CHECK: %[[BIAS:[a-z_0-9]+]] = aten.mul.Tensor(%{{[a-z_0-9]+}}, -10000.0) : f32[2, 1, 1, 16]
        CHECK-NOT: aten.add
        CHECK: seqfuse.attention(%l_q_, %l_k_, %l_v_, bias=%[[BIAS]]) {{.*}}mask=none,
    """)


def test_sliding_window_from_aranges(tmp_path):
    def f(q, k, v):
        l = q.shape[-2]
        i, j = torch.arange(l)[:, None], torch.arange(l)[None, :]
        s = q @ k.transpose(-2, -1) * 0.125
        return s.masked_fill(~((i - j >= 0) & (i - j < 4)), NEG_INF).softmax(-1) @ v
    # the mask was evaluated at compile time: no arange or comparison is left
    run_filecheck(dump(f, *qkv(), tmp_path=tmp_path), """
        CHECK-LABEL: graph(
        CHECK-NOT: aten.arange
        CHECK: seqfuse.attention(%l_q_, %l_k_, %l_v_) {scale=0.125, mask=window, diag=0, window=4, fill=-inf,
        CHECK-NOT: aten.arange
    """)


def test_causal_lq_ne_lk_is_bottom_right_aligned(tmp_path):
    def f(q, k, v):
        lq, lk = q.shape[-2], k.shape[-2]
        s = q @ k.transpose(-2, -1) * 0.125
        s = s.masked_fill(torch.triu(torch.ones(lq, lk, dtype=torch.bool), diagonal=lk - lq + 1), NEG_INF)
        return s.softmax(-1) @ v
    run_filecheck(dump(f, *qkv(lq=6), tmp_path=tmp_path), """
        CHECK-LABEL: graph(
        CHECK: seqfuse.attention(%l_q_, %l_k_, %l_v_) {scale=0.125, mask=causal, diag=10, window=0,
        CHECK-SAME: : f32[2, 4, 6, 8]
    """)


def test_softcap(tmp_path):
    def f(q, k, v):
        s = q @ k.transpose(-2, -1) * 0.125
        return torch.softmax(30.0 * torch.tanh(s / 30.0), -1) @ v
    run_filecheck(dump(f, *qkv(), tmp_path=tmp_path), """
        CHECK-LABEL: graph(
        CHECK-NOT: aten.tanh
        CHECK: seqfuse.attention(%l_q_, %l_k_, %l_v_) {scale=0.125, {{.*}}softcap=30.0, dropout=0.0,
    """)


def test_dropout_on_the_probabilities(tmp_path):
    def f(q, k, v):
        return F.dropout(torch.softmax(q @ k.transpose(-2, -1) * 0.125, -1), 0.1, training=True) @ v
    run_filecheck(dump(f, *qkv(), tmp_path=tmp_path), """
        CHECK-LABEL: graph(
        CHECK-NOT: aten.dropout
        CHECK: seqfuse.attention(%l_q_, %l_k_, %l_v_) {{.*}}dropout=0.1, empty_rows=nan, algo=fused}
    """)


def test_sdpa_is_lifted(tmp_path):
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    run_filecheck(dump(f, *qkv(), tmp_path=tmp_path), """
        CHECK-LABEL: graph(
        CHECK-NOT: scaled_dot_product_attention
        CHECK: seqfuse.attention(%l_q_, %l_k_, %l_v_) {scale=none, mask=causal, diag=0,
        CHECK-NOT: scaled_dot_product_attention
    """)


def test_dynamic_length_has_symbolic_shapes_and_scale(tmp_path):
    def f(q, k, v):
        i = torch.arange(q.shape[-2])
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        return s.masked_fill(i[None, :] > i[:, None], NEG_INF).softmax(-1) @ v
    # the causal mask holds at every length; the scale 1/sqrt(D) is a symbolic value
    run_filecheck(dump(f, *qkv(lq=12, lk=12), tmp_path=tmp_path, dynamic=True), """
        CHECK-LABEL: graph(
        CHECK-SAME: %l_q_: f32[{{s[0-9]+}}, {{s[0-9]+}}, [[L:s[0-9]+]], {{s[0-9]+}}]
        CHECK: %[[S:[a-z_0-9]+]] = truediv(1.0, %{{.*}}) : sym
        CHECK: seqfuse.attention(%l_q_, %l_k_, %l_v_) {scale=%[[S]], mask=causal, diag=0,
        CHECK-SAME: : f32[{{s[0-9]+}}, {{s[0-9]+}}, [[L]], {{s[0-9]+}}]
    """)


def test_two_attentions_in_one_graph(tmp_path):
    def f(q, k, v):
        a = torch.tanh(torch.softmax(q @ k.transpose(-2, -1) * 0.125, -1) @ v)
        s = (a @ k.transpose(-2, -1) * 0.125).masked_fill(future(q.shape[-2]), NEG_INF)
        return torch.softmax(s, -1) @ v
    run_filecheck(dump(f, *qkv(), tmp_path=tmp_path), """
        CHECK-LABEL: graph(
        CHECK: %[[A:[a-z_0-9]+]] = seqfuse.attention(%l_q_, %l_k_, %l_v_) {scale=0.125, mask=none,
        CHECK-NEXT: %[[T:[a-z_0-9]+]] = aten.tanh(%[[A]])
        CHECK-NEXT: %[[B:[a-z_0-9]+]] = seqfuse.attention(%[[T]], %l_k_, %l_v_) {scale=0.125, mask=causal,
        CHECK-NEXT: return (%[[B]])
    """)


def test_bmm_scores_viewed_to_heads_for_a_causal_mask(tmp_path):
    # (B·H, L, S) scores viewed to (B, H, L, S) for the mask, back to (B·H) for bmm: a regroup of
    # the batch axes only; the shape-only where-mask is still evaluated and classified as causal
    def f(q, k, v):
        b, h, l, d = q.shape
        s = torch.bmm(q.reshape(b * h, l, d), k.reshape(b * h, l, d).transpose(1, 2)).view(b, h, l, l)
        s = s.masked_fill(future(l), NEG_INF) * 0.125
        p = torch.softmax(s, -1).view(b * h, l, l)
        return torch.bmm(p, v.reshape(b * h, l, d)).view(b, h, l, d)
    run_filecheck(dump(f, *qkv(), tmp_path=tmp_path), """
        CHECK-LABEL: graph(
        CHECK: %[[Q:[a-z_0-9]+]] = aten.reshape(%l_q_, [8, 16, 8])
        CHECK: %[[K:[a-z_0-9]+]] = aten.reshape(%l_k_, [8, 16, 8])
        CHECK: %[[V:[a-z_0-9]+]] = aten.reshape(%l_v_, [8, 16, 8])
        CHECK-NOT: aten.softmax
        CHECK: %[[O:[a-z_0-9]+]] = seqfuse.attention(%[[Q]], %[[K]], %[[V]]) {scale=0.125, mask=causal, diag=0, window=0, fill=-inf, {{.*}}} : f32[8, 16, 8]
        CHECK-NEXT: %[[R:[a-z_0-9]+]] = aten.view(%[[O]], [2, 4, 16, 8])
        CHECK-NEXT: return (%[[R]])
    """)


def test_inplace_scale_and_bias_on_the_scores(tmp_path):
    # s /= c and s += b on scores nothing else reads are s / c and s + b; they leave with the region
    def f(q, k, v, b):
        s = q @ k.transpose(-2, -1)
        s /= 8.0
        s += b
        return torch.softmax(s, -1) @ v
    run_filecheck(dump(f, *qkv(), torch.randn(L, L), tmp_path=tmp_path), """
        CHECK-LABEL: graph(
        CHECK-NOT: aten.div_
        CHECK-NOT: aten.add_
        CHECK: %[[O:[a-z_0-9]+]] = seqfuse.attention(%l_q_, %l_k_, %l_v_, bias=%l_b_) {scale=0.125, mask=none,
        CHECK-NEXT: return (%[[O]])
    """)


def test_a_tril_mask_buffer_becomes_the_causal_attribute(tmp_path):
    # nanoGPT: the mask is a module buffer, a graph input; read as a constant under a value guard,
    # it becomes mask=causal and the op has no keep operand (the buffer is left unused)
    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("bias", torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32))

        def forward(self, q, k, v):
            t = q.shape[-2]
            s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            s = s.masked_fill(self.bias[:, :, :t, :t] == 0, NEG_INF)
            return torch.softmax(s, dim=-1) @ v
    run_filecheck(dump(Attn(), *qkv(), tmp_path=tmp_path), """
        CHECK-LABEL: graph(
        CHECK-SAME: %l_self_buffers_bias_: f32[1, 1, 32, 32]
        CHECK-NOT: l_self_buffers_bias_
        CHECK: %[[O:[a-z_0-9]+]] = seqfuse.attention(%l_q_, %l_k_, %l_v_) {scale=0.35355339059327{{[0-9]*}}, mask=causal, diag=0, window=0,
        CHECK-NOT: l_self_buffers_bias_
        CHECK: return (%[[O]])
    """)


# --- canonical forms the recognizer reads ------------------------------------------------

@pytest.mark.parametrize("spelling", ["matmul", "einsum", "broadcast_sum", "mT", "permute"])
def test_contractions_become_one_einsum(spelling, tmp_path):
    def f(q, k, v):
        if spelling == "matmul":
            s = torch.matmul(q, k.transpose(-2, -1))
        elif spelling == "einsum":
            s = torch.einsum("bhid,bhjd->bhij", q, k)
        elif spelling == "broadcast_sum":
            s = (q[:, :, :, None, :] * k[:, :, None, :, :]).sum(-1)
        elif spelling == "mT":
            s = q @ k.mT
        else:
            s = q @ k.permute(0, 1, 3, 2)
        return torch.softmax(s * 0.125, -1) @ v
    run_filecheck(dump(f, *qkv(), tmp_path=tmp_path, stage="contractions"), """
        CHECK-LABEL: graph(
        CHECK: %[[S:[a-z_0-9]+]] = aten.einsum(abcd,abed->abce, [%l_q_, %l_k_]) : f32[2, 4, 16, 16]
        CHECK: %[[P:[a-z_0-9]+]] = aten.softmax.int(
        CHECK: aten.einsum(abcd,abde->abce, [%[[P]], %l_v_]) : f32[2, 4, 16, 8]
    """)


@pytest.mark.parametrize("spelling", ["masked_fill_triu", "masked_fill_tril_eq0", "where_scalar", "where_tensor"])
def test_masks_become_one_where(spelling, tmp_path):
    def f(q, k, v):
        l = q.shape[-2]
        s = q @ k.transpose(-2, -1)
        if spelling == "masked_fill_triu":
            s = s.masked_fill(torch.triu(torch.ones(l, l, dtype=torch.bool), 1), NEG_INF)
        elif spelling == "masked_fill_tril_eq0":
            s = s.masked_fill(torch.tril(torch.ones(l, l)) == 0, NEG_INF)
        elif spelling == "where_scalar":
            s = torch.where(torch.tril(torch.ones(l, l, dtype=torch.bool)), s, NEG_INF)
        else:
            s = torch.where(torch.tril(torch.ones(l, l, dtype=torch.bool)), s, torch.tensor(NEG_INF))
        return torch.softmax(s, -1) @ v
    # one form: where.ScalarOther(keep, scores, fill) with keep = True where the score survives
    run_filecheck(dump(f, *qkv(), tmp_path=tmp_path, stage="masks"), """
        CHECK-LABEL: graph(
        CHECK: %[[S:[a-z_0-9]+]] = aten.einsum(abcd,abed->abce, [%l_q_, %l_k_])
        CHECK-NOT: aten.masked_fill
        CHECK: %[[W:[a-z_0-9]+]] = aten.where.ScalarOther(%{{[a-z_0-9]+}}, %[[S]], -inf) : f32[2, 4, 16, 16]
        CHECK-NEXT: aten.softmax.int(%[[W]], -1)
    """)


def test_softmax_written_out_becomes_softmax(tmp_path):
    def f(q, k, v):
        s = q @ k.transpose(-2, -1) * 0.125
        e = torch.exp(s - s.max(-1, keepdim=True).values)
        return e / e.sum(-1, keepdim=True) @ v
    # exp(s - max) / sum -> softmax(s): the max, exp, sum and division are gone
    run_filecheck(dump(f, *qkv(), tmp_path=tmp_path, stage="masks"), """
        CHECK-LABEL: graph(
        CHECK: %[[S:[a-z_0-9]+]] = aten.mul.Tensor(%{{[a-z_0-9]+}}, 0.125)
        CHECK-NOT: aten.max
        CHECK-NOT: aten.exp
        CHECK: %[[P:[a-z_0-9]+]] = aten.softmax.int(%[[S]], 3) : f32[2, 4, 16, 16]
        CHECK-NOT: aten.div
        CHECK: aten.einsum(abcd,abde->abce, [%[[P]], %l_v_])
    """)


# --- negatives: the region stays as it was -----------------------------------------------

def test_probabilities_returned_are_not_fused(tmp_path):
    # p is an output: the op never materializes the probabilities
    def f(q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1) * 0.125, -1)
        return p @ v, p
    run_filecheck(dump(f, *qkv(), tmp_path=tmp_path), """
        CHECK-LABEL: graph(
        CHECK-NOT: seqfuse.attention
        CHECK: %[[P:[a-z_0-9]+]] = aten.softmax.int(
        CHECK: %[[O:[a-z_0-9]+]] = aten.einsum(abcd,abde->abce, [%[[P]], %l_v_])
        CHECK-NOT: seqfuse.attention
        CHECK: return (%[[O]], %[[P]])
    """)


def test_softmax_over_the_query_axis_is_not_attention(tmp_path):
    # softmax(dim=-2) normalizes over queries; p·v then sums over keys: another function
    def f(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.125, dim=-2) @ v
    run_filecheck(dump(f, *qkv(), tmp_path=tmp_path), """
        CHECK-LABEL: graph(
        CHECK-NOT: seqfuse.attention
        CHECK: aten.softmax.int(%{{[a-z_0-9]+}}, -2)
        CHECK-NOT: seqfuse.attention
    """)


def test_mask_from_the_scores_is_not_attention(tmp_path):
    # the mask reads the scores (s < 0): data-dependent, not a mask the op can take up front
    def f(q, k, v):
        s = q @ k.transpose(-2, -1) * 0.125
        return torch.softmax(s.masked_fill(s < 0, NEG_INF), -1) @ v
    run_filecheck(dump(f, *qkv(), tmp_path=tmp_path), """
        CHECK-LABEL: graph(
        CHECK-NOT: seqfuse.attention
        CHECK: %[[S:[a-z_0-9]+]] = aten.mul.Tensor(
        CHECK: aten.lt.Scalar(%[[S]], 0)
        CHECK: aten.where.ScalarOther({{.*}}, %[[S]], -inf)
        CHECK-NOT: seqfuse.attention
    """)


def test_relu_on_the_scores_is_not_attention(tmp_path):
    # softmax(relu(s)) is not softmax(s) for any scale or mask
    def f(q, k, v):
        return torch.softmax(torch.relu(q @ k.transpose(-2, -1)), -1) @ v
    run_filecheck(dump(f, *qkv(), tmp_path=tmp_path), """
        CHECK-LABEL: graph(
        CHECK-NOT: seqfuse.attention
        CHECK: aten.relu(
        CHECK-NEXT: aten.softmax.int(
        CHECK-NOT: seqfuse.attention
    """)


def test_two_fills_are_not_attention(tmp_path):
    # -inf for the future, -1e4 for padding: the op has a single fill value
    def f(q, k, v, keep):
        s = (q @ k.transpose(-2, -1)).masked_fill(future(q.shape[-2]), NEG_INF)
        return torch.softmax(s.masked_fill(~keep[:, None, None, :], -1e4), -1) @ v
    run_filecheck(dump(f, *qkv(), torch.ones(B, L, dtype=torch.bool), tmp_path=tmp_path), """
        CHECK-LABEL: graph(
        CHECK-NOT: seqfuse.attention
        CHECK: aten.where.ScalarOther({{.*}}, -inf)
        CHECK: aten.where.ScalarOther({{.*}}, -10000.0)
        CHECK-NOT: seqfuse.attention
    """)


def test_scale_after_a_finite_fill_is_not_attention(tmp_path):
    # (masked_fill(s, -1e4)) * 0.5 fills with -5e3: the op scales before masking
    def f(q, k, v):
        s = (q @ k.transpose(-2, -1)).masked_fill(future(q.shape[-2]), -1e4)
        return torch.softmax(s * 0.5, -1) @ v
    run_filecheck(dump(f, *qkv(), tmp_path=tmp_path), """
        CHECK-LABEL: graph(
        CHECK-NOT: seqfuse.attention
        CHECK: %[[W:[a-z_0-9]+]] = aten.where.ScalarOther({{.*}}, -10000.0)
        CHECK-NEXT: aten.mul.Tensor(%[[W]], 0.5)
        CHECK-NOT: seqfuse.attention
    """)


def test_reshape_that_mixes_the_query_axis_is_not_attention(tmp_path):
    # (B·H, L, S) -> (B, H·L, S) moves the query axis into the batch: not proven a batch regroup
    # (the near miss names the reshape, tests/golden/test_attention_real_models.py)
    def f(q, k, v):
        b, h, l, d = q.shape
        s = torch.bmm(q.reshape(b * h, l, d), k.reshape(b * h, l, d).transpose(1, 2)) * 0.125
        p = s.reshape(b, h * l, l).softmax(-1).reshape(b * h, l, l)
        return torch.bmm(p, v.reshape(b * h, l, d)).reshape(b, h, l, d)
    run_filecheck(dump(f, *qkv(), tmp_path=tmp_path), """
        CHECK-LABEL: graph(
        CHECK-NOT: seqfuse.attention
        CHECK: %[[S:[a-z_0-9]+]] = aten.reshape(%{{[a-z_0-9]+}}, [2, 64, 16])
        CHECK-NEXT: aten.softmax.int(%[[S]], -1)
        CHECK-NOT: seqfuse.attention
    """)


# --- a softmax normalized after the value contraction (canonicalize's normalize_postnormalized) ---------

def test_lazily_normalized_softmax_is_attention(tmp_path):
    # exp(s − max) @ v / Σ exp(s − max): the exponentials, their sum and the division are gone
    def f(q, k, v):
        s = q @ k.transpose(-2, -1) * 0.5
        e = torch.exp(s - s.amax(-1, keepdim=True))
        return (e @ v) / e.sum(-1, keepdim=True)
    run_filecheck(dump(f, *qkv(), tmp_path=tmp_path), """
        CHECK-NOT: aten.exp
        CHECK: seqfuse.attention(%l_q_, %l_k_, %l_v_) {scale=0.5, mask=none
        CHECK-NOT: aten.div
        CHECK-NOT: aten.exp
    """)


def test_sink_in_the_max_and_the_sum_is_the_sink_operand(tmp_path):
    # fla's naive_parallel_attn with sink_bias: m = maximum(rowmax, c), Σ + exp(c − m) → one attention with sink
    naive = pytest.importorskip("fla.ops.attn.naive").naive_parallel_attn
    q, k, v = (torch.randn(B, L, H, D) for _ in range(3))
    sink = torch.randn(H)
    run_filecheck(dump(lambda q, k, v, s: naive(q, k, v, sink_bias=s)[0], q, k, v, sink, tmp_path=tmp_path), """
        CHECK: seqfuse.attention({{.*}}sink=%{{.*}}mask=causal
        CHECK-NOT: aten.exp
        CHECK-NOT: aten.div.Tensor
    """)


def test_lazy_normalization_without_the_max_is_not_attention(tmp_path):
    # exp(s) @ v / Σ exp(s) overflows where softmax does not: left as written (exp and the division stay)
    def f(q, k, v):
        e = torch.exp(q @ k.transpose(-2, -1) * 0.5)
        return (e @ v) / e.sum(-1, keepdim=True)
    run_filecheck(dump(f, *qkv(), tmp_path=tmp_path), """
        CHECK-NOT: seqfuse.attention
        CHECK: aten.exp
        CHECK: aten.div.Tensor
        CHECK-NOT: seqfuse.attention
    """)


def test_per_query_sinks_behind_float_casts_are_the_sink_operand(tmp_path):
    # inkling2's spelling: cat([scores + bias, sinks (B, H, L, 1)]).float(), softmax, [..., :-1].to(dtype)
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    bias, sinks = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 1)

    def attn(q, k, v, bias, sinks):
        s = q @ k.transpose(2, 3) * 0.3 + bias
        p = F.softmax(torch.cat([s, sinks], dim=-1).float(), dim=-1)[..., :-1].to(q.dtype)
        return p @ v
    run_filecheck(dump(attn, q, k, v, bias, sinks, tmp_path=tmp_path), """
        CHECK: seqfuse.attention({{.*}}bias=%{{.*}}sink=%{{.*}}mask=none
        CHECK-NOT: aten.cat
        CHECK-NOT: aten._softmax
        CHECK: return
    """)
