"""Issue 13 / defect 15: the triton scan backward with an initial state in bf16 / fp16 was reported
to raise InterpreterError('mask has unsupported dtype') (caught by the dispatcher, so the call fell
back to the eager reference).  The backward must run on the triton path itself — no fallback, no
warning — and agree with the reference (fp32 accumulation, gradients rounded once)."""
import warnings

import pytest
import torch

import seqfuse
from seqfuse.lowering.reference.scan import scan_backward_reference, scan_reference


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 5, 9])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("readout", [False, True])
def test_scan_backward_low_precision_with_h0_runs_on_triton(dtype, T, reverse, readout):
    g = torch.Generator().manual_seed(T)
    B, N = 2, 3
    a = torch.rand(B, T, N, generator=g).to(dtype).requires_grad_()
    b = torch.randn(B, T, N, generator=g).to(dtype).requires_grad_()
    c = torch.randn(B, T, N, generator=g).to(dtype).requires_grad_() if readout else None
    h0 = torch.randn(B, N, generator=g).to(dtype).requires_grad_()
    seqfuse.reset_counters()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, h = torch.ops.seqfuse.scan(a, b, c, h0, reverse, "chunked", "triton")
        gy, gh = torch.randn_like(y), torch.randn_like(h)
        got = torch.autograd.grad((y, h), [t for t in (a, b, c, h0) if t is not None], (gy, gh))
    assert not [w for w in caught if "seqfuse" in str(w.message)], [str(w.message) for w in caught]
    calls = seqfuse.counters()
    assert calls["scan"]["triton"] == 1 and calls["scan_backward"]["triton"] == 1, calls
    want_y, want_h = scan_reference(a.detach(), b.detach(), None if c is None else c.detach(), h0.detach(),
                                    reverse=reverse)
    torch.testing.assert_close(y, want_y, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(h, want_h, rtol=2e-2, atol=2e-2)
    want = [w for w in scan_backward_reference(gy, gh, a.detach(), b.detach(), None if c is None else c.detach(),
                                               h0.detach(), reverse=reverse) if w is not None]
    for name, x, w in zip(("da", "db", "dc", "dh0") if readout else ("da", "db", "dh0"), got, want):
        assert x.dtype == dtype, name
        torch.testing.assert_close(x.float(), w.float(), rtol=3e-2, atol=3e-2, msg=name)


# --- a log-decay of -inf (exp(-inf) = 0, a reset) through the chunked ssd kernels ------------------
# The kernels took segment sums as differences of cumulative sums: -inf - (-inf) = NaN where the
# program's loop computes a finite value (docs/reliability.md, "NaN and inf", rule 3).

def _ssd_loop(q, k, v, g):
    S = q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1])
    outs = []
    for t in range(q.shape[2]):
        gt = g[:, :, t].exp()
        S = S * (gt[..., None] if g.dim() == 4 else gt[..., None, None]) + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append((q[:, :, t, :, None] * S).sum(-2))
    return torch.stack(outs, 2), S


@pytest.mark.parametrize("vector", [False, True])
@pytest.mark.parametrize("T", [7, 20])
def test_ssd_chunked_kernels_keep_resets_exact(vector, T):
    from helpers import check_against_eager
    gen = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(2, 2, T, 3, generator=gen) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(2, 2, T, *((3,) if vector else ()), generator=gen))
    g[0, 1, 3] = -torch.inf
    g[1, 0, T - 1] = -torch.inf
    g[1, 1, 0] = -torch.inf
    args = [t.requires_grad_() for t in (q, k, v, g)]
    seqfuse.reset_counters()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = check_against_eager(_ssd_loop, *args, options={"runtime": "triton", "algorithm": {"ssd": "chunked"}})
    assert not [w for w in caught if "seqfuse" in str(w.message)], [str(w.message) for w in caught]
    assert report.count("ssd") == 1, str(report)
    calls = seqfuse.counters()
    assert calls["ssd"]["triton"] == 1 and calls["ssd_backward"]["triton"] == 1, calls
