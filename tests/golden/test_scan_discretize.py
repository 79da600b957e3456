"""A scan whose decays are exp(Δ·A) and whose inputs are Δ·B·x, products only the scan reads, keeps
them factored (seqfuse.passes.scan_discretize): one seqfuse.scan with ``dt=%`` / ``u=%`` whose
operands are the factors, and no tensor of the state's full (B, D, T, N) size is left in the
lowered forward graph.  Outputs and gradients (Δ's from both of its uses) equal eager in every
case; products that are read elsewhere, or that are not plain products, stay as they are."""
import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch._higher_order_ops.associative_scan import associative_scan

from helpers import check_against_eager
from seqfuse.lowering.reference.scan import scan_reference

B, D, T, N = 2, 6, 11, 4
FULL = f"[{B}, {D}, {T}, {N}]"


def inputs(dtype=torch.float32, h0=False):
    """Mamba-1's operands: x, Δ (B, D, T), A (D, N) negative, B_, C (B, T, N) [, h0 (B, D, N)]."""
    torch.manual_seed(0)
    x = torch.randn(B, D, T, dtype=dtype, requires_grad=True)
    dt = F.softplus(torch.randn(B, D, T)).to(dtype).requires_grad_()
    A = (-torch.rand(D, N) - 0.5).to(dtype).requires_grad_()
    Bm = torch.randn(B, T, N, dtype=dtype, requires_grad=True)
    Cm = torch.randn(B, T, N, dtype=dtype, requires_grad=True)
    out = [x, dt, A, Bm, Cm]
    if h0:
        out.append(torch.randn(B, D, N, dtype=dtype, requires_grad=True))
    return out


def lowered(fn, args, tmp_path, **kw):
    """(report, text of the lowered graph) of ``fn`` compiled with seqfuse, checked against eager."""
    report = check_against_eager(fn, *args, options={"dump_dir": str(tmp_path)}, **kw)
    path = next(p for p in report.dumps if p.endswith("_lowered.txt"))
    return report, pathlib.Path(path).read_text()


def one_scan(report):
    assert report.count("scan") == 1, str(report)
    return report.rewrites[-1].ir if report.rewrites[-1].kind == "scan" else \
        next(r.ir for r in report.rewrites if r.kind == "scan")


def hf_loop(x, dt, A, Bm, Cm, h=None):
    # transformers' modeling_mamba.py slow path: the discretization, then a Python loop
    dA = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
    dB = dt[:, :, :, None] * Bm[:, None, :, :].float()
    dBu = dB * x[:, :, :, None].float()
    h = torch.zeros(B, D, N) if h is None else h
    ys = []
    for i in range(x.shape[2]):
        h = dA[:, :, i, :] * h + dBu[:, :, i, :]
        ys.append(torch.matmul(h, Cm[:, i, :].unsqueeze(-1).float())[:, :, 0])
    return torch.stack(ys, dim=-1), h


def selective_scan_ref(x, dt, A, Bm, Cm):
    # mamba_ssm's reference: outer-product einsums, B and C laid out (b, n, l)
    Bm, Cm = Bm.transpose(1, 2), Cm.transpose(1, 2)
    dA = torch.exp(torch.einsum("bdl,dn->bdln", dt, A))
    dBu = torch.einsum("bdl,bnl,bdl->bdln", dt, Bm, x)
    h = A.new_zeros((B, D, N))
    ys = []
    for i in range(x.shape[2]):
        h = dA[:, :, i] * h + dBu[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", h, Cm[:, :, i]))
    return torch.stack(ys, dim=2), h


def scan_with_readout(dA, dBu, Cm):
    """h_t = dA_t·h_{t-1} + dBu_t from zero, y_t = Σ_n h_t·C_t: the loop the spellings below feed."""
    h = torch.zeros(B, D, N, dtype=dBu.dtype)
    ys = []
    for i in range(T):
        h = dA[:, :, i] * h + dBu[:, :, i]
        ys.append((h * Cm[:, None, i]).sum(-1))
    return torch.stack(ys, dim=-1), h


def linear(left, right):
    return left[0] * right[0], right[0] * left[1] + right[1]


def hf_associative(x, dt, A, Bm, Cm):
    # transformers' use_associative_scan path (generic combine on CPU)
    dA = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
    dBu = dt[:, :, :, None] * Bm[:, None, :, :] * x[:, :, :, None]
    states = associative_scan(linear, (dA, dBu), dim=2, combine_mode="generic")[1]
    y = torch.matmul(states.transpose(1, 2), Cm.unsqueeze(-1)).squeeze(-1).transpose(1, 2)
    return y, states[:, :, -1]


def assert_factored(ir, text, dt=True):
    assert "c=%" in ir and "u=%" in ir and ("dt=%" in ir) == dt, ir
    assert FULL not in text, f"a (B, D, T, N) tensor is still materialized:\n{text}"


def test_hf_loop_spelling(tmp_path):
    report, text = lowered(hf_loop, inputs(), tmp_path)
    assert_factored(one_scan(report), text)


def test_hf_loop_with_initial_state(tmp_path):
    report, text = lowered(hf_loop, inputs(h0=True), tmp_path)
    ir = one_scan(report)
    assert_factored(ir, text)
    assert "h0=%" in ir, ir


def test_selective_scan_ref_einsum_spelling(tmp_path):
    report, text = lowered(selective_scan_ref, inputs(), tmp_path)
    assert_factored(one_scan(report), text)


def test_associative_scan_spelling(tmp_path):
    # the scan_tree pass hands the scan permuted views of the products; the permutation is
    # pushed into the factors
    report, text = lowered(hf_associative, inputs(), tmp_path)
    assert_factored(one_scan(report), text)


def test_reverse_loop(tmp_path):
    def backward_in_time(x, dt, A, Bm, Cm):
        dA = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
        dBu = dt[:, :, :, None] * Bm[:, None, :, :] * x[:, :, :, None]
        h = torch.zeros(B, D, N)
        ys = []
        for i in range(T - 1, -1, -1):
            h = dA[:, :, i] * h + dBu[:, :, i]
            ys.append((h * Cm[:, None, i]).sum(-1))
        return torch.stack(ys[::-1], dim=-1), h

    report, text = lowered(backward_in_time, inputs(), tmp_path)
    ir = one_scan(report)
    assert_factored(ir, text)
    assert "reverse=true" in ir, ir


def test_input_product_alone(tmp_path):
    # decays given as a tensor (no exp of a product): only b = B·x is kept factored
    def fn(a, x, Bm, Cm):
        return scan_with_readout(a, Bm[:, None, :, :] * x[:, :, :, None], Cm)

    x, _, _, Bm, Cm = inputs()
    a = torch.rand(B, D, T, N).mul(0.5).add(0.5).requires_grad_()
    report = check_against_eager(fn, a, x, Bm, Cm)
    ir = one_scan(report)
    assert "u=%" in ir and "dt=%" not in ir, ir


def test_bf16_model_with_fp32_products(tmp_path):
    # a bf16 model in transformers' spelling: A is fp32 (-exp(A_log.float())), B and x are cast with
    # .float(), so every product is computed in fp32 and folds
    x, dt, A, Bm, Cm = inputs(torch.bfloat16)
    A = A.detach().float().requires_grad_()
    report, text = lowered(hf_loop, (x, dt, A, Bm, Cm), tmp_path)
    assert_factored(one_scan(report), text)


def test_bf16_products_stay_materialized():
    # every mul rounds to bf16 here; the kernels would form unrounded fp32 products: not folded
    def fn(x, dt, A, Bm, Cm):
        dA = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
        dBu = dt[:, :, :, None] * Bm[:, None, :, :] * x[:, :, :, None]
        return scan_with_readout(dA, dBu, Cm)

    report = check_against_eager(fn, *inputs(torch.bfloat16))
    ir = one_scan(report)
    assert "dt=%" not in ir and "u=%" not in ir, ir


# --- left as they are ------------------------------------------------------------------

def test_decays_also_returned_stay_materialized():
    def fn(x, dt, A, Bm, Cm):
        dA = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
        dBu = dt[:, :, :, None] * Bm[:, None, :, :] * x[:, :, :, None]
        return (*scan_with_readout(dA, dBu, Cm), dA)

    report = check_against_eager(fn, *inputs())
    ir = one_scan(report)
    # the decays are materialized for the caller anyway: a stays; b = Δ·B·x (three factors, no
    # shared Δ to take out) stays too
    assert "dt=%" not in ir and "u=%" not in ir, ir


def test_scaled_input_is_not_a_plain_product():
    def fn(x, dt, A, Bm, Cm):
        dA = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
        dBu = (dt[:, :, :, None] * Bm[:, None, :, :]) * x[:, :, :, None] * 0.5
        return scan_with_readout(dA, dBu, Cm)

    report = check_against_eager(fn, *inputs())
    ir = one_scan(report)
    assert "dt=%" not in ir and "u=%" not in ir, ir


def test_decay_of_a_sum_is_not_folded():
    def fn(x, dt, A, Bm, Cm):
        dA = torch.exp(A[None, :, None, :] + dt[:, :, :, None])
        dBu = dt[:, :, :, None] * Bm[:, None, :, :]
        return scan_with_readout(dA, dBu, Cm)

    x, dt, A, Bm, Cm = inputs()
    report = check_against_eager(fn, x, dt, A, Bm, Cm)
    ir = one_scan(report)
    # exp(A + Δ) is no exp of a product: a stays; b = Δ·B still keeps its two factors
    assert "dt=%" not in ir and "u=%" in ir, ir


@pytest.mark.parametrize("runtime", ["eager", "cpu"])
def test_discretized_runtime_paths_agree(runtime):
    torch.manual_seed(1)
    x, dt, A, Bm, Cm = inputs()
    got = torch.ops.seqfuse.scan(A[:, None, :], Bm[:, None], Cm[:, None], None, False, "recurrent", runtime,
                                 dt[..., None], x[..., None])
    ref = scan_reference(
        torch.exp(A[:, None, :].double() * dt[..., None].double()),
        Bm[:, None].double() * dt[..., None].double() * x[..., None].double(), Cm[:, None].double())
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5)
