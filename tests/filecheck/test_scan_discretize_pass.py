"""FileCheck on the graph right after the scan_discretize pass (dump stage "scan_discretize"): a scan
whose decays are exp(Δ·A) and whose inputs are Δ·B·x takes the factors as operands (a = A, b = B,
dt = Δ, u = x as broadcastable views), and no (B, D, T, N) product is left in the graph."""

import torch

from fc import graph_after, run_filecheck


def after_pass(fn, *args, tmp_path, stage="scan_discretize"):
    return graph_after(fn, *args, tmp_path=tmp_path, stage=stage)[0]


def discretized(x, dt, A, Bm):
    """mamba_ssm's selective_scan_ref: exp(Δ·A) and Δ·B·x as outer-product einsums."""
    return torch.exp(torch.einsum("bdl,dn->bdln", dt, A)), torch.einsum("bdl,bnl,bdl->bdln", dt, Bm, x)


def scan_loop(dA, dBu, Cm):
    h = dA.new_zeros((2, 5, 3))
    ys = []
    for i in range(dA.shape[2]):
        h = dA[:, :, i] * h + dBu[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", h, Cm[:, :, i]))
    return torch.stack(ys, dim=2), h


def selective_scan_ref(x, dt, A, Bm, Cm):
    return scan_loop(*discretized(x, dt, A, Bm), Cm)


def test_einsum_products_become_factor_views(tmp_path):
    # x, Δ (2, 5, 7), A (5, 3), B, C (2, 3, 7): A -> (5, 1, 3); B (b, n, l) -> permuted to (b, l, n),
    # then (2, 1, 7, 3); Δ and x -> (2, 5, 7, 1)
    # (inputs that require grad: on CPU the pass folds a graph that is differentiated)
    text = after_pass(selective_scan_ref, torch.randn(2, 5, 7, requires_grad=True), torch.rand(2, 5, 7),
                      -torch.rand(5, 3), torch.randn(2, 3, 7), torch.randn(2, 3, 7), tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK-DAG: %[[A:[a-z_0-9]+]] = aten.unsqueeze(%l_a_, 1) : f32[5, 1, 3]
        CHECK-DAG: %[[BP:[a-z_0-9]+]] = aten.permute(%l_bm_, [0, 2, 1]) : f32[2, 7, 3]
        CHECK-DAG: %[[B:[a-z_0-9]+]] = aten.unsqueeze(%[[BP]], 1) : f32[2, 1, 7, 3]
        CHECK-DAG: %[[DT:[a-z_0-9]+]] = aten.unsqueeze(%l_dt_, 3) : f32[2, 5, 7, 1]
        CHECK-DAG: %[[U:[a-z_0-9]+]] = aten.unsqueeze(%l_x_, 3) : f32[2, 5, 7, 1]
        CHECK: seqfuse.scan(%[[A]], %[[B]], c=%{{[a-z_0-9]+}}, dt=%[[DT]], u=%[[U]]) {reverse=false, algo=auto} : (f32[2, 5, 7], f32[2, 5, 3])
        CHECK-NOT: f32[2, 5, 7, 3]
        CHECK-NOT: aten.exp
    """)


def test_decays_read_elsewhere_are_left(tmp_path):
    def fn(x, dt, A, Bm, Cm):
        dA, dBu = discretized(x, dt, A, Bm)
        return (*scan_loop(dA, dBu, Cm), dA)

    # dA is returned: it is materialized anyway, so the scan keeps reading it; Δ·B·x has three
    # factors and no Δ shared with the decays to take out, so it stays too
    text = after_pass(fn, torch.randn(2, 5, 7, requires_grad=True), torch.rand(2, 5, 7), -torch.rand(5, 3),
                      torch.randn(2, 3, 7), torch.randn(2, 3, 7), tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK: %[[E:[a-z_0-9]+]] = aten.exp(%{{[a-z_0-9]+}}) : f32[2, 5, 7, 3]
        CHECK: %[[P:[a-z_0-9]+]] = aten.einsum(bdl,bnl,bdl->bdln, {{.*}}) : f32[2, 5, 7, 3]
        CHECK: seqfuse.scan(%[[E]], %[[P]], c=%{{[a-z_0-9]+}}) {reverse=false
    """)


def test_cpu_inference_keeps_the_products(tmp_path):
    # on CPU without a backward, the downstream compiler's vectorized products beat forming
    # exp(Δ·A) in the C kernel's step loop (scan_discretize._worth_it): the scan reads them
    args = (torch.randn(2, 5, 7), torch.rand(2, 5, 7), -torch.rand(5, 3), torch.randn(2, 3, 7), torch.randn(2, 3, 7))
    with torch.no_grad():
        text = after_pass(selective_scan_ref, *args, tmp_path=tmp_path)
    run_filecheck(text, """
        CHECK: %[[E:[a-z_0-9]+]] = aten.exp(%{{[a-z_0-9]+}}) : f32[2, 5, 7, 3]
        CHECK: seqfuse.scan(%[[E]], %{{[a-z_0-9]+}}, c=%{{[a-z_0-9]+}}) {reverse=false
    """)
