"""Golden tests: attention as real model code writes it (issue 15), and the reshaped-scores forms.

Real models are transformers 5's own modules, built from tiny random configs, run through
``helpers.Logits`` in training mode with the eager attention path: Bloom (ALiBi through
``baddbmm`` with beta/alpha, the scores viewed from (B·H, L, S) to (B, H, L, S) for the mask and
the probabilities viewed back for ``bmm``) and Falcon (ALiBi added before the scale with
in-place ``*=``, ``/=`` on the scores; multi-query; the new decoder architecture).  Each is
compiled once with ``dump_dir``: the graph after the attention pass is checked with FileCheck,
the report must show one attention per layer and no attention near miss, and the logits and
the gradient of every parameter must equal eager (fp32, relative RMS error < 1e-5,
``helpers.check_against_eager``).

The synthetic cases are small spellings of the same forms (bmm over reshaped heads with the
softmax on either grouping, per-head biases and key padding added in the other grouping,
dynamic sizes) and their negatives: a reshape that mixes the query or key axis into the batch,
and an in-place write between the scores and the values, must stay as they are (equal to
eager) and leave a near miss that names them.
"""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "filecheck"))
from fc import run_filecheck  # noqa: E402  (tests/filecheck/fc.py)
from helpers import Logits, check_against_eager  # noqa: E402

AOT = {"downstream": "aot_eager"}
SCALE = "0.35355339059327{{[0-9]*}}"  # 1/sqrt(8), head dim 8


def attention_dump(report) -> str:
    """The graph text written after the attention pass (one graph)."""
    paths = [p for p in report.dumps if os.path.basename(p).split("_", 2)[-1] == "attention.txt"]
    assert len(paths) == 1, report.dumps
    with open(paths[0]) as f:
        return f.read()


def check(fn, *inputs, tmp_path, rewrites: int, checks: str, dynamic=None):
    """check_against_eager (outputs and every gradient), ``rewrites`` attention ops and no attention
    near miss in the report, FileCheck ``checks`` on the graph after the attention pass."""
    report = check_against_eager(fn, *inputs, options={**AOT, "dump_dir": str(tmp_path)}, dynamic=dynamic)
    assert report.count("attention") == rewrites, str(report)
    assert not [m for m in report.near_misses if m.kind == "attention"], str(report)
    run_filecheck(attention_dump(report), checks)
    return report


def check_near_miss(fn, *inputs, reason: str):
    """Equal to eager, no attention rewrite, a near miss whose reason contains ``reason``."""
    report = check_against_eager(fn, *inputs, options={"downstream": "eager"})
    assert report.count("attention") == 0, str(report)
    reasons = [m.reason for m in report.near_misses if m.kind == "attention"]
    assert any(reason in r for r in reasons), f"no near miss mentioning {reason!r}: {reasons}"


# --- transformers models -----------------------------------------------------------------

transformers = pytest.importorskip("transformers")
T = transformers


def _bloom(layers):
    return T.BloomForCausalLM(T.BloomConfig(vocab_size=64, hidden_size=32, n_layer=layers, n_head=4,
                                            hidden_dropout=0.0, attention_dropout=0.0))


def _falcon(layers, alibi, multi_query, new_arch=False):
    cfg = T.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                         num_kv_heads=2 if new_arch else None, alibi=alibi, multi_query=multi_query,
                         new_decoder_architecture=new_arch, parallel_attn=True, bias=False,
                         hidden_dropout=0.0, attention_dropout=0.0, attn_implementation="eager")
    return T.FalconForCausalLM(cfg)


def _tokens():
    return torch.randint(0, 64, (2, 12))


def test_bloom_alibi_baddbmm(tmp_path):
    # baddbmm(alibi, q, kᵀ, beta=1, alpha=1/sqrt(d)) -> (B·H, L, S) scores with the ALiBi bias;
    # view (B, H, L, S) + the float causal mask; softmax; view (B·H, L, S); bmm with v.
    # The (B, 1, L, S) mask joins the (B·H) grouping (expand + flatten), the op reads q, k, v as bmm does.
    torch.manual_seed(0)
    model = Logits(_bloom(1)).train()
    check(model, _tokens(), tmp_path=tmp_path, rewrites=1, checks=f"""
        CHECK-LABEL: graph(
        CHECK: %[[MASK:[a-z_0-9]+]] = aten.flatten.using_ints(%{{{{[a-z_0-9]+}}}}, 0, 1) : f32[8, 12, 12]
        CHECK: %[[BIAS:[a-z_0-9]+]] = aten.add.Tensor(%{{{{[a-z_0-9]+}}}}, %[[MASK]]) : f32[8, 12, 12]
        CHECK-NOT: aten.softmax
        CHECK: seqfuse.attention(%reshape, %reshape_1, %reshape_2, bias=%[[BIAS]]) {{scale={SCALE}, mask=none, {{{{.*}}}}gqa_groups=1, {{{{.*}}}}}} : f32[8, 12, 8]
        CHECK-NEXT: aten.view(%attention, [2, 4, 12, 8])
        CHECK-NOT: aten.softmax
        CHECK-NOT: aten.bmm
        CHECK: return
    """)


@pytest.mark.parametrize("alibi,multi_query", [(False, False), (True, False), (True, True)],
                         ids=["rotary", "alibi", "alibi_mq"])
def test_falcon_eager_attention(tmp_path, alibi, multi_query):
    # rotary: s = q @ kᵀ; s /= sqrt(d) (in place); softmax(s + mask) @ v.
    # alibi:  (q @ kᵀ).view(B, H, L, S) + alibi.view(B, H, 1, S); *= 1/sqrt(d) (in place, after the
    #         bias: c·(s + b) = c·s + c·b); softmax(+ mask); view; @ v.
    # multi_query: k and v with one head broadcast over the 4 query heads (gqa_groups=4).
    torch.manual_seed(0)
    model = Logits(_falcon(1, alibi, multi_query)).train()
    # with ALiBi two biases are summed (alibi, then the mask): one bias operand; the mask alone is
    # transformers' where(causal, 0, finfo.min), which restates the causal mask (bias_mask)
    mask = "none" if alibi else "causal, diag=0, window=0, fill=-inf, bias_after_mask=false"
    tail = "{{.*}}empty_rows=nan, algo=fused" if alibi else "{{.*}}empty_rows=nan, bias_mask=true, algo=fused"
    scaled_alibi = f"CHECK: aten.mul.Tensor(%{{{{[a-z_0-9]+}}}}, {SCALE}) : f32[2, 4, 1, 12]" if alibi else \
        "CHECK: aten.where.ScalarOther"
    check(model, _tokens(), tmp_path=tmp_path, rewrites=1, checks=f"""
        CHECK-LABEL: graph(
        {scaled_alibi}
        CHECK-NOT: aten.softmax
        CHECK: seqfuse.attention({{{{.*}}}}, bias=%{{{{[a-z_0-9]+}}}}) {{scale={SCALE}, mask={mask}, {{{{.*}}}}gqa_groups={4 if multi_query else 1}, {tail}}} : f32[2, 4, 12, 8]
        CHECK-NOT: aten.softmax
        CHECK-NOT: aten.mul_.
        CHECK-NOT: aten.div_.
        CHECK: return
    """)


def test_falcon_new_decoder_architecture(tmp_path):
    # kv heads broadcast with broadcast_to + flatten (kept as materialized heads), ALiBi
    torch.manual_seed(0)
    model = Logits(_falcon(1, True, False, new_arch=True)).train()
    check(model, _tokens(), tmp_path=tmp_path, rewrites=1, checks=f"""
        CHECK-LABEL: graph(
        CHECK-NOT: aten.softmax
        CHECK: seqfuse.attention({{{{.*}}}}bias={{{{.*}}}}) {{scale={SCALE}, mask=none,
        CHECK-NOT: aten.softmax
        CHECK: return
    """)


# --- synthetic: the reshaped-scores bmm form ------------------------------------------

B, H, L, D = 2, 3, 10, 8


def qkv(b=B, h=H, l=L, d=D):
    return [torch.randn(b, h, l, d, requires_grad=True) for _ in range(3)]


def bmm_reshaped_scores(q, k, v):
    """bmm over (B·H) heads, the scores viewed to (B, H, L, S) for a causal -inf bias, back for bmm."""
    b, h, l, d = q.shape
    s = torch.bmm(q.reshape(b * h, l, d), k.reshape(b * h, l, d).transpose(1, 2))
    s = s.view(b, h, l, l) / math.sqrt(d)
    s = s + torch.triu(torch.full((l, l), float("-inf")), 1)
    p = torch.softmax(s, dim=-1).view(b * h, l, l)
    return torch.bmm(p, v.reshape(b * h, l, d)).view(b, h, l, d)


def test_bmm_with_reshaped_scores(tmp_path):
    check(bmm_reshaped_scores, *qkv(), tmp_path=tmp_path, rewrites=1, checks="""
        CHECK-LABEL: graph(
        CHECK-NOT: aten.softmax
        CHECK: %[[BIAS:[a-z_0-9]+]] = aten.flatten.using_ints(%{{[a-z_0-9]+}}, 0, 1) : f32[1, 10, 10]
        CHECK: seqfuse.attention(%reshape, %reshape_1, %reshape_2, bias=%[[BIAS]]) {scale=0.35355339059327{{[0-9]*}}, mask=none, {{.*}}} : f32[6, 10, 8]
        CHECK-NOT: aten.softmax
        CHECK-NOT: aten.bmm
        CHECK: return
    """)


def bloom_spelling(q, k, v, alibi, pad):
    """Bloom's attention written out: baddbmm(alibi (B·H, 1, S), beta=1, alpha=1/sqrt(d)), view,
    a float key-padding mask from finfo.min, softmax in fp32, view back, bmm."""
    b, h, l, d = q.shape
    s = alibi.baddbmm(batch1=q.reshape(b * h, l, d), batch2=k.reshape(b * h, l, d).transpose(1, 2),
                      beta=1.0, alpha=d ** -0.5)
    w = s.view(b, h, l, -1)
    w = w + torch.where(pad[:, None, None, :], 0.0, torch.finfo(torch.float32).min)
    p = torch.nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.bmm(p.view(b * h, l, -1), v.reshape(b * h, l, d)).view(b, h, l, d)


def test_bloom_spelling_with_key_padding_and_alibi_gradients(tmp_path):
    pad = torch.ones(B, L, dtype=torch.bool)
    pad[0, :3] = False
    alibi = torch.randn(B * H, 1, L, requires_grad=True)
    check(bloom_spelling, *qkv(), alibi, pad, tmp_path=tmp_path, rewrites=1, checks="""
        CHECK-LABEL: graph(
        CHECK: %[[PAD:[a-z_0-9]+]] = aten.flatten.using_ints(%{{[a-z_0-9]+}}, 0, 1) : f32[6, 1, 10]
        CHECK: %[[BIAS:[a-z_0-9]+]] = aten.add.Tensor(%{{[a-z_0-9_]*alibi[a-z_0-9_]*}}, %[[PAD]]) : f32[6, 1, 10]
        CHECK: seqfuse.attention(%reshape, %reshape_1, %reshape_2, bias=%[[BIAS]]) {scale=0.35355339059327{{[0-9]*}}, mask=none,
        CHECK-NOT: aten.softmax
        CHECK: return
    """)


def test_bloom_spelling_dynamic_sizes(tmp_path):
    pad = torch.ones(B, L, dtype=torch.bool)
    pad[1, :2] = False
    alibi = torch.randn(B * H, 1, L)
    check(bloom_spelling, *qkv(), alibi, pad, tmp_path=tmp_path, rewrites=1, dynamic=True, checks="""
        CHECK-LABEL: graph(
        CHECK: aten.sym_size.int
        CHECK: seqfuse.attention(%reshape, %reshape_1, %reshape_2, bias=%{{[a-z_0-9]+}}) {scale=%{{[a-z_0-9]+}}, mask=none,
        CHECK-NOT: aten.softmax
        CHECK: return
    """)


def softmax_on_merged_heads(q, k, v, head_bias):
    """Scores and a per-head bias in (B, H, L, S); the softmax and p·v over flattened (B·H) heads."""
    b, h, l, d = q.shape
    s = q @ k.transpose(-1, -2) * d ** -0.5 + head_bias
    p = s.flatten(0, 1).softmax(-1)
    return (p @ v.flatten(0, 1)).unflatten(0, (b, h))


def test_softmax_on_merged_heads(tmp_path):
    # the probabilities reach the values as (B·H, L, S): v joins the scores' (B, H) grouping and
    # the op's (B, H, L, E) output is flattened back
    head_bias = torch.randn(1, H, 1, L, requires_grad=True)
    check(softmax_on_merged_heads, *qkv(), head_bias, tmp_path=tmp_path, rewrites=1, checks="""
        CHECK-LABEL: graph(
        CHECK: %[[V:[a-z_0-9]+]] = aten.unflatten.int(%{{[a-z_0-9]+}}, 0, [2, 3]) : f32[2, 3, 10, 8]
        CHECK: %[[O:[a-z_0-9]+]] = seqfuse.attention(%l_q_, %l_k_, %[[V]], bias=%l_head_bias_) {scale=0.35355339059327{{[0-9]*}}, mask=none, {{.*}}} : f32[2, 3, 10, 8]
        CHECK-NEXT: aten.flatten.using_ints(%[[O]], 0, 1) : f32[6, 10, 8]
        CHECK-NOT: aten.softmax
        CHECK: return
    """)


def softmax_on_merged_heads_then_split(q, k, v):
    """The softmax over flattened (B·H) heads, the probabilities viewed back to (B, H, L, S) for p @ v."""
    b, h, l, d = q.shape
    p = (q @ k.transpose(-1, -2) * d ** -0.5).flatten(0, 1).softmax(-1).view(b, h, l, -1)
    return p @ v


def test_softmax_on_merged_heads_batch_of_one(tmp_path):
    # with B = 1 the contractions fold the size-1 batch of the views: p·v reads p as (H, L, S) and
    # v as (1, H, S, E), a size-1 axis p lacks, squeezed from v and given back to the output
    check(softmax_on_merged_heads_then_split, *qkv(b=1), tmp_path=tmp_path, rewrites=1, checks="""
        CHECK-LABEL: graph(
        CHECK: %[[V:[a-z_0-9]+]] = aten.squeeze.dim(%l_v_, 0) : f32[3, 10, 8]
        CHECK: seqfuse.attention(%l_q_, %l_k_, %{{[a-z_0-9]+}}) {scale=0.35355339059327{{[0-9]*}}, mask=none,
        CHECK-NOT: aten.softmax
        CHECK: return
    """)


def fused_qkv_attention(x, alibi):
    """Bloom's layout: q, k, v split from one fused projection (B, L, H, 3, D), heads merged for baddbmm."""
    b, l, _ = x.shape
    h, d = H, D
    fused = x.view(b, l, h, 3, d)
    q, k, v = (fused[..., n, :].transpose(1, 2).reshape(b * h, l, d) for n in range(3))
    s = alibi.baddbmm(batch1=q, batch2=k.transpose(-1, -2), beta=1.0, alpha=d ** -0.5)
    p = torch.softmax(s.view(b, h, l, -1), dim=-1)
    return torch.bmm(p.view(b * h, l, -1), v).view(b, h, l, d)


def test_fused_qkv_batch_of_one(tmp_path):
    # B = 1: the contractions fold the size-1 batch of the views, so p·v reads p as (1, H, L, S)
    # and sums its size-1 batch away alone (was the near miss "the value contraction is not p·v
    # over the key axis" of issue 15)
    x = torch.randn(1, L, H * 3 * D, requires_grad=True)
    alibi = torch.randn(H, 1, L, requires_grad=True)
    check(fused_qkv_attention, x, alibi, tmp_path=tmp_path, rewrites=1, checks="""
        CHECK-LABEL: graph(
        CHECK-NOT: aten.softmax
        CHECK: seqfuse.attention({{.*}}, bias=%{{[a-z_0-9]+}}) {scale=0.35355339059327{{[0-9]*}}, mask=none,
        CHECK-NOT: aten.softmax
        CHECK: return
    """)


def falcon_spelling(q, k, v, alibi, mask):
    """Falcon's ALiBi path written out: in-place scale after the bias, one kv head broadcast."""
    b, h, l, d = q.shape
    s = (q @ k.transpose(-1, -2)).view(b, h, l, l)
    s = s + alibi.view(b, h, 1, -1)
    s *= d ** -0.5
    p = torch.softmax(s + mask, dim=-1)
    return (p.view(b, h, l, l) @ v).flatten(0, 1)


def test_falcon_spelling_multi_query(tmp_path):
    q = torch.randn(B, H, L, D, requires_grad=True)
    k, v = (torch.randn(B, 1, L, D, requires_grad=True) for _ in range(2))
    alibi = torch.randn(B * H, 1, L, requires_grad=True)
    mask = torch.zeros(B, 1, L, L).masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), -1e30)
    check(falcon_spelling, q, k, v, alibi, mask, tmp_path=tmp_path, rewrites=1, checks="""
        CHECK-LABEL: graph(
        CHECK: aten.mul.Tensor(%view_1, 0.35355339059327{{[0-9]*}}) : f32[2, 3, 1, 10]
        CHECK: seqfuse.attention(%l_q_, %{{[a-z_0-9]+}}, %{{[a-z_0-9]+}}, bias=%{{[a-z_0-9]+}}) {scale=0.35355339059327{{[0-9]*}}, mask=none, {{.*}}gqa_groups=3,
        CHECK-NOT: aten.mul_.
        CHECK-NOT: aten.softmax
        CHECK: return
    """)


# --- negatives -------------------------------------------------------------------------

# The query axis is folded into the batch ((B·H, L, S) -> (B, H·L, S)): a regroup that moves
# entries across the last two axes is not proven to be the same attention, even where (as here)
# the softmax over the last axis would not mind.  No rewrite; the near miss names the reshape.
def reshape_mixes_the_query_axis(q, k, v):
    b, h, l, d = q.shape
    s = torch.bmm(q.reshape(b * h, l, d), k.reshape(b * h, l, d).transpose(1, 2)) / math.sqrt(d)
    s = s.reshape(b, h * l, l)
    p = s.softmax(-1).reshape(b * h, l, l)
    return torch.bmm(p, v.reshape(b * h, l, d)).reshape(b, h, l, d)


# The scores' last two axes are regrouped into pairs: the softmax normalizes over pairs of keys,
# not over the keys of a query.
def reshape_pairs_the_keys(q, k, v):
    b, h, l, d = q.shape
    s = torch.bmm(q.reshape(b * h, l, d), k.reshape(b * h, l, d).transpose(1, 2)) / math.sqrt(d)
    p = s.reshape(b * h, l * l // 2, 2).softmax(-1).reshape(b * h, l, l)
    return torch.bmm(p, v.reshape(b * h, l, d)).reshape(b, h, l, d)


# The probabilities' query axis is folded into the rows of one bmm with values shared by the
# heads: the scores match, the values side is a reshape the op cannot prove.
def values_reshape_mixes_the_query_axis(q, k, v):
    b, h, l, d = q.shape
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1)
    return torch.bmm(p.reshape(b, h * l, l), v[:, 0]).reshape(b, h, l, d)


# The scores are scaled in place through a view after the contraction: the softmax reads the
# mutated scores; an op reading the contraction would miss the write.
def scores_written_through_a_view(q, k, v):
    s = q @ k.transpose(-1, -2)
    s.view(s.shape).mul_(0.3)
    return torch.softmax(s, -1) @ v


# A bias is written in place after the scores read it: the program's scores use the old bias, an
# op placed at the value contraction would read the new one.
def bias_written_after_the_scores(q, k, v):
    bias = torch.zeros(q.shape[-2], k.shape[-2])
    s = q @ k.transpose(-1, -2) * 0.3 + bias
    bias.add_(torch.ones_like(bias).triu(1) * -1e4)
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("fn,reason", [
    (reshape_mixes_the_query_axis, "aten.reshape between the scores and the softmax moves entries across the last two"),
    (reshape_pairs_the_keys, "aten.reshape between the scores and the softmax moves entries across the last two"),
    (values_reshape_mixes_the_query_axis, "aten.reshape between the softmax and the value contraction moves entries"),
    (scores_written_through_a_view, "aten.mul_.Tensor mutates a tensor between the scores and the value"),
    (bias_written_after_the_scores, "aten.add_.Tensor mutates a tensor between the scores and the value"),
], ids=lambda x: getattr(x, "__name__", None))
def test_not_rewritten(fn, reason):
    check_near_miss(fn, *qkv(), reason=reason)


class BloomScaled(torch.nn.Module):
    """Bloom's baddbmm with beta and alpha read from float module attributes: under dynamic=True
    torch 2.13's Dynamo passes them as graph inputs (symbolic floats, no guard on their value)."""

    def __init__(self):
        super().__init__()
        self.beta, self.alpha = 1.0, D ** -0.5

    def forward(self, q, k, v, alibi):
        b, h, l, d = q.shape
        s = alibi.baddbmm(q.reshape(b * h, l, d), k.reshape(b * h, l, d).transpose(1, 2),
                          beta=self.beta, alpha=self.alpha)
        p = torch.softmax(s.view(b, h, l, -1), dim=-1)
        return torch.bmm(p.view(b * h, l, -1), v.reshape(b * h, l, d)).view(b, h, l, d)


def test_bloom_baddbmm_with_symbolic_beta_and_alpha_is_lifted_and_keeps_beta_zero_exact():
    import seqfuse
    from helpers import rel_err
    from seqfuse.compiler.report import collecting
    m = BloomScaled()
    q, k, v = qkv()
    alibi = torch.randn(B * H, 1, L, requires_grad=True)
    report = seqfuse.Report()
    compiled = torch.compile(m, backend="seqfuse", dynamic=True, options=AOT)
    with collecting(report):
        out = compiled(q, k, v, alibi)
    # Dynamo may call the backend twice (a restart that specializes alpha): each graph is lifted,
    # and in the one that runs beta is still symbolic: its bias is where(beta != 0, beta·alibi, 0)
    assert report.graphs and all(g.rewrites and g.rewrites[0].kind == "attention" for g in report.graphs), str(report)
    assert "bias=%where" in report.graphs[-1].rewrites[0].ir, str(report)
    ref = m(q, k, v, alibi)
    assert rel_err(out, ref) < 1e-5
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v, alibi), g)
    want = torch.autograd.grad(ref, (q, k, v, alibi), g)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5
    # beta = 0: baddbmm ignores its input, inf and NaN included (beta·input would be NaN)
    m.beta = 0.0
    bad = alibi.detach().clone()
    bad[0, 0, :3] = float("inf")
    bad[1, 0, 4] = float("nan")
    with torch.no_grad():
        got, want = compiled(q, k, v, bad), m(q, k, v, bad)
    assert not want.isnan().any() and not got.isnan().any()
    assert rel_err(got, want) < 1e-5
