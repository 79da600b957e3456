"""FileCheck on the graph right after the mlstm_loop pass for transformers' recurrent mLSTM
(``mlstm_recurrent_sequence_native``, a Python loop over time steps that Dynamo unrolls): every
step is gone; one ssd over the sequence reads q·s, k, e^I·[v, 1] and logsigmoid(f), all in fp64
behind the value guards; the output is N / (max(|D|, 1) + eps·e^m) with m a cumulative maximum,
and the returned final state is the ssd's scaled by e^{-m_T}."""

import pytest
import torch

from fc import graph_after, run_filecheck
from helpers import check_against_eager

xlstm = pytest.importorskip("transformers.models.xlstm.modeling_xlstm")


def after_pass(fn, *args, tmp_path):
    return graph_after(fn, *args, tmp_path=tmp_path, stage="mlstm_loop")


@pytest.mark.skipif(not hasattr(xlstm, "mlstm_recurrent_sequence_native"), reason="the native recurrent kernel")
def test_recurrent_mlstm_becomes_one_ssd_and_a_closed_form_stabilizer(tmp_path):
    q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    v, i_gate, f_gate = torch.randn(1, 2, 6, 3), torch.randn(1, 2, 6), torch.randn(1, 2, 6)

    def kernel(q, k, v, i_gate, f_gate):
        return xlstm.mlstm_recurrent_sequence_native(q, k, v, i_gate, f_gate, return_last_states=True)
    text, report = after_pass(kernel, q, k, v, i_gate, f_gate, tmp_path=tmp_path)
    assert report.count("ssd") == 1 and not report.near_misses, str(report)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK: seqfuse.within(%l_q_, -1000000.0, 1000000.0)
        CHECK: %[[IG:[a-z_0-9]+]] = seqfuse.within(%l_i_gate_, -20.0, 20.0)
        CHECK: aten.to.dtype(%[[IG]], f64)
        CHECK: %[[F64:[a-z_0-9]+]] = aten.to.dtype(%l_f_gate_, f64)
        CHECK: aten.log_sigmoid(%[[F64]]) : f64[1, 2, 6]
        CHECK: aten.constant_pad_nd(%{{.*}}, [0, 1], 1.0) : f64[1, 2, 6, 4]
        CHECK: aten.mul.Tensor(%{{.*}}, 0.5) : f64[1, 2, 6, 4]
        CHECK: %ssd = seqfuse.ssd(%{{.*}}, %{{.*}}, %{{.*}}, a=%{{.*}}) {decay=scalar, chunk=64, finite_only=true, algo=auto} : (f64[1, 6, 2, 4], f64[1, 2, 4, 4])
        CHECK: %[[Y:[a-z_0-9]+]] = aten.permute(%{{.*}}, [0, 2, 1, 3]) : f64[1, 2, 6, 4]
        CHECK: %[[N:[a-z_0-9]+]] = aten.slice.Tensor(%[[Y]], 3, 0, 3)
        CHECK: %[[D:[a-z_0-9]+]] = aten.slice.Tensor(%[[Y]], 3, 3, 4)
        CHECK: aten.cumsum(%{{.*}}, -1) : f64[1, 2, 6]
        CHECK: aten.cummax(%{{.*}}, -1)
        CHECK: aten.abs(%[[D]])
        CHECK: aten.clamp_min(%{{.*}}, 1.0)
        CHECK: aten.mul.Tensor(%{{.*}}, 1e-06)
        CHECK: %[[H:[a-z_0-9]+]] = aten.div.Tensor(%[[N]], %{{.*}}) : f64[1, 2, 6, 3]
        CHECK: aten.exp(%{{.*}}) : f64[1, 2]
        CHECK: getitem(%ssd, 1)
        CHECK: aten.to.dtype(%[[H]], f32) : f32[1, 2, 6, 3]
        CHECK-NOT: aten.log_sigmoid
        CHECK-NOT: aten.max.other
        CHECK-NOT: aten.einsum
        CHECK-NOT: aten.stack
        CHECK: return
    """)


def step(q, k, v, i, f, C, n, m, eps=1e-6, broken=False):
    """One mLSTM step as a paper writes it (no casts, no clones); ``broken``: the normalizer's input
    doubled."""
    f_log = torch.nn.functional.logsigmoid(f)
    m_new = torch.max(f_log + m, i)
    fa, ia = torch.exp(f_log + m - m_new), torch.exp(i - m_new)
    qs = q * q.shape[-1] ** -0.5
    C = fa[:, :, :, None] * C + ia[:, :, :, None] * (k[:, :, :, None] @ v[:, :, None, :])
    n = fa * n + ia * (k * 2 if broken else k)
    num = (qs[:, :, None, :] @ C).squeeze(2)
    qn = (qs[:, :, None, :] @ n[:, :, :, None]).squeeze(2)
    return num / (torch.maximum(qn.abs(), torch.exp(-m_new)) + eps), C, n, m_new


def loop(q, k, v, i, f, broken=False):
    B, H, T, K = q.shape
    C, n, m = q.new_zeros(B, H, K, v.shape[-1]), q.new_zeros(B, H, K), q.new_zeros(B, H, 1)
    hs = []
    for t in range(T):
        h, C, n, m = step(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t, None], f[:, :, t, None], C, n, m,
                          broken=broken)
        hs.append(h)
    return torch.stack(hs, dim=-2), C, n, m


def operands(t=6):
    g = torch.Generator().manual_seed(0)
    return [x.requires_grad_() for x in (torch.randn(2, 2, t, 4, generator=g), torch.randn(2, 2, t, 4, generator=g),
                                         torch.randn(2, 2, t, 3, generator=g), torch.randn(2, 2, t, generator=g) * 3,
                                         torch.randn(2, 2, t, generator=g) + 1)]


def test_a_loop_written_as_a_paper_writes_it_is_lifted_too():
    # no casts, no clones, the states returned: one ssd, no near miss (ssd_stabilized's anchor is the
    # chunkwise form's 5-D division, not a step's), outputs and every gradient equal to eager
    report = check_against_eager(loop, *operands(9))
    assert report.count("ssd") == 1 and not report.near_misses, str(report)


def test_a_changed_step_keeps_the_loop_and_names_the_piece(tmp_path):
    def broken(*a):
        return loop(*a, broken=True)[0]
    args = operands()
    text, report = after_pass(broken, *args, tmp_path=tmp_path)
    assert report.count("ssd") == 0
    reasons = [m.reason for m in report.near_misses if m.kind == "ssd"]
    assert reasons == ["a stabilized recurrent form (xLSTM's mLSTM step loop): step 0: the normalizer's input is "
                       "not the memory's key"], reasons
    run_filecheck(text, """
        CHECK-NOT: seqfuse.ssd
        CHECK: aten.stack
    """)
    check_against_eager(broken, *args)
