"""The triton decode kernels (the recurrent form of seqfuse.ssd and seqfuse.scan, T = 1 and a few
steps) against the fp32 recurrent references: ssd for every decay kind (none / scalar / vector) ×
fp32 / fp16 / bf16 × with and without d and h0 × T ∈ {1, 3}, mixed dtypes (the final state in the
promoted dtype of x, b, c), broadcast and strided operands; scan with and without a readout,
reverse, h0, broadcast operands, states rounded to bf16 / fp16 before the readout (readout_dtype);
deliberately wrong launches the checks must catch; and both
custom ops run with algorithm "recurrent" on the triton path, the decode kernel launched (forward)
and the gradients right (backward: the ssd / scan triton backward, shared with "chunked").

Without CUDA the kernels run on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1,
set per test by conftest.py) at tiny shapes that still cross several P / row / N blocks; the
``gpu`` test runs them compiled at decode shapes.  Errors are relative RMS errors against the fp32
recurrent references with the shared fixed per-dtype bounds (kernel_checks.py).
"""
import importlib
import warnings

import pytest
import torch

triton = pytest.importorskip("triton")

from kernel_checks import BOUND, DEVICE, IGNORE_NDIM_WARNING, assert_close, rel_err  # noqa: E402
from seqfuse.lowering.reference.scan import scan_reference  # noqa: E402
from seqfuse.lowering.reference.ssd import ssd_recurrent  # noqa: E402
from seqfuse.lowering.triton import decode  # noqa: E402
from seqfuse.lowering.triton import scan as tscan  # noqa: E402
from seqfuse.lowering.triton import ssd as tssd  # noqa: E402

pytestmark = [IGNORE_NDIM_WARNING]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def f32(t):
    return None if t is None else t.float()


# --- ssd -----------------------------------------------------------------------------------

def make_ssd(B, T, H, P, N, decay, dtype, *, d=False, h0=False, seed=0):
    """Mamba-2 / GLA-like operands; a is a log-decay <= 0, h0 a state carried from earlier steps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, P, generator=g)
    b = torch.randn(B, T, H, N, generator=g) / N ** 0.5
    c = torch.randn(B, T, H, N, generator=g) / N ** 0.5
    a = {"none": None, "scalar": -torch.rand(B, T, H, generator=g),
         "vector": -torch.rand(B, T, H, N, generator=g)}[decay]
    dd = torch.randn(H, generator=g) if d else None
    hh = torch.randn(B, H, P, N, generator=g) if h0 else None
    to = (lambda t: None if t is None else t.to(DEVICE, dtype))
    return to(x), to(b), to(c), None if a is None else a.to(DEVICE), None if dd is None else dd.to(DEVICE), to(hh)


def check_ssd(x, b, c, a, d, h0, decay):
    """The decode path (ssd.supports / ssd.forward with algorithm "recurrent") against the oracle."""
    attrs = dict(decay=decay, chunk=64, algorithm="recurrent")
    reason = tssd.supports(dict(x=x, b=b, c=c, a=a, d=d, h0=h0), attrs)
    assert reason is None, reason
    dtype = torch.promote_types(torch.promote_types(x.dtype, b.dtype), c.dtype)
    ry, rh = ssd_recurrent(f32(x), f32(b), f32(c), f32(a), f32(d), f32(h0), decay=decay)
    y, h = tssd.forward(x, b, c, a, d, h0, attrs)
    assert y.dtype == dtype and h.dtype == dtype, (y.dtype, h.dtype)
    return {name: assert_close(name, got, ref, BOUND[dtype]) for name, got, ref in (("y", y, ry), ("h", h, rh))}


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("decay", ["none", "scalar", "vector"])
def test_ssd_decode(decay, dtype, T):
    # P = 12 over the interpreter's P blocks of 2 (N = 6 -> BLOCK_N 8, TILE 16): six blocks
    for d in (False, True):
        for h0 in (False, True):
            check_ssd(*make_ssd(2, T, 2, 12, 6, decay, dtype, d=d, h0=h0), decay)


def test_ssd_decode_mixed_dtypes_and_layouts():
    # bf16 x with fp32 b, c: fp32 results; a bf16 h0 does not change the final state's dtype
    x, b, c, a, d, h0 = make_ssd(2, 3, 3, 5, 4, "vector", torch.float32, d=True, h0=True)
    check_ssd(x.bfloat16(), b, c, a, d, h0.bfloat16(), "vector")
    # b shared by all heads (stride 0), x a transposed view, d per (H, P), a strided a
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    a_s = torch.randn(2, 3, 3, 2, device=DEVICE)[..., 0].clamp(max=0)
    check_ssd(xt, b[:, :, :1], c, a_s, torch.randn(3, 5, device=DEVICE), h0, "scalar")


def test_ssd_decode_zero_length_returns_h0():
    x, b, c, a, d, h0 = make_ssd(1, 0, 2, 4, 4, "scalar", torch.float32, h0=True)
    y, h = tssd.forward(x, b, c, a, d, h0, dict(decay="scalar", chunk=64, algorithm="recurrent"))
    assert y.shape == (1, 0, 2, 4) and torch.equal(h, h0)


def test_ssd_decode_detects_a_wrong_launch(monkeypatch):
    # a launch that drops the state carried from the previous call (h0) must fail the same check
    kern = decode._kernels()
    orig = kern.ssd_decode_kernel

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                return orig[grid](*args, **dict(kw, HAS_H0=False))
            return launch
    monkeypatch.setattr(kern, "ssd_decode_kernel", Broken())
    with pytest.raises(AssertionError, match="relative error"):
        check_ssd(*make_ssd(1, 1, 2, 4, 4, "scalar", torch.float32, h0=True), "scalar")


def test_ssd_decode_refusals():
    x, b, c, a, d, h0 = make_ssd(1, 1, 1, 4, 4, "scalar", torch.float32)
    t = dict(x=x, b=b, c=c, a=a, d=None, h0=None)
    ok = dict(decay="scalar", chunk=64, algorithm="recurrent")
    assert tssd.supports(t, ok) is None and decode.ssd_supports(t, ok) is None
    assert "quadratic" in tssd.supports(t, dict(ok, algorithm="quadratic"))
    assert "float64" in tssd.supports(dict(t, x=x.double()), ok)
    assert "complex" in tssd.supports(dict(t, x=torch.complex(x, x)), ok)
    big = torch.zeros(1, 1, 1, decode.MAX_N + 1, device=DEVICE)
    assert "N=" in tssd.supports(dict(t, b=big, c=big), ok)


class Launches:
    """Wraps a kernel of decode_kernels to record its launches."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("decay", ["scalar", "vector"])
def test_ssd_custom_op_runs_the_decode_kernel(decay, monkeypatch):
    # torch.ops.seqfuse.ssd with algorithm "recurrent", runtime "triton": a refusal or a failing
    # kernel would warn (an error here); the decode kernel must be what ran the forward
    importlib.import_module("seqfuse.lowering.ssd_op")   # registers the op and its paths
    from seqfuse.runtime import counters, reset_counters
    kern = decode._kernels()
    launches = Launches(kern.ssd_decode_kernel)
    monkeypatch.setattr(kern, "ssd_decode_kernel", launches)
    ops = make_ssd(1, 1, 2, 4, 4, decay, torch.float32, d=True, h0=True)
    leaves = [t.detach().clone().requires_grad_(True) for t in ops]
    ref = [t.detach().clone().requires_grad_(True) for t in ops]
    reset_counters()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="seqfuse")
        y, h = torch.ops.seqfuse.ssd(*leaves, decay, 64, "recurrent", "triton")
        (y.square().sum() + h.sum()).backward()
    calls = counters()
    assert calls["ssd"]["triton"] == 1 and calls["ssd_backward"]["triton"] == 1, calls
    assert len(launches.grids) == 1
    ry, rh = ssd_recurrent(*ref, decay=decay)
    (ry.square().sum() + rh.sum()).backward()
    assert rel_err(y, ry) < BOUND[torch.float32] and rel_err(h, rh) < BOUND[torch.float32]
    for name, got, want in zip(("x", "b", "c", "a", "d", "h0"), leaves, ref):
        e = rel_err(got.grad, want.grad)
        assert e < 1e-4, f"d{name}: relative error {e:.3g}"


# --- scan ----------------------------------------------------------------------------------

def make_scan(R, T, N, dtype, *, readout=True, h0=False, shared_c=False, seed=0):
    """Mamba-1-like operands: a = exp(Δ·A) in (0, 1), b, c (shared over channels: stride 0), h0."""
    g = torch.Generator().manual_seed(seed)
    a = torch.exp(-torch.rand(*R, T, N, generator=g) * 0.5).to(DEVICE, dtype)
    b = torch.randn(*R, T, N, generator=g).to(DEVICE, dtype)
    c = None
    if readout:
        if shared_c:
            c = torch.randn(R[0], 1, T, N, generator=g).to(DEVICE, dtype).expand(*R, T, N)
        else:
            c = torch.randn(*R, T, N, generator=g).to(DEVICE, dtype)
    hh = torch.randn(*R, N, generator=g).to(DEVICE, dtype) if h0 else None
    return a, b, c, hh


def check_scan(a, b, c, h0, reverse=False):
    attrs = dict(reverse=reverse, algorithm="recurrent")
    reason = tscan.supports(dict(a=a, b=b, c=c, h0=h0), attrs)
    assert reason is None, reason
    dtype = a.dtype
    ry, rh = scan_reference(f32(a), f32(b), f32(c), f32(h0), reverse=reverse)
    y, h = tscan.forward(a, b, c, h0, None, None, attrs)
    assert y.dtype == dtype and h.dtype == dtype
    return {name: assert_close(name, got, ref, BOUND[dtype]) for name, got, ref in (("y", y, ry), ("h", h, rh))}


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("readout", [True, False])
def test_scan_decode(readout, dtype, T):
    # 6 rows (2, 3); N = 5: with a readout one N block of 8 and 2 rows per program, without one
    # N blocks of 4 (a partial one) and 4 rows per program (a partial row block)
    for reverse in (False, True):
        for h0 in (False, True):
            check_scan(*make_scan((2, 3), T, 5, dtype, readout=readout, h0=h0, shared_c=reverse), reverse=reverse)


def test_scan_decode_broadcast_operands():
    # a shared by the batch (stride 0), an h0 broadcast over rows, a shared over time
    a, b, c, h0 = make_scan((2, 3), 3, 5, torch.float32, h0=True)
    check_scan(a[:1], b, c, h0[0], reverse=True)
    check_scan(a[:, :, :1], b, None, h0)


def test_scan_decode_detects_a_wrong_launch(monkeypatch):
    # a launch that walks a reverse scan forwards must fail the same check
    kern = decode._kernels()
    orig = kern.scan_decode_kernel

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                return orig[grid](*args, **dict(kw, REVERSE=False))
            return launch
    monkeypatch.setattr(kern, "scan_decode_kernel", Broken())
    with pytest.raises(AssertionError, match="relative error"):
        check_scan(*make_scan((1, 2), 3, 4, torch.float32, h0=True), reverse=True)


def test_scan_custom_op_runs_the_decode_kernel(monkeypatch):
    importlib.import_module("seqfuse.lowering.scan_op")  # registers the op and its paths
    from seqfuse.runtime import counters, reset_counters
    kern = decode._kernels()
    launches = Launches(kern.scan_decode_kernel)
    monkeypatch.setattr(kern, "scan_decode_kernel", launches)
    a, b, c, h0 = make_scan((1, 2), 1, 4, torch.float32, shared_c=True, h0=True)
    leaves = [x.detach().clone().requires_grad_(True) for x in (a, b, h0)]
    ref = [x.detach().clone().requires_grad_(True) for x in (a, b, h0)]
    reset_counters()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="seqfuse")
        y, h = torch.ops.seqfuse.scan(leaves[0], leaves[1], c, leaves[2], False, "recurrent", "triton")
        (y.square().sum() + h.sum()).backward()
    calls = counters()
    assert calls["scan"]["triton"] == 1 and calls["scan_backward"]["triton"] == 1, calls
    assert len(launches.grids) == 1
    ry, rh = scan_reference(ref[0], ref[1], c, ref[2])
    (ry.square().sum() + rh.sum()).backward()
    assert rel_err(y, ry) < BOUND[torch.float32] and rel_err(h, rh) < BOUND[torch.float32]
    for got, want in zip(leaves, ref):
        assert rel_err(got.grad, want.grad) < BOUND[torch.float32]


@pytest.mark.parametrize("readout_dtype,c_dtype", [
    (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
], ids=str)
def test_scan_decode_rounded_readout(readout_dtype, c_dtype):
    # the readout reads the states rounded to readout_dtype (h.to(bf16) @ C): against the reference
    # with readout_dtype, y in promote(readout_dtype, c); fp32 a, b, h0 (and dt, u: the discretized
    # form, materialized for the decode kernel), reverse, h0, several row blocks
    g = torch.Generator().manual_seed(1)
    for reverse, disc in ((False, False), (True, True)):
        a, b, c, h0 = make_scan((2, 3), 3, 5, torch.float32, h0=True)
        c = c.to(c_dtype)
        dt = (0.05 + torch.rand(2, 3, 3, 1, generator=g)).to(DEVICE) if disc else None
        u = torch.randn(2, 3, 3, 1, generator=g).to(DEVICE) if disc else None
        if disc:
            a = -torch.rand(3, 1, 5, generator=g).to(DEVICE)      # log-decays, Mamba's A (D, 1, N)
        attrs = dict(reverse=reverse, algorithm="recurrent", readout_dtype=readout_dtype)
        assert tscan.supports(dict(a=a, b=b, c=c, h0=h0, dt=dt, u=u), attrs) is None
        y, h = tscan.forward(a, b, c, h0, dt, u, attrs)
        assert y.dtype == torch.promote_types(readout_dtype, c_dtype) and h.dtype == torch.float32
        ry, rh = scan_reference(a, b, f32(c), h0, dt=dt, u=u, reverse=reverse, readout_dtype=readout_dtype)
        py, _ = scan_reference(a, b, f32(c), h0, dt=dt, u=u, reverse=reverse)
        assert_close("y", y, ry, BOUND[y.dtype])
        assert_close("h", h, rh, BOUND[torch.float32])
        if y.dtype == torch.float32:   # a kernel that skipped the rounding would fail
            assert rel_err(py, ry) > BOUND[torch.float32]


def test_scan_custom_op_runs_the_decode_kernel_rounded(monkeypatch):
    # torch.ops.seqfuse.scan(..., "recurrent", "triton", readout_dtype=bf16): the decode kernel runs
    # the forward, the blocked backward kernel the gradients, against the reference with readout_dtype
    importlib.import_module("seqfuse.lowering.scan_op")
    from seqfuse.runtime import counters, reset_counters
    kern = decode._kernels()
    launches = Launches(kern.scan_decode_kernel)
    monkeypatch.setattr(kern, "scan_decode_kernel", launches)
    a, b, c, h0 = make_scan((1, 2), 2, 4, torch.float32, shared_c=True, h0=True)
    leaves = [x.detach().clone().requires_grad_(True) for x in (a, b, c, h0)]
    ref = [x.detach().clone().requires_grad_(True) for x in (a, b, c, h0)]
    reset_counters()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="seqfuse")
        y, h = torch.ops.seqfuse.scan(*leaves, False, "recurrent", "triton", None, None, torch.bfloat16)
        (y.square().sum() + h.sum()).backward()
    calls = counters()
    assert calls["scan"]["triton"] == 1 and calls["scan_backward"]["triton"] == 1, calls
    assert len(launches.grids) == 1
    ry, rh = scan_reference(*ref, readout_dtype=torch.bfloat16)
    (ry.square().sum() + rh.sum()).backward()
    assert y.dtype == torch.float32
    assert rel_err(y, ry) < BOUND[torch.float32] and rel_err(h, rh) < BOUND[torch.float32]
    for got, want in zip(leaves, ref):
        assert rel_err(got.grad, want.grad) < BOUND[torch.float32]


# --- real decode shapes (GPU) ----------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (real shapes, compiled kernels)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_gpu_shapes(dtype):
    # Mamba-2 2.7b-like heads (H = 80, P = 64, N = 128), GLA-like vector decay, T = 1 and 16
    for T in (1, 16):
        check_ssd(*make_ssd(4, T, 80, 64, 128, "scalar", dtype, d=True, h0=True), "scalar")
        check_ssd(*make_ssd(2, T, 8, 128, 64, "vector", dtype, h0=True), "vector")
        # Mamba-1 130m-like rows (B, D) = (4, 1536), N = 16, C shared over channels
        check_scan(*make_scan((4, 1536), T, 16, dtype, h0=True, shared_c=True))
        check_scan(*make_scan((2, 64), T, 80, dtype, readout=False, h0=True), reverse=True)
