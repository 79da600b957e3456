"""FileCheck on the graph right after the ssd_stabilized pass for transformers' chunkwise mLSTM
(``mlstm_chunkwise_native_autograd``): the chunk loop, its state buffers and the intra-chunk form
are gone; one ssd over the sequence reads q·s, k, e^I·[v, 1] and logsigmoid(f), all in fp64 behind
the value guards, and the output is N / (max(|D|, 1) + eps·e^m) with m a cumulative maximum."""

import pytest
import torch

from fc import graph_after, run_filecheck

xlstm = pytest.importorskip("transformers.models.xlstm.modeling_xlstm")


def after_pass(fn, *args, tmp_path):
    return graph_after(fn, *args, tmp_path=tmp_path, stage="ssd_stabilized")[0]


@pytest.mark.skipif(not hasattr(xlstm, "mlstm_chunkwise_native_autograd"), reason="the native chunkwise kernel")
def test_chunkwise_mlstm_becomes_one_ssd_and_a_closed_form_stabilizer(tmp_path):
    q, k = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)
    v, i_gate, f_gate = torch.randn(1, 2, 8, 3), torch.randn(1, 2, 8), torch.randn(1, 2, 8)

    def kernel(q, k, v, i_gate, f_gate):
        return xlstm.mlstm_chunkwise_native_autograd(q, k, v, i_gate, f_gate, chunk_size=4)
    text = after_pass(kernel, q, k, v, i_gate, f_gate, tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK: %[[I:[a-z_0-9]+]] = aten.view(%l_i_gate_, [1, 2, 2, 4])
        CHECK: %[[F:[a-z_0-9]+]] = aten.view(%l_f_gate_, [1, 2, 2, 4])
        CHECK: %[[Q:[a-z_0-9]+]] = aten.view(%l_q_, [1, 2, 2, 4, 4])
        CHECK: seqfuse.within(%[[Q]], -1000000.0, 1000000.0)
        CHECK: %[[IG:[a-z_0-9]+]] = seqfuse.within(%[[I]], -20.0, 20.0)
        CHECK: aten.to.dtype(%[[IG]], f64)
        CHECK: %[[F64:[a-z_0-9]+]] = aten.to.dtype(%[[F]], f64)
        CHECK: aten.log_sigmoid(%[[F64]]) : f64[1, 2, 2, 4]
        CHECK: aten.constant_pad_nd(%{{.*}}, [0, 1], 1.0) : f64[1, 2, 8, 4]
        CHECK: aten.mul.Tensor(%{{.*}}, 0.5) : f64[1, 2, 8, 4]
        CHECK: %ssd = seqfuse.ssd(%{{.*}}, %{{.*}}, %{{.*}}, a=%{{.*}}) {decay=scalar, chunk=64, finite_only=true, algo=auto} : (f64[1, 8, 2, 4], f64[1, 2, 4, 4])
        CHECK: %[[Y:[a-z_0-9]+]] = aten.permute(%{{.*}}, [0, 2, 1, 3]) : f64[1, 2, 8, 4]
        CHECK: %[[N:[a-z_0-9]+]] = aten.slice.Tensor(%[[Y]], 3, 0, 3)
        CHECK: %[[D:[a-z_0-9]+]] = aten.slice.Tensor(%[[Y]], 3, 3, 4)
        CHECK: %[[G:[a-z_0-9]+]] = aten.cumsum(%{{.*}}, -1) : f64[1, 2, 8]
        CHECK: aten.cummax(%{{.*}}, -1)
        CHECK: aten.abs(%[[D]])
        CHECK: aten.clamp_min(%{{.*}}, 1.0)
        CHECK: aten.mul.Tensor(%{{.*}}, 1e-06)
        CHECK: aten.div.Tensor(%[[N]], %{{.*}}) : f64[1, 2, 8, 3]
        CHECK: aten.to.dtype(%{{.*}}, f32) : f32[1, 2, 2, 4, 3]
        CHECK-NOT: aten.copy_
        CHECK-NOT: aten.zeros
        CHECK-NOT: aten.max
        CHECK: return
    """)
