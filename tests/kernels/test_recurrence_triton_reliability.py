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
