"""FileCheck on the graph right after the ssd_chunks pass (dump stage "ssd_chunks"): a whole
chunked SSD program is one seqfuse.ssd over the sequence, nothing of the chunked algorithm left."""

import torch

from fc import graph_after, run_filecheck
from golden.test_ssd_chunks import chunked_linear_attention, ssd_inputs, ssd_listing


def after_pass(fn, *args, tmp_path, stage="ssd_chunks", dynamic=None):
    return graph_after(fn, *args, tmp_path=tmp_path, stage=stage, dynamic=dynamic)[0]


def test_ssd_listing_is_one_ssd_with_initial_and_final_state(tmp_path):
    args = [z.detach() for z in ssd_inputs()]
    text = after_pass(ssd_listing, *args, tmp_path=tmp_path)
    # chunks (b, z, Q, ...) flatten back to the sequence (b, z·Q, ...); the final state is the op's
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK-DAG: %[[X:[a-z_0-9]+]] = aten.flatten.using_ints(%{{[a-z_0-9]+}}, 1, 2) : f32[2, 32, 2, 4]
        CHECK-DAG: %[[A:[a-z_0-9]+]] = aten.flatten.using_ints(%{{[a-z_0-9]+}}, 1, 2) : f32[2, 32, 2]
        CHECK: %ssd = seqfuse.ssd(%[[X]], %{{[a-z_0-9]+}}, %{{[a-z_0-9]+}}, a=%[[A]], h0=%l_h0_) {decay=scalar
        CHECK-SAME: : (f32[2, 32, 2, 4], f32[2, 2, 4, 3])
        CHECK-NOT: aten.einsum
        CHECK-NOT: aten.cumsum
        CHECK-NOT: aten.exp
        CHECK-NOT: aten.cat
        CHECK: %[[H:[a-z_0-9]+]] = getitem(%ssd, 1)
        CHECK: return (%{{[a-z_0-9]+}}, %[[H]])
    """)


def test_chunked_linear_attention_is_one_ssd(tmp_path):
    q, k, v = (torch.randn(2, 3, 32, 4) for _ in range(3))
    text = after_pass(chunked_linear_attention, q, k, v, tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK: %ssd = seqfuse.ssd(%{{[a-z_0-9]+}}, %{{[a-z_0-9]+}}, %{{[a-z_0-9]+}}) {decay=none
        CHECK-SAME: : (f32[2, 32, 3, 4], f32[2, 3, 4, 4])
        CHECK-NOT: aten.einsum
        CHECK-NOT: aten.cumsum
        CHECK-NOT: aten.cat
        CHECK: return
    """)


def test_chunk_loop_becomes_a_scan_over_chunks_then_one_ssd(tmp_path):
    """(c) a Python loop over chunks carrying the state: the loops pass re-rolls it into one scan over
    the chunks (state (dk, dv) per chunk, h0 the loop's initial state) with the intra-chunk term
    vectorized over the chunks; ssd_chunks then proves the whole program one ssd over the sequence."""
    from golden.test_ssd_chunks import chunk_loop_gla, gla_inputs
    args = [z.detach() for z in gla_inputs()]
    text = after_pass(chunk_loop_gla, *args, tmp_path=tmp_path, stage="loops")
    # 4 chunks of Q = 8: decay (b, h, 1, z, 1), chunk states (b, h, dk, z, dv)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK: %scan = seqfuse.scan(%{{[a-z_0-9]+}}, %{{[a-z_0-9]+}}, h0=%l_h0_) {reverse=false
        CHECK-SAME: : (f32[2, 2, 4, 4, 3], f32[2, 2, 4, 3])
        CHECK-NOT: seqfuse.scan
        CHECK-NOT: aten.select.int(%{{[a-z_0-9]+}}, 2, 1)
        CHECK: aten.cat(
        CHECK: aten.copy_(
        CHECK-NOT: aten.copy_(
        CHECK: return
    """)
    text = after_pass(chunk_loop_gla, *args, tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK: %ssd = seqfuse.ssd(%{{[a-z_0-9]+}}, %{{[a-z_0-9]+}}, %{{[a-z_0-9]+}}, a=%{{[a-z_0-9]+}}, h0=%{{[a-z_0-9]+}}) {decay=scalar
        CHECK-SAME: : (f32[2, 32, 2, 3], f32[2, 2, 3, 4])
        CHECK-NOT: seqfuse.scan
        CHECK-NOT: aten.einsum
        CHECK-NOT: aten.cat
        CHECK: %[[H:[a-z_0-9]+]] = getitem(%ssd, 1)
        CHECK: return
    """)


def test_mamba2_listing_under_dynamic_shapes_is_one_ssd(tmp_path):
    """The Mamba-2 paper's listing (mamba_ssm/modules/ssd_minimal.py, written out in
    tests/golden/test_ssd_stable_segsum.py) under dynamic=True: T and block_len are symbols, the
    chunks (b, T // Q, Q, ...) flatten back to the sequence, one ssd with h0 and its final state."""
    from golden.test_ssd_stable_segsum import inputs, listing
    args = [z.detach() for z in inputs(t=64, h0=True)]
    text = after_pass(listing(16), *args, tmp_path=tmp_path, dynamic=True)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK: %ssd = seqfuse.ssd(%{{[a-z_0-9]+}}, %{{[a-z_0-9]+}}, %{{[a-z_0-9]+}}, a=%{{[a-z_0-9]+}}, h0=%{{[a-z_0-9]+}}) {decay=scalar
        CHECK-NOT: aten.einsum
        CHECK-NOT: aten.cumsum
        CHECK-NOT: aten.exp
        CHECK: %[[H:[a-z_0-9]+]] = getitem(%ssd, 1)
        CHECK: return
    """)


def test_minimax_lightning_attention_is_one_ssd_with_the_rate_as_its_decay(tmp_path):
    # the decay buffers are read back as powers of slope_rate, so the ssd's a is -slope_rate at every
    # step; nothing of the block loop (its einsums, decays, cat) is left
    import pytest
    pytest.importorskip("transformers.models.minimax.modeling_minimax")
    from golden.test_lightning_minimax import Layer
    text = after_pass(Layer(), torch.randn(2, 16, 32), tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK: %[[R:[a-z_0-9]+]] = aten.squeeze.dims(%l_self_modules_attn_buffers_slope_rate_, [1, 2]) : f32[4]
        CHECK: %[[A:[a-z_0-9]+]] = aten.mul.Tensor(%{{[a-z_0-9]+}}, -1.0) : f32[2, 16, 4]
        CHECK: %ssd = seqfuse.ssd(%{{[a-z_0-9]+}}, %{{[a-z_0-9]+}}, %{{[a-z_0-9]+}}, a=%[[A]]) {decay=scalar
        CHECK-SAME: : (f32[2, 16, 4, 8], f32[2, 4, 8, 8])
        CHECK-NOT: aten.einsum
        CHECK-NOT: aten.exp
        CHECK-NOT: aten.cat
        CHECK: return
    """)
