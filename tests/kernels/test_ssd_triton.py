"""The triton chunked-SSD kernel (seqfuse.ssd) against the eager reference: forward for each decay
kind (none / scalar / vector), with the d skip, h0, the final state, odd T (several chunks plus a
partial one), b shared by all heads (stride 0), fp32 / fp16 / bf16; the backward kernel (decay
none / scalar) directly and through the custom op; what ``supports`` refuses; and deliberately
wrong launches (forward and backward) that the checks must catch.

Without CUDA the kernel runs on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1,
set per test by conftest.py) at tiny shapes; the ``gpu`` tests run it compiled at real shapes.
Errors are relative RMS errors against the fp32 recurrent reference with fixed per-dtype bounds.
"""
import pytest
import torch

triton = pytest.importorskip("triton")

from seqfuse.lowering.reference.ssd import ssd_recurrent  # noqa: E402
from seqfuse.lowering.triton import ssd as tssd  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# relative RMS error bounds against the fp32 reference (never widened to pass); on a GPU, fp32 tiles
# go through tf32x3 dots (fp32-accurate)
BOUND = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def rel_err(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} vs reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "non-finite output"
    den = ref.norm().item()
    assert den > 0, "the reference is all zeros: the comparison would prove nothing"
    return (out - ref).norm().item() / den


def make(B, T, H, P, N, decay, dtype, *, d=False, h0=False, shared_b=False, strong=False):
    """Mamba-2 / GLA-like operands; a is a log-decay <= 0 (``strong``: steps down to -30)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, H, P, generator=g)
    b = torch.randn(B, T, 1 if shared_b else H, N, generator=g) / N ** 0.5
    c = torch.randn(B, T, H, N, generator=g) / N ** 0.5
    scale = 30.0 if strong else 0.5
    a = None
    if decay == "scalar":
        a = -torch.rand(B, T, H, generator=g) * scale
    elif decay == "vector":
        a = -torch.rand(B, T, H, N, generator=g) * scale
    dd = torch.randn(H, generator=g) if d else None
    hh = torch.randn(B, H, P, N, generator=g) if h0 else None
    to = (lambda t: None if t is None else t.to(DEVICE, dtype))
    b = to(b)
    if shared_b:
        b = b.expand(B, T, H, N)
    return to(x), b, to(c), None if a is None else a.to(DEVICE), None if dd is None else dd.to(DEVICE), to(hh)


def check(x, b, c, a, d, h0, decay, bound=None):
    attrs = dict(decay=decay, chunk=16, algorithm="chunked")
    reason = tssd.supports(dict(x=x, b=b, c=c, a=a, d=d, h0=h0), attrs)
    assert reason is None, reason
    dtype = torch.promote_types(torch.promote_types(x.dtype, b.dtype), c.dtype)
    bound = bound or BOUND[dtype]
    f = (lambda t: None if t is None else t.float())
    ry, rh = ssd_recurrent(f(x), f(b), f(c), f(a), f(d), f(h0), decay=decay)
    y, h = tssd.forward(x, b, c, a, d, h0, attrs)
    assert y.dtype == dtype and h.dtype == dtype
    for name, got, ref in (("y", y, ry), ("h", h, rh)):
        e = rel_err(got, ref)
        assert e < bound, f"{name}: relative error {e:.3g} >= {bound:g}"


@pytest.mark.parametrize("decay,d,h0", [
    ("none", False, False),
    ("none", True, True),
    ("scalar", False, False),
    ("scalar", True, True),
    ("vector", False, True),
    ("vector", True, False),
])
def test_ssd_forward_fp32(decay, d, h0):
    # T = 37: four chunks of the interpreter's 8 steps and a partial one; P = 12: two P blocks
    check(*make(1, 37, 2, 12, 6, decay, torch.float32, d=d, h0=h0), decay)


@pytest.mark.parametrize("decay", ["scalar", "vector"])
def test_ssd_forward_strong_decay_shared_b(decay):
    # log-decays down to -30 per step: a q·exp(cum) / k·exp(-cum) factoring would overflow in fp32
    check(*make(2, 19, 2, 4, 5, decay, torch.float32, h0=True, shared_b=True, strong=True), decay)


@pytest.mark.parametrize("dtype,decay", [(torch.float16, "scalar"), (torch.bfloat16, "vector"),
                                         (torch.bfloat16, "none")])
def test_ssd_forward_low_precision(dtype, decay):
    check(*make(1, 21, 1, 8, 8, decay, dtype, d=True, h0=True), decay)


def test_ssd_detects_a_wrong_kernel(monkeypatch):
    # a launch that drops the state passed between chunks must fail the same check
    kern = tssd._kernels()
    orig = kern.ssd_chunked_fwd_kernel

    class Broken:
        def __getitem__(self, grid):
            def launch(X, Bm, Cm, A, D, H0, Y, HT, T, *args, **kw):
                y = orig[grid](X, Bm, Cm, A, D, H0, Y, HT, min(T, kw["BLOCK_T"]), *args, **kw)
                Y[:, kw["BLOCK_T"]:] = 0
                return y
            return launch
    monkeypatch.setattr(kern, "ssd_chunked_fwd_kernel", Broken())
    with pytest.raises(AssertionError, match="relative error"):
        check(*make(1, 20, 1, 4, 4, "scalar", torch.float32), "scalar")


def test_ssd_custom_op_forward_and_backward():
    # through torch.ops.seqfuse.ssd with runtime="triton": forward and backward kernels; a refusal
    # or a failing kernel would warn (turned into an error)
    import warnings

    import seqfuse.lowering.ssd_op  # noqa: F401  (registers the op and its paths)
    from seqfuse.runtime import counters, reset_counters
    x, b, c, a, d, h0 = make(1, 13, 2, 4, 4, "scalar", torch.float32, d=True, h0=True)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, b, c, a, d, h0)]
    ref = [t.detach().clone().requires_grad_(True) for t in (x, b, c, a, d, h0)]
    reset_counters()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="seqfuse")
        y, h = torch.ops.seqfuse.ssd(*leaves, "scalar", 8, "chunked", "triton")
        (y.square().sum() + h.sum()).backward()
    calls = counters()
    assert calls["ssd"]["triton"] >= 1 and calls["ssd_backward"]["triton"] >= 1, calls
    ry, rh = ssd_recurrent(*ref, decay="scalar")
    (ry.square().sum() + rh.sum()).backward()
    assert rel_err(y, ry) < BOUND[torch.float32] and rel_err(h, rh) < BOUND[torch.float32]
    for name, got, want in zip(("x", "b", "c", "a", "d", "h0"), leaves, ref):
        e = rel_err(got.grad, want.grad)
        assert e < 1e-4, f"d{name}: relative error {e:.3g}"


def test_ssd_supports_refusals():
    x, b, c, a, d, h0 = make(1, 5, 1, 4, 4, "scalar", torch.float32)
    t = dict(x=x, b=b, c=c, a=a, d=None, h0=None)
    ok = dict(decay="scalar", chunk=8, algorithm="chunked")
    assert tssd.supports(t, ok) is None
    assert "algorithm" in tssd.supports(t, dict(ok, algorithm="recurrent"))
    assert "float64" in tssd.supports(dict(t, x=x.double()), ok)
    assert "complex" in tssd.supports(dict(t, x=torch.complex(x, x)), ok)
    big = torch.zeros(1, 5, 1, tssd.MAX_N_VECTOR + 1, device=DEVICE)
    assert "N=" in tssd.supports(dict(t, b=big, c=big, a=big), dict(ok, decay="vector"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (real shapes, compiled kernel)")
@pytest.mark.parametrize("decay", ["none", "scalar", "vector"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ssd_gpu_shapes(decay, dtype):
    # Mamba-2-like: T = 1000 (partial last chunk), H = 8, P = 64, N = 64 (vector: GLA-like)
    check(*make(2, 1000, 8, 64, 64, decay, dtype, d=True, h0=True), decay)
    if decay != "vector":  # the N <= 128 config (16x16 tiles); P = 80: a partial P block
        check(*make(1, 333, 4, 80, 128, decay, dtype, h0=True), decay)


def test_ssd_forward_layouts():
    # x a transposed view, b shared by the batch (stride 0), d per (H, P), scalar decay
    x, b, c, a, _, h0 = make(2, 11, 3, 5, 4, "scalar", torch.float32, h0=True)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    d = torch.randn(3, 5, device=DEVICE)
    check(xt, b[:1], c, a, d, h0, "scalar")


def check_backward(x, b, c, a, d, h0, decay, bound=None):
    """The backward kernel's gradients against autograd through the fp32 recurrent reference."""
    assert tssd.backward_kernel_reason(x, b, c, h0, decay) is None
    ops = [x, b, c, a, d, h0]
    dtype = torch.promote_types(torch.promote_types(x.dtype, b.dtype), c.dtype)
    bound = bound or BOUND[dtype]
    leaves = [t.detach().float().requires_grad_(True) if t is not None else None for t in ops]
    ry, rh = ssd_recurrent(*leaves, decay=decay)
    gy, gh = torch.randn_like(ry).to(dtype), torch.randn_like(rh).to(dtype)
    needs = [t is not None for t in ops]
    ref = iter(torch.autograd.grad((ry, rh), [t for t in leaves if t is not None], (gy.float(), gh.float())))
    got = tssd.backward(gy, gh, x, b, c, a, d, h0, dict(decay=decay, chunk=16, algorithm="chunked", needs=needs))
    for name, t, g in zip(("dx", "db", "dc", "da", "dd", "dh0"), ops, got):
        if t is None:
            assert g is None
            continue
        assert g.shape == t.shape and g.dtype == t.dtype, f"{name}: {g.shape} {g.dtype}"
        e = rel_err(g, next(ref))
        assert e < bound, f"{name}: relative error {e:.3g} >= {bound:g}"


@pytest.mark.parametrize("decay,d,h0", [("none", True, True), ("scalar", False, False), ("scalar", True, True)])
def test_ssd_backward_kernel_fp32(decay, d, h0):
    check_backward(*make(1, 37, 2, 12, 6, decay, torch.float32, d=d, h0=h0), decay)


def test_ssd_backward_kernel_shared_b_bf16():
    check_backward(*make(2, 19, 2, 4, 5, "scalar", torch.float32, h0=True, shared_b=True), "scalar")
    check_backward(*make(1, 21, 1, 8, 8, "scalar", torch.bfloat16, d=True, h0=True), "scalar")


def test_ssd_backward_detects_a_wrong_kernel(monkeypatch):
    # a launch that skips the first chunk of the adjoint must fail the same check (and the kernel,
    # not the reference, must be what ran)
    kern = tssd._kernels()
    orig = kern.ssd_chunked_bwd_kernel
    launches = []

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append(grid)
                args = list(args)
                args[19] -= 1   # NCHUNK
                return orig[grid](*args, **kw)
            return launch
    monkeypatch.setattr(kern, "ssd_chunked_bwd_kernel", Broken())
    with pytest.raises(AssertionError, match="relative error"):
        check_backward(*make(1, 20, 1, 4, 4, "scalar", torch.float32), "scalar")
    assert launches
