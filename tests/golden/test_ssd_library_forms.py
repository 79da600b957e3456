"""Linear-recurrence spellings in real library code (issue 15), called through the libraries' own
functions at tiny fp32 shapes.  Each lifted program equals eager in outputs and every gradient and
the report shows its seqfuse.ssd ops; each program that is not lifted leaves a near miss naming
the exact reason (and still equals eager)."""
import pytest
import torch
import torch.nn.functional as F

from helpers import check_against_eager

abc = pytest.importorskip("fla.ops.abc.naive")


def randn(*shape, seed=0, grad=True):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).requires_grad_(grad)


def ssd_misses(report):
    return [m.reason for m in report.near_misses if m.kind in ("ssd", "scan")]


# --- fla naive_cumsum_abc: two cumulative sums divided by a third --------------------------------
# K = cumsum_t(s ⊗ k) / z, V = cumsum_t(s ⊗ v) / z with z = cumsum_t(s); o = softmax(q·K)·V.
# The division by z[t, m] does not vary with the summed key position, so it leaves the sum:
#   q·K   = ssd(x=s, b=k, c=q·scale) / z            (z over (t, m): the output axes)
#   p·V   = ssd(x=v, b=s, c=p / z)                  (z over (t, m): the query and key-dim axes)
# the softmax over slots between them is not part of either recurrence.

def test_cumsum_abc_is_two_ssds():
    b, h, t, d, m = 1, 2, 16, 4, 3
    q, k, v, s = (randn(b, h, t, n, seed=i) for i, n in enumerate((d, d, d, m)))
    report = check_against_eager(lambda *a: abc.naive_cumsum_abc(*a)[0], q, k, v, s)
    assert report.count("ssd") == 2, str(report)
    assert all("decay=none" in r.ir for r in report.rewrites), str(report)
    assert not ssd_misses(report), str(report)


def test_divisions_of_each_operand():
    # a divisor over (t, d) of the cumulative state divides c (d is the summed key dim); one over the
    # key positions of the quadratic form divides x; both are read off the graph, nothing assumed
    def f(q, k, v, w, u):
        kv = torch.einsum("bhtd,bhte->bhtde", k, v).cumsum(2)
        o1 = torch.einsum("bhtd,bhtde->bhte", q, kv / w[..., None])
        scores = (q @ k.transpose(-1, -2)).tril()
        return o1, scores / u[:, :, None, :, 0] @ v
    q, k, v = (randn(1, 2, 8, 4, seed=i) for i in range(3))
    w, u = ((randn(1, 2, 8, 4, seed=s).detach().abs() + 1).requires_grad_() for s in (3, 4))
    report = check_against_eager(f, q, k, v, w, u)
    assert report.count("ssd") == 2 and not ssd_misses(report), str(report)


def test_division_moved_into_an_operand_in_fp16_is_a_near_miss():
    def f(q, k, v, w):
        kv = torch.einsum("bhtd,bhte->bhtde", k, v).cumsum(2)
        return torch.einsum("bhtd,bhtde->bhte", q, kv / w[..., None])     # q/w: may overflow in fp16
    q, k, v = (randn(1, 2, 8, 4, seed=i, grad=False).half() for i in range(3))
    w = randn(1, 2, 8, 4, seed=3, grad=False).abs().half() + 1
    report = check_against_eager(f, q, k, v, w, grads=False)
    assert report.count("ssd") == 0, str(report)
    assert any("float16" in r and "overflow" in r for r in ssd_misses(report)), str(report)


def test_division_over_both_time_axes_is_a_near_miss():
    def f(q, k, v, n):
        return (q @ k.transpose(-1, -2)).tril() / n @ v       # n (T, T): not a factor of one operand
    q, k, v = (randn(1, 2, 8, 4, seed=i) for i in range(3))
    n = (randn(8, 8, seed=5).detach().abs() + 1).requires_grad_()
    report = check_against_eager(f, q, k, v, n)
    assert report.count("ssd") == 0, str(report)
    assert any("divided by a tensor over both time axes" in r for r in ssd_misses(report)), str(report)


# --- fla Based: the Taylor feature map 1 + s + s²/2 of the scores ------------------------------
# naive_parallel_based: A = (1 + s + s²/2) ∘ [j <= i] with s = (q·scale)·kᵀ, o = A·v / (Σ_j A + eps).
# Σ_d w_d·s^d = φ_c(q)·φ_b(k) with φ_c(q) = [1, q, vec(q⊗q)/2], φ_b(k) = [1, k, vec(k⊗k)]: linear
# attention over 1 + D + D² features; the normalizer Σ_j A is the same sum with x = 1, one more
# column of x: one ssd gives both.

based = pytest.importorskip("fla.ops.based.naive")


@pytest.mark.parametrize("use_norm", [True, False], ids=["norm", "no_norm"])
def test_parallel_based_is_one_ssd(use_norm):
    q, k, v = (randn(1, 2, 16, 4, seed=i) for i in range(3))
    report = check_against_eager(lambda *a: based.naive_parallel_based(*a, use_norm=use_norm), q, k, v)
    assert report.count("ssd") == 1 and not ssd_misses(report), str(report)
    assert "decay=none" in report.rewrites[0].ir, report.rewrites[0].ir


def test_polynomial_scores_used_elsewhere_is_a_near_miss():
    def f(q, k, v):
        s = q @ k.transpose(-1, -2)
        a = (1 + s + 0.5 * s ** 2).tril()
        return a @ v, a.amax(-1)                      # the masked kernel itself is read
    q, k, v = (randn(1, 2, 8, 4, seed=i) for i in range(3))
    report = check_against_eager(f, q, k, v)
    assert report.count("ssd") == 0, str(report)
    assert any("also used elsewhere" in r for r in ssd_misses(report)), str(report)


def test_cubic_scores_are_a_near_miss():
    def f(q, k, v):
        s = q @ k.transpose(-1, -2)
        return (1 + s ** 3).tril() @ v               # degree 3: D³ features, not formed
    q, k, v = (randn(1, 2, 8, 4, seed=i) for i in range(3))
    report = check_against_eager(f, q, k, v)
    assert report.count("ssd") == 0, str(report)
    assert any("degree 3" in r for r in ssd_misses(report)), str(report)


# --- transformers MiniMax lightning attention: the decay tables are buffers ---------------------
# MiniMaxLightningAttention precomputes diagonal_decay = exp(-slope_h·(i - j)) below the diagonal
# (and query_decay / key_decay) in __init__ as buffers; Dynamo passes them as graph inputs.  They are
# read back as powers of slope_rate under a value guard (compiler/decay_buffers.py), and the loop over
# blocks is one ssd (here with 2 heads and a hidden size of 16; test_lightning_minimax.py has the rest).

minimax = pytest.importorskip("transformers.models.minimax.modeling_minimax")


def test_minimax_lightning_attention_decay_buffers_make_one_ssd():
    from transformers import MiniMaxConfig
    cfg = MiniMaxConfig(hidden_size=16, num_attention_heads=2, head_dim=8, num_hidden_layers=2, block_size=8,
                        layer_types=["linear_attention", "full_attention"], num_key_value_heads=2,
                        intermediate_size=16, vocab_size=32)
    torch.manual_seed(0)
    layer = minimax.MiniMaxLightningAttention(cfg, 0)
    x = randn(1, 16, 16, seed=7)
    report = check_against_eager(lambda h: layer(h, None, None)[0], x)
    assert report.count("ssd") == 1 and not ssd_misses(report), str(report)


# --- transformers xLSTM: mLSTM's chunkwise parallel part ----------------------------------------
# mlstm_chunkwise_parallel_fw_H weighs the scores by D = exp(B_i - B_j + I_j - m_i): B the forget
# gates' cumulative log, I the input gate, m_i = max(max_j(B_i - B_j + I_j), ...) a per-query
# stabilizer that keeps every entry <= 1.  Only the whole exponent is bounded: moved into the
# operands, exp(I_j)·k or exp(-m_i)·q overflows for large gates where the program does not, so
# lifting needs an ssd with an input log-gate and a stabilizer (not one the IR has).  The scores'
# other use, their sum over the keys (the normalizer), would be one more column of x (below): the
# near miss names the gate and the stabilizer.  The whole chunkwise kernel, whose chunk loop computes
# the states and B this part reads, is lifted (tests/golden/test_mlstm_chunkwise.py); this part alone,
# with B and the states given, is a near miss of that pass too.

xlstm = pytest.importorskip("transformers.models.xlstm.modeling_xlstm")


@pytest.mark.skipif(not hasattr(xlstm, "mlstm_chunkwise_parallel_fw_H"), reason="the xlstm package's kernels")
def test_mlstm_chunkwise_parallel_is_a_near_miss_naming_the_stabilizer():
    b, h, nc, q_len, d = 1, 2, 2, 4, 4
    q, k, v = (randn(b, h, nc * q_len, d, seed=i) for i in range(3))
    c, n, m = randn(b, h, nc * d, d, seed=3), randn(b, h, nc * d, seed=4), randn(b, h, nc, seed=5)
    i_gate = randn(b, h, nc, q_len, seed=6)
    f_cum = F.logsigmoid(randn(b, h, nc, q_len, seed=7, grad=False)).cumsum(-1).requires_grad_()

    def fw_h(*a):
        return xlstm.mlstm_chunkwise_parallel_fw_H(*a, qk_scale=0.5, chunk_size=q_len, num_chunks=nc)
    report = check_against_eager(fw_h, q, k, v, c, n, m, i_gate, f_cum)
    misses = ssd_misses(report)
    assert report.count("ssd") == 0 and len(misses) == 2, str(report)
    whole, = [m for m in misses if "stabilized chunkwise form" in m]
    part, = [m for m in misses if m != whole]
    assert "B is not a cumulative sum computed in the program" in whole, whole
    assert "per-key term" in part and "per-query term" in part and "stabilizer" in part, misses


# --- fla naive_chunk_rwkv6 ----------------------------------------------------------------------
# The intra-chunk part is a Python loop over the chunk's positions i whose mask arange(C) < i is a
# different constant at every step; each step writes o_intra[..., i] (a map loop).  loop_map reads the
# constant as the loop index and vectorizes the loop: one value over every position, one write, no
# per-step mask left.  The vectorized scores Σ_n q[i, n]·k[j, n]·exp(G_i - w_i - G_j)[n] on [j < i] (a
# decay per key channel, RWKV-6's exclusive exponent) are then one ssd with decay=vector over the
# chunks (tests/golden/test_ssd_channel_decay.py); the bonus (q_t ⊙ u ⊙ k_t)·v_t stays as written, and
# so does the inter-chunk recurrence (a scan over chunks when there are three or more, read by an einsum
# that is not summed with the intra-chunk term directly, so ssd_chunks, which reads scalar decays only, does
# not look at it).
# Eager's own backward fails on the program's in-place write into wkv_new, so only outputs are compared.

rwkv6 = pytest.importorskip("fla.ops.rwkv6.chunk_naive")


@pytest.mark.parametrize("t", [16, 40])
def test_chunk_rwkv6_intra_loop_is_vectorized(t, tmp_path):
    import pathlib
    b, h, d = 1, 2, 4
    q, k, v = (randn(b, h, t, d, seed=i, grad=False) for i in range(3))
    w = F.logsigmoid(randn(b, h, t, d, seed=3, grad=False))
    u = randn(h, d, seed=4, grad=False)
    fn = lambda *a: rwkv6.naive_chunk_rwkv6(*a, chunk_size=8)  # noqa: E731
    report = check_against_eager(fn, q, k, v, w, u, grads=False,
                                 options={"dump_dir": str(tmp_path)})
    before, after = (pathlib.Path(next(p for p in report.dumps if p.endswith(f"_{s}.txt"))).read_text()
                     for s in ("masks", "loop_map"))
    assert before.count("aten.lt.Scalar(") == 8, before
    # one comparison of the positions with the loop index (an index tensor), no per-step mask
    assert after.count("aten.lt.Scalar(") == 0 and after.count("aten.lt.Tensor(") == 1, after
    assert after.count("aten.arange.start(0, 8, dtype=i64") == 1, after
    assert not [m for m in report.near_misses if "map loop" in m.reason], str(report)
    # the vectorized intra-chunk scores weigh q·k per key channel: one ssd over the chunks, decay=vector
    ssd, = [r.ir for r in report.rewrites if r.kind == "ssd"]
    assert "decay=vector" in ssd and "a=" in ssd and not ssd_misses(report), str(report)
    assert report.count("scan") == (1 if t // 8 >= 3 else 0), str(report)   # the chunk loop, re-rolled


def test_parallel_based_dynamic_length():
    q, k, v = (randn(1, 2, 12, 4, seed=i) for i in range(3))
    report = check_against_eager(based.naive_parallel_based, q, k, v, dynamic=True)
    assert report.count("ssd") == 1 and not ssd_misses(report), str(report)


def test_chunk_based_intra_term_is_an_ssd():
    # naive_chunk_based: the intra-chunk kernel s + s²/2 (no constant term) is an ssd per chunk; the
    # inter-chunk sums are exclusive cumulative sums of k⊗k⊗v and k⊗v over chunks (cat([0, cumsum[:-1]])),
    # which ssd_chunks does not fuse with polynomial features: near misses naming cat / zeros_like
    q, k, v = (randn(1, 2, 16, 4, seed=i) for i in range(3))
    report = check_against_eager(lambda *a: based.naive_chunk_based(*a, chunk_size=8), q, k, v)
    assert report.count("ssd") == 1, str(report)
    misses = ssd_misses(report)
    assert len(misses) == 2 and all("cat, zeros_like" in r for r in misses), misses


# --- a normalizer of the quadratic form ---------------------------------------------------------
# A = s·(c·bᵀ ∘ M) read by A·x and by Σ_j A (the normalizer of normalized linear attention, and of
# mLSTM above): the sum is the same form with x = 1, one more column of x.

def test_normalized_decayed_form_is_one_ssd():
    def f(q, k, v, g):
        gc = g.cumsum(-1)
        decay = torch.exp(gc[..., :, None] - gc[..., None, :]).tril()
        a = (q @ k.transpose(-1, -2)) * 0.5 * decay
        z = a.sum(-1, keepdim=True)
        return a @ v / (z.abs() + 1.0), z
    q, k, v = (randn(1, 2, 8, 4, seed=i) for i in range(3))
    g = F.logsigmoid(randn(1, 2, 8, seed=3, grad=False)).requires_grad_()
    report = check_against_eager(f, q, k, v, g)
    assert report.count("ssd") == 1 and not ssd_misses(report), str(report)
    assert "decay=scalar" in report.rewrites[0].ir, report.rewrites[0].ir


def test_scores_summed_over_the_queries_is_a_near_miss():
    def f(q, k, v):
        a = (q @ k.transpose(-1, -2)).tril()
        return a @ v, a.sum(-2)                       # a column sum: not the form's normalizer
    q, k, v = (randn(1, 2, 8, 4, seed=i) for i in range(3))
    report = check_against_eager(f, q, k, v)
    assert report.count("ssd") == 0 and any("used elsewhere" in r for r in ssd_misses(report)), str(report)


def test_parallel_based_fp16_is_a_near_miss():
    # in fp16, q_a·q_b of the degree-2 features overflows (|q| > 256) where the program's (q·k)² may not
    q, k, v = (randn(1, 2, 8, 4, seed=i, grad=False).half() for i in range(3))
    report = check_against_eager(based.naive_parallel_based, q, k, v, grads=False)
    assert report.count("ssd") == 0, str(report)
    assert any("float16" in r and "overflow" in r for r in ssd_misses(report)), str(report)
