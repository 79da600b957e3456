"""The ssd and scan references: every algorithm against the recurrent oracle in fp64, the
stability of the chunked algorithm on long sequences with strong decay, gradients in fp32
against fp64, and the explicit scan adjoint against autograd through the recurrence."""
import pytest
import torch

from helpers import rel_err
from seqfuse.lowering.reference.scan import scan_backward_reference, scan_reference
from seqfuse.lowering.reference.ssd import ALGORITHMS, ssd_reference

F64 = torch.float64


def ssd_inputs(B=2, T=37, H=2, P=4, N=6, decay="scalar", dtype=F64, strength=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    a = {"none": None, "scalar": lambda: -strength * torch.rand(B, T, H, generator=g, dtype=dtype),
         "vector": lambda: -strength * torch.rand(B, T, H, N, generator=g, dtype=dtype)}[decay]
    return r(B, T, H, P), r(B, T, H, N), r(B, T, H, N), a() if a else None, r(H), r(B, H, P, N)


@pytest.mark.parametrize("decay", ["none", "scalar", "vector"])
@pytest.mark.parametrize("algorithm, chunk", [("quadratic", 64), ("chunked", 8), ("chunked", 1), ("chunked", 37),
                                              ("chunked", 100)])
def test_ssd_algorithms_agree_with_the_recurrence_in_fp64(decay, algorithm, chunk):
    x, b, c, a, d, h0 = ssd_inputs(decay=decay)
    y_ref, h_ref = ssd_reference(x, b, c, a, d, h0, decay=decay, algorithm="recurrent")
    y, h = ssd_reference(x, b, c, a, d, h0, decay=decay, chunk=chunk, algorithm=algorithm)
    assert rel_err(y, y_ref) < 1e-12 and rel_err(h, h_ref) < 1e-12


@pytest.mark.parametrize("decay", ["scalar", "vector"])
def test_ssd_chunked_is_stable_on_a_long_sequence_with_strong_decay(decay):
    # a ≈ -5 per step: cumulative sums reach -10⁴, exp of a whole-sequence sum underflows; the
    # first steps decay slowly, so the initial state and early inputs matter for a while
    x, b, c, a, d, h0 = ssd_inputs(B=1, T=2048, H=2, P=4, N=4, decay=decay, strength=1.0)
    a = a - 4.5
    a[:, :100] = -0.01
    y_ref, h_ref = ssd_reference(x, b, c, a, d, h0, decay=decay, algorithm="recurrent")
    f32 = [t.float() for t in (x, b, c, a, d, h0)]
    y, h = ssd_reference(*f32, decay=decay, chunk=64, algorithm="chunked")
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    assert rel_err(y, y_ref) < 1e-4 and rel_err(h, h_ref) < 1e-4


@pytest.mark.parametrize("algorithm", ["quadratic", "chunked"])
@pytest.mark.parametrize("decay", ["scalar", "vector"])
def test_ssd_gradients_in_fp32_match_fp64_and_stay_finite(decay, algorithm):
    # strong decay: the masked upper triangle holds large positive sums, which must never reach exp
    x, b, c, a, d, h0 = ssd_inputs(B=1, T=40, H=2, P=4, N=4, decay=decay, strength=30.0)
    grads = {}
    for dtype in (F64, torch.float32):
        ins = [t.detach().to(dtype).clone().requires_grad_() for t in (x, b, c, a, d, h0)]
        y, h = ssd_reference(*ins, decay=decay, chunk=16, algorithm=algorithm)
        (y.square().sum() + h.sum()).backward()
        grads[dtype] = [t.grad for t in ins]
    for g32, g64 in zip(grads[torch.float32], grads[F64]):
        assert torch.isfinite(g32).all() and rel_err(g32, g64) < 1e-4
    if algorithm == "chunked":  # the written-out adjoint, in fp32, against autograd in fp64
        from seqfuse.lowering.reference.ssd import ssd_chunked_backward
        y, h = ssd_reference(x, b, c, a, d, h0, decay=decay, chunk=16, algorithm="chunked")
        f32 = [t.float() for t in (2 * y, torch.ones_like(h), x, b, c, a, d, h0)]
        for g32, g64 in zip(ssd_chunked_backward(*f32, decay=decay, chunk=16), grads[F64]):
            assert g32.dtype == torch.float32 and torch.isfinite(g32).all() and rel_err(g32, g64) < 1e-4


def test_ssd_unknown_algorithm_is_named():
    x, b, c, a, d, h0 = ssd_inputs(T=4)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        ssd_reference(x, b, c, a, algorithm="auto")
    assert set(ALGORITHMS) == {"recurrent", "quadratic", "chunked"}


# --- scan --------------------------------------------------------------------------------

def scan_inputs(shape=(2, 3, 50, 4), complex_=False, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    R, N = shape[:-2], shape[-1]
    if complex_:
        a = torch.polar(0.8 + 0.2 * torch.rand(shape, generator=g, dtype=dtype),
                        6 * torch.rand(shape, generator=g, dtype=dtype))
        ctype = torch.complex128 if dtype == F64 else torch.complex64
        b, h0 = torch.randn(shape, generator=g, dtype=ctype), torch.randn(*R, N, generator=g, dtype=ctype)
    else:
        a = 2 * torch.rand(shape, generator=g, dtype=dtype) - 1
        b, h0 = torch.randn(shape, generator=g, dtype=dtype), torch.randn(*R, N, generator=g, dtype=dtype)
    return a, b, torch.randn(shape, generator=g, dtype=dtype), h0


@pytest.mark.parametrize("chunk", [1, 3, 16, 50, 64])
@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_chunked_agrees_with_the_recurrence(chunk, complex_, reverse):
    a, b, c, h0 = scan_inputs(complex_=complex_)
    for readout in (c, None):
        y_ref, h_ref = scan_reference(a, b, readout, h0, reverse=reverse, algorithm="recurrent")
        y, h = scan_reference(a, b, readout, h0, reverse=reverse, algorithm="chunked", chunk=chunk)
        assert rel_err(y, y_ref) < 1e-12 and rel_err(h, h_ref) < 1e-12


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_adjoint_matches_autograd_through_the_recurrence(complex_, reverse):
    a, b, c, h0 = scan_inputs(shape=(2, 3, 20, 4), complex_=complex_)
    c = c[:1, :1]  # broadcast readout: its gradient is summed back to (1, 1, T, N)
    leaves = [t.clone().requires_grad_() for t in (a, b, c, h0)]
    y, h = scan_reference(*leaves, reverse=reverse, algorithm="recurrent")
    g = torch.Generator().manual_seed(5)
    gy, gh = torch.randn(y.shape, generator=g, dtype=y.dtype), torch.randn(h.shape, generator=g, dtype=h.dtype)
    want = torch.autograd.grad((y, h), leaves, (gy, gh))
    for algorithm in ("recurrent", "chunked"):
        got = scan_backward_reference(gy, gh, a, b, c, h0, reverse=reverse, algorithm=algorithm, chunk=8)
        for x, gg, ww in zip((a, b, c, h0), got, want):
            assert gg.shape == x.shape and gg.dtype == x.dtype
            assert rel_err(gg, ww) < 1e-12


def test_scan_fp32_gradients_match_fp64_at_a_moderate_size():
    a, b, c, h0 = scan_inputs(shape=(1, 16, 512, 8))
    g = torch.Generator().manual_seed(6)
    gy = torch.randn(1, 16, 512, generator=g, dtype=F64)
    gh = torch.randn(1, 16, 8, generator=g, dtype=F64)
    g64 = scan_backward_reference(gy, gh, a, b, c, h0, algorithm="chunked")
    g32 = scan_backward_reference(gy.float(), gh.float(), *(t.float() for t in (a, b, c, h0)), algorithm="chunked")
    for x32, x64 in zip(g32, g64):
        assert x32.dtype == torch.float32 and rel_err(x32, x64) < 1e-5


@pytest.mark.parametrize("decay", ["none", "scalar", "vector"])
@pytest.mark.parametrize("T, chunk", [(13, 4), (12, 4), (5, 16)])
def test_ssd_chunked_adjoint_matches_autograd_through_the_recurrence(decay, T, chunk):
    from seqfuse.lowering.reference.ssd import ssd_chunked_backward
    x, b, c, a, d, h0 = ssd_inputs(B=2, T=T, H=3, P=4, N=5, decay=decay)
    b = b[:, :, :1]      # one b for every head: its gradient is summed back to (B, T, 1, N)
    d = torch.randn(3, 4, dtype=F64)  # a skip per head and channel
    operands = [t for t in (x, b, c, a, d, h0) if t is not None]
    leaves = [t.clone().requires_grad_() for t in operands]
    full = iter(leaves)
    y, h = ssd_reference(*[next(full) if t is not None else None for t in (x, b, c, a, d, h0)], decay=decay,
                         algorithm="recurrent")
    g = torch.Generator().manual_seed(3)
    gy, gh = torch.randn(y.shape, generator=g, dtype=F64), torch.randn(h.shape, generator=g, dtype=F64)
    want = torch.autograd.grad((y, h), leaves, (gy, gh))
    got = [t for t in ssd_chunked_backward(gy, gh, x, b, c, a, d, h0, decay=decay, chunk=chunk) if t is not None]
    assert len(got) == len(want)
    for gg, ww, t in zip(got, want, operands):
        assert gg.shape == t.shape and rel_err(gg, ww) < 1e-12
